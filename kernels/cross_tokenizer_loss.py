"""Cross-tokenizer loss kernels: the row sweeps of `tsa_fast.cross_tokenizer_loss` (contract and math there and
in `tsa_fast.reference.cross_tokenizer_loss`). All math in fp32, row sums in fp64; inputs fp32/fp16/bf16.

- `cross_tokenizer_logsumexp`: per row, the online log-sum-exp of z / T (and of z, for the hard term).
  Reads each row once.
- `cross_tokenizer_softmax_rows`: the gradient buffer, row r = a_r softmax(z_r / T) (+ h_r softmax(z_r)), from
  the stored log-sum-exps: reads each row once, writes it once (fp32).
- `cross_tokenizer_exact`: one program per group reads the group's student row and teacher row through the
  row index and only the mapped columns, through the column map (no gathered copy): the log-sum-exps over the
  mapped columns (renormalization), the row constant sum(qg) (every divergence but forward KL), then the
  divergence and its gradient, added into the gradient buffer at the student's mapped columns. Memory traffic
  per group: 2 (3) x M elements of each row and 2 x M gradient entries (read, written). Groups' student rows
  are distinct (the op checks), so no two programs touch one gradient row.

The ULD term reads only the top k of each row (torch.topk) and the log-sum-exps: it needs no kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .distillation_loss import FORWARD_KL, divergence_terms, half_log_prob, tiles
from .utils import online_logsumexp


@triton.jit
def _cross_tokenizer_logsumexp_kernel(
    logits_ptr,
    lse_ptr,
    lse_hard_ptr,
    n_rows,
    n_cols,
    stride_row,
    inv_t,
    HAS_HARD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    in_range = rows < n_rows
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row  # 64-bit: N x V passes 2^31
    cols = tl.arange(0, BLOCK_V)[None, :]
    m = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_ROWS], tl.float32)
    m_h, d_h = m, d
    for start in range(0, n_cols, BLOCK_V):
        mask = in_range[:, None] & (start + cols < n_cols)
        z = tl.load(row_ptrs + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m, d = online_logsumexp(m, d, z * inv_t)
        if HAS_HARD:
            m_h, d_h = online_logsumexp(m_h, d_h, z)
    tl.store(lse_ptr + rows, m + tl.log(d), mask=in_range)
    if HAS_HARD:
        tl.store(lse_hard_ptr + rows, m_h + tl.log(d_h), mask=in_range)


@triton.jit
def _cross_tokenizer_softmax_rows_kernel(
    logits_ptr,
    grad_ptr,
    lse_ptr,
    coefficient_ptr,
    lse_hard_ptr,
    coefficient_hard_ptr,
    n_rows,
    n_cols,
    stride_row,
    stride_grad,
    inv_t,
    HAS_HARD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    in_range = rows < n_rows
    lse = tl.load(lse_ptr + rows, mask=in_range, other=0.0)[:, None]
    coefficient = tl.load(coefficient_ptr + rows, mask=in_range, other=0.0)[:, None]
    if HAS_HARD:
        lse_hard = tl.load(lse_hard_ptr + rows, mask=in_range, other=0.0)[:, None]
        coefficient_hard = tl.load(coefficient_hard_ptr + rows, mask=in_range, other=0.0)[:, None]
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
    out_ptrs = grad_ptr + rows.to(tl.int64)[:, None] * stride_grad
    cols = tl.arange(0, BLOCK_V)[None, :]
    for start in range(0, n_cols, BLOCK_V):
        mask = in_range[:, None] & (start + cols < n_cols)
        z = tl.load(row_ptrs + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        grad = coefficient * tl.exp(z * inv_t - lse)
        if HAS_HARD:
            grad += coefficient_hard * tl.exp(z - lse_hard)
        tl.store(out_ptrs + start + cols, grad, mask=mask)


@triton.jit
def _mapped_scores(student_row, teacher_row, map_ptr, start, cols, n_map, inv_t):
    """Map rows start + cols: the in-range mask, the student ids, and both rows' z / T at their mapped columns
    (map rows (student id, teacher id); -inf past the map's end)."""
    mask = start + cols < n_map
    ids_s = tl.load(map_ptr + 2 * (start + cols), mask=mask, other=0)
    ids_t = tl.load(map_ptr + 2 * (start + cols) + 1, mask=mask, other=0)
    s = tl.load(student_row + ids_s, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
    t = tl.load(teacher_row + ids_t, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
    return mask, ids_s, s, t


@triton.jit
def _mapped_half_log_probs(student_row, teacher_row, map_ptr, start, cols, n_map, inv_t, m_s, log_d_s, m_t, log_d_t):
    """`_mapped_scores`' mask and student ids, and both sides' half log-probabilities renormalized over the map
    (from pass 1's log-sum-exps m + log d)."""
    mask, ids_s, s, t = _mapped_scores(student_row, teacher_row, map_ptr, start, cols, n_map, inv_t)
    return mask, ids_s, half_log_prob(s, m_s, log_d_s), half_log_prob(t, m_t, log_d_t)


@triton.jit
def _cross_tokenizer_exact_kernel(
    student_ptr,
    teacher_ptr,
    student_rows_ptr,
    teacher_rows_ptr,
    map_ptr,
    grad_ptr,
    out_ptr,
    n_map,
    stride_student,
    stride_teacher,
    stride_grad,
    inv_t,
    beta,
    grad_scale,
    DIVERGENCE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    group = tl.program_id(0)
    # The group's rows, through the row index; tiles are (1, BLOCK_M) so the row helpers apply as they are.
    student_row = student_ptr + tl.load(student_rows_ptr + group).to(tl.int64) * stride_student
    teacher_row = teacher_ptr + tl.load(teacher_rows_ptr + group).to(tl.int64) * stride_teacher
    grad_row = grad_ptr + tl.load(student_rows_ptr + group).to(tl.int64) * stride_grad
    cols = tl.arange(0, BLOCK_M)[None, :]

    # Pass 1: log-sum-exp of both sides over the mapped columns (map rows (student id, teacher id)).
    m_s = tl.full([1], float("-inf"), tl.float32)
    d_s = tl.zeros([1], tl.float32)
    m_t, d_t = m_s, d_s
    for start in range(0, n_map, BLOCK_M):
        mask, _, s, t = _mapped_scores(student_row, teacher_row, map_ptr, start, cols, n_map, inv_t)
        m_s, d_s = online_logsumexp(m_s, d_s, s)
        m_t, d_t = online_logsumexp(m_t, d_t, t)
    log_d_s, log_d_t = tl.log(d_s), tl.log(d_t)

    # Pass 2: the softmax chain rule's row constant C = sum(qg) (forward KL: exactly -1).
    qg_sum = tl.full([1], -1.0, tl.float64)
    if DIVERGENCE != FORWARD_KL:
        qg_sum = tl.zeros([1], tl.float64)
        for start in range(0, n_map, BLOCK_M):
            mask, _, half_log_q, half_log_p = _mapped_half_log_probs(
                student_row, teacher_row, map_ptr, start, cols, n_map, inv_t, m_s, log_d_s, m_t, log_d_t
            )
            _, qg = divergence_terms(
                tl.exp(2.0 * half_log_p), tl.exp(2.0 * half_log_q), half_log_p, half_log_q, beta, DIVERGENCE
            )
            qg_sum += tl.sum(tl.where(mask, qg, 0.0).to(tl.float64), axis=1)

    # Pass 3: the divergence, and grad_scale x dD/ds added at the student's mapped columns.
    row_constant = qg_sum.to(tl.float32)[:, None]
    div = tl.zeros([1], tl.float64)
    for start in range(0, n_map, BLOCK_M):
        mask, ids_s, half_log_q, half_log_p = _mapped_half_log_probs(
            student_row, teacher_row, map_ptr, start, cols, n_map, inv_t, m_s, log_d_s, m_t, log_d_t
        )
        q = tl.exp(2.0 * half_log_q)
        d, qg = divergence_terms(tl.exp(2.0 * half_log_p), q, half_log_p, half_log_q, beta, DIVERGENCE)
        div += tl.sum(tl.where(mask, d, 0.0).to(tl.float64), axis=1)
        # Map ids are distinct per column: no two lanes add into one gradient entry.
        previous = tl.load(grad_row + ids_s, mask=mask, other=0.0)
        tl.store(grad_row + ids_s, previous + grad_scale * (qg - q * row_constant), mask=mask)
    tl.store(out_ptr + group + tl.arange(0, 1), div.to(tl.float32))


def exact_tile(n_map: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps) of the exact kernel: 2K-wide tiles of the map on 8 warps (ptxas, every divergence,
    sm_80 and sm_90: at most 85 registers, no spills; 4K tiles took up to 156 and spilled on sm_80)."""
    block_m = min(triton.next_power_of_2(n_map), 2048)
    return block_m, 8 if block_m >= 2048 else 4


def _unit_column_stride(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def cross_tokenizer_logsumexp(
    logits: torch.Tensor, inv_t: float, hard: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) float32 log-sum-exp of logits / T per row of (N, V) logits, and of the logits (T = 1) when `hard`."""
    logits = _unit_column_stride(logits)
    n_rows, n_cols = logits.shape
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse_hard = torch.empty_like(lse) if hard else None
    if n_rows == 0:
        return lse, lse_hard
    block_rows, block_v, num_warps = tiles(n_rows, n_cols)
    _cross_tokenizer_logsumexp_kernel[(triton.cdiv(n_rows, block_rows),)](
        logits,
        lse,
        lse_hard,
        n_rows,
        n_cols,
        logits.stride(0),
        inv_t,
        HAS_HARD=hard,
        BLOCK_ROWS=block_rows,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return lse, lse_hard


def cross_tokenizer_softmax_rows(
    logits: torch.Tensor,
    lse: torch.Tensor,
    coefficient: torch.Tensor,
    lse_hard: torch.Tensor | None,
    coefficient_hard: torch.Tensor | None,
    inv_t: float,
) -> torch.Tensor:
    """A new (N, V) float32 buffer, row r = coefficient[r] softmax(z_r / T) (+ coefficient_hard[r] softmax(z_r)),
    from the rows' log-sum-exps (N,) (lse at T, lse_hard at 1)."""
    logits = _unit_column_stride(logits)
    n_rows, n_cols = logits.shape
    grad = torch.empty(n_rows, n_cols, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return grad
    hard = coefficient_hard is not None
    as_rows = lambda x: None if x is None else x.to(torch.float32).contiguous()  # noqa: E731
    block_rows, block_v, num_warps = tiles(n_rows, n_cols)
    _cross_tokenizer_softmax_rows_kernel[(triton.cdiv(n_rows, block_rows),)](
        logits,
        grad,
        as_rows(lse),
        as_rows(coefficient),
        as_rows(lse_hard),
        as_rows(coefficient_hard),
        n_rows,
        n_cols,
        logits.stride(0),
        grad.stride(0),
        inv_t,
        HAS_HARD=hard,
        BLOCK_ROWS=block_rows,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return grad


def cross_tokenizer_exact(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    vocab_map: torch.Tensor,
    divergence: int,
    beta: float,
    inv_t: float,
    grad_scale: float,
) -> torch.Tensor:
    """(G,) float32 divergence D(p[B] renormalized, q[A] renormalized) of each group's teacher row
    teacher_rows[g] and student row student_rows[g] (distinct) at T over the map (M, 2) int64 (A, B); adds
    grad_scale x dD/d(z_s / T) into grad[student_rows[g], A] (grad: float32, unit column stride)."""
    student, teacher = _unit_column_stride(student), _unit_column_stride(teacher)
    if grad.dtype != torch.float32 or grad.stride(-1) != 1:
        raise ValueError(f"grad must be float32 with unit column stride, got {grad.dtype} {grad.stride()}")
    n_groups, n_map = student_rows.shape[0], vocab_map.shape[0]
    out = torch.empty(n_groups, dtype=torch.float32, device=student.device)
    if n_groups == 0:
        return out
    block_m, num_warps = exact_tile(n_map)
    _cross_tokenizer_exact_kernel[(n_groups,)](
        student,
        teacher,
        student_rows.contiguous(),
        teacher_rows.contiguous(),
        vocab_map.contiguous(),
        grad,
        out,
        n_map,
        student.stride(0),
        teacher.stride(0),
        grad.stride(0),
        inv_t,
        beta,
        grad_scale,
        DIVERGENCE=divergence,
        BLOCK_M=block_m,
        num_warps=num_warps,
    )
    return out
