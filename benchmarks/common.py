"""Shared benchmark helpers: device and sizes, how a benchmark is named and run, peak memory, the roofline,
the check that every implementation computes the same loss, and the optional peer Liger-Kernel.

Every suite names its benchmarks with `describe` (the group, and `extra_info` for the report: impl, its
kind, op, mode, sizes, and `figure` / `x` for the plots of time and memory against size), times them with
`measure`, and records `peak_extra_MB` with `record_peak_memory` and the roofline with `record_roofline`; a whole
training step's suite does all of it with `benchmark_step`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import subprocess
import sys
import threading
import time

import torch

from benchmarks.report import impl_kind

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMOKE = os.environ.get("TSA_FAST_BENCH") == "smoke"  # tiny sizes: checks the suite runs, measures nothing
ROUNDS = 3 if DEVICE.type == "cpu" else 10  # timed rounds per benchmark (pytest-benchmark reports median, IQR)

# Datasheet ceilings, quoted next to the measured ones (the roofline uses what this run measures).
DATASHEET = {
    "NVIDIA H200": "datasheet 4.8 TB/s HBM3e, ~990 TFLOP/s dense bf16, ~67 TFLOP/s fp32",
    "NVIDIA H100 80GB HBM3": "datasheet 3.35 TB/s HBM3, ~990 TFLOP/s dense bf16, ~67 TFLOP/s fp32",
}


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def compiled(fn):
    """`torch.compile(fn)`; smoke runs mark shapes dynamic so that each size does not compile anew."""
    return torch.compile(fn, dynamic=True if SMOKE else None)


def describe(benchmark, *, op: str, mode: str, impl: str, dtype: torch.dtype, size: dict, x: str, **fixed) -> None:
    """Name the benchmark's group (one problem: op, mode, size, fixed parameters, dtype, device) and record in
    extra_info what the report needs: impl and its kind (tsa_fast, reference or peer), the parameters, the
    `figure` (the group without its size: one plot of time and memory against size) and `x` (the size
    parameter on that plot's axis, one of `size`)."""
    params = " ".join(f"{key}={value}" for key, value in fixed.items())
    sizes = " ".join(f"{key}={value}" for key, value in size.items())
    tail = f"{dtype_name(dtype)} {device_name()}"
    benchmark.group = " ".join(part for part in (op, mode, sizes, params, tail) if part)
    benchmark.extra_info.update(
        impl=impl,
        kind=impl_kind(impl),
        op=op,
        mode=mode,
        **size,
        **fixed,
        dtype=dtype_name(dtype),
        device=device_name(),
        figure=" ".join(part for part in (op, mode, params, tail) if part),
        x=x,
        size=size[x],
    )


def measure(benchmark, step, *args) -> None:
    """Time step(*args): ROUNDS rounds after one warm-up round (one call with --benchmark-disable)."""
    benchmark.pedantic(step, args=args, rounds=ROUNDS, warmup_rounds=1)


# ---------------------------------------------------------------------------------------------- memory


def cuda_peak_extra_bytes(fn) -> int:
    """Peak CUDA allocator bytes during fn() above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def _return_free_heap_pages() -> None:
    """Give the free pages of malloc's heap back to the OS (glibc's malloc_trim; elsewhere nothing)."""
    if _malloc_trim() is not None:
        _malloc_trim()(0)


def cpu_peak_extra_bytes_of(fn) -> int:
    """Peak resident memory during fn() above the resident memory before it, sampled every 0.5 ms.

    Tensors above malloc's mmap threshold are mmap'd and returned to the OS when freed; the threshold grows
    (up to 32 MiB) as such blocks are freed, so smaller ones may land in heap pages freed earlier, which
    are first handed back to the OS here: either way RSS follows the live allocations."""
    _return_free_heap_pages()
    baseline, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - baseline


def cpu_peak_extra_bytes(module: str, *args: str) -> int:
    """Run `python -m module *args` in a fresh process; it prints the peak extra bytes it measured."""
    out = subprocess.run([sys.executable, "-m", module, *args], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def record_peak_memory(benchmark, step, module: str | None = None, *args: str) -> None:
    """extra_info["peak_extra_MB"]: the peak extra memory of one more step() (its new .grad buffers included).

    CUDA: the allocator's peak. CPU: the RSS growth in a fresh process, `python -m module *args` (the module
    measures one step there: the heap of this process would hide what a step allocates); without a module,
    or in smoke runs (which measure nothing, and a fresh process costs seconds), in this process."""
    if DEVICE.type == "cuda":
        extra = cuda_peak_extra_bytes(step)
    elif module is None or SMOKE:
        extra = cpu_peak_extra_bytes_of(step)
    else:
        extra = cpu_peak_extra_bytes(module, *args)
    benchmark.extra_info["peak_extra_MB"] = extra / 2**20


# ---------------------------------------------------------------------------------------------- roofline


def _best_seconds(fn, *args, repeat: int) -> float:
    fn(*args)  # warm-up
    synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def measured_ceilings(dtype: torch.dtype) -> dict:
    """This device's ceilings, measured once per process: copy bandwidth (bytes read + written per second by
    a large tensor copy) and the dense matrix-product rate in `dtype` (square products; FLOP/s)."""
    copy_elems = (1 << 28 if DEVICE.type == "cuda" else 1 << 24) >> (2 if SMOKE else 0)  # 1 GiB / 64 MiB fp32
    src = torch.ones(copy_elems, device=DEVICE)
    bandwidth = 2 * src.nbytes / _best_seconds(torch.empty_like(src).copy_, src, repeat=5)
    n = (8192 if DEVICE.type == "cuda" else 1024) >> (2 if SMOKE else 0)
    a, b = (torch.randn(n, n, device=DEVICE).to(dtype) for _ in range(2))
    return {"bytes_per_s": bandwidth, "flops": 2 * n**3 / _best_seconds(torch.matmul, a, b, repeat=5)}


def record_roofline(benchmark, dtype: torch.dtype, *, bytes_moved: float | None = None, flops: float | None = None):
    """The roofline of the problem against this device's measured ceilings (`measured_ceilings`):
    bytes_moved (the least traffic the problem needs: each input read once, each output written once) over
    the copy bandwidth, and flops over the matrix-product rate in `dtype`; the achieved rates and fractions
    go to extra_info (achieved_GBps, roofline_fraction; TFLOPs, flops_fraction) with the ceilings used. Nothing
    with --benchmark-disable (nothing was timed)."""
    if benchmark.disabled:
        return
    seconds = benchmark.stats.stats.median
    ceilings = measured_ceilings(dtype)
    basis = []
    if bytes_moved is not None:
        benchmark.extra_info["achieved_GBps"] = bytes_moved / seconds / 1e9
        benchmark.extra_info["roofline_fraction"] = bytes_moved / seconds / ceilings["bytes_per_s"]
        basis.append(f"copy {ceilings['bytes_per_s'] / 1e9:.0f} GB/s")
    if flops is not None:
        benchmark.extra_info["TFLOPs"] = flops / seconds / 1e12
        benchmark.extra_info["flops_fraction"] = flops / seconds / ceilings["flops"]
        rate = (
            f"{ceilings['flops'] / 1e12:.0f} TFLOP/s"
            if ceilings["flops"] >= 1e13
            else f"{ceilings['flops'] / 1e9:.0f} GFLOP/s"
        )
        basis.append(f"{dtype_name(dtype)} matmul {rate}")
    note = f"; {DATASHEET[device_name()]}" if device_name() in DATASHEET else ""
    benchmark.extra_info["roofline"] = f"{device_name()}: measured {', '.join(basis)}{note}"


# ---------------------------------------------------------------------------------------------- training steps


def benchmark_step(benchmark, step, expected, *, impl: str, dtype: torch.dtype, flops: float, module: str, **problem):
    """The benchmark of a whole training step: `step()` returns the step's loss and `step.clear_grads()` drops
    the .grad buffers. A warm-up step at the initial weights (compilation, autotuning, optimizer state, the .grad
    buffers) whose loss `check_loss` compares with `expected()` (None: checked elsewhere); `describe` (mode
    fwd+bwd+step, `problem` its op, sizes and parameters); `measure`; the roofline of `flops` model FLOPs; the
    peak extra memory of one step with its new .grad buffers (on the CPU: `python -m module impl`)."""
    loss = step()
    describe(benchmark, mode="fwd+bwd+step", impl=impl, dtype=dtype, **problem)
    if expected is not None:
        check_loss(impl, torch.tensor(loss, dtype=torch.float64), expected(), dtype, benchmark)
    measure(benchmark, step)
    record_roofline(benchmark, dtype, flops=flops)
    step.clear_grads()  # as the step's own zero_grad leaves them: the step's new .grad buffers count
    record_peak_memory(benchmark, step, module, impl)


def step_peak_extra_bytes(step) -> int:
    """Peak RSS growth of one step() in this (fresh) process after a warm-up step (optimizer state,
    compilation), its new .grad buffers included: what `benchmark_step`'s module prints."""
    step()
    step.clear_grads()
    return cpu_peak_extra_bytes_of(step)


# ---------------------------------------------------------------------------------------------- checks, peers


def check_loss(impl: str, loss: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, benchmark=None) -> None:
    """Every implementation computes the same loss: relative error against the reference's value on the same
    inputs, at most 1e-4 for fp32 inputs and 3e-2 for fp16 / bf16 (peers may compute in the inputs' dtype).
    Recorded as extra_info["loss_rel_err"]."""
    error = (loss.double() - expected.double()).abs().item() / max(expected.double().abs().item(), 1e-30)
    if benchmark is not None:
        benchmark.extra_info["loss_rel_err"] = error
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert error <= tolerance, (
        f"{impl}: loss {loss.item()} differs from the reference's {expected.item()} (rel {error:.1e})"
    )


def liger(module: str):
    """A module of Liger-Kernel (`liger_kernel.transformers.<module>`), or pytest.skip: it needs CUDA
    (Triton kernels for GPUs) and the package (`pip install liger-kernel`)."""
    import pytest

    if DEVICE.type != "cuda":
        pytest.skip("Liger-Kernel runs on CUDA only")
    return pytest.importorskip(f"liger_kernel.transformers.{module}", reason="liger-kernel is not installed")
