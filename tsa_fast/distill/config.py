"""The typed recipe: one `RecipeConfig` per YAML file in `configs/`, every option with its default.

Unknown keys are errors (pydantic `extra="forbid"`), so a typo never silently falls back to a default.
`load_config(path, overrides)` reads a YAML file and applies `key=value` overrides from the command line,
dotted into nested sections (`training.steps=50`, `loss.divergence=jsd`, `teachers.0.checkpoint=t.pt`);
values are parsed as YAML scalars (`true`, `3e-4`, `null`, `[1, 2]`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tsa_fast.distill.data import DataConfig
from tsa_fast.models import TransformerConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class TeacherConfig(Section):
    model: TransformerConfig = Field(
        TransformerConfig(d_model=128, n_layers=4, n_heads=4), description="its architecture"
    )
    checkpoint: str | None = Field(None, description="a teacher checkpoint to load; null: train it (cached)")
    weight: float = Field(1.0, gt=0, description="its weight in the teachers' mixture")
    seed: int = Field(0, description="initialization / data-order seed when trained by the recipe")


class StudentConfig(Section):
    model: TransformerConfig = Field(
        TransformerConfig(d_model=128, n_layers=2, n_heads=4), description="its architecture"
    )
    init: Literal["random", "teacher_layers"] = Field(
        "random", description="teacher_layers: DistilBERT-style copy of embeddings and every k-th teacher block"
    )
    layers: list[int] | None = Field(None, description="teacher blocks to copy; null: every k-th")


class LossConfig(Section):
    """Total loss = logit_weight * T^2 * divergence + hard_weight * CE + hidden + attention terms."""

    divergence: Literal["forward_kl", "reverse_kl", "symmetric_kl", "jsd", "tvd"] = Field(
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


class RecipeConfig(Section):
    """A whole recipe: data, teachers, student, losses, training, and where results go."""

    name: str = Field("stdlib_lm", description="the recipe's name, in its results")
    output_dir: str = Field("runs/stdlib_lm", description="checkpoints, metrics, table and plots")
    seed: int = Field(0, description="seed of the student's initialization and the data order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto: bf16 on a GPU that has it, else fp32"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; null: torch's default")
    data: DataConfig = Field(DataConfig(), description="corpus, tokenizer and task (tsa_fast.distill.data)")
    teachers: list[TeacherConfig] = Field([TeacherConfig()], min_length=1, description="one or more (a mixture)")
    teacher_training: TrainingConfig = Field(
        TrainingConfig(steps=300, lr=2e-3, eval_every=150, checkpoint_every=150),
        description="how a teacher without a checkpoint is trained",
    )
    student: StudentConfig = Field(StudentConfig(), description="the student's architecture and initialization")
    training: TrainingConfig = Field(
        TrainingConfig(steps=200, lr=2e-3, eval_every=50), description="distillation (and the baseline)"
    )
    loss: LossConfig = Field(LossConfig(), description="the distillation objective")
    adversarial: AdversarialConfig = Field(AdversarialConfig(), description="adversarial distillation; off by default")
    teacher_cache: TeacherCacheConfig = Field(TeacherCacheConfig(), description="offline teacher top-k; off by default")
    baseline: bool = Field(True, description="also train the student without a teacher, for the same steps")
    logging: LoggingConfig = Field(LoggingConfig(), description="TensorBoard and progress bars")

    @model_validator(mode="after")
    def _consistent(self):
        loss, cache = self.loss, self.teacher_cache
        if cache.enabled:
            if self.data.task != "lm":
                raise ValueError("teacher_cache.enabled needs data.task='lm' (it caches top-k token log-probs)")
            if isinstance(loss.temperature, Schedule):
                raise ValueError("teacher_cache.enabled needs a constant loss.temperature (the cache is at one T)")
            for name in ("hidden_weight", "attention_weight"):
                if getattr(loss, name) != 0.0:
                    raise ValueError(f"teacher_cache.enabled needs loss.{name}=0 (the teacher is not in memory)")
            if self.adversarial.method != "none":
                raise ValueError("teacher_cache.enabled cannot be combined with adversarial training")
            if self.student.init == "teacher_layers":
                raise ValueError("teacher_cache.enabled cannot initialize the student from teacher layers")
        if self.student.init == "teacher_layers" and len(self.teachers) != 1:
            raise ValueError(f"student.init='teacher_layers' needs exactly one teacher, got {len(self.teachers)}")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RecipeConfig:
    """The recipe in YAML file `path` (None: the built-in defaults) with `key=value` overrides applied.

    Raises: FileNotFoundError for a missing file; ValueError for an override without '=', an unknown key
    or a bad value (pydantic's ValidationError is a ValueError) naming it.
    """
    return RecipeConfig.model_validate(read_recipe(path, overrides))


def read_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """The mapping in YAML file `path` (None: empty) with `key=value` overrides applied, not yet validated.

    Raises: FileNotFoundError for a missing file; ValueError for a file that is not a mapping or an override
    without '='.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"an override is key=value, got {override!r}")
        _set_dotted(raw, key.split("."), yaml.safe_load(value), override)
    return raw


def _set_dotted(tree: dict | list, keys: list[str], value, override: str) -> None:
    """tree[k0][k1]... = value, creating mappings on the way; list items by index (`teachers.0.checkpoint`)."""
    *parents, last = keys
    for key in parents:
        if isinstance(tree, list):
            tree = tree[_list_index(tree, key, override)]
        else:
            tree = tree.setdefault(key, [{}] if key == "teachers" else {})
    if isinstance(tree, list):
        tree[_list_index(tree, last, override)] = value
    else:
        tree[last] = value


def _list_index(items: list, key: str, override: str) -> int:
    if not key.isdigit() or int(key) > len(items):
        raise ValueError(f"{override!r}: {key!r} is not an index of a list of {len(items)}")
    if int(key) == len(items):
        items.append({})
    return int(key)
