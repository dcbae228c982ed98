"""Fused attention, FlashAttention-2 style: softmax(c(q k^T * scale) + mask) v and its gradient, without the
N_q x N_k attention map, in O(B x H x N) extra memory.

Contract: `attention_forward(q, k, v, key_padding_mask, out, lse, causal, softmax_scale, window, softcap)`
writes out (B, H, N_q, D_v) and the log-sum-exp of each row's scaled (and capped) scores, lse (B, H, N_q)
float32 contiguous (natural log; -inf for a row with no visible key, whose output is 0).
`attention_backward(q, k, v, key_padding_mask, out, lse, grad_out, grad_lse, dq, dk, dv, causal,
softmax_scale, window, softcap)` writes the gradient of sum(grad_out * out) + sum(grad_lse * lse) w.r.t. q, k,
v. window = (left, right), FlashAttention's sliding window (-1 = unbounded, default (-1, -1)); softcap > 0
caps the scores, 0 (default) leaves them. q: (B, H, N_q, D), k: (B, H_kv, N_k, D),
v: (B, H_kv, N_k, D_v), any strides, one dtype of fp32/fp16/bf16; H a multiple of H_kv (GQA/MQA: query
head h reads key/value head h // (H / H_kv), nothing is repeated in memory); D, D_v <= 256, any value
(padded to a power of two inside the kernel by masked loads, never by copying). key_padding_mask: (B, N_k)
bool, True = keep, any strides, or None.
`attention_varlen_forward` and `attention_varlen_backward` take packed sequences in flash_attn_varlen_func's
layout: q (total_q, H, D), k, v (total_k, H_kv, D), lse (H, total_q), sequence s being query rows
cu_seqlens_q[s]:cu_seqlens_q[s + 1] and keys cu_seqlens_k[s]:cu_seqlens_k[s + 1] (int32), which attend only to
each other, causal and window aligned bottom-right in each sequence.

Math, per (b, h, query row i), over the visible keys j (kept; j <= i + N_k - N_q when causal: aligned
bottom-right; i + N_k - N_q - left <= j <= i + N_k - N_q + right in a window, causal setting right = 0), in
base 2 with the scale folded in (qk_scale = scale * log2(e), exp2 is the fast path):
    s_ij = qk_scale q_i . k_j,   m_i = max_j s_ij,   l_i = sum_j 2^(s_ij - m_i),
    out_i = sum_j 2^(s_ij - m_i) v_j / l_i
    lse_i = ln(2) (m_i + log2 l_i),   p_ij = 2^(s_ij - lse_i log2(e))   (recomputed in the backward)
    dv_j = sum_i p_ij do_i,   ds_ij = p_ij (do_i . v_j - delta_i),   delta_i = do_i . out_i - dlse_i
    dq_i = scale sum_j ds_ij k_j,   dk_j = scale sum_i ds_ij q_i
With a softcap (Gemma 2), s_ij = log2(e) softcap tanh(scale q_i . k_j / softcap) and ds_ij picks up the factor
1 - tanh^2 (the tanh of kernels/utils.py keeps its digits for small arguments).

Tiling:
    forward  one program per (BLOCK_M query rows, b, h) holds its q tile and sweeps BLOCK_N-key tiles of k, v
             with the online softmax (running max m, sum l, output acc rescaled by 2^(m_old - m_new)); the
             sweep covers only the key tiles some row of the block sees (causal: up to the block's last
             diagonal; a window: from the first row's left edge to the last row's right edge, so its cost
             falls with the window) in up to three loops: key tiles every row of the block sees pay no mask,
             the window's left edge, the causal diagonal or right edge and the last partial tile do.
    delta    one program per (BLOCK_M rows, b, h): delta = rowsum(do * out) - dlse.
    dk, dv   one program per (BLOCK_N keys, b, h_kv) holds its k, v tiles and sweeps the query tiles of every
             query head sharing them (GQA), only those that see some key of the block, masked on the causal
             diagonal and the window's edges only: a padded key's dk, dv are stored as zeros.
    dq       one program per (BLOCK_M rows, b, h), the forward's sweep: dq += ds k.
Packed sequences (VARLEN): b is a sequence, the grids cover the longest one (max_seqlen_q or _k tiles per
sequence); a program reads its sequence's first row and length from cu_seqlens and returns at once when its
tile starts past the sequence's end. No tile spans two sequences, so nothing is spent on pairs of different
sequences: the work is that of each sequence run alone.
Every output element is written by one program: deterministic, no atomics (dq costs one more recomputation
of q k^T and do v^T than FlashAttention-2's atomic accumulation). Block sizes and warps are autotuned on a
GPU, keyed by the sequence lengths rounded up to powers of two (no retuning at each new length, e.g. in
generation) and the head dims; the interpreter (CPU tensors) runs one fixed configuration. Every
candidate compiles for sm_80 and sm_90 (ptxas) within the A100's shared memory for bf16/fp16; one that does
not fit a smaller GPU fails to launch there and the autotuner skips it.

Memory traffic per (b, h): the forward reads q and writes out once and reads k, v once per query tile,
(N_q / BLOCK_M) N_k (D + D_v) elements, plus 4 bytes of lse per row; the backward reads k, v once per query
tile (dq) and q, do once per key tile (dk, dv), writes dq, dk, dv once. FLOPs: 4 N_q N_k D forward
(2 for q k^T, 2 for p v, with D = D_v), 14 N_q N_k D backward (FlashAttention-2: 10), halved when causal;
with a window of W keys per row, N_k becomes about W in both (and in the traffic of k, v).
Nothing of size N_q x N_k leaves the registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import dot, head, kept_keys, key_band, launch_autotuned, load_tile, strides, tanh

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def _configs(*shapes):
    """Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages): few, as each costs a compile."""
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Drop tiles far longer than the sequences (decoding: N_q = 1), tiles whose fp32 accumulators would not
    fit in registers (a 128-row tile of a 256-wide head) and, for fp32 inputs (full-precision dots, slow to
    compile and shared-memory hungry), tiles over 64 x 64. Configs that need more shared memory than the
    GPU has fail to launch and the autotuner skips them. At least one config stays."""
    args = {**named_args, **kwargs}
    width = max(args["BLOCK_D"], args["BLOCK_DV"])
    max_tile = 64 * 64 if args["q_ptr"].dtype == torch.float32 else 128 * 128

    def fits(config):
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        short = block_m <= max(32, args["tune_n_q"]) and block_n <= max(32, args["tune_n_k"])
        return short and max(block_m, block_n) * width <= 128 * 128 and block_m * block_n <= max_tile

    kept = [config for config in configs if fits(config)]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))]


