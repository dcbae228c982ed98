"""`cross_tokenizer_loss`: distillation between a student and a teacher of different tokenizers.

Per aligned group (`TokenAlignment`): an exact-match term (the divergence of `distillation_loss` over the
tokens both vocabularies share, `vocab_map`, each side renormalized over them) and a ULD term (the L1
distance of both sides' sorted probabilities over their top k, the rest of the mass as one bucket, each
scaled by the probability of the group's earlier tokens), plus hard-label cross-entropy in the student's
tokenization. The math is spelled out in `tsa_fast.reference.cross_tokenizer_loss`.

Like `distillation_loss`, the forward pass computes the loss and its gradient w.r.t. the student logits;
backward scales the stored gradient. The work over a whole row (O(V) per row) is three row sweeps, on the
selected backend (triton, else torch): the log-sum-exp of each row (at T, and at 1 for the hard term), the
exact-match divergence with its gradient through the column map (read in place, no gathered copy on the
kernels), and one write of each gradient row. The gradient of every term is a per-row multiple of the
row's softmax plus a few entries (the top k, the actual tokens, the labels, the mapped columns):

    ULD, group row:  c_s q_j ([j in top k] (sign_j - sign_tail) - sum_top (sign_i - sign_tail) q_i)
    ULD, prefix row: u c_s (onehot(token) - q_j)           u = sum_top sign_i q_i + sign_tail tail_s
    hard:            q1_j - onehot(label)
(each over T, and dL/dc_s = u through the group scale), so the top k (torch.topk) is all ULD reads.
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
from torch import Tensor

from tsa_fast.backends import cpp_extension, select_backend, select_triton_or_torch, triton_kernels
from tsa_fast.ops.checks import DTYPE_CODES, FLOAT_DTYPES, check_bool, check_choice, check_int, check_real, traced
from tsa_fast.ops.distillation_loss import HUGE_PAGE_MIN_BYTES, check_label_range, check_labels_tensor
from tsa_fast.reference.distillation_loss import DIVERGENCES, half_log_softmax
from tsa_fast.reference.distillation_loss import divergence as divergence_of

CROSS_TOKENIZER_REDUCTIONS = ("mean", "sum")


class TokenAlignment(NamedTuple):
    """Aligned spans of one batch, over flattened rows (student rows N_s, teacher rows N_t); G groups.

    Row r's logits predict the token after position r. A group is a stretch of text between two byte offsets
    where both tokenizations end a token; its probability on each side is the product of its tokens'
    conditionals: the next-token distribution of the row predicting its last token, times the probabilities
    of its earlier actual tokens (the group's scale c)."""

    student_rows: Tensor  # (G,) int64 in [0, N_s), distinct: the row predicting the group's last student token
    teacher_rows: Tensor  # (G,) int64 in [0, N_t)
    student_prefix: Tensor  # (N_s,) int64 in [-1, G): the group whose earlier token this row predicts, -1: none
    teacher_prefix: Tensor  # (N_t,) int64, likewise
    student_tokens: Tensor  # (N_s,) int64: the actual next token of each row (read where prefix >= 0)
    teacher_tokens: Tensor  # (N_t,) int64


class CrossTokenizerParts(NamedTuple):
    """The weighted parts of a cross-tokenizer loss (`return_parts=True`), reduced as the loss, detached."""

    exact: Tensor  # exact_weight x T^2 x divergence over the shared tokens
    uld: Tensor  # uld_weight x sorted-probability L1
    hard: Tensor  # hard_weight x cross-entropy to the labels


def cross_tokenizer_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alignment: TokenAlignment,
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
) -> Tensor | tuple[Tensor, CrossTokenizerParts]:
    """Cross-tokenizer distillation loss, fused with its gradient w.r.t. the student logits.

    Args:
        student_logits: (N_s, V_s) float32/float16/bfloat16/float64. Receives the gradient.
        teacher_logits: (N_t, V_t) float, same device; a constant (no gradient).
        alignment: a `TokenAlignment` of int64 (or int32) tensors on the logits' device.
        vocab_map: (M, 2) int64/int32 pairs (student id, teacher id) of identical token strings, each id at
            most once per column; M = 0 makes the exact-match term 0.
        labels: (N_s,) student next-token labels or `ignore_index`, for the hard term; None: no hard term.
        divergence, beta: the exact-match divergence, as `distillation_loss` (jsd: beta strictly in (0, 1)).
        temperature: T > 0: every distribution and the groups' scales at T; the exact term times T^2 (as
            `distillation_loss`'s scale_by_t2), the ULD term not; the hard term at T = 1.
        exact_weight, uld_weight, hard_weight: finite, >= 0; a term of weight 0 contributes nothing.
        uld_top_k: k >= 1 of the sorted-probability L1 (k >= V: the full sort, no bucket).
        reduction: "mean" (the exact and ULD terms over groups, the hard term over counted labels; 0 where
            there are none) or "sum".
        return_parts: also return `CrossTokenizerParts(exact, uld, hard)`, which sum to the loss.

    Returns:
        the loss, a float32 scalar (float64 for float64 student logits); with return_parts
        `(loss, CrossTokenizerParts)`.

    Raises:
        TypeError: a wrong type (a tensor that is not one, a flag that is not a bool, a number that is not an
            int or float, an alignment that is not a TokenAlignment), naming the argument.
        ValueError: a bad value or shape naming it: an alignment row out of range or a repeated student row,
            a prefix outside [-1, G), a token outside the vocabulary, a map id out of range or repeated,
            k < 1, labels out of range (on CUDA, asynchronous device asserts).
    """
    options = dict(
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        exact_weight=exact_weight,
        uld_weight=uld_weight,
        uld_top_k=uld_top_k,
        hard_weight=hard_weight,
        ignore_index=ignore_index,
        reduction=reduction,
        return_parts=return_parts,
    )
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"student_logits on {student_logits.device} but teacher_logits on {teacher_logits.device}")
    check_cross_tokenizer_options(options, labels is not None)
    (n_s, v_s), (n_t, v_t) = student_logits.shape, teacher_logits.shape
    alignment = check_alignment(alignment, n_s, n_t, v_s, v_t, student_logits.device)
    vocab_map = check_vocab_map(vocab_map, v_s, v_t, student_logits.device)
    check_labels_tensor(labels, torch.Size([n_s]), student_logits.device)
    if labels is not None:
        check_label_range(labels, v_s, ignore_index)
        labels = labels.long()
    loss, exact, uld, hard = _CrossTokenizerLoss.apply(
        student_logits, teacher_logits.detach(), alignment, vocab_map, labels, options
    )
    return (loss, CrossTokenizerParts(exact, uld, hard)) if return_parts else loss


