"""Reference attention in plain PyTorch: the oracle every backend of `tsa_fast.attention` is tested against.

Written for clarity, not speed: it materializes the B x H x N_q x N_k scores. It computes in float64 when
the inputs are float64 and in float32 otherwise, returns the output in the inputs' dtype and the lse in the
compute dtype; its gradient comes from autograd.

Per (batch b, head h, query row i), with the visible keys j (kept by `key_padding_mask`, and
j <= i + N_k - N_q when causal, i.e. aligned bottom-right) and key/value head h // (H / H_kv) (GQA):

    s_ij = scale * q_i . k_j,   lse_i = log sum_j exp(s_ij),   out_i = sum_j exp(s_ij - lse_i) v_j

A row with no visible key has out_i = 0 and lse_i = -inf, with zero gradients. Padded keys and values are
zeroed before any product, so that whatever they hold (NaN, inf) reaches no result; their gradients are 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsa_fast.reference.attention_transfer_loss import default_scale, visible_keys


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference `tsa_fast.attention` (same contract, no argument checking, no fusion)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = default_scale(q) if softmax_scale is None else softmax_scale
    group = q.shape[1] // k.shape[1]
    k, v = (x.to(dtype).repeat_interleave(group, dim=1) for x in (k, v))
    if key_padding_mask is not None:  # padded slots are never read: NaN or inf there cannot reach a result
        k, v = (x.masked_fill(~key_padding_mask[:, None, :, None], 0.0) for x in (k, v))
    visible = visible_keys(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    has_key = visible.any(-1, keepdim=True)
    # Rows with no visible key see every key (finite math) and leave through `where`: zero output and gradient.
    scores = torch.where(visible | ~has_key, scale * (q.to(dtype) @ k.transpose(-1, -2)), -torch.inf)
    lse = torch.logsumexp(scores, -1, keepdim=True)
    out = torch.where(has_key, torch.exp(scores - lse) @ v, 0.0).to(q.dtype)
    lse = torch.where(has_key, lse, -torch.inf).squeeze(-1)
    return (out, lse) if return_lse else out
