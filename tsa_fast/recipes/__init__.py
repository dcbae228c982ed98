"""The recipes: one module per recipe, each run by `python train.py --config configs/NAME.yaml`, the YAML's
`recipe:` key naming it (`RECIPES`; no key: `DEFAULT`).

Every recipe module has `load_config(path, overrides)` (its config: a `recipes.config.RunConfig`), `prepare(config)`
(what must be checked or built before any training, e.g. the data; returns the job, `job(resume=False)`) and
`run(config, resume=False)`. Beside them: `config` (the config base every recipe shares, YAML and overrides),
`runtime` (the one-process `LocalRuntime`, device and precision), `report` (the results table) and
`fingerprint` (the keys of cached teachers and caches). The engine (`tsa_fast.distill`) imports none of them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

RECIPES = {
    "lm": "tsa_fast.recipes.lm",
    "classify": "tsa_fast.recipes.classify",
    "sentence_embedding": "tsa_fast.recipes.sentence_embedding",
    "qa": "tsa_fast.recipes.qa",
    "hf_lm": "tsa_fast.recipes.hf_lm",
}
DEFAULT = "lm"


def load(name: object) -> ModuleType:
    """The module of recipe `name` (imported now: a recipe may need an optional package, e.g. transformers).
    Raises ValueError for a name that is not in RECIPES, ImportError for a missing optional package."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ValueError(f"recipe={name!r}: the recipes are {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name])