# The keyword options of the loss and their defaults, shared by the fused-linear form.
CROSS_TOKENIZER_OPTIONS = {
    name: p.default
    for name, p in inspect.signature(cross_tokenizer_loss).parameters.items()
    if p.kind is p.KEYWORD_ONLY
}


def cross_tokenizer_options(options: dict) -> dict:
    """The keyword options given, over their defaults; a TypeError names any unknown one."""
    unknown = sorted(set(options) - set(CROSS_TOKENIZER_OPTIONS))
    if unknown:
        raise TypeError(f"unknown options {unknown}; valid: {sorted(CROSS_TOKENIZER_OPTIONS)}")
    return {**CROSS_TOKENIZER_OPTIONS, **options}


# ---- Argument checks --------------------------------------------------------------------------------------


def check_logits(name: str, logits) -> None:
    """A (N, V) float tensor with V >= 1."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32/float16/bfloat16/float64, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{name} must be (N, V) with V >= 1, got shape {tuple(logits.shape)}")


def check_cross_tokenizer_options(options: dict, has_labels: bool) -> None:
    """Validate the keyword options: a wrong type is a TypeError, a wrong value a ValueError, naming it."""
    check_choice("divergence", options["divergence"], DIVERGENCES)
    check_choice("reduction", options["reduction"], CROSS_TOKENIZER_REDUCTIONS)
    check_bool("return_parts", options["return_parts"])
    for name in ("beta", "temperature", "exact_weight", "uld_weight", "hard_weight"):
        check_real(name, options[name])
    check_int("uld_top_k", options["uld_top_k"])
    check_int("ignore_index", options["ignore_index"])
    if options["uld_top_k"] < 1:
        raise ValueError(f"uld_top_k must be >= 1, got {options['uld_top_k']}")
    if not math.isfinite(options["temperature"]) or options["temperature"] <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {options['temperature']!r}")
    for name in ("exact_weight", "uld_weight", "hard_weight"):
        if not math.isfinite(options[name]) or options[name] < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {options[name]!r}")
    if options["divergence"] == "jsd" and not 0.0 < options["beta"] < 1.0:
        raise ValueError(f"jsd needs beta strictly inside (0, 1), got beta={options['beta']!r}")
    if options["hard_weight"] != 0 and not has_labels:
        raise ValueError(f"hard_weight={options['hard_weight']!r} needs labels; pass labels or hard_weight=0")


def check_index_tensor(name: str, tensor, shape: tuple | None, device: torch.device) -> Tensor:
    """An int64/int32 tensor of `shape` (None: any 1-d) on `device`, returned as int64."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 or int32, got {tensor.dtype}")
    if (shape is None and tensor.dim() != 1) or (shape is not None and tuple(tensor.shape) != shape):
        raise ValueError(f"{name} must have shape {shape or '(G,)'}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} on {tensor.device} but the logits on {device}")
    return tensor.long()


