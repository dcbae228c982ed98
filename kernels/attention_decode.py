"""Attention decode path (flash-decoding): few query rows against a long KV cache, split over the keys.

Contract: `attention_decode_forward(q, k, v, key_padding_mask, out, lse, causal, softmax_scale, window, softcap,
num_splits=None)` writes what `attention_forward` of kernels/attention.py writes, with the same semantics:
out (B, H, N_q, D_v), any strides, and lse (B, H, N_q) float32 contiguous (natural log; -inf and out = 0 for a
row with no visible key). Causal aligned bottom-right, window = (left, right) (-1 = unbounded), softcap > 0 (0:
none), GQA (query head h reads key/value head h // (H / H_kv)), key_padding_mask (B, N_k) bool, True = keep
(a padded slot's k, v are never multiplied), any strides, one dtype of fp32/fp16/bf16, D, D_v <= 256. Built for
N_q <= 16 (generation: one new token, or a few of speculative decoding) and N_k up to 128k; any N_q works.
No gradient (the op runs the full kernels whenever one is needed).

Math, per (b, h, query row i), over the visible keys j (those of attention.py), in base 2 (qk_scale = scale
log2(e)); the keys are cut into S splits, split s holding the key range K_s:
    s_ij = qk_scale q_i . k_j (softcap: log2(e) softcap tanh(scale q_i . k_j / softcap))
    m_s = max_{j in K_s} s_ij,  l_s = sum_{j in K_s} 2^(s_ij - m_s),  o_s = sum_{j in K_s} 2^(s_ij - m_s) v_j / l_s
    L_s = m_s + log2 l_s   (-inf for a split with no visible key, whose o_s is 0)
    combine:  L = log2 sum_s 2^L_s,   out_i = sum_s 2^(L_s - L) o_s,   lse_i = ln(2) L
which is the softmax over all keys: 2^(L_s - L) is split s's share of the row's probability mass.

Tiling: one program per (key split, b, key/value head, block of BLOCK_M query rows). Its rows are the H / H_kv
query heads of the GQA group times the N_q queries, stacked (row r = head g, query i with r = g N_q + i), so
that the group's heads share each k, v tile: with G N_q <= BLOCK_M (64 on a GPU, 16 for fp32 inputs) every key
and value of the cache is read exactly once. The program sweeps its split's BLOCK_N-key tiles with the online
softmax (running max, sum and output rescaled by 2^(m_old - m_new)), every tile masked (keys past N_k,
padding, the causal diagonal and the window's edges; this kernel is bound by memory, not arithmetic), and
writes o_s, L_s in fp32. A second kernel, one program per (query row, b, h), combines the splits. With one
split the first kernel writes out and lse itself (one launch). The splits share out the key tiles that some
row sees (from the first query's window edge to the last key), so a window's cost falls with the window here
too.

Number of splits (`decode_splits`): enough programs for two per SM (B H_kv row-blocks S >= 2 SMs: two programs
with their k, v pipeline stages in shared memory share an SM, or one starts as the other ends, so that every
SM keeps loads in flight to the end), but at most MAX_SPLITS and with at least max(MIN_SPLIT_KEYS, 16 G N_q)
keys per split, so that the fp32 partials (written once, read once by the combine: 8 bytes per row and value
dim) stay under 1/8 of the split's cache traffic. One split (no combine) when the batch and heads alone fill
the GPU.

Memory traffic per (b, h_kv): the cache it sees once, N_k (D + D_v) elements (2 bytes each in bf16, the
target: >= 70% of HBM bandwidth for reading it), q and out once per row, plus S G N_q (D_v + 1) fp32 partials
written and read by the combine. FLOPs: 4 G N_q N_k D, negligible: tl.dot pads the rows to BLOCK_M >= 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import dot, kept_keys, key_band, launch_autotuned, strides, tanh

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

MAX_SPLITS = 128
MIN_SPLIT_KEYS = 256
# Query rows (GQA heads x queries) per program on a GPU; more rows: more row blocks, which read k, v again.
# fp32 inputs (full-precision dots on the CUDA cores) spill registers beyond 16 rows.
MAX_BLOCK_M = 64
MAX_BLOCK_M_FP32 = 16
PROGRAMS_PER_SM = 2
# Under the interpreter (CPU tensors): small tiles and splits, so that short test caches cross several key
# tiles, splits and row blocks. Tests may swap these.
INTERPRETER = dict(BLOCK_M=16, BLOCK_N=16, SMS=4, MIN_SPLIT_KEYS=32)


def _configs(*shapes):
    """Autotuning candidates (BLOCK_N, num_warps, num_stages): BLOCK_M is fixed by the rows, not tuned."""
    return [triton.Config(dict(BLOCK_N=n), num_warps=w, num_stages=s) for n, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    """Drop key tiles far longer than the cache, tiles over 128 x 128 and tiles whose k, v pipeline stages
    would take more than SHARED_STAGES_BYTES of shared memory. At least one config stays."""
    args = {**named_args, **kwargs}
    width = max(args["BLOCK_D"], args["BLOCK_DV"])
    element = args["k_ptr"].element_size()

    def fits(config):
        block_n = config.kwargs["BLOCK_N"]
        stages = block_n * (args["BLOCK_D"] + args["BLOCK_DV"]) * element * config.num_stages
        return block_n <= max(32, args["tune_n_k"]) and block_n * width <= 128 * 128 and stages <= SHARED_STAGES_BYTES

    kept = [config for config in configs if fits(config)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.num_stages)]


# The k, v tiles of all pipeline stages of a program, at most: within the A100's 163 KB per SM. The first
# candidate at head dim 128 in bf16 takes 96 KB, so two of its programs share an H100's 227 KB.
SHARED_STAGES_BYTES = 128 * 1024
TUNE_KEY = ["tune_n_k", "BLOCK_M", "BLOCK_D", "BLOCK_DV", "BAND", "HAS_MASK", "SOFTCAP", "SPLIT"]
DECODE_CONFIGS = _configs((64, 4, 3), (128, 8, 2), (64, 4, 4), (32, 4, 4), (128, 4, 2))


@triton.autotune(DECODE_CONFIGS, TUNE_KEY, prune_configs_by=dict(early_config_prune=_prune))
@triton.jit
def _attention_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    out_ptr,
    lse_ptr,
    o_part_ptr,
    lse_part_ptr,
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
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    n_heads,
    group,
    n_q,
    n_k,
    d,
    d_v,
    sm_scale,
    softcap,
    left,
    right,
    key_first,
    num_splits,
    tune_n_k,
    BAND: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    split = tl.program_id(0)
    n_kv_heads = n_heads // group
    b, h_kv = tl.program_id(1) // n_kv_heads, tl.program_id(1) % n_kv_heads
    # Rows: query head h_kv * group + g, query i, for r = g n_q + i.
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < group * n_q
    g, i = r // n_q, r % n_q
    h = h_kv * group + g
    dims, dims_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)

    q_rows = q_ptr + b64 * stride_qb + h.to(tl.int64) * stride_qh + i.to(tl.int64) * stride_qn
    q = tl.load(q_rows[:, None] + dims[None, :] * stride_qd, mask=row_ok[:, None] & (dims[None, :] < d), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_head = k_ptr + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_head = v_ptr + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh
    if HAS_MASK:
        mask_ptr += b64 * stride_mask_b
    qk_scale = sm_scale * LOG2E

    # This split's share of the key tiles [key_first, n_k) (key_first a multiple of BLOCK_N).
    per_split = tl.cdiv(tl.cdiv(n_k - key_first, BLOCK_N), num_splits)
    start = key_first + split * per_split * BLOCK_N
    stop = tl.minimum(start + per_split * BLOCK_N, n_k)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kept = kept_keys(cols, mask_ptr, stride_mask_n, n_k, HAS_MASK)
        # Padded slots are not loaded (0): NaN or inf there meets no product (0 * NaN in p v would be NaN).
        k = tl.load(
            k_head + cols[:, None] * stride_kn + dims[None, :] * stride_kd,
            mask=kept[:, None] & (dims[None, :] < d),
            other=0.0,
        )
        v = tl.load(
            v_head + cols[:, None] * stride_vn + dims_v[None, :] * stride_vd,
            mask=kept[:, None] & (dims_v[None, :] < d_v),
            other=0.0,
        )
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        if SOFTCAP:  # qk_scale / (log2(e) softcap) = scale / softcap: tanh's argument in natural units
            s = tanh(dot(q, tl.trans(k)) * (qk_scale / (LOG2E * softcap))) * (softcap * LOG2E)
        else:
            s = dot(q, tl.trans(k)) * qk_scale
        # Query i sees the kept keys j of its band, i + n_k - n_q - left <= j <= i + n_k - n_q + right (BAND: the
        # causal diagonal is right = 0); rows past the group's are never stored.
        s = tl.where(key_band(kept[None, :], i, cols, n_q, n_k, left, right, False, BAND), s, float("-inf"))
        # Online softmax: when the row max grows, rescale what was summed so far by 2^(m_old - m_new).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: keep exp2 finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row with no visible key: o = 0, L = -inf
    o = acc / l_safe[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    row = (b * n_heads + h).to(tl.int64) * n_q + i  # the row's index in (B, H, N_q)
    store_mask = row_ok[:, None] & (dims_v[None, :] < d_v)
    if SPLIT:  # partials (B H, S, N_q, D_v) and (B H, S, N_q) fp32, contiguous
        part = ((b * n_heads + h).to(tl.int64) * num_splits + split) * n_q + i
        tl.store(o_part_ptr + part[:, None] * d_v + dims_v[None, :], o, mask=store_mask)
        tl.store(lse_part_ptr + part, lse2, mask=row_ok)
    else:
        out_rows = out_ptr + b64 * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_on
        tl.store(out_rows[:, None] + dims_v[None, :] * stride_od, o.to(out_ptr.dtype.element_ty), mask=store_mask)
        tl.store(lse_ptr + row, lse2 * LN2, mask=row_ok)


@triton.jit
def _attention_decode_combine_kernel(
    o_part_ptr,
    lse_part_ptr,
    out_ptr,
    lse_ptr,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    n_heads,
    n_q,
    d_v,
    num_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out_i = sum_s 2^(L_s - L) o_s, lse_i = ln(2) L, L = log2 sum_s 2^L_s, for one (query row i, b, h)."""
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    part = (bh * num_splits + splits) * n_q + i  # split s's row, in (B H, S, N_q)
    lse2 = tl.load(lse_part_ptr + part, mask=splits < num_splits, other=float("-inf"))
    m = tl.max(lse2, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: weights 0, out 0, lse -inf
    weight = tl.exp2(lse2 - m_safe)
    total = tl.sum(weight, axis=0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    weight = weight / total_safe
    out_row = out_ptr + (bh // n_heads) * stride_ob + (bh % n_heads) * stride_oh + i * stride_on
    for start in range(0, d_v, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = (splits[:, None] < num_splits) & (cols[None, :] < d_v)
        o = tl.load(o_part_ptr + part[:, None] * d_v + cols[None, :], mask=mask, other=0.0)
        tl.store(
            out_row + cols * stride_od,
            tl.sum(o * weight[:, None], axis=0).to(out_ptr.dtype.element_ty),
            mask=cols < d_v,
        )
    lse = tl.where(total == 0.0, float("-inf"), (m_safe + tl.log2(total_safe)) * LN2)
    tl.store(lse_ptr + bh * n_q + i, lse)


# ---------------------------------------------------------------------------------------------------
# Launcher.


def decode_band(n_q: int, n_k: int, causal: bool, window: tuple[int, int]) -> tuple[bool, int, int, int]:
    """(BAND, left, right, first) for the kernel: row i sees keys [i + n_k - n_q - left, i + n_k - n_q + right]
    (causal: right = 0; an unbounded side is bounded by the sequences, which hides no key); BAND is False when
    that hides no key of any row. Keys [first, n_k) hold every key some row sees: first is the first query's
    left edge (the last query's diagonal is n_k - 1, its right edge at or past the last key)."""
    left, right = window
    if causal:
        right = 0
    left = n_k if left < 0 else min(left, n_k)
    right = n_q if right < 0 else min(right, n_q)
    band = left < n_k - 1 or right < n_q - 1
    return band, left, right, max(n_k - n_q - left, 0)


def decode_splits(n_keys: int, programs: int, sm_count: int, rows: int, min_split_keys: int = MIN_SPLIT_KEYS) -> int:
    """Key splits for `programs` = B x H_kv x row-blocks programs over n_keys visible keys with `rows` query rows
    per (b, h_kv) (G N_q): enough for PROGRAMS_PER_SM programs per SM, at most MAX_SPLITS, each split holding at
    least max(min_split_keys, 16 rows) keys; at least 1."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, programs)
    longest = n_keys // max(min_split_keys, 16 * rows)
    return max(1, min(MAX_SPLITS, wanted, longest))


def attention_decode_forward(
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
    num_splits: int | None = None,
) -> None:
    """Write out (B, H, N_q, D_v), any strides, and lse (B, H, N_q) float32 contiguous, as `attention_forward`.
    num_splits: the key splits (None: `decode_splits` for this device; more splits than key tiles leave some
    empty, which is allowed)."""
    batch, heads, n_q, d = q.shape
    heads_kv, n_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    group = heads // heads_kv
    interpreted = q.device.type == "cpu"  # CPU tensors run only under the interpreter
    band, left, right, first = decode_band(n_q, n_k, causal, window)
    rows = group * n_q
    if interpreted:
        max_rows = INTERPRETER["BLOCK_M"]
    else:
        max_rows = MAX_BLOCK_M_FP32 if q.dtype == torch.float32 else MAX_BLOCK_M
    block_m = max(16, min(triton.next_power_of_2(rows), max_rows))
    row_blocks = triton.cdiv(rows, block_m)
    if num_splits is None:
        if interpreted:
            sm_count, min_keys = INTERPRETER["SMS"], INTERPRETER["MIN_SPLIT_KEYS"]
        else:
            sm_count, min_keys = torch.cuda.get_device_properties(q.device).multi_processor_count, MIN_SPLIT_KEYS
        num_splits = decode_splits(n_k - first, batch * heads_kv * row_blocks, sm_count, rows, min_keys)
    split = num_splits > 1
    if split:
        o_part = torch.empty((batch * heads, num_splits, n_q, d_v), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((batch * heads, num_splits, n_q), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = lse  # unused
    block_n = INTERPRETER["BLOCK_N"] if interpreted else None
    block_d, block_dv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(d_v))

    def grid(blocks):
        return (num_splits, batch * heads_kv, row_blocks)

    # key_first aligned down to the tile: it depends on BLOCK_N, which the autotuner picks; aligning to the
    # largest candidate (128) aligns it to every smaller power of two too.
    aligned_first = first // 128 * 128 if block_n is None else first // block_n * block_n
    launch_autotuned(
        _attention_decode_kernel,
        grid,
        None if block_n is None else dict(BLOCK_N=block_n),
        q,
        k,
        v,
        key_padding_mask,
        out,
        lse,
        o_part,
        lse_part,
        *strides(q, k, v, key_padding_mask, out),
        heads,
        group,
        n_q,
        n_k,
        d,
        d_v,
        softmax_scale,
        softcap,
        left,
        right,
        aligned_first,
        num_splits,
        triton.next_power_of_2(n_k),
        BAND=band,
        HAS_MASK=key_padding_mask is not None,
        SOFTCAP=softcap != 0.0,
        SPLIT=split,
        UPCAST=interpreted,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
    )
    if split:
        block_s = max(2, triton.next_power_of_2(num_splits))
        _attention_decode_combine_kernel[(n_q, batch * heads)](
            o_part,
            lse_part,
            out,
            lse,
            *strides(out),
            heads,
            n_q,
            d_v,
            num_splits,
            BLOCK_S=block_s,
            BLOCK_C=max(16, min(block_dv, 4096 // block_s)),
        )
