"""`FusedLinearDistillationLoss`: the module form of `tsa_fast.fused_linear_distillation_loss`."""

from __future__ import annotations

from torch import Tensor, nn

from tsa_fast.nn.distillation_loss import not_default
from tsa_fast.ops.distillation_loss import LOSS_OPTIONS
from tsa_fast.ops.fused_linear_distillation_loss import fused_linear_distillation_loss


class FusedLinearDistillationLoss(nn.Module):
    """`forward(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
    num_items_in_batch=None, **teacher)` = `fused_linear_distillation_loss(..., chunk_size=chunk_size,
    topk_tail=topk_tail, **options)`.

    Takes `chunk_size`, `topk_tail` and the keyword options of `tsa_fast.distillation_loss` (same names and
    defaults); `forward` takes the student and teacher tensors of the functional op (biases, teacher
    logits or top-k as keywords). Unknown option names raise TypeError.
    """

    def __init__(self, chunk_size: int | None = None, topk_tail: str = "bucket", **options) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(LOSS_OPTIONS))
        if unknown:
            raise TypeError(f"FusedLinearDistillationLoss got unknown options {unknown}; valid: {sorted(LOSS_OPTIONS)}")
        self.chunk_size, self.topk_tail = chunk_size, topk_tail
        self.options = {**LOSS_OPTIONS, **options}

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor | None = None,
        teacher_weight: Tensor | None = None,
        labels: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
        **teacher,
    ) -> Tensor:
        return fused_linear_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            chunk_size=self.chunk_size,
            topk_tail=self.topk_tail,
            num_items_in_batch=num_items_in_batch,
            **teacher,
            **self.options,
        )

    def extra_repr(self) -> str:
        shown = {k: v for k, v in self.options.items() if not_default(v, LOSS_OPTIONS[k])}
        if self.topk_tail != "bucket":
            shown = {"topk_tail": self.topk_tail, **shown}
        return ", ".join(f"{k}={v!r}" for k, v in {"chunk_size": self.chunk_size, **shown}.items())
