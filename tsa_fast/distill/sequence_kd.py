"""Sequence-level KD (Kim and Rush 2016): the teacher's completions of the training prompts, generated once and
cached on disk, become the student's training sequences.

Prompt m is the first `prompt_tokens` of training sequence m, or where the split has `PROMPT_LENGTHS` (chat
data) its first prompt_lengths[m] tokens; the teacher continues it for exactly `max_new_tokens` steps
(`on_policy.continuations_of`: prompts of different lengths left-padded for generation) at `temperature` (0:
greedy), batch b with a generator seeded by (seed, b), so the completions are a function of (teacher, prompts,
sampling settings, seed): the fingerprint that keys the cache.

On disk (`directory`): `sequences.npy` (M, P + max_new_tokens) int64, P the longest prompt, row m = prompt m
and its completion, then zeros (prompts shorter than P); `progress.json` {fingerprint, shape, batch_size,
done: batches written}, updated after each batch is flushed, so an interrupted build continues at its first
unwritten batch; `meta.json` once complete. A cache of another fingerprint or shape is rebuilt from scratch.

Under data parallelism every rank runs every batch's generation (a sharded teacher needs every rank in each
forward) and rank 0 writes the rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from rich.progress import track
from torch import Tensor

from tsa_fast.distill.on_policy import PROMPT_LENGTHS, continuation_batch, continuations_of, new_tokens
from tsa_fast.distill.protocols import Model

_SALT = 0x5E9D


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def teacher_completions(
    teacher: Model,
    split: dict[str, Tensor],
    directory: Path,
    *,
    prompt_tokens: int,
    max_new_tokens: int | None,
    temperature: float,
    fingerprint: str,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    rank: int = 0,
    barrier=lambda: None,
) -> Tensor:
    """The teacher's completions of the prompts of `split` (its input_ids' first prompt_tokens, max_new_tokens
    None: the rest of a sequence; or with PROMPT_LENGTHS each row's own prompt, max_new_tokens required), (M,
    P + max_new_tokens) int64 on the CPU (see the module docstring), read from `directory` when it holds them
    for `fingerprint` (what determines them: the teacher, the prompts, the sampling settings and seed), else
    generated there (continuing an interrupted build of the same fingerprint). Raises ValueError for a prompt
    that does not fit (`continuations_of`)."""
    input_ids, lengths = split["input_ids"], split.get(PROMPT_LENGTHS)
    if lengths is None:
        width, steps = prompt_tokens, new_tokens(max_new_tokens, input_ids.shape[1], prompt_tokens)
    elif max_new_tokens is None:
        raise ValueError("max_new_tokens must be given for prompts of different lengths")
    else:
        width, steps = int(lengths.max()), max_new_tokens
    shape = [input_ids.shape[0], width + steps]
    state = {"fingerprint": fingerprint, "shape": shape, "batch_size": batch_size}
    directory.mkdir(parents=True, exist_ok=True)
    meta_path, progress_path, data_path = (
        directory / "meta.json",
        directory / "progress.json",
        directory / "sequences.npy",
    )
    if _read_json(meta_path) == state:
        return torch.from_numpy(np.load(data_path))
    barrier()  # every rank has read the old state
    recorded = _read_json(progress_path) or {}
    same = {key: value for key, value in recorded.items() if key != "done"} == state and data_path.exists()
    done = recorded.get("done") if same else None  # batches of this fingerprint already written
    if rank == 0 and done is None:
        meta_path.unlink(missing_ok=True)
        np.lib.format.open_memmap(data_path, "w+", np.int64, tuple(shape))
        _write_json(progress_path, {**state, "done": 0})
    done = done or 0
    barrier()
    sequences = np.load(data_path, mmap_mode="r+") if rank == 0 else None
    n_batches = -(-shape[0] // batch_size)
    for number in track(range(done, n_batches), "teacher completions", disable=not progress or rank != 0):
        rows = slice(number * batch_size, min(shape[0], (number + 1) * batch_size))
        batch = {name: tensor[rows].to(device) for name, tensor in split.items()}
        generator = torch.Generator(device).manual_seed((seed * 1_000_003 + number) * 31 + _SALT)
        generated = continuations_of(
            teacher, batch, prompt_tokens, steps, temperature=temperature, generator=generator
        )["input_ids"]
        if rank == 0:
            sequences[rows] = 0
            sequences[rows, : generated.shape[1]] = generated.cpu().numpy()
            sequences.flush()
            _write_json(progress_path, {**state, "done": number + 1})
    barrier()
    if rank == 0:
        _write_json(meta_path, state)
    barrier()
    return torch.from_numpy(np.load(data_path))


def sequence_kd_split(sequences: Tensor, prompt_tokens: int | Tensor, eos_id: int | None = None) -> dict[str, Tensor]:
    """The training split of sequence-level KD: input_ids = the teacher's sequences, labels = its completion
    tokens (`continuation_batch`: the prompt, the positions past the completion and what follows an EOS are
    ignore_index); prompt_tokens a tensor of the split's PROMPT_LENGTHS: with attention_mask and PROMPT_LENGTHS."""
    return continuation_batch(sequences, prompt_tokens, eos_id)
