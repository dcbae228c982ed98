"""Attention-transfer loss without attention maps: per-row KL(A_t || A_s) between a teacher's and a student's
attention distributions, and its gradient w.r.t. the student's queries and keys, in O(B x H x N) memory.

Contract: `attention_transfer_forward(q_s, k_s, q_t, k_t, key_padding_mask, kl, lse_s, lse_t, causal,
scale_s, scale_t)` writes, per query row, kl = KL(A_t || A_s) and the log-sum-exps lse_s, lse_t of the
masked scores, each (B, H, N_q) float32 contiguous; a row that does not count writes kl = 0 and
lse = -inf. `attention_transfer_backward(..., lse_s, lse_t, row_weights, dq_s, dk_s, ...)` writes the
gradient of sum(row_weights * kl) w.r.t. q_s and k_s. q: (B, H, N_q, D), k: (B, H, N_k, D), any strides,
fp32/fp16/bf16 (q and k of one model share a dtype); the models share B, H, N_q, N_k, not D.
key_padding_mask: (B, N_k) bool, True = keep, or None.

Math, per (b, h, query row i), s_ij = scale * q_i . k_j over the visible keys j (kept, and
j <= i + N_k - N_q when causal), lse_i = log sum_j exp(s_ij), A_ij = exp(s_ij - lse_i):
    KL(A_t,i || A_s,i) = lse_s,i - lse_t,i + sum_j A_t,ij (s_t,ij - s_s,ij)
    dS_ij = d(w_i KL_i) / d s_s,ij = w_i (A_s,ij - A_t,ij);   dq_s = scale_s dS k_s,   dk_s = scale_s dS^T q_s
A row counts when it has a visible key and, in self-attention (N_q == N_k), its own position is kept.

Tiling (as FlashAttention):
    forward  one program per (BLOCK_M query rows, b, h) holds q_s and q_t and sweeps BLOCK_N-key tiles:
             both score tiles by tl.dot, the online log-sum-exp of both, and the running sum
             sum_j exp(s_t,j - m_t) ((s_t,j - m_t) - (s_s,j - m_s)) against both running maxima m,
             rescaled and shifted when they move: one pass. (Differences from the maxima, not raw scores,
             keep fp32 rounding at the size of the log-ratios, not of the scores.)
    dq       the same sweep, recomputing both score tiles; A from the stored lse; dq += dS k_s.
    dk       one program per (BLOCK_N keys, b, h) holds k_s and k_t and sweeps the query tiles: dk += dS^T q_s.
Every output element is written by one program: deterministic, no atomics. Causal sweeps end (forward,
dq) or start (dk) at the diagonal. Head dims are padded to powers of two by masked loads (no input copy).
fp16/bf16 tiles multiply on the tensor cores (dS rounded to the inputs' dtype, as in FlashAttention),
fp32 tiles in full fp32 (no TF32); softmax statistics and accumulators are fp32.

Memory traffic per (b, h): each kernel reads q once and the keys once per query tile,
(N_q / BLOCK_M) * N_k * (D_s + D_t) elements (or the queries once per key tile, for dk); the forward
writes 12 bytes per query row, the backward dq_s and dk_s once. Compute: 2 N_q N_k (D_s + D_t) FLOPs and
2 exps per score element in each kernel, plus 2 N_q N_k D_s for the gradient product in dq and in dk.
Nothing of size N_q x N_k leaves the registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import dot, head, load_tile, online_logsumexp, scores, visible_keys


@triton.jit
def _load_row_stats(lse_s_ptr, lse_t_ptr, w_ptr, rows, n_q):
    """The stored log-sum-exps and the weight w of query rows, and whether each counts. A row that does not
    count (lse = -inf) reads lse = 0: its scores are all -inf, so its A is 0, not NaN."""
    in_range = rows < n_q
    lse_s = tl.load(lse_s_ptr + rows, mask=in_range, other=float("-inf"))
    lse_t = tl.load(lse_t_ptr + rows, mask=in_range, other=0.0)
    w = tl.load(w_ptr + rows, mask=in_range, other=0.0)
    counted = lse_s > float("-inf")
    return tl.where(counted, lse_s, 0.0), tl.where(counted, lse_t, 0.0), w, counted


@triton.jit
def _grad_scores(q_s, k_s, q_t, k_t, lse_s, lse_t, w, visible, scale_s, scale_t):
    """dS = w (A_s - A_t), the gradient of w * KL w.r.t. the student's scores, from recomputed scores."""
    a_s = tl.exp(scores(q_s, k_s, scale_s, visible) - lse_s[:, None])
    a_t = tl.exp(scores(q_t, k_t, scale_t, visible) - lse_t[:, None])
    return w[:, None] * (a_s - a_t)


