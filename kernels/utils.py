"""Triton helpers that several kernels share: addressing a (b, h) slice, masked tile loads, which keys a
query sees (range, padding, causal diagonal, window), dots accumulated in fp32, an accurate tanh, the online
log-sum-exp; on the host, the strides a launch passes and the launcher that runs an autotuned kernel at a fixed
tile under the interpreter.

The `@triton.jit` helpers are inlined into the kernels that call them: sharing them costs nothing at run time.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def head(ptr, b, h, stride_b, stride_h):
    """The (b, h) slice of a (B, H, ...) tensor, with 64-bit offsets."""
    return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def load_tile(ptr, rows, cols, stride_row, stride_col, n_rows, n_cols, UPCAST: tl.constexpr):
    """The tile ptr[rows, cols], zero outside n_rows x n_cols (the padding of the head dim); fp32 if UPCAST."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def kept_keys(cols, mask_ptr, stride_mask_n, n_k, HAS_MASK: tl.constexpr):
    """(cols,) bool: key j is in range (j < n_k) and kept by the key padding mask (HAS_MASK; True = keep)."""
    keys = cols < n_k
    if HAS_MASK:
        keys &= tl.load(mask_ptr + cols * stride_mask_n, mask=keys, other=0) != 0
    return keys


@triton.jit
def key_band(visible, rows, cols, n_q, n_k, left, right, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """visible (rows, cols) and'ed with where query i may see key j by position. Aligned bottom-right (the last
    query sees the last key), row i's diagonal is key i + n_k - n_q: CAUSAL keeps j <= diagonal, WINDOW keeps
    diagonal - left <= j <= diagonal + right."""
    diagonal = rows[:, None] + (n_k - n_q)
    if CAUSAL:
        visible &= cols[None, :] <= diagonal
    if WINDOW:
        visible &= (cols[None, :] >= diagonal - left) & (cols[None, :] <= diagonal + right)
    return visible


@triton.jit
def visible_keys(
    rows, cols, rows_counted, mask_ptr, stride_mask_n, n_q, n_k, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr
):
    """(rows, cols) bool: key j is visible to query i (a row that counts; j in range, kept, causal)."""
    visible = rows_counted[:, None] & kept_keys(cols, mask_ptr, stride_mask_n, n_k, HAS_MASK)[None, :]
    return key_band(visible, rows, cols, n_q, n_k, 0, 0, CAUSAL, False)


@triton.jit
def dot(a, b):
    """a @ b accumulated in fp32. fp32 tiles multiply in full precision (no TF32), as torch.matmul does by
    default; fp16/bf16 tiles on the tensor cores."""
    if a.dtype == tl.float32:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def scores(q, k, scale, visible):
    """scale * q k^T where visible, -inf elsewhere (out of the softmax)."""
    return tl.where(visible, dot(q, tl.trans(k)) * scale, float("-inf"))


@triton.jit
def tanh(x):
    """tanh(x) in fp32 to a few ulps for any x. From e = exp(-2|x|), (1 - e) / (1 + e) cannot overflow but
    loses digits as |x| -> 0 (1 - e cancels); below |x| = 0.25 the odd Taylor series to x^9 is used instead
    (truncation < 1e-8 relative there)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    x2 = x * x
    series = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def online_logsumexp(m, d, x):
    """Fold a tile x (rows, cols) into the running max m and sum d = sum exp(x - m) of each row."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row all -inf so far: keep exp() finite
    d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, d


def strides(*tensors) -> tuple[int, ...]:
    """The strides of each tensor in turn, flat, as the kernels take them (stride_xb, stride_xh, ... of x, then
    of the next); None stands for an absent (B, N_k) key padding mask, (0, 0)."""
    return tuple(stride for x in tensors for stride in ((0, 0) if x is None else x.stride()))


def launch_autotuned(kernel, grid, fixed_blocks: dict | None, *args, **meta) -> None:
    """Launch an autotuned kernel with the tile `fixed_blocks` (under the interpreter, where timing candidates
    would measure nothing), or with None through its autotuner. `grid` maps a tile's blocks to the grid."""
    if fixed_blocks is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid(fixed_blocks)](*args, **meta, **fixed_blocks)
