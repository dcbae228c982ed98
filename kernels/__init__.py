"""Triton kernels and their launchers (no autograd), importable as `tsa_fast.kernels`; needs Triton."""

from .attention import attention_backward, attention_forward
from .attention_transfer_loss import attention_transfer_backward, attention_transfer_forward
from .cross_tokenizer_loss import cross_tokenizer_exact, cross_tokenizer_logsumexp, cross_tokenizer_softmax_rows
from .distillation_loss import distillation_loss_forward
from .fused_linear_distillation_loss import weight_grad_accumulate

__all__ = [
    "attention_backward",
    "attention_forward",
    "attention_transfer_backward",
    "attention_transfer_forward",
    "cross_tokenizer_exact",
    "cross_tokenizer_logsumexp",
    "cross_tokenizer_softmax_rows",
    "distillation_loss_forward",
    "weight_grad_accumulate",
]