def check_values(name: str, bad: Tensor, values: Tensor, what: str) -> None:
    """`bad` (a bool mask over `values`) must be all False: a ValueError on the CPU naming `name` and the first
    offending values, an asynchronous device assert elsewhere; skipped while torch.compile traces."""
    if traced(bad):
        return
    if bad.device.type == "cpu":
        if bad.any():
            raise ValueError(f"{name} must be {what}; got {values[bad][:8].tolist()}")
    else:
        torch._assert_async(~bad.any(), f"tsa_fast.cross_tokenizer_loss: {name} must be {what}")


def check_distinct(name: str, ids: Tensor) -> None:
    """The ids of a 1-d tensor must be distinct."""
    ordered = ids.sort().values
    repeated = torch.zeros_like(ordered, dtype=torch.bool)
    repeated[1:] = ordered[1:] == ordered[:-1]
    check_values(name, repeated, ordered, "distinct (each id at most once)")


def check_alignment(alignment, n_s: int, n_t: int, v_s: int, v_t: int, device: torch.device) -> TokenAlignment:
    """A TokenAlignment of index tensors whose shapes and values fit the logits; returned as int64."""
    if not isinstance(alignment, TokenAlignment):
        raise TypeError(f"alignment must be a TokenAlignment, got {type(alignment).__name__}")
    student_rows = check_index_tensor("alignment.student_rows", alignment.student_rows, None, device)
    n_groups = student_rows.shape[0]
    fields = dict(
        student_rows=student_rows,
        teacher_rows=check_index_tensor("alignment.teacher_rows", alignment.teacher_rows, (n_groups,), device),
        student_prefix=check_index_tensor("alignment.student_prefix", alignment.student_prefix, (n_s,), device),
        teacher_prefix=check_index_tensor("alignment.teacher_prefix", alignment.teacher_prefix, (n_t,), device),
        student_tokens=check_index_tensor("alignment.student_tokens", alignment.student_tokens, (n_s,), device),
        teacher_tokens=check_index_tensor("alignment.teacher_tokens", alignment.teacher_tokens, (n_t,), device),
    )
    for side, n_rows, vocab in (("student", n_s, v_s), ("teacher", n_t, v_t)):
        rows, prefix, tokens = fields[f"{side}_rows"], fields[f"{side}_prefix"], fields[f"{side}_tokens"]
        check_values(f"alignment.{side}_rows", (rows < 0) | (rows >= n_rows), rows, f"in [0, {n_rows})")
        check_values(f"alignment.{side}_prefix", (prefix < -1) | (prefix >= n_groups), prefix, f"in [-1, {n_groups})")
        bad_tokens = (prefix >= 0) & ((tokens < 0) | (tokens >= vocab))
        check_values(f"alignment.{side}_tokens", bad_tokens, tokens, f"in [0, {vocab}) where the prefix is >= 0")
    check_distinct("alignment.student_rows", student_rows)
    return TokenAlignment(**fields)


