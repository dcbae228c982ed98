"""Module forms of the tsa_fast ops."""

from tsa_fast.nn.distillation_loss import DistillationLoss

__all__ = ["DistillationLoss"]
