"""Shared test conventions.

- Without a GPU, Triton kernels run on CPU tensors under the interpreter (set before Triton is imported).
- `backend` parametrizes a test over the three backends; an unavailable backend skips, unless it is named
  in TSA_FAST_REQUIRE_BACKENDS (CI requires all three), where it fails.
- Errors are relative norm errors against a float64 reference (`assert_rel_close`).
"""

import contextlib
import io
import os
import re
import subprocess
import sys
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tsa_fast.backends import BACKENDS, available_backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Force each backend in turn (TSA_FAST_BACKEND) for tensors on DEVICE."""
    name = request.param
    if name not in available_backends(DEVICE):
        required = os.environ.get("TSA_FAST_REQUIRE_BACKENDS", "").split(",")
        message = f"backend {name!r} is not available on {DEVICE.type}: {available_backends(DEVICE)}"
        if name in required:
            pytest.fail(message)
        pytest.skip(message)
    monkeypatch.setenv("TSA_FAST_BACKEND", name)
    return name


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs per test, reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; when expected is all zeros, ||actual||."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual.isnan().cpu(), expected.isnan().cpu()), f"{what}: NaN pattern differs"
    assert torch.equal(actual.isinf().cpu(), expected.isinf().cpu()), f"{what}: inf pattern differs"
    finite = expected.isfinite()
    error = rel_error(actual[finite], expected[finite])
    assert error <= tol, f"{what}: relative error {error:.3e} > {tol:.0e}"


# Shared memory one block may opt in to: A100 (sm_80) 163 KB, H100 / H200 (sm_90) 227 KB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def compile_for_gpus(kernel, config, constants: dict, types: dict) -> None:
    """Compile a Triton kernel (autotuned or plain) with one config for sm_80 and sm_90, no GPU needed (Triton
    ships ptxas); check that its shared memory fits that GPU; print its shared bytes, registers and spilled
    bytes (from ptxas). `constants` fix constexpr arguments, `types` maps the other arguments to
    Triton types (pointers default to "*bf16", scalars to "i32"). Specialized as a launch on contiguous
    model-sized tensors is: unit strides belong in `constants` (Triton makes an int argument of 1 a constant),
    pointers and the other integers are taken as multiples of 16 (which lets masked loads vectorize and the
    loops pipeline). Run with TRITON_INTERPRET=0."""
    from triton import compile as triton_compile
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(kernel)
    constants = {**constants, **config.kwargs}
    signature = {
        name: "constexpr" if name in constants else types.get(name, "*bf16" if name.endswith("_ptr") else "i32")
        for name in fn.arg_names
    }
    index = {name: (position,) for position, name in enumerate(fn.arg_names)}
    aligned = {
        index[name]: [["tt.divisibility", 16]] for name, kind in signature.items() if kind.startswith(("*", "i"))
    }
    source = ASTSource(fn, signature, {index[name]: value for name, value in constants.items()}, attrs=aligned)
    for arch in SHARED_MEMORY_LIMIT:
        log = io.StringIO()
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v: "Used R registers", "S bytes spill stores"
            knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
            compiled = triton_compile(
                source,
                target=GPUTarget("cuda", arch, 32),
                options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
            )
        ptxas = log.getvalue()
        registers = int(re.search(r"Used (\d+) registers", ptxas)[1])
        spilled = int(re.search(r"(\d+) bytes spill stores", ptxas)[1])
        shared = compiled.metadata.shared
        print(
            f"{fn.__name__} sm_{arch} {config}: {shared} bytes of shared memory,"
            f" {registers} registers, {spilled} spilled"
        )
        assert shared <= SHARED_MEMORY_LIMIT[arch], (
            f"{fn.__name__} {config}: {shared} bytes of shared memory on sm_{arch}"
        )


def autotune_under_interpreter(monkeypatch, *kernels, launches: int = 3) -> list:
    """Let Triton autotuners run under the interpreter as they do on a GPU at the first launch of a tuning key:
    each candidate that pruning keeps is timed by launching it `launches` times on the real arguments (the GPU
    timer launches it dozens of times), then the winner runs. All candidates time alike, so the first kept one
    wins. Returns a list that gets one entry (the kernel's name) per candidate timed."""
    timed = []
    for kernel in kernels:

        def launch_repeatedly(kernel_call, quantiles, name=kernel.base_fn.__name__):
            for _ in range(launches):
                kernel_call()
            timed.append(name)
            return [1.0] * len(quantiles)

        monkeypatch.setattr(kernel, "cache", {})  # tune again, whatever ran before
        monkeypatch.setitem(kernel.__dict__, "do_bench", launch_repeatedly)  # over a cached_property that needs a GPU
    return timed


def unit_strides(kernel, suffixes: tuple[str, ...]) -> dict:
    """{name: 1} for the kernel's `stride_*` arguments ending in one of `suffixes`: the strides of the
    contiguous dimensions, which a launch on contiguous tensors specializes to the constant 1."""
    names = _jit_function(kernel).arg_names
    return {name: 1 for name in names if name.startswith("stride_") and name.endswith(suffixes)}


def _jit_function(kernel):
    """The JITFunction of a Triton kernel, autotuned (an Autotuner wraps it) or plain."""
    from triton.runtime import JITFunction

    return kernel if isinstance(kernel, JITFunction) else kernel.fn


def run_compiled(test_file: str) -> None:
    """Run `python test_file` (its `__main__` compiles its kernels for GPUs) with the interpreter off."""
    subprocess.run([sys.executable, test_file], env={**os.environ, "TRITON_INTERPRET": "0"}, check=True, timeout=300)
