"""A compact Transformer (nanoGPT style) on tsa_fast's attention: the teacher and the student of the engine.

    x = token_embedding(ids) [+ position_embedding]            learned positions, or rotary on q and k
    x = x + attn_out(attention(split(qkv(attn_norm(x)))))      per block, pre-norm
    x = x + ffn_out(gelu(ffn_in(ffn_norm(x))))
    hidden = final_norm(x);  logits = hidden @ token_embedding.weight.T   (tied)

`causal=True` is a language model (attention `is_causal=True`); `causal=False` a bidirectional encoder whose
padding is masked out of every key. Attention runs through `tsa_fast.scaled_dot_product_attention`: the fused
kernel where it applies, PyTorch's otherwise. The forward returns the final hidden state, not the logits, so
that the fused linear loss can take `hidden` and `lm_head_weight` without materializing N x V logits.

Generation (`generate`, the loop in `tsa_fast.models.generation`) runs the causal LM incrementally: `decode`
feeds new tokens at given positions, each block appending its keys and values to a `KVCache` and attending
to the cached ones through the same attention op.

DeepSpeed: blocks are built one by one (zero.Init partitions each module's parameters as it is built);
initializing the weights again after construction, under zero.Init, must be done inside
`deepspeed.zero.GatheredParameters(model.parameters(), modifier_rank=0)`: call `model.reset_parameters()`.
The tied LM head is used outside the embedding's forward: `logits` gathers it (`gathered`) under ZeRO-3.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from tsa_fast.models import generation
from tsa_fast.ops.attention import scaled_dot_product_attention

ROPE_BASE = 10000.0
INIT_STD = 0.02
CONFIG_FILE, WEIGHTS_FILE, CHECKPOINT_FILE = "config.json", "model.pt", "checkpoint.pt"  # see from_pretrained


class TransformerConfig(BaseModel):
    """The shape of a `Transformer`. Unknown keys, non-positive sizes and bad combinations raise
    pydantic.ValidationError (a ValueError) naming the values."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(8192, gt=0, description="token ids are in [0, vocab_size)")
    max_seq_len: int = Field(128, gt=0, description="the longest sequence N the model accepts")
    d_model: int = Field(256, gt=0, description="hidden size")
    n_layers: int = Field(4, gt=0, description="number of blocks")
    n_heads: int = Field(4, gt=0, description="attention heads; must divide d_model")
    d_ff: int | None = Field(None, gt=0, description="inner size of the feed-forward network; null: 4 * d_model")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="on the embeddings and each residual branch (not the attention weights)"
    )
    positional: Literal["learned", "rotary"] = Field(
        "rotary", description="learned absolute positions added to the tokens, or rotary (RoPE) applied to q and k"
    )
    causal: bool = Field(True, description="true: causal language model; false: bidirectional encoder")
    num_classes: int | None = Field(None, gt=0, description="set: a sequence-classification head (`classify`)")
    norm_eps: float = Field(1e-5, gt=0.0, description="LayerNorm epsilon")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @model_validator(mode="after")
    def _check_heads(self) -> TransformerConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.positional == "rotary" and self.head_dim % 2:
            raise ValueError(
                f"rotary positions need an even head dim, got d_model / n_heads = {self.d_model} / {self.n_heads}"
                f" = {self.head_dim}"
            )
        return self


@dataclass
class TransformerOutput:
    """What `Transformer.forward` returns, all captured in that one pass.

    hidden: (B, N, d_model), the final-normed last hidden state: the input of `logits` and `classify`.
    hidden_states: the embedding output, then each block's output (before the final norm): n_layers + 1
        tensors (B, N, d_model); None unless output_hidden_states.
    qkv: per block, (q, k, v) as its attention used them, each (B, n_heads, N, head_dim), q and k after rotary;
        None unless output_qkv.
    """

    hidden: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    qkv: tuple[tuple[Tensor, Tensor, Tensor], ...] | None = None


