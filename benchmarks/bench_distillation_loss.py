"""Benchmarks of `distillation_loss`: forward, and forward + backward, of each backend against the reference
and against the loss as users would otherwise write it.

    pytest benchmarks/bench_distillation_loss.py --benchmark-json=results.json
    python -m benchmarks.report results.json

Compared on the same inputs (forward KL at temperature T = 2, scaled by T^2, mean over rows; no labels):
  cpp, triton           tsa_fast.distillation_loss held to one backend (triton: GPU only; on the CPU it
                        runs under the interpreter, which is no speed measurement)
  reference             tsa_fast.reference.distillation_loss, eager; reference_compiled: under torch.compile
  kldivloss             the pipeline popular KD toolkits write: nn.KLDivLoss(reduction="batchmean")(
                        F.log_softmax(s / T), F.softmax(t / T)) * T**2; kldivloss_compiled: under torch.compile
  liger_kldiv           Liger-Kernel's LigerKLDIVLoss on log-probs (log_target=True), GPU only
  liger_jsd             Liger-Kernel's LigerJSD at beta=0, which is its forward KL, on log-probs, GPU only
Each checks its loss against the reference's (`common.check_loss`). torch.compile variants are measured
forward + backward only (the training step; each compile costs tens of seconds).
CPU: N = 1024 and 4096 rows, V=32000, fp32 (target at N=4096: cpp >= 3x the eager reference,
>= 1.5x compiled). GPU: N = 2048 and 8192, V=128256, bf16 (target: >= 70% of the bandwidth roofline,
>= 5x the eager reference). Roofline: one read of each input (and one write of the gradient in
forward + backward) over the measured copy bandwidth. Peak extra memory is measured, never assumed: on a
GPU by the allocator, on the CPU as the peak RSS growth of a fresh process (`python -m
benchmarks.bench_distillation_loss IMPL MODE ROWS VOCAB DTYPE`).
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tsa_fast
from benchmarks.common import (
    DEVICE,
    SMOKE,
    check_loss,
    compiled,
    cpu_peak_extra_bytes_of,
    describe,
    dtype_name,
    liger,
    measure,
    record_peak_memory,
    record_roofline,
    synchronize,
)
from tsa_fast.backends import available_backends
from tsa_fast.reference.distillation_loss import distillation_loss as reference_loss

MODULE = "benchmarks.bench_distillation_loss"
if SMOKE:
    SIZES, VOCAB, DTYPE = [32, 64], 1000, torch.float32
elif DEVICE.type == "cuda":
    SIZES, VOCAB, DTYPE = [2048, 8192], 128256, torch.bfloat16
else:
    SIZES, VOCAB, DTYPE = [1024, 4096], 32000, torch.float32
TEMPERATURE = 2.0
MODES = ["fwd", "fwd+bwd"]

# What is compared: each kernel backend that runs here, the reference and the peers (the Liger ones skip
# without CUDA or the package).
BACKENDS = [
    b
    for b in ("triton", "cpp")
    if b in available_backends(DEVICE, DTYPE) and not (b == "triton" and DEVICE.type == "cpu")
]
IMPLS = BACKENDS + ["reference", "reference_compiled", "kldivloss", "kldivloss_compiled", "liger_kldiv", "liger_jsd"]


def kldivloss(student, teacher):
    """Hinton's KD loss as KD toolkits write it (torchdistill's KDLoss, an nn.KLDivLoss, and most tutorials)."""
    T = TEMPERATURE
    return (
        nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / T, dim=-1), F.softmax(teacher / T, dim=-1)) * T**2
    )


def loss_fn(impl: str):
    """A callable (student, teacher) -> loss for one implementation."""
    if impl in ("reference", "reference_compiled"):
        fn = functools.partial(reference_loss, temperature=TEMPERATURE)
        return compiled(fn) if impl == "reference_compiled" else fn
    if impl in ("kldivloss", "kldivloss_compiled"):
        return compiled(kldivloss) if impl == "kldivloss_compiled" else kldivloss
    if impl == "liger_kldiv":
        kl = liger("kl_div").LigerKLDIVLoss(reduction="batchmean", log_target=True)
        T = TEMPERATURE
        return lambda s, t: kl(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)) * T**2
    if impl == "liger_jsd":
        jsd = liger("jsd").LigerJSD(beta=0.0)  # beta = 0: KL(teacher || student), the forward KL
        T = TEMPERATURE
        return lambda s, t: jsd(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1)) * T**2

    def forced(student, teacher):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TSA_FAST_BACKEND", impl)
            return tsa_fast.distillation_loss(student, teacher, temperature=TEMPERATURE)

    return forced


def make_inputs(rows: int, vocab: int, dtype: torch.dtype, mode: str):
    """Student and teacher logits (N, V); the student requires grad in forward + backward."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    student = torch.randn(rows, vocab, device=DEVICE, generator=generator).mul_(3).to(dtype)
    teacher = torch.randn(rows, vocab, device=DEVICE, generator=generator).mul_(3).to(dtype)
    return student.requires_grad_(mode == "fwd+bwd"), teacher


