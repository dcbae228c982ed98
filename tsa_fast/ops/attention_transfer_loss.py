"""`attention_transfer_loss`: KL(A_t || A_s) between a teacher's and a student's attention distributions
(TinyBERT, MiniLM; MiniLM-v2 relations with `relation_heads`), without the N x N attention maps.

The per-row KL is a `torch.library` custom op, `tsa_fast::attention_transfer_rows`, on the Triton kernels
(CUDA) or the C++ kernels of `tsa_fast._C` (CPU, OpenMP): the forward writes the per-row KL and the two
log-sum-exps (O(B x H x N)), the backward is a second custom op that recomputes the scores block by block
and folds the gradient into dq_s and dk_s. `torch.compile(fullgraph=True)` traces both without a graph
break; the reduction over rows is plain PyTorch around them. The torch backend is the reference, which
materializes the maps.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor

from tsa_fast.backends import cpp_extension, select_backend, select_triton_or_torch, triton_kernels
from tsa_fast.ops.attention import check_head_tensor, check_key_padding_mask
from tsa_fast.ops.checks import DTYPE_CODES, check_bool, check_choice, check_int, check_real
from tsa_fast.reference import attention_transfer_loss as reference  # the module
from tsa_fast.reference.attention_transfer_loss import REDUCTIONS, default_scale, relation_heads_split
from tsa_fast.reference.distillation_loss import reduce_rows


def attention_transfer_loss(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale_s: float | None = None,
    scale_t: float | None = None,
    relation_heads: int | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Mean (or sum) over (batch, head, counted query row) of KL(A_t || A_s), A = softmax(q k^T * scale + mask).

    Args:
        q_s, k_s: the student's queries (B, H_s, N_q, D_s) and keys (B, H_s, N_k, D_s), one dtype of
            float32/float16/bfloat16 (float64 runs the reference). Receive the gradient.
        q_t, k_t: the teacher's (B, H_t, N_q, D_t) and (B, H_t, N_k, D_t), on the same device; constants.
            H_t must equal H_s unless relation_heads is set. `(v, v)` as (q, k) gives a value relation.
        causal: key j is visible to query i only if j <= i + N_k - N_q (aligned bottom-right).
        key_padding_mask: (B, N_k) bool, True = keep. Masked keys leave both distributions; in
            self-attention (N_q == N_k) the row of a masked position does not count either.
        scale_s, scale_t: finite > 0; default 1/sqrt(D) of each model (after a relation split, 1/sqrt(d_r)).
        relation_heads: R: each model's heads are concatenated and split into R heads of d_r = H * D / R
            (R must divide H * D of both models).
        reduction: "mean" over the rows that count (0, with zero gradients, when none does) or "sum". A
            query row counts when it has a visible key and is not padding.

    Returns: the float32 loss (float64 for float64 inputs), a scalar.

    Non-finite inputs: a NaN or infinite teacher score that a counted row sees (a NaN or inf in q_t / k_t), or
    a counted row whose teacher scores are all -inf, makes the loss NaN and the gradients NaN where that row
    reaches them, on every backend (as PyTorch's math does). Masked keys are never part of the result.

    Raises:
        TypeError: a non-tensor input, or an option of the wrong type (causal not a bool, a scale not a
            number, relation_heads not an int, reduction not a string), naming it. ValueError: a bad shape,
            dtype, device, mask, or option value, naming the offending values.
    """
    _check_inputs(q_s, k_s, q_t, k_t, key_padding_mask, relation_heads)
    _check_options(causal, scale_s, scale_t, reduction)
    q_t, k_t = q_t.detach(), k_t.detach()
    if kernel_backend(q_s, q_t) == "torch":
        return reference.attention_transfer_loss(
            q_s,
            k_s,
            q_t,
            k_t,
            causal=causal,
            key_padding_mask=key_padding_mask,
            scale_s=scale_s,
            scale_t=scale_t,
            relation_heads=relation_heads,
            reduction=reduction,
        )
    if relation_heads is not None:
        q_s, k_s, q_t, k_t = (relation_heads_split(x, relation_heads) for x in (q_s, k_s, q_t, k_t))
    rows, lse_s, _ = torch.ops.tsa_fast.attention_transfer_rows(
        q_s,
        k_s,
        q_t,
        k_t,
        key_padding_mask,
        causal,
        default_scale(q_s) if scale_s is None else float(scale_s),
        default_scale(q_t) if scale_t is None else float(scale_t),
    )
    return reduce_rows(rows, lse_s > -math.inf, reduction, rows.shape)  # lse = -inf: the row does not count


