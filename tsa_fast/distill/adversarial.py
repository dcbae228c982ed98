"""Adversarial perturbations of input embeddings (FGM, PGD), for training robust students and for
measuring robustness.

A perturbation delta of the token embeddings (B, N, D) lies in the ball ||delta_i||_2 <= epsilon of each
token i. PGD takes `steps` ascent steps of size 2.5 * epsilon / steps along the per-token normalized
gradient of `loss_fn`, projecting back onto the ball after each; FGM is one step of size epsilon from 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def adversarial_delta(loss_fn: Callable[[Tensor], Tensor], embeds: Tensor, epsilon: float, steps: int = 1) -> Tensor:
    """A perturbation (detached, embeds' shape) that increases loss_fn(embeds + delta); steps=1 is FGM."""
    step_size = epsilon if steps == 1 else 2.5 * epsilon / steps
    base = embeds.detach()
    delta = torch.zeros_like(base)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(base + delta), delta)
        delta = _project(delta.detach() + step_size * _unit(grad), epsilon)
    return delta


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _project(delta: Tensor, epsilon: float) -> Tensor:
    norm = delta.norm(dim=-1, keepdim=True)
    return delta * (epsilon / norm.clamp_min(epsilon))
