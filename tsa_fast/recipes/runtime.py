"""Where a recipe runs: `LocalRuntime` (one process, the `Runtime` protocol of `tsa_fast.distill.protocols`;
`tsa_fast.integrations.deepspeed.DeepSpeedRuntime` is the DeepSpeed one), the device and precision a config
asks for, and the start of a run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tsa_fast.distill.checkpoints import load_weights_only
from tsa_fast.distill.config import TrainingConfig
from tsa_fast.distill.protocols import Runtime
from tsa_fast.recipes.config import RunConfig


class LocalRuntime(Runtime):
    """One process: teachers as built, on the recipe's device; students by the Distiller's default
    optimization (`TorchOptimization`)."""

    rank = 0
    world_size = 1

    def barrier(self) -> None:
        """One process: nothing to wait for."""

    def close(self) -> None:
        """Nothing is held beyond the Python objects."""

    def teacher(self, build: Callable[[], nn.Module], checkpoint: Path) -> nn.Module:
        """The teacher `build()` returns, with the weights of `checkpoint` ({"config", "model": state dict}).
        Raises ValueError for a checkpoint that holds anything but tensors and plain data (`load_weights_only`)."""
        model = build()
        model.load_state_dict(load_weights_only(checkpoint)["model"])
        return model

    def optimization(self, model: nn.Module, objective: nn.Module, training: TrainingConfig) -> None:
        return None


def resolve_device(name: str) -> torch.device:
    """The device `name` (auto, cpu, cuda) means here. Raises ValueError for cuda without a CUDA device."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name if name != "auto" else "cpu")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full fp32). auto: bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if name == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA device (CPU autocast supports bf16)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def start_run(config: RunConfig, rank: int = 0) -> tuple[torch.device, torch.dtype | None, Path]:
    """Set torch's threads, create output_dir and (on rank 0) write the config there as config.json; returns
    (device, autocast dtype or None, output_dir)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out_dir / "config.json").write_text(config.model_dump_json(indent=2))
    return device, precision, out_dir
