"""Fused distillation loss: per-row loss and its gradient w.r.t. the student logits, in one kernel.

Contract: `distillation_loss_forward(student (N, V_s), teacher (N, V_t), labels (N,) int64 | None,
row_loss (N,) float32, grad (N, V_s) | None, ...)` writes the per-row losses and the gradient of each row's
loss (in grad's dtype: fp32 for an fp16 student, whose gradient entries are often below fp16's normal range,
else the student's). Only the first K = `vocab_size` columns are read and written. Inputs may be
fp32/fp16/bf16 (independently); all math is fp32. Rows whose label is `ignore_index` read nothing and
write a zero loss and a zero gradient row.

Math (P = softmax(c(z_t) / T), Q = softmax(c(z_s) / T), c = softcap * tanh(. / softcap) or identity; T one
number or one per row, soft_scale = soft_weight * (T^2 if scale_by_t2 else 1), per row with T):
    loss = soft_scale * D(P, Q) + hard_weight * CE_eps(softmax(c(z_s)), label)
    dloss/dc(z_s) = soft_scale / T * (qg - Q * sum(qg)) + hard_weight * (Q1 - (1 - eps) onehot - eps / K)
with qg = Q * dD/dQ per element (`divergence_terms`); for forward KL qg = -P and sum(qg) = -1. A term of
weight 0 contributes nothing (not 0 * inf).

Tiling: one program owns BLOCK_ROWS rows and sweeps the vocabulary in BLOCK_V-wide tiles:
    pass 1  online log-sum-exp of both distributions (and of the student at T = 1 for the hard term);
    pass 2  sum(qg) over the row (only when the gradient needs it: every divergence but forward KL);
    pass 3  the loss terms and the gradient tile, written once.
Memory traffic per row: read the student and teacher rows 2x (forward KL) or 3x, write the gradient
row once: 2 * (bytes_s + bytes_t) + bytes_s per element for forward KL. No N x V temporaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import online_logsumexp

# The DIVERGENCE codes: a name's index in tsa_fast.reference.distillation_loss.DIVERGENCES, the one list of the
# names (the ops pass DIVERGENCES.index(name); tests/test_distillation_loss.py checks the two agree). Not imported
# from there: this package imports nothing of tsa_fast, so that importing it alone stays cheap and side-effect
# free. constexpr, as compiled kernels read no other globals.
FORWARD_KL, REVERSE_KL, SYMMETRIC_KL, JSD, TVD = (tl.constexpr(code) for code in range(5))


@triton.jit
def _load_capped(ptrs, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    """Load a tile as fp32 and return (c(z), c'(z)); masked entries are -inf in c(z), so they drop out of
    every softmax. c(z) = softcap * tanh(z / softcap)."""
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:  # one return statement: compiled (not interpreted), Triton types every return it meets
        x = z / softcap
        # tanh: for |x| < 0.625 an odd polynomial (Cephes' tanhf), accurate to an ulp where (1 - e) / (1 + e)
        # would cancel (|z| << softcap); above, from e = exp(-2|x|), which cannot overflow.
        x2 = x * x
        poly = -5.70498872745e-3 * x2 + 2.06390887954e-2
        poly = poly * x2 - 5.37397155531e-2
        poly = poly * x2 + 1.33314422036e-1
        poly = poly * x2 - 3.33332819422e-1
        e = tl.exp(-2.0 * tl.abs(x))
        large = (1.0 - e) / (1.0 + e)
        tanh = tl.where(tl.abs(x) < 0.625, poly * x2 * x + x, tl.where(x < 0, -large, large))
        capped, slope = softcap * tanh, 1.0 - tanh * tanh
    else:
        capped, slope = z, 1.0
    return tl.where(mask, capped, float("-inf")), slope


@triton.jit
def _log1p(x):
    """log(1 + x) to a few ulps where 1 + x rounds near 1 (Kahan: the rounding of u = 1 + x cancels)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _expm1(x):
    """e^x - 1 to a few ulps where e^x rounds near 1 (Kahan: the rounding of u = e^x cancels)."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * (x / tl.log(u))))


@triton.jit
def half_log_prob(x, m, log_d):
    """Half the log-softmax, (x - m - log d) / 2, as (x/2 - m/2) - log(d)/2: near the fp32 limit (+-3.4e38)
    x - m and log-probabilities pass fp32's range (-6e38) where q log(q / p) is still finite. Halving is exact:
    elsewhere this is exactly half the log-probability."""
    return (0.5 * x - 0.5 * m[:, None]) - 0.5 * log_d[:, None]


@triton.jit
def divergence_terms(p, q, half_log_p, half_log_q, beta, DIVERGENCE: tl.constexpr):
    """Per element: the divergence summand d and qg = q * dD/dq, from the probabilities and half their logs
    (a log(a/b) as 2 (a (h_a - h_b)): finite wherever it is). Zero-probability terms are exactly 0; a NaN
    probability (a NaN or +inf logit, a row of only -inf) makes both NaN."""
    if DIVERGENCE == FORWARD_KL:
        d = tl.where(p != 0, 2.0 * (p * (half_log_p - half_log_q)), 0.0)
        qg = -p
    elif DIVERGENCE == REVERSE_KL:
        d = tl.where(q != 0, 2.0 * (q * (half_log_q - half_log_p)), 0.0)
        qg = d + q
    elif DIVERGENCE == SYMMETRIC_KL:
        # The halves of both KLs summed: each KL may pass fp32's range where their mean does not.
        half_reverse = tl.where(q != 0, q * (half_log_q - half_log_p), 0.0)
        d = tl.where(p != 0, p * (half_log_p - half_log_q), 0.0) + half_reverse
        qg = half_reverse + 0.5 * (q - p)
    elif DIVERGENCE == JSD:
        # log(p/m) and log(q/m) from r = log(p/q), not as log p - log m: log m of the rounded p and q would
        # disagree with the log-probabilities where p ~ q ~ 1 (a peaked row). For the larger of p, q, say p:
        # m/p = 1 + (1 - beta) expm1(-r), so log(p/m) = -log1p((1 - beta) expm1(-r)); the smaller's log is
        # that minus |r|. A NaN ratio takes the second branch (and stays NaN).
        log_pq = 2.0 * (half_log_p - half_log_q)
        p_larger = log_pq > 0
        log_larger_m = -_log1p(tl.where(p_larger, 1.0 - beta, beta) * _expm1(tl.where(p_larger, -log_pq, log_pq)))
        log_qm = tl.where(p_larger, log_larger_m - log_pq, log_larger_m)
        log_pm = tl.where(p_larger, log_larger_m, log_larger_m + log_pq)
        student_term = tl.where(q != 0, q * log_qm, 0.0)
        d = beta * tl.where(p != 0, p * log_pm, 0.0) + (1.0 - beta) * student_term
        qg = (1.0 - beta) * student_term
    else:  # TVD
        d = 0.5 * tl.abs(p - q)
        # sign(q - p), NaN for a NaN p (0 * p).
        qg = 0.5 * q * (tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0)) + 0.0 * p)
    return d, qg


@triton.jit
def _distillation_loss_fwd_kernel(
    student_ptr,
    teacher_ptr,
    labels_ptr,
    loss_ptr,
    grad_ptr,
    n_rows,
    n_cols,
    stride_student,
    stride_teacher,
    stride_grad,
    temperature_ptr,
    inv_temperature,
    beta,
    soft_scale,
    hard_weight,
    label_smoothing,
    softcap,
    ignore_index,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_HARD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ROW_TEMPERATURE: tl.constexpr,
    SCALE_BY_T2: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    in_range = rows < n_rows
    # 1 / T as a column (BLOCK_ROWS, 1) and the divergence's weight per row: from one T (soft_scale includes
    # its T^2), or from each row's own T (soft_scale is soft_weight, times T_r^2 with SCALE_BY_T2).
    if ROW_TEMPERATURE:
        temperature = tl.load(temperature_ptr + rows, mask=in_range, other=1.0)
        inv_t = (1.0 / temperature)[:, None]
        row_soft_scale = tl.full([BLOCK_ROWS], soft_scale, tl.float32)
        if SCALE_BY_T2:
            row_soft_scale *= temperature * temperature
    else:
        inv_t = tl.full([BLOCK_ROWS, 1], inv_temperature, tl.float32)
        row_soft_scale = tl.full([BLOCK_ROWS], soft_scale, tl.float32)
    if HAS_LABELS:
        labels = tl.load(labels_ptr + rows, mask=in_range, other=ignore_index)
        counted = in_range & (labels != ignore_index)
    else:
        labels = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
        counted = in_range
    # 64-bit row offsets: N * V exceeds 2^31 at LLM sizes.
    student_rows = student_ptr + rows.to(tl.int64)[:, None] * stride_student
    teacher_rows = teacher_ptr + rows.to(tl.int64)[:, None] * stride_teacher
    cols = tl.arange(0, BLOCK_V)[None, :]

    # Pass 1: online log-sum-exp of s = c(z_s)/T, t = c(z_t)/T, and of c(z_s) (the hard term at T = 1).
    # Masked entries (ignored rows, columns past K) load as -inf, which the online update absorbs.
    m_s = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    m_t, m_h = m_s, m_s
    d_s = tl.zeros([BLOCK_ROWS], tl.float32)
    d_t, d_h = d_s, d_s
    sum_h = tl.zeros([BLOCK_ROWS], tl.float64)  # sum of c(z_s): fp32 overflows for logits near its limit
    for start in range(0, n_cols, BLOCK_V):
        mask = counted[:, None] & (start + cols < n_cols)
        c_s, _ = _load_capped(student_rows + start + cols, mask, softcap, HAS_SOFTCAP)
        c_t, _ = _load_capped(teacher_rows + start + cols, mask, softcap, HAS_SOFTCAP)
        m_s, d_s = online_logsumexp(m_s, d_s, c_s * inv_t)
        m_t, d_t = online_logsumexp(m_t, d_t, c_t * inv_t)
        if HAS_HARD:
            m_h, d_h = online_logsumexp(m_h, d_h, c_s)
            sum_h += tl.sum(tl.where(mask, c_s, 0.0).to(tl.float64), axis=1)
    # log-softmax as (x - max) - log(sum): x - max is exact near the max, where m + log(d) would round.
    log_d_s, log_d_t = tl.log(d_s), tl.log(d_t)

    # Pass 2: the row constant sum(qg) of the softmax chain rule (forward KL: exactly -1).
    # Row sums in fp64: the gradient q * (g - sum(q g)) cancels at a dominant token, and an fp32 sum's
    # rounding would be amplified there (one fp64 add per element is cheap in a memory-bound kernel).
    qg_sum = tl.full([BLOCK_ROWS], -1.0, tl.float64)
    if COMPUTE_GRAD and DIVERGENCE != FORWARD_KL:
        qg_sum = tl.zeros([BLOCK_ROWS], tl.float64)
        for start in range(0, n_cols, BLOCK_V):
            mask = counted[:, None] & (start + cols < n_cols)
            c_s, _ = _load_capped(student_rows + start + cols, mask, softcap, HAS_SOFTCAP)
            c_t, _ = _load_capped(teacher_rows + start + cols, mask, softcap, HAS_SOFTCAP)
            half_log_q = half_log_prob(c_s * inv_t, m_s, log_d_s)
            half_log_p = half_log_prob(c_t * inv_t, m_t, log_d_t)
            p, q = tl.exp(2.0 * half_log_p), tl.exp(2.0 * half_log_q)
            _, qg = divergence_terms(p, q, half_log_p, half_log_q, beta, DIVERGENCE)
            qg_sum += tl.sum(tl.where(mask, qg, 0.0).to(tl.float64), axis=1)

    # Pass 3: the divergence, and the gradient tile written once (zeros for ignored rows).
    row_constant = qg_sum.to(tl.float32)
    div = tl.zeros([BLOCK_ROWS], tl.float64)
    log_d_h = tl.log(d_h)
    for start in range(0, n_cols, BLOCK_V):
        in_cols = start + cols < n_cols
        mask = counted[:, None] & in_cols
        c_s, dc_s = _load_capped(student_rows + start + cols, mask, softcap, HAS_SOFTCAP)
        c_t, _ = _load_capped(teacher_rows + start + cols, mask, softcap, HAS_SOFTCAP)
        half_log_q = half_log_prob(c_s * inv_t, m_s, log_d_s)
        half_log_p = half_log_prob(c_t * inv_t, m_t, log_d_t)
        q = tl.exp(2.0 * half_log_q)
        d, qg = divergence_terms(tl.exp(2.0 * half_log_p), q, half_log_p, half_log_q, beta, DIVERGENCE)
        div += tl.sum(tl.where(mask, d, 0.0).to(tl.float64), axis=1)
        if COMPUTE_GRAD:
            # A weight of 0 contributes nothing, also where the divergence is infinite (not 0 * inf = NaN).
            soft = row_soft_scale[:, None]
            grad = tl.where(soft != 0.0, soft * inv_t * (qg - q * row_constant[:, None]), 0.0)
            if HAS_HARD:
                target = tl.where(start + cols == labels[:, None], 1.0 - label_smoothing, 0.0)
                grad += hard_weight * (
                    tl.exp((c_s - m_h[:, None]) - log_d_h[:, None]) - target - label_smoothing / n_cols
                )
            grad = tl.where(mask, grad * dc_s, 0.0)
            out = grad_ptr + rows.to(tl.int64)[:, None] * stride_grad + start + cols
            tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=in_range[:, None] & in_cols)

    # The row's loss in fp64 until the store: lse - c passes fp32's range for logits near its limit.
    loss = tl.where(row_soft_scale != 0.0, row_soft_scale.to(tl.float64) * div, 0.0)
    if HAS_HARD:
        safe_labels = tl.where(counted, labels, 0)
        c_y, _ = _load_capped(
            student_ptr + rows.to(tl.int64) * stride_student + safe_labels, counted, softcap, HAS_SOFTCAP
        )
        lse_h = m_h.to(tl.float64) + log_d_h.to(tl.float64)
        nll = lse_h - c_y.to(tl.float64)
        smoothing = tl.where(label_smoothing != 0.0, label_smoothing * (lse_h - sum_h / n_cols), 0.0)
        loss += hard_weight * ((1.0 - label_smoothing) * nll + smoothing)
    tl.store(loss_ptr + rows, tl.where(counted, loss, 0.0).to(tl.float32), mask=in_range)


def tiles(n_rows: int, vocab_size: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_V, num_warps): a large vocabulary is swept by one row per program in 4K-wide tiles,
    whole rows of a small one are packed 2K elements to a program, on 8 warps (ptxas, sm_90, every option on:
    80-105 registers per thread, where 4K tiles of 64 rows on 4 warps take 255 and spill 436 bytes)."""
    block_v = min(triton.next_power_of_2(vocab_size), 4096)
    block_rows = min(triton.next_power_of_2(n_rows), max(1, 2048 // block_v))
    return block_rows, block_v, 8 if block_rows * block_v >= 2048 else 4


def distillation_loss_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    row_loss: torch.Tensor,
    grad: torch.Tensor | None,
    divergence: int,
    beta: float,
    temperature: float | torch.Tensor,
    soft_weight: float,
    scale_by_t2: bool,
    hard_weight: float,
    label_smoothing: float,
    ignore_index: int,
    softcap: float,
    vocab_size: int,
) -> None:
    """Write the per-row losses into `row_loss` (N,) float32 and, unless `grad` is None, the gradient of
    each row's loss into its first `vocab_size` columns. student/teacher: (N, V) with unit column stride;
    labels: (N,) int64 or None (every row counts); temperature: a float, or (N,) float32 contiguous, one T
    per row (each row's divergence then times its own T^2 with scale_by_t2); softcap 0 means none."""
    n_rows = student.shape[0]
    if student.stride(-1) != 1 or teacher.stride(-1) != 1 or teacher.shape[0] != n_rows:
        raise ValueError(f"need (N, V) logits with unit column stride, got {student.shape}, {teacher.shape}")
    row_temperature = isinstance(temperature, torch.Tensor)
    if row_temperature and (temperature.shape != (n_rows,) or temperature.dtype != torch.float32):
        raise ValueError(
            f"temperature must be a float or ({n_rows},) float32, got {temperature.dtype} {temperature.shape}"
        )
    scalar_t = 1.0 if row_temperature else float(temperature)
    soft_scale = soft_weight * (scalar_t**2 if scale_by_t2 and not row_temperature else 1.0)
    block_rows, block_v, num_warps = tiles(n_rows, vocab_size)
    grid = (triton.cdiv(n_rows, block_rows),)
    _distillation_loss_fwd_kernel[grid](
        student,
        teacher,
        labels,
        row_loss,
        grad,
        n_rows,
        vocab_size,
        student.stride(0),
        teacher.stride(0),
        0 if grad is None else grad.stride(0),
        temperature.contiguous() if row_temperature else None,
        1.0 / scalar_t,
        beta,
        soft_scale,
        hard_weight,
        label_smoothing,
        softcap,
        ignore_index,
        DIVERGENCE=divergence,
        HAS_LABELS=labels is not None,
        HAS_HARD=hard_weight != 0.0,
        HAS_SOFTCAP=softcap != 0.0,
        COMPUTE_GRAD=grad is not None,
        ROW_TEMPERATURE=row_temperature,
        SCALE_BY_T2=scale_by_t2,
        BLOCK_ROWS=block_rows,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
