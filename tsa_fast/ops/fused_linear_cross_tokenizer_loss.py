"""`fused_linear_cross_tokenizer_loss`: the cross-tokenizer loss of two linear heads, never materializing N x V
logits of either model.

Student logits are `student_hidden @ student_weight.T`, teacher logits `teacher_hidden @ teacher_weight.T`,
computed chunk by chunk in fp32 (float64 for float64 inputs). Two passes:

1. Every chunk of student rows and of teacher rows gives its `RowStatistics` (log-sum-exps, top k, the actual
   tokens' log-probabilities, the labels' CE): O(N x k) in all. From them the ULD terms and the gradient plan
   of everything but the exact term (`uld_and_plan`, as the unfused op).
2. Every chunk of student rows again: its logits, its gradient rows and the exact term of the
   groups whose student row is in the chunk (their teacher rows' logits computed for them alone), and the
   gradient folded at once into grad_hidden (that chunk) and grad_weight.

Extra memory: O(chunk_size x V) for the logits and their gradient, plus the V_s x H_s weight gradient (fp32).
The gradients are computed in the forward pass; backward scales them by the incoming gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsa_fast.ops.checks import check_int
from tsa_fast.ops.cross_tokenizer_loss import (
    CrossTokenizerParts,
    RowStatistics,
    TokenAlignment,
    backend_for,
    check_alignment,
    check_cross_tokenizer_options,
    check_vocab_map,
    chunk_gradient_and_exact,
    cross_tokenizer_options,
    loss_parts,
    reduction_weights,
    row_statistics,
    uld_and_plan,
)
from tsa_fast.ops.distillation_loss import check_label_range, check_labels_tensor, check_tensor
from tsa_fast.ops.fused_linear_distillation_loss import default_chunk_size


def fused_linear_cross_tokenizer_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    alignment: TokenAlignment,
    vocab_map: Tensor,
    labels: Tensor | None = None,
    chunk_size: int | None = None,
    **options,
) -> Tensor | tuple[Tensor, CrossTokenizerParts]:
    """`cross_tokenizer_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, alignment,
    vocab_map, labels, **options)` without the logits of either model.

    Args:
        student_hidden: (N_s, H_s) float; student_weight: (V_s, H_s), same dtype family and device.
        teacher_hidden: (N_t, H_t), teacher_weight: (V_t, H_t): the teacher, a constant.
        alignment, vocab_map, labels: as `cross_tokenizer_loss`.
        chunk_size: rows per chunk (>= 1); default `default_chunk_size` of the student's shapes.
        **options: the keyword options of `cross_tokenizer_loss` (same names, defaults and errors).

    Returns: as `cross_tokenizer_loss`. Gradients flow to student_hidden and student_weight.

    Raises: TypeError for an unknown option or one of the wrong type; ValueError as `cross_tokenizer_loss`, and
    for weights whose shapes do not fit the hidden states or a bad chunk_size.
    """
    options = cross_tokenizer_options(options)
    for name, tensor in (
        ("student_hidden", student_hidden),
        ("student_weight", student_weight),
        ("teacher_hidden", teacher_hidden),
        ("teacher_weight", teacher_weight),
    ):
        check_tensor(name, tensor)
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-d, got shape {tuple(tensor.shape)}")
        if tensor.device != student_hidden.device:
            raise ValueError(f"{name} on {tensor.device} but student_hidden on {student_hidden.device}")
    for model, hidden, weight in (
        ("student", student_hidden, student_weight),
        ("teacher", teacher_hidden, teacher_weight),
    ):
        if weight.shape[1] != hidden.shape[1]:
            raise ValueError(f"{model}_weight must be (V, {hidden.shape[1]}), got {tuple(weight.shape)}")
    check_cross_tokenizer_options(options, labels is not None)
    n_s, v_s = student_hidden.shape[0], student_weight.shape[0]
    n_t, v_t = teacher_hidden.shape[0], teacher_weight.shape[0]
    device = student_hidden.device
    alignment = check_alignment(alignment, n_s, n_t, v_s, v_t, device)
    vocab_map = check_vocab_map(vocab_map, v_s, v_t, device)
    check_labels_tensor(labels, torch.Size([n_s]), device)
    if labels is not None:
        check_label_range(labels, v_s, options["ignore_index"])
        labels = labels.long()
    if chunk_size is None:
        chunk_size = default_chunk_size(n_s, student_hidden.shape[1], v_s)
    else:
        check_int("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    loss, exact, uld, hard = _FusedLinearCrossTokenizer.apply(
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        alignment,
        vocab_map,
        labels,
        options,
        chunk_size,
    )
    return (loss, CrossTokenizerParts(exact, uld, hard)) if options["return_parts"] else loss


def chunked_statistics(hidden, weight, chunk_size, inv_t, k, prefix, tokens, labels, ignore_index, dtype):
    """`RowStatistics` of all rows of hidden @ weight.T, from one chunk of logits at a time."""
    chunks = []
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        logits = hidden[start:end].to(dtype) @ weight.T
        chunk_labels = None if labels is None else labels[start:end]
        chunks.append(
            row_statistics(logits, inv_t, k, prefix[start:end], tokens[start:end], chunk_labels, ignore_index, dtype)
        )
    if not chunks:
        logits = hidden.new_zeros(0, weight.shape[0], dtype=dtype)
        return row_statistics(logits, inv_t, k, prefix, tokens, labels, ignore_index, dtype)
    fields = [None if chunks[0][i] is None else torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]) - 1)]
    return RowStatistics(*fields, weight.shape[0])


class _FusedLinearCrossTokenizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, alignment, vocab_map, labels, options, chunk_size):
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        inv_t, k = 1.0 / options["temperature"], options["uld_top_k"]
        hard = labels if options["hard_weight"] != 0 else None
        w_s, w_t = weight.detach().to(dtype), teacher_weight.to(dtype)
        hidden = hidden.detach()
        with torch.autocast(hidden.device.type, enabled=False):
            student = chunked_statistics(
                hidden,
                w_s,
                chunk_size,
                inv_t,
                k,
                alignment.student_prefix,
                alignment.student_tokens,
                hard,
                options["ignore_index"],
                dtype,
            )
            teacher = chunked_statistics(
                teacher_hidden,
                w_t,
                chunk_size,
                inv_t,
                k,
                alignment.teacher_prefix,
                alignment.teacher_tokens,
                None,
                options["ignore_index"],
                dtype,
            )
            n_groups = alignment.student_rows.shape[0]
            weights = reduction_weights(options, n_groups, hard, dtype, hidden.device)
            uld, nll, plan = uld_and_plan(student, teacher, alignment, hard, weights, options)
            # The groups in order of their student rows, so that each chunk's groups are one slice.
            order = alignment.student_rows.argsort()
            ordered_rows = alignment.student_rows[order]
            exact = torch.zeros(n_groups, dtype=dtype, device=hidden.device)
            grad_hidden = torch.empty_like(hidden, dtype=dtype)
            grad_weight = torch.zeros_like(w_s)
            backend = backend_for(w_s)
            for start in range(0, hidden.shape[0], chunk_size):
                end = min(start + chunk_size, hidden.shape[0])
                chunk_hidden = hidden[start:end].to(dtype)
                logits = chunk_hidden @ w_s.T
                first, last = torch.searchsorted(
                    ordered_rows, torch.tensor([start, end], device=hidden.device)
                ).tolist()
                groups = order[first:last]
                teacher_logits = teacher_hidden[alignment.teacher_rows[groups]].to(dtype) @ w_t.T
                local = torch.arange(last - first, device=hidden.device)
                grad, exact[groups] = chunk_gradient_and_exact(
                    logits,
                    start,
                    student,
                    plan,
                    teacher_logits,
                    alignment.student_rows[groups] - start,
                    local,
                    vocab_map,
                    weights,
                    options,
                    backend,
                )
                del logits
                grad_hidden[start:end] = grad @ w_s
                grad_weight.addmm_(grad.T, chunk_hidden)
        parts = loss_parts(exact, uld, nll, weights, options)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(*parts)
        return (parts[0] + parts[1] + parts[2], *parts)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_hidden, grad_weight = ctx.saved_tensors
        scaled = (grad_hidden.mul_(grad_loss).to(ctx.dtypes[0]), grad_weight.mul_(grad_loss).to(ctx.dtypes[1]))
        return (*scaled, None, None, None, None, None, None, None)
