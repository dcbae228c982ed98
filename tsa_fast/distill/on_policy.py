"""Batches of generated continuations: on-policy distillation (GKD, Agarwal et al. 2024) and the sequences of
sequence-level KD (Kim and Rush 2016), for any causal LM with `generate` (the `Model` protocol).

A prompt is the first `prompt_tokens` of a training sequence; a model continues it (without gradient) and the
result becomes a next-token batch whose labels are the generated tokens only: prompt positions get
`ignore_index`, and so does everything after a row's first EOS (the EOS itself is a label: the student learns
to stop). Generation always runs `max_new_tokens` steps (no early stop at EOS), so every batch of a run has the
same shape and, under data parallelism, every rank runs the same number of decoding steps (a rank whose rows
all ended never leaves the others waiting in a collective).

Which batches are on-policy is a function of (seed, micro-batch number) alone (`is_on_policy`), as are the
samples' RNG streams: a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsa_fast.distill.config import OnPolicyConfig
from tsa_fast.distill.protocols import Model

IGNORE_INDEX = -100
_DECISION_SALT = 0x5EED  # keeps the on-policy decisions apart from the data order's RNG streams
_SAMPLE_SALT = 0xD1CE


def is_on_policy(fraction: float, seed: int, micro_batch: int) -> bool:
    """Whether micro-batch number `micro_batch` of a run seeded by `seed` is on-policy: a uniform draw from a
    generator seeded by (seed, micro_batch) is below `fraction` (0: never, 1: always)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if fraction in (0, 1):
        return fraction == 1
    generator = torch.Generator().manual_seed((seed * 1_000_003 + micro_batch) * 65_537 + _DECISION_SALT)
    return torch.rand((), generator=generator).item() < fraction


def sample_generator(seed: int, micro_batch: int, rank: int, device: torch.device) -> torch.Generator:
    """The RNG of micro-batch `micro_batch`'s samples on data-parallel rank `rank`."""
    key = ((seed * 1_000_003 + micro_batch) * 65_537 + rank) * 31 + _SAMPLE_SALT
    return torch.Generator(device).manual_seed(key % (2**63))


def continuation_batch(
    sequences: Tensor, prompt_tokens: int, eos_id: int | None = None, ignore_index: int = IGNORE_INDEX
) -> dict[str, Tensor]:
    """The next-token batch of `sequences` (B, L) int64, prompt (the first prompt_tokens) then continuation:
    `input_ids` = sequences, `labels` (B, L) = the next token at each position, ignore_index at the positions
    that predict a prompt token, at the last position (nothing follows), and after the first eos_id of the
    continuation. Raises ValueError unless 1 <= prompt_tokens < L."""
    if sequences.dim() != 2 or sequences.dtype != torch.int64:
        raise ValueError(f"sequences must be (B, L) int64, got {sequences.dtype} of shape {tuple(sequences.shape)}")
    length = sequences.shape[1]
    if not 1 <= prompt_tokens < length:
        raise ValueError(
            f"prompt_tokens must be in [1, {length}) for sequences of length {length}, got {prompt_tokens}"
        )
    labels = torch.full_like(sequences, ignore_index)
    labels[:, prompt_tokens - 1 : -1] = sequences[:, prompt_tokens:]
    if eos_id is not None:
        continuation = labels[:, prompt_tokens - 1 : -1]
        is_eos = continuation == eos_id
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
        continuation.masked_fill_(after_eos, ignore_index)
    return {"input_ids": sequences, "labels": labels}


def new_tokens(config_max_new_tokens: int | None, seq_len: int, prompt_tokens: int) -> int:
    """Tokens to generate per prompt: the configured number, or the rest of a sequence of seq_len tokens.
    Raises ValueError unless prompt_tokens < seq_len."""
    if prompt_tokens >= seq_len:
        raise ValueError(f"prompt_tokens={prompt_tokens} must be less than the sequence length {seq_len}")
    return config_max_new_tokens or seq_len - prompt_tokens


def prompts_of(batch: dict[str, Tensor], prompt_tokens: int) -> Tensor:
    """The first prompt_tokens of each row of the batch's input_ids. Raises ValueError when a row is padded
    there (attention_mask) or the sequences are not longer than the prompt."""
    input_ids = batch["input_ids"]
    if prompt_tokens >= input_ids.shape[1]:
        raise ValueError(f"prompt_tokens={prompt_tokens} must be less than the sequence length {input_ids.shape[1]}")
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask[:, :prompt_tokens].all()):
        raise ValueError(f"every row needs prompt_tokens={prompt_tokens} real tokens to prompt with (attention_mask)")
    return input_ids[:, :prompt_tokens]


def generate_continuations(
    model: Model,
    prompts: Tensor,
    max_new_tokens: int,
    *,
    temperature: float,
    generator: torch.Generator | None,
) -> Tensor:
    """prompts (B, P) continued by `model.generate` for exactly max_new_tokens steps (no early stop: see the
    module docstring), without gradient: (B, P + max_new_tokens) int64, a tensor autograd can use."""
    with torch.no_grad():
        sequences = model.generate(prompts, max_new_tokens, temperature=temperature, generator=generator)
    return sequences.clone()  # out of inference mode: the student's embedding saves it for backward


def on_policy_batch(
    model: Model,
    batch: dict[str, Tensor],
    config: OnPolicyConfig,
    *,
    generator: torch.Generator | None,
    eos_id: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Tensor]:
    """The on-policy version of a training batch: the student `model`'s continuations of its prompts (the
    first config.prompt_tokens of each row), sampled at config.sample_temperature with `generator`, as a
    `continuation_batch` (labels on the generated tokens only) with "on_policy" set. Raises ValueError for a
    prompt that does not fit (see `prompts_of`, `new_tokens`; generate's own checks name max_seq_len)."""
    prompts = prompts_of(batch, config.prompt_tokens)
    steps = new_tokens(config.max_new_tokens, batch["input_ids"].shape[1], config.prompt_tokens)
    sequences = generate_continuations(
        model, prompts, steps, temperature=config.sample_temperature, generator=generator
    )
    return {**continuation_batch(sequences, config.prompt_tokens, eos_id, ignore_index), "on_policy": True}
