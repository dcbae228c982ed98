"""What every recipe's config shares (`RunConfig`), and reading one from YAML with command-line overrides.

`read_recipe(path, overrides)` reads a YAML file and applies `key=value` overrides, dotted into nested
sections (`training.steps=50`, `loss.divergence=jsd`, `teachers.0.checkpoint=t.pt`); values are parsed as
YAML scalars (`true`, `3e-4`, `null`, `[1, 2]`). A recipe's `load_config` validates the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, model_validator

from tsa_fast.distill.config import LoggingConfig, Section, TrainingConfig


class RunConfig(Section):
    """The options of every recipe: which recipe, the results' name and directory, seed, device, precision,
    threads, the training of the student, logging. A recipe's config subclasses it with its own sections, its
    name in `tsa_fast.recipes.RECIPES` (`RECIPE`) and its defaults for these options (`DEFAULTS`)."""

    RECIPE: ClassVar[str]

    recipe: str = Field("", description="the recipe this config is for (tsa_fast.recipes.RECIPES); default: its own")
    name: str = Field("run", description="the recipe's name, in its results")
    output_dir: str = Field("runs/run", description="checkpoints, metrics, tables and plots")
    seed: int = Field(0, description="seed of the initializations, of dropout and of the data order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto: bf16 on a GPU that has it, else fp32"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; null: torch's default")
    training: TrainingConfig = Field(TrainingConfig(), description="the training of the student")
    logging: LoggingConfig = Field(LoggingConfig(), description="TensorBoard and progress bars")

    @model_validator(mode="before")
    @classmethod
    def _own_recipe(cls, values: Any) -> Any:
        return {"recipe": cls.RECIPE, **values} if isinstance(values, dict) else values

    @model_validator(mode="after")
    def _is_this_recipe(self):
        if self.recipe != self.RECIPE:
            raise ValueError(f"recipe={self.recipe!r}, but this is the config of the {self.RECIPE!r} recipe")
        return self


def read_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """The mapping in YAML file `path` (None: empty) with `key=value` overrides applied, not yet validated.

    Raises: FileNotFoundError for a missing file; ValueError for a file that is not a mapping or an override
    without '='.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"an override is key=value, got {override!r}")
        _set_dotted(raw, key.split("."), yaml.safe_load(value), override)
    return raw


def _set_dotted(tree: dict | list, keys: list[str], value, override: str) -> None:
    """tree[k0][k1]... = value, creating mappings on the way; list items by index (`teachers.0.checkpoint`)."""
    *parents, last = keys
    for key in parents:
        if isinstance(tree, list):
            tree = tree[_list_index(tree, key, override)]
        else:
            tree = tree.setdefault(key, [{}] if key == "teachers" else {})
    if isinstance(tree, list):
        tree[_list_index(tree, last, override)] = value
    else:
        tree[last] = value


def _list_index(items: list, key: str, override: str) -> int:
    if not key.isdigit() or int(key) > len(items):
        raise ValueError(f"{override!r}: {key!r} is not an index of a list of {len(items)}")
    if int(key) == len(items):
        items.append({})
    return int(key)
