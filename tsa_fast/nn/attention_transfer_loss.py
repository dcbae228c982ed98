"""`AttentionTransferLoss`: the module form of `tsa_fast.attention_transfer_loss`."""

from __future__ import annotations

from torch import Tensor, nn

from tsa_fast.ops.attention_transfer_loss import TRANSFER_OPTIONS, attention_transfer_loss


class AttentionTransferLoss(nn.Module):
    """`forward(q_s, k_s, q_t, k_t, key_padding_mask=None)` = `attention_transfer_loss(..., **options)`.

    Takes the keyword options of `tsa_fast.attention_transfer_loss` but the per-batch `key_padding_mask`
    (causal, scale_s, scale_t, relation_heads, reduction; same defaults). Unknown option names raise
    TypeError; bad option types (TypeError) and values (ValueError) raise at the first forward, as the op
    does.
    """

    def __init__(self, **options) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(TRANSFER_OPTIONS))
        if unknown:
            raise TypeError(f"AttentionTransferLoss got unknown options {unknown}; valid: {sorted(TRANSFER_OPTIONS)}")
        self.options = {**TRANSFER_OPTIONS, **options}

    def forward(
        self, q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        return attention_transfer_loss(q_s, k_s, q_t, k_t, key_padding_mask=key_padding_mask, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v != TRANSFER_OPTIONS[k])