def rotary_cos_sin(n: int, head_dim: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin, (N, head_dim / 2) float32, of the rotary angles of positions 0 .. N - 1."""
    return rotary_at(torch.arange(n, device=device), head_dim)


def rotary_at(positions: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos and sin, (*positions.shape, head_dim / 2) float32, of the rotary angles: position p turns pair i by
    p * ROPE_BASE^(-2i / head_dim)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    angles = positions.to(torch.float32)[..., None] * ROPE_BASE**-exponents
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., N, D) with each pair (x[..., i], x[..., i + D/2]) rotated by its position's angle (the
    GPT-NeoX / Llama layout), computed in float32 at least, returned in x's dtype. Then q_i . k_j depends on
    i - j only."""
    x1, x2 = x.chunk(2, dim=-1)  # times the float32 cos and sin: promoted to float32 (float64 stays)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class Block(nn.Module):
    """Pre-norm block: x + attention(LayerNorm(x)), then + FFN(LayerNorm(x)) with a GELU."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d_model = config.d_model
        self.n_heads = config.n_heads
        self.attn_norm = nn.LayerNorm(d_model, eps=config.norm_eps)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.ffn_norm = nn.LayerNorm(d_model, eps=config.norm_eps)
        self.ffn_in = nn.Linear(d_model, config.ffn_dim)
        self.ffn_out = nn.Linear(config.ffn_dim, d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, rotary: tuple[Tensor, Tensor] | None, attn_mask: Tensor | None, is_causal: bool
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """x (B, N, d_model) -> (the block's output (B, N, d_model), (q, k, v) each (B, H, N, head_dim))."""
        q, k, v = self.heads(x, rotary)
        attended = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.residuals(x, attended), (q, k, v)

    def decode(
        self,
        x: Tensor,
        rotary: tuple[Tensor, Tensor] | None,
        cache: generation.KVCache,
        layer: int,
        attn_mask: Tensor | None,
        is_causal: bool,
    ) -> Tensor:
        """forward for n new tokens x (B, n, d_model) that follow the tokens cached in `cache`: their keys and
        values are appended to the cache's block `layer`, and the queries attend to the cached keys as
        attn_mask and is_causal say (see `decode_mask`)."""
        q, k, v = self.heads(x, rotary)
        k, v = cache.append(layer, k, v)
        return self.residuals(x, scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal))

    def heads(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, d_model) -> q, k, v each (B, H, N, head_dim), q and k rotated when rotary = (cos, sin)."""
        batch, n, _ = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(batch, n, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        if rotary is None:
            return qkv.unbind(0)
        q, k = apply_rotary(qkv[:2], *rotary).unbind(0)  # q and k rotated in one pass
        return q, k, qkv[2]

    def residuals(self, x: Tensor, attended: Tensor) -> Tensor:
        """The block's output: x plus the projected attention output attended (B, H, N, head_dim), then plus
        the FFN."""
        batch, n, d_model = x.shape
        x = x + self.dropout(self.attn_out(attended.transpose(1, 2).reshape(batch, n, d_model)))
        return x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x)))))


class Transformer(nn.Module):
    """The model of the module docstring, built from a `TransformerConfig` (kept as `self.config`), GPT-2
    initialized (deterministic given torch's seed)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        learned = config.positional == "learned"
        self.position_embedding = nn.Embedding(config.max_seq_len, config.d_model) if learned else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList()
        for _ in range(config.n_layers):  # one by one, never deep copies: see the module docstring
            self.blocks.append(Block(config))
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.classifier = nn.Linear(config.d_model, config.num_classes) if config.num_classes else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialization: linear and embedding weights N(0, 0.02), the residual projections (attn_out,
        ffn_out) N(0, 0.02 / sqrt(2 * n_layers)), biases 0, LayerNorms 1 and 0."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for block in self.blocks:
            for projection in (block.attn_out, block.ffn_out):
                nn.init.normal_(projection.weight, std=INIT_STD / math.sqrt(2 * self.config.n_layers))

    @property
    def lm_head_weight(self) -> Tensor:
        """The LM head's weight (vocab_size, d_model): the token embedding's, tied."""
        return self.token_embedding.weight

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """(B, N) int64/int32 ids -> (B, N, d_model) token embeddings (before positions): what forward takes as
        `inputs_embeds`. Raises TypeError / ValueError for a bad tensor, N > max_seq_len, or ids outside
        [0, vocab_size) (checked on CPU tensors only, to avoid a device sync)."""
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        self._check_sequence("input_ids", input_ids, 2, "(B, N)")
        if input_ids.device.type == "cpu":
            low, high = input_ids.min().item(), input_ids.max().item()
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids must be in [0, {self.config.vocab_size}), got min {low}, max {high}")
        return self.token_embedding(input_ids)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
        output_qkv: bool = False,
    ) -> TransformerOutput:
        """Run the model on `input_ids` (B, N) or on token embeddings `inputs_embeds` (B, N, d_model), exactly one.

        attention_mask: (B, N) bool or integer, True / nonzero = real token. The encoder masks the other keys
            out of every query. The causal LM needs none for right padding (no real token sees a later one); a
            mask there (left padding) is combined with the causal one and attention goes to PyTorch's SDPA.
        Returns a `TransformerOutput`; logits are `self.logits(out.hidden)`, classes `self.classify(...)`.
        Raises TypeError / ValueError (naming the values) for bad inputs, see `embed_tokens`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            given = "neither" if input_ids is None else "both"
            raise ValueError(f"pass exactly one of input_ids and inputs_embeds, got {given}")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else self._checked_embeds(inputs_embeds)
        batch, n, _ = x.shape
        keep = self._keep_mask(attention_mask, batch, n, x.device)
        if self.position_embedding is not None:
            x = x + self.position_embedding.weight[:n]
        x = self.dropout(x)
        rotary = rotary_cos_sin(n, self.config.head_dim, x.device) if self.config.positional == "rotary" else None
        attn_mask, is_causal = self._attention_mask(keep, n)
        hidden_states, qkv = [x], []
        for block in self.blocks:
            x, block_qkv = block(x, rotary, attn_mask, is_causal)
            if output_hidden_states:
                hidden_states.append(x)
            if output_qkv:
                qkv.append(block_qkv)
        return TransformerOutput(
            hidden=self.final_norm(x),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            qkv=tuple(qkv) if output_qkv else None,
        )

    def decode(
        self, input_ids: Tensor, positions: Tensor, cache: generation.KVCache, keep: Tensor | None = None
    ) -> Tensor:
        """The final hidden states (B, n, d_model) of n tokens input_ids (B, n) that follow the cache.length
        tokens in `cache` (their keys and values are appended to it), causal: the incremental forward of
        generation. positions (B, n) int64: each token's position (learned or rotary; counted per row, so
        that left padding leaves the real tokens' positions as they are alone). keep (B, cache.length + n)
        bool, True = a real token, False = padding that no query attends to; None: all real. No argument
        checks: `generate` makes them."""
        x = self.token_embedding(input_ids)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        rotary = None
        if self.config.positional == "rotary":
            cos, sin = rotary_at(positions, self.config.head_dim)
            rotary = cos[:, None], sin[:, None]  # (B, 1, n, head_dim / 2): the same for every head
        attn_mask, is_causal = decode_mask(keep, input_ids.shape[1], cache.length + input_ids.shape[1], x.device)
        for layer, block in enumerate(self.blocks):
            x = block.decode(x, rotary, cache, layer, attn_mask, is_causal)
        cache.advance(input_ids.shape[1])
        return self.final_norm(x)

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
        use_cache: bool = True,
    ) -> Tensor:
        """Continue the prompts: `tsa_fast.models.generation.generate` on this causal LM (see there for the
        arguments, what it returns and what raises), with a KV cache (use_cache=False recomputes every
        position at each step: the reference that the cache is tested and benchmarked against)."""
        return generation.generate(
            self,
            prompt_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
            attention_mask=attention_mask,
            generator=generator,
            streamer=streamer,
            use_cache=use_cache,
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json (the TransformerConfig) and model.pt (the state dict) into `directory` (created
        if needed): what `from_pretrained` reads. Outside DeepSpeed ZeRO-3 (whose state dict is partitioned)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2))
        torch.save(self.state_dict(), directory / WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> Transformer:
        """The Transformer of `directory`: the config of its config.json with the weights of its model.pt, or
        else of its checkpoint.pt (an engine phase's checkpoint; `checkpoint_state_dict`), loaded with
        weights_only=True, in eval mode. Raises FileNotFoundError naming the missing file, ValueError for a
        config.json that is not a TransformerConfig (pydantic's error) or weights of another shape."""
        directory = Path(directory)
        config_file = directory / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: a Transformer directory has {CONFIG_FILE}")
        weights = next(
            (directory / name for name in (WEIGHTS_FILE, CHECKPOINT_FILE) if (directory / name).is_file()), None
        )
        if weights is None:
            raise FileNotFoundError(f"{directory} has neither {WEIGHTS_FILE} nor {CHECKPOINT_FILE}")
        model = cls(TransformerConfig.model_validate_json(config_file.read_text()))
        loaded = torch.load(weights, map_location=map_location, weights_only=True)
        model.load_state_dict(checkpoint_state_dict(loaded, str(weights)))
        return model.eval()

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., d_model) final hidden states -> (..., vocab_size) logits, through the tied embedding."""
        with gathered(self.lm_head_weight):
            return F.linear(hidden, self.lm_head_weight)

    def classify(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, N, d_model) final hidden states -> (B, num_classes) logits: the mean over real tokens (all when
        attention_mask is None; see forward), then a linear head. Raises RuntimeError without num_classes."""
        if self.classifier is None:
            raise RuntimeError("this Transformer has no classification head: set num_classes in its config")
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be (B, N, d_model), got shape {tuple(hidden.shape)}")
        keep = self._keep_mask(attention_mask, hidden.shape[0], hidden.shape[1], hidden.device)
        return self.classifier(mean_pool(hidden, keep))

    def _checked_embeds(self, inputs_embeds: Tensor) -> Tensor:
        if not isinstance(inputs_embeds, Tensor):
            raise TypeError(f"inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}")
        if not inputs_embeds.is_floating_point():
            raise ValueError(f"inputs_embeds must be a float tensor, got {inputs_embeds.dtype}")
        self._check_sequence("inputs_embeds", inputs_embeds, 3, f"(B, N, d_model={self.config.d_model})")
        if inputs_embeds.shape[2] != self.config.d_model:
            raise ValueError(
                f"inputs_embeds must be (B, N, d_model={self.config.d_model}), got {tuple(inputs_embeds.shape)}"
            )
        return inputs_embeds

    def _check_sequence(self, name: str, x: Tensor, dims: int, layout: str) -> None:
        """x has `dims` dims, B >= 1 and 1 <= N <= max_seq_len."""
        if x.dim() != dims or x.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty {layout} tensor, got shape {tuple(x.shape)}")
        if not 1 <= x.shape[1] <= self.config.max_seq_len:
            raise ValueError(f"{name} has N={x.shape[1]} tokens, must be in [1, max_seq_len={self.config.max_seq_len}]")

    @staticmethod
    def _keep_mask(attention_mask: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor | None:
        """attention_mask as a (B, N) bool tensor, True = real token, or None."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise ValueError(f"attention_mask must be bool or integer (True / 1 = real), got {attention_mask.dtype}")
        if attention_mask.shape != (batch, n):
            raise ValueError(f"attention_mask must be (B, N) = {(batch, n)}, got {tuple(attention_mask.shape)}")
        if attention_mask.device != device:
            raise ValueError(f"attention_mask on {attention_mask.device} but the inputs on {device}")
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0

    def _attention_mask(self, keep: Tensor | None, n: int) -> tuple[Tensor | None, bool]:
        """(attn_mask, is_causal) for scaled_dot_product_attention: a (B, 1, 1, N) key mask for the encoder,
        is_causal for the causal LM, or both as one (B, 1, N, N) mask."""
        if not self.config.causal:
            return (None if keep is None else keep[:, None, None, :]), False
        if keep is None:
            return None, True
        causal = torch.ones(n, n, dtype=torch.bool, device=keep.device).tril()
        return keep[:, None, None, :] & causal, False


def checkpoint_state_dict(loaded: dict, where: str = "checkpoint") -> dict[str, Tensor]:
    """The Transformer state dict in what a checkpoint file holds: a state dict itself (model.pt), {"config",
    "model": state dict} (the engine's cached teachers), or an engine phase checkpoint whose "module" holds
    the model's weights under "model.". Raises ValueError for anything else, naming `where`."""
    if not isinstance(loaded, dict):
        raise ValueError(f"{where}: expected a dict of tensors, got {type(loaded).__name__}")
    if isinstance(loaded.get("module"), dict):
        return {key.removeprefix("model."): v for key, v in loaded["module"].items() if key.startswith("model.")}
    if isinstance(loaded.get("model"), dict):
        return loaded["model"]
    if loaded and all(isinstance(v, Tensor) for v in loaded.values()):
        return loaded
    raise ValueError(f"{where}: not a state dict, a cached teacher or a phase checkpoint (keys {sorted(loaded)[:5]})")


def decode_mask(keep: Tensor | None, n: int, length: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for n causal queries, the last n of `length` positions, against all of them:
    query i sees key j <= i + length - n (bottom-right), where keep (B, length) bool is True (None:
    everywhere), and a padding query sees itself (no query without keys, whose output some SDPA backends
    make NaN; padding outputs are never used). A mask of keys only where that is all (one query), is_causal
    where the cache was empty and nothing is padded (as `forward`), else a (B or 1, 1, n, length) bool mask."""
    if n == 1:
        return (None if keep is None else keep[:, None, None, :]), False
    if keep is None and n == length:
        return None, True
    causal = torch.ones(n, length, dtype=torch.bool, device=device).tril(length - n)
    if keep is None:
        return causal, False
    return keep[:, None, None, :] & causal | causal.triu(length - n), False


def mean_pool(hidden: Tensor, keep: Tensor | None) -> Tensor:
    """(B, N, D) states -> (B, D): the mean over the positions where `keep` (B, N) bool is True (over all N when
    keep is None); a row that keeps nothing gives zeros."""
    if keep is None:
        return hidden.mean(dim=1)
    weights = keep.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def gathered(*params: Tensor | None):
    """A context in which those of `params` that DeepSpeed ZeRO-3 holds partitioned are whole on every rank, for
    a use outside their module's forward; they are partitioned again on exit. Anything else (None, ordinary
    tensors, a parameter DeepSpeed has already gathered for a running forward) is left alone, so that without
    DeepSpeed this is a no-op. Under ZeRO-3 the backward of `F.linear` gathers its weight again by itself."""
    partitioned = [p for p in params if getattr(getattr(p, "ds_status", None), "name", None) == "NOT_AVAILABLE"]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed  # partitioned parameters exist only where it is installed

    return deepspeed.zero.GatheredParameters(partitioned)


def num_parameters(model: nn.Module) -> int:
    """The number of parameter elements of `model`, a tied (shared) parameter counted once; under DeepSpeed
    ZeRO-3 the full count (`ds_numel`), not this rank's shard."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
