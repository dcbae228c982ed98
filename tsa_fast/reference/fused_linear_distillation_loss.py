"""Reference fused-linear distillation loss: materialize both models' logits, then the distillation loss.

Student logits z_s = student_hidden @ student_weight.T (+ student_bias). The teacher is one of:
  - hidden + weight (+ bias): z_t = teacher_hidden @ teacher_weight.T (+ teacher_bias);
  - logits z_t;
  - top-k: (indices (N, k), logprobs (N, k)), the teacher's k most likely tokens and their
    log-probabilities at temperature T; the teacher's remaining mass 1 - sum(exp(logprobs)) is one tail
    bucket (`topk_tail="bucket"`), or the k tokens alone are the distribution (`topk_tail="renormalize"`:
    teacher and student each renormalized over them, TRL's server mode). With a bucket the divergence
    compares k + 1 categories: for the teacher its k log-probabilities and its tail; for the student log Q_T
    of the same k tokens and log of the sum of Q_T over all other tokens. Every divergence is the same
    formula over those k + 1 buckets (so a teacher tail of 0, or within rounding of 0 as with k = V, makes
    reverse KL infinite wherever the student puts mass outside the k tokens, as the math says). The hard
    term (cross-entropy to labels) always uses the student's full distribution.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tsa_fast.reference.distillation_loss import (
    LossParts,
    counted_rows,
    distillation_loss_rows,
    per_column,
    reduce_rows,
    row_losses,
    softcapped,
)


def linear_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """hidden (N, H) @ weight (V, H).T + bias (V,), computed and returned in `dtype`."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    return logits if bias is None else logits + bias.to(dtype)


TOPK_TAILS = ("bucket", "renormalize")


def topk_mass_rounding(dtype: torch.dtype) -> float:
    """How far from 1 the probabilities of a full distribution's log-probabilities stored in `dtype` may sum
    by rounding alone (measured: ~1e-6 for fp32 log_softmax at V = 128k, ~3e-4 fp16, ~3e-3 bf16)."""
    return max(1e-4, 2 * torch.finfo(dtype).eps)


def topk_bucket_log_probs(
    log_q: Tensor, indices: Tensor, teacher_logprobs: Tensor, topk_tail: str = "bucket"
) -> tuple[Tensor, Tensor]:
    """(teacher, student) log-probabilities over the k + 1 buckets (the k tokens, then the tail), or with
    topk_tail="renormalize" over the k tokens alone, each distribution renormalized over them.

    log_q: (N, V) the student's log-probabilities at T; indices, teacher_logprobs: (N, k). A teacher tail
    within `topk_mass_rounding` of 0 is 0 (k = V leaves ~1e-7 in fp32, which no student mass matches)."""
    student_top = log_q.gather(-1, indices)
    rounding = topk_mass_rounding(teacher_logprobs.dtype)
    teacher_logprobs = teacher_logprobs.to(log_q.dtype)
    if topk_tail == "renormalize":
        renormalized = lambda x: x - x.logsumexp(-1, keepdim=True)  # noqa: E731
        return renormalized(teacher_logprobs), renormalized(student_top)
    if indices.shape[-1] == log_q.shape[-1]:  # k = V: nothing is left for the tail
        student_tail = torch.full_like(student_top[:, :1], -math.inf)
    else:
        student_tail = log_q.scatter(-1, indices, -math.inf).logsumexp(-1, keepdim=True)
    tail = 1 - teacher_logprobs.exp().sum(-1, keepdim=True)
    teacher_tail = torch.log(torch.where(tail > rounding, tail, 0.0))
    return torch.cat([teacher_logprobs, teacher_tail], -1), torch.cat([student_top, student_tail], -1)


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
    **options,
) -> Tensor | tuple[Tensor, LossParts]:
    """Reference `tsa_fast.fused_linear_distillation_loss` (same contract; `chunk_size` is ignored)."""
    dtype = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    leading_shape = student_hidden.shape[:-1]
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    student_logits = linear_logits(flat(student_hidden), student_weight, student_bias, dtype)
    flat_labels = None if labels is None else labels.reshape(-1)
    return_parts = options.pop("return_parts", False)
    reduction = options.pop("reduction", "mean")
    if teacher_topk is None:
        if teacher_logits is None:
            teacher_logits = linear_logits(flat(teacher_hidden), teacher_weight, teacher_bias, dtype)
        rows, parts = distillation_loss_rows(
            student_logits, flat(teacher_logits), flat_labels, **_row_options(options), return_parts=True
        )
    else:
        rows, parts = topk_distillation_loss_rows(
            student_logits,
            *(flat(x) for x in teacher_topk),
            flat_labels,
            topk_tail=topk_tail,
            **options,
            return_parts=True,
        )
    counted = None if flat_labels is None else flat_labels != options.get("ignore_index", -100)
    loss = reduce_rows(rows, counted, reduction, leading_shape)
    if not return_parts:
        return loss
    return loss, LossParts(*(reduce_rows(part, counted, reduction, leading_shape) for part in parts))


def _row_options(options: dict) -> dict:
    """The keyword options of `distillation_loss`, as `distillation_loss_rows` names them."""
    return {"divergence_name" if name == "divergence" else name: value for name, value in options.items()}


def topk_distillation_loss_rows(
    student_logits: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor | None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float | torch.Tensor = 1.0,
    scale_by_t2: bool = True,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    softcap: float | None = None,
    vocab_size: int | None = None,
    topk_tail: str = "bucket",
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, LossParts]:
    """Per-row losses (N,) of student logits (N, V) against a top-k teacher (N, k), with a tail bucket or
    renormalized over the k tokens (`topk_bucket_log_probs`); with return_parts, `(rows, LossParts(soft,
    hard))` (`row_losses`)."""
    vocab = vocab_size or student_logits.shape[-1]
    counted = counted_rows(labels, ignore_index, student_logits.shape[0], student_logits.device)
    capped = softcapped(torch.where(counted[:, None], student_logits[:, :vocab], 0.0), softcap)
    # Ignored rows get placeholder top-k entries, so whatever they hold cannot reach the math.
    indices, teacher_logprobs = (torch.where(counted[:, None], x, 0) for x in (indices, teacher_logprobs))
    log_q = torch.log_softmax(capped / per_column(temperature, capped.dtype), -1)
    log_p, log_q = topk_bucket_log_probs(log_q, indices, teacher_logprobs, topk_tail)
    rows, parts = row_losses(
        0.5 * log_p,
        0.5 * log_q,
        capped,
        labels,
        counted,
        divergence_name=divergence,
        beta=beta,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        label_smoothing=label_smoothing,
    )
    return (rows, parts) if return_parts else rows
