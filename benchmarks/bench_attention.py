"""Benchmarks of `tsa_fast.attention` against PyTorch's scaled_dot_product_attention and the reference, forward
and forward + backward.

    pytest benchmarks/bench_attention.py --benchmark-json=results.json
    python -m benchmarks.report results.json

Compared on B x H x N x D problems (GPU: 16 heads, B * N = 16k tokens; causal and not; D = 64 and 128):
  triton          tsa_fast.attention on the Triton kernels (GPU only: on the CPU they run under the
                  interpreter, which is no speed measurement)
  torch           tsa_fast.attention on its torch backend (CPU): PyTorch's fused CPU flash attention where
                  its semantics are the op's (here: not causal, or causal with N_q = N_k), in O(N) memory
  torch_chunked   the same backend on its chunked path (chunks of query rows, PyTorch ops), which serves
                  what PyTorch's kernel does not (bottom-right causal with N_q != N_k, D != D_v, a
                  differentiated lse), forced here on the same problems
  sdpa_<backend>  F.scaled_dot_product_attention held to one of its backends (flash, efficient, cudnn, math)
                  with `sdpa_kernel`, each that runs the problem on this device (a backend that cannot is
                  skipped); `sdpa`: PyTorch's own choice (CPU)
  reference       the reference: materializes the B x H x N x N scores (N <= 4096)
The reference is not measured under torch.compile here: the peers users pick for attention are the SDPA
backends, and one compile per shape, mask and mode would not fit gpu.sh's time budget.
GPU: bf16, N = 1024, 4096, 16384. Targets (H200, D = 128, N >= 4096): forward >= 1.1x and backward
(fwd+bwd time less fwd time) >= 0.9x the speed of sdpa_flash, forward >= 55% of the 989 TFLOP/s dense bf16
peak; the backward recomputes q k^T once more than FlashAttention-2 to stay deterministic.
CPU: fp32, B = 1, H = 8, N = 512 .. 8192, D = 64: the torch backend's two paths, the SDPA backends and the
reference (target: no N x N allocation, and at least SDPA's speed where both apply). Peak
extra memory on the CPU is measured in a fresh process (`python -m benchmarks.bench_attention ...`).
Sliding window (`test_attention_window`): causal with window (4095, 0), i.e. 4096 keys per row, against full
causal at the same N (GPU: bf16, B = 1, N = 32k, D = 128; triton, and SDPA's efficient backend given the band as
a bool mask). The kernels skip the key tiles outside the band, so the window's time should be about
(N W - W^2 / 2) / (N^2 / 2) of causal's, 23% at N = 32k, W = 4096: the same TFLOP/s counting visible pairs.
The CPU runs SDPA with the band mask and the reference (which masks, skipping nothing).
Packed sequences (`test_attention_varlen`): causal `attention_varlen` over sequences of unequal lengths packed
in one row (GPU: bf16, D = 128, 16k tokens in 9 sequences of 256 .. 4096; CPU: fp32, D = 64, 2k tokens) against
the same sequences padded to the longest in a batch with a key padding mask (`attention` and SDPA's efficient
backend given the mask): the padded batch computes tiles of padding, the packed one none, so at the same
TFLOP/s (counting each sequence's visible pairs, sum of N (N + 1) / 2) the packed one should take the padded
one's time times the share of real tiles.

Decode (`test_attention_decode`): N_q = 1 new token per sequence (and 16, as speculative decoding verifies)
against a KV cache of N_k keys, 32 query heads on 8 key/value heads (Llama 3 8B's GQA), no gradient: triton
(the op's decode path, split over the keys), triton_full (the full forward kernel on the same call) and the SDPA
backends with enable_gqa (GPU: bf16, B = 4, N_k = 8k, 32k, 128k, D = 128; CPU: the torch backend and SDPA).
Target (H200): the decode path reads the cache at >= 70% of HBM bandwidth (roofline_fraction: the bytes of k,
v, q and out over the measured copy bandwidth).
Roofline: FLOPs over the measured matrix-product rate, counting 4 B H N^2 D for the forward and 2.5 times
that for the backward (FlashAttention's convention), halved when causal. Peak extra memory: the CUDA
allocator's peak; on the CPU the RSS growth of one step in a fresh process.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tsa_fast
from benchmarks.common import (
    DEVICE,
    SMOKE,
    cpu_peak_extra_bytes_of,
    describe,
    measure,
    record_peak_memory,
    record_roofline,
    synchronize,
)
from tsa_fast.reference.attention import attention as reference_attention
from tsa_fast.reference.attention import window_band

if SMOKE:
    PROBLEMS, HEADS, DTYPE = [(1, 64, 32), (1, 128, 32)], 2, torch.float32
elif DEVICE.type == "cuda":
    PROBLEMS, HEADS, DTYPE = [(16384 // n, n, d) for d in (64, 128) for n in (1024, 4096, 16384)], 16, torch.bfloat16
else:
    PROBLEMS, HEADS, DTYPE = [(1, n, 64) for n in (512, 1024, 2048, 4096, 8192)], 8, torch.float32
SDPA_BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
CPU_IMPLS = ["torch", "torch_chunked", "sdpa", "sdpa_flash", "sdpa_math"]
IMPLS = (["triton", *SDPA_BACKENDS] if DEVICE.type == "cuda" else CPU_IMPLS) + ["reference"]
MAX_MATERIALIZED_N = 4096  # the reference and sdpa_math hold B x H x N x N scores
MODULE = "benchmarks.bench_attention"
attention_op = importlib.import_module("tsa_fast.ops.attention")  # the module (tsa_fast.ops.attention: the op)


@contextlib.contextmanager
def chunked_path():
    """The torch backend with PyTorch's flash attention ruled out: its chunked path runs everything."""
    applies = attention_op.pytorch_flash_applies
    attention_op.pytorch_flash_applies = lambda *args: False
    try:
        yield
    finally:
        attention_op.pytorch_flash_applies = applies


