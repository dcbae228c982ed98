"""What the teacher side gives the student's loss, per batch: `TeacherTargets`.

`Teachers` runs one or more frozen teacher models (eval mode, under `torch.no_grad()`); `TopkTeacherCache`
(tsa_fast.distill.teacher_cache) reads the same targets from disk with no teacher in memory; `OwnTokenizerTeachers`
runs teachers of another tokenizer on the batch's text in their own tokens. Several
teachers are mixed as distributions: at temperature T the mixture sum_i w_i softmax(z_i / T) is given as the
logits T * logsumexp_i(log w_i + log_softmax(z_i / T)), whose softmax at T is exactly that mixture.
Hidden states and q/k/v come from the first teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tsa_fast.cross_tokenizer import alignment_from_groups
from tsa_fast.distill.protocols import Model
from tsa_fast.ops.cross_tokenizer_loss import TokenAlignment


@dataclass
class TeacherTargets:
    """One batch of teacher outputs; the loss uses whichever form is set.

    hidden + weight: a single LM teacher's last hidden states (B, N, H_t) and LM-head weight (V, H_t), for
    `fused_linear_distillation_loss` (no N x V logits). logits: (B, N, V) mixture logits or (B, C) class
    logits. topk: (indices, logprobs), each (B, N, k), at the loss temperature (from the cache).
    hidden_states / qkv: the first teacher's, when the hidden-state / attention losses ask for them.
    alignment + vocab_map: a teacher of another tokenizer (`OwnTokenizerTeachers`): the batch's `TokenAlignment`
    between the student's rows and the teacher's, and the (M, 2) pairs of shared token ids, for
    `cross_tokenizer_loss` (the teacher's outputs are then on its own rows, (B, N_t, ...)).
    """

    hidden: Tensor | None = None
    weight: Tensor | None = None
    logits: Tensor | None = None
    topk: tuple[Tensor, Tensor] | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    qkv: tuple[tuple[Tensor, Tensor, Tensor], ...] | None = None
    alignment: TokenAlignment | None = None
    vocab_map: Tensor | None = None

    def full_logits(self) -> Tensor:
        """The logits, computed from hidden + weight where needed (for evaluation)."""
        return self.logits if self.logits is not None else self.hidden @ self.weight.T


class Teachers:
    """Frozen teacher models (each a `Model`) and their mixture weights (normalized to sum to 1): a
    `TeacherSource` (tsa_fast.distill.protocols)."""

    def __init__(self, models: list[Model], weights: list[float], task: str):
        if len(models) != len(weights) or not models:
            raise ValueError(f"need one weight per teacher, got {len(models)} teachers and {len(weights)} weights")
        self.models = [model.eval().requires_grad_(False) for model in models]
        total = sum(weights)
        self.log_weights = [math.log(w / total) for w in weights]
        self.task = task

    def to(self, device: torch.device) -> Teachers:
        self.models = [model.to(device) for model in self.models]
        return self

    @torch.no_grad()
    def targets(
        self,
        batch: dict[str, Tensor],
        temperature: float = 1.0,
        *,
        fused: bool = False,
        hidden_states: bool = False,
        qkv: bool = False,
    ) -> TeacherTargets:
        """The teachers' outputs on `batch` (input_ids, optional attention_mask): the mixture logits at
        `temperature`, or with `fused` (one LM teacher) its last hidden state and LM-head weight; the first
        teacher's hidden states and q, k, v when asked."""
        outputs = [
            model(
                batch["input_ids"],
                batch.get("attention_mask"),
                output_hidden_states=hidden_states and i == 0,
                output_qkv=qkv and i == 0,
            )
            for i, model in enumerate(self.models)
        ]
        first = outputs[0]
        targets = TeacherTargets(hidden_states=first.hidden_states, qkv=first.qkv)
        if self.task == "lm" and fused and len(self.models) == 1:
            targets.hidden, targets.weight = first.hidden, self.models[0].lm_head_weight
            return targets
        logits = [self._head(model, out, batch) for model, out in zip(self.models, outputs)]
        targets.logits = logits[0] if len(logits) == 1 else mixture_logits(logits, self.log_weights, temperature)
        return targets

    def _head(self, model: Model, out, batch: dict[str, Tensor]) -> Tensor:
        if self.task == "lm":
            return model.logits(out.hidden)
        return model.classify(out.hidden, batch.get("attention_mask"))


class OwnTokenizerTeachers:
    """`Teachers` with a tokenizer of their own (one for all of them), a `TeacherSource`: per batch, their outputs
    on the batch's text in their tokens (`teacher_input_ids`), with the batch's alignment (`alignment_from_groups` of
    its `student_group`, `teacher_group`, `labels`, `teacher_labels`: `tsa_fast.distill.data.cross_tokenizer_blocks`)
    and `vocab_map` (M, 2), the pairs (student id, teacher id) of shared tokens (`tsa_fast.cross_tokenizer.
    vocabulary_map`)."""

    def __init__(self, teachers: Teachers, vocab_map: Tensor):
        self.teachers, self.vocab_map = teachers, vocab_map

    def to(self, device: torch.device) -> OwnTokenizerTeachers:
        self.teachers.to(device)
        self.vocab_map = self.vocab_map.to(device)
        return self

    @torch.no_grad()
    def targets(
        self,
        batch: dict[str, Tensor],
        temperature: float = 1.0,
        *,
        fused: bool = False,
        hidden_states: bool = False,
        qkv: bool = False,
    ) -> TeacherTargets:
        """The teachers' targets on the batch's teacher tokens (as `Teachers.targets`), with its alignment and the
        vocabulary map. Raises ValueError for hidden states or q, k, v (no position of the teacher's is one of the
        student's)."""
        if hidden_states or qkv:
            raise ValueError(
                "a teacher of another tokenizer gives no hidden states or q, k, v aligned to the student's"
            )
        targets = self.teachers.targets({"input_ids": batch["teacher_input_ids"]}, temperature, fused=fused)
        targets.alignment = alignment_from_groups(
            batch["student_group"], batch["teacher_group"], batch["labels"], batch["teacher_labels"]
        )
        targets.vocab_map = self.vocab_map
        return targets


def mixture_logits(logits: list[Tensor], log_weights: list[float], temperature: float) -> Tensor:
    """Logits whose softmax at `temperature` is sum_i w_i softmax(logits_i / temperature), in float32."""
    log_probs = torch.stack(
        [torch.log_softmax(z.float() / temperature, dim=-1) + log_w for z, log_w in zip(logits, log_weights)]
    )
    return temperature * torch.logsumexp(log_probs, dim=0)


class EncoderTeacher:
    """A frozen `Model` as a `TeacherSource`: per batch its last hidden states and, when asked, its hidden states
    and q/k/v (a recipe's own head on top, e.g. a span head, adds its logits)."""

    def __init__(self, model: Model):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def targets(
        self,
        batch: dict[str, Tensor],
        temperature: float = 1.0,
        *,
        fused: bool = False,
        hidden_states: bool = False,
        qkv: bool = False,
    ) -> TeacherTargets:
        """Teacher outputs on `batch` (input_ids, attention_mask); temperature and fused do not apply."""
        out = self.model(
            batch["input_ids"], batch["attention_mask"], output_hidden_states=hidden_states, output_qkv=qkv
        )
        return TeacherTargets(hidden=out.hidden, hidden_states=out.hidden_states, qkv=out.qkv)
