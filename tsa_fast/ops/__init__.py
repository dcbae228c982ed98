"""Functional ops: autograd, `torch.library` custom ops and backend dispatch, one file per op family."""

from tsa_fast.ops.attention import attention, scaled_dot_product_attention
from tsa_fast.ops.attention_transfer_loss import attention_transfer_loss
from tsa_fast.ops.cross_tokenizer_loss import CrossTokenizerParts, TokenAlignment, cross_tokenizer_loss
from tsa_fast.ops.distillation_loss import distillation_loss
from tsa_fast.ops.fused_linear_cross_tokenizer_loss import fused_linear_cross_tokenizer_loss
from tsa_fast.ops.fused_linear_distillation_loss import fused_linear_distillation_loss

__all__ = [
    "attention",
    "CrossTokenizerParts",
    "TokenAlignment",
    "attention_transfer_loss",
    "cross_tokenizer_loss",
    "distillation_loss",
    "fused_linear_cross_tokenizer_loss",
    "fused_linear_distillation_loss",
    "scaled_dot_product_attention",
]
