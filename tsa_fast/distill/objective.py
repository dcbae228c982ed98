"""The student's training loss: logit distillation + hard labels + hidden states + attention transfer.

    loss = [logit_weight * T^2 * D(P_t || P_s) + hard_weight * CE(labels)]     (the fused ops, one call)
         + hidden_weight * mean over mapped layers of MSE or (1 - cosine) of W h_s and h_t
         + attention_weight * mean over mapped layers and relations of KL(A_t || A_s)

Without a teacher (teacher pre-training, the baseline student) it is the cross-entropy to the labels. With a
teacher of another tokenizer (targets with an alignment) the logit part is `cross_tokenizer_loss` over the
batch's aligned spans (`loss.cross_tokenizer`).
Under gradient accumulation and data parallelism the logit part is normalized by the counted labels of the
whole optimizer step (`items`, summed by the Distiller over micro-batches and ranks: the ops'
`num_items_in_batch`), so that uneven micro-batches give exactly the full batch's token mean (the
cross-tokenizer loss, a mean over its own groups and labels, is weighted by the batch's share of the labels).
Weights and temperature may follow a `Schedule` over training progress. The logit part (`output_loss`)
is also what adversarial training applies to perturbed inputs. The learned projection W (student width
to teacher width, TinyBERT-style, one shared matrix) lives here and trains with the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsa_fast.distill.config import LossConfig, value_at
from tsa_fast.distill.on_policy import IGNORE_INDEX
from tsa_fast.distill.protocols import Model, ModelShape
from tsa_fast.distill.teachers import TeacherTargets
from tsa_fast.models import default_layer_map, gathered
from tsa_fast.ops.attention_transfer_loss import attention_transfer_loss
from tsa_fast.ops.cross_tokenizer_loss import cross_tokenizer_loss
from tsa_fast.ops.distillation_loss import distillation_loss
from tsa_fast.ops.fused_linear_cross_tokenizer_loss import fused_linear_cross_tokenizer_loss
from tsa_fast.ops.fused_linear_distillation_loss import fused_linear_distillation_loss


def student_head(student: Model, out, batch: dict[str, Tensor], task: str) -> Tensor:
    """The student's logits: (B, N, V) for LM, (B, C) for classification."""
    return student.logits(out.hidden) if task == "lm" else student.classify(out.hidden, batch.get("attention_mask"))


