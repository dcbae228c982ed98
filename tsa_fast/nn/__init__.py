"""Module forms of the tsa_fast ops."""

from tsa_fast.nn.attention_transfer_loss import AttentionTransferLoss
from tsa_fast.nn.distillation_loss import DistillationLoss
from tsa_fast.nn.fused_linear_distillation_loss import FusedLinearDistillationLoss
from tsa_fast.nn.multihead_attention import MultiheadAttention

__all__ = ["AttentionTransferLoss", "DistillationLoss", "FusedLinearDistillationLoss", "MultiheadAttention"]
