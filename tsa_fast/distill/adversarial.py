"""Adversarial perturbations of input embeddings (FGM, PGD), for training robust students and for
measuring robustness.

A perturbation delta of the token embeddings e (B, N, D) lies in the ball ||delta_i|| <= r_i = epsilon *
||e_i|| of each token i (epsilon is relative, so it means the same at any embedding scale). PGD takes `steps`
ascent steps of size 2.5 * r_i / steps along the per-token normalized gradient of `loss_fn`, projecting back
onto the ball after each; FGM is one step of size r_i from 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def adversarial_delta(loss_fn: Callable[[Tensor], Tensor], embeds: Tensor, epsilon: float, steps: int = 1) -> Tensor:
    """A perturbation (detached, embeds' shape) that increases loss_fn(embeds + delta); steps=1 is FGM."""
    base = embeds.detach()
    radius = epsilon * base.norm(dim=-1, keepdim=True)
    step_size = radius if steps == 1 else 2.5 * radius / steps
    delta = torch.zeros_like(base)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(base + delta), delta)
        delta = _project(delta.detach() + step_size * _unit(grad), radius)
    return delta


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _project(delta: Tensor, radius: Tensor) -> Tensor:
    """delta scaled back onto the ball of `radius` (per token) where it lies outside."""
    norm = delta.norm(dim=-1, keepdim=True)
    return delta * torch.where(norm > radius, radius / norm.clamp_min(1e-12), 1.0)