@triton.jit
def _attention_transfer_fwd_kernel(
    q_s_ptr,
    k_s_ptr,
    q_t_ptr,
    k_t_ptr,
    mask_ptr,
    kl_ptr,
    lse_s_ptr,
    lse_t_ptr,
    stride_qs_b,
    stride_qs_h,
    stride_qs_n,
    stride_qs_d,
    stride_ks_b,
    stride_ks_h,
    stride_ks_n,
    stride_ks_d,
    stride_qt_b,
    stride_qt_h,
    stride_qt_n,
    stride_qt_d,
    stride_kt_b,
    stride_kt_h,
    stride_kt_n,
    stride_kt_d,
    stride_mask_b,
    stride_mask_n,
    n_heads,
    n_q,
    n_k,
    d_s,
    d_t,
    scale_s,
    scale_t,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    QUERY_PADDING: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // n_heads, tl.program_id(1) % n_heads
    rows = start_m + tl.arange(0, BLOCK_M)
    dims_s, dims_t = tl.arange(0, BLOCK_DS), tl.arange(0, BLOCK_DT)
    q_s = load_tile(
        head(q_s_ptr, b, h, stride_qs_b, stride_qs_h), rows, dims_s, stride_qs_n, stride_qs_d, n_q, d_s, UPCAST
    )
    q_t = load_tile(
        head(q_t_ptr, b, h, stride_qt_b, stride_qt_h), rows, dims_t, stride_qt_n, stride_qt_d, n_q, d_t, UPCAST
    )
    k_s_ptr = head(k_s_ptr, b, h, stride_ks_b, stride_ks_h)
    k_t_ptr = head(k_t_ptr, b, h, stride_kt_b, stride_kt_h)
    if HAS_MASK:
        mask_ptr += b.to(tl.int64) * stride_mask_b
    # Rows that may count: in range and, in self-attention, not at a padded position.
    rows_counted = rows < n_q
    if QUERY_PADDING:
        rows_counted &= tl.load(mask_ptr + rows * stride_mask_n, mask=rows < n_q, other=0) != 0

    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    m_t = m_s
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t, acc, shift = l_s, l_s, l_s
    end = n_k
    if CAUSAL:  # keys past the block's last diagonal are invisible to all its rows
        end = tl.minimum(n_k, start_m + BLOCK_M + n_k - n_q)
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        visible = visible_keys(rows, cols, rows_counted, mask_ptr, stride_mask_n, n_q, n_k, CAUSAL, HAS_MASK)
        k_s = load_tile(k_s_ptr, cols, dims_s, stride_ks_n, stride_ks_d, n_k, d_s, UPCAST)
        k_t = load_tile(k_t_ptr, cols, dims_t, stride_kt_n, stride_kt_d, n_k, d_t, UPCAST)
        s_s = scores(q_s, k_s, scale_s, visible)
        s_t = scores(q_t, k_t, scale_t, visible)
        m_s, l_s = online_logsumexp(m_s, l_s, s_s)
        # Teacher: l_t = sum exp(s_t - m_t) and acc = sum exp(s_t - m_t) ((s_t - m_t) - (s_s - m_s)), the
        # log-ratio taken against both running maxima, so that it stays small where the models agree (and is
        # exactly 0 for a row with one visible key). When the maxima move, the old terms are rescaled by
        # exp(m_t_old - m_t_new) and their shift m_t - m_s updated.
        m_new = tl.maximum(m_t, tl.max(s_t, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: keep exp() finite
        shift_new = m_safe - tl.where(m_s == float("-inf"), 0.0, m_s)
        alpha = tl.exp(m_t - m_safe)
        p_t = tl.exp(s_t - m_safe[:, None])
        acc = alpha * (acc - l_t * (shift_new - shift))
        acc += tl.sum(p_t * tl.where(visible, (s_t - s_s) - shift_new[:, None], 0.0), axis=1)
        l_t = l_t * alpha + tl.sum(p_t, axis=1)
        m_t, shift = m_new, shift_new

    # KL = E_{A_t}[log A_t - log A_s] = acc / l_t - log l_t + log l_s. A row with no visible key has
    # m = -inf and l = 0: it writes lse = -inf (the mark of a row that does not count) and kl = 0. A NaN
    # score, or teacher scores all -inf where the student's are not (l_t = 0 < l_s), give kl = NaN.
    log_l_s, log_l_t = tl.log(l_s), tl.log(l_t)
    lse_s = m_s + log_l_s
    lse_t = m_t + log_l_t
    kl = tl.where((l_s == 0) & (l_t == 0), 0.0, acc / l_t + (log_l_s - log_l_t))
    row_base = tl.program_id(1).to(tl.int64) * n_q
    tl.store(kl_ptr + row_base + rows, kl, mask=rows < n_q)
    tl.store(lse_s_ptr + row_base + rows, lse_s, mask=rows < n_q)
    tl.store(lse_t_ptr + row_base + rows, lse_t, mask=rows < n_q)


@triton.jit
def _attention_transfer_bwd_dq_kernel(
    q_s_ptr,
    k_s_ptr,
    q_t_ptr,
    k_t_ptr,
    mask_ptr,
    lse_s_ptr,
    lse_t_ptr,
    w_ptr,
    dq_ptr,
    stride_qs_b,
    stride_qs_h,
    stride_qs_n,
    stride_qs_d,
    stride_ks_b,
    stride_ks_h,
    stride_ks_n,
    stride_ks_d,
    stride_qt_b,
    stride_qt_h,
    stride_qt_n,
    stride_qt_d,
    stride_kt_b,
    stride_kt_h,
    stride_kt_n,
    stride_kt_d,
    stride_mask_b,
    stride_mask_n,
    n_heads,
    n_q,
    n_k,
    d_s,
    d_t,
    scale_s,
    scale_t,
    stride_dq_b,
    stride_dq_h,
    stride_dq_n,
    stride_dq_d,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // n_heads, tl.program_id(1) % n_heads
    rows = start_m + tl.arange(0, BLOCK_M)
    dims_s, dims_t = tl.arange(0, BLOCK_DS), tl.arange(0, BLOCK_DT)
    q_s = load_tile(
        head(q_s_ptr, b, h, stride_qs_b, stride_qs_h), rows, dims_s, stride_qs_n, stride_qs_d, n_q, d_s, UPCAST
    )
    q_t = load_tile(
        head(q_t_ptr, b, h, stride_qt_b, stride_qt_h), rows, dims_t, stride_qt_n, stride_qt_d, n_q, d_t, UPCAST
    )
    k_s_ptr = head(k_s_ptr, b, h, stride_ks_b, stride_ks_h)
    k_t_ptr = head(k_t_ptr, b, h, stride_kt_b, stride_kt_h)
    if HAS_MASK:
        mask_ptr += b.to(tl.int64) * stride_mask_b
    row_base = tl.program_id(1).to(tl.int64) * n_q  # this (b, h)'s rows of lse_s, lse_t, w
    lse_s_ptr, lse_t_ptr, w_ptr = lse_s_ptr + row_base, lse_t_ptr + row_base, w_ptr + row_base
    lse_s, lse_t, w, rows_counted = _load_row_stats(lse_s_ptr, lse_t_ptr, w_ptr, rows, n_q)

    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    end = n_k
    if CAUSAL:  # as in the forward
        end = tl.minimum(n_k, start_m + BLOCK_M + n_k - n_q)
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        visible = visible_keys(rows, cols, rows_counted, mask_ptr, stride_mask_n, n_q, n_k, CAUSAL, HAS_MASK)
        # Padded keys are not loaded (0): their ds is 0, but 0 * NaN would carry a NaN they hold into dq.
        kept = cols < n_k
        if HAS_MASK:
            kept &= tl.load(mask_ptr + cols * stride_mask_n, mask=kept, other=0) != 0
        k_s_ptrs = k_s_ptr + cols[:, None] * stride_ks_n + dims_s[None, :] * stride_ks_d
        k_s = tl.load(k_s_ptrs, mask=kept[:, None] & (dims_s[None, :] < d_s), other=0.0)
        if UPCAST:
            k_s = k_s.to(tl.float32)
        k_t = load_tile(k_t_ptr, cols, dims_t, stride_kt_n, stride_kt_d, n_k, d_t, UPCAST)
        ds = _grad_scores(q_s, k_s, q_t, k_t, lse_s, lse_t, w, visible, scale_s, scale_t)
        dq += dot(ds.to(k_s.dtype), k_s)

    # d s_s / d q_s = scale_s k_s: the scale is applied once, to the sum.
    dq_ptrs = head(dq_ptr, b, h, stride_dq_b, stride_dq_h) + rows[:, None] * stride_dq_n + dims_s[None, :] * stride_dq_d
    tl.store(dq_ptrs, (dq * scale_s).to(dq_ptr.dtype.element_ty), mask=(rows[:, None] < n_q) & (dims_s[None, :] < d_s))


@triton.jit
def _attention_transfer_bwd_dk_kernel(
    q_s_ptr,
    k_s_ptr,
    q_t_ptr,
    k_t_ptr,
    mask_ptr,
    lse_s_ptr,
    lse_t_ptr,
    w_ptr,
    dk_ptr,
    stride_qs_b,
    stride_qs_h,
    stride_qs_n,
    stride_qs_d,
    stride_ks_b,
    stride_ks_h,
    stride_ks_n,
    stride_ks_d,
    stride_qt_b,
    stride_qt_h,
    stride_qt_n,
    stride_qt_d,
    stride_kt_b,
    stride_kt_h,
    stride_kt_n,
    stride_kt_d,
    stride_mask_b,
    stride_mask_n,
    n_heads,
    n_q,
    n_k,
    d_s,
    d_t,
    scale_s,
    scale_t,
    stride_dk_b,
    stride_dk_h,
    stride_dk_n,
    stride_dk_d,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    b, h = tl.program_id(1) // n_heads, tl.program_id(1) % n_heads
    cols = start_n + tl.arange(0, BLOCK_N)
    dims_s, dims_t = tl.arange(0, BLOCK_DS), tl.arange(0, BLOCK_DT)
    k_s = load_tile(
        head(k_s_ptr, b, h, stride_ks_b, stride_ks_h), cols, dims_s, stride_ks_n, stride_ks_d, n_k, d_s, UPCAST
    )
    k_t = load_tile(
        head(k_t_ptr, b, h, stride_kt_b, stride_kt_h), cols, dims_t, stride_kt_n, stride_kt_d, n_k, d_t, UPCAST
    )
    q_s_ptr = head(q_s_ptr, b, h, stride_qs_b, stride_qs_h)
    q_t_ptr = head(q_t_ptr, b, h, stride_qt_b, stride_qt_h)
    if HAS_MASK:
        mask_ptr += b.to(tl.int64) * stride_mask_b
    row_base = tl.program_id(1).to(tl.int64) * n_q  # this (b, h)'s rows of lse_s, lse_t, w
    lse_s_ptr, lse_t_ptr, w_ptr = lse_s_ptr + row_base, lse_t_ptr + row_base, w_ptr + row_base

    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    start = 0
    if CAUSAL:  # query rows above the first diagonal of this key block see none of its keys
        start = tl.maximum(0, start_n - (n_k - n_q)) // BLOCK_M * BLOCK_M
    for start_m in range(start, n_q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        lse_s, lse_t, w, rows_counted = _load_row_stats(lse_s_ptr, lse_t_ptr, w_ptr, rows, n_q)
        visible = visible_keys(rows, cols, rows_counted, mask_ptr, stride_mask_n, n_q, n_k, CAUSAL, HAS_MASK)
        # Rows that do not count (a padded position in self-attention) are not loaded (0): their ds is 0, but
        # 0 * NaN would carry a NaN their query holds into dk. (A masked load, not a where after it: the where
        # costs shared memory past the A100's at the fp32 tiles.)
        q_s_ptrs = q_s_ptr + rows[:, None] * stride_qs_n + dims_s[None, :] * stride_qs_d
        q_s = tl.load(q_s_ptrs, mask=rows_counted[:, None] & (dims_s[None, :] < d_s), other=0.0)
        if UPCAST:
            q_s = q_s.to(tl.float32)
        q_t = load_tile(q_t_ptr, rows, dims_t, stride_qt_n, stride_qt_d, n_q, d_t, UPCAST)
        ds = _grad_scores(q_s, k_s, q_t, k_t, lse_s, lse_t, w, visible, scale_s, scale_t)
        dk += dot(tl.trans(ds).to(q_s.dtype), q_s)

    dk_ptrs = head(dk_ptr, b, h, stride_dk_b, stride_dk_h) + cols[:, None] * stride_dk_n + dims_s[None, :] * stride_dk_d
    tl.store(dk_ptrs, (dk * scale_s).to(dk_ptr.dtype.element_ty), mask=(cols[:, None] < n_k) & (dims_s[None, :] < d_s))


def _launch_args(q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t):
    """The arguments every kernel shares (strides, sizes, scales) and its compile-time options."""
    batch, heads, n_q, d_s = q_s.shape
    n_k, d_t = k_s.shape[2], q_t.shape[3]
    mask_strides = (0, 0) if key_padding_mask is None else key_padding_mask.stride()
    args = (
        *q_s.stride(),
        *k_s.stride(),
        *q_t.stride(),
        *k_t.stride(),
        *mask_strides,
        heads,
        n_q,
        n_k,
        d_s,
        d_t,
        scale_s,
        scale_t,
    )
    # Head dims padded to powers of two >= 16 (tl.dot); score tiles of 64 x 64, smaller for wide heads
    # so that the four q / k tiles stay in registers.
    block_ds, block_dt = (max(16, triton.next_power_of_2(d)) for d in (d_s, d_t))
    block = max(16, min(64, 8192 // max(block_ds, block_dt)))
    meta = dict(
        # CPU tensors run only under the interpreter, which has no bf16 arithmetic: tiles upcast to fp32.
        CAUSAL=causal,
        HAS_MASK=key_padding_mask is not None,
        UPCAST=q_s.device.type == "cpu",
        BLOCK_M=min(block, max(16, triton.next_power_of_2(n_q))),
        BLOCK_N=min(block, max(16, triton.next_power_of_2(n_k))),
        BLOCK_DS=block_ds,
        BLOCK_DT=block_dt,
        num_warps=4,
    )
    return args, meta, batch * heads


def attention_transfer_forward(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    kl: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    causal: bool,
    scale_s: float,
    scale_t: float,
) -> None:
    """Write per-row kl, lse_s, lse_t ((B, H, N_q) float32 contiguous) for q (B, H, N_q, D_s | D_t) and
    k (B, H, N_k, D_s | D_t); key_padding_mask (B, N_k) bool or None."""
    args, meta, heads_total = _launch_args(q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t)
    n_q, n_k = q_s.shape[2], k_s.shape[2]
    grid = (triton.cdiv(n_q, meta["BLOCK_M"]), heads_total)
    _attention_transfer_fwd_kernel[grid](
        q_s,
        k_s,
        q_t,
        k_t,
        key_padding_mask,
        kl,
        lse_s,
        lse_t,
        *args,
        QUERY_PADDING=key_padding_mask is not None and n_q == n_k,
        **meta,
    )


def attention_transfer_backward(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    row_weights: torch.Tensor,
    dq_s: torch.Tensor,
    dk_s: torch.Tensor,
    causal: bool,
    scale_s: float,
    scale_t: float,
) -> None:
    """Write dq_s, dk_s (shapes of q_s, k_s, any strides): the gradient of sum(row_weights * kl), with lse_s,
    lse_t from the forward and row_weights (B, H, N_q) float32 contiguous."""
    args, meta, heads_total = _launch_args(q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t)
    n_q, n_k = q_s.shape[2], k_s.shape[2]
    row_args = (q_s, k_s, q_t, k_t, key_padding_mask, lse_s, lse_t, row_weights)
    _attention_transfer_bwd_dq_kernel[(triton.cdiv(n_q, meta["BLOCK_M"]), heads_total)](
        *row_args, dq_s, *args, *dq_s.stride(), **meta
    )
    _attention_transfer_bwd_dk_kernel[(triton.cdiv(n_k, meta["BLOCK_N"]), heads_total)](
        *row_args, dk_s, *args, *dk_s.stride(), **meta
    )
