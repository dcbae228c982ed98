"""Pure-PyTorch references: the math of each kernel spelled out, used as the oracle in tests and benchmarks."""

from tsa_fast.reference.distillation_loss import distillation_loss

__all__ = ["distillation_loss"]
