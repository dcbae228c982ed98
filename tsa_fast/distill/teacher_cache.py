"""A teacher-output cache: the teachers' top-k log-probabilities at temperature T over the training split,
computed once and memory-mapped from disk, so distillation runs without the teacher in memory
(`fused_linear_distillation_loss(..., teacher_topk=...)`: the rest of the teacher's mass is one tail bucket).

On disk (`directory`): `indices.npy` (M, N, k) int32 and `logprobs.npy` (M, N, k) float32, row m = training
example m, and `meta.json` (shape, k, temperature, and the fingerprint of what produced it). A cache whose
meta does not match the request is rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.progress import track
from torch import Tensor

from tsa_fast.distill.batches import take
from tsa_fast.distill.teachers import Teachers, TeacherTargets


class TopkTeacherCache:
    """Reads `TeacherTargets(topk=...)` for a batch from the memory-mapped cache (by the batch's "index"): a
    `TeacherSource` (tsa_fast.distill.protocols)."""

    def __init__(self, directory: Path, temperature: float):
        meta = json.loads((directory / "meta.json").read_text())
        if meta["temperature"] != temperature:
            raise ValueError(f"{directory}: cache at temperature {meta['temperature']}, asked for {temperature}")
        self.indices = np.load(directory / "indices.npy", mmap_mode="r")
        self.logprobs = np.load(directory / "logprobs.npy", mmap_mode="r")
        self.temperature = temperature

    @classmethod
    def build(
        cls,
        teachers: Teachers,
        split: dict[str, Tensor],
        directory: Path,
        *,
        temperature: float,
        top_k: int,
        fingerprint: str,
        batch_size: int,
        device: torch.device,
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
        barrier=lambda: None,
    ) -> TopkTeacherCache:
        """Compute the cache unless `directory` already holds it for this fingerprint, k and temperature.

        Data parallel when world_size > 1: every rank calls build, `barrier` waits for all of them; rank r
        computes batches r, r + world_size, ... and writes their rows (every rank runs the same number of teacher
        forwards, as a sharded teacher needs: one short of a batch recomputes the last); rank 0 creates the files
        and writes the meta.
        """
        directory.mkdir(parents=True, exist_ok=True)
        shape = (*split["input_ids"].shape, top_k)
        meta = {"shape": list(shape), "top_k": top_k, "temperature": temperature, "fingerprint": fingerprint}
        meta_path = directory / "meta.json"
        if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
            return cls(directory, temperature)
        barrier()  # every rank has read the old meta
        if rank == 0:
            meta_path.unlink(missing_ok=True)  # the meta is written last: a killed build is rebuilt
            np.lib.format.open_memmap(directory / "indices.npy", "w+", np.int32, shape)
            np.lib.format.open_memmap(directory / "logprobs.npy", "w+", np.float32, shape)
        barrier()
        indices = np.load(directory / "indices.npy", mmap_mode="r+")
        logprobs = np.load(directory / "logprobs.npy", mmap_mode="r+")
        n_batches = -(-shape[0] // batch_size)
        numbers = range(rank, -(-n_batches // world_size) * world_size, world_size)
        for number in track(numbers, "teacher top-k cache", disable=not progress or rank != 0):
            start = min(number, n_batches - 1) * batch_size
            batch = take(split, torch.arange(start, min(shape[0], start + batch_size)), device)
            logits = teachers.targets(batch, temperature).full_logits().float()
            top = torch.log_softmax(logits / temperature, dim=-1).topk(top_k, dim=-1)
            rows = batch["index"].numpy()
            indices[rows] = top.indices.to(torch.int32).cpu().numpy()
            logprobs[rows] = top.values.cpu().numpy()
        indices.flush()
        logprobs.flush()
        barrier()
        if rank == 0:
            meta_path.write_text(json.dumps(meta))
        barrier()
        return cls(directory, temperature)

    def targets(
        self,
        batch: dict[str, Tensor],
        temperature: float = 1.0,
        *,
        fused: bool = False,
        hidden_states: bool = False,
        qkv: bool = False,
    ) -> TeacherTargets:
        """The cached top-k for the batch's examples (by its "index"), for the fused loss whether or not `fused`.
        Raises ValueError when `temperature` is not the cache's, or for hidden states / q, k, v (not cached)."""
        if temperature != self.temperature:
            raise ValueError(f"the teacher cache is at temperature {self.temperature}, asked for {temperature}")
        if hidden_states or qkv:
            raise ValueError("the teacher cache holds top-k log-probs only, not hidden states or q, k, v")
        rows = batch["index"].numpy()
        device = batch["input_ids"].device
        indices = torch.from_numpy(self.indices[rows]).to(device, torch.int64)
        logprobs = torch.from_numpy(self.logprobs[rows]).to(device)
        return TeacherTargets(topk=(indices, logprobs))
