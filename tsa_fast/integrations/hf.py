"""Hugging Face transformers: `attn_implementation="tsa_fast"` runs the fused attention kernels.

    import tsa_fast.integrations.hf  # registers "tsa_fast"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tsa_fast")

Importing this module registers, under "tsa_fast", an attention function with transformers'
`AttentionInterface` and the masks it takes with its `AttentionMaskInterface`, so that every model built on
those interfaces can use it. Plain causal masks (aligned bottom-right, as with a cache that ends at the last
query) and bidirectional masks reach the attention function as the (B, N_k) padding mask alone (or None),
which the kernels apply themselves, with `is_causal` (or the module's `is_causal`) for causality, as for
`flash_attention_2`. Every other pattern (sliding windows, chunked or packed sequences, custom mask
functions, 4D masks passed in) arrives as transformers' SDPA mask and runs transformers' SDPA attention,
as do dropout and position biases. Needs transformers >= 5.4 (its mask interface with q_length, q_offset),
which tsa_fast itself does not need.
"""

from __future__ import annotations

import transformers
from packaging.version import Version
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from tsa_fast.ops.attention import attention
from tsa_fast.reference.attention_transfer_loss import visible_keys

NAME = "tsa_fast"
if Version(transformers.__version__) < Version("5.4"):
    raise ImportError(f"tsa_fast.integrations.hf needs transformers >= 5.4, found {transformers.__version__}")


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
    causal or bidirectional pattern; otherwise transformers' 4D bool SDPA mask (True = attend)."""
    bottom_right = isinstance(q_offset, int) and q_offset == kv_length - q_length
    plain = mask_function is bidirectional_mask_function or (mask_function is causal_mask_function and bottom_right)
    if plain and isinstance(kv_offset, int) and kv_offset == 0 and local_size is None:
        return None if attention_mask is None else prepare_padding_mask(attention_mask, kv_length, 0)[:, :kv_length]
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)  # always a 4D mask
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                     local_size=local_size, **kwargs)  # fmt: skip


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
    the mask from `attention_mask`; returns the output (B, N_q, H, D_v) and no weights."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = attention_mask is None or attention_mask.dim() == 2
    if plain and dropout == 0.0 and kwargs.get("position_bias") is None and kwargs.get("softcap") is None:
        out = attention(query, key, value, causal=is_causal, softmax_scale=scaling, key_padding_mask=attention_mask)
        return out.transpose(1, 2).contiguous(), None
    if plain:  # dropout or a position bias: transformers' SDPA attention, with the mask spelled out
        attention_mask = visible_keys(query.shape[2], key.shape[2], is_causal, attention_mask, query.device)
        is_causal = False
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def register(name: str = NAME) -> None:
    """Register `attention_forward` and `attention_mask` under `name` (done on import, as "tsa_fast")."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)


register()
