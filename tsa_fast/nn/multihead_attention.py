"""`MultiheadAttention`: a drop-in for `torch.nn.MultiheadAttention` on the fused attention kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsa_fast.ops.attention import MAX_HEAD_DIM, attention, kernel_backend


class MultiheadAttention(nn.MultiheadAttention):
    """`torch.nn.MultiheadAttention` (a subclass: same constructor, parameters, state_dict keys, forward
    arguments and returns) whose attention runs on the fused kernels where the triton backend applies.

    The kernels run for batched fp32/fp16/bf16 inputs with `need_weights=False`, no dropout at this call
    (eval mode or dropout=0), no `add_bias_kv` / `add_zero_attn`, a bool or no `key_padding_mask` (True =
    ignore, as in PyTorch), and no `attn_mask` unless `is_causal=True` hints that it is the causal mask
    (trusted, as PyTorch does). Everything else, including `need_weights=True` (the default: the weights
    are computed the slow way, as PyTorch's does), nested tensors, and shapes PyTorch rejects (it raises its
    own error), runs `torch.nn.MultiheadAttention.forward`. `torch.jit.script` compiles PyTorch's attention on
    the same parameters (see `__prepare_scriptable__`).
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self._fused(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        if self.batch_first:
            query, key, value = _seq_first(query, key, value)
        tgt_len, batch, _ = query.shape
        # The in-projections of torch.nn.MultiheadAttention (one packed GEMM for self-attention).
        if self._qkv_same_embed_dim:
            q, k, v = F._in_projection_packed(query, key, value, self.in_proj_weight, self.in_proj_bias)
        else:
            biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q, k, v = F._in_projection(
                query, key, value, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight, *biases
            )
        # (L, N, E) -> (N, H, L, E / H) views
        q, k, v = (x.view(x.shape[0], batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3) for x in (q, k, v))
        keep = None if key_padding_mask is None else ~key_padding_mask
        out = attention(q, k, v, causal=is_causal, key_padding_mask=keep)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt_len, batch, self.embed_dim))
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _fused(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> bool:
        """Whether this call runs on the kernels (shapes, dtypes and flags only: no host sync). Nested tensors
        and shapes that PyTorch rejects go to its forward, which then gives its own result or error."""
        tensors = (query, key, value)
        if any(x.is_nested for x in tensors) or any(x.dim() != 3 for x in tensors):
            return False
        if need_weights or self.bias_k is not None or self.add_zero_attn or (self.training and self.dropout > 0):
            return False
        seq, batch = (1, 0) if self.batch_first else (0, 1)
        shapes_fit = (
            query.shape[2] == self.embed_dim
            and (key.shape[2], value.shape[2]) == (self.kdim, self.vdim)
            and key.shape[:2] == value.shape[:2]
            and key.shape[batch] == query.shape[batch]
            and key.dtype == value.dtype == query.dtype
        )
        if key_padding_mask is not None:
            mask_shape = (query.shape[batch], key.shape[seq])
            shapes_fit &= key_padding_mask.dtype == torch.bool and key_padding_mask.shape == mask_shape
        if is_causal:  # the hint comes with its mask (PyTorch raises otherwise); L == S aligns it as the kernel
            shapes_fit &= attn_mask is not None and attn_mask.dim() in (2, 3) and query.shape[seq] == key.shape[seq]
        else:
            shapes_fit &= attn_mask is None
        return shapes_fit and self.head_dim <= MAX_HEAD_DIM and kernel_backend(query) == "triton"

    def __prepare_scriptable__(self) -> nn.MultiheadAttention:
        """What torch.jit.script compiles in this module's place: a torch.nn.MultiheadAttention that shares its
        parameters, buffers and settings (TorchScript cannot compile the dispatch to the kernels), so a
        scripted model runs PyTorch's attention with the same weights. Scripting a parent module makes
        PyTorch put that module in the parent's place (its `__prepare_scriptable__` protocol): the parent then
        runs PyTorch's attention in eager mode too, with the same results."""
        plain = nn.MultiheadAttention.__new__(nn.MultiheadAttention)
        plain.__dict__.update(self.__dict__)
        return plain


def _seq_first(*tensors: Tensor) -> list[Tensor]:
    """(N, L, E) -> (L, N, E) views; one tensor passed several times gives one view, so that self-attention
    keeps its packed in-projection."""
    views: dict[int, Tensor] = {}
    return [views.setdefault(id(x), x.transpose(0, 1)) for x in tensors]
