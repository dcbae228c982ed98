"""Benchmarks of `distillation_loss`: forward + backward of each backend against the reference.

    pytest benchmarks/bench_distillation_loss.py --benchmark-json=results.json
    python -m benchmarks.report results.json

CPU: N=4096 rows, V=32000, fp32 (the issue's target: cpp >= 3x the eager reference, >= 1.5x compiled).
GPU: N=8192, V=128256, bf16 (target: >= 70% of the HBM roofline of one read of each input and one
write of the gradient, >= 5x the eager reference). Peak extra memory is measured, never assumed: on a
GPU by the allocator, on the CPU as the peak RSS growth of a fresh process (`python -m
benchmarks.bench_distillation_loss IMPL ROWS VOCAB DTYPE`).
"""

from __future__ import annotations

import sys

import pytest
import torch

import tsa_fast
from tsa_fast.backends import available_backends
from tsa_fast.reference.distillation_loss import distillation_loss as reference_loss

from benchmarks.common import (
    DEVICE,
    HBM_BYTES_PER_S,
    SMOKE,
    cpu_peak_extra_bytes,
    cuda_peak_extra_bytes,
    device_name,
    cpu_peak_extra_bytes_of,
)

if SMOKE:
    ROWS, VOCAB, DTYPE = 64, 1000, torch.float32
elif DEVICE.type == "cuda":
    ROWS, VOCAB, DTYPE = 8192, 128256, torch.bfloat16
else:
    ROWS, VOCAB, DTYPE = 4096, 32000, torch.float32

# What is compared: each kernel backend that runs here, and the reference eager and compiled.
IMPLS = [b for b in ("triton", "cpp") if b in available_backends(DEVICE, DTYPE) and not (b == "triton" and DEVICE.type == "cpu")]
IMPLS += ["reference", "reference_compiled"]


def loss_fn(impl: str):
    """A callable (student, teacher) -> loss for one implementation."""
    if impl == "reference":
        return reference_loss
    if impl == "reference_compiled":
        return torch.compile(reference_loss)

    def forced(student, teacher):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TSA_FAST_BACKEND", impl)
            return tsa_fast.distillation_loss(student, teacher)

    return forced


def make_inputs(rows: int, vocab: int, dtype: torch.dtype):
    generator = torch.Generator(DEVICE).manual_seed(0)
    student = torch.randn(rows, vocab, device=DEVICE, generator=generator).mul_(3).to(dtype).requires_grad_()
    teacher = torch.randn(rows, vocab, device=DEVICE, generator=generator).mul_(3).to(dtype)
    return student, teacher


def step(fn, student, teacher):
    student.grad = None  # as optimizer.zero_grad() leaves it: backward hands its gradient over, no copy
    fn(student, teacher).backward()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, impl):
    student, teacher = make_inputs(ROWS, VOCAB, DTYPE)
    fn = loss_fn(impl)
    step(fn, student, teacher)  # warm-up: compilation, autotuning, first-touch of memory
    benchmark.group = f"distillation_loss fwd+bwd N={ROWS} V={VOCAB} {str(DTYPE).removeprefix('torch.')} {device_name()}"
    benchmark.extra_info.update(impl=impl, rows=ROWS, vocab=VOCAB, dtype=str(DTYPE), device=device_name())
    benchmark.pedantic(step, args=(fn, student, teacher), rounds=3 if DEVICE.type == "cpu" else 20, warmup_rounds=1)

    # One read of each input and one write of the gradient, against the HBM roofline.
    bytes_moved = ROWS * VOCAB * (2 * student.element_size() + teacher.element_size())
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["achieved_GBps"] = bytes_moved / seconds / 1e9
    if device_name() in HBM_BYTES_PER_S:
        benchmark.extra_info["roofline_fraction"] = bytes_moved / seconds / HBM_BYTES_PER_S[device_name()]

    grad_bytes = student.numel() * student.element_size()
    if DEVICE.type == "cuda":
        extra = cuda_peak_extra_bytes(lambda: step(fn, student, teacher))
    else:
        del student, teacher
        extra = cpu_peak_extra_bytes("benchmarks.bench_distillation_loss", impl, str(ROWS), str(VOCAB), str(DTYPE))
    benchmark.extra_info["peak_extra_MB"] = extra / 2**20
    benchmark.extra_info["grad_buffer_MB"] = grad_bytes / 2**20


def _measure_cpu_peak(impl: str, rows: int, vocab: int, dtype_name: str) -> int:
    """Peak RSS growth of one forward + backward in this (fresh) process beyond the inputs; the new
    .grad (one gradient buffer) is part of it."""
    student, teacher = make_inputs(rows, vocab, getattr(torch, dtype_name.removeprefix("torch.")))
    fn = loss_fn(impl)
    step(fn, student, teacher)  # warm-up (compilation)
    student.grad = None
    return cpu_peak_extra_bytes_of(lambda: step(fn, student, teacher))  # includes the new .grad


if __name__ == "__main__":
    impl, rows, vocab, dtype_name = sys.argv[1:5]
    print(_measure_cpu_peak(impl, int(rows), int(vocab), dtype_name))
