"""Benchmarks of `fused_linear_distillation_loss` against materializing the logits, forward and forward + backward.

    pytest benchmarks/bench_fused_linear_distillation_loss.py --benchmark-json=results.json
    python -m benchmarks.report results.json

Compared on one problem (student and teacher as hidden states + LM-head weight, forward KL at T = 1, mean
over rows):
  fused                         tsa_fast.fused_linear_distillation_loss (default backend, default chunk size)
  materialized                  logits = hidden @ W.T for both models, then tsa_fast.distillation_loss
  reference                     the float reference: materialized logits, reference distillation loss
  reference_compiled            the same under torch.compile (forward + backward only)
  liger_fused_linear_jsd        Liger-Kernel's LigerFusedLinearJSD at jsd_beta=0, which is its forward KL
                                (GPU only)
Each checks its loss against the reference's (`common.check_loss`).
CPU: N=4096, H=512, V=32000 fp32 (target: peak memory <= 1/5 of the reference's, time <= 1.1x).
GPU: N=8192, H_s=H_t=4096, V=128256 bf16 (target: loss memory < 2 GB, >= 1.3x faster than the reference).
The peaks below include the .grad buffers a step creates (at the GPU size bf16 grad_weight + grad_hidden
= 1.12 GB for every implementation); the loss's own memory is the peak minus those.
Roofline: FLOPs over the measured matrix-product rate: the two logit products (2 N H V each) forward, and
the grad_hidden and grad_weight products (2 N H V each) backward. Peak extra memory: CUDA allocator peak,
or the RSS growth of a fresh process on the CPU (`python -m benchmarks.bench_fused_linear_distillation_loss
IMPL MODE`).
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch

import tsa_fast
from benchmarks.common import (
    DEVICE,
    SMOKE,
    check_loss,
    compiled,
    cpu_peak_extra_bytes_of,
    describe,
    liger,
    measure,
    record_peak_memory,
    record_roofline,
    synchronize,
)
from tsa_fast.reference.fused_linear_distillation_loss import (
    fused_linear_distillation_loss as reference_loss,
)

MODULE = "benchmarks.bench_fused_linear_distillation_loss"
if SMOKE:
    ROWS, HIDDEN, VOCAB, DTYPE = 64, 32, 1000, torch.float32
elif DEVICE.type == "cuda":
    ROWS, HIDDEN, VOCAB, DTYPE = 8192, 4096, 128256, torch.bfloat16
else:
    ROWS, HIDDEN, VOCAB, DTYPE = 4096, 512, 32000, torch.float32
IMPLS = ["fused", "materialized", "reference", "reference_compiled", "liger_fused_linear_jsd"]
MODES = ["fwd", "fwd+bwd"]


def materialized(student_hidden, student_weight, teacher_hidden, teacher_weight):
    return tsa_fast.distillation_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T)


def loss_fn(impl: str):
    """A callable (**inputs) -> loss for one implementation."""
    if impl == "liger_fused_linear_jsd":
        jsd = liger("fused_linear_jsd").LigerFusedLinearJSD(jsd_beta=0.0)  # beta = 0: KL(teacher || student)
        return lambda student_hidden, student_weight, teacher_hidden, teacher_weight: jsd(
            student_hidden, student_weight, teacher_hidden, teacher_weight, None
        )
    return {
        "fused": tsa_fast.fused_linear_distillation_loss,
        "materialized": materialized,
        "reference": reference_loss,
        "reference_compiled": compiled(reference_loss),
    }[impl]


def make_inputs(rows: int, hidden: int, vocab: int, dtype: torch.dtype, mode: str):
    generator = torch.Generator(DEVICE).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, device=DEVICE, generator=generator).to(dtype)  # noqa: E731
    grad = mode == "fwd+bwd"
    return dict(
        student_hidden=randn(rows, hidden).requires_grad_(grad),
        student_weight=(randn(vocab, hidden) / hidden**0.5).requires_grad_(grad),
        teacher_hidden=randn(rows, hidden),
        teacher_weight=randn(vocab, hidden) / hidden**0.5,
    )


def step(fn, inputs):
    """One forward (no autograd), or forward + backward when the student's tensors require grad."""
    if inputs["student_hidden"].requires_grad:
        for tensor in inputs.values():
            tensor.grad = None  # as optimizer.zero_grad() leaves it
        loss = fn(**inputs)
        loss.backward()
    else:
        with torch.no_grad():
            loss = fn(**inputs)
    synchronize()
    return loss


@functools.cache
def reference_value() -> torch.Tensor:
    with torch.no_grad():
        return reference_loss(**make_inputs(ROWS, HIDDEN, VOCAB, DTYPE, "fwd"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_distillation_loss(benchmark, impl, mode):
    if impl.endswith("_compiled") and mode == "fwd":
        pytest.skip("torch.compile variants: forward + backward only")
    fn = loss_fn(impl)
    inputs = make_inputs(ROWS, HIDDEN, VOCAB, DTYPE, mode)
    loss = step(fn, inputs)  # warm-up: compilation, first touch of memory
    describe(
        benchmark,
        op="fused_linear_distillation_loss",
        mode=mode,
        impl=impl,
        dtype=DTYPE,
        size={"N": ROWS},
        x="N",
        H=HIDDEN,
        V=VOCAB,
    )
    check_loss(impl, loss, reference_value(), DTYPE, benchmark)
    measure(benchmark, step, fn, inputs)
    record_roofline(benchmark, DTYPE, flops=(8 if mode == "fwd+bwd" else 4) * ROWS * HIDDEN * VOCAB)
    record_peak_memory(benchmark, lambda: step(fn, inputs), MODULE, impl, mode)


def measure_cpu_peak(impl: str, mode: str) -> int:
    """Peak RSS growth of one step in this (fresh) process, the new .grad buffers included."""
    inputs = make_inputs(ROWS, HIDDEN, VOCAB, DTYPE, mode)
    fn = loss_fn(impl)
    step(fn, inputs)  # warm-up (compilation)
    for tensor in inputs.values():
        tensor.grad = None
    return cpu_peak_extra_bytes_of(lambda: step(fn, inputs))


if __name__ == "__main__":
    print(measure_cpu_peak(*sys.argv[1:]))