# Autotuning key: the sequence lengths rounded up to powers of two (tune_n_q, tune_n_k: no retuning at each
# new length, e.g. in generation), the head dims and the options (and, implicitly, the dtypes).
TUNE_KEY = ["tune_n_q", "tune_n_k", "BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_MASK", "WINDOW", "SOFTCAP", "VARLEN"]
FWD_CONFIGS = _configs((128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4))
# ptxas (sm_90, bf16, head dims 64 and 128, causal or not) spills no register in the first candidate of dk, dv
# (32 x 64 on 8 warps) nor of dq (64 x 32 on 8 warps), where 4-warp tiles spill up to 2.9 KB (dk, dv:
# 32 x 128) and 156 bytes (dq: 128 x 32) per thread.
DKDV_CONFIGS = _configs((32, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (32, 32, 4, 2))
DQ_CONFIGS = _configs((64, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3))


@triton.jit
def _tile_scores(
    q,
    k,
    rows,
    cols,
    mask_ptr,
    stride_mask_n,
    n_q,
    n_k,
    qk_scale,
    left,
    right,
    softcap,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
):
    """The scores of (rows, cols) in base 2, s = log2(e) c(scale q k^T) (c = softcap tanh(. / softcap) with
    SOFTCAP, else identity), and dc/dx = 1 - tanh^2 (1 without SOFTCAP) for the backward. With MASKED, s is
    -inf where key j is out of range, padded (HAS_MASK), past row i's diagonal (CAUSAL) or outside its window
    (WINDOW: i + n_k - n_q - left <= j <= i + n_k - n_q + right). Tiles that every row sees in full skip the
    mask (MASKED=False)."""
    if SOFTCAP:  # qk_scale / (log2(e) softcap) = scale / softcap: tanh's argument in natural units
        t = tanh(dot(q, tl.trans(k)) * (qk_scale / (LOG2E * softcap)))
        s = t * (softcap * LOG2E)
        slope = 1.0 - t * t
    else:
        s = dot(q, tl.trans(k)) * qk_scale
        slope = 1.0
    if MASKED:
        # Row i (past n_q: not stored) sees key j when j is in range, kept and in the row's band.
        visible = (rows < n_q)[:, None] & kept_keys(cols, mask_ptr, stride_mask_n, n_k, HAS_MASK)[None, :]
        s = tl.where(key_band(visible, rows, cols, n_q, n_k, left, right, CAUSAL, WINDOW), s, float("-inf"))
    return s, slope


@triton.jit
def _zero_padded_keys(tile, cols, mask_ptr, stride_mask_n, n_k, HAS_MASK: tl.constexpr):
    """The k or v tile of keys `cols` with the rows of padded keys set to 0, so that what those slots hold
    (NaN, inf) never meets a product: a masked score is -inf, but 0 * NaN in p v or ds k would still be NaN."""
    if HAS_MASK:
        # Not `kept_keys`: rows past n_k are 0 already, and its extra `& (j < n_k)` here makes the forward take
        # 192 KB of shared memory on sm_80 instead of 160 KB, over the A100's limit.
        kept = tl.load(mask_ptr + cols * stride_mask_n, mask=cols < n_k, other=0) != 0
        tile = tl.where(kept[:, None], tile, 0.0)
    return tile


@triton.jit
def _key_range(
    start_m,
    n_q,
    n_k,
    left,
    right,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """For the query rows [start_m, start_m + BLOCK_M), the key tiles in three runs: [first, full_lo) need the
    mask, [full_lo, full_hi) are visible to every row (no mask but the padding), [full_hi, end) need the mask;
    keys before `first` or from `end` on are hidden from every row and never loaded. Row i sees keys j in
    [i + n_k - n_q - left, i + n_k - n_q + right] (WINDOW; CAUSAL: left unbounded, right = 0)."""
    if CAUSAL or WINDOW:
        if CAUSAL:
            left, right = n_k, 0  # a left bound of n_k hides no key
        # The diagonals of the block's first and last rows (rows past n_q are never stored: left out).
        first_diagonal = start_m + n_k - n_q
        last_diagonal = tl.minimum(start_m + BLOCK_M, n_q) - 1 + n_k - n_q
        first = tl.minimum(tl.maximum(first_diagonal - left, 0), n_k) // BLOCK_N * BLOCK_N
        end = tl.minimum(tl.maximum(last_diagonal + 1 + right, 0), n_k)
        # Keys every row sees: from the last row's left edge to the first row's right edge.
        full_lo = tl.cdiv(tl.minimum(tl.maximum(last_diagonal - left, 0), n_k), BLOCK_N) * BLOCK_N
        full_hi = tl.minimum(tl.maximum(first_diagonal + 1 + right, 0), n_k) // BLOCK_N * BLOCK_N
        # A window narrower than the block: no tile is visible to every row, [first, end) is one masked run
        # (the one that also runs without a window).
        none_full = full_hi < full_lo
        full_lo = tl.where(none_full, first, full_lo)
        full_hi = tl.where(none_full, first, full_hi)
    else:
        first = 0
        full_lo = 0
        full_hi = n_k // BLOCK_N * BLOCK_N
        end = n_k
    return first, full_lo, full_hi, end


@triton.jit
def _query_range(
    start_n,
    n_q,
    n_k,
    left,
    right,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """For the keys [start_n, start_n + BLOCK_N), the query tiles in three runs: [first, full_lo) and
    [full_hi, end) see some of them (masked), [full_lo, full_hi) see all; rows before `first` or from `end`
    on see none and are never loaded. Key j is seen by rows i in [j - (n_k - n_q) - right, j - (n_k - n_q) +
    left] (WINDOW; CAUSAL: left unbounded, right = 0)."""
    if CAUSAL or WINDOW:
        if CAUSAL:
            left, right = n_k, 0
        # The rows on the diagonal of the block's first and last keys (keys past n_k are never stored: left out).
        first_row = start_n - (n_k - n_q)
        last_row = tl.minimum(start_n + BLOCK_N, n_k) - 1 - (n_k - n_q)
        first = tl.minimum(tl.maximum(first_row - right, 0), n_q) // BLOCK_M * BLOCK_M
        end = tl.minimum(tl.maximum(last_row + 1 + left, 0), n_q)
        # Rows that see every key: from the last key's lowest row to the first key's highest row. Rows past
        # n_q add nothing (q = do = 0), so a run that reaches n_q covers the partial last tile.
        full_lo = tl.cdiv(tl.minimum(tl.maximum(last_row - right, 0), n_q), BLOCK_M) * BLOCK_M
        full_lo = tl.minimum(full_lo, n_q)
        full_hi = tl.minimum(tl.maximum(first_row + 1 + left, 0), n_q)
        full_hi = tl.where(full_hi == n_q, n_q, full_hi // BLOCK_M * BLOCK_M)
        # A window narrower than the block: [first, end) is one masked run (the one that also runs when causal).
        none_full = full_hi < full_lo
        full_lo = tl.where(none_full, end, full_lo)
        full_hi = tl.where(none_full, end, full_hi)
    else:
        first = 0
        full_lo = 0
        full_hi = n_q
        end = n_q
    return first, full_lo, full_hi, end


@triton.jit
def _row_stats(lse_ptr, delta_ptr, rows, n_q):
    """The saved lse of query rows in base 2, and delta. A row with no visible key (lse = -inf) reads 0:
    its scores are all -inf, so its p is 0, not NaN."""
    in_range = rows < n_q
    lse = tl.load(lse_ptr + rows, mask=in_range, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=in_range, other=0.0)
    return tl.where(lse == float("-inf"), 0.0, lse * LOG2E), delta


@triton.jit
def _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, h, n_heads, n_q, n_k, VARLEN: tl.constexpr):
    """Where the rows of (b, h) are: (first query row, first key, N_q, N_k, offset of its lse and delta rows).
    Packed (VARLEN), b is a sequence: rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q (total_q rows, n_q) and of
    the (H, total_q) lse, keys cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k; else the whole (b, h) slice."""
    if VARLEN:
        q_first = tl.load(cu_seqlens_q_ptr + b)
        k_first = tl.load(cu_seqlens_k_ptr + b)
        q_start, k_start = q_first.to(tl.int64), k_first.to(tl.int64)
        row_base = h.to(tl.int64) * n_q + q_start
        n_q = tl.load(cu_seqlens_q_ptr + b + 1) - q_first
        n_k = tl.load(cu_seqlens_k_ptr + b + 1) - k_first
    else:
        q_start = tl.zeros([], tl.int64)
        k_start = tl.zeros([], tl.int64)
        row_base = (b * n_heads + h).to(tl.int64) * n_q
    return q_start, k_start, n_q, n_k, row_base


@triton.jit
def _fwd_tiles(
    acc,
    m_i,
    l_i,
    q,
    k_ptr,
    v_ptr,
    mask_ptr,
    rows,
    start,
    end,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mask_n,
    n_q,
    n_k,
    d,
    d_v,
    qk_scale,
    left,
    right,
    softcap,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Fold the key tiles [start, end) into each row's running max m_i, sum l_i and unnormalized output acc."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_ptr, cols, tl.arange(0, BLOCK_D), stride_kn, stride_kd, n_k, d, UPCAST)
        k = _zero_padded_keys(k, cols, mask_ptr, stride_mask_n, n_k, HAS_MASK)
        s, _ = _tile_scores(
            q,
            k,
            rows,
            cols,
            mask_ptr,
            stride_mask_n,
            n_q,
            n_k,
            qk_scale,
            left,
            right,
            softcap,
            CAUSAL,
            HAS_MASK,
            WINDOW,
            SOFTCAP,
            MASKED,
        )
        # Online softmax: when the row max grows, rescale what was summed so far by 2^(m_old - m_new).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = load_tile(v_ptr, cols, tl.arange(0, BLOCK_DV), stride_vn, stride_vd, n_k, d_v, UPCAST)
        v = _zero_padded_keys(v, cols, mask_ptr, stride_mask_n, n_k, HAS_MASK)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(FWD_CONFIGS, TUNE_KEY, prune_configs_by=dict(early_config_prune=_prune))
@triton.jit
def _attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    out_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mask_b,
    stride_mask_n,
    n_heads,
    group,
    n_q,
    n_k,
    d,
    d_v,
    sm_scale,
    tune_n_q,
    tune_n_k,
    window_left,
    window_right,
    softcap,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // n_heads, tl.program_id(1) % n_heads
    q_start, k_start, n_q, n_k, row_base = _sequence(
        cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, h, n_heads, n_q, n_k, VARLEN
    )
    if VARLEN and start_m >= n_q:  # the grid covers the longest sequence, this one ends before the tile
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    q_ptr = head(q_ptr, b, h, stride_qb, stride_qh) + q_start * stride_qn
    q = load_tile(q_ptr, rows, tl.arange(0, BLOCK_D), stride_qn, stride_qd, n_q, d, UPCAST)
    # GQA: `group` query heads share one k, v head.
    k_ptr = head(k_ptr, b, h // group, stride_kb, stride_kh) + k_start * stride_kn
    v_ptr = head(v_ptr, b, h // group, stride_vb, stride_vh) + k_start * stride_vn
    if HAS_MASK:
        mask_ptr += b.to(tl.int64) * stride_mask_b
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    tile_args = (stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, n_q, n_k, d, d_v, qk_scale)
    tile_args += (window_left, window_right, softcap)
    first, full_lo, full_hi, end = _key_range(
        start_m, n_q, n_k, window_left, window_right, CAUSAL, WINDOW, BLOCK_M, BLOCK_N
    )
    # Key tiles [full_lo, full_hi) are visible to every row of the block: no mask but the padding. [first,
    # full_lo): the window's left edge; [full_hi, end): its right edge or the causal diagonal, and the partial
    # last tile. Tiles outside [first, end) are never loaded: a window's cost falls with its width.
    if WINDOW:
        acc, m_i, l_i = _fwd_tiles(
            acc,
            m_i,
            l_i,
            q,
            k_ptr,
            v_ptr,
            mask_ptr,
            rows,
            first,
            full_lo,
            *tile_args,
            CAUSAL=CAUSAL,
            HAS_MASK=HAS_MASK,
            WINDOW=WINDOW,
            SOFTCAP=SOFTCAP,
            MASKED=True,
            UPCAST=UPCAST,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            BLOCK_DV=BLOCK_DV,
        )
    acc, m_i, l_i = _fwd_tiles(
        acc,
        m_i,
        l_i,
        q,
        k_ptr,
        v_ptr,
        mask_ptr,
        rows,
        full_lo,
        full_hi,
        *tile_args,
        CAUSAL=False,
        HAS_MASK=HAS_MASK,
        WINDOW=False,
        SOFTCAP=SOFTCAP,
        MASKED=HAS_MASK,
        UPCAST=UPCAST,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV,
    )
    acc, m_i, l_i = _fwd_tiles(
        acc,
        m_i,
        l_i,
        q,
        k_ptr,
        v_ptr,
        mask_ptr,
        rows,
        full_hi,
        end,
        *tile_args,
        CAUSAL=CAUSAL,
        HAS_MASK=HAS_MASK,
        WINDOW=WINDOW,
        SOFTCAP=SOFTCAP,
        MASKED=True,
        UPCAST=UPCAST,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV,
    )

    # A row with no visible key has l_i = 0 and acc = 0: it writes zeros and lse = -inf.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    dims_v = tl.arange(0, BLOCK_DV)
    out_ptr = head(out_ptr, b, h, stride_ob, stride_oh) + q_start * stride_on
    out_ptrs = out_ptr + rows[:, None] * stride_on + dims_v[None, :] * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < n_q) & (dims_v[None, :] < d_v))
    tl.store(lse_ptr + row_base + rows, (m_i + tl.log2(l_i)) * LN2, mask=rows < n_q)


@triton.jit
def _attention_bwd_delta_kernel(
    out_ptr,
    do_ptr,
    grad_lse_ptr,
    delta_ptr,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    n_heads,
    n_q,
    d_v,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b, h = tl.program_id(1) // n_heads, tl.program_id(1) % n_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims_v = tl.arange(0, BLOCK_DV)
    out = load_tile(head(out_ptr, b, h, stride_ob, stride_oh), rows, dims_v, stride_on, stride_od, n_q, d_v, True)
    do = load_tile(head(do_ptr, b, h, stride_dob, stride_doh), rows, dims_v, stride_don, stride_dod, n_q, d_v, True)
    row_ptrs = tl.program_id(1).to(tl.int64) * n_q + rows
    grad_lse = tl.load(grad_lse_ptr + row_ptrs, mask=rows < n_q, other=0.0)
    # d lse_i / d s_ij = p_ij: a gradient on lse enters ds = p (dp - delta) as a shift of delta.
    tl.store(delta_ptr + row_ptrs, tl.sum(out * do, axis=1) - grad_lse, mask=rows < n_q)


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse2,
    delta,
    k_ptr,
    v_ptr,
    mask_ptr,
    rows,
    start,
    end,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_mask_n,
    n_q,
    n_k,
    d,
    d_v,
    qk_scale,
    left,
    right,
    softcap,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Add the key tiles [start, end) to dq (before the scale): sum_j ds_ij k_j."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(k_ptr, cols, tl.arange(0, BLOCK_D), stride_kn, stride_kd, n_k, d, UPCAST)
        v = load_tile(v_ptr, cols, tl.arange(0, BLOCK_DV), stride_vn, stride_vd, n_k, d_v, UPCAST)
        k = _zero_padded_keys(k, cols, mask_ptr, stride_mask_n, n_k, HAS_MASK)
        v = _zero_padded_keys(v, cols, mask_ptr, stride_mask_n, n_k, HAS_MASK)
        s, slope = _tile_scores(
            q,
            k,
            rows,
            cols,
            mask_ptr,
            stride_mask_n,
            n_q,
            n_k,
            qk_scale,
            left,
            right,
            softcap,
            CAUSAL,
            HAS_MASK,
            WINDOW,
            SOFTCAP,
            MASKED,
        )
        p = tl.exp2(s - lse2[:, None])  # the forward's probabilities, from the saved lse
        ds = p * (dot(do, tl.trans(v)) - delta[:, None]) * slope  # through the softcap: d c / d x
        dq += dot(ds.to(k.dtype), k)
    return dq


@triton.autotune(DQ_CONFIGS, TUNE_KEY, prune_configs_by=dict(early_config_prune=_prune))
@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mask_b,
    stride_mask_n,
    n_heads,
    group,
    n_q,
    n_k,
    d,
    d_v,
    sm_scale,
    tune_n_q,
    tune_n_k,
    window_left,
    window_right,
    softcap,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqn,
    stride_dqd,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    b, h = tl.program_id(1) // n_heads, tl.program_id(1) % n_heads
    q_start, k_start, n_q, n_k, row_base = _sequence(
        cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, h, n_heads, n_q, n_k, VARLEN
    )
    if VARLEN and start_m >= n_q:  # past the end of this sequence
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_ptr = head(q_ptr, b, h, stride_qb, stride_qh) + q_start * stride_qn
    q = load_tile(q_ptr, rows, dims, stride_qn, stride_qd, n_q, d, UPCAST)
    do = load_tile(
        head(do_ptr, b, h, stride_dob, stride_doh) + q_start * stride_don,
        rows,
        tl.arange(0, BLOCK_DV),
        stride_don,
        stride_dod,
        n_q,
        d_v,
        UPCAST,
    )
    k_ptr = head(k_ptr, b, h // group, stride_kb, stride_kh) + k_start * stride_kn
    v_ptr = head(v_ptr, b, h // group, stride_vb, stride_vh) + k_start * stride_vn
    if HAS_MASK:
        mask_ptr += b.to(tl.int64) * stride_mask_b
    lse2, delta = _row_stats(lse_ptr + row_base, delta_ptr + row_base, rows, n_q)
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tile_args = (stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, n_q, n_k, d, d_v, qk_scale)
    tile_args += (window_left, window_right, softcap)
    first, full_lo, full_hi, end = _key_range(
        start_m, n_q, n_k, window_left, window_right, CAUSAL, WINDOW, BLOCK_M, BLOCK_N
    )
    # As in the forward: tiles [full_lo, full_hi) unmasked but for the padding, [first, full_lo) and
    # [full_hi, end) masked, none outside.
    if WINDOW:
        dq = _dq_tiles(
            dq,
            q,
            do,
            lse2,
            delta,
            k_ptr,
            v_ptr,
            mask_ptr,
            rows,
            first,
            full_lo,
            *tile_args,
            CAUSAL=CAUSAL,
            HAS_MASK=HAS_MASK,
            WINDOW=WINDOW,
            SOFTCAP=SOFTCAP,
            MASKED=True,
            UPCAST=UPCAST,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            BLOCK_DV=BLOCK_DV,
        )
    dq = _dq_tiles(
        dq,
        q,
        do,
        lse2,
        delta,
        k_ptr,
        v_ptr,
        mask_ptr,
        rows,
        full_lo,
        full_hi,
        *tile_args,
        CAUSAL=False,
        HAS_MASK=HAS_MASK,
        WINDOW=False,
        SOFTCAP=SOFTCAP,
        MASKED=HAS_MASK,
        UPCAST=UPCAST,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV,
    )
    dq = _dq_tiles(
        dq,
        q,
        do,
        lse2,
        delta,
        k_ptr,
        v_ptr,
        mask_ptr,
        rows,
        full_hi,
        end,
        *tile_args,
        CAUSAL=CAUSAL,
        HAS_MASK=HAS_MASK,
        WINDOW=WINDOW,
        SOFTCAP=SOFTCAP,
        MASKED=True,
        UPCAST=UPCAST,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        BLOCK_DV=BLOCK_DV,
    )

    dq_ptr = head(dq_ptr, b, h, stride_dqb, stride_dqh) + q_start * stride_dqn
    dq_ptrs = dq_ptr + rows[:, None] * stride_dqn + dims[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=(rows[:, None] < n_q) & (dims[None, :] < d))


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    mask_ptr,
    cols,
    start,
    end,
    stride_qn,
    stride_qd,
    stride_don,
    stride_dod,
    n_q,
    n_k,
    d,
    d_v,
    qk_scale,
    left,
    right,
    softcap,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Add the query tiles [start, end) of one head to dk (before the scale) and dv. Rows past n_q load
    q = do = 0 and delta = 0, so they add nothing."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(q_ptr, rows, tl.arange(0, BLOCK_D), stride_qn, stride_qd, n_q, d, UPCAST)
        do = load_tile(do_ptr, rows, tl.arange(0, BLOCK_DV), stride_don, stride_dod, n_q, d_v, UPCAST)
        lse2, delta = _row_stats(lse_ptr, delta_ptr, rows, n_q)
        s, slope = _tile_scores(
            q,
            k,
            rows,
            cols,
            mask_ptr,
            0,
            n_q,
            n_k,
            qk_scale,
            left,
            right,
            softcap,
            CAUSAL,
            False,
            WINDOW,
            SOFTCAP,
            MASKED,
        )
        p = tl.exp2(s - lse2[:, None])
        dv += dot(tl.trans(p).to(do.dtype), do)
        ds = p * (dot(do, tl.trans(v)) - delta[:, None]) * slope
        dk += dot(tl.trans(ds).to(q.dtype), q)
    return dk, dv


@triton.autotune(DKDV_CONFIGS, TUNE_KEY, prune_configs_by=dict(early_config_prune=_prune))
@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mask_b,
    stride_mask_n,
    n_heads,
    group,
    n_q,
    n_k,
    d,
    d_v,
    sm_scale,
    tune_n_q,
    tune_n_k,
    window_left,
    window_right,
    softcap,
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    n_kv_heads = n_heads // group
    b, h_kv = tl.program_id(1) // n_kv_heads, tl.program_id(1) % n_kv_heads
    head_rows = n_q  # lse and delta rows per query head: N_q, or the packed total_q
    q_start, k_start, n_q, n_k, row_base = _sequence(
        cu_seqlens_q_ptr, cu_seqlens_k_ptr, b, h_kv * group, n_heads, n_q, n_k, VARLEN
    )
    if VARLEN and start_n >= n_k:  # past the end of this sequence
        return
    cols = start_n + tl.arange(0, BLOCK_N)
    dims, dims_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    k_ptr = head(k_ptr, b, h_kv, stride_kb, stride_kh) + k_start * stride_kn
    v_ptr = head(v_ptr, b, h_kv, stride_vb, stride_vh) + k_start * stride_vn
    k = load_tile(k_ptr, cols, dims, stride_kn, stride_kd, n_k, d, UPCAST)
    v = load_tile(v_ptr, cols, dims_v, stride_vn, stride_vd, n_k, d_v, UPCAST)
    if HAS_MASK:
        mask_ptr += b.to(tl.int64) * stride_mask_b
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    first, full_lo, full_hi, end = _query_range(
        start_n, n_q, n_k, window_left, window_right, CAUSAL, WINDOW, BLOCK_M, BLOCK_N
    )
    # GQA: the `group` query heads that share this k, v head add to its gradient here, in turn (no atomics).
    for g in range(group):
        h = h_kv * group + g
        q_head = head(q_ptr, b, h, stride_qb, stride_qh) + q_start * stride_qn
        do_head = head(do_ptr, b, h, stride_dob, stride_doh) + q_start * stride_don
        head_base = row_base + g * head_rows
        tile_args = (q_head, do_head, lse_ptr + head_base, delta_ptr + head_base, mask_ptr, cols)
        strides = (stride_qn, stride_qd, stride_don, stride_dod, n_q, n_k, d, d_v, qk_scale)
        strides += (window_left, window_right, softcap)
        # Query tiles [first, full_lo) meet the causal diagonal or the window's right edge (masked),
        # [full_lo, full_hi) see every key of the block, [full_hi, end) meet the window's left edge (masked).
        dk, dv = _dkdv_tiles(
            dk,
            dv,
            k,
            v,
            *tile_args,
            first,
            full_lo,
            *strides,
            CAUSAL=CAUSAL,
            WINDOW=WINDOW,
            SOFTCAP=SOFTCAP,
            MASKED=True,
            UPCAST=UPCAST,
            BLOCK_M=BLOCK_M,
            BLOCK_D=BLOCK_D,
            BLOCK_DV=BLOCK_DV,
        )
        dk, dv = _dkdv_tiles(
            dk,
            dv,
            k,
            v,
            *tile_args,
            full_lo,
            full_hi,
            *strides,
            CAUSAL=False,
            WINDOW=False,
            SOFTCAP=SOFTCAP,
            MASKED=False,
            UPCAST=UPCAST,
            BLOCK_M=BLOCK_M,
            BLOCK_D=BLOCK_D,
            BLOCK_DV=BLOCK_DV,
        )
        if WINDOW:
            dk, dv = _dkdv_tiles(
                dk,
                dv,
                k,
                v,
                *tile_args,
                full_hi,
                end,
                *strides,
                CAUSAL=CAUSAL,
                WINDOW=WINDOW,
                SOFTCAP=SOFTCAP,
                MASKED=True,
                UPCAST=UPCAST,
                BLOCK_M=BLOCK_M,
                BLOCK_D=BLOCK_D,
                BLOCK_DV=BLOCK_DV,
            )

    # Padding: a padded key's p above was never normalized by any row (garbage, even inf); it reaches only
    # this key's own dk, dv, which are zero.
    keep = kept_keys(cols, mask_ptr, stride_mask_n, n_k, HAS_MASK)
    dk_ptr = head(dk_ptr, b, h_kv, stride_dkb, stride_dkh) + k_start * stride_dkn
    dv_ptr = head(dv_ptr, b, h_kv, stride_dvb, stride_dvh) + k_start * stride_dvn
    dk_ptrs = dk_ptr + cols[:, None] * stride_dkn + dims[None, :] * stride_dkd
    dv_ptrs = dv_ptr + cols[:, None] * stride_dvn + dims_v[None, :] * stride_dvd
    dk = tl.where(keep[:, None], dk * sm_scale, 0.0)
    dv = tl.where(keep[:, None], dv, 0.0)
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=(cols[:, None] < n_k) & (dims[None, :] < d))
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=(cols[:, None] < n_k) & (dims_v[None, :] < d_v))


# ---------------------------------------------------------------------------------------------------
# Launchers: the autotuned kernels on a GPU, one fixed configuration under the interpreter.

# Under the interpreter (CPU tensors): small tiles of unequal sizes, so that short test sequences cross
# several tiles, partial tiles and the causal diagonal. Tests may swap these, or set None to autotune there.
INTERPRETER_BLOCKS = {
    _attention_fwd_kernel: dict(BLOCK_M=32, BLOCK_N=16),
    _attention_bwd_dkdv_kernel: dict(BLOCK_M=16, BLOCK_N=32),
    _attention_bwd_dq_kernel: dict(BLOCK_M=32, BLOCK_N=16),
}


def _launch(kernel, grid, interpreted, *args, **meta):
    """Run an autotuned kernel; under the interpreter with its INTERPRETER_BLOCKS."""
    blocks = INTERPRETER_BLOCKS[kernel] if interpreted and INTERPRETER_BLOCKS is not None else None
    launch_autotuned(kernel, grid, blocks, *args, **meta)


def _band(n_q: int, n_k: int, causal: bool, window: tuple[int, int]) -> tuple[bool, bool, int, int]:
    """(CAUSAL, WINDOW, left, right) for the kernels: causal sets the window's right side to 0; a band that
    bounds no side is plain attention, one bounded on the right at 0 only is causal. A side the window leaves
    unbounded (-1), or wider than the keys, is bounded by the sequences (n_k on the left, n_q on the right),
    which hides no key."""
    left, right = window
    if causal:
        right = 0
    if left < 0 and right < 0:
        return False, False, 0, 0
    if left < 0 and right == 0:
        return True, False, 0, 0
    return False, True, n_k if left < 0 else min(left, n_k), n_q if right < 0 else min(right, n_q)


def _shared_args(q, k, v, key_padding_mask, causal, softmax_scale, window, softcap, packed):
    """The arguments the forward, dq and dk/dv kernels share (strides, sizes, scale, window, softcap, tuning
    key, cu_seqlens) and their compile-time options. packed: None, or (cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k) with q, k, v as `_sequences_views` (the window and tuning key then take the longest lengths)."""
    _, heads, n_q, d = q.shape
    n_k, d_v = v.shape[2], v.shape[3]
    cu_seqlens_q, cu_seqlens_k, max_q, max_k = (None, None, n_q, n_k) if packed is None else packed
    causal, windowed, left, right = _band(max_q, max_k, causal, window)
    args = (
        *strides(q, k, v, key_padding_mask),
        heads,
        heads // k.shape[1],
        n_q,
        n_k,
        d,
        d_v,
        softmax_scale,
        triton.next_power_of_2(max_q),
        triton.next_power_of_2(max_k),
        left,
        right,
        softcap,
        cu_seqlens_q,
        cu_seqlens_k,
    )
    meta = dict(
        # CPU tensors run only under the interpreter, which has no bf16 arithmetic: tiles upcast to fp32.
        CAUSAL=causal,
        HAS_MASK=key_padding_mask is not None,
        WINDOW=windowed,
        SOFTCAP=softcap != 0.0,
        VARLEN=packed is not None,
        UPCAST=q.device.type == "cpu",
        # Head dims padded to powers of two >= 16 (tl.dot) by masked loads.
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(d_v)),
    )
    return args, meta


def _sequences_views(cu_seqlens: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Packed (total, H, D) tensors as the (S, H, total, D) views the kernels take (S = len(cu_seqlens) - 1),
    stride 0 along the sequences: (b, h) addresses head h of the packed rows, and `_sequence` picks sequence
    b's rows."""
    n_seqs = cu_seqlens.shape[0] - 1
    return [x.transpose(0, 1).unsqueeze(0).expand(n_seqs, -1, -1, -1) for x in tensors]


def _forward(q, k, v, key_padding_mask, out, lse, causal, softmax_scale, window, softcap, packed) -> None:
    args, meta = _shared_args(q, k, v, key_padding_mask, causal, softmax_scale, window, softcap, packed)
    batch, heads, n_q = q.shape[:3]
    rows = n_q if packed is None else packed[2]  # packed: the longest sequence's tiles, per sequence
    grid = lambda blocks: (triton.cdiv(rows, blocks["BLOCK_M"]), batch * heads)  # noqa: E731
    _launch(
        _attention_fwd_kernel, grid, meta["UPCAST"], q, k, v, key_padding_mask, out, lse, *args, *strides(out), **meta
    )


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> None:
    """Write out (B, H, N_q, D_v), any strides, and lse (B, H, N_q) float32 contiguous. window = (left, right),
    -1 = unbounded; softcap 0 means none."""
    _forward(q, k, v, key_padding_mask, out, lse, causal, softmax_scale, window, softcap, None)


def attention_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> None:
    """Packed sequences (flash_attn_varlen_func's layout): q (total_q, H, D), k (total_k, H_kv, D), v (total_k,
    H_kv, D_v), out (total_q, H, D_v), any strides; cu_seqlens_q, cu_seqlens_k (S + 1,) int32 contiguous,
    non-decreasing from 0 to total_q, total_k, and max_seqlen_q, max_seqlen_k at least the longest sequence
    (not checked here). Sequence s's query rows cu_seqlens_q[s]:cu_seqlens_q[s + 1] attend to its keys
    cu_seqlens_k[s]:cu_seqlens_k[s + 1] only, causal and window aligned bottom-right in each sequence. Writes
    out and lse (H, total_q) float32 contiguous."""
    packed = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    q, k, v, out = _sequences_views(cu_seqlens_q, q, k, v, out)
    _forward(q, k, v, None, out, lse, causal, softmax_scale, window, softcap, packed)


def delta_rows(block_dv: int) -> int:
    """BLOCK_M of the delta kernel, a memory-bound row reduction: one fixed tile of about 4K elements."""
    return max(16, 4096 // block_dv)


def _backward(
    q, k, v, key_padding_mask, out, lse, grad_out, grad_lse, dq, dk, dv, causal, softmax_scale, window, softcap, packed
) -> None:
    args, meta = _shared_args(q, k, v, key_padding_mask, causal, softmax_scale, window, softcap, packed)
    batch, heads, n_q = q.shape[:3]
    rows, keys = (n_q, k.shape[2]) if packed is None else packed[2:]
    delta = torch.empty_like(lse)
    block_delta = delta_rows(meta["BLOCK_DV"])
    # delta is a row reduction in lse's layout: packed rows are one batch of total_q rows.
    rows_batch = batch if packed is None else 1
    _attention_bwd_delta_kernel[(triton.cdiv(n_q, block_delta), rows_batch * heads)](
        out[:rows_batch],
        grad_out[:rows_batch],
        grad_lse,
        delta,
        *strides(out, grad_out),
        heads,
        n_q,
        v.shape[3],
        BLOCK_M=block_delta,
        BLOCK_DV=meta["BLOCK_DV"],
    )
    inputs = (q, k, v, key_padding_mask, grad_out, lse, delta)
    dkdv_grid = lambda blocks: (triton.cdiv(keys, blocks["BLOCK_N"]), batch * k.shape[1])  # noqa: E731
    _launch(
        _attention_bwd_dkdv_kernel,
        dkdv_grid,
        meta["UPCAST"],
        *inputs,
        dk,
        dv,
        *args,
        *strides(grad_out, dk, dv),
        **meta,
    )
    dq_grid = lambda blocks: (triton.cdiv(rows, blocks["BLOCK_M"]), batch * heads)  # noqa: E731
    _launch(_attention_bwd_dq_kernel, dq_grid, meta["UPCAST"], *inputs, dq, *args, *strides(grad_out, dq), **meta)


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> None:
    """Write dq, dk, dv (shapes of q, k, v, any strides) from out and lse of the forward, grad_out (shape of
    out, any strides) and grad_lse ((B, H, N_q) float32 contiguous); window and softcap as the forward's."""
    args = (q, k, v, key_padding_mask, out, lse, grad_out, grad_lse, dq, dk, dv)
    _backward(*args, causal, softmax_scale, window, softcap, None)


def attention_varlen_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> None:
    """`attention_backward` for `attention_varlen_forward`'s packed layout: dq, dk, dv (total, H, D) any strides,
    grad_out (total_q, H, D_v) any strides, grad_lse (H, total_q) float32 contiguous."""
    packed = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    q, k, v, out, grad_out, dq, dk, dv = _sequences_views(cu_seqlens_q, q, k, v, out, grad_out, dq, dk, dv)
    _backward(q, k, v, None, out, lse, grad_out, grad_lse, dq, dk, dv, causal, softmax_scale, window, softcap, packed)
