"""Benchmarks of `attention_transfer_loss`: forward, and forward + backward, against the reference that
materializes the maps.

    pytest benchmarks/bench_attention_transfer_loss.py --benchmark-json=results.json
    python -m benchmarks.report results.json

Compared on student and teacher both B x 12 heads x N x 64, no mask:
  triton              GPU: tsa_fast.attention_transfer_loss on the Triton kernels
  cpp                 CPU: the same op on the C++ kernels of tsa_fast._C (OpenMP)
  reference           the reference: the B x H x N x N score and attention maps of both models
  reference_compiled  the same under torch.compile (forward + backward only)
  attention_forward   GPU only, the yardstick: one fused attention forward (SDPA) of each model, no loss
GPU: bf16, (B, N) = (8, 2048) and (2, 8192) (target: triton time <= 2x attention_forward).
CPU: fp32, B=8, N = 512, 1024, 2048 (target at N=2048: cpp peak memory <= 1/10 of the reference's; the
report's "memory vs reference" column). The Triton kernels under the interpreter were measured once at that size:
results/2026-11-29-cpu-2core/attention_transfer_peak_memory.md (99.5 MB vs 8452 MB, 1/85).
Roofline: FLOPs over the measured matrix-product rate, counting each kernel's own products: forward the two
score products, 2 N^2 (D_s + D_t) per (b, h); backward on Triton the dq and the dk kernel each recompute
both and add 2 N^2 D_s (16 B H N^2 D in forward + backward with D_s = D_t = D), in C++ one pass recomputes
both and adds dq and dk (12 B H N^2 D). The references count as the Triton kernels.
Peak extra memory is measured, never assumed: on a GPU by the allocator, on the CPU as the peak RSS growth
of a fresh process (`python -m benchmarks.bench_attention_transfer_loss IMPL MODE B H N`).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import tsa_fast
from benchmarks.common import (
    DEVICE,
    SMOKE,
    compiled,
    cpu_peak_extra_bytes_of,
    describe,
    measure,
    record_peak_memory,
    record_roofline,
    synchronize,
)
from tsa_fast.reference.attention_transfer_loss import (
    attention_transfer_loss as reference_loss,
)

MODULE = "benchmarks.bench_attention_transfer_loss"
if SMOKE:
    SIZES, HEADS, HEAD_DIM, DTYPE = [(2, 64), (2, 128)], 2, 32, torch.float32
elif DEVICE.type == "cuda":
    SIZES, HEADS, HEAD_DIM, DTYPE = [(8, 2048), (2, 8192)], 12, 64, torch.bfloat16
else:
    SIZES, HEADS, HEAD_DIM, DTYPE = [(8, 512), (8, 1024), (8, 2048)], 12, 64, torch.float32
IMPLS = (["triton", "attention_forward"] if DEVICE.type == "cuda" else ["cpp"]) + ["reference", "reference_compiled"]
MODES = ["fwd", "fwd+bwd"]


def attention_forward(q_s, k_s, q_t, k_t):
    """The GPU yardstick: one fused attention forward of each model (values shaped as the keys)."""
    with torch.no_grad():
        F.scaled_dot_product_attention(q_s, k_s, k_s)
        F.scaled_dot_product_attention(q_t, k_t, k_t)


def loss_fn(impl: str):
    """A callable (q_s, k_s, q_t, k_t) -> loss (None for the yardstick) for one implementation."""
    if impl == "reference":
        return reference_loss
    if impl == "reference_compiled":
        return compiled(reference_loss)
    if impl == "attention_forward":
        return attention_forward

    def forced(*inputs):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TSA_FAST_BACKEND", impl)
            return tsa_fast.attention_transfer_loss(*inputs)

    return forced


def make_inputs(batch: int, heads: int, n: int, dtype: torch.dtype, mode: str):
    """Student (q_s, k_s), requiring grad in forward + backward, and teacher (q_t, k_t), each (B, H, N, HEAD_DIM)."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    randn = lambda: torch.randn(batch, heads, n, HEAD_DIM, device=DEVICE, generator=generator).to(dtype)  # noqa: E731
    grad = mode == "fwd+bwd"
    return randn().requires_grad_(grad), randn().requires_grad_(grad), randn(), randn()


def step(fn, *inputs):
    """One forward (no autograd), or forward + backward when the student's q and k require grad."""
    if inputs[0].requires_grad:
        loss = fn(*inputs)
        if loss is not None:
            loss.backward()
    else:
        with torch.no_grad():
            fn(*inputs)
    synchronize()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=[f"B{b}-N{n}" for b, n in SIZES])
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_transfer_loss(benchmark, impl, size, mode):
    if impl.endswith("_compiled") and mode == "fwd":
        pytest.skip("torch.compile variants: forward + backward only")
    batch, n = size
    inputs = make_inputs(batch, HEADS, n, DTYPE, mode)
    fn = loss_fn(impl)
    step(fn, *inputs)  # warm-up: compilation, autotuning, first touch of memory, the .grad buffers
    describe(
        benchmark,
        op="attention_transfer_loss",
        mode=mode,
        impl=impl,
        dtype=DTYPE,
        size={"B": batch, "N": n},
        x="N",
        H=HEADS,
        D=HEAD_DIM,
    )
    measure(benchmark, step, fn, *inputs)
    if impl != "attention_forward":  # the yardstick's FLOPs are not these
        per_score_and_dim = 4 if mode == "fwd" else 12 if impl == "cpp" else 16
        record_roofline(benchmark, DTYPE, flops=batch * HEADS * n * n * HEAD_DIM * per_score_and_dim)
    record_peak_memory(benchmark, lambda: step(fn, *inputs), MODULE, impl, mode, str(batch), str(HEADS), str(n))


def measure_cpu_peak(impl: str, mode: str, batch: str, heads: str, n: str) -> int:
    """Peak RSS growth of one step in this (fresh) process, beyond the inputs and .grad."""
    inputs = make_inputs(int(batch), int(heads), int(n), DTYPE, mode)
    fn = loss_fn(impl)
    # Warm-up: compilation at this size for the references; the interpreter compiles nothing, so a short
    # slice (which also allocates the .grad buffers) saves it a full-size run.
    step(fn, *([x[:, :, :64] for x in inputs] if impl == "triton" and DEVICE.type == "cpu" else inputs))
    return cpu_peak_extra_bytes_of(lambda: step(fn, *inputs))


if __name__ == "__main__":
    print(measure_cpu_peak(*sys.argv[1:]))
