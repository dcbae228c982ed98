"""The main job: distill a student from a teacher and compare it with the same student trained alone.

    python train.py                                    # the built-in recipe (stdlib corpus, causal LM), CPU
    python train.py --config configs/classify.yaml     # any recipe
    python train.py training.steps=50 loss.divergence=jsd    # key=value overrides
    python train.py --resume                           # continue a stopped or killed run
    python train.py --config configs/minilm_compress.yaml    # a pretrained Hugging Face sentence-embedding teacher
    deepspeed --num_gpus 2 train.py --deepspeed configs/ds/zero3_teacher.json    # ZeRO-3 teacher, ZeRO-2 student

See tsa_fast/distill/recipe.py for what a run does and tsa_fast/distill/config.py for every option; a YAML file
with `recipe: sentence_embedding` runs tsa_fast/distill/sentence_embedding.py instead, and `--deepspeed` runs the
recipe under DeepSpeed (tsa_fast/integrations/deepspeed.py).
"""

import argparse
from functools import partial

from tsa_fast.distill.config import RecipeConfig, read_recipe
from tsa_fast.distill.data import build_data
from tsa_fast.distill.recipe import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML recipe (default: the built-in recipe)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in output_dir")
    parser.add_argument(
        "--deepspeed",
        action="append",
        metavar="DS.json",
        help="run under DeepSpeed with these teacher / student engine configs (configs/ds/); repeatable",
    )
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher; unused
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe options")
    args = parser.parse_args()
    try:  # bad options and bad data are reported before any training
        raw = read_recipe(args.config, args.overrides)
        if raw.get("recipe") == "sentence_embedding":
            from tsa_fast.distill import sentence_embedding  # needs transformers, an optional dependency

            job = partial(sentence_embedding.run, sentence_embedding.SentenceEmbeddingConfig.model_validate(raw))
        else:
            config = RecipeConfig.model_validate(raw)
            if args.deepspeed:
                from tsa_fast.integrations import deepspeed  # an optional dependency

                job = deepspeed.prepare(config, args.deepspeed)
            else:
                job = partial(run, config, data=build_data(config.data))
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.error(str(error))
    job(resume=args.resume)


if __name__ == "__main__":
    main()
