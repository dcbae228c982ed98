"""Backend selection for every op: `triton`, `cpp` or `torch` (the reference).

`TSA_FAST_BACKEND=triton|cpp|torch` forces one; otherwise the fastest available for the tensor's device
is chosen: CUDA prefers triton, then the CUDA kernels of `tsa_fast._C`, then torch; CPU prefers the C++
kernels of `tsa_fast._C`, then torch. Triton runs on CPU tensors only when forced and
`TRITON_INTERPRET=1` (how CI tests the kernels). Kernels take fp32/fp16/bf16; float64 always runs torch (the
reference), whatever is forced.
The package imports and works without Triton and without the extension.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "cpp", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:  # the Triton kernels, where Triton imports (Linux)
    from tsa_fast import kernels as triton_kernels
except ImportError:
    triton_kernels = None

try:  # the compiled extension, where it was built
    from tsa_fast import _C as cpp_extension
except ImportError:
    cpp_extension = None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run tensors of this device and dtype, fastest first."""
    names = []
    if dtype in KERNEL_DTYPES:
        if triton_kernels is not None and (device.type == "cuda" or triton_interpreted()):
            names.append("triton")
        ext = cpp_extension
        if ext is not None and (device.type == "cpu" or (device.type == "cuda" and ext.has_cuda)):
            names.append("cpp")
    names.append("torch")
    if device.type == "cpu" and "triton" in names:  # the interpreter is for testing, never a default
        names.append(names.pop(names.index("triton")))
    return names


def select_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend to run on: torch for a dtype no kernel takes (float64), even when another is forced; raises
    ValueError for an unknown `TSA_FAST_BACKEND`, or a forced one that cannot run this device and dtype."""
    forced = os.environ.get("TSA_FAST_BACKEND", "").strip()
    if forced and forced not in BACKENDS:
        raise ValueError(f"TSA_FAST_BACKEND must be one of {BACKENDS}, got {forced!r}")
    names = available_backends(device, dtype)
    if not forced or dtype not in KERNEL_DTYPES:
        return names[0]
    if forced not in names:
        raise ValueError(f"TSA_FAST_BACKEND={forced!r} cannot run {dtype} tensors on {device.type}; available: {names}")
    return forced


def select_triton_or_torch(device: torch.device, dtype: torch.dtype) -> str:
    """For an op with no cpp kernel: triton where `select_backend` picks it, else torch (the reference). A
    forced TSA_FAST_BACKEND=cpp applies to the ops that have a cpp kernel; the others take their default
    (triton on CUDA, torch on the CPU), so forcing the losses' C++ kernels leaves attention working."""
    if os.environ.get("TSA_FAST_BACKEND", "").strip() == "cpp":
        return "triton" if available_backends(device, dtype)[0] == "triton" else "torch"
    return "triton" if select_backend(device, dtype) == "triton" else "torch"
