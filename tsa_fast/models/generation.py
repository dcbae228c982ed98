"""Generation: continue a batch of prompts one token at a time, with a KV cache.

    ids = model.generate(prompt_ids, 64, temperature=0.8, top_p=0.95, eos_id=eos, generator=g)

One forward of the prompts fills the cache (`Transformer.decode`), then each step feeds the B tokens just
chosen, attending to the cached keys and values through the model's attention. Prompts of different lengths
are left-padded (attention_mask 0 before each row's first real token): padding is masked out of every key,
and positions count from each row's first real token, so that a row generates what its prompt alone would.
Sampling (`next_token`) divides the logits by the temperature, keeps the top_k most likely tokens, then the
smallest set whose probability reaches top_p (nucleus), and draws from what is left with `generator`;
temperature 0 is greedy (argmax). `check_arguments` and `eval_mode` are shared with
`tsa_fast.integrations.hf.HFModel.generate`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tsa_fast.ops.checks import is_real


class KVCache:
    """The keys and values of every block during generation: keys[i] and values[i] are (B, H, max_len,
    head_dim) for block i, allocated by its first `append` (in the dtype and on the device of the keys it
    gets), of which positions [0, length) are filled, the same in every block. `Transformer.decode` appends
    to it."""

    def __init__(self, n_layers: int, max_len: int):
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k and v (B, H, n, head_dim) at positions [length, length + n) of block `layer`; returns its
        keys and values so far, views (B, H, length + n, head_dim). `length` moves on in `advance`."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the cache holds max_len={self.max_len} positions, {end} needed")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros((*k.shape[:2], self.max_len, k.shape[3]))
            self.values[layer] = v.new_zeros((*v.shape[:2], self.max_len, v.shape[3]))
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        """Count the n positions every block has just appended."""
        self.length += n


def check_arguments(
    prompt_ids,
    max_new_tokens,
    *,
    temperature,
    top_k,
    top_p,
    eos_id,
    attention_mask,
    generator,
    vocab_size: int,
    context: tuple[str, int],
) -> Tensor | None:
    """Check generation arguments (see `generate`) against a model of `vocab_size` tokens whose context is
    context = (its config's name for it, the longest sequence); returns attention_mask as a (B, N) bool
    tensor, True = real token, or None when nothing is padded (None given, or all ones). Raises TypeError
    for a prompt or mask that is not a tensor and a generator that is not a torch.Generator, ValueError
    naming the argument for any other bad value."""
    if not isinstance(prompt_ids, Tensor):
        raise TypeError(f"prompt_ids must be a torch.Tensor, got {type(prompt_ids).__name__}")
    if prompt_ids.dtype != torch.int64 or prompt_ids.dim() != 2 or prompt_ids.numel() == 0:
        raise ValueError(
            f"prompt_ids must be a non-empty (B, N) int64 tensor, got {prompt_ids.dtype} of shape"
            f" {tuple(prompt_ids.shape)}"
        )
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    name, longest = context
    n = prompt_ids.shape[1]
    if n > longest:
        raise ValueError(f"prompt_ids has {n} tokens, more than the model's context, {name}={longest}")
    if n + max_new_tokens > longest:
        raise ValueError(
            f"the prompt plus max_new_tokens ({n} + {max_new_tokens} tokens) exceeds the model's context,"
            f" {name}={longest}"
        )
    if not is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id must be None or a token id in [0, {vocab_size}), got {eos_id!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if prompt_ids.device.type == "cpu":  # elsewhere the embedding's own check (no host sync here)
        low, high = prompt_ids.min().item(), prompt_ids.max().item()
        if low < 0 or high >= vocab_size:
            raise ValueError(f"prompt_ids must be in [0, {vocab_size}), got min {low}, max {high}")
    return _left_padding(attention_mask, prompt_ids)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _left_padding(attention_mask, prompt_ids: Tensor) -> Tensor | None:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(
            f"attention_mask must be bool or integer (1 = token, 0 = left pad), got {attention_mask.dtype}"
        )
    if attention_mask.shape != prompt_ids.shape or attention_mask.device != prompt_ids.device:
        raise ValueError(
            f"attention_mask must be (B, N) = {tuple(prompt_ids.shape)} on {prompt_ids.device}, like prompt_ids,"
            f" got {tuple(attention_mask.shape)} on {attention_mask.device}"
        )
    keep = attention_mask != 0
    if not keep[:, -1].all():
        raise ValueError("attention_mask must be left padding (0s, then 1s); some row ends with a 0")
    if (keep[:, 1:] < keep[:, :-1]).any():
        raise ValueError("attention_mask must be left padding (0s, then 1s); some row has a 0 after a 1")
    return None if keep.all() else keep


def next_token(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, V) logits -> (B,) int64 token ids: the argmax at temperature 0; else a draw (with `generator`) from
    softmax(logits / temperature) restricted to the top_k largest logits (ties at the k-th all kept) and then
    to the smallest set of most likely tokens whose probability reaches top_p (at least one token)."""
    if temperature == 0:
        return logits.max(dim=-1).indices  # the first maximum, as argmax, faster on CPUs
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        beyond = probs.cumsum(dim=-1) - probs >= top_p  # the tokens before it already reach top_p
        logits = logits.masked_fill(beyond.scatter(-1, order, beyond), -math.inf)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    streamer: Callable[[Tensor], None] | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Continue prompt_ids with up to max_new_tokens tokens of the causal LM `model` (a `Transformer`).

    Args:
        prompt_ids: (B, N) int64, every row ending with its last prompt token.
        max_new_tokens: >= 0; N + max_new_tokens must not exceed the model's max_seq_len.
        temperature: >= 0; 0 is greedy decoding (top_k, top_p and generator then play no part).
        top_k: None or >= 1: sample among the k most likely tokens only.
        top_p: None or in (0, 1]: nucleus sampling, among the most likely tokens holding probability top_p.
        eos_id: None or a token id: a row that emits it is finished and emits eos_id from then on; generation
            stops once every row has.
        attention_mask: None or (B, N) bool / integer, 1 = token, 0 = left padding (all 0s before all 1s).
        generator: the torch.Generator of the draws (on the model's device): the same seed, the same tokens.
        streamer: called with each step's new tokens (B,) int64 as soon as they are chosen.
        use_cache: False recomputes the whole sequence at every step (the reference for the cache).

    Returns: (B, N + T) int64 on prompt_ids' device: the prompts (with their padding) followed by T new tokens
        per row, T = max_new_tokens, or fewer when eos_id stopped every row earlier.

    Runs under torch.inference_mode, in eval mode (no dropout; the model's mode is restored). Raises
    ValueError for a model that is not causal and for bad arguments, naming them (`check_arguments`).
    """
    config = model.config
    if not config.causal:
        raise ValueError("generate needs a causal language model (config.causal=True)")
    keep = check_arguments(
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        attention_mask=attention_mask,
        generator=generator,
        vocab_size=config.vocab_size,
        context=("max_seq_len", config.max_seq_len),
    )
    batch, n = prompt_ids.shape
    total = n + max_new_tokens
    # Each row's positions count its real tokens: 0 from its first one on (padding gets 0, unseen).
    real = torch.ones_like(prompt_ids, dtype=torch.bool) if keep is None else keep
    prompt_positions = (real.cumsum(dim=1) - 1).clamp(min=0)
    steps = torch.arange(1, max_new_tokens + 1, device=prompt_ids.device)
    positions = torch.cat((prompt_positions, prompt_positions[:, -1:] + steps), dim=1)  # (B, total)
    if keep is not None:
        keep = torch.cat((keep, keep.new_ones(batch, max_new_tokens)), dim=1)
    ids = torch.cat((prompt_ids, prompt_ids.new_zeros(batch, max_new_tokens)), dim=1)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)

    def hidden_of_last(length: int, cache: KVCache) -> Tensor:
        """The final hidden state (B, d_model) of position length - 1, feeding what the cache lacks."""
        start = cache.length
        mask = None if keep is None else keep[:, :length]
        return model.decode(ids[:, start:length], positions[:, start:length], cache, mask)[:, -1]

    with eval_mode(model):
        cache = KVCache(config.n_layers, total)
        length = n
        for _ in range(max_new_tokens):
            if not use_cache:
                cache = KVCache(config.n_layers, length)
            token = next_token(model.logits(hidden_of_last(length, cache)), temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            ids[:, length] = token
            length += 1
            if streamer is not None:
                streamer(token)
            if eos_id is not None and finished.all():
                break
    return ids[:, :length]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """A context in which `model` is in eval mode (no dropout); its mode is restored on exit."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)
