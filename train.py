"""The main job: distill a student from a teacher and compare it with the same student trained alone.

    python train.py                                    # the built-in recipe (stdlib corpus, causal LM), CPU
    python train.py --config configs/classify.yaml     # any recipe
    python train.py training.steps=50 loss.divergence=jsd    # key=value overrides
    python train.py --resume                           # continue a stopped or killed run
    python train.py --config configs/minilm_compress.yaml    # a pretrained Hugging Face sentence-embedding teacher
    deepspeed --num_gpus 2 train.py --deepspeed configs/ds/zero3_teacher.json    # ZeRO-3 teacher, ZeRO-2 student

The YAML's `recipe:` key names the recipe (no key: lm), a module of tsa_fast/recipes/ (tsa_fast.recipes.RECIPES:
lm.py, classify.py, sentence_embedding.py), where its run and every option are; `--deepspeed` runs the lm and
classify recipes under DeepSpeed (tsa_fast/integrations/deepspeed.py).
"""

import argparse

from tsa_fast import recipes
from tsa_fast.recipes.config import read_recipe


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
        recipe = recipes.load(read_recipe(args.config, args.overrides).get("recipe", recipes.DEFAULT))
        config = recipe.load_config(args.config, args.overrides)
        if args.deepspeed:
            from tsa_fast.integrations import deepspeed  # an optional dependency

            job = deepspeed.prepare(config, args.deepspeed)
        else:
            job = recipe.prepare(config)
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.error(str(error))
    job(resume=args.resume)


if __name__ == "__main__":
    main()
