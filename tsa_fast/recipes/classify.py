"""The classification recipe (configs/classify.yaml): the label of a text, here which standard-library package
family a docstring comes from. It is the run of `tsa_fast.recipes.lm`, which serves both tasks (data.task),
with the classification defaults: `data.task=classify`, and its own name and output directory."""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator

from tsa_fast.distill.config import TrainingConfig
from tsa_fast.distill.data import DataConfig
from tsa_fast.recipes.config import read_recipe
from tsa_fast.recipes.lm import RecipeConfig, prepare, run

__all__ = ["ClassifyConfig", "load_config", "prepare", "run"]


class ClassifyConfig(RecipeConfig):
    """`RecipeConfig` whose task is classification (every option as there)."""

    RECIPE = "classify"
    DEFAULTS = {
        **RecipeConfig.DEFAULTS,
        "name": "stdlib_classify",
        "output_dir": "runs/stdlib_classify",
        "data": DataConfig(task="classify"),
        "training": TrainingConfig(steps=200, lr=2e-3, eval_every=50),
        "students": [],
    }

    @model_validator(mode="after")
    def _classification(self):
        if self.data.task != "classify":
            raise ValueError(f"the classify recipe needs data.task='classify', got {self.data.task!r}")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ClassifyConfig:
    """The recipe in YAML file `path` (None: the defaults) with `key=value` overrides applied (as `lm.load_config`)."""
    return ClassifyConfig.model_validate(read_recipe(path, overrides))