def attention_fn(impl: str, causal: bool):
    """A callable (q, k, v) -> out for one implementation."""
    if impl == "reference":
        return lambda q, k, v: reference_attention(q, k, v, causal=causal)
    if impl in ("triton", "torch", "torch_chunked"):
        return lambda q, k, v: tsa_fast.attention(q, k, v, causal=causal)

    def sdpa(q, k, v):  # sdpa_kernel's context manager is single-use: a new one per call
        with contextlib.nullcontext() if impl == "sdpa" else sdpa_kernel([SDPA_BACKENDS[impl]]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return sdpa


def step(fn, q, k, v, grad_out, path=contextlib.nullcontext):
    """One forward, or forward + backward when the inputs require grad (as zero_grad() leaves .grad), inside
    the `path` context (chunked_path for torch_chunked)."""
    with path():
        if grad_out is None:
            with torch.no_grad():
                fn(q, k, v)
        else:
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(grad_out)
    synchronize()


def make_inputs(batch: int, n: int, d: int, mode: str):
    """q, k, v (B, HEADS, N, D) and the output gradient (None for the forward)."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, n, d, device=DEVICE, generator=generator, dtype=DTYPE) for _ in range(3))
    if mode == "fwd":
        return q, k, v, None
    return *(x.requires_grad_() for x in (q, k, v)), torch.randn_like(q)


def path_of(impl: str):
    return chunked_path if impl == "torch_chunked" else contextlib.nullcontext


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=[f"B{b}-N{n}-D{d}" for b, n, d in PROBLEMS])
@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark, impl, problem, causal, mode):
    batch, n, d = problem
    if impl in ("reference", "sdpa_math") and n > MAX_MATERIALIZED_N:
        pytest.skip(f"{impl} materializes the N x N scores: N <= {MAX_MATERIALIZED_N}")
    q, k, v, grad_out = make_inputs(batch, n, d, mode)
    fn, path = attention_fn(impl, causal), path_of(impl)
    try:
        step(fn, q, k, v, grad_out, path)  # warm-up: autotuning, compilation, first touch of memory
    except RuntimeError as error:  # an SDPA backend that cannot run this problem on this device
        pytest.skip(f"{impl}: {error}".splitlines()[0])
    describe(
        benchmark,
        op="attention",
        mode=mode,
        impl=impl,
        dtype=DTYPE,
        size={"B": batch, "N": n},
        x="N",
        H=HEADS,
        D=d,
        mask="causal" if causal else "full",
    )
    measure(benchmark, step, fn, q, k, v, grad_out, path)
    flops = 4 * batch * HEADS * n * n * d * (3.5 if mode == "fwd+bwd" else 1) / (2 if causal else 1)
    record_roofline(benchmark, DTYPE, flops=flops)
    args = (impl, str(causal), mode, str(batch), str(n), str(d))
    record_peak_memory(benchmark, lambda: step(fn, q, k, v, grad_out, path), MODULE, *args)


def measure_cpu_peak(impl: str, causal: str, mode: str, batch: str, n: str, d: str) -> int:
    """Peak RSS growth of one step in this (fresh) process, beyond the inputs and .grad."""
    q, k, v, grad_out = make_inputs(int(batch), int(n), int(d), mode)
    fn, path = attention_fn(impl, causal == "True"), path_of(impl)
    step(fn, q, k, v, grad_out, path)  # warm-up, and the .grad buffers
    return cpu_peak_extra_bytes_of(lambda: step(fn, q, k, v, grad_out, path))


# (B, N, D, W): window (W - 1, 0) with causal, W keys per row.
if SMOKE:
    WINDOW_PROBLEMS = [(1, 128, 32, 32)]
elif DEVICE.type == "cuda":
    WINDOW_PROBLEMS = [(1, 32768, 128, 4096)]
else:
    WINDOW_PROBLEMS = [(1, 2048, 64, 256)]
WINDOW_IMPLS = ["triton", "sdpa_efficient"] if DEVICE.type == "cuda" else ["sdpa", "reference"]


def window_fn(impl: str, n: int, window: tuple[int, int] | None):
    """A callable (q, k, v) -> out: causal attention, within `window` when given."""
    if impl == "reference":
        return lambda q, k, v: reference_attention(q, k, v, causal=True, window=window)
    if impl == "triton":
        return lambda q, k, v: tsa_fast.attention(q, k, v, causal=True, window=window)
    band = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()
    if window is not None:
        band &= window_band(n, n, window, DEVICE)

    def sdpa(q, k, v):  # the band as a bool mask: SDPA has no sliding window
        with contextlib.nullcontext() if impl == "sdpa" else sdpa_kernel([SDPA_BACKENDS[impl]]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=band)

    return sdpa


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("banded", [True, False], ids=["window", "causal"])
@pytest.mark.parametrize("problem", WINDOW_PROBLEMS, ids=[f"B{b}-N{n}-D{d}-W{w}" for b, n, d, w in WINDOW_PROBLEMS])
@pytest.mark.parametrize("impl", WINDOW_IMPLS)
def test_attention_window(benchmark, impl, problem, banded, mode):
    batch, n, d, width = problem
    if impl == "reference" and n > MAX_MATERIALIZED_N:
        pytest.skip(f"{impl} materializes the N x N scores: N <= {MAX_MATERIALIZED_N}")
    generator = torch.Generator(DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, n, d, device=DEVICE, generator=generator, dtype=DTYPE) for _ in range(3))
    grad_out = None
    if mode == "fwd+bwd":
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        grad_out = torch.randn_like(q)
    fn = window_fn(impl, n, (width - 1, 0) if banded else None)
    try:
        step(fn, q, k, v, grad_out)  # warm-up: autotuning, compilation, first touch of memory
    except RuntimeError as error:  # an SDPA backend that cannot run this problem on this device
        pytest.skip(f"{impl}: {error}".splitlines()[0])
    describe(
        benchmark,
        op="attention_window",
        mode=mode,
        impl=impl,
        dtype=DTYPE,
        size={"B": batch, "N": n},
        x="N",
        H=HEADS,
        D=d,
        mask=f"window{width}" if banded else "causal",
    )
    measure(benchmark, step, fn, q, k, v, grad_out)
    pairs = n * width - width * (width - 1) / 2 if banded else n * (n + 1) / 2  # visible (query, key) pairs
    flops = 4 * batch * HEADS * pairs * d * (3.5 if mode == "fwd+bwd" else 1)
    record_roofline(benchmark, DTYPE, flops=flops)
    record_peak_memory(benchmark, lambda: step(fn, q, k, v, grad_out))


# Sequence lengths of a packed batch (unequal, none a multiple of a tile).
if SMOKE:
    VARLEN_LENGTHS, VARLEN_D = [3, 40, 17], 32
elif DEVICE.type == "cuda":
    VARLEN_LENGTHS, VARLEN_D = [4096, 300, 2048, 1000, 3500, 256, 1800, 2900, 484], 128  # 16384 tokens
else:
    VARLEN_LENGTHS, VARLEN_D = [700, 100, 1000, 48, 300], 64  # 2148 tokens
VARLEN_IMPLS = (
    ["triton", "triton_padded", "sdpa_efficient_padded"]
    if DEVICE.type == "cuda"
    else ["torch", "torch_padded", "sdpa_padded"]
)


def varlen_inputs(lengths: list[int], d: int, mode: str, padded: bool):
    """q, k, v and the output gradient (None for the forward): packed (total, HEADS, D) with the varlen
    arguments (cu_seqlens, cu_seqlens, max, max), or padded to the longest (S, HEADS, max, D) with the
    (S, max) key padding mask."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    longest = max(lengths)
    shape = (len(lengths), HEADS, longest, d) if padded else (sum(lengths), HEADS, d)
    q, k, v = (torch.randn(*shape, device=DEVICE, generator=generator, dtype=DTYPE) for _ in range(3))
    if padded:
        extra = torch.arange(longest, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    else:
        offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        extra = (offsets, offsets, longest, longest)
    grad_out = None
    if mode == "fwd+bwd":
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        grad_out = torch.randn_like(q)
    return q, k, v, grad_out, extra


def varlen_fn(impl: str, extra):
    """A callable (q, k, v) -> out: causal attention of packed sequences, or of the padded batch."""
    if impl in ("triton", "torch"):
        return lambda q, k, v: tsa_fast.attention_varlen(q, k, v, *extra, causal=True)
    if impl.endswith("_padded") and impl.startswith(("triton", "torch")):
        return lambda q, k, v: tsa_fast.attention(q, k, v, causal=True, key_padding_mask=extra)
    n = extra.shape[1]
    visible = extra[:, None, None, :] & torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()
    backend = impl.removesuffix("_padded")

    def sdpa(q, k, v):  # causal and the padding as one bool mask (every row sees key 0, which is real)
        with contextlib.nullcontext() if backend == "sdpa" else sdpa_kernel([SDPA_BACKENDS[backend]]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)

    return sdpa


# (B, N_q, N_k, D) of decode: one or 16 query rows per sequence against a cache of N_k keys.
DECODE_HEADS, DECODE_KV_HEADS = 32, 8
if SMOKE:
    DECODE_PROBLEMS = [(1, 1, 256, 32)]
elif DEVICE.type == "cuda":
    DECODE_PROBLEMS = [(4, 1, n, 128) for n in (8192, 32768, 131072)] + [(4, 16, 32768, 128)]
else:
    DECODE_PROBLEMS = [(1, 1, n, 64) for n in (8192, 32768)]
DECODE_IMPLS = ["triton", "triton_full", "sdpa_flash", "sdpa_efficient"] if DEVICE.type == "cuda" else ["torch", "sdpa"]


@contextlib.contextmanager
def full_kernel_path():
    """The op with its decode path ruled out: the full forward kernel runs every call."""
    limit = attention_op.DECODE_MAX_QUERIES
    attention_op.DECODE_MAX_QUERIES = 0
    try:
        yield
    finally:
        attention_op.DECODE_MAX_QUERIES = limit


def decode_fn(impl: str):
    """A callable (q, k, v) -> out: causal attention of the last N_q positions against the whole cache."""
    if impl in ("triton", "triton_full", "torch"):
        return lambda q, k, v: tsa_fast.attention(q, k, v, causal=True)

    def sdpa(q, k, v):  # one query (N_q = 1) sees every key; more: their band, bottom-right, as a bool mask
        n_q, n_k = q.shape[2], k.shape[2]
        mask = None if n_q == 1 else torch.ones(n_q, n_k, dtype=torch.bool, device=DEVICE).tril(n_k - n_q)
        with contextlib.nullcontext() if impl == "sdpa" else sdpa_kernel([SDPA_BACKENDS[impl]]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return sdpa


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", VARLEN_IMPLS)
def test_attention_varlen(benchmark, impl, mode):
    q, k, v, grad_out, extra = varlen_inputs(VARLEN_LENGTHS, VARLEN_D, mode, padded=impl.endswith("_padded"))
    fn = varlen_fn(impl, extra)
    try:
        step(fn, q, k, v, grad_out)  # warm-up: autotuning, compilation, first touch of memory
    except RuntimeError as error:  # an SDPA backend that cannot run this problem on this device
        pytest.skip(f"{impl}: {error}".splitlines()[0])
    tokens = sum(VARLEN_LENGTHS)
    describe(
        benchmark,
        op="attention_varlen",
        mode=mode,
        impl=impl,
        dtype=DTYPE,
        size={"tokens": tokens},
        x="tokens",
        H=HEADS,
        D=VARLEN_D,
        sequences=len(VARLEN_LENGTHS),
        longest=max(VARLEN_LENGTHS),
    )
    measure(benchmark, step, fn, q, k, v, grad_out)
    pairs = sum(n * (n + 1) / 2 for n in VARLEN_LENGTHS)  # each sequence's visible (query, key) pairs, causal
    record_roofline(benchmark, DTYPE, flops=4 * HEADS * pairs * VARLEN_D * (3.5 if mode == "fwd+bwd" else 1))
    record_peak_memory(benchmark, lambda: step(fn, q, k, v, grad_out))


@pytest.mark.parametrize("problem", DECODE_PROBLEMS, ids=[f"B{b}-Nq{q}-Nk{n}-D{d}" for b, q, n, d in DECODE_PROBLEMS])
@pytest.mark.parametrize("impl", DECODE_IMPLS)
def test_attention_decode(benchmark, impl, problem):
    batch, n_q, n_k, d = problem
    generator = torch.Generator(DEVICE).manual_seed(0)
    q = torch.randn(batch, DECODE_HEADS, n_q, d, device=DEVICE, generator=generator, dtype=DTYPE)
    k, v = (torch.randn(batch, DECODE_KV_HEADS, n_k, d, device=DEVICE, generator=generator, dtype=DTYPE) for _ in "kv")
    fn, path = decode_fn(impl), full_kernel_path if impl == "triton_full" else contextlib.nullcontext
    try:
        step(fn, q, k, v, None, path)  # warm-up: autotuning, compilation, first touch of memory
    except RuntimeError as error:  # an SDPA backend that cannot run this problem on this device
        pytest.skip(f"{impl}: {error}".splitlines()[0])
    describe(
        benchmark,
        op="attention_decode",
        mode="fwd",
        impl=impl,
        dtype=DTYPE,
        size={"B": batch, "N_k": n_k},
        x="N_k",
        H=DECODE_HEADS,
        H_kv=DECODE_KV_HEADS,
        N_q=n_q,
        D=d,
    )
    measure(benchmark, step, fn, q, k, v, None, path)
    bytes_moved = (k.numel() + v.numel() + 2 * q.numel()) * q.element_size()  # the cache, q and out once
    record_roofline(benchmark, DTYPE, bytes_moved=bytes_moved, flops=4 * batch * DECODE_HEADS * n_q * n_k * d)
    record_peak_memory(benchmark, lambda: step(fn, q, k, v, None, path))


if __name__ == "__main__":
    print(measure_cpu_peak(*sys.argv[1:]))
