"""Reference distillation loss in plain PyTorch: the oracle every backend is tested against.

Written for clarity, not speed: it materializes every N x V intermediate. It computes in float64 for
float64 inputs and in float32 otherwise, and its gradient comes from autograd.

With P_t = softmax(c(z_t) / T), P_s = softmax(c(z_s) / T) and c(z) = softcap * tanh(z / softcap)
(identity without softcap), per counted row:

    row = soft_weight * T^2 (if scale_by_t2) * D(P_t, P_s) + hard_weight * CE(softmax(c(z_s)), label)

where T is a number or one T per row (each row then at its own T, times its own T^2), D is one of
DIVERGENCES, a term of weight 0 contributes nothing (not 0 * inf), and CE uses label smoothing eps:
    CE = -(1 - eps) * log q1[label] - eps * mean_j log q1[j],   q1 = softmax(c(z_s)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# The order is the integer code the kernels use (Triton constexpr, C++ enum).
DIVERGENCES = ("forward_kl", "reverse_kl", "symmetric_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "batchmean", "none")


class LossParts(NamedTuple):
    """The parts of a distillation loss (`return_parts=True`), per row or reduced as the loss, without
    gradient; they sum to the loss within rounding."""

    soft: Tensor  # soft_weight x (T^2) x divergence
    hard: Tensor  # hard_weight x cross-entropy to the labels


def softcapped(logits: Tensor, softcap: float | None) -> Tensor:
    """c(z) = softcap * tanh(z / softcap), or z itself when softcap is None."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def per_column(temperature: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """The temperature as it divides (N, V) logits: a number, a 0-d tensor, or (N,) as an (N, 1) column."""
    if not isinstance(temperature, Tensor):
        return temperature
    temperature = temperature.detach().to(dtype)
    return temperature[:, None] if temperature.dim() == 1 else temperature


def half_log_softmax(x: Tensor) -> Tensor:
    """log_softmax(x) / 2 over the last dim, as (x/2 - max/2) - log(sum exp(x - max)) / 2. The divergences take
    log-probabilities halved: for logits near the fp32 limit (+-3.4e38) x - max and the log-probabilities pass
    fp32's range (-6e38) where q log(q / p) is still finite. Halving is exact: elsewhere this is exactly half
    of log_softmax(x)."""
    half = 0.5 * x - 0.5 * x.amax(-1, keepdim=True).detach()  # the max cancels: no gradient through it
    return half - 0.5 * torch.exp(2 * half).sum(-1, keepdim=True).log()


def half_kl_divergence(half_log_a: Tensor, half_log_b: Tensor) -> Tensor:
    """KL(a || b) / 2 over the last dim from halved log-probabilities; terms with a = 0 are 0 (and have 0
    gradient), a NaN a makes the row and its gradient NaN."""
    a = torch.exp(2 * half_log_a)
    return (a * torch.where(a != 0, half_log_a - half_log_b, 0.0)).sum(-1)


def kl_divergence(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last dim from log-probabilities (`half_kl_divergence`)."""
    return 2 * half_kl_divergence(0.5 * log_a, 0.5 * log_b)


