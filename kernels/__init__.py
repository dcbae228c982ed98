"""Triton kernels and their launchers (no autograd), importable as `tsa_fast.kernels`; needs Triton."""

from .distillation_loss import distillation_loss_forward

__all__ = ["distillation_loss_forward"]