class DistillationObjective(nn.Module):
    """Loss terms of one training phase, for a student and a teacher of these shapes (their `config`s: a
    `TransformerConfig`, an `HFModel`'s). `teacher_config=None`: cross-entropy only (no teacher)."""

    def __init__(self, config: LossConfig, task: str, student_config: ModelShape, teacher_config: ModelShape | None):
        super().__init__()
        self.config, self.task, self.has_teacher = config, task, teacher_config is not None
        self.hidden_map = self.attention_map = []
        self.projection = None
        if teacher_config is None:
            return
        n_s, n_t = student_config.n_layers, teacher_config.n_layers
        if _may_be_nonzero(config.hidden_weight):
            # Hidden-state indices: 0 = embeddings, i = output of block i - 1.
            default = [(0, 0)] + [(s + 1, t + 1) for s, t in default_layer_map(n_s, n_t)]
            self.hidden_map = _checked_map(config.hidden_layer_map or default, n_s + 1, n_t + 1, "hidden_layer_map")
            if student_config.d_model != teacher_config.d_model:
                self.projection = nn.Linear(student_config.d_model, teacher_config.d_model, bias=False)
        if _may_be_nonzero(config.attention_weight):
            default = [(n_s - 1, n_t - 1)]
            self.attention_map = _checked_map(config.attention_layer_map or default, n_s, n_t, "attention_layer_map")

    @property
    def needs_hidden_states(self) -> bool:
        return bool(self.hidden_map)

    @property
    def needs_qkv(self) -> bool:
        return bool(self.attention_map)

    def temperature(self, progress: float) -> float:
        return value_at(self.config.temperature, progress)

    def items(self, batch: dict[str, Tensor]) -> Tensor | None:
        """The number of rows `output_loss` averages over in `batch` (0-d int64, on the batch's device: counting
        syncs nothing): its counted labels for the LM task; None where every batch of a size counts the same."""
        return (batch["labels"] != IGNORE_INDEX).sum() if self.task == "lm" else None

    def output_loss(
        self,
        student: Model,
        out,
        batch: dict[str, Tensor],
        teacher: TeacherTargets | None,
        progress: float,
        num_items: Tensor | None = None,
    ) -> Tensor:
        """The logit-level loss: distillation + hard labels with a teacher, cross-entropy without. With
        `num_items` (a 0-d integer tensor >= 1), the sum over this batch's counted rows divided by it instead of
        their mean."""
        labels = batch["labels"]
        if teacher is None:
            logits = student_head(student, out, batch, self.task).flatten(0, -2).float()
            if num_items is None:
                return F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX)
            return F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum") / num_items
        c = self.config
        if teacher.alignment is not None:
            loss = self.cross_tokenizer_output_loss(student, out, labels, teacher, progress)
            return loss if num_items is None else loss * self.items(batch) / num_items
        options = dict(
            divergence=c.divergence,
            beta=c.beta,
            temperature=self.temperature(progress),
            scale_by_t2=c.scale_by_t2,
            soft_weight=value_at(c.logit_weight, progress),
            # An on-policy batch's labels are the student's own samples: no cross-entropy to them (GKD).
            hard_weight=0.0 if batch.get("on_policy") else value_at(c.hard_weight, progress),
            label_smoothing=c.label_smoothing,
        )
        if self.task == "lm" and (c.fused or teacher.topk is not None):
            with gathered(student.lm_head_weight, teacher.weight):  # ZeRO-3: whole for the loss only
                return fused_linear_distillation_loss(
                    out.hidden,
                    student.lm_head_weight,
                    teacher.hidden,
                    teacher.weight,
                    labels,
                    teacher_logits=teacher.logits,
                    teacher_topk=teacher.topk,
                    chunk_size=c.chunk_size,
                    num_items_in_batch=num_items,
                    **options,
                )
        logits = student_head(student, out, batch, self.task)
        return distillation_loss(logits, teacher.full_logits(), labels, num_items_in_batch=num_items, **options)

    def cross_tokenizer_output_loss(
        self, student: Model, out, labels: Tensor, teacher: TeacherTargets, progress: float
    ) -> Tensor:
        """The cross-tokenizer loss of the student's rows against the teacher's own rows (`teacher.alignment`,
        `teacher.vocab_map`), its two terms times logit_weight, plus the hard cross-entropy: with `fused` and a
        teacher given as hidden + weight, `fused_linear_cross_tokenizer_loss` (no N x V logits), else
        `cross_tokenizer_loss` of the logits."""
        c, logit_weight = self.config, value_at(self.config.logit_weight, progress)
        options = dict(
            alignment=teacher.alignment,
            vocab_map=teacher.vocab_map,
            labels=labels.flatten(),
            divergence=c.divergence,
            beta=c.beta,
            temperature=self.temperature(progress),
            exact_weight=logit_weight * c.cross_tokenizer.exact_weight,
            uld_weight=logit_weight * c.cross_tokenizer.uld_weight,
            uld_top_k=c.cross_tokenizer.uld_top_k,
            hard_weight=value_at(c.hard_weight, progress),
        )
        if c.fused and teacher.logits is None:
            with gathered(student.lm_head_weight, teacher.weight):  # ZeRO-3: whole for the loss only
                return fused_linear_cross_tokenizer_loss(
                    out.hidden.flatten(0, 1),
                    student.lm_head_weight,
                    teacher.hidden.flatten(0, 1),
                    teacher.weight,
                    chunk_size=c.chunk_size,
                    **options,
                )
        return cross_tokenizer_loss(
            student.logits(out.hidden).flatten(0, 1), teacher.full_logits().flatten(0, 1), **options
        )

    def forward(
        self,
        student: Model,
        out,
        batch: dict[str, Tensor],
        teacher: TeacherTargets | None,
        progress: float,
        num_items: Tensor | None = None,
        micro_batches: int = 1,
    ) -> tuple[Tensor, dict[str, float]]:
        """(total loss, {term name: value}) for one batch; `out` is the student's forward output. With
        `num_items`, the counted labels of the whole optimizer step over its `micro_batches` micro-batches (the
        step's grad_accum x world_size), the logit part is this batch's share of the step's sum, times
        `micro_batches`: the optimizer's mean over micro-batches and ranks then gives the step's token mean."""
        loss = self.output_loss(student, out, batch, teacher, progress, num_items)
        if num_items is not None:
            loss = loss * micro_batches
        terms = {"logit" if teacher is not None else "ce": loss.detach()}
        mask = batch.get("attention_mask")
        if self.hidden_map:
            hidden = self.hidden_state_loss(out.hidden_states, teacher.hidden_states, mask)
            loss = loss + value_at(self.config.hidden_weight, progress) * hidden
            terms["hidden"] = hidden.detach()
        if self.attention_map:
            attention = self.attention_transfer(out.qkv, teacher.qkv, mask)
            loss = loss + value_at(self.config.attention_weight, progress) * attention
            terms["attention"] = attention.detach()
        return loss, terms

    def hidden_state_loss(self, student_states, teacher_states, mask: Tensor | None) -> Tensor:
        """Mean over mapped pairs of MSE (or 1 - cosine) between projected student and teacher states, over
        real tokens."""
        losses = []
        for s, t in self.hidden_map:
            h_s, h_t = student_states[s].float(), teacher_states[t].float()
            if self.projection is not None:
                h_s = self.projection(h_s)
            if self.config.hidden_loss == "mse":
                per_token = (h_s - h_t).pow(2).mean(-1)
            else:
                per_token = 1 - F.cosine_similarity(h_s, h_t, dim=-1)
            losses.append(per_token.mean() if mask is None else per_token[mask.bool()].mean())
        return torch.stack(losses).mean()

    def attention_transfer(self, student_qkv, teacher_qkv, mask: Tensor | None) -> Tensor:
        """Mean over mapped blocks and relations of KL(A_t || A_s) (`attention_transfer_loss`)."""
        pick = {"qk": (0, 1), "qq": (0, 0), "kk": (1, 1), "vv": (2, 2)}
        losses = []
        for s, t in self.attention_map:
            for relation in self.config.attention_relations:
                a, b = pick[relation]
                losses.append(
                    attention_transfer_loss(
                        student_qkv[s][a],
                        student_qkv[s][b],
                        teacher_qkv[t][a],
                        teacher_qkv[t][b],
                        causal=self.task == "lm",
                        key_padding_mask=None if mask is None else mask.bool(),
                        relation_heads=self.config.relation_heads,
                    )
                )
        return torch.stack(losses).mean()


def _may_be_nonzero(weight) -> bool:
    return value_at(weight, 0.0) != 0.0 or value_at(weight, 1.0) != 0.0


def _checked_map(pairs, n_student: int, n_teacher: int, name: str) -> list[tuple[int, int]]:
    for s, t in pairs:
        if not (0 <= s < n_student and 0 <= t < n_teacher):
            raise ValueError(
                f"loss.{name}: pair ({s}, {t}) out of range (student < {n_student}, teacher < {n_teacher})"
            )
    return [tuple(pair) for pair in pairs]
