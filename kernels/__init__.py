"""Triton kernels and their launchers (no autograd), importable as `tsa_fast.kernels`; needs Triton."""

from .attention import attention_backward, attention_forward
from .attention_decode import attention_decode_forward
from .attention_transfer_loss import attention_transfer_backward, attention_transfer_forward
from .distillation_loss import distillation_loss_forward
from .fused_linear_distillation_loss import weight_grad_accumulate

__all__ = [
    "attention_backward",
    "attention_decode_forward",
    "attention_forward",
    "attention_transfer_backward",
    "attention_transfer_forward",
    "distillation_loss_forward",
    "weight_grad_accumulate",
]