def step(fn, student, teacher):
    """One forward (no autograd, as in evaluation), or forward + backward when the student requires grad."""
    if student.requires_grad:
        student.grad = None  # as optimizer.zero_grad() leaves it: backward hands its gradient over, no copy
        loss = fn(student, teacher)
        loss.backward()
    else:
        with torch.no_grad():
            loss = fn(student, teacher)
    synchronize()
    return loss


@functools.cache
def reference_value(rows: int) -> torch.Tensor:
    with torch.no_grad():
        return reference_loss(*make_inputs(rows, VOCAB, DTYPE, "fwd"), temperature=TEMPERATURE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", SIZES, ids=[f"N{n}" for n in SIZES])
@pytest.mark.parametrize("impl", IMPLS)
def test_distillation_loss(benchmark, impl, rows, mode):
    if impl.endswith("_compiled") and mode == "fwd":
        pytest.skip("torch.compile variants: forward + backward only")
    fn = loss_fn(impl)
    student, teacher = make_inputs(rows, VOCAB, DTYPE, mode)
    loss = step(fn, student, teacher)  # warm-up: compilation, autotuning, first touch of memory
    describe(benchmark, op="distillation_loss", mode=mode, impl=impl, dtype=DTYPE, size={"N": rows}, x="N", V=VOCAB)
    check_loss(impl, loss, reference_value(rows), DTYPE, benchmark)
    measure(benchmark, step, fn, student, teacher)
    # The least traffic: one read of each input, and in forward + backward one write of the gradient.
    bytes_moved = student.nbytes + teacher.nbytes + (student.nbytes if student.requires_grad else 0)
    record_roofline(benchmark, DTYPE, bytes_moved=bytes_moved)
    if student.requires_grad:
        benchmark.extra_info["grad_buffer_MB"] = student.nbytes / 2**20
    args = (impl, mode, str(rows), str(VOCAB), dtype_name(DTYPE))
    record_peak_memory(benchmark, lambda: step(fn, student, teacher), MODULE, *args)


def measure_cpu_peak(impl: str, mode: str, rows: str, vocab: str, dtype: str) -> int:
    """Peak RSS growth of one step in this (fresh) process beyond the inputs; in forward + backward the new
    .grad (one gradient buffer) is part of it."""
    student, teacher = make_inputs(int(rows), int(vocab), getattr(torch, dtype), mode)
    fn = loss_fn(impl)
    step(fn, student, teacher)  # warm-up (compilation)
    student.grad = None
    return cpu_peak_extra_bytes_of(lambda: step(fn, student, teacher))


if __name__ == "__main__":
    print(measure_cpu_peak(*sys.argv[1:]))
