"""Hugging Face transformers: `attn_implementation="tsa_fast"` runs the fused attention kernels, and `HFModel`
makes any transformers model a teacher or a student of the distillation engine.

    import tsa_fast.integrations.hf  # registers "tsa_fast"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tsa_fast")

    teacher = HFModel(AutoModelForCausalLM.from_pretrained(name))       # the engine's model protocol
    student = HFModel(layer_subset_student(teacher.model, 2))          # DistilBERT-style: 2 of its blocks
    ids = teacher.generate(prompt_ids, 64, temperature=0)              # transformers' generate, fused attention

Importing this module registers, under "tsa_fast", an attention function with transformers'
`AttentionInterface` and the masks it takes with its `AttentionMaskInterface`, so that every model built on
those interfaces can use it. Plain causal masks (aligned bottom-right, as with a cache that ends at the last
query) and bidirectional masks reach the attention function as the (B, N_k) padding mask alone (or None),
which the kernels apply themselves, with `is_causal` (or the module's `is_causal`) for causality, as for
`flash_attention_2`. Sliding-window masks (Mistral, Qwen2, Gemma 2/3) and padding-free batches (sequences
packed into a row, told apart by `position_ids` that restart, as TRL's padding_free and transformers'
DataCollatorWithFlattening give) reach it as a `KernelMask`, run by the kernels with a window and by
`attention_varlen`; so do batches that come with FlashAttention's `cu_seq_lens_q`, `cu_seq_lens_k`,
`max_length_q`, `max_length_k` and no padding mask. Every other pattern (chunked attention, custom mask
functions, 4D masks passed in) arrives as transformers' SDPA mask and runs transformers' SDPA attention,
as do dropout and position biases. Needs transformers >= 5.4 (its mask interface with q_length, q_offset),
which tsa_fast itself does not need.

The attention function is also where `HFModel` sees q, k and v exactly as the attention uses them (after
rotary embeddings, q/k norms): it records them there for the attention-transfer losses, so that no model is
ever asked for its N x N attention maps (`output_attentions`).
"""

from __future__ import annotations

import copy
import functools
import sys
import weakref
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.generation.streamers import BaseStreamer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from tsa_fast.models import TransformerOutput, every_kth_layer, mean_pool
from tsa_fast.models.generation import check_arguments, eval_mode
from tsa_fast.models.transformer import INIT_STD
from tsa_fast.ops.attention import attention, attention_varlen_prechecked, check_cu_seqlens
from tsa_fast.reference.attention import window_band
from tsa_fast.reference.attention_transfer_loss import visible_keys

NAME = "tsa_fast"
if Version(transformers.__version__) < Version("5.4"):
    raise ImportError(f"tsa_fast.integrations.hf needs transformers >= 5.4, found {transformers.__version__}")

# While an HFModel forward asks for q, k and v: the list `attention_forward` appends them to, call by call.
_recorded_qkv: ContextVar[list[tuple[Tensor, Tensor, Tensor]] | None] = ContextVar("tsa_fast_qkv", default=None)


@dataclass(frozen=True)
class KernelMask:
    """A mask pattern the kernels compute from a few numbers, as `attention_mask` hands it to `attention_forward`:
    causal or bidirectional; a sliding window of `sliding_window` (transformers' meaning: causal, the
    sliding_window keys up to the query's own; bidirectional, the keys within sliding_window of it); sequences
    packed into each row (`cu_seqlens` (S + 1,) int32 over the B x N flattened tokens, `max_seqlen` the longest,
    each attending within itself) or a (B, N_k) bool `padding` mask (True = keep) or neither. `dense()` gives
    transformers' 4D SDPA mask of the same pattern, for the paths the kernels do not take (dropout, a position
    bias)."""

    causal: bool
    sliding_window: int | None
    padding: Tensor | None
    cu_seqlens: Tensor | None
    max_seqlen: int
    dense: Callable[[], Tensor]

    @property
    def window(self) -> tuple[int, int] | None:
        return kernel_window(self.sliding_window, self.causal)


def kernel_window(sliding_window: int | None, causal: bool) -> tuple[int, int] | None:
    """The kernels' window (left, right) of transformers' `sliding_window` (None: none): causal, the
    sliding_window keys up to the query's own, (sliding_window - 1, 0); bidirectional, the keys within
    sliding_window of it, (sliding_window, sliding_window)."""
    if sliding_window is None:
        return None
    return (sliding_window - 1, 0) if causal else (sliding_window, sliding_window)