def check_vocab_map(vocab_map, v_s: int, v_t: int, device: torch.device) -> Tensor:
    """(M, 2) int64/int32 (student id, teacher id), ids in range and distinct per column; returned as int64."""
    if not isinstance(vocab_map, Tensor):
        raise TypeError(f"vocab_map must be a torch.Tensor, got {type(vocab_map).__name__}")
    if vocab_map.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"vocab_map must be int64 or int32, got {vocab_map.dtype}")
    if vocab_map.dim() != 2 or vocab_map.shape[1] != 2:
        raise ValueError(f"vocab_map must have shape (M, 2), got {tuple(vocab_map.shape)}")
    if vocab_map.device != device:
        raise ValueError(f"vocab_map on {vocab_map.device} but the logits on {device}")
    vocab_map = vocab_map.long()
    for column, side, vocab in ((0, "student", v_s), (1, "teacher", v_t)):
        ids = vocab_map[:, column]
        check_values(f"vocab_map {side} ids", (ids < 0) | (ids >= vocab), ids, f"in [0, {vocab})")
        check_distinct(f"vocab_map {side} ids", ids)
    return vocab_map.contiguous()


# ---- The loss and its gradient ----------------------------------------------------------------------------


def backend_for(logits: Tensor) -> str:
    """`select_backend`'s choice; its C++ kernels are the CPU's only (on CUDA a forced cpp takes triton, else torch)."""
    backend = select_backend(logits.device, logits.dtype)
    if backend == "cpp" and logits.device.type != "cpu":
        return select_triton_or_torch(logits.device, logits.dtype)
    return backend


