"""The weight gradient of a low-precision LM head, accumulated chunk by chunk at near-fp32 precision in
the memory of two low-precision copies.

Contract: `weight_grad_accumulate(high, low, grad_logits (K, V) fp32/fp16/bf16, hidden (K, H))` adds
grad_logits^T @ hidden to the pair (high, low): (V, H) contiguous, both in the weight's dtype (fp16/bf16),
which together hold the running sum as high + low.

Math: a chunk's update U = grad_logits^T @ hidden is accumulated in fp32 registers; the epilogue adds it
to the pair and splits the fp32 total S again:
    S = high + low + U,   high' = round(S),   low' = round(S - high')
high' is S rounded once (it becomes the weight gradient), low' keeps what that rounding dropped, so the
pair carries ~2x the dtype's significant bits (bf16: 16, fp16: 22) across chunks: summing many chunks
never rounds the running sum to bf16, as accumulating into a bf16 gradient would. An fp32 accumulator
would cost 4 bytes per weight plus the final cast; the pair costs 2 beyond the gradient itself.

Tiling: one program owns a BLOCK_V x BLOCK_H tile of the weight gradient and sweeps the chunk's K rows in
BLOCK_K steps (grad_logits tiles read transposed, fp32 gradients rounded to hidden's dtype for the tensor
cores; fp32 inputs multiply in full precision). Memory traffic per chunk: the pair read and written
once (4 x 2 bytes per weight), the K x V gradient read H / BLOCK_H times and the K x H hidden states
V / BLOCK_V times (mostly from L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import dot, launch_autotuned

# Candidates (BLOCK_V, BLOCK_H, BLOCK_K, num_warps, num_stages); autotuned per (V, H, dtype): the chunk
# length K changes only the loop count. The kernel adds to the pair in place, so the autotuner, which times
# each candidate by launching it again and again on the real arguments, restores the pair after each
# (a copy of it held during the first launch of each key only). Under the interpreter (CPU tensors) one
# small fixed tile, so that test shapes cross several tiles and partial tiles; tests may swap it, or set it
# to None to run the autotuner there too.
CONFIGS = [
    triton.Config(dict(BLOCK_V=v, BLOCK_H=h, BLOCK_K=k), num_warps=w, num_stages=s)
    for v, h, k, w, s in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4))
]
INTERPRETER_BLOCKS = dict(BLOCK_V=32, BLOCK_H=16, BLOCK_K=16)


@triton.autotune(CONFIGS, key=["vocab", "hidden_size"], restore_value=["high_ptr", "low_ptr"])
@triton.jit
def _weight_grad_accumulate_kernel(
    grad_ptr,
    hidden_ptr,
    high_ptr,
    low_ptr,
    n_rows,
    vocab,
    hidden_size,
    stride_gk,
    stride_gv,
    stride_hk,
    stride_hh,
    stride_wv,
    stride_wh,
    UPCAST: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_v, in_h = rows_v < vocab, cols_h < hidden_size

    # U = grad^T @ hidden over the chunk's rows, in fp32.
    update = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        in_k = ks < n_rows
        grad_t = tl.load(
            grad_ptr + ks[None, :] * stride_gk + rows_v[:, None] * stride_gv,
            mask=in_k[None, :] & in_v[:, None],
            other=0.0,
        )
        hidden = tl.load(
            hidden_ptr + ks[:, None] * stride_hk + cols_h[None, :] * stride_hh,
            mask=in_k[:, None] & in_h[None, :],
            other=0.0,
        )
        if UPCAST:  # the interpreter has no bf16 arithmetic
            grad_t, hidden = grad_t.to(tl.float32), hidden.to(tl.float32)
        else:
            grad_t = grad_t.to(hidden.dtype)
        update += dot(grad_t, hidden)

    # Epilogue: fold U into the pair, S split into its rounding (high) and the rest (low).
    offsets = rows_v.to(tl.int64)[:, None] * stride_wv + cols_h[None, :] * stride_wh  # V x H may pass 2^31
    mask = in_v[:, None] & in_h[None, :]
    total = tl.load(high_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    total += tl.load(low_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + update
    high = total.to(high_ptr.dtype.element_ty)
    tl.store(high_ptr + offsets, high, mask=mask)
    tl.store(low_ptr + offsets, (total - high.to(tl.float32)).to(low_ptr.dtype.element_ty), mask=mask)


def weight_grad_accumulate(
    high: torch.Tensor, low: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor
) -> None:
    """(high + low) += grad_logits^T @ hidden, in place; high and low (V, H) contiguous fp16/bf16 of one
    dtype, grad_logits (K, V) and hidden (K, H) any strides."""
    vocab, hidden_size = high.shape
    args = (
        grad_logits,
        hidden,
        high,
        low,
        hidden.shape[0],
        vocab,
        hidden_size,
        *grad_logits.stride(),
        *hidden.stride(),
        *high.stride(),
    )
    grid = lambda blocks: (triton.cdiv(vocab, blocks["BLOCK_V"]), triton.cdiv(hidden_size, blocks["BLOCK_H"]))  # noqa: E731
    interpreted = hidden.device.type == "cpu"  # the interpreter has no bf16 arithmetic: upcast there
    launch_autotuned(
        _weight_grad_accumulate_kernel, grid, INTERPRETER_BLOCKS if interpreted else None, *args, UPCAST=interpreted
    )