def _closure(fn) -> dict:
    """The variables a mask function closes over, by name."""
    cells = getattr(fn, "__closure__", None) or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def _made_by(fn, factory: str) -> bool:
    """Whether `fn` is a closure returned by transformers.masking_utils.<factory>."""
    qualname = getattr(fn, "__qualname__", "")
    return getattr(fn, "__module__", None) == "transformers.masking_utils" and qualname.startswith(
        f"{factory}.<locals>."
    )


def _and_parts(fn) -> tuple | None:
    """The mask functions of an `and_masks(...)`, None for another function."""
    return tuple(_closure(fn)["mask_functions"]) if _made_by(fn, "and_masks") else None


def mask_pattern(mask_function) -> tuple[bool, int | None, Tensor | None] | None:
    """(causal, sliding_window, packed_sequence_mask) of the mask functions transformers builds that the kernels
    compute: causal or bidirectional, with a sliding window (sliding_window_causal_mask_function,
    sliding_window_bidirectional_mask_function) or not, with packed sequences (remap_positions_for_packed_sequence
    and packed_sequence_mask_function over them) or not. None for any other function."""
    packed = None
    parts = _and_parts(mask_function)
    if parts is not None and len(parts) == 2:
        remapped, same_sequence = parts
        if _made_by(remapped, "remap_positions_for_packed_sequence") and _made_by(
            same_sequence, "packed_sequence_mask_function"
        ):
            mask_function = _closure(remapped)["mask_function"]
            packed = _closure(same_sequence)["packed_sequence_mask"]
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        return mask_function is causal_mask_function, None, packed
    parts = _and_parts(mask_function)
    if parts is not None and len(parts) == 2:
        overlay, base = parts
        if base is causal_mask_function and _made_by(overlay, "sliding_window_overlay"):
            return True, _closure(overlay)["sliding_window"], packed
        if base is bidirectional_mask_function and _made_by(overlay, "sliding_window_bidirectional_overlay"):
            return False, _closure(overlay)["sliding_window"], packed
    return None


def packed_cu_seqlens(sequence_ids: Tensor) -> tuple[Tensor, int]:
    """(cu_seqlens (S + 1,) int32, longest sequence) of the B x N flattened tokens whose (B, N) `sequence_ids`
    (transformers' packed_sequence_mask) number the sequences packed in each row."""
    batch, n = sequence_ids.shape
    ids = (sequence_ids + n * torch.arange(batch, device=sequence_ids.device)[:, None]).flatten()  # rows apart
    starts = (ids[1:] != ids[:-1]).nonzero().flatten() + 1
    edges = torch.tensor([0], device=ids.device), starts, torch.tensor([ids.numel()], device=ids.device)
    cu_seqlens = torch.cat(edges).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def _kernel_mask(
    batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, local_size, kwargs
) -> KernelMask | None:
    """The `KernelMask` of a sliding-window (transformers passes its local_size with it) or packed pattern that
    ends at the last query (q_offset + q_length = kv_offset + kv_length: the kernels align windows bottom-right),
    else None."""
    pattern = mask_pattern(mask_function)
    ints = all(isinstance(x, int) for x in (q_offset, kv_offset))
    if pattern is None or not ints or q_offset + q_length != kv_offset + kv_length:
        return None
    causal, sliding_window, packed = pattern
    if local_size != sliding_window or (sliding_window is None and packed is None):
        return None
    dense = functools.partial(
        sdpa_mask,
        batch_size,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
        mask_function,
        attention_mask,
        local_size=local_size,
        **dict(kwargs, allow_is_causal_skip=False, allow_is_bidirectional_skip=False),
    )
    if packed is not None:  # transformers packs only without a padding mask or a cache: q_length = kv_length
        cu_seqlens, max_seqlen = packed_cu_seqlens(packed)
        # Checked here, once per forward: every layer then runs attention_varlen_prechecked on them.
        check_cu_seqlens(cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, batch_size * q_length, batch_size * kv_length)
        return KernelMask(causal, sliding_window, None, cu_seqlens, max_seqlen, dense)
    padding = None
    if attention_mask is not None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset : kv_offset + kv_length]
    return KernelMask(causal, sliding_window, padding, None, 0, dense)


def attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    **kwargs,
) -> Tensor | None:
    """The mask for `attention_forward`: None or the (B, N_k) bool padding mask (True = keep) for a plain
    causal or bidirectional pattern; a `KernelMask` for a sliding window or packed sequences (ending at the last
    query); otherwise transformers' 4D bool SDPA mask (True = attend)."""
    bottom_right = isinstance(q_offset, int) and q_offset == kv_length - q_length
    plain = mask_function is bidirectional_mask_function or (mask_function is causal_mask_function and bottom_right)
    if plain and isinstance(kv_offset, int) and kv_offset == 0 and local_size is None:
        return None if attention_mask is None else prepare_padding_mask(attention_mask, kv_length, 0)[:, :kv_length]
    args = (batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, local_size)
    kernel_mask = _kernel_mask(*args, kwargs)
    if kernel_mask is not None:
        return kernel_mask
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)  # always a 4D mask
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
        mask_function,
        attention_mask,
        local_size=local_size,
        **kwargs,
    )


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function contract: query (B, H, N_q, D), key and value (B, H_kv, N_k, D),
    the mask from `attention_mask`; returns the output (B, N_q, H, D_v) and no weights. Inside an `HFModel`
    forward with output_qkv, first records (query, key, value).

    A plain mask runs the kernel, with the layer's `softcap` (Gemma 2) and `sliding_window`, as transformers'
    mask functions read it: causal, the `sliding_window` keys up to the query's own (window
    (sliding_window - 1, 0)); bidirectional, keys within sliding_window of the query (window (sliding_window,
    sliding_window)). A `KernelMask` runs the kernel with its own causality and window (it is the mask eager
    attention would apply), packed sequences through `attention_varlen`; so do FlashAttention's cu_seq_lens_q,
    cu_seq_lens_k, max_length_q, max_length_k kwargs with no padding mask (packed along the B x N tokens).
    Dropout, a position bias or a 4D mask go to transformers' SDPA attention, or with a softcap (which SDPA
    lacks) to eager attention."""
    recorded = _recorded_qkv.get()
    if recorded is not None:
        recorded.append((query, key, value))
    kernel_path = dropout == 0.0 and kwargs.get("position_bias") is None
    tokens = (query.shape[0] * query.shape[2], key.shape[0] * key.shape[2])
    packed = _varlen_kwargs(kwargs, *tokens) if attention_mask is None and kernel_path else None
    if isinstance(attention_mask, KernelMask):
        if kernel_path:
            return _kernel_mask_attention(query, key, value, attention_mask, scaling, kwargs.get("softcap"))
        attention_mask, is_causal = attention_mask.dense(), False
    elif packed is not None:
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        window = kernel_window(kwargs.get("sliding_window"), is_causal)
        return _packed_attention(query, key, value, packed, window, is_causal, scaling, kwargs.get("softcap"))
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = attention_mask is None or attention_mask.dim() == 2
    softcap, sliding_window = kwargs.get("softcap"), kwargs.get("sliding_window")
    window = kernel_window(sliding_window, is_causal)
    if plain and dropout == 0.0 and kwargs.get("position_bias") is None:
        out = attention(
            query,
            key,
            value,
            causal=is_causal,
            softmax_scale=scaling,
            key_padding_mask=attention_mask,
            window=window,
            softcap=softcap,
        )
        return out.transpose(1, 2).contiguous(), None
    if plain:  # dropout or a position bias: the mask spelled out
        attention_mask = visible_keys(query.shape[2], key.shape[2], is_causal, attention_mask, query.device)
        if window is not None:
            attention_mask = attention_mask & window_band(query.shape[2], key.shape[2], window, query.device)
        is_causal = False
    if softcap is not None:
        return _eager_softcapped_attention(module, query, key, value, attention_mask, dropout, scaling, softcap)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


# The FlashAttention varlen kwargs last checked: (weak references to cu_seq_lens_q, cu_seq_lens_k, and their
# versions, max lengths and token counts). A forward hands the same tensors to every layer.
_checked_varlen_kwargs: tuple | None = None


def _varlen_kwargs(kwargs, tokens_q: int, tokens_k: int) -> tuple[Tensor, Tensor, int, int] | None:
    """FlashAttention's varlen kwargs (cu_seq_lens_q, cu_seq_lens_k as int32, max_length_q, max_length_k as
    ints), None unless all four are given. `check_cu_seqlens` checks them against the tokens_q, tokens_k packed
    query and key tokens the first time these tensors come with these lengths (and unchanged in place since),
    so once per forward rather than once per layer."""
    global _checked_varlen_kwargs
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    if any(kwargs.get(name) is None for name in names):
        return None
    cu_q, cu_k, max_q, max_k = (kwargs[name] for name in names)
    packed = cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    seen = (cu_q._version, cu_k._version, *packed[2:], tokens_q, tokens_k)
    last = _checked_varlen_kwargs
    if last is None or last[0]() is not cu_q or last[1]() is not cu_k or last[2] != seen:
        check_cu_seqlens(*packed, tokens_q, tokens_k)
        _checked_varlen_kwargs = (weakref.ref(cu_q), weakref.ref(cu_k), seen)
    return packed


def _kernel_mask_attention(query, key, value, mask: KernelMask, scaling, softcap) -> tuple[Tensor, None]:
    """The kernels on a `KernelMask`'s pattern; output (B, N_q, H, D_v)."""
    if mask.cu_seqlens is not None:
        packed = (mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen)
        return _packed_attention(query, key, value, packed, mask.window, mask.causal, scaling, softcap)
    out = attention(
        query,
        key,
        value,
        causal=mask.causal,
        softmax_scale=scaling,
        key_padding_mask=mask.padding,
        window=mask.window,
        softcap=softcap,
    )
    return out.transpose(1, 2).contiguous(), None


