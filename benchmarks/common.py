"""Shared benchmark helpers: devices, sizes, peak memory, roofline."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMOKE = os.environ.get("TSA_FAST_BENCH") == "smoke"  # tiny sizes: checks the suite runs, measures nothing

# HBM bandwidth used for the roofline (bytes/s): measured copy bandwidth where known, else the datasheet.
HBM_BYTES_PER_S = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"


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


def cpu_peak_extra_bytes_of(fn) -> int:
    """Peak resident memory during fn() above the resident memory before it, sampled every 0.5 ms.

    Large tensors are mmap'd and returned to the OS when freed, so RSS follows the live allocations."""
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
