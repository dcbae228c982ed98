"""`DistillationLoss`: the module form of `tsa_fast.distillation_loss`."""

from __future__ import annotations

from torch import Tensor, nn

from tsa_fast.ops.distillation_loss import LOSS_OPTIONS, distillation_loss


class DistillationLoss(nn.Module):
    """`forward(student_logits, teacher_logits, labels=None, num_items_in_batch=None)` =
    `distillation_loss(..., num_items_in_batch=num_items_in_batch, **options)`.

    Takes the keyword options of `tsa_fast.distillation_loss` (same names and defaults). Unknown option
    names raise TypeError; bad option types (TypeError) and values (ValueError) raise at the first forward,
    as the op does.
    """

    def __init__(self, **options) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(LOSS_OPTIONS))
        if unknown:
            raise TypeError(f"DistillationLoss got unknown options {unknown}; valid: {sorted(LOSS_OPTIONS)}")
        self.options = {**LOSS_OPTIONS, **options}

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        return distillation_loss(
            student_logits, teacher_logits, labels, num_items_in_batch=num_items_in_batch, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if not_default(v, LOSS_OPTIONS[k]))


def not_default(value, default) -> bool:
    """Whether an option differs from its default (a tensor, such as a temperature tensor, always does)."""
    return isinstance(value, Tensor) or value != default
