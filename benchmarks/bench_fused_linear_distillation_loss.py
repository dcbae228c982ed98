"""Benchmarks of `fused_linear_distillation_loss` against materializing the logits.

    pytest benchmarks/bench_fused_linear_distillation_loss.py --benchmark-json=results.json

Compared on one problem (student and teacher as hidden states + LM-head weight, forward KL, fwd+bwd):
  fused               tsa_fast.fused_linear_distillation_loss (default backend, default chunk size)
  materialized        logits = hidden @ W.T for both models, then tsa_fast.distillation_loss
  reference           the float reference: materialized logits, reference distillation loss
  reference_compiled  the same under torch.compile
CPU: N=4096, H=512, V=32000 fp32 (target: peak memory <= 1/5 of the reference's, time <= 1.1x).
GPU: N=8192, H_s=H_t=4096, V=128256 bf16 (target: loss memory < 2 GB, >= 1.3x faster than the reference).
Peak extra memory: CUDA allocator peak, or the RSS growth of a fresh process on the CPU.
"""

from __future__ import annotations

import sys

import pytest
import torch

import tsa_fast
from tsa_fast.reference.fused_linear_distillation_loss import fused_linear_distillation_loss as reference_loss

from benchmarks.common import DEVICE, SMOKE, cpu_peak_extra_bytes, cpu_peak_extra_bytes_of, cuda_peak_extra_bytes, device_name

if SMOKE:
    ROWS, HIDDEN, VOCAB, DTYPE = 64, 32, 1000, torch.float32
elif DEVICE.type == "cuda":
    ROWS, HIDDEN, VOCAB, DTYPE = 8192, 4096, 128256, torch.bfloat16
else:
    ROWS, HIDDEN, VOCAB, DTYPE = 4096, 512, 32000, torch.float32
IMPLS = ["fused", "materialized", "reference", "reference_compiled"]


def materialized(student_hidden, student_weight, teacher_hidden, teacher_weight):
    return tsa_fast.distillation_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T)


def loss_fn(impl: str):
    return {
        "fused": tsa_fast.fused_linear_distillation_loss,
        "materialized": materialized,
        "reference": reference_loss,
        "reference_compiled": torch.compile(reference_loss),
    }[impl]


def make_inputs(rows: int, hidden: int, vocab: int, dtype: torch.dtype):
    generator = torch.Generator(DEVICE).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, device=DEVICE, generator=generator).to(dtype)  # noqa: E731
    return dict(
        student_hidden=randn(rows, hidden).requires_grad_(),
        student_weight=(randn(vocab, hidden) / hidden**0.5).requires_grad_(),
        teacher_hidden=randn(rows, hidden),
        teacher_weight=randn(vocab, hidden) / hidden**0.5,
    )


def step(fn, inputs):
    for tensor in inputs.values():
        tensor.grad = None  # as optimizer.zero_grad() leaves it
    fn(**inputs).backward()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, impl):
    inputs = make_inputs(ROWS, HIDDEN, VOCAB, DTYPE)
    fn = loss_fn(impl)
    step(fn, inputs)  # warm-up: compilation, first touch of memory
    benchmark.group = (
        f"fused_linear_distillation_loss fwd+bwd N={ROWS} H={HIDDEN} V={VOCAB} "
        f"{str(DTYPE).removeprefix('torch.')} {device_name()}"
    )
    benchmark.extra_info.update(impl=impl, rows=ROWS, hidden=HIDDEN, vocab=VOCAB, dtype=str(DTYPE), device=device_name())
    benchmark.pedantic(step, args=(fn, inputs), rounds=3 if DEVICE.type == "cpu" else 10, warmup_rounds=1)
    # Two logits GEMMs forward, two gradient GEMMs backward: 8 N H V FLOPs.
    benchmark.extra_info["TFLOPs"] = 8 * ROWS * HIDDEN * VOCAB / benchmark.stats.stats.median / 1e12
    if DEVICE.type == "cuda":
        extra = cuda_peak_extra_bytes(lambda: step(fn, inputs))
    else:
        del inputs
        extra = cpu_peak_extra_bytes("benchmarks.bench_fused_linear_distillation_loss", impl)
    benchmark.extra_info["peak_extra_MB"] = extra / 2**20


def _measure_cpu_peak(impl: str) -> int:
    inputs = make_inputs(ROWS, HIDDEN, VOCAB, DTYPE)
    fn = loss_fn(impl)
    step(fn, inputs)  # warm-up (compilation)
    for tensor in inputs.values():
        tensor.grad = None
    return cpu_peak_extra_bytes_of(lambda: step(fn, inputs))  # includes the new .grad buffers


if __name__ == "__main__":
    print(_measure_cpu_peak(sys.argv[1]))
