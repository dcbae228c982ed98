"""Batches of generated continuations: on-policy distillation (GKD, Agarwal et al. 2024) and the sequences of
sequence-level KD (Kim and Rush 2016), for any causal LM with `generate` (the `Model` protocol).

A prompt is the first `prompt_tokens` of a training sequence, or, where the split has `PROMPT_LENGTHS` (chat
data: the tokens before the first assistant token), the first prompt_lengths[i] tokens of row i. A model
continues it (without gradient) and the result becomes a next-token batch whose labels are the generated
tokens only: prompt positions get `ignore_index`, and so does everything after a row's first EOS (the EOS
itself is a label: the student learns to stop). Prompts of different lengths are left-padded to the longest
for generation (`left_padded_prompts`, with an attention mask: the model's generate positions them as if
alone); the sequences are then shifted back so that every row starts with its prompt (`right_aligned`) and
the batch is right-padded with an attention mask, which a causal model scores exactly as each row alone (no
position ids needed). Generation always runs `max_new_tokens` steps (no early stop at EOS), so under data
parallelism every rank runs the same number of decoding steps (a rank whose rows all ended never leaves the
others waiting in a collective); with prompts of different lengths `max_new_tokens` must be given, because
"the rest of the sequence" would depend on each rank's longest prompt.

Which batches are on-policy is a function of (seed, micro-batch number) alone (`is_on_policy`), as are the
samples' RNG streams: a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsa_fast.distill.config import OnPolicyConfig
from tsa_fast.distill.protocols import Model

IGNORE_INDEX = -100
PROMPT_LENGTHS = "prompt_lengths"  # a split's (M,) int64 key: the tokens of row m's prompt (chat data)
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
    sequences: Tensor, prompt_tokens: int | Tensor, eos_id: int | None = None, ignore_index: int = IGNORE_INDEX
) -> dict[str, Tensor]:
    """The next-token batch of `sequences` (B, L) int64, each row its prompt then its continuation:
    `input_ids` = sequences, `labels` (B, L) = the next token at each position, ignore_index at the positions
    that predict a prompt token, at the positions past the continuation, and after the first eos_id of the
    continuation.

    prompt_tokens an int P: every row's prompt is its first P tokens and its continuation the other L - P.
    prompt_tokens a (B,) int64 tensor of prompt lengths p_i (rows as `right_aligned` gives them): row i is its
    prompt (p_i tokens), its continuation of T = L - max(p) tokens, then padding; the batch also has
    `attention_mask` (B, L) bool, True on the p_i + T tokens, and PROMPT_LENGTHS. Raises ValueError unless every
    prompt length is in [1, L)."""
    if sequences.dim() != 2 or sequences.dtype != torch.int64:
        raise ValueError(f"sequences must be (B, L) int64, got {sequences.dtype} of shape {tuple(sequences.shape)}")
    batch_size, length = sequences.shape
    padded = isinstance(prompt_tokens, Tensor)
    lengths = (prompt_tokens if padded else torch.full((batch_size,), prompt_tokens)).to(sequences.device)
    if padded:  # one host read of the lengths; an int prompt needs none
        low, high = (int(lengths.min()), int(lengths.max())) if batch_size else (1, 1)
    else:
        low = high = prompt_tokens
    if not 1 <= low <= high < length:
        shown = f"{low}..{high}" if padded else prompt_tokens
        raise ValueError(f"prompt_tokens must be in [1, {length}) for sequences of length {length}, got {shown}")
    new = length - high
    # Position j predicts token j + 1: counted from the last prompt token to the one before the continuation's end.
    positions = torch.arange(length - 1, device=sequences.device)
    first = lengths.unsqueeze(1) - 1
    counted = (positions >= first) & (positions < first + new)
    labels = torch.full_like(sequences, ignore_index)
    labels[:, :-1] = torch.where(counted, sequences[:, 1:], ignore_index)
    if eos_id is not None:
        is_eos = counted & (labels[:, :-1] == eos_id)
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
        labels[:, :-1].masked_fill_(after_eos, ignore_index)
    batch = {"input_ids": sequences, "labels": labels}
    if padded:
        columns = torch.arange(length, device=sequences.device)
        batch["attention_mask"] = columns < (lengths + new).unsqueeze(1)
        batch[PROMPT_LENGTHS] = lengths
    return batch


def left_padded_prompts(input_ids: Tensor, prompt_lengths: Tensor, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Row i's first prompt_lengths[i] tokens, right-aligned in (B, P), P the longest prompt: (prompts (B, P)
    int64, pad_id on the left; attention_mask (B, P) bool, False on the padding), what `generate` takes.
    Raises ValueError unless every prompt length is in [1, input_ids.shape[1]]."""
    lengths = prompt_lengths.to(input_ids.device)
    low, high = int(lengths.min()), int(lengths.max())
    if not 1 <= low <= high <= input_ids.shape[1]:
        raise ValueError(f"prompt lengths must be in [1, {input_ids.shape[1]}] (the rows' tokens), got {low}..{high}")
    source = torch.arange(high, device=input_ids.device) - (high - lengths).unsqueeze(1)  # input column per slot
    mask = source >= 0
    prompts = torch.where(mask, input_ids.gather(1, source.clamp(min=0)), pad_id)
    return prompts, mask


