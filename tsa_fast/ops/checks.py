"""Argument checks that every op shares: the dtypes the ops take, whether a value is a real number or a
flag, and whether torch.compile is tracing (when tensor values are unknown and value checks wait for run time).

A wrong type is a TypeError naming the argument; a wrong value of the right type is the caller's ValueError.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the C++ extension's dtype codes


def is_real(value) -> bool:
    """A Python int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bool(name: str, value) -> None:
    """`value` must be a bool (not 0/1, None or a string): TypeError naming `name` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def check_real(name: str, value) -> None:
    """`value` must be a Python int or float (not a bool, None or a string): TypeError naming `name`."""
    if not is_real(value):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")


def check_int(name: str, value) -> None:
    """`value` must be a Python int (not a bool, a float or None): TypeError naming `name` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    """`value` must be one of the strings `choices`: TypeError for a non-string, ValueError for another one."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def traced(tensor: Tensor) -> bool:
    """Whether torch.compile is tracing `tensor`, whose values are then unknown: Dynamo, or AOT autograd
    tracing a function allowed in the graph on fake tensors (torch 2.11's is_compiling says False there)."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode(tensor) is not None