def divergence(half_log_p: Tensor, half_log_q: Tensor, name: str, beta: float = 0.5) -> Tensor:
    """Per-row divergence between teacher P and student Q from their halved log-probabilities, shape (N,)."""
    if name == "forward_kl":
        return 2 * half_kl_divergence(half_log_p, half_log_q)
    if name == "reverse_kl":
        return 2 * half_kl_divergence(half_log_q, half_log_p)
    if name == "symmetric_kl":  # the halves summed: each KL may pass fp32's range where their mean does not
        return half_kl_divergence(half_log_p, half_log_q) + half_kl_divergence(half_log_q, half_log_p)
    p, q = torch.exp(2 * half_log_p), torch.exp(2 * half_log_q)
    if name == "jsd":
        # log(p/m) and log(q/m) from r = log(p/q), not as log p - log m: log m of the rounded p and q would
        # disagree with the log-probabilities where p ~ q ~ 1 (a peaked row). For the larger of p, q, say p:
        # m/p = 1 + (1 - beta) expm1(-r), so log(p/m) = -log1p((1 - beta) expm1(-r)); the smaller's log is
        # that minus |r|. r = 0 where p = q = 0 (terms that are 0), so that no NaN reaches the gradient.
        r = torch.where((p == 0) & (q == 0), 0.0, 2 * (half_log_p - half_log_q))
        p_larger = r > 0
        log_larger_m = -torch.log1p(torch.where(p_larger, 1 - beta, beta) * torch.expm1(torch.where(p_larger, -r, r)))
        log_pm = torch.where(p_larger, log_larger_m, log_larger_m + r)
        log_qm = torch.where(p_larger, log_larger_m - r, log_larger_m)
        xlog = lambda a, log_ratio: (a * torch.where(a != 0, log_ratio, 0.0)).sum(-1)  # noqa: E731
        jsd = beta * xlog(p, log_pm) + (1 - beta) * xlog(q, log_qm)
        # dJSD/dq_j = (1 - beta) log(q_j/m_j): the terms through m cancel exactly, but autograd of the line above
        # would form them as a difference of rounded terms. So the value is jsd, the gradient flows through q.
        student_part = (1 - beta) * xlog(q, log_qm.detach())
        return jsd.detach() + (student_part - student_part.detach())
    if name == "tvd":
        difference = p - q
        # |x| as x * sign(x), and sign(NaN) = 0 made NaN (+ 0 * x), so that a NaN teacher gives a NaN gradient.
        return 0.5 * (difference * (difference.sign().detach() + 0.0 * difference.detach())).sum(-1)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {name!r}")


def smoothed_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """Per-row cross-entropy of softmax(logits) against labels with label smoothing, shape (N,), float64:
    (1 - eps) (lse - z_label) + eps (lse - mean z), lse = logsumexp(z). The per-row sums and differences are in
    float64 (for fp32 logits near their limit, lse - z and the sum of a row pass fp32's range)."""
    max_logit = logits.amax(-1, keepdim=True).detach()  # cancels: no gradient through it
    lse = max_logit.squeeze(-1).double() + torch.exp(logits - max_logit).sum(-1).log().double()
    nll = lse - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double()
    if label_smoothing == 0.0:  # a term of weight 0 contributes nothing, also where it is infinite
        return nll
    mean_logit = logits.sum(-1, dtype=torch.float64) / logits.shape[-1]
    return (1 - label_smoothing) * nll + label_smoothing * (lse - mean_logit)


def distillation_loss_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    divergence_name: str = "forward_kl",
    beta: float = 0.5,
    temperature: float | Tensor = 1.0,
    scale_by_t2: bool = True,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    softcap: float | None = None,
    vocab_size: int | None = None,
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, LossParts]:
    """Per-row losses, shape (N,) for (N, V_s) / (N, V_t) logits and (N,) labels; ignored rows are 0.
    temperature: a number, or a tensor of shape (N,) (one T per row) or () (a constant). With return_parts,
    `(rows, LossParts(soft, hard))`: the per-row terms the losses are the sum of (`row_losses`)."""
    vocab = vocab_size or student_logits.shape[-1]
    compute_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    z_s = student_logits[:, :vocab].to(compute_dtype)
    z_t = teacher_logits[:, :vocab].detach().to(compute_dtype)
    counted = counted_rows(labels, ignore_index, z_s.shape[0], z_s.device)
    # Ignored rows enter the math as zeros (finite everywhere) and leave it through `where`, so their
    # loss and gradient are exactly zero; no data-dependent shapes, so torch.compile traces it whole.
    c_s = softcapped(torch.where(counted[:, None], z_s, 0.0), softcap)
    c_t = softcapped(torch.where(counted[:, None], z_t, 0.0), softcap)
    half_log_q = half_log_softmax(c_s / per_column(temperature, compute_dtype))
    half_log_p = half_log_softmax(c_t / per_column(temperature, compute_dtype))
    rows, parts = row_losses(
        half_log_p,
        half_log_q,
        c_s,
        labels,
        counted,
        divergence_name=divergence_name,
        beta=beta,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        label_smoothing=label_smoothing,
    )
    return (rows, parts) if return_parts else rows