# The keyword options of the loss and their defaults (the module takes all but the per-batch mask).
TRANSFER_OPTIONS = {
    name: p.default
    for name, p in inspect.signature(attention_transfer_loss).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name != "key_padding_mask"
}


def kernel_backend(q_s: Tensor, q_t: Tensor) -> str:
    """The backend `select_backend` picks; the C++ kernels are CPU-only, so on CUDA triton or torch. float64
    always runs the reference."""
    dtype = torch.float64 if torch.float64 in (q_s.dtype, q_t.dtype) else q_s.dtype
    if q_s.device.type == "cpu":
        return select_backend(q_s.device, dtype)
    return select_triton_or_torch(q_s.device, dtype)


def _check_inputs(q_s, k_s, q_t, k_t, key_padding_mask, relation_heads) -> None:
    """Shapes, dtypes and devices of the four tensors and the mask; relation_heads against the head sizes."""
    named = {"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}
    for name, x in named.items():
        check_head_tensor(name, x, ("q_s", q_s))
    for model, (q_name, k_name) in (("student", ("q_s", "k_s")), ("teacher", ("q_t", "k_t"))):
        q, k = named[q_name], named[k_name]
        if q.dtype != k.dtype:
            raise ValueError(f"{q_name} and {k_name} must share a dtype, got {q.dtype} and {k.dtype}")
        if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
            raise ValueError(
                f"{q_name} {tuple(q.shape)} and {k_name} {tuple(k.shape)} must share B, H and D (the {model}'s heads)"
            )
    if (q_s.shape[0], q_s.shape[2], k_s.shape[2]) != (q_t.shape[0], q_t.shape[2], k_t.shape[2]):
        raise ValueError(
            f"student and teacher must share B, N_q, N_k: q_s {tuple(q_s.shape)}, k_s {tuple(k_s.shape)}, "
            f"q_t {tuple(q_t.shape)}, k_t {tuple(k_t.shape)}"
        )
    if relation_heads is None:
        if q_s.shape[1] != q_t.shape[1]:
            raise ValueError(
                f"student has {q_s.shape[1]} heads and teacher {q_t.shape[1]}: pass relation_heads=R to compare "
                "R relation heads of each (R dividing H * D of both)"
            )
    else:
        check_int("relation_heads", relation_heads)
        if relation_heads < 1:
            raise ValueError(f"relation_heads must be None or >= 1, got {relation_heads!r}")
        for model, q in (("student", q_s), ("teacher", q_t)):
            if q.shape[1] * q.shape[3] % relation_heads:
                raise ValueError(
                    f"relation_heads={relation_heads} must divide the {model}'s H * D = "
                    f"{q.shape[1]} * {q.shape[3]} = {q.shape[1] * q.shape[3]}"
                )
    check_key_padding_mask(key_padding_mask, k_s.shape[0], k_s.shape[2], ("q_s", q_s))


def _check_options(causal, scale_s, scale_t, reduction) -> None:
    check_bool("causal", causal)
    for name, scale in (("scale_s", scale_s), ("scale_t", scale_t)):
        if scale is not None:
            check_real(name, scale)
            if not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"{name} must be None or finite and > 0, got {scale!r}")
    check_choice("reduction", reduction, REDUCTIONS)


