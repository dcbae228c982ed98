"""`attention` and `scaled_dot_product_attention`: fused attention (FlashAttention-2 style) on the Triton
kernels, a drop-in for `torch.nn.functional.scaled_dot_product_attention`; `attention_varlen`, the same over
packed sequences (flash_attn_varlen_func's layout), behind `tsa_fast::flash_attention_varlen` (and its backward).

The kernels run behind a `torch.library` custom op, `tsa_fast::flash_attention` (output and lse), whose
backward is a second custom op, `tsa_fast::flash_attention_backward`: `torch.compile(fullgraph=True)` traces
both without a graph break. There is no C++ kernel: behind the same ops, the torch backend (the CPU, or a
GPU without Triton) runs PyTorch's fused CPU flash attention where its semantics are this op's and
otherwise the same math in PyTorch over chunks of query rows, both without the N_q x N_k scores; float64
runs the reference, which materializes them. `scaled_dot_product_attention` hands what the op does not cover
to PyTorch's.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from tsa_fast.backends import KERNEL_DTYPES, select_triton_or_torch, triton_kernels
from tsa_fast.ops.checks import FLOAT_DTYPES, check_bool, check_int, check_real, is_real
from tsa_fast.reference import attention as reference  # the module
from tsa_fast.reference.attention_transfer_loss import default_scale

MAX_HEAD_DIM = 256
# PyTorch's own SDPA, captured at import: the fallback must not call the name `F.scaled_dot_product_attention`,
# which a global patch (F.scaled_dot_product_attention = tsa_fast.scaled_dot_product_attention) points back here.
TORCH_SDPA = F.scaled_dot_product_attention


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    return_lse: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(c(q k^T * scale) + mask) v, without the N_q x N_k attention map.

    Args:
        q: queries (B, H, N_q, D); k: keys (B, H_kv, N_k, D); v: values (B, H_kv, N_k, D_v). One dtype of
            float32/float16/bfloat16 (float64 runs the reference), one device, any strides. H must be a
            multiple of H_kv (GQA/MQA: query head h attends with key/value head h // (H / H_kv)); D, D_v <= 256.
        causal: key j is visible to query i only if j <= i + N_k - N_q (aligned bottom-right, as
            FlashAttention: the last query sees every key).
        softmax_scale: finite > 0; default 1 / sqrt(D).
        key_padding_mask: (B, N_k) bool, True = keep. Padded keys are never read: whatever their k and v slots
            hold (NaN, inf) reaches no output, lse or gradient, and their gradients are 0. A NaN or inf in a
            visible key, value or any query propagates, as in PyTorch.
        return_lse: also return lse (B, H, N_q), the log-sum-exp of each row's scaled scores (float32;
            float64 for float64 inputs), differentiable.
        window: (left, right) ints >= -1, FlashAttention's `window_size` (sliding window attention): query i
            sees key j only if i + N_k - N_q - left <= j <= i + N_k - N_q + right (aligned bottom-right, as
            causal); -1 leaves that side unbounded. With causal, right is 0. Key tiles outside every row's
            window are skipped, so the cost falls with the window.
        softcap: finite > 0 (Gemma 2's logit softcapping): the scaled scores x become c(x) = softcap *
            tanh(x / softcap) before the softmax (lse is that of the capped scores); default none (c(x) = x).

    Returns: out (B, H, N_q, D_v) in q's dtype [, lse]. A row with no visible key gives out = 0 and
        lse = -inf, with zero gradients.

    Raises:
        TypeError: a non-tensor input, a flag that is not a bool, a scale or softcap that is not a number or a
            window that is not a pair of ints, naming it.
        ValueError: a bad shape, dtype, device, head count, head dim, mask, scale, window (a side below -1,
            not two sides) or softcap (<= 0, not finite) value, naming the offending values.

    Backends: triton (CUDA; CPU tensors under TRITON_INTERPRET=1 when forced) or torch (the CPU, or a GPU
    without Triton), both in O(B x H x N) extra memory: the torch backend runs PyTorch's fused CPU flash
    attention where its semantics are this op's (D = D_v; not causal, or causal with N_q = N_k; no window or
    softcap; lse not differentiated), else the same math in PyTorch over chunks of query rows
    (`torch_attention_forward`). A forced TSA_FAST_BACKEND=cpp leaves this op on its default backend (it has no
    C++ kernel); float64 runs the reference (which materializes the scores) under any forced backend. On the
    triton backend, up to 16 query rows with no gradient to compute (generation against a
    KV cache) run the decode kernels, split over the keys (`decode_applies`), with the same results.
    """
    _check_inputs(q, k, v, key_padding_mask)
    _check_options(causal, softmax_scale, return_lse)
    _check_window_and_softcap(window, softcap)
    scale = default_scale(q) if softmax_scale is None else float(softmax_scale)
    # float64: the reference, which materializes the scores.
    if q.dtype not in KERNEL_DTYPES:
        out, lse = reference.attention(
            q,
            k,
            v,
            causal=causal,
            softmax_scale=scale,
            key_padding_mask=key_padding_mask,
            return_lse=True,
            window=None if window is None else tuple(int(side) for side in window),
            softcap=None if softcap is None else float(softcap),
        )
    else:
        left, right = (-1, -1) if window is None else (int(side) for side in window)
        cap = 0.0 if softcap is None else float(softcap)
        out, lse = fused_attention(q, k, v, key_padding_mask, causal, scale, left, right, cap)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """A drop-in for `torch.nn.functional.scaled_dot_product_attention`: same arguments, same result.

    This op's path (the Triton kernels where the triton backend applies, CUDA tensors; on the CPU the torch
    backend of `attention`, which never reads padded keys) runs on (B, H, N, D) fp32/fp16/bf16
    inputs with no dropout, no mask or a bool mask that masks keys only (shape (B or 1, 1, 1, N_k), or
    constant along heads and queries: size 1 or stride 0 there), `is_causal` only with N_q == N_k (PyTorch
    aligns it top-left), head dims <= 256. Everything else (dropout, float masks, other shapes) goes to
    PyTorch's, which also raises its own errors for bad arguments. PyTorch's function is the one captured at
    import, so patching PyTorch's name with this one (`F.scaled_dot_product_attention = ...`) works.
    """
    covered, key_padding_mask = _kernel_mask(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if not covered or (kernel_backend(query) == "torch" and query.device.type != "cpu"):  # PyTorch's GPU kernels
        return TORCH_SDPA(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    scale = default_scale(query) if scale is None else float(scale)
    return fused_attention(query, key, value, key_padding_mask, is_causal, scale)[0]


def _kernel_mask(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple[bool, Tensor | None]:
    """Whether the kernels compute this SDPA call, and its attn_mask as a (B, N_k) key padding mask (a view)
    or None. Reads shapes, dtypes and strides only (no host sync)."""
    if not all(isinstance(x, Tensor) and x.dim() == 4 and x.numel() > 0 for x in (query, key, value)):
        return False, None
    (batch, heads, n_q, d), (_, heads_kv, n_k, _), d_v = query.shape, key.shape, value.shape[3]
    if (
        not (isinstance(is_causal, bool) and isinstance(enable_gqa, bool))  # PyTorch's TypeError otherwise
        or dropout_p != 0.0
        or query.dtype not in KERNEL_DTYPES
        or key.dtype != query.dtype
        or value.dtype != query.dtype
        or key.device != query.device
        or value.device != query.device
        or key.shape[:3] != (batch, heads_kv, n_k)
        or value.shape[:3] != key.shape[:3]
        or key.shape[3] != d
        or (heads != heads_kv and not (enable_gqa and heads % heads_kv == 0))
        or max(d, d_v) > MAX_HEAD_DIM
        or (scale is not None and not (is_real(scale) and math.isfinite(scale) and scale > 0))
        or (is_causal and (attn_mask is not None or n_q != n_k))
    ):
        return False, None
    if attn_mask is None:
        return True, None
    if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool or attn_mask.device != query.device:
        return False, None
    if not 2 <= attn_mask.dim() <= 4:  # PyTorch's rule
        return False, None
    # A bool mask that is constant along heads and queries (size 1 or stride 0 there) masks keys only.
    mask = attn_mask[(None,) * (4 - attn_mask.dim())]
    along_heads_and_queries = zip(mask.shape[1:3], mask.stride()[1:3], (heads, n_q))
    keys_only = all(size == 1 or (stride == 0 and size == full) for size, stride, full in along_heads_and_queries)
    if not keys_only or mask.shape[0] not in (1, batch) or mask.shape[3] != n_k:
        return False, None
    return True, mask[:, 0, 0, :].expand(batch, n_k)


def kernel_backend(q: Tensor) -> str:
    """triton or torch (the CPU path of this module; float64, always torch, runs the reference)."""
    return select_triton_or_torch(q.device, q.dtype)


def _check_inputs(q, k, v, key_padding_mask) -> None:
    """Shapes, dtypes and devices of q, k, v and the mask."""
    named = {"q": q, "k": k, "v": v}
    for name, x in named.items():
        check_head_tensor(name, x, ("q", q))
        if x.dtype != q.dtype:
            raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"q, k, v must share B, and k, v must share H_kv and N_k: {shapes}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share the head dim D: {shapes}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"the {q.shape[1]} query heads must be a multiple of the {k.shape[1]} key/value heads: {shapes}"
        )
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {MAX_HEAD_DIM}, got D={q.shape[3]}, D_v={v.shape[3]}")
    check_key_padding_mask(key_padding_mask, k.shape[0], k.shape[2], ("q", q))


def _check_options(causal, softmax_scale, return_lse) -> None:
    """A wrong type is a TypeError naming the option, a bad scale a ValueError."""
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)
    if softmax_scale is not None:
        check_real("softmax_scale", softmax_scale)
        if not math.isfinite(softmax_scale) or softmax_scale <= 0:
            raise ValueError(f"softmax_scale must be None or a finite number > 0, got {softmax_scale!r}")


def _check_window_and_softcap(window, softcap) -> None:
    """window: None or a pair of ints >= -1; softcap: None or a finite number > 0."""
    if window is not None:
        if not isinstance(window, (tuple, list)) or not all(
            isinstance(side, numbers.Integral) and not isinstance(side, bool) for side in window
        ):
            raise TypeError(f"window must be None or a pair of ints (left, right), got {window!r}")
        if len(window) != 2 or min(window) < -1:
            raise ValueError(
                f"window must be (left, right) with each side >= 0, or -1 for unbounded, got {tuple(window)!r}"
            )
    if softcap is not None:
        check_real("softcap", softcap)
        if not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


@torch.library.custom_op("tsa_fast::flash_attention", mutates_args=())
def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    softmax_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(out (B, H, N_q, D_v), lse (B, H, N_q) float32) by the Triton kernels or the torch backend; differentiable
    w.r.t. q, k, v through both outputs. window sides -1 = unbounded, softcap 0 = none."""
    if kernel_backend(q) == "torch":
        window = (window_left, window_right)
        return torch_attention_forward(q, k, v, key_padding_mask, causal, softmax_scale, window, softcap)
    out, lse = _empty_outputs(q, v)
    triton_kernels.attention_forward(
        q, k, v, key_padding_mask, out, lse, causal, softmax_scale, (window_left, window_right), softcap
    )
    return out, lse


def _empty_outputs(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Uninitialized (out (B, H, N_q, D_v) in q's dtype, lse (B, H, N_q) float32), as `flash_attention` and
    `flash_attention_decode` return them."""
    return q.new_empty((*q.shape[:3], v.shape[3])), q.new_empty(q.shape[:3], dtype=torch.float32)


def _fake_attention(q, k, v, key_padding_mask, causal, softmax_scale, window_left=-1, window_right=-1, softcap=0.0):
    """The outputs' shapes and dtypes, for tracing (torch.compile, meta tensors)."""
    return _empty_outputs(q, v)


flash_attention.register_fake(_fake_attention)


@torch.library.custom_op("tsa_fast::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv): the gradient of sum(grad_out * out) + sum(grad_lse * lse) (None: lse unused), recomputing
    the scores."""
    if kernel_backend(q) == "torch":
        window = (window_left, window_right)
        return torch_attention_backward(
            grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, causal, softmax_scale, window, softcap
        )
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float().contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grad_lse = grad_lse.float().contiguous()
    window = (window_left, window_right)
    triton_kernels.attention_backward(
        q, k, v, key_padding_mask, out, lse, grad_out, grad_lse, dq, dk, dv, causal, softmax_scale, window, softcap
    )
    return dq, dk, dv


@flash_attention_backward.register_fake
def _(
    grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, causal, softmax_scale, window_left, window_right, softcap
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, *options = inputs  # causal, softmax_scale, window_left, window_right, softcap
    ctx.set_materialize_grads(False)  # grad_lse stays None when lse is unused (the torch backend's fast path)
    ctx.save_for_backward(q, k, v, key_padding_mask, *output)
    ctx.options = tuple(options)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    if grad_out is None:  # only lse is used
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.tsa_fast.flash_attention_backward(
        grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, *ctx.options
    )
    return dq, dk, dv, None, None, None, None, None, None


flash_attention.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# The decode path (kernels/attention_decode.py): a few query rows against a long KV cache, split over the keys
# (flash-decoding), forward only.

DECODE_MAX_QUERIES = 16


def decode_applies(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the op runs the decode kernels: the triton backend, N_q <= DECODE_MAX_QUERIES, and no gradient to
    compute (grad mode off, or no input that requires one): a gradient takes the full kernels, whose backward
    recomputes what their forward tiles saw."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return q.shape[2] <= DECODE_MAX_QUERIES and not needs_grad and kernel_backend(q) == "triton"


def fused_attention(q, k, v, key_padding_mask, causal, scale, left=-1, right=-1, softcap=0.0) -> tuple[Tensor, Tensor]:
    """(out, lse) by `flash_attention_decode` where `decode_applies`, else by `flash_attention` (same arguments,
    same results)."""
    op = torch.ops.tsa_fast.flash_attention_decode if decode_applies(q, k, v) else torch.ops.tsa_fast.flash_attention
    return op(q, k, v, key_padding_mask, causal, scale, left, right, softcap)


@torch.library.custom_op("tsa_fast::flash_attention_decode", mutates_args=())
def flash_attention_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    softmax_scale: float,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """`flash_attention`'s (out, lse) by the Triton decode kernels (the triton backend only); not differentiable."""
    out, lse = _empty_outputs(q, v)
    triton_kernels.attention_decode_forward(
        q, k, v, key_padding_mask, out, lse, causal, softmax_scale, (window_left, window_right), softcap
    )
    return out, lse


flash_attention_decode.register_fake(_fake_attention)


# ---------------------------------------------------------------------------------------------------
# The torch backend: O(B x H x N) extra memory, no N_q x N_k scores.

# Scores the chunked path holds at once (B x H x rows x N_k fp32, two such buffers in the backward), at least
# MIN_CHUNK_ROWS query rows: 16 MB, a few hundred rows at B = 1, H = 8, N = 4096.
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_ROWS = 16


NO_WINDOW = (-1, -1)


def pytorch_flash_applies(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, window: tuple[int, int] = NO_WINDOW, softcap: float = 0.0
) -> bool:
    """Whether PyTorch's fused CPU flash attention computes this op: CPU tensors, D = D_v, no window, no softcap,
    and not causal or causal with N_q = N_k (its causal mask is aligned top-left, which is bottom-right only
    then). It takes GQA, any strides, fp32/fp16/bf16, an additive key mask (fully masked rows give 0), and
    returns the lse."""
    plain = tuple(window) == NO_WINDOW and softcap == 0.0
    return plain and q.device.type == "cpu" and q.shape[3] == v.shape[3] and (not causal or q.shape[2] == k.shape[2])


def torch_attention_forward(
    q, k, v, key_padding_mask, causal: bool, scale: float, window: tuple[int, int] = NO_WINDOW, softcap: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(out, lse) as `flash_attention` returns them, by PyTorch's fused CPU flash attention where it applies,
    else by `chunked_attention_forward`. Padded keys and values are zeroed first (never read)."""
    if not pytorch_flash_applies(q, k, v, causal, window, softcap):
        return chunked_attention_forward(q, k, v, key_padding_mask, causal, scale, window, softcap)
    k, v = zero_padded_keys(key_padding_mask, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=_additive_key_mask(key_padding_mask, q.dtype), scale=scale
    )
    # It gives a row with no visible key lse = 0 (and out = 0): -inf, as the other backends.
    if key_padding_mask is not None:
        seen = key_padding_mask.cumsum(-1) > 0 if causal else key_padding_mask.any(-1, keepdim=True)
        lse = lse.masked_fill(~seen[:, None, :], -math.inf)
    return out.contiguous(), lse.contiguous()


def torch_attention_backward(
    grad_out,
    grad_lse,
    q,
    k,
    v,
    key_padding_mask,
    out,
    lse,
    causal: bool,
    scale: float,
    window: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `torch_attention_forward`: PyTorch's fused CPU flash backward where the forward ran it
    and lse is not differentiated (grad_lse None), else `chunked_attention_backward`."""
    if grad_lse is not None or not pytorch_flash_applies(q, k, v, causal, window, softcap):
        return chunked_attention_backward(
            grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, causal, scale, window, softcap
        )
    k_read, v_read = zero_padded_keys(key_padding_mask, k, v)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out,
        q,
        k_read,
        v_read,
        out,
        lse.masked_fill(lse == -math.inf, 0.0),  # the lse the forward kernel returned for rows with no key
        0.0,
        causal,
        attn_mask=_additive_key_mask(key_padding_mask, q.dtype),
        scale=scale,
    )
    return dq, dk, dv  # padded keys get no probability, so dk, dv are 0 there


def zero_padded_keys(key_padding_mask: Tensor | None, *tensors: Tensor) -> list[Tensor]:
    """(B, H_kv, N_k, D) tensors with the padded keys' rows set to 0 (copies), so that what those slots hold
    (NaN, inf) meets no product; unchanged without a mask."""
    if key_padding_mask is None:
        return list(tensors)
    padded = ~key_padding_mask[:, None, :, None]
    return [x.masked_fill(padded, 0.0) for x in tensors]


def _additive_key_mask(key_padding_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, 1, 1, N_k): 0 for kept keys, -inf for padded ones, in the inputs' dtype (what PyTorch's flash
    attention takes); None without a mask."""
    if key_padding_mask is None:
        return None
    zeros = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
    return zeros.masked_fill(~key_padding_mask, -math.inf)[:, None, None, :]


def _query_chunks(q: Tensor, n_k: int):
    """(first, last) query rows of each chunk of the chunked path."""
    batch, heads, n_q, _ = q.shape
    rows = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, batch * heads * n_k))
    return [(first, min(n_q, first + rows)) for first in range(0, n_q, rows)]


def _chunk_probabilities(
    q_c, k, first, last, n_q, key_padding_mask, causal, scale, window=NO_WINDOW, softcap=0.0, lse=None
):
    """The probabilities (B, H_kv, G * C, end) of query rows [first, last) (q_c: (B, H_kv, G * C, D) fp32)
    over the keys [0, end) any of them sees (end < N_k when causal or a window's right side bounds them), their
    lse (B, H_kv, G * C), and the softcap's slope 1 - tanh^2(s / softcap) at each score (the backward's chain
    factor; None without softcap or lse): a softmax of the scores in place (one buffer, one exp per score), or
    exp(s - lse) from the given lse (the backward's recomputation). Scores are softcap * tanh(s / softcap) with
    a softcap; causal and the window (left, right) keep key j for query i when i + N_k - N_q - left <= j <=
    i + N_k - N_q + right (aligned bottom-right, a side of -1 unbounded, causal: right = 0)."""
    batch, heads_kv, rows, _ = q_c.shape
    n_k, diagonal = k.shape[2], k.shape[2] - n_q
    left, right = window
    right = 0 if causal else right  # causal: no key right of the diagonal, whatever the window's right side
    end = n_k if right < 0 else min(n_k, max(0, last + diagonal + right))
    s = torch.matmul(q_c * scale, k[:, :, :end].transpose(-1, -2))
    slope = None
    if softcap:
        s.div_(softcap).tanh_()
        slope = None if lse is None else 1.0 - s * s
        s.mul_(softcap)
    chunk = last - first
    view = s.view(batch, heads_kv, rows // chunk, chunk, end)
    if right >= 0 or left >= 0:  # (C, end) bool from a row and a column of indices: key j vs row i's diagonal
        keys = torch.arange(end, device=s.device)[None, :]
        rows_diagonal = torch.arange(first, last, device=s.device)[:, None] + diagonal
        if right >= 0:
            view.masked_fill_(keys > rows_diagonal + right, -math.inf)
        if left >= 0:
            view.masked_fill_(keys < rows_diagonal - left, -math.inf)
    if key_padding_mask is not None:
        view.masked_fill_(~key_padding_mask[:, None, None, None, :end], -math.inf)
    if lse is not None:  # a row with no visible key (lse = -inf) gets p = exp(-inf - 0) = 0, not NaN
        return s.sub_(lse.masked_fill(lse == -math.inf, 0.0)[..., None]).exp_(), lse, end, slope
    if end == 0:
        return s, s.new_full((batch, heads_kv, rows), -math.inf), end, slope
    row_max = s.amax(-1, keepdim=True)
    row_sum = s.sub_(row_max.masked_fill(row_max == -math.inf, 0.0)).exp_().sum(-1, keepdim=True)
    lse = (row_max + row_sum.log()).squeeze(-1)  # -inf for a row with no visible key (max -inf, sum 0)
    return s.div_(row_sum.masked_fill(row_sum == 0, 1.0)), lse, end, slope


def _grouped_rows(x: Tensor, heads_kv: int, first: int, last: int) -> Tensor:
    """Rows [first, last) of a (B, H, N, D) tensor as (B, H_kv, G * C, D) fp32: the G = H / H_kv query heads
    of each key/value head stacked (GQA without repeating k, v)."""
    rows = x[:, :, first:last].float()
    return rows.reshape(x.shape[0], heads_kv, -1, x.shape[3])


def chunked_attention_forward(
    q, k, v, key_padding_mask, causal: bool, scale: float, window: tuple[int, int] = NO_WINDOW, softcap: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(out, lse) in PyTorch, chunks of query rows at a time (the reference's math, in fp32): extra memory
    O(CHUNK_ELEMENTS + B x H x N), whatever N_q, N_k, D, D_v, causal alignment, window, softcap and padding."""
    batch, heads, n_q, _ = q.shape
    heads_kv, n_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    k, v = zero_padded_keys(key_padding_mask, k.float(), v.float())
    out = q.new_empty(batch, heads_kv, heads // heads_kv, n_q, d_v)
    lse = q.new_empty(batch, heads_kv, heads // heads_kv, n_q, dtype=torch.float32)
    for first, last in _query_chunks(q, n_k):
        q_c = _grouped_rows(q, heads_kv, first, last)
        p, lse_c, end, _ = _chunk_probabilities(
            q_c, k, first, last, n_q, key_padding_mask, causal, scale, window, softcap
        )
        out[..., first:last, :] = torch.matmul(p, v[:, :, :end]).view(batch, heads_kv, -1, last - first, d_v)
        lse[..., first:last] = lse_c.view(batch, heads_kv, -1, last - first)
    return out.view(batch, heads, n_q, d_v), lse.view(batch, heads, n_q)


def chunked_attention_backward(
    grad_out,
    grad_lse,
    q,
    k,
    v,
    key_padding_mask,
    out,
    lse,
    causal: bool,
    scale: float,
    window: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `chunked_attention_forward` (grad_lse None: lse unused), recomputing each chunk's
    probabilities from the saved lse: ds = p (do v^T - delta) (times the softcap's slope), delta = rowsum(do *
    out) - dlse."""
    batch, heads, n_q, d = q.shape
    heads_kv, n_k = k.shape[1], k.shape[2]
    k_read, v_read = zero_padded_keys(key_padding_mask, k.float(), v.float())
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    lse = lse.view(batch, heads_kv, -1, n_q)
    for first, last in _query_chunks(q, n_k):
        q_c, do_c = _grouped_rows(q, heads_kv, first, last), _grouped_rows(grad_out, heads_kv, first, last)
        lse_c = lse[..., first:last].reshape(batch, heads_kv, -1)
        p, _, end, slope = _chunk_probabilities(
            q_c, k_read, first, last, n_q, key_padding_mask, causal, scale, window, softcap, lse_c
        )
        dv[:, :, :end] += torch.matmul(p.transpose(-1, -2), do_c)
        delta_c = _grouped_rows(delta[..., None], heads_kv, first, last)
        ds = torch.matmul(do_c, v_read[:, :, :end].transpose(-1, -2)).sub_(delta_c).mul_(p)
        if slope is not None:
            ds.mul_(slope)
        dq[:, :, first:last] = torch.matmul(ds, k_read[:, :, :end]).mul_(scale).view(batch, heads, last - first, d)
        dk[:, :, :end] += torch.matmul(ds.transpose(-1, -2), q_c)
    dk.mul_(scale)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def check_key_padding_mask(key_padding_mask, batch: int, n_k: int, like: tuple[str, Tensor]) -> None:
    """None, or a (B, N_k) bool tensor (True = keep) on the device of `like` = (name, tensor)."""
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must be bool (True = keep), got {key_padding_mask.dtype}")
    if key_padding_mask.shape != (batch, n_k):
        raise ValueError(f"key_padding_mask must be (B, N_k) = {(batch, n_k)}, got {tuple(key_padding_mask.shape)}")
    name, tensor = like
    if key_padding_mask.device != tensor.device:
        raise ValueError(f"key_padding_mask on {key_padding_mask.device} but {name} on {tensor.device}")


def check_head_tensor(name: str, x, like: tuple[str, Tensor]) -> None:
    """A non-empty (B, H, N, D) float tensor on the device of `like` = (name, tensor)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32/float16/bfloat16/float64, got {x.dtype}")
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (B, H, N, D) tensor, got shape {tuple(x.shape)}")
    like_name, like_tensor = like
    if x.device != like_tensor.device:
        raise ValueError(f"{like_name} on {like_tensor.device} but {name} on {x.device}")


# ---------------------------------------------------------------------------------------------------
# Packed sequences (flash_attn_varlen_func's layout).


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = (-1, -1),
    softcap: float | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`attention` over packed sequences, as flash_attn_varlen_func: each sequence attends within itself.

    Args:
        q: (total_q, H, D); k: (total_k, H_kv, D); v: (total_k, H_kv, D_v): the sequences' tokens one after the
            other. Dtypes, devices, strides, GQA and head dims as `attention`'s.
        cu_seqlens_q, cu_seqlens_k: (S + 1,) int32 on q's device, non-decreasing from 0 to total_q, total_k:
            sequence s is query rows cu_seqlens_q[s]:cu_seqlens_q[s + 1] and keys cu_seqlens_k[s]:cu_seqlens_k[s
            + 1] (a sequence may be empty).
        max_seqlen_q, max_seqlen_k: ints at least the longest sequence's query and key counts (the kernels'
            grid; larger only launches idle tiles).
        causal, window, softcap, softmax_scale: `attention`'s, in each sequence (causal and window aligned
            bottom-right in it: key j of sequence s is visible to its query i when j <= i + N_k(s) - N_q(s)).
        return_lse: also return lse (H, total_q) float32 (float64 for float64 inputs), differentiable.

    Returns: out (total_q, H, D_v) in q's dtype [, lse]. Rows of a sequence without keys give out = 0 and
        lse = -inf.

    Raises:
        TypeError: a non-tensor input, a flag that is not a bool, a max_seqlen that is not an int, a scale,
            window or softcap of the wrong type, naming it.
        ValueError: a bad shape, dtype, device or head count; cu_seqlens not int32, not 1-D of one length, not
            starting at 0, decreasing or not ending at the token count; a max_seqlen below the longest sequence;
            a bad scale, window (a side below -1) or softcap (<= 0), naming the offending values.

    Backends: triton, the kernels over a grid of (sequence, query tile) (tiles past a sequence's end return at
    once; no tile crosses two sequences). torch (and float64): `attention` per sequence, in O(N) extra memory
    per sequence but for float64 (the reference's case, as `attention`). Reads cu_seqlens on
    the host once per call (a device sync) to check them; a caller that runs many calls over the same cu_seqlens
    (the layers of a model) checks them once with `check_cu_seqlens` and calls `attention_varlen_prechecked`.
    """
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    options = dict(causal=causal, window=window, softcap=softcap, softmax_scale=softmax_scale, return_lse=return_lse)
    _check_varlen_arguments(args, options)
    bounds = _cu_seqlens_bounds(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.shape[0], k.shape[0])
    return _attention_varlen(args, bounds, options)


def attention_varlen_prechecked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = (-1, -1),
    softcap: float | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """`attention_varlen` for cu_seqlens whose values the caller has checked (`check_cu_seqlens` with total_q =
    q.shape[0], total_k = k.shape[0]): every argument is checked as there (cu_seqlens' type, dtype, shape and
    device, the max_seqlens' type) but the values of cu_seqlens, which are not read on the host: no device sync
    on the triton backend. Values that `check_cu_seqlens` would refuse give undefined results."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    options = dict(causal=causal, window=window, softcap=softcap, softmax_scale=softmax_scale, return_lse=return_lse)
    _check_varlen_arguments(args, options)
    return _attention_varlen(args, None, options)


def _check_varlen_arguments(args: tuple, options: dict) -> None:
    """Every check of `attention_varlen` (args: its positional arguments, options: its keywords) that reads no
    tensor on the host: all but those of the values of cu_seqlens."""
    q, k, v, *sequences = args
    _check_packed_inputs(q, k, v)
    _check_options(options["causal"], options["softmax_scale"], options["return_lse"])
    _check_window_and_softcap(options["window"], options["softcap"])
    _check_cu_seqlens_layout(*sequences, ("q", q.device))


def _attention_varlen(args: tuple, bounds: tuple[list, list] | None, options: dict):
    """`attention_varlen` on checked arguments; bounds: cu_seqlens_q, cu_seqlens_k as lists, or None (then read
    here only where the torch backend needs them)."""
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = args
    causal, softmax_scale, return_lse = options["causal"], options["softmax_scale"], options["return_lse"]
    window, softcap = options["window"], options["softcap"]
    scale = default_scale(q) if softmax_scale is None else float(softmax_scale)
    window = None if window is None else tuple(int(side) for side in window)
    cap = None if softcap is None else float(softcap)
    if q.dtype not in KERNEL_DTYPES or kernel_backend(q) == "torch":
        bounds_q, bounds_k = torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist() if bounds is None else bounds
        options = dict(causal=causal, softmax_scale=scale, window=None if window == (-1, -1) else window, softcap=cap)
        out, lse = reference.per_sequence(attention, q, k, v, bounds_q, bounds_k, **options)
    else:
        left, right = (-1, -1) if window is None else window
        out, lse = torch.ops.tsa_fast.flash_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, left, right, cap or 0.0
        )
    return (out, lse) if return_lse else out


def _check_packed_inputs(q, k, v) -> None:
    """Packed (total, H, D) q, k, v: `_check_inputs`' rules on their (1, H, total, D) views."""
    named = {"q": q, "k": k, "v": v}
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.numel() == 0:
            raise ValueError(f"{name} must be a non-empty packed (total, H, D) tensor, got shape {tuple(x.shape)}")
    _check_inputs(*(x.transpose(0, 1)[None] for x in (q, k, v)), None)


def check_cu_seqlens(
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, total_q: int, total_k: int
) -> tuple[list, list]:
    """cu_seqlens_q, cu_seqlens_k as lists, after `attention_varlen`'s checks of them and of the max_seqlens for
    total_q query rows and total_k keys (reading them on the host: one device sync). Raises its TypeError and
    ValueErrors, naming the argument."""
    _check_cu_seqlens_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None)
    return _cu_seqlens_bounds(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q, total_k)


def _check_cu_seqlens_layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, device) -> None:
    """Types, dtypes, shapes of cu_seqlens and, device = (name, device) or None, their device; the max_seqlens'
    types. Reads nothing on the host."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 (flash_attn_varlen_func's cu_seqlens), got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must be 1-D with S + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
        if device is not None and cu.device != device[1]:
            raise ValueError(f"{name} on {cu.device} but {device[0]} on {device[1]}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have one length (S + 1), got {cu_seqlens_q.shape[0]} and "
            f"{cu_seqlens_k.shape[0]}"
        )
    check_int("max_seqlen_q", max_seqlen_q)
    check_int("max_seqlen_k", max_seqlen_k)


def _cu_seqlens_bounds(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, total_q, total_k) -> tuple[list, list]:
    """cu_seqlens_q, cu_seqlens_k (of a checked layout) as lists, after checking their values: non-decreasing
    from 0 to total_q, total_k, no sequence longer than its max_seqlen."""
    totals = {"cu_seqlens_q": ("total_q", total_q), "cu_seqlens_k": ("total_k", total_k)}
    bounds = torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist()  # one device sync
    for (name, cu), max_name, longest_allowed in zip(
        zip(totals, bounds), ("max_seqlen_q", "max_seqlen_k"), (max_seqlen_q, max_seqlen_k)
    ):
        total_name, total = totals[name]
        lengths = [end - first for first, end in zip(cu, cu[1:])]
        if cu[0] != 0 or cu[-1] != total or min(lengths) < 0:
            raise ValueError(
                f"{name} must be non-decreasing from 0 to {total_name} = {total} (the tokens of {name[-1]}), got "
                f"{cu if len(cu) <= 16 else cu[:8] + ['...'] + cu[-8:]}"
            )
        if max(lengths) > longest_allowed:
            raise ValueError(f"{max_name} = {longest_allowed} is below the longest sequence's {max(lengths)} tokens")
    return bounds[0], bounds[1]


@torch.library.custom_op("tsa_fast::flash_attention_varlen", mutates_args=())
def flash_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
) -> tuple[Tensor, Tensor]:
    """(out (total_q, H, D_v), lse (H, total_q) float32) by the Triton kernels; differentiable w.r.t. q, k, v."""
    out = q.new_empty((*q.shape[:2], v.shape[2]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    sequences = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    window = (window_left, window_right)
    triton_kernels.attention_varlen_forward(q, k, v, *sequences, out, lse, causal, softmax_scale, window, softcap)
    return out, lse


@flash_attention_varlen.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, *window_softcap):
    return q.new_empty((*q.shape[:2], v.shape[2])), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("tsa_fast::flash_attention_varlen_backward", mutates_args=())
def flash_attention_varlen_backward(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `flash_attention_varlen` (grad_lse None: lse unused), recomputing the scores."""
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.float().contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    sequences = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    window = (window_left, window_right)
    triton_kernels.attention_varlen_backward(
        q, k, v, *sequences, out, lse, grad_out, grad_lse, dq, dk, dv, causal, softmax_scale, window, softcap
    )
    return dq, dk, dv


@flash_attention_varlen_backward.register_fake
def _(grad_out, grad_lse, q, k, v, *options):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_varlen_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *options = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, *output)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.options = tuple(options)  # causal, softmax_scale, window_left, window_right, softcap


def _varlen_backward(ctx, grad_out, grad_lse):
    q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse = ctx.saved_tensors
    if grad_out is None:  # only lse is used
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.tsa_fast.flash_attention_varlen_backward(
        grad_out, grad_lse, q, k, v, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlens, out, lse, *ctx.options
    )
    return dq, dk, dv, *(None,) * 9


flash_attention_varlen.register_autograd(_varlen_backward, setup_context=_setup_varlen_context)
