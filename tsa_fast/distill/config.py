"""The engine's option sections, each with its defaults and a description of every option: a training phase,
the loss, adversarial training, the teacher top-k cache, logging. A recipe's config (`tsa_fast.recipes`)
is made of them.

Unknown keys are errors (pydantic `extra="forbid"`), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tsa_fast.reference.distillation_loss import DIVERGENCES

Divergence = Literal[DIVERGENCES]  # the names of tsa_fast.distillation_loss's divergences


class Section(BaseModel):
    """A config section: immutable, unknown keys are errors. A subclass that changes only the defaults of
    fields it inherits lists them in `DEFAULTS` (field name -> default), used where a key is not given."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _subclass_defaults(cls, values: Any) -> Any:
        return {**cls.DEFAULTS, **values} if cls.DEFAULTS and isinstance(values, dict) else values


class Schedule(Section):
    """A value that moves from `start` to `end` over the training steps."""

    start: float = Field(description="value at the first step")
    end: float = Field(description="value at the last step")
    shape: Literal["linear", "cosine"] = Field("linear", description="how it moves from start to end")

    def at(self, progress: float) -> float:
        """The value at progress in [0, 1] (step / total steps)."""
        weight = progress if self.shape == "linear" else 0.5 * (1 - math.cos(math.pi * progress))
        return self.start + (self.end - self.start) * weight


Scheduled = float | Schedule


def value_at(value: Scheduled, progress: float) -> float:
    return value.at(progress) if isinstance(value, Schedule) else float(value)


class TrainingConfig(Section):
    """One training phase (teacher pre-training, distillation, baseline)."""

    steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr (cosine decay)")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (matrices only)")
    clip_grad: float | None = Field(1.0, gt=0, description="max global grad norm; null: no clipping")
    eval_every: int = Field(100, ge=1, description="validation every N steps (and at the end)")
    eval_batches: int | None = Field(
        None, ge=1, description="validation batches per evaluation during training (the final one: all); null: all"
    )
    checkpoint_every: int = Field(100, ge=1, description="checkpoint every N steps (and at the end)")
    log_every: int = Field(10, ge=1, description="metrics row every N steps")


class FeatureLossConfig(Section):
    """The loss terms on the models' inner features: hidden states and attention (or MiniLM-v2 relations)."""

    hidden_weight: Scheduled = Field(0.0, description="weight of the hidden-state loss")
    hidden_loss: Literal["mse", "cosine"] = Field("mse", description="distance between mapped hidden states")
    hidden_layer_map: list[tuple[int, int]] | None = Field(
        None, description="(student, teacher) hidden-state indices (0 = embeddings); null: uniform"
    )
    attention_weight: Scheduled = Field(0.0, description="weight of the attention-transfer loss")
    attention_layer_map: list[tuple[int, int]] | None = Field(
        None, description="(student, teacher) blocks; null: last student block <-> last teacher block"
    )
    attention_relations: list[Literal["qk", "qq", "kk", "vv"]] = Field(
        ["qk"], description="qk: attention maps (TinyBERT); qq/kk/vv: MiniLM-v2 self-relations"
    )
    relation_heads: int | None = Field(None, ge=1, description="MiniLM-v2 relation heads; null: each model's heads")

    @field_validator("attention_relations")
    @classmethod
    def _relations_nonempty(cls, relations):
        if not relations or len(set(relations)) != len(relations):
            raise ValueError(f"attention_relations must be a non-empty list without repeats, got {relations}")
        return relations


class OnPolicyConfig(Section):
    """On-policy distillation (GKD, Agarwal et al. 2024): a share `fraction` of the batches (GKD's lambda) are
    the student's own continuations of the prompts (the first `prompt_tokens` of each training sequence, or
    where the split has prompt lengths, as the hf_lm recipe's chat data, each row's own prompt), sampled
    without gradient; the divergence (reverse_kl is the usual choice, or jsd with beta) is taken on the
    generated tokens only, from optimizer step `start_step` on. fraction 0: off-policy distillation, unchanged."""

    fraction: float = Field(0.0, ge=0, le=1, description="share of the batches that are the student's own samples")
    prompt_tokens: int = Field(16, ge=1, description="the first prompt_tokens of each training sequence: the prompt")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="tokens the student generates per prompt; null: the rest of the sequence (prompts of "
        "different lengths: hf_lm resolves it from the longest training prompt)",
    )
    sample_temperature: float = Field(1.0, ge=0, description="the student's sampling temperature (0: greedy)")
    start_step: int = Field(
        0,
        ge=0,
        description="the optimizer steps before the first on-policy batch, all off-policy: the student is warmed "
        "on the data first (GKD starts from a trained student)",
    )