@torch.library.custom_op("tsa_fast::attention_transfer_rows", mutates_args=())
def attention_transfer_rows(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale_s: float,
    scale_t: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row KL(A_t || A_s), lse_s, lse_t: (B, H, N_q) float32 each (kl 0 and lse -inf where a row does not
    count), by the triton or cpp kernels. Differentiable w.r.t. q_s and k_s."""
    kl, lse_s, lse_t = (q_s.new_empty(q_s.shape[:3], dtype=torch.float32) for _ in range(3))
    forward, _ = _kernels(q_s, q_t)
    forward(q_s, k_s, q_t, k_t, key_padding_mask, kl, lse_s, lse_t, causal, scale_s, scale_t)
    return kl, lse_s, lse_t


@attention_transfer_rows.register_fake
def _(q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t):
    return tuple(q_s.new_empty(q_s.shape[:3], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("tsa_fast::attention_transfer_rows_backward", mutates_args=())
def attention_transfer_rows_backward(
    grad_rows: Tensor,
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    key_padding_mask: Tensor | None,
    lse_s: Tensor,
    lse_t: Tensor,
    causal: bool,
    scale_s: float,
    scale_t: float,
) -> tuple[Tensor, Tensor]:
    """(dq_s, dk_s): the gradient of sum(grad_rows * kl) w.r.t. q_s and k_s, recomputing the scores."""
    dq_s, dk_s = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q_s, k_s))
    _, backward = _kernels(q_s, q_t)
    backward(
        q_s,
        k_s,
        q_t,
        k_t,
        key_padding_mask,
        lse_s,
        lse_t,
        grad_rows.float().contiguous(),
        dq_s,
        dk_s,
        causal,
        scale_s,
        scale_t,
    )
    return dq_s, dk_s


@attention_transfer_rows_backward.register_fake
def _(grad_rows, q_s, k_s, q_t, k_t, key_padding_mask, lse_s, lse_t, causal, scale_s, scale_t):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q_s, k_s))


def _setup_context(ctx, inputs, output):
    q_s, k_s, q_t, k_t, key_padding_mask, causal, scale_s, scale_t = inputs
    _, lse_s, lse_t = output
    ctx.mark_non_differentiable(lse_s, lse_t)
    ctx.save_for_backward(q_s, k_s, q_t, k_t, key_padding_mask, lse_s, lse_t)
    ctx.options = (causal, scale_s, scale_t)


def _backward(ctx, grad_rows, _grad_lse_s, _grad_lse_t):
    dq_s, dk_s = torch.ops.tsa_fast.attention_transfer_rows_backward(grad_rows, *ctx.saved_tensors, *ctx.options)
    return dq_s, dk_s, None, None, None, None, None, None


attention_transfer_rows.register_autograd(_backward, setup_context=_setup_context)


def _kernels(q_s: Tensor, q_t: Tensor):
    """The (forward, backward) launchers of the selected backend, with one contract (the Triton launchers')."""
    backend = kernel_backend(q_s, q_t)
    if backend == "torch":
        raise ValueError(f"no kernel backend for {q_s.dtype} on {q_s.device.type}: call attention_transfer_loss")
    if backend == "cpp":
        return _cpp_forward, _cpp_backward
    return triton_kernels.attention_transfer_forward, triton_kernels.attention_transfer_backward


def _cpp_forward(q_s, k_s, q_t, k_t, key_padding_mask, kl, lse_s, lse_t, causal, scale_s, scale_t):
    _run_cpp(
        cpp_extension.attention_transfer_forward_cpu,
        q_s,
        k_s,
        q_t,
        k_t,
        key_padding_mask,
        causal,
        scale_s,
        scale_t,
        kl=kl,
        lse_s=lse_s,
        lse_t=lse_t,
    )


def _cpp_backward(
    q_s, k_s, q_t, k_t, key_padding_mask, lse_s, lse_t, row_weights, dq_s, dk_s, causal, scale_s, scale_t
):
    _run_cpp(
        cpp_extension.attention_transfer_backward_cpu,
        q_s,
        k_s,
        q_t,
        k_t,
        key_padding_mask,
        causal,
        scale_s,
        scale_t,
        lse_s=lse_s,
        lse_t=lse_t,
        row_weights=row_weights,
        dq_s=dq_s,
        dk_s=dk_s,
    )


def _run_cpp(
    kernel,
    q_s,
    k_s,
    q_t,
    k_t,
    key_padding_mask,
    causal,
    scale_s,
    scale_t,
    *,
    lse_s,
    lse_t,
    kl=None,
    row_weights=None,
    dq_s=None,
    dk_s=None,
):
    """Call a kernel of `tsa_fast._C` with raw pointers. It needs a unit head-dim stride (inputs without one
    are copied; the outputs are allocated with one) and a unit column stride of the mask; other strides are
    free. The forward writes kl, lse_s, lse_t; the backward reads lse_s, lse_t, row_weights, writes dq_s, dk_s."""

    def head(x: Tensor | None) -> tuple[int, int, int, int, int]:
        """(data_ptr, dtype code, stride_b, stride_h, stride_n), zeros for an absent tensor."""
        return (0,) * 5 if x is None else (x.data_ptr(), DTYPE_CODES[x.dtype], *x.stride()[:3])

    q_s, k_s, q_t, k_t = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_s, k_s, q_t, k_t))
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    batch, heads, n_q, d_s = q_s.shape
    pointer = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
    kernel(
        head(q_s),
        head(k_s),
        head(q_t),
        head(k_t),
        pointer(mask),
        0 if mask is None else mask.stride(0),
        batch,
        heads,
        n_q,
        k_s.shape[2],
        d_s,
        q_t.shape[3],
        scale_s,
        scale_t,
        causal,
        pointer(kl),
        pointer(lse_s),
        pointer(lse_t),
        pointer(row_weights),
        head(dq_s),
        head(dk_s),
    )
