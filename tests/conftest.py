"""Shared test conventions.

- Without a GPU, Triton kernels run on CPU tensors under the interpreter (set before Triton is imported).
- `backend` parametrizes a test over the three backends; an unavailable backend skips, unless it is named
  in TSA_FAST_REQUIRE_BACKENDS (CI requires all three), where it fails.
- Errors are relative norm errors against a float64 reference (`assert_rel_close`).
"""

import os
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