def counted_rows(labels: Tensor | None, ignore_index: int, n_rows: int, device: torch.device) -> Tensor:
    """(N,) bool: the rows that count (label != ignore_index; all rows without labels)."""
    if labels is None:
        return torch.ones(n_rows, dtype=torch.bool, device=device)
    return labels != ignore_index


def row_losses(
    half_log_p: Tensor,
    half_log_q: Tensor,
    capped_student: Tensor,
    labels: Tensor | None,
    counted: Tensor,
    *,
    divergence_name: str,
    beta: float,
    temperature: float | Tensor,
    scale_by_t2: bool,
    soft_weight: float,
    hard_weight: float,
    label_smoothing: float,
) -> tuple[Tensor, LossParts]:
    """Per-row losses (N,) and their parts (detached), from the teacher's and student's log-probabilities at
    temperature T, halved (`half_log_softmax`; over the categories the divergence compares), and the
    student's capped logits c(z_s) (the hard term); temperature a number or a tensor of shape (N,) or ().
    The loss of a row is its two parts summed (in float64 with a hard term) and rounded once."""
    dtype = half_log_q.dtype
    if isinstance(temperature, Tensor):
        temperature = temperature.detach().to(dtype)
    t2 = temperature**2 if scale_by_t2 else 1.0
    # A term of weight 0 contributes nothing, also where it is infinite (not 0 * inf = NaN). The zeros start on
    # the student's graph, so that with both weights 0 the loss still has a gradient (0), as on the kernels.
    soft = hard = capped_student[:, :0].sum(-1).to(dtype)
    if soft_weight != 0.0:
        soft = soft + soft_weight * t2 * divergence(half_log_p, half_log_q, divergence_name, beta)
    if hard_weight != 0.0:
        safe_labels = torch.where(counted, labels, 0).long()
        hard = hard + hard_weight * smoothed_cross_entropy(capped_student, safe_labels, label_smoothing)
    part = lambda x: torch.where(counted, x.detach(), 0.0).to(dtype)  # noqa: E731
    return torch.where(counted, soft + hard, 0.0).to(dtype), LossParts(part(soft), part(hard))


def reduce_rows(rows: Tensor, counted: Tensor | None, reduction: str, leading_shape: torch.Size) -> Tensor:
    """Apply `reduction` to per-row losses (N,); `counted` is the (N,) mask of rows that count (None: all)."""
    if reduction == "none":
        return rows.reshape(leading_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean" or counted is None:
        return total / max(rows.shape[0], 1)
    return total / counted.sum().clamp(min=1)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    vocab_size: int | None = None,
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, LossParts]:
    """Reference `tsa_fast.distillation_loss` (same contract, no argument checking, no fusion)."""
    leading_shape = student_logits.shape[:-1]
    flat_labels = None if labels is None else labels.reshape(-1)
    rows, parts = distillation_loss_rows(
        student_logits.reshape(-1, student_logits.shape[-1]),
        teacher_logits.reshape(-1, teacher_logits.shape[-1]),
        flat_labels,
        divergence_name=divergence,
        beta=beta,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        softcap=softcap,
        vocab_size=vocab_size,
        return_parts=True,
    )
    counted = None if flat_labels is None else flat_labels != ignore_index
    loss = reduce_rows(rows, counted, reduction, leading_shape)
    if not return_parts:
        return loss
    return loss, LossParts(*(reduce_rows(part, counted, reduction, leading_shape) for part in parts))
