"""Reference attention-transfer loss in plain PyTorch: the oracle every backend is tested against.

Written for clarity, not speed: it materializes the B x H x N_q x N_k score and attention maps of both
models. It computes in float64 when any input is float64 and in float32 otherwise; its gradient comes
from autograd.

Per (batch b, head h, query row i), with the visible keys j (kept by `key_padding_mask`, and
j <= i + N_k - N_q when causal, i.e. aligned bottom-right):

    s_ij = scale * q_i . k_j,   A_ij = softmax_j(s_ij)   for each model (student s, teacher t)
    row_i = KL(A_t,i || A_s,i) = sum_j A_t,ij (log A_t,ij - log A_s,ij)

A row counts when it has a visible key and, in self-attention (N_q == N_k), its own position is kept
by the mask; other rows are 0. `mean` = sum of rows / rows counted (over b, h, i), `sum` = sum of rows.

Relation heads (MiniLM-v2): each model's heads are concatenated per position and split into R heads of
d_r = H * D / R (`relation_heads_split`), so the two models may differ in H and D.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsa_fast.reference.distillation_loss import kl_divergence, reduce_rows

REDUCTIONS = ("mean", "sum")


def relation_heads_split(x: Tensor, relation_heads: int) -> Tensor:
    """(B, H, N, D) -> (B, R, N, H * D / R): concatenate the heads at each position, split into R heads."""
    batch, heads, n, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, n, relation_heads, heads * head_dim // relation_heads).transpose(1, 2)


def visible_keys(n_q: int, n_k: int, causal: bool, key_padding_mask: Tensor | None, device) -> Tensor:
    """(B or 1, 1, N_q, N_k) bool: key j is visible to query i (kept, and j <= i + N_k - N_q if causal)."""
    visible = torch.ones(1, 1, n_q, n_k, dtype=torch.bool, device=device)
    if causal:
        visible = visible.tril(n_k - n_q)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    return visible


def attention_transfer_rows(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    *,
    scale_s: float,
    scale_t: float,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row KL(A_t || A_s) (B, H, N_q) (0 where a row does not count) and the rows that count (bool)."""
    dtype = torch.float64 if torch.float64 in (q_s.dtype, q_t.dtype) else torch.float32
    n_q, n_k = q_s.shape[2], k_s.shape[2]
    visible = visible_keys(n_q, n_k, causal, key_padding_mask, q_s.device)
    counted = visible.any(-1)
    if key_padding_mask is not None and n_q == n_k:  # self-attention: a padded position's row is padding
        counted = counted & key_padding_mask[:, None, :]
    counted = counted.expand(q_s.shape[0], q_s.shape[1], n_q)
    # Rows that do not count see every key (finite math) and leave through `where`: zero loss, zero gradient.
    visible = visible | ~counted[..., None]
    if key_padding_mask is not None:  # padded slots are never read: NaN or inf there cannot reach a result
        padded = ~key_padding_mask[:, None, :, None]
        k_s, k_t = k_s.masked_fill(padded, 0.0), k_t.masked_fill(padded, 0.0)
        if n_q == n_k:
            q_s, q_t = q_s.masked_fill(padded, 0.0), q_t.masked_fill(padded, 0.0)

    def log_attention(q: Tensor, k: Tensor, scale: float) -> Tensor:
        """log A: the log-softmax of the scores over the visible keys, (B, H, N_q, N_k)."""
        scores = scale * (q.to(dtype) @ k.to(dtype).transpose(-1, -2))
        return torch.log_softmax(torch.where(visible, scores, -torch.inf), -1)

    log_a_s, log_a_t = log_attention(q_s, k_s, scale_s), log_attention(q_t.detach(), k_t.detach(), scale_t)
    return torch.where(counted, kl_divergence(log_a_t, log_a_s), 0.0), counted


def attention_transfer_loss(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale_s: float | None = None,
    scale_t: float | None = None,
    relation_heads: int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Reference `tsa_fast.attention_transfer_loss` (same contract, no argument checking, no fusion)."""
    if relation_heads is not None:
        q_s, k_s, q_t, k_t = (relation_heads_split(x, relation_heads) for x in (q_s, k_s, q_t, k_t))
    rows, counted = attention_transfer_rows(
        q_s,
        k_s,
        q_t,
        k_t,
        scale_s=default_scale(q_s) if scale_s is None else scale_s,
        scale_t=default_scale(q_t) if scale_t is None else scale_t,
        causal=causal,
        key_padding_mask=key_padding_mask,
    )
    return reduce_rows(rows, counted, reduction, rows.shape)


def default_scale(q: Tensor) -> float:
    """1 / sqrt(D) of (B, H, N, D) queries (after a relation split, D = d_r)."""
    return q.shape[-1] ** -0.5