def right_aligned(sequences: Tensor, prompt_lengths: Tensor) -> Tensor:
    """The sequences that `generate` made of `left_padded_prompts` (B, P + T), each row shifted left by its
    padding (P - prompt_lengths[i]) so that it starts with its prompt; the padding moves to its end."""
    width = sequences.shape[1]
    shift = int(prompt_lengths.max()) - prompt_lengths.to(sequences.device)
    index = (torch.arange(width, device=sequences.device) + shift.unsqueeze(1)) % width
    return sequences.gather(1, index)


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
    attention_mask: Tensor | None = None,
) -> Tensor:
    """prompts (B, P) (left-padded where attention_mask is given) continued by `model.generate` for exactly
    max_new_tokens steps (no early stop: see the module docstring), without gradient: (B, P + max_new_tokens)
    int64, a tensor autograd can use."""
    with torch.no_grad():
        sequences = model.generate(
            prompts, max_new_tokens, temperature=temperature, generator=generator, attention_mask=attention_mask
        )
    return sequences.clone()  # out of inference mode: the student's embedding saves it for backward


def continuations_of(
    model: Model,
    batch: dict[str, Tensor],
    prompt_tokens: int,
    max_new_tokens: int | None,
    *,
    temperature: float,
    generator: torch.Generator | None,
    eos_id: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Tensor]:
    """`model`'s continuations of the batch's prompts as a `continuation_batch`: the first prompt_tokens of each
    row, continued for max_new_tokens steps (None: the rest of the sequence); with PROMPT_LENGTHS in the batch,
    each row's own prompt (left-padded for generation, then `right_aligned`), continued for max_new_tokens
    steps. Raises ValueError for a prompt that does not fit (`prompts_of`, `new_tokens`; generate's own checks
    name the model's context) and, with PROMPT_LENGTHS, for max_new_tokens None."""
    lengths = batch.get(PROMPT_LENGTHS)
    if lengths is None:
        prompts, mask = prompts_of(batch, prompt_tokens), None
        steps = new_tokens(max_new_tokens, batch["input_ids"].shape[1], prompt_tokens)
    else:
        if max_new_tokens is None:
            raise ValueError(
                "max_new_tokens must be given for prompts of different lengths (every rank generates the same steps)"
            )
        prompts, mask = left_padded_prompts(batch["input_ids"], lengths)
        steps = max_new_tokens
    sequences = generate_continuations(
        model, prompts, steps, temperature=temperature, generator=generator, attention_mask=mask
    )
    if lengths is None:
        return continuation_batch(sequences, prompt_tokens, eos_id, ignore_index)
    return continuation_batch(right_aligned(sequences, lengths), lengths, eos_id, ignore_index)


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
    first config.prompt_tokens of each row, or with PROMPT_LENGTHS each row's own prompt), sampled at
    config.sample_temperature with `generator`, as a `continuation_batch` (labels on the generated tokens only)
    with "on_policy" set. Raises ValueError for a prompt that does not fit (see `continuations_of`)."""
    out = continuations_of(
        model,
        batch,
        config.prompt_tokens,
        config.max_new_tokens,
        temperature=config.sample_temperature,
        generator=generator,
        eos_id=eos_id,
        ignore_index=ignore_index,
    )
    return {**out, "on_policy": True}
