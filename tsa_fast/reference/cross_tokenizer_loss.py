"""Reference cross-tokenizer distillation loss in plain PyTorch: the oracle of `tsa_fast.cross_tokenizer_loss`.

Written to be obviously correct, not fast: full log-softmax of every row, a full sort of every group's
probabilities, gathered copies of the mapped columns; float64 for float64 inputs, float32 otherwise;
gradients by autograd. Contract (shapes, TokenAlignment): `tsa_fast.ops.cross_tokenizer_loss`.

Per group g, with s = student_rows[g], t = teacher_rows[g], q = softmax(z_s[s] / T), p = softmax(z_t[t] / T),
the map's columns A (student ids) and B (teacher ids), and the group scales
c_s = exp(sum over rows r with student_prefix[r] == g of log softmax(z_s[r] / T)[student_tokens[r]]) (c_t alike):

    exact_g = T^2 * D(p[B] / sum p[B], q[A] / sum q[A])                       (0 when the map is empty)
    uld_g   = sum_{i<k} |c_s sort(q)_i - c_t sort(p)_i| + |c_s tail_s - c_t tail_t|

sort decreasing over each side's whole vocabulary (the shorter padded with zeros), tail the mass after the
first k. loss = exact_weight * R(exact) + uld_weight * R(uld) + hard_weight * R_labels(CE(softmax(z_s), labels))
with R the mean over groups (the CE's: over counted labels; 0 where none) or the sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsa_fast.reference.distillation_loss import divergence as divergence_of


def group_scales(log_probs: Tensor, prefix: Tensor, tokens: Tensor, n_groups: int) -> Tensor:
    """(G,) c_g = exp(sum of log_probs[r, tokens[r]] over the rows r with prefix[r] == g)."""
    rows = (prefix >= 0).nonzero().squeeze(-1)
    picked = log_probs[rows, tokens[rows]]
    log_scale = torch.zeros(n_groups, dtype=log_probs.dtype, device=log_probs.device)
    return log_scale.index_add(0, prefix[rows], picked).exp()


def sorted_padded(probs: Tensor, length: int) -> Tensor:
    """Each row's probabilities sorted in decreasing order, padded with zeros to `length` columns."""
    ordered = probs.sort(dim=-1, descending=True).values
    return torch.nn.functional.pad(ordered, (0, length - probs.shape[-1]))


def cross_tokenizer_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alignment,
    vocab_map: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    exact_weight: float = 1.0,
    uld_weight: float = 1.0,
    uld_top_k: int = 64,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_parts: bool = False,
):
    """Reference `tsa_fast.cross_tokenizer_loss` (same contract, no argument checking). With return_parts,
    `(loss, (exact, uld, hard))`, each weighted and reduced as the loss (with gradient, unlike the op's)."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    z_s = student_logits.to(dtype)
    z_t = teacher_logits.detach().to(dtype)
    n_groups = alignment.student_rows.shape[0]
    log_q = torch.log_softmax(z_s / temperature, dim=-1)
    log_p = torch.log_softmax(z_t / temperature, dim=-1)
    log_q_g = log_q[alignment.student_rows]
    log_p_g = log_p[alignment.teacher_rows]

    zero = z_s[:0].sum()  # on the student's graph: a loss of zeros still has a (zero) gradient
    exact = zero
    if vocab_map.shape[0] > 0 and n_groups > 0 and exact_weight != 0:
        # Renormalized over the map's columns: log softmax of the gathered log-probabilities.
        half_q = 0.5 * torch.log_softmax(log_q_g[:, vocab_map[:, 0]], dim=-1)
        half_p = 0.5 * torch.log_softmax(log_p_g[:, vocab_map[:, 1]], dim=-1)
        per_group = temperature**2 * divergence_of(half_p, half_q, divergence, beta)
        exact = exact_weight * _reduce(per_group, n_groups, reduction)

    uld = zero
    if n_groups > 0 and uld_weight != 0:
        c_s = group_scales(log_q, alignment.student_prefix, alignment.student_tokens, n_groups)
        c_t = group_scales(log_p, alignment.teacher_prefix, alignment.teacher_tokens, n_groups)
        length = max(z_s.shape[-1], z_t.shape[-1])
        q_sorted = c_s[:, None] * sorted_padded(log_q_g.exp(), length)
        p_sorted = c_t[:, None] * sorted_padded(log_p_g.exp(), length)
        k = min(uld_top_k, length)
        head = (q_sorted[:, :k] - p_sorted[:, :k]).abs().sum(-1)
        tail = (q_sorted[:, k:].sum(-1) - p_sorted[:, k:].sum(-1)).abs()
        uld = uld_weight * _reduce(head + tail, n_groups, reduction)

    hard = zero
    if hard_weight != 0:
        counted = labels != ignore_index
        rows = counted.nonzero().squeeze(-1)
        nll = -torch.log_softmax(z_s[rows], dim=-1).gather(-1, labels[rows].long()[:, None]).squeeze(-1)
        hard = hard_weight * _reduce(nll, int(counted.sum()), reduction)

    loss = exact + uld + hard
    return (loss, (exact, uld, hard)) if return_parts else loss


def _reduce(values: Tensor, count: int, reduction: str) -> Tensor:
    total = values.sum()
    return total if reduction == "sum" else total / max(count, 1)