def _packed_attention(query, key, value, packed, window, causal, scaling, softcap) -> tuple[Tensor, None]:
    """`attention_varlen` over the B x N tokens of (B, H, N, D) query, key, value, sequences at the offsets
    `packed` = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), which `check_cu_seqlens` has checked
    (once per forward, not here per layer); output (B, N_q, H, D_v)."""
    (batch, _, n_q, _), d_v = query.shape, value.shape[3]
    q, k, v = (x.transpose(1, 2).flatten(0, 1) for x in (query, key, value))  # (B x N, H, D), views
    options = dict(causal=causal, window=window, softcap=softcap, softmax_scale=scaling)
    out = attention_varlen_prechecked(q, k, v, *packed, **options)
    return out.view(batch, n_q, -1, d_v), None


def _eager_softcapped_attention(module, query, key, value, attention_mask, dropout, scaling, softcap):
    """Eager attention with logit softcapping and a 4D bool mask (True = attend), as transformers' Gemma 2
    eager path; output (B, N_q, H, D_v)."""
    group = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(group, dim=1) for x in (key, value))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = softcap * torch.tanh((query @ key.transpose(-1, -2)) * scale / softcap)
    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Register `attention_forward` and `attention_mask` under `name` (done on import, as "tsa_fast")."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)


# ----------------------------------------------------------------------------------------------------------
# Models of the distillation engine


@dataclass(frozen=True)
class ModelShape:
    """What the engine reads of a model's config (`DistillationObjective`'s layer maps and projection)."""

    n_layers: int
    d_model: int
    n_heads: int


