"""Checkpoint files: torch files of tensors, numbers, strings and containers of them, written atomically and
read with `weights_only=True`, so that loading a file (a teacher checkpoint someone sent, a resumed run)
never runs code that a pickle in it names."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch


def save_atomically(state: dict, path: Path) -> None:
    """Write `state` to the torch file `path` through a temporary file, so that a killed process never leaves
    a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_weights_only(path: Path, *, mmap: bool = False) -> dict:
    """The torch file `path`, on the CPU (memory-mapped with `mmap`), loaded with weights_only=True.

    Raises FileNotFoundError for a missing file, ValueError naming the file when it holds anything other than
    tensors, numbers, strings and containers of them (an arbitrary pickled object is refused, not run)."""
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refused: it holds pickled objects other than tensors, numbers, strings and containers, "
            f"which tsa_fast does not unpickle (torch.load weights_only=True): {error}"
        ) from None


@contextlib.contextmanager
def weights_only_loads(allowed: Iterable[type] = ()) -> Iterator[None]:
    """Within the block every `torch.load` of this process loads with weights_only=True, even where a library
    asks for weights_only=False (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD), the classes `allowed` besides tensors
    and plain data (plain-data classes: enums, dataclasses, objects of numbers, rebuilt without running code)."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
