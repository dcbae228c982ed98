"""The main job: distill a student from a teacher and compare it with the same student trained alone.

    python train.py                                    # the built-in recipe (stdlib corpus, causal LM), CPU
    python train.py --config configs/classify.yaml     # any recipe
    python train.py training.steps=50 loss.divergence=jsd    # key=value overrides
    python train.py --resume                           # continue a stopped or killed run

See tsa_fast/distill/recipe.py for what a run does and tsa_fast/distill/config.py for every option.
"""

import argparse

from tsa_fast.distill.config import load_config
from tsa_fast.distill.data import build_data
from tsa_fast.distill.recipe import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML recipe (default: the built-in recipe)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in output_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe options")
    args = parser.parse_args()
    try:  # bad options and bad data are reported before any training
        config = load_config(args.config, args.overrides)
        data = build_data(config.data)
    except (ValueError, FileNotFoundError, ImportError) as error:
        parser.error(str(error))
    run(config, resume=args.resume, data=data)


if __name__ == "__main__":
    main()