class SequenceKDConfig(Section):
    """Sequence-level KD (Kim and Rush 2016): the teacher's completions of the training prompts (the first
    `prompt_tokens` of each training sequence), generated once and cached on disk, replace the training
    continuations: the student learns them by cross-entropy (hard_weight) and, with logit_weight > 0, by
    token-level KD from the teacher on them."""

    enabled: bool = Field(False, description="train the students on the teacher's completions")
    prompt_tokens: int = Field(16, ge=1, description="the first prompt_tokens of each training sequence: the prompt")
    max_new_tokens: int | None = Field(
        None, ge=1, description="tokens the teacher generates per prompt; null: the rest of the sequence"
    )
    temperature: float = Field(0.0, ge=0, description="the teacher's sampling temperature (0: greedy)")
    dir: str | None = Field(None, description="where the completions are cached; null: under data.cache_dir")


class CrossTokenizerLossConfig(Section):
    """The logit loss when the teacher has a tokenizer of its own (`tsa_fast.cross_tokenizer_loss`, per span of
    text both tokenizations align on): exact_weight x T^2 x the loss's divergence over the tokens both
    vocabularies share (each side renormalized over them) + uld_weight x the ULD term (the L1 distance of both
    sides' probabilities sorted, over their top uld_top_k and the rest as one bucket), both times logit_weight,
    plus hard_weight x cross-entropy in the student's tokens."""

    exact_weight: float = Field(1.0, ge=0, description="weight of the exact-match term (mean over aligned spans)")
    uld_weight: float = Field(1.0, ge=0, description="weight of the ULD term (mean over aligned spans)")
    uld_top_k: int = Field(64, ge=1, description="sorted probabilities compared per side; the rest is one bucket")


class LossConfig(FeatureLossConfig):
    """Total loss = logit_weight * T^2 * divergence + hard_weight * CE + hidden + attention terms."""

    divergence: Divergence = Field(
        "forward_kl", description="between the teacher's and the student's distributions (tsa_fast.distillation_loss)"
    )
    beta: float = Field(0.5, gt=0, lt=1, description="jsd mixture weight")
    temperature: Scheduled = Field(2.0, description="softmax temperature T of both models' logits")
    scale_by_t2: bool = Field(True, description="multiply the divergence by T^2 (Hinton et al.)")
    logit_weight: Scheduled = Field(1.0, description="weight of the logit divergence (soft targets)")
    hard_weight: Scheduled = Field(0.5, description="weight of the cross-entropy to the labels")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    fused: bool = Field(True, description="LM: fused_linear_distillation_loss (no N x V logits)")
    chunk_size: int | None = Field(None, ge=1, description="rows per chunk of the fused loss; null: automatic")
    on_policy: OnPolicyConfig = Field(OnPolicyConfig(), description="on-policy batches (GKD); off by default")
    sequence_kd: SequenceKDConfig = Field(SequenceKDConfig(), description="sequence-level KD; off by default")
    cross_tokenizer: CrossTokenizerLossConfig = Field(
        CrossTokenizerLossConfig(), description="the logit loss with a teacher of another tokenizer"
    )


class AdversarialConfig(Section):
    """Perturbations of the student's input embeddings (FGM: one step; PGD: `steps` projected steps)."""

    method: Literal["none", "fgm", "pgd"] = Field("none", description="none: no adversarial term")
    epsilon: float = Field(0.1, gt=0, description="L2 radius of each token's perturbation / its embedding's norm")
    steps: int = Field(3, ge=1, description="PGD steps")
    weight: float = Field(1.0, ge=0, description="weight of the loss on perturbed inputs")
    compare: bool = Field(True, description="also distill a student without it, to report the robustness gain")


class TeacherCacheConfig(Section):
    """Precompute the teachers' top-k log-probs over the training set once (memory-mapped on disk), then
    distill with `teacher_topk`, without the teacher in memory. LM only; logit loss only."""

    enabled: bool = Field(False, description="distill from the cache instead of the live teachers")
    top_k: int = Field(32, ge=1, description="tokens kept per position (the rest of the mass is one tail bucket)")
    dir: str | None = Field(None, description="where the cache lives; null: under data.cache_dir")


class LoggingConfig(Section):
    tensorboard: bool = Field(True, description="also write TensorBoard events when tensorboard is installed")
    progress: bool = Field(True, description="progress bars")


def cross_tokenizer_unmet(loss: LossConfig, adversarial: AdversarialConfig) -> list[str]:
    """The options of `loss` and `adversarial` that a teacher of another tokenizer needs and that are not set so
    (each as `option=value it needs`), in a fixed order: hidden-state and attention terms, on-policy and
    sequence-level KD, label smoothing and adversarial training do not apply across tokenizers, and the
    exact-match term is always scaled by T^2."""
    needs = {
        "loss.hidden_weight=0": loss.hidden_weight == 0.0,
        "loss.attention_weight=0": loss.attention_weight == 0.0,
        "loss.on_policy.fraction=0": loss.on_policy.fraction == 0,
        "loss.sequence_kd.enabled=false": not loss.sequence_kd.enabled,
        "loss.label_smoothing=0": loss.label_smoothing == 0,
        "loss.scale_by_t2=true (the exact-match term is scaled by T^2)": loss.scale_by_t2,
        "adversarial.method='none'": adversarial.method == "none",
    }
    return [name for name, met in needs.items() if not met]
