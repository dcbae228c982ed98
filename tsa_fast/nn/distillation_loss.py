"""`DistillationLoss`: the module form of `tsa_fast.distillation_loss`."""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from tsa_fast.ops.distillation_loss import distillation_loss

# The keyword options and their defaults, read from the functional op so the two never drift apart.
_OPTIONS = {
    name: p.default for name, p in inspect.signature(distillation_loss).parameters.items() if p.kind is p.KEYWORD_ONLY
}


class DistillationLoss(nn.Module):
    """`forward(student_logits, teacher_logits, labels=None)` = `distillation_loss(..., **options)`.

    Takes the keyword options of `tsa_fast.distillation_loss` (same names and defaults). Unknown option
    names raise TypeError; bad values raise ValueError at the first forward, as the op does.
    """

    def __init__(self, **options) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"DistillationLoss got unknown options {unknown}; valid: {sorted(_OPTIONS)}")
        self.options = {**_OPTIONS, **options}

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v != _OPTIONS[k])