class HFModel(nn.Module):
    """A transformers model (`AutoModel`, `AutoModelForCausalLM`, ...) behind the engine's model protocol, that
    of `tsa_fast.models.Transformer`: a teacher or a student of `Distiller`, `Teachers`,
    `DistillationObjective` and `evaluate`.

    The wrapped model is `.model` (a PreTrainedModel: `.model.save_pretrained(directory)` saves it). It is
    switched to attn_implementation="tsa_fast" (the fused kernels), where q, k and v are recorded for
    `output_qkv`. `forward` runs its base model (`model.base_model`: no LM head, no cache); the heads apply to
    the final hidden states:
    - `logits(hidden)`, `lm_head_weight`: the model's output embeddings (a causal LM; RuntimeError otherwise);
    - `classify(hidden, attention_mask)`: mean pooling over real tokens, then a linear head of `num_classes`
      (created here, N(0, 0.02) weights and zero bias; not part of `.model`).
    `config` is the model's `ModelShape`. `generate` runs the model's own `generate` (on the fused attention)
    with the arguments of `Transformer.generate`.
    """

    def __init__(self, model: PreTrainedModel, num_classes: int | None = None):
        super().__init__()
        model.set_attn_implementation(NAME)
        self.model = model
        text = model.config.get_text_config()
        self.config = ModelShape(text.num_hidden_layers, text.hidden_size, text.num_attention_heads)
        self.classifier = None
        if num_classes is not None:
            self.classifier = nn.Linear(self.config.d_model, num_classes, device=model.device, dtype=model.dtype)
            nn.init.normal_(self.classifier.weight, std=INIT_STD)
            nn.init.zeros_(self.classifier.bias)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """(B, N) ids -> (B, N, d_model): the input embeddings, what `forward` takes as `inputs_embeds`."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
        output_qkv: bool = False,
    ) -> TransformerOutput:
        """Run the base model on `input_ids` (B, N) or `inputs_embeds` (B, N, d_model), exactly one;
        attention_mask (B, N) bool or integer, True / 1 = real token.

        Returns a `TransformerOutput`: `hidden` (B, N, d_model), the last hidden state; `hidden_states`, the
        model's own (the embeddings, then each block's output; where the model ties the last one to the last
        hidden state, as Llama's, after the final norm), when output_hidden_states; `qkv`, per block (q, k, v)
        each (B, H, N, head_dim) as the attention used them (after rotary embeddings; k and v repeated to the
        H query heads under GQA, as `repeat_kv`), when output_qkv.

        Raises ValueError for bad inputs (transformers'), RuntimeError when output_qkv records a number of
        attention calls other than n_layers (a model whose attention bypasses transformers' AttentionInterface).
        """
        recorded = [] if output_qkv else None
        token = _recorded_qkv.set(recorded)
        try:
            out = self.model.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_hidden_states=output_hidden_states,
                use_cache=False,
            )
        finally:
            _recorded_qkv.reset(token)
        qkv = None
        if output_qkv:
            if len(recorded) != self.config.n_layers:
                raise RuntimeError(
                    f"{type(self.model).__name__}: recorded {len(recorded)} attention calls, for "
                    f"{self.config.n_layers} blocks (its attention must use AttentionInterface)"
                )
            qkv = tuple((q, _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])) for q, k, v in recorded)
        return TransformerOutput(out.last_hidden_state, out.hidden_states if output_hidden_states else None, qkv)

    def generate(
        self,
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
        vocab_limit: int | None = None,
    ) -> Tensor:
        """Continue the prompts with the wrapped causal LM's own `generate` (its KV cache, attention
        "tsa_fast"), with the arguments, results and errors of `tsa_fast.models.Transformer.generate`:
        temperature 0 is greedy (do_sample=False), otherwise do_sample with temperature, top_k (None: no top-k
        filter) and top_p (None: 1.0); eos_id (None: no EOS, whatever the model's generation config says) is
        eos_token_id and the pad_token_id of finished rows; attention_mask (1 = token, 0 = left padding); a
        generator seeds the draws (the global RNG is left as it was); streamer gets each step's new tokens
        (B,) int64 on the CPU; vocab_limit K: only tokens below K are generated (an embedding padded past the
        tokenizer's K tokens). The context is the config's max_position_embeddings. In eval mode (restored)."""
        text = self.model.config.get_text_config()
        context = getattr(text, "max_position_embeddings", None) or sys.maxsize
        keep = check_arguments(
            prompt_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
            attention_mask=attention_mask,
            generator=generator,
            vocab_size=text.vocab_size,
            context=("max_position_embeddings", context),
        )
        options = dict(
            max_new_tokens=max_new_tokens,
            attention_mask=torch.ones_like(prompt_ids) if keep is None else keep.long(),
            eos_token_id=eos_id,
            pad_token_id=0 if eos_id is None else eos_id,
            num_beams=1,
            do_sample=temperature > 0,
            streamer=None if streamer is None else _StepStreamer(streamer),
        )
        if vocab_limit is not None and vocab_limit < text.vocab_size:
            options["suppress_tokens"] = list(range(vocab_limit, text.vocab_size))
        if temperature > 0:
            options.update(temperature=float(temperature), top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)
        devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
        with eval_mode(self.model), torch.random.fork_rng(devices):
            if generator is not None:
                torch.manual_seed(int(torch.randint(2**62, (), device=generator.device, generator=generator)))
            return self.model.generate(prompt_ids, **options)

    @property
    def lm_head_weight(self) -> Tensor:
        """The LM head's weight (vocab_size, d_model). Raises RuntimeError for a model without one."""
        return self._lm_head().weight

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., d_model) final hidden states -> (..., vocab_size) logits. Raises RuntimeError without an LM head."""
        return self._lm_head()(hidden)

    def classify(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, N, d_model) final hidden states -> (B, num_classes) logits: the mean over real tokens (all when
        attention_mask is None), then the linear head. Raises RuntimeError without num_classes."""
        if self.classifier is None:
            raise RuntimeError("this HFModel has no classification head: pass num_classes")
        return self.classifier(mean_pool(hidden, None if attention_mask is None else attention_mask.bool()))

    def _lm_head(self) -> nn.Module:
        head = self.model.get_output_embeddings()
        if head is None:
            raise RuntimeError(f"{type(self.model).__name__} has no LM head: load it with AutoModelForCausalLM")
        return head


class _StepStreamer(BaseStreamer):
    """transformers' streamer protocol for a callback of each step's new tokens: `generate` puts the prompt
    first (skipped), then each step's (B,) tokens."""

    def __init__(self, callback: Callable[[Tensor], None]):
        self.callback, self.prompt_seen = callback, False

    def put(self, value: Tensor) -> None:
        if self.prompt_seen:
            self.callback(value)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _repeat_heads(x: Tensor, heads: int) -> Tensor:
    """(B, H_kv, N, D) -> (B, heads, N, D): key/value head h // (heads / H_kv) for query head h, as `repeat_kv`."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


@torch.no_grad()
def layer_subset_student(teacher: PreTrainedModel, layers: int | Sequence[int], **config_updates) -> PreTrainedModel:
    """A DistilBERT-style student: the teacher's class and config with fewer blocks (and `config_updates`, such
    as hidden_dropout_prob=0.0), holding a copy of every teacher weight outside the blocks (embeddings, final
    norm, pooler, heads) and teacher block layers[i] as its block i. An int n stands for
    `every_kth_layer(n_teacher, n)` (6 blocks -> 3: [1, 3, 5]), the blocks that the engine's default layer maps
    pair with the student's. Any model whose blocks are one nn.ModuleList of config.num_hidden_layers works
    (BERT: encoder.layer; Llama: model.layers). The student has the teacher's device, dtype and attention
    implementation, and is in training mode.

    Raises ValueError when layers are not teacher block indices, the teacher has no such ModuleList, or a
    config update names no attribute of the teacher's config.
    """
    n_teacher = teacher.config.num_hidden_layers
    layers = every_kth_layer(n_teacher, layers) if isinstance(layers, int) else list(layers)
    if not layers or not all(isinstance(j, int) and 0 <= j < n_teacher for j in layers):
        raise ValueError(f"layers must be a non-empty list of teacher block indices in [0, {n_teacher}), got {layers}")
    blocks = next(
        (
            name
            for name, module in teacher.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) == n_teacher
        ),
        None,
    )
    if blocks is None:
        raise ValueError(f"{type(teacher).__name__} has no nn.ModuleList of its {n_teacher} blocks")
    unknown = sorted(name for name in config_updates if not hasattr(teacher.config, name))
    if unknown:
        raise ValueError(f"config updates {unknown} are not attributes of {type(teacher.config).__name__}")
    config = copy.deepcopy(teacher.config)
    for name, value in config_updates.items():
        setattr(config, name, value)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):  # per-block attention types (sliding, full)
        config.layer_types = [config.layer_types[j] for j in layers]
    student = type(teacher)._from_config(
        config, attn_implementation=teacher.config._attn_implementation, dtype=teacher.dtype
    )

    def teacher_key(key: str) -> str:  # "<blocks>.<i>.<rest>" -> "<blocks>.<layers[i]>.<rest>"
        if not key.startswith(f"{blocks}."):
            return key
        index, rest = key[len(blocks) + 1 :].split(".", 1)
        return f"{blocks}.{layers[int(index)]}.{rest}"

    weights = teacher.state_dict()
    student.load_state_dict({key: weights[teacher_key(key)] for key in student.state_dict()})
    return student.to(teacher.device).train()


register()
