"""tsa_fast: fused kernels and a thin PyTorch API for teacher-student training (knowledge distillation)."""

from tsa_fast import nn
from tsa_fast.backends import available_backends
from tsa_fast.ops.attention import attention, scaled_dot_product_attention
from tsa_fast.ops.attention_transfer_loss import attention_transfer_loss
from tsa_fast.ops.cross_tokenizer_loss import CrossTokenizerParts, TokenAlignment, cross_tokenizer_loss
from tsa_fast.ops.distillation_loss import LossParts, distillation_loss
from tsa_fast.ops.fused_linear_cross_tokenizer_loss import fused_linear_cross_tokenizer_loss
from tsa_fast.ops.fused_linear_distillation_loss import fused_linear_distillation_loss

__version__ = "0.1.0"
__all__ = [
    "CrossTokenizerParts",
    "LossParts",
    "TokenAlignment",
    "attention",
    "attention_transfer_loss",
    "available_backends",
    "cross_tokenizer_loss",
    "distillation_loss",
    "fused_linear_cross_tokenizer_loss",
    "fused_linear_distillation_loss",
    "nn",
    "scaled_dot_product_attention",
]
