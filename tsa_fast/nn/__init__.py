"""Module forms of the tsa_fast ops."""

from tsa_fast.nn.distillation_loss import DistillationLoss
from tsa_fast.nn.fused_linear_distillation_loss import FusedLinearDistillationLoss

__all__ = ["DistillationLoss", "FusedLinearDistillationLoss"]
