"""Reference attention in plain PyTorch: the oracle every backend of `tsa_fast.attention` is tested against.

Written for clarity, not speed: it materializes the B x H x N_q x N_k scores. It computes in float64 when
the inputs are float64 and in float32 otherwise, returns the output in the inputs' dtype and the lse in the
compute dtype; its gradient comes from autograd.

Per (batch b, head h, query row i), with the visible keys j (kept by `key_padding_mask`, j <= i + N_k - N_q
when causal, i.e. aligned bottom-right, and i + N_k - N_q - left <= j <= i + N_k - N_q + right with
window = (left, right), a side of -1 unbounded: FlashAttention's `window_size`) and key/value head
h // (H / H_kv) (GQA):

    s_ij = c(scale * q_i . k_j),   lse_i = log sum_j exp(s_ij),   out_i = sum_j exp(s_ij - lse_i) v_j

with c(x) = softcap * tanh(x / softcap) when `softcap` is set (Gemma 2), else c(x) = x.

A row with no visible key has out_i = 0 and lse_i = -inf, with zero gradients. Padded keys and values are
zeroed before any product, so that whatever they hold (NaN, inf) reaches no result; their gradients are 0.

Packed sequences (`attention_varlen`, flash_attn_varlen_func's layout): q (total_q, H, D), k, v (total_k, H_kv,
D); sequence s is query rows cu_seqlens_q[s]:cu_seqlens_q[s + 1] and keys cu_seqlens_k[s]:cu_seqlens_k[s + 1],
each attending within itself as the batch of one it is (causal and window aligned bottom-right in it).
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
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference `tsa_fast.attention` (same contract, no argument checking, no fusion)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = default_scale(q) if softmax_scale is None else softmax_scale
    group = q.shape[1] // k.shape[1]
    k, v = (x.to(dtype).repeat_interleave(group, dim=1) for x in (k, v))
    if key_padding_mask is not None:  # padded slots are never read: NaN or inf there cannot reach a result
        k, v = (x.masked_fill(~key_padding_mask[:, None, :, None], 0.0) for x in (k, v))
    visible = visible_keys(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    if window is not None:
        visible = visible & window_band(q.shape[2], k.shape[2], window, q.device)
    has_key = visible.any(-1, keepdim=True)
    scores = scale * (q.to(dtype) @ k.transpose(-1, -2))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    # Rows with no visible key see every key (finite math) and leave through `where`: zero output and gradient.
    scores = torch.where(visible | ~has_key, scores, -torch.inf)
    lse = torch.logsumexp(scores, -1, keepdim=True)
    out = torch.where(has_key, torch.exp(scores - lse) @ v, 0.0).to(q.dtype)
    lse = torch.where(has_key, lse, -torch.inf).squeeze(-1)
    return (out, lse) if return_lse else out


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference `tsa_fast.attention_varlen`: out (total_q, H, D_v) [, lse (H, total_q)], `attention` per sequence."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    options = dict(causal=causal, softmax_scale=scale, window=window, softcap=softcap)
    out, lse = per_sequence(attention, q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), **options)
    return (out, lse) if return_lse else out


def per_sequence(attend, q: Tensor, k: Tensor, v: Tensor, bounds_q: list, bounds_k: list, **options):
    """(out (total_q, H, D_v), lse (H, total_q)) of packed sequences, `attend` (`attention`'s contract,
    (B, H, N, D) inputs, return_lse) run on each sequence as a batch of one; bounds_q, bounds_k: cu_seqlens as
    lists. A sequence without keys gives its rows out = 0, lse = -inf; one without queries is skipped."""
    heads, d_v = q.shape[1], v.shape[2]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for q_first, q_end, k_first, k_end in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]):
        rows = q_end - q_first
        if rows and k_end == k_first:
            outs.append(q.new_zeros(rows, heads, d_v))
            lses.append(torch.full((heads, rows), -torch.inf, dtype=lse_dtype, device=q.device))
        elif rows:
            sequence = (x.transpose(0, 1)[None] for x in (q[q_first:q_end], k[k_first:k_end], v[k_first:k_end]))
            out, lse = attend(*sequence, return_lse=True, **options)
            outs.append(out[0].transpose(0, 1))
            lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def window_band(n_q: int, n_k: int, window: tuple[int, int], device) -> Tensor:
    """(N_q, N_k) bool: i + N_k - N_q - left <= j <= i + N_k - N_q + right, a side of -1 unbounded."""
    left, right = window
    offset = torch.arange(n_k, device=device) - torch.arange(n_q, device=device)[:, None] - (n_k - n_q)  # j - diag
    band = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if left >= 0:
        band &= offset >= -left
    if right >= 0:
        band &= offset <= right
    return band
