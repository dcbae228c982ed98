"""`distillation_loss`: the fused distillation loss (soft divergence + hard cross-entropy) from raw logits.

The forward pass of every backend computes the per-row losses *and* the gradient of each row's loss with
respect to the student logits (and, when asked, each row's soft and hard parts) in one pass over the
logits; backward only scales that stored gradient by the incoming gradient (in place: it needs no second
N x V buffer). The per-row op is a `torch.library` custom op, so `torch.compile(fullgraph=True)` traces it
without a graph break; the reduction over rows is plain PyTorch around it.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor

from tsa_fast.backends import cpp_extension, select_backend, triton_kernels
from tsa_fast.ops.checks import (
    DTYPE_CODES,
    FLOAT_DTYPES,
    check_bool,
    check_choice,
    check_int,
    check_real,
    is_real,
    traced,
)
from tsa_fast.reference import distillation_loss as reference  # the module
from tsa_fast.reference.distillation_loss import DIVERGENCES, REDUCTIONS, LossParts, reduce_rows

HUGE_PAGE_MIN_BYTES = 8 << 20


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float | Tensor = 1.0,
    scale_by_t2: bool = True,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    vocab_size: int | None = None,
    return_parts: bool = False,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor | tuple[Tensor, LossParts]:
    """Distillation loss between student and teacher logits, fused with its gradient.

    Args:
        student_logits: (..., V_s) float32/float16/bfloat16 (float64 runs the reference). Receives the gradient.
        teacher_logits: (..., V_t), same leading shape, device; a constant (no gradient).
        labels: (...) integer class ids or `ignore_index`; None counts every row (then hard_weight must be 0).
        divergence: "forward_kl" | "reverse_kl" | "symmetric_kl" | "jsd" | "tvd".
        beta: JSD mixing weight, strictly inside (0, 1). As beta -> 0 the JSD tends to beta x forward KL and
            as beta -> 1 to (1 - beta) x reverse KL (as in Liger and TRL): for those limits use
            divergence="forward_kl" (beta = 0) or "reverse_kl" (beta = 1).
        temperature: T > 0, finite; both distributions are softmax(c(z) / T). A number, or a float tensor
            (a constant: no gradient) of the leading shape, one T per row, or 0-d; on the logits' device
            (a 0-d one may be on the CPU). scale_by_t2 then scales each row by its own T^2.
        scale_by_t2: multiply the divergence by T^2 (Hinton et al.).
        soft_weight, hard_weight: weights of the divergence and of the cross-entropy (at T = 1) to labels.
        label_smoothing: in [0, 1), for the cross-entropy term.
        ignore_index: label value of rows that contribute nothing.
        reduction: "mean" (over counted rows; 0 if none count), "sum", "batchmean" (sum / rows), "none" (...).
        softcap: c(z) = softcap * tanh(z / softcap) applied to both logits when set (> 0).
        vocab_size: K <= V_s, V_t: use the first K columns of each (required when V_s != V_t).
        return_parts: also return the soft and hard parts of the loss (for logging): see Returns.
        num_items_in_batch: for reduction="mean", the number of counted rows (tokens) across all
            micro-batches and data-parallel ranks of the step: an int >= 1 or a 0-d integer tensor (on
            the logits' device or the CPU). The sum of row losses is divided by it instead of the local
            count, so summing the losses of the micro-batches gives exactly the full batch's mean.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or per-row losses of the leading shape for "none".
        With return_parts, `(loss, LossParts(soft, hard))`: the soft term (soft_weight x (T^2) x divergence)
        and the hard term (hard_weight x cross-entropy) of each row, reduced as the loss, detached (no
        gradient); they sum to the loss within rounding. They come from the same pass as the loss and its
        gradient (on the kernels, 8 bytes more written per row).

    Non-finite inputs (every backend alike): a -inf logit is a token of probability 0 (gradient 0 there); it
    makes a divergence +inf where the other model has mass there (reverse/symmetric KL for a -inf teacher
    logit), as it does the cross-entropy of a label on a -inf student logit without label smoothing. A NaN
    or +inf logit, or a counted teacher row of only -inf, makes that row's loss and gradient NaN. A term
    whose weight is 0 contributes nothing, even where it is infinite. Rows that do not count are never read.

    Raises:
        TypeError: an option of the wrong type (a flag that is not a bool, a number that is not an int or
            float, a string option that is not a string), naming it.
        ValueError: any bad value, shape, dtype or device, naming the offending values; labels outside
            [0, K) other than ignore_index (on CUDA, checked asynchronously on the device).
    """
    options = dict(
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        scale_by_t2=scale_by_t2,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=softcap,
        vocab_size=vocab_size,
        return_parts=return_parts,
    )
    check_tensor("student_logits", student_logits)
    check_tensor("teacher_logits", teacher_logits, like=("student_logits", student_logits))
    check_labels_tensor(labels, student_logits.shape[:-1], student_logits.device)
    vocab = check_loss_options(options, student_logits.shape[-1], teacher_logits.shape[-1], labels is not None)
    check_num_items(num_items_in_batch, reduction)
    leading_shape = student_logits.shape[:-1]
    options["temperature"] = row_temperatures(temperature, leading_shape, student_logits)
    flat_labels = None if labels is None else labels.reshape(-1)
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    rows, parts = distillation_loss_rows_autograd(student, teacher, flat_labels, options, vocab, return_parts)
    counted = None if flat_labels is None else flat_labels != ignore_index
    loss = reduce_loss_rows(rows, counted, reduction, leading_shape, num_items_in_batch)
    if not return_parts:
        return loss
    return loss, LossParts(*(reduce_loss_rows(p, counted, reduction, leading_shape, num_items_in_batch) for p in parts))


def reduce_loss_rows(rows: Tensor, counted: Tensor | None, reduction: str, leading_shape, num_items) -> Tensor:
    """`reduce_rows`, with reduction="mean" over num_items_in_batch rows when it is given."""
    if num_items is not None:
        return rows.sum() / num_items
    return reduce_rows(rows, counted, reduction, leading_shape)


# The keyword options of the loss and their defaults, shared by every op and module that takes them (all but
# the per-batch num_items_in_batch).
LOSS_OPTIONS = {
    name: p.default
    for name, p in inspect.signature(distillation_loss).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name != "num_items_in_batch"
}
# The options a row's loss depends on (the rest say which rows count, which columns and how rows reduce).
ROW_OPTIONS = (
    "divergence",
    "beta",
    "temperature",
    "scale_by_t2",
    "soft_weight",
    "hard_weight",
    "label_smoothing",
    "ignore_index",
    "softcap",
)


def check_num_items(num_items_in_batch, reduction: str) -> None:
    """None, or (with reduction="mean") an int >= 1 or a 0-d integer tensor: a TypeError for a wrong type,
    a ValueError for a wrong shape or value (a tensor's value: on CPU; on CUDA an asynchronous device assert;
    skipped while torch.compile traces)."""
    value = num_items_in_batch
    if value is None:
        return
    if isinstance(value, Tensor):
        right_type = value.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
    else:
        right_type = isinstance(value, int) and not isinstance(value, bool)
    if not right_type:
        shown = f"a {value.dtype} tensor" if isinstance(value, Tensor) else f"{value!r} ({type(value).__name__})"
        raise TypeError(f"num_items_in_batch must be an int or a 0-d integer tensor, got {shown}")
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch applies to reduction='mean', got {reduction!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"num_items_in_batch must be >= 1, got {value}")
        return
    if value.dim() != 0:
        raise ValueError(f"num_items_in_batch must be a 0-d tensor, got shape {tuple(value.shape)}")
    if traced(value):
        return
    if value.device.type == "cpu":
        if value < 1:
            raise ValueError(f"num_items_in_batch must be >= 1, got {int(value)}")
    else:
        torch._assert_async(value >= 1, "tsa_fast: num_items_in_batch must be >= 1")


def row_temperatures(temperature, leading_shape: torch.Size, logits: Tensor) -> float | Tensor:
    """A number stays; a tensor temperature (0-d or of the leading shape) becomes the (N,) per-row
    temperatures, detached, in fp32 (float64 for float64 logits), on the logits' device, values checked."""
    if not isinstance(temperature, Tensor):
        return temperature
    if not temperature.is_floating_point():
        raise TypeError(f"temperature must be a floating-point tensor, got {temperature.dtype}")
    if temperature.dim() != 0 and temperature.shape != leading_shape:
        raise ValueError(
            f"temperature must be a 0-d tensor or of the leading shape {tuple(leading_shape)}, "
            f"got {tuple(temperature.shape)}"
        )
    if temperature.device != logits.device and not (temperature.dim() == 0 and temperature.device.type == "cpu"):
        raise ValueError(f"temperature on {temperature.device} but the logits on {logits.device}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = temperature.detach().to(logits.device, dtype).expand(leading_shape).reshape(-1)
    check_temperature_values(rows)
    return rows


def check_temperature_values(temperature: Tensor) -> None:
    """Per-row temperatures must be finite and > 0: a ValueError on the CPU, an asynchronous device assert on
    CUDA; skipped while torch.compile traces."""
    if traced(temperature):
        return
    bad = ~(temperature.isfinite() & (temperature > 0))
    if temperature.device.type == "cpu":
        if bad.any():
            raise ValueError(f"temperature must be finite and > 0, got {temperature[bad][:8].tolist()}")
    else:
        torch._assert_async(~bad.any(), "tsa_fast: temperature must be finite and > 0")


def distillation_loss_rows_autograd(
    student: Tensor, teacher: Tensor, labels: Tensor | None, options: dict, vocab: int, with_parts: bool = False
) -> tuple[Tensor, LossParts | None]:
    """Per-row losses (N,) of (N, V) logits, differentiable w.r.t. `student`, on the selected backend; with
    `with_parts` also their per-row parts (detached) from the same pass, else None."""
    if select_backend(student.device, torch.promote_types(student.dtype, teacher.dtype)) == "torch":
        # The reference itself, differentiated by autograd (and traced by torch.compile as plain ops;
        # there the data-dependent label check is left to the ops that index with the labels).
        if labels is not None:
            check_label_range(labels, vocab, options["ignore_index"])
        rows, parts = _reference_rows(student, teacher, labels, options, vocab)
        return rows, parts if with_parts else None
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    rows, _, parts = _kernel_rows(student, teacher, labels, options, vocab, compute_grad, with_parts)
    return rows, parts


def distillation_loss_rows_and_grad(
    student: Tensor, teacher: Tensor, labels: Tensor | None, options: dict, vocab: int, with_parts: bool = False
) -> tuple[Tensor, Tensor, LossParts | None]:
    """Per-row losses (N,), d(row loss)/d(student) (N, V_s) and, with `with_parts`, the per-row parts (else
    None), from one pass outside autograd, on the selected backend."""
    if select_backend(student.device, torch.promote_types(student.dtype, teacher.dtype)) == "torch":
        if labels is not None:
            check_label_range(labels, vocab, options["ignore_index"])
        rows, grad, parts = rows_and_grad_by_autograd(
            lambda z: _reference_rows(z, teacher, labels, options, vocab), student
        )
        return rows, grad, parts if with_parts else None
    return _kernel_rows(student, teacher, labels, options, vocab, True, with_parts)


def rows_and_grad_by_autograd(row_fn, student: Tensor) -> tuple[Tensor, Tensor, LossParts]:
    """row_fn(student) -> ((N,) losses, their LossParts), and the gradient of each row's loss, by autograd."""
    with torch.enable_grad():
        z = student.detach().requires_grad_()
        rows, parts = row_fn(z)
        (grad,) = torch.autograd.grad(rows.sum(), z)
    return rows.detach(), grad, parts


def _reference_rows(student, teacher, labels, options, vocab) -> tuple[Tensor, LossParts]:
    return reference.distillation_loss_rows(
        student,
        teacher,
        labels,
        divergence_name=options["divergence"],
        beta=options["beta"],
        temperature=options["temperature"],
        scale_by_t2=options["scale_by_t2"],
        soft_weight=options["soft_weight"],
        hard_weight=options["hard_weight"],
        label_smoothing=options["label_smoothing"],
        ignore_index=options["ignore_index"],
        softcap=options["softcap"],
        vocab_size=vocab,
        return_parts=True,
    )


def _kernel_rows(
    student, teacher, labels, options, vocab, compute_grad, compute_parts
) -> tuple[Tensor, Tensor, LossParts | None]:
    """The custom op, with the options in its encoding (divergence code; per-row temperatures, (N,) fp32, as
    row_temperature beside the float, which they then replace); the parts as LossParts, or None."""
    temperature = options["temperature"]
    per_row = isinstance(temperature, Tensor)
    rows, grad, parts = torch.ops.tsa_fast.distillation_loss_rows(
        student,
        teacher,
        labels,
        DIVERGENCES.index(options["divergence"]),
        float(options["beta"]),
        1.0 if per_row else float(temperature),
        temperature if per_row else None,
        float(options["soft_weight"]),
        options["scale_by_t2"],
        float(options["hard_weight"]),
        float(options["label_smoothing"]),
        int(options["ignore_index"]),
        float(options["softcap"] or 0.0),
        vocab,
        compute_grad,
        compute_parts,
    )
    return rows, grad, LossParts(*parts.detach()) if compute_parts else None


def check_tensor(name: str, tensor, like: tuple[str, Tensor] | None = None) -> None:
    """A float tensor with a non-empty last dim; with `like`, on its device with its leading shape."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32/float16/bfloat16/float64, got {tensor.dtype}")
    if tensor.dim() < 1 or tensor.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dim, got shape {tuple(tensor.shape)}")
    if like is not None:
        other_name, other = like
        if tensor.device != other.device:
            raise ValueError(f"{other_name} on {other.device} but {name} on {tensor.device}")
        if tensor.shape[:-1] != other.shape[:-1]:
            raise ValueError(
                f"leading shapes differ: {other_name} {tuple(other.shape)} vs {name} {tuple(tensor.shape)}"
            )


def check_labels_tensor(labels, leading_shape: torch.Size, device: torch.device) -> None:
    """None, or an int64/int32 tensor of the leading shape on `device` (values are checked by the op)."""
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be the leading shape {tuple(leading_shape)}")
    if labels.device != device:
        raise ValueError(f"labels on {labels.device} but logits on {device}")


def check_loss_options(options: dict, student_vocab: int, teacher_vocab: int, has_labels: bool) -> int:
    """Validate the loss options (`LOSS_OPTIONS` names): a wrong type is a TypeError, a wrong value a
    ValueError, each naming the option. Returns the vocabulary size K to use."""
    check_choice("divergence", options["divergence"], DIVERGENCES)
    check_choice("reduction", options["reduction"], REDUCTIONS)
    check_bool("scale_by_t2", options["scale_by_t2"])
    check_bool("return_parts", options["return_parts"])
    for name in ("beta", "soft_weight", "hard_weight", "label_smoothing"):
        check_real(name, options[name])
    temperature = options["temperature"]
    if not isinstance(temperature, Tensor) and not is_real(temperature):
        raise TypeError(f"temperature must be a number or a tensor, got {temperature!r} ({type(temperature).__name__})")
    check_int("ignore_index", options["ignore_index"])
    if options["softcap"] is not None:
        check_real("softcap", options["softcap"])
    if options["vocab_size"] is not None:
        check_int("vocab_size", options["vocab_size"])

    vocab_size = options["vocab_size"]
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"vocabulary sizes differ: student {student_vocab} vs teacher {teacher_vocab}; "
                f"pass vocab_size=K <= {min(student_vocab, teacher_vocab)}"
            )
        vocab_size = student_vocab
    elif not 1 <= vocab_size <= min(student_vocab, teacher_vocab):
        raise ValueError(
            f"vocab_size must be in [1, {min(student_vocab, teacher_vocab)}] "
            f"(student {student_vocab}, teacher {teacher_vocab}), got {vocab_size!r}"
        )
    beta = options["beta"]
    if options["divergence"] == "jsd" and not 0.0 < beta < 1.0:
        # As beta -> 0 this JSD tends to beta * KL(P_t || P_s), as beta -> 1 to (1 - beta) * KL(P_s || P_t).
        limit = "beta -> 0 it tends to beta * forward KL: use divergence='forward_kl'"
        if beta >= 1.0:
            limit = "beta -> 1 it tends to (1 - beta) * reverse KL: use divergence='reverse_kl'"
        raise ValueError(f"jsd needs beta strictly inside (0, 1), got beta={beta!r}; as {limit}")
    if not isinstance(temperature, Tensor) and (not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    for name in ("soft_weight", "hard_weight"):
        if not math.isfinite(options[name]) or options[name] < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {options[name]!r}")
    if options["hard_weight"] != 0 and not has_labels:
        raise ValueError(f"hard_weight={options['hard_weight']!r} needs labels; pass labels or hard_weight=0")
    if not 0.0 <= options["label_smoothing"] < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {options['label_smoothing']!r}")
    softcap = options["softcap"]
    if softcap is not None and (not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be None or finite and > 0, got {softcap!r}")
    return vocab_size


def check_label_range(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Labels must be in [0, vocab) or ignore_index. On CPU: ValueError. On CUDA: an asynchronous device
    assert (as PyTorch's cross_entropy does), so the hot path never waits for the host. Skipped while
    torch.compile traces (the kernels' custom op checks again when it runs)."""
    if traced(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.device.type == "cpu":
        if bad.any():
            raise ValueError(
                f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; got {labels[bad][:8].tolist()}"
            )
    else:
        torch._assert_async(~bad.any(), f"tsa_fast.distillation_loss: labels outside [0, {vocab}) and != ignore_index")


@torch.library.custom_op("tsa_fast::distillation_loss_rows", mutates_args=())
def distillation_loss_rows(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    divergence: int,
    beta: float,
    temperature: float,
    row_temperature: Tensor | None,
    soft_weight: float,
    scale_by_t2: bool,
    hard_weight: float,
    label_smoothing: float,
    ignore_index: int,
    softcap: float,
    vocab_size: int,
    compute_grad: bool,
    compute_parts: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row losses (N,) float32; when compute_grad, d(row loss)/d(student) (N, V_s) in `grad_dtype`
    (zeros past vocab_size), else an empty tensor; when compute_parts, the rows' soft and hard parts
    (2, N) float32 from the same kernel launch (no gradient), else an empty tensor. softcap = 0 means none.
    row_temperature, (N,) fp32 or None, replaces `temperature` row by row (scale_by_t2 then scales each row
    by its own T^2, in the kernel). Runs the triton or cpp kernels; `distillation_loss` calls the reference
    directly when the torch backend is selected."""
    if labels is not None:
        check_label_range(labels, vocab_size, ignore_index)
        labels = labels.long().contiguous()
    if row_temperature is not None:
        check_temperature_values(row_temperature)
        temperature = row_temperature
    student, teacher = _unit_column_stride(student), _unit_column_stride(teacher)
    row_loss = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
    grad = _grad_buffer(student, vocab_size) if compute_grad else None
    parts = torch.empty(2, student.shape[0], dtype=torch.float32, device=student.device) if compute_parts else None
    backend = select_backend(student.device, student.dtype)
    if backend == "torch":
        raise ValueError(f"no kernel backend for {student.dtype} on {student.device.type}: call distillation_loss")
    launch = distillation_loss_forward_cpp if backend == "cpp" else triton_kernels.distillation_loss_forward
    if student.shape[0] > 0:
        launch(
            student,
            teacher,
            labels,
            row_loss,
            grad,
            divergence,
            beta,
            temperature,
            soft_weight,
            scale_by_t2,
            hard_weight,
            label_smoothing,
            ignore_index,
            softcap,
            vocab_size,
            row_parts=parts,
        )
    empty = lambda dtype: student.new_empty(0, dtype=dtype)  # noqa: E731 (outputs may not alias)
    return (
        row_loss,
        empty(grad_dtype(student.dtype)) if grad is None else grad,
        empty(torch.float32) if parts is None else parts,
    )


@distillation_loss_rows.register_fake
def _(
    student,
    teacher,
    labels,
    divergence,
    beta,
    temperature,
    row_temperature,
    soft_weight,
    scale_by_t2,
    hard_weight,
    label_smoothing,
    ignore_index,
    softcap,
    vocab_size,
    compute_grad,
    compute_parts,
):
    rows = student.new_empty(student.shape[0], dtype=torch.float32)
    grad = student.new_empty(student.shape if compute_grad else (0,), dtype=grad_dtype(student.dtype))
    return rows, grad, student.new_empty((2, student.shape[0]) if compute_parts else (0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.student_dtype = inputs[0].dtype
    ctx.set_materialize_grads(False)  # the stored-gradient and parts outputs get no incoming gradient


def _backward(ctx, grad_rows, _grad, _parts):
    (grad,) = ctx.saved_tensors
    # In place: the stored gradient is consumed (a second backward through it raises autograd's
    # "modified by an inplace operation" error instead of returning a wrong number), then rounded once.
    return (grad.mul_(grad_rows.unsqueeze(-1)).to(ctx.student_dtype),) + (None,) * 15


distillation_loss_rows.register_autograd(_backward, setup_context=_setup_context)


def _unit_column_stride(logits: Tensor) -> Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def grad_dtype(student_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the stored d(row loss)/d(student): float32 for a float16 student (at LLM vocabularies
    most entries are below fp16's normal range; backward scales them by the incoming gradient, a loss scale,
    and rounds the product once), else the student's dtype (bf16 has fp32's range)."""
    return torch.float32 if student_dtype == torch.float16 else student_dtype


def _grad_buffer(student: Tensor, vocab_size: int) -> Tensor:
    """Where the kernels write the gradient: the first vocab_size columns; the rest stay zero. A large
    host buffer is backed by huge pages before its first touch (page faults would cost as much as the
    kernel)."""
    grad = torch.empty_like(student, dtype=grad_dtype(student.dtype), memory_format=torch.contiguous_format)
    if grad.device.type == "cpu" and cpp_extension is not None and grad.nbytes >= HUGE_PAGE_MIN_BYTES:
        cpp_extension.advise_huge_pages(grad.data_ptr(), grad.nbytes)
    return grad if vocab_size == student.shape[1] else grad.zero_()


def distillation_loss_forward_cpp(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor | None,
    row_loss: Tensor,
    grad: Tensor | None,
    divergence: int,
    beta: float,
    temperature: float | Tensor,
    soft_weight: float,
    scale_by_t2: bool,
    hard_weight: float,
    label_smoothing: float,
    ignore_index: int,
    softcap: float,
    vocab_size: int,
    row_parts: Tensor | None = None,
) -> None:
    """The C++ kernels of `tsa_fast._C` (CPU with OpenMP, or CUDA), called with raw pointers; same
    contract as the Triton launcher `tsa_fast.kernels.distillation_loss_forward` (temperature: a float, or
    (N,) float32, one T per row; row_parts: None or (2, N) float32 contiguous, the rows' soft and hard
    parts)."""
    ext = cpp_extension
    row_temperature = isinstance(temperature, Tensor)
    if row_temperature:
        if temperature.shape != (student.shape[0],) or temperature.dtype != torch.float32:
            raise ValueError(
                f"temperature must be a float or ({student.shape[0]},) float32, got {temperature.dtype} "
                f"{tuple(temperature.shape)}"
            )
        temperature = temperature.contiguous()
    if row_parts is not None and (
        row_parts.shape != (2, student.shape[0]) or row_parts.dtype != torch.float32 or not row_parts.is_contiguous()
    ):
        raise ValueError(
            f"row_parts must be (2, {student.shape[0]}) float32 contiguous, got {row_parts.dtype} "
            f"{tuple(row_parts.shape)}"
        )
    scalar_t = 1.0 if row_temperature else float(temperature)
    soft_scale = soft_weight * (scalar_t**2 if scale_by_t2 and not row_temperature else 1.0)
    args = [
        student.data_ptr(),
        DTYPE_CODES[student.dtype],
        student.stride(0),
        teacher.data_ptr(),
        DTYPE_CODES[teacher.dtype],
        teacher.stride(0),
        0 if labels is None else labels.data_ptr(),
        row_loss.data_ptr(),
        0 if row_parts is None else row_parts.data_ptr(),
        0 if grad is None else grad.data_ptr(),
        0 if grad is None else grad.stride(0),
        student.shape[0],
        vocab_size,
        divergence,
        beta,
        1.0 / scalar_t,
        temperature.data_ptr() if row_temperature else 0,
        soft_scale,
        scale_by_t2,
        hard_weight,
        label_smoothing,
        softcap,
        ignore_index,
    ]
    if student.is_cuda:
        with torch.cuda.device(student.device):
            ext.distillation_loss_forward_cuda(*args, torch.cuda.current_stream().cuda_stream)
    else:
        ext.distillation_loss_forward_cpu(*args)
