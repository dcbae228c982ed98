"""`fused_linear_distillation_loss`: the distillation loss of a linear head, never materializing logits.

The student logits are `student_hidden @ student_weight.T (+ bias)`; the teacher is hidden + weight
(+ bias), logits, or its top-k `(indices, logprobs)` at temperature T with the rest of its mass as one
tail bucket (see `tsa_fast.reference.fused_linear_distillation_loss`). Rows are processed in chunks: per
chunk both logit tiles are computed in fp32, the fused loss kernel gives the per-row losses and the
logit gradient, and the gradient is folded at once into grad_hidden (that chunk) and grad_weight /
grad_bias. Extra memory is O(chunk_size x V) whatever N is, plus O(V x H) for the weight gradient:

- fp32 weights: an fp32 accumulator (the gradient itself).
- fp16/bf16 weights: the gradient and one more copy in the weight's dtype, a compensated pair that sums
  the chunks at ~2x the dtype's precision (`kernels/fused_linear_distillation_loss.py`), fed PAIR_FOLD_ROWS
  rows of logit gradient at a time. On CUDA the GEMMs read fp16/bf16 operands as they are and write fp32
  results (tensor cores, no fp32 weight copies; the logit gradient is rounded to the weight's dtype for
  them, as in any bf16 backward); on other devices the weights are upcast once per pass.

For a scalar reduction the gradients are computed in the forward pass (backward scales them); for
`reduction="none"` backward recomputes the chunks with the per-row incoming gradients as weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tsa_fast.backends import select_backend, triton_kernels
from tsa_fast.ops.checks import check_choice, check_int, traced
from tsa_fast.ops.distillation_loss import (
    LOSS_OPTIONS,
    ROW_OPTIONS,
    LossParts,
    check_label_range,
    check_labels_tensor,
    check_loss_options,
    check_num_items,
    check_tensor,
    distillation_loss_rows_and_grad,
    reduce_loss_rows,
    row_temperatures,
    rows_and_grad_by_autograd,
)
from tsa_fast.reference.fused_linear_distillation_loss import (
    TOPK_TAILS,
    topk_distillation_loss_rows,
    topk_mass_rounding,
)


def fused_linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    chunk_size: int | None = None,
    topk_tail: str = "bucket",
    num_items_in_batch: int | Tensor | None = None,
    **loss_options,
) -> Tensor:
    """`distillation_loss(student_hidden @ student_weight.T + student_bias, teacher logits, labels, **loss_options)`
    without the N x V logits of either model.

    Args:
        student_hidden: (..., H_s) float; student_weight: (V_s, H_s); student_bias: (V_s,) or None.
        teacher_hidden: (..., H_t) and teacher_weight: (V_t, H_t) (+ teacher_bias (V_t,)); or
        teacher_logits: (..., V_t); or
        teacher_topk: (indices (..., k) int64/int32, distinct per row, logprobs (..., k) float) at
            temperature T, whose probabilities sum to at most 1 (within rounding: 1 + 1e-3 for fp32).
            Exactly one teacher form must be given.
        topk_tail: what a top-k teacher's mass outside its k tokens is: "bucket" (default) one tail bucket
            (1 - sum of the k probabilities; a tail within rounding of 0 is 0, so k = V is the dense loss),
            or "renormalize": no tail, teacher and student each renormalized over the k tokens (TRL's
            server mode). The hard term always uses the student's full distribution.
        labels: (...) or None, as in `distillation_loss`.
        chunk_size: rows per chunk; default `default_chunk_size`: the power of two near N * H_s / V (the
            chunk's logits then take about the memory of the hidden states), at least 256 rows.
        num_items_in_batch: for reduction="mean", the count of counted rows across micro-batches and ranks,
            as in `distillation_loss`.
        **loss_options: the keyword options of `distillation_loss` (same names, defaults and errors).

    Returns: the loss as `distillation_loss` returns it (float32; float64 for float64 inputs); with
    return_parts, `(loss, LossParts(soft, hard))` as there, accumulated from the same chunk pass as the loss
    and its gradients (the top-k teacher forms included).
    Gradients flow to student_hidden, student_weight and student_bias; the teacher is a constant.
    Non-finite values act as in `distillation_loss` on the logits they give: a NaN in a teacher row (hidden
    state, logits, top-k log-probabilities) makes that row's loss NaN, and the gradients it reaches.

    Raises: TypeError for an unknown option or an option of the wrong type (as `distillation_loss`; also
    chunk_size, topk_tail); ValueError for a bad shape, dtype, device, option value, a missing or doubled
    teacher form, a bad chunk_size, or a top-k teacher that is no distribution (indices out of range, or in
    a counted row an index twice or probabilities summing above 1; on CUDA a device-side assert, no host
    sync).
    """
    unknown = sorted(set(loss_options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"unknown loss options {unknown}; valid: {sorted(LOSS_OPTIONS)}")
    options = {**LOSS_OPTIONS, **loss_options}
    teacher = _Teacher.check(
        student_hidden, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk, topk_tail
    )
    check_tensor("student_hidden", student_hidden)
    _check_linear("student", student_weight, student_bias, student_hidden)
    check_labels_tensor(labels, student_hidden.shape[:-1], student_hidden.device)
    vocab = check_loss_options(
        options, student_weight.shape[0], teacher.vocab(student_weight.shape[0]), labels is not None
    )
    if teacher.topk_indices is not None and teacher.topk_indices.shape[-1] > vocab:
        raise ValueError(f"teacher_topk has k={teacher.topk_indices.shape[-1]} > vocabulary size {vocab}")
    n_rows = student_hidden.numel() // student_hidden.shape[-1]
    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, student_hidden.shape[-1], student_weight.shape[0])
    else:
        check_int("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")

    check_num_items(num_items_in_batch, options["reduction"])
    options["temperature"] = row_temperatures(options["temperature"], student_hidden.shape[:-1], student_hidden)
    flat_labels = None if labels is None else labels.reshape(-1)
    if flat_labels is not None:
        check_label_range(flat_labels, vocab, options["ignore_index"])
    if teacher.topk_indices is not None:
        check_topk_teacher(teacher.topk_indices, teacher.topk_logprobs, vocab, flat_labels, options["ignore_index"])
    out = _FusedLinearDistillation.apply(
        student_hidden.reshape(n_rows, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        teacher,
        flat_labels,
        options,
        vocab,
        chunk_size,
        num_items_in_batch,
    )
    leading_shape = student_hidden.shape[:-1]
    loss = out[0].reshape(leading_shape) if options["reduction"] == "none" else out[0]
    if not options["return_parts"]:
        return loss
    counted = None if flat_labels is None else flat_labels != options["ignore_index"]
    parts = (reduce_loss_rows(p, counted, options["reduction"], leading_shape, num_items_in_batch) for p in out[1:])
    return loss, LossParts(*parts)


MIN_CHUNK_ROWS = 256


def default_chunk_size(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: the power of two that makes chunk x V logits cost about as much as the N x H
    hidden states, but at least MIN_CHUNK_ROWS (each chunk streams the V x H weight-gradient
    accumulator once, so tiny chunks would be bound by that traffic), and at most N."""
    balanced = 2 ** round(math.log2(max(1.0, n_rows * hidden / vocab)))
    return max(1, min(n_rows, max(balanced, MIN_CHUNK_ROWS)))


@dataclass
class _Teacher:
    """The teacher in one of its three forms, flattened to rows."""

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    logits: Tensor | None = None
    topk_indices: Tensor | None = None
    topk_logprobs: Tensor | None = None
    topk_tail: str = "bucket"

    @classmethod
    def check(cls, student_hidden, hidden, weight, bias, logits, topk, topk_tail) -> _Teacher:
        check_choice("topk_tail", topk_tail, TOPK_TAILS)
        given = [
            name
            for name, x in (
                ("teacher_hidden/teacher_weight", hidden if hidden is not None else weight),
                ("teacher_logits", logits),
                ("teacher_topk", topk),
            )
            if x is not None
        ]
        if len(given) != 1:
            raise ValueError(f"give exactly one teacher form (hidden + weight, logits or topk), got {given or 'none'}")
        like = ("student_hidden", student_hidden)
        flat = lambda x: x.detach().reshape(-1, x.shape[-1])  # noqa: E731
        if logits is not None:
            check_tensor("teacher_logits", logits, like=like)
            return cls(logits=flat(logits))
        if topk is not None:
            if not isinstance(topk, (tuple, list)) or len(topk) != 2:
                raise ValueError("teacher_topk must be a pair (indices, logprobs)")
            indices, logprobs = topk
            check_tensor("teacher_topk logprobs", logprobs, like=like)
            if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
                raise ValueError(
                    "teacher_topk indices must be an int64/int32 tensor,"
                    f" got {getattr(indices, 'dtype', type(indices))}"
                )
            if indices.shape != logprobs.shape:
                raise ValueError(
                    f"teacher_topk indices {tuple(indices.shape)} and logprobs {tuple(logprobs.shape)} differ in shape"
                )
            return cls(topk_indices=flat(indices).long(), topk_logprobs=flat(logprobs), topk_tail=topk_tail)
        if hidden is None or weight is None:
            raise ValueError("the teacher as hidden states needs both teacher_hidden and teacher_weight")
        check_tensor("teacher_hidden", hidden, like=like)
        _check_linear("teacher", weight, bias, hidden)
        return cls(hidden=flat(hidden), weight=weight.detach(), bias=None if bias is None else bias.detach())

    def vocab(self, student_vocab: int) -> int:
        if self.logits is not None:
            return self.logits.shape[-1]
        return student_vocab if self.weight is None else self.weight.shape[0]

    def rows(
        self, start: int, end: int, weight: Tensor | None, compute_dtype: torch.dtype
    ) -> Tensor | tuple[Tensor, Tensor, str]:
        """The teacher for rows [start, end): logits (N, V_t) (in compute_dtype when computed from the hidden
        states with `weight`, the teacher weight as `_gemm_weight` gives it), or the top-k pair and tail mode."""
        if self.topk_indices is not None:
            return self.topk_indices[start:end], self.topk_logprobs[start:end], self.topk_tail
        if self.logits is not None:
            return self.logits[start:end]
        return _logits(self.hidden[start:end], weight, self.bias, compute_dtype)


def _check_linear(model: str, weight, bias, hidden: Tensor) -> None:
    check_tensor(f"{model}_weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{model}_weight must be (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"{model}_weight on {weight.device} but {model}_hidden on {hidden.device}")
    if bias is not None:
        check_tensor(f"{model}_bias", bias)
        if bias.shape != weight.shape[:1] or bias.device != weight.device:
            raise ValueError(
                f"{model}_bias must be ({weight.shape[0]},) on {weight.device},"
                f" got {tuple(bias.shape)} on {bias.device}"
            )


def check_topk_teacher(indices: Tensor, logprobs: Tensor, vocab: int, labels: Tensor | None, ignore_index: int):
    """A top-k teacher (N, k) must be a distribution: indices in [0, vocab) (every row), and in the rows that
    count no index twice and probabilities summing to at most 1 + 10 x `topk_mass_rounding` (lenient: the
    log-probabilities may have been computed in a lower precision than they are stored in). On CPU a
    ValueError; on CUDA an asynchronous device assert, as `check_label_range`; skipped while torch.compile
    traces."""
    if traced(indices):
        return
    counted = torch.ones_like(indices[:, 0], dtype=torch.bool) if labels is None else labels != ignore_index
    out_of_range = (indices < 0) | (indices >= vocab)
    ordered = indices.sort(-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(-1) & counted
    mass = logprobs.float().exp().sum(-1)
    limit = 1 + 10 * topk_mass_rounding(logprobs.dtype)
    above_one = (mass > limit) & counted
    if indices.device.type != "cpu":
        message = "tsa_fast.fused_linear_distillation_loss: teacher_topk"
        torch._assert_async(~out_of_range.any(), f"{message} indices outside [0, {vocab})")
        torch._assert_async(~repeated.any(), f"{message} has a duplicate index in a row")
        torch._assert_async(~above_one.any(), f"{message} probabilities sum to more than 1")
        return
    if out_of_range.any():
        raise ValueError(f"teacher_topk indices must be in [0, {vocab}), got {indices[out_of_range][:8].tolist()}")
    if repeated.any():
        row = int(repeated.nonzero()[0, 0])
        raise ValueError(f"teacher_topk has a duplicate index in row {row}: {indices[row][:16].tolist()}")
    if above_one.any():
        rows = above_one.nonzero()[:8, 0]
        raise ValueError(
            f"teacher_topk probabilities sum to more than 1 (limit {limit:g}) in rows {rows.tolist()}: "
            f"{[round(x, 4) for x in mass[rows].tolist()]}"
        )


@torch.compiler.allow_in_graph  # the top-k and torch paths run autograd inside: one node, no graph break
def _rows_and_logit_grad(
    student_logits: Tensor, teacher, labels: Tensor | None, options: dict, vocab: int, with_parts: bool
) -> tuple[Tensor, Tensor, LossParts | None]:
    """Per-row losses, their gradient w.r.t. the chunk's fp32 student logits and, with `with_parts`, the
    rows' parts (else None), from one pass."""
    if isinstance(teacher, tuple):  # top-k (indices, logprobs, tail mode): the reference math, by autograd
        indices, logprobs, topk_tail = teacher
        row_options = {name: options[name] for name in ROW_OPTIONS}
        rows, grad, parts = rows_and_grad_by_autograd(
            lambda z: topk_distillation_loss_rows(
                z, indices, logprobs, labels, **row_options, vocab_size=vocab, topk_tail=topk_tail, return_parts=True
            ),
            student_logits,
        )
        return rows, grad, parts if with_parts else None
    return distillation_loss_rows_and_grad(student_logits, teacher, labels, options, vocab, with_parts)


LOW_PRECISION = (torch.float16, torch.bfloat16)


def _native_gemm(a: Tensor, b: Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether a @ b runs as one fp16/bf16 GEMM with an fp32 result (CUDA), reading the operands as they are."""
    return a.is_cuda and compute_dtype == torch.float32 and a.dtype == b.dtype and a.dtype in LOW_PRECISION


def _mm(a: Tensor, b: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """a @ b accumulated and returned in compute_dtype, never rounded to a low-precision dtype."""
    if _native_gemm(a, b, compute_dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.to(compute_dtype), b.to(compute_dtype))


def _gemm_weight(weight: Tensor, hidden: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """The LM-head weight as the chunks' GEMMs read it: as it is where `_mm` multiplies it natively with the
    hidden states, else upcast once for the whole pass (not once per chunk)."""
    weight = weight.detach()
    return weight if _native_gemm(hidden, weight, compute_dtype) else weight.to(compute_dtype)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, compute_dtype: torch.dtype) -> Tensor:
    logits = _mm(hidden.detach(), weight.T, compute_dtype)
    return logits if bias is None else logits.add_(bias.detach())


@torch.library.custom_op("tsa_fast::weight_grad_pair_accumulate", mutates_args=("high", "low"))
def weight_grad_pair_accumulate(high: Tensor, low: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """(high + low) += grad_logits^T @ hidden for a weight gradient held as a compensated fp16/bf16 pair: the
    Triton kernel, or the same math in torch (through an fp32 V x H update) on the other backends."""
    if select_backend(hidden.device, hidden.dtype) == "triton":
        triton_kernels.weight_grad_accumulate(high, low, grad_logits, hidden)
        return
    update = _mm(grad_logits.T, hidden, torch.promote_types(grad_logits.dtype, torch.float32))
    total = high.to(update.dtype) + low.to(update.dtype) + update
    high.copy_(total)
    low.copy_(total - high.to(total.dtype))


def _chunked_pass(
    hidden, weight, bias, teacher: _Teacher, labels, options, vocab, chunk_size, row_weights, needs, parts=None
):
    """Per-row losses (N,) and, for `needs` = (hidden, weight, bias) flags, the gradients of
    sum(row_weights * rows); row_weights is a scalar tensor or (N,). `parts`, a pair of (N,) buffers, gets
    the soft and hard parts of each row from the same chunk pass. Autocast is off inside: the pass chooses
    its own dtypes."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunks(hidden, weight, bias, teacher, labels, options, vocab, chunk_size, row_weights, needs, parts)


def _chunks(hidden, weight, bias, teacher: _Teacher, labels, options, vocab, chunk_size, row_weights, needs, parts):
    n_rows = hidden.shape[0]
    # Logits and their gradient in fp32 (float64 for float64 inputs), never rounded to a low-precision dtype
    # before the loss.
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = torch.empty(n_rows, dtype=compute_dtype, device=hidden.device)
    gemm_weight = _gemm_weight(weight, hidden, compute_dtype)
    teacher_gemm_weight = (
        None if teacher.weight is None else _gemm_weight(teacher.weight, teacher.hidden, compute_dtype)
    )
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    # The weight gradient: an accumulator in compute_dtype, or for fp16/bf16 weights a compensated pair.
    pair = (
        _WeightGradPair(weight, hidden, gemm_weight.dtype, chunk_size)
        if needs[1] and weight.dtype in LOW_PRECISION
        else None
    )
    grad_weight = pair.high if pair else torch.zeros_like(weight, dtype=compute_dtype) if needs[1] else None
    grad_bias = torch.zeros_like(bias, dtype=compute_dtype) if needs[2] else None
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        chunk_hidden = hidden[start:end].detach()
        student_logits = _logits(chunk_hidden, gemm_weight, bias, compute_dtype)
        chunk_labels = None if labels is None else labels[start:end]
        chunk_teacher = teacher.rows(start, end, teacher_gemm_weight, compute_dtype)
        chunk_options = _chunk_options(options, start, end)
        chunk_rows, grad_logits, chunk_parts = _rows_and_logit_grad(
            student_logits, chunk_teacher, chunk_labels, chunk_options, vocab, parts is not None
        )
        rows[start:end] = chunk_rows
        if parts is not None:
            parts[0][start:end], parts[1][start:end] = chunk_parts
        if not any(needs):
            continue
        del student_logits
        grad_logits.mul_(row_weights if row_weights.dim() == 0 else row_weights[start:end, None])
        # The logit gradient in the dtype the GEMMs read: queued for the pair's next fold, or converted here.
        gemm_grad = pair.add(grad_logits) if pair is not None else grad_logits.to(gemm_weight.dtype)
        if grad_hidden is not None:
            grad_hidden[start:end] = _mm(gemm_grad, gemm_weight, compute_dtype)
        if pair is None and grad_weight is not None:
            grad_weight.addmm_(grad_logits.T, chunk_hidden.to(compute_dtype))
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
    if pair is not None:
        pair.fold()
    return rows, grad_hidden, grad_weight, grad_bias


def _chunk_options(options: dict, start: int, end: int) -> dict:
    """The options of rows [start, end): per-row temperatures sliced to them."""
    temperature = options["temperature"]
    return {**options, "temperature": temperature[start:end]} if isinstance(temperature, Tensor) else options


# Rows of logit gradient folded into a compensated pair at a time. Each fold streams the V x H pair once
# (8 bytes per weight read and written) for 2 x rows FLOPs per weight: at 1024 rows that is 256 FLOP/byte,
# above an H100/H200's bf16 ridge (~206-295), so the fold is bound by its GEMM, not by the pair.
PAIR_FOLD_ROWS = 1024


class _WeightGradPair:
    """The weight gradient of fp16/bf16 weights as a compensated pair (`high` is the gradient, `low` what its
    rounding dropped), fed chunk by chunk: the logit gradients of consecutive chunks are gathered in the
    dtype the weight-gradient GEMM reads and folded in PAIR_FOLD_ROWS rows (whole chunks) at a time."""

    def __init__(self, weight: Tensor, hidden: Tensor, gemm_dtype: torch.dtype, chunk_size: int):
        self.high, self.low, self.hidden = torch.zeros_like(weight), torch.zeros_like(weight), hidden.detach()
        rows = min(hidden.shape[0], max(1, PAIR_FOLD_ROWS // chunk_size) * chunk_size)
        self.pending = torch.empty(rows, weight.shape[0], dtype=gemm_dtype, device=weight.device)
        self.folded = self.filled = 0  # rows folded into the pair so far; rows queued after them

    def add(self, grad_logits: Tensor) -> Tensor:
        """Queue the logit gradient of the next chunk's rows; returns it as queued (in the GEMM dtype)."""
        if self.filled + len(grad_logits) > len(self.pending):
            self.fold()
        queued = self.pending[self.filled : self.filled + len(grad_logits)]
        queued.copy_(grad_logits)
        self.filled += len(grad_logits)
        return queued

    def fold(self) -> None:
        """(high + low) += queued gradients^T @ their hidden states."""
        if self.filled:
            rows = self.hidden[self.folded : self.folded + self.filled]
            weight_grad_pair_accumulate(self.high, self.low, self.pending[: self.filled], rows)
            self.folded, self.filled = self.folded + self.filled, 0


def _reduction_weight(labels: Tensor | None, n_rows: int, options: dict, num_items, dtype, device) -> Tensor:
    """The weight of every row's loss in the scalar reduction (a 0-dim tensor: no host sync)."""
    reduction = options["reduction"]
    if num_items is not None:
        return torch.as_tensor(num_items, device=device).to(dtype).reciprocal()
    if reduction == "sum":
        return torch.ones((), dtype=dtype, device=device)
    if reduction == "batchmean" or labels is None:
        return torch.full((), 1.0 / max(n_rows, 1), dtype=dtype, device=device)
    return 1.0 / (labels != options["ignore_index"]).sum().clamp(min=1).to(dtype)


class _FusedLinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, labels, options, vocab, chunk_size, num_items):
        needs = ctx.needs_input_grad[:3]
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.args = (teacher, labels, options, vocab, chunk_size)
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # With return_parts, two more outputs: the per-row soft and hard parts, without gradient.
        parts = [hidden.new_empty(hidden.shape[0], dtype=dtype) for _ in range(2)] if options["return_parts"] else []
        ctx.mark_non_differentiable(*parts)
        ctx.set_materialize_grads(False)
        pass_args = (hidden, weight, bias, teacher, labels, options, vocab, chunk_size)
        if options["reduction"] == "none":  # per-row weights come in backward: recompute there
            ctx.save_for_backward(hidden, weight, bias)
            rows, *_ = _chunked_pass(*pass_args, None, (False,) * 3, parts or None)
            return rows, *parts
        scale = _reduction_weight(labels, hidden.shape[0], options, num_items, dtype, hidden.device)
        rows, *grads = _chunked_pass(*pass_args, scale, needs, parts or None)
        ctx.save_for_backward(*grads)
        return rows.sum() * scale, *parts

    @staticmethod
    def backward(ctx, grad_output, *_parts):
        teacher, labels, options, vocab, chunk_size = ctx.args
        if options["reduction"] == "none":
            hidden, weight, bias = ctx.saved_tensors
            weights = grad_output.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
            _, *grads = _chunked_pass(
                hidden, weight, bias, teacher, labels, options, vocab, chunk_size, weights, ctx.needs_input_grad[:3]
            )
        else:  # in place: a second backward through the consumed gradients raises autograd's error
            grads = [None if g is None else g.mul_(grad_output) for g in ctx.saved_tensors]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None)