def compute_dtype_of(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class RowStatistics(NamedTuple):
    """What the loss needs of every row of one model, from one sweep (lse) and torch.topk."""

    lse: Tensor  # (N,) log-sum-exp of the logits / T
    top_logprobs: Tensor  # (N, min(k, V)) the k largest log-probabilities at T, decreasing
    top_indices: Tensor  # (N, min(k, V))
    token_logprobs: Tensor  # (N,) log-probability at T of tokens[r] where prefix[r] >= 0, else 0
    lse_hard: Tensor | None  # (N,) log-sum-exp at T = 1 (the student with a hard term), else None
    nll: Tensor | None  # (N,) -log softmax(z)[label] of counted rows, else 0; None without a hard term
    vocab: int  # V


def row_statistics(
    logits: Tensor,
    inv_t: float,
    k: int,
    prefix: Tensor,
    tokens: Tensor,
    labels: Tensor | None,
    ignore_index: int,
    dtype: torch.dtype,
) -> RowStatistics:
    """The `RowStatistics` of (N, V) logits in `dtype`; `labels` (with a hard term) adds lse_hard and nll."""
    lse, lse_hard, top_values, top_indices = logsumexp_and_top_k(
        logits, inv_t, min(k, logits.shape[1]), labels is not None, dtype
    )
    top_logprobs = top_values * inv_t - lse[:, None]
    has_token = prefix >= 0
    picked = logits.gather(1, torch.where(has_token, tokens, 0)[:, None]).squeeze(1).to(dtype)
    token_logprobs = torch.where(has_token, picked * inv_t - lse, 0.0)
    nll = None
    if labels is not None:
        counted = labels != ignore_index
        label_logit = logits.gather(1, torch.where(counted, labels, 0)[:, None]).squeeze(1).to(dtype)
        nll = torch.where(counted, lse_hard - label_logit, 0.0)
    return RowStatistics(lse, top_logprobs, top_indices, token_logprobs, lse_hard, nll, logits.shape[1])


def group_scales(stats: RowStatistics, prefix: Tensor, n_groups: int) -> Tensor:
    """(G,) c_g = exp(sum of the token log-probabilities of the rows whose prefix is g)."""
    has_token = prefix >= 0
    log_scale = torch.zeros(n_groups + 1, dtype=stats.lse.dtype, device=stats.lse.device)
    # Rows without a group add 0 into the extra slot n_groups (no data-dependent shapes).
    log_scale.index_add_(0, torch.where(has_token, prefix, n_groups), stats.token_logprobs)
    return log_scale[:n_groups].exp()


class GradientPlan(NamedTuple):
    """The student gradient of everything but the exact term: per row r, dense[r] * softmax(z_r / T) +
    dense_hard[r] * softmax(z_r), plus `values` at (rows, cols)."""

    dense: Tensor  # (N_s,)
    dense_hard: Tensor | None  # (N_s,), None without a hard term
    rows: Tensor  # (E,)
    cols: Tensor  # (E,)
    values: Tensor  # (E,)


class Weights(NamedTuple):
    """The weight of one group's exact and ULD term and of one counted label's CE in the reduced loss."""

    exact: float
    uld: float
    hard: Tensor | float


def reduction_weights(options: dict, n_groups: int, labels: Tensor | None, dtype, device) -> Weights:
    """Each term's weight per group (per counted label) under the reduction (0-d tensor: no host sync)."""
    exact, uld, hard = options["exact_weight"], options["uld_weight"], options["hard_weight"]
    if options["reduction"] == "sum":
        return Weights(exact, uld, hard)
    hard_per_label = 0.0
    if labels is not None and hard != 0:
        hard_per_label = hard / (labels != options["ignore_index"]).sum().clamp(min=1).to(dtype)
    return Weights(exact / max(n_groups, 1), uld / max(n_groups, 1), hard_per_label)


def uld_and_plan(
    student: RowStatistics,
    teacher: RowStatistics,
    alignment: TokenAlignment,
    labels: Tensor | None,
    weights: Weights,
    options: dict,
) -> tuple[Tensor, Tensor, GradientPlan]:
    """Per-group ULD terms (G,), per-row CE (N_s,) (zeros without a hard term), and the `GradientPlan` of
    both in the reduced loss (ULD weighted by weights.uld, CE by weights.hard)."""
    inv_t = 1.0 / options["temperature"]
    n_groups, n_s = alignment.student_rows.shape[0], student.lse.shape[0]
    s_rows, t_rows = alignment.student_rows, alignment.teacher_rows
    dtype, device = student.lse.dtype, student.lse.device
    dense = torch.zeros(n_s, dtype=dtype, device=device)
    rows, cols, values = [], [], []
    uld = torch.zeros(n_groups, dtype=dtype, device=device)
    if n_groups > 0 and options["uld_weight"] != 0:
        c_s = group_scales(student, alignment.student_prefix, n_groups)
        c_t = group_scales(teacher, alignment.teacher_prefix, n_groups)
        q_top = student.top_logprobs[s_rows].exp()  # (G, k_s)
        p_top = teacher.top_logprobs[t_rows].exp()  # (G, k_t)
        k_s, k = q_top.shape[1], max(q_top.shape[1], p_top.shape[1])
        # The tails in float64: 1 - (sum of the top k) cancels where the top k hold nearly all the mass.
        # Exactly 0 where the top k are the whole vocabulary.
        tail_s = (1.0 - q_top.sum(1, dtype=torch.float64)).to(dtype) * (k_s < student.vocab)
        tail_t = (1.0 - p_top.sum(1, dtype=torch.float64)).to(dtype) * (p_top.shape[1] < teacher.vocab)
        pad = lambda x: torch.nn.functional.pad(x, (0, k - x.shape[1]))  # noqa: E731  (a vocabulary under k)
        difference = c_s[:, None] * pad(q_top) - c_t[:, None] * pad(p_top)
        tail_difference = c_s * tail_s - c_t * tail_t
        uld = difference.abs().sum(1) + tail_difference.abs()
        # The group row's gradient is c_s q_j (g_j - u), g_j = sign_j on the top k and sign_tail elsewhere,
        # u = sum_j g_j q_j. With sum(q) = 1 - tail_s it is c_s q_j ((g_j - pivot) - sum_top (sign_i - pivot) q_i)
        # for any pivot: sign_tail (g_j - pivot = 0 off the top k), or without a tail the top token's sign. It
        # then vanishes exactly where every sign agrees, with no 1 - sum(q) cancellation.
        sign = difference[:, :k_s].sign()
        pivot = tail_difference.sign() if k_s < student.vocab else sign[:, 0]
        top_sign = sign - pivot[:, None]
        u_top = (top_sign * q_top).sum(1)
        u = pivot + u_top  # dL/dc_s
        scale = weights.uld * inv_t * c_s
        dense.index_add_(0, s_rows, -scale * u_top)
        rows.append(s_rows[:, None].expand(-1, k_s).reshape(-1))
        cols.append(student.top_indices[s_rows].reshape(-1))
        values.append((scale[:, None] * q_top * top_sign).reshape(-1))
        # Prefix rows: d c_s / d z_r = c_s (onehot(token) - q_r) / T.
        prefix = alignment.student_prefix
        has_token = prefix >= 0
        through_scale = torch.where(has_token, (scale * u)[prefix.clamp(min=0)], 0.0)
        dense -= through_scale
        rows.append(torch.arange(n_s, device=device))
        cols.append(torch.where(has_token, alignment.student_tokens, 0))
        values.append(through_scale)
    nll = torch.zeros(n_s, dtype=dtype, device=device)
    dense_hard = None
    if student.nll is not None:
        nll = student.nll
        counted = (labels != options["ignore_index"]).to(dtype)
        dense_hard = weights.hard * counted
        rows.append(torch.arange(n_s, device=device))
        cols.append(torch.where(labels != options["ignore_index"], labels, 0))
        values.append(-dense_hard)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    plan = GradientPlan(
        dense,
        dense_hard,
        torch.cat(rows) if rows else empty,
        torch.cat(cols) if cols else empty,
        torch.cat(values) if values else empty.to(dtype),
    )
    return uld, nll, plan


def chunk_gradient_and_exact(
    logits: Tensor,
    start: int,
    student: RowStatistics,
    plan: GradientPlan,
    teacher: Tensor,
    student_rows: Tensor,
    teacher_rows: Tensor,
    vocab_map: Tensor,
    weights: Weights,
    options: dict,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """The gradient of the student rows [start, start + len(logits)) in the compute dtype (the plan's, and the
    exact term's), and the exact term's divergences (G_c,) of the groups whose student rows in the chunk are
    `student_rows` (chunk-local) and whose teacher rows are `teacher_rows` (rows of `teacher`)."""
    end = start + logits.shape[0]
    inv_t = 1.0 / options["temperature"]
    dense_hard = None if plan.dense_hard is None else plan.dense_hard[start:end]
    lse_hard = None if student.lse_hard is None else student.lse_hard[start:end]
    softmax = (logits, student.lse[start:end], plan.dense[start:end], lse_hard, dense_hard, inv_t)
    if backend == "cpp":  # one sweep: each group's exact term right after its gradient row
        grad, exact = gradient_rows_cpp(*softmax, teacher, student_rows, teacher_rows, vocab_map, weights, options)
    else:
        grad = softmax_rows(*softmax, backend)
        exact = exact_rows(grad, logits, teacher, student_rows, teacher_rows, vocab_map, weights, options, backend)
    rows, cols, values = plan.rows, plan.cols, plan.values
    if start != 0 or end != student.lse.shape[0]:  # a chunk: its entries only
        inside = ((rows >= start) & (rows < end)).nonzero().squeeze(1)
        rows, cols, values = rows[inside] - start, cols[inside], values[inside]
    grad.index_put_((rows, cols), values.to(grad.dtype), accumulate=True)
    return grad, exact


def loss_parts(exact: Tensor, uld: Tensor, nll: Tensor, weights: Weights, options: dict) -> tuple[Tensor, ...]:
    """The weighted, reduced (exact, uld, hard) parts from the per-group and per-row terms."""
    t2 = options["temperature"] ** 2
    return weights.exact * t2 * exact.sum(), weights.uld * uld.sum(), weights.hard * nll.sum()


class _CrossTokenizerLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, alignment, vocab_map, labels, options):
        backend = backend_for(student)
        inv_t = 1.0 / options["temperature"]
        k = options["uld_top_k"]
        n_groups = alignment.student_rows.shape[0]
        dtype = compute_dtype_of(student)
        hard = labels if options["hard_weight"] != 0 else None
        student_stats = row_statistics(
            student, inv_t, k, alignment.student_prefix, alignment.student_tokens, hard, options["ignore_index"], dtype
        )
        teacher_stats = row_statistics(
            teacher, inv_t, k, alignment.teacher_prefix, alignment.teacher_tokens, None, options["ignore_index"], dtype
        )
        weights = reduction_weights(options, n_groups, hard, dtype, student.device)
        uld, nll, plan = uld_and_plan(student_stats, teacher_stats, alignment, hard, weights, options)
        grad, exact = chunk_gradient_and_exact(
            student,
            0,
            student_stats,
            plan,
            teacher,
            alignment.student_rows,
            alignment.teacher_rows,
            vocab_map,
            weights,
            options,
            backend,
        )
        parts = loss_parts(exact, uld, nll, weights, options)
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        ctx.mark_non_differentiable(*parts)
        return (parts[0] + parts[1] + parts[2], *parts)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (grad,) = ctx.saved_tensors
        # In place: the stored gradient is consumed (a second backward raises autograd's in-place error).
        return grad.mul_(grad_loss).to(ctx.student_dtype), None, None, None, None, None


# ---- Row sweeps, per backend -------------------------------------------------------------------------------


def logsumexp_and_top_k(
    logits: Tensor, inv_t: float, k: int, hard: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(N,) log-sum-exp of logits * inv_t, that of the logits (T = 1) when `hard` (else None), in `dtype`; the
    k <= V largest logits of each row (N, k) in `dtype`, decreasing, and their columns (int64)."""
    backend = backend_for(logits)
    if backend == "cpp":
        logits = _unit_column_stride(logits)
        n_rows = logits.shape[0]
        lse = torch.empty(n_rows, dtype=torch.float32)
        lse_hard = torch.empty_like(lse) if hard else None
        values = torch.empty(n_rows, k, dtype=torch.float32)
        indices = torch.empty(n_rows, k, dtype=torch.int64)
        cpp_extension.cross_tokenizer_statistics_cpu(
            _rows_tuple(logits),
            inv_t,
            k,
            lse.data_ptr(),
            0 if lse_hard is None else lse_hard.data_ptr(),
            values.data_ptr(),
            indices.data_ptr(),
        )
    else:
        if backend == "triton":
            lse, lse_hard = triton_kernels.cross_tokenizer_logsumexp(logits, inv_t, hard)
        else:
            z = logits.to(dtype)
            lse, lse_hard = torch.logsumexp(z * inv_t, dim=1), torch.logsumexp(z, dim=1) if hard else None
        values, indices = torch.topk(logits, k, dim=1)
    return lse.to(dtype), None if lse_hard is None else lse_hard.to(dtype), values.to(dtype), indices


def _unit_column_stride(logits: Tensor) -> Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _rows_tuple(logits: Tensor) -> tuple:
    """(N, V) logits with unit column stride as the C++ kernels take them."""
    return (logits.data_ptr(), DTYPE_CODES[logits.dtype], logits.stride(0), logits.shape[0], logits.shape[1])


def _float_rows(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.to(torch.float32).contiguous()


def softmax_rows(
    logits: Tensor,
    lse: Tensor,
    coefficient: Tensor,
    lse_hard: Tensor | None,
    coefficient_hard: Tensor | None,
    inv_t: float,
    backend: str,
) -> Tensor:
    """A new (N, V) buffer, row r = coefficient[r] * softmax(z_r * inv_t) (+ coefficient_hard[r] * softmax(z_r))
    in the compute dtype, from the rows' log-sum-exps."""
    if backend == "triton":
        return triton_kernels.cross_tokenizer_softmax_rows(logits, lse, coefficient, lse_hard, coefficient_hard, inv_t)
    z = logits.to(lse.dtype)
    grad = torch.exp(z * inv_t - lse[:, None]).mul_(coefficient[:, None])
    if coefficient_hard is not None:
        grad.add_(torch.exp(z - lse_hard[:, None]).mul_(coefficient_hard[:, None]))
    return grad


def gradient_rows_cpp(
    logits: Tensor,
    lse: Tensor,
    coefficient: Tensor,
    lse_hard: Tensor | None,
    coefficient_hard: Tensor | None,
    inv_t: float,
    teacher: Tensor,
    student_rows: Tensor,
    teacher_rows: Tensor,
    vocab_map: Tensor,
    weights: Weights,
    options: dict,
) -> tuple[Tensor, Tensor]:
    """`softmax_rows` and `exact_rows` in one sweep of the C++ kernel: (grad (N, V) float32, exact (G,) float32)."""
    logits = _unit_column_stride(logits)
    grad = torch.empty(logits.shape, dtype=torch.float32)
    if grad.nbytes >= HUGE_PAGE_MIN_BYTES:  # first-touch page faults would cost as much as the kernel
        cpp_extension.advise_huge_pages(grad.data_ptr(), grad.nbytes)
    n_groups = student_rows.shape[0]
    exact = torch.zeros(n_groups, dtype=torch.float32)
    with_exact = n_groups > 0 and vocab_map.shape[0] > 0 and options["exact_weight"] != 0
    teacher = _unit_column_stride(teacher)
    if teacher.dtype not in DTYPE_CODES:  # a float64 teacher of a kernel-dtype student
        teacher = teacher.float() if with_exact else teacher[:0].float()
    row_groups = torch.full((logits.shape[0],), -1, dtype=torch.int64)
    row_groups[student_rows] = torch.arange(n_groups)
    # In student-id order (D does not depend on the order): rows read and gradients added in address order.
    vocab_map = vocab_map[vocab_map[:, 0].argsort()].contiguous()
    teacher_rows = teacher_rows.contiguous()
    kept = [_float_rows(x) for x in (lse, coefficient, lse_hard, coefficient_hard)]  # alive during the call
    cpp_extension.cross_tokenizer_gradient_cpu(
        _rows_tuple(logits),
        inv_t,
        *(0 if x is None else x.data_ptr() for x in kept),
        grad.data_ptr(),
        grad.stride(0),
        _rows_tuple(teacher),
        row_groups.data_ptr() if with_exact else 0,
        teacher_rows.data_ptr(),
        vocab_map.data_ptr(),
        vocab_map.shape[0],
        DIVERGENCES.index(options["divergence"]),
        options["beta"],
        weights.exact * options["temperature"],
        exact.data_ptr(),
    )
    return grad, exact


def exact_rows(
    grad: Tensor,
    student: Tensor,
    teacher: Tensor,
    student_rows: Tensor,
    teacher_rows: Tensor,
    vocab_map: Tensor,
    weights: Weights,
    options: dict,
    backend: str,
) -> Tensor:
    """(G,) divergence of the teacher's rows `teacher_rows` and the student's rows `student_rows`, each over
    the map's columns and renormalized there, at T; adds weights.exact x T^2 x its gradient w.r.t. the
    student logits into `grad` (rows of `grad` are the student's). Zeros for an empty map or weight 0.
    The triton and torch backends (the cpp one: `gradient_rows_cpp`)."""
    n_groups = student_rows.shape[0]
    dtype = grad.dtype
    if n_groups == 0 or vocab_map.shape[0] == 0 or options["exact_weight"] == 0:
        return torch.zeros(n_groups, dtype=dtype, device=grad.device)
    temperature = options["temperature"]
    scale = weights.exact * temperature  # T^2 x (1 / T): the chain rule through z / T
    code = DIVERGENCES.index(options["divergence"])
    if backend == "triton":
        return triton_kernels.cross_tokenizer_exact(
            grad,
            student,
            teacher,
            student_rows,
            teacher_rows,
            vocab_map,
            code,
            options["beta"],
            1.0 / temperature,
            scale,
        )
    with torch.enable_grad():
        s = (student[student_rows[:, None], vocab_map[None, :, 0]].to(dtype) / temperature).requires_grad_()
        t = teacher[teacher_rows[:, None], vocab_map[None, :, 1]].to(dtype) / temperature
        values = divergence_of(half_log_softmax(t), half_log_softmax(s), options["divergence"], options["beta"])
        (ds,) = torch.autograd.grad(values.sum(), s)
    grad.index_put_((student_rows[:, None], vocab_map[None, :, 0]), ds.mul_(scale), accumulate=True)
    return values.detach()
