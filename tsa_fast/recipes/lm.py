"""The language-model and classification recipe, the main job (`python train.py`, configs/stdlib_lm.yaml,
configs/classify.yaml): native `tsa_fast.models.Transformer` teachers and students on a `TaskData`
(`tsa_fast.distill.data`), next-token prediction or classification as `data.task` says (`recipe: classify`,
`tsa_fast.recipes.classify`, is this recipe with the classification defaults).

1. Data: the corpus, its tokenizer and the task tensors (`tsa_fast.distill.data`).
2. Teachers: loaded from `teachers[i].checkpoint`, or trained by the recipe and cached under
   `data.cache_dir/teachers/` by a fingerprint of everything that determines them (a second run loads them).
3. Students, each trained for the same steps from the same initialization: `distilled` (the objective of
   `loss`, from the teachers or their top-k cache), `distilled_no_adversarial` (when adversarial training is
   on and `adversarial.compare`), and `baseline` (no teacher: cross-entropy only).
4. Evaluation of every model on validation and test, a table (printed, results.md, results.json) and the
   training curves (curves.png), all under `output_dir`.
Every phase checkpoints under `output_dir/PHASE/`; with `resume`, finished phases are loaded and an
interrupted one continues from its last checkpoint.

Where the models live and how the students are optimized is the runtime's (`tsa_fast.distill.protocols.Runtime`):
this process by default (`LocalRuntime`); `tsa_fast.integrations.deepspeed.DeepSpeedRuntime` runs the same
recipe on every rank of a DeepSpeed job.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from tsa_fast.distill.checkpoints import save_atomically
from tsa_fast.distill.config import (
    AdversarialConfig,
    LossConfig,
    Schedule,
    Section,
    TeacherCacheConfig,
    TrainingConfig,
)
from tsa_fast.distill.data import DataConfig, TaskData, build_data
from tsa_fast.distill.distiller import Distiller, FitResult, Phase
from tsa_fast.distill.evaluate import evaluate, tokens_per_second
from tsa_fast.distill.metrics import plot_curves
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.protocols import Runtime
from tsa_fast.distill.teacher_cache import TopkTeacherCache
from tsa_fast.distill.teachers import Teachers
from tsa_fast.models import Transformer, TransformerConfig, every_kth_layer, init_from_teacher, num_parameters
from tsa_fast.recipes.config import RunConfig, read_recipe
from tsa_fast.recipes.fingerprint import data_fingerprint, fingerprint
from tsa_fast.recipes.report import console, write_table
from tsa_fast.recipes.runtime import LocalRuntime, start_run

# ----------------------------------------------------------------------------------------------------------
# Config


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


class RecipeConfig(RunConfig):
    """The recipe: data, teachers, student, losses, training, and where results go (every option of
    configs/stdlib_lm.yaml and configs/classify.yaml)."""

    RECIPE = "lm"
    DEFAULTS = {
        "name": "stdlib_lm",
        "output_dir": "runs/stdlib_lm",
        "training": TrainingConfig(steps=200, lr=2e-3, eval_every=50),
    }

    data: DataConfig = Field(DataConfig(), description="corpus, tokenizer and task (tsa_fast.distill.data)")
    teachers: list[TeacherConfig] = Field([TeacherConfig()], min_length=1, description="one or more (a mixture)")
    teacher_training: TrainingConfig = Field(
        TrainingConfig(steps=300, lr=2e-3, eval_every=150, checkpoint_every=150),
        description="how a teacher without a checkpoint is trained",
    )
    student: StudentConfig = Field(StudentConfig(), description="the student's architecture and initialization")
    loss: LossConfig = Field(LossConfig(), description="the distillation objective")
    adversarial: AdversarialConfig = Field(AdversarialConfig(), description="adversarial distillation; off by default")
    teacher_cache: TeacherCacheConfig = Field(TeacherCacheConfig(), description="offline teacher top-k; off by default")
    baseline: bool = Field(True, description="also train the student without a teacher, for the same steps")

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


def prepare(config: RecipeConfig) -> Callable[..., dict]:
    """The job of `config` in this process, `job(resume=False)`, its data built now (bad data raises ValueError or
    FileNotFoundError before any training)."""
    return partial(run, config, data=build_data(config.data))


# ----------------------------------------------------------------------------------------------------------
# The run


def run(
    config: RecipeConfig, resume: bool = False, data: TaskData | None = None, runtime: Runtime | None = None
) -> dict:
    """Run the recipe (on `data` when already built from config.data) in `runtime` (default: `LocalRuntime`);
    returns {model name: {metric: value}} (also written to output_dir/results.json)."""
    runtime = runtime or LocalRuntime()
    device, precision, out_dir = start_run(config, runtime.rank)

    data = data or build_data(config.data)
    console.print(data.summary())
    phase = lambda name, training, **kw: Phase(  # noqa: E731
        name, out_dir / name, training, config.seed, device, precision, logging=config.logging, **kw
    )
    student_phase = lambda name, adversarial: phase(  # noqa: E731
        name, config.training, adversarial=adversarial, rank=runtime.rank, world_size=runtime.world_size
    )

    obtained = [
        obtain_teacher(i, config, data, phase(f"teacher_{i}", config.teacher_training), resume, runtime)
        for i in range(len(config.teachers))
    ]
    teacher_models = [model for model, _ in obtained]
    teachers = Teachers(teacher_models, [t.weight for t in config.teachers], data.task).to(device)
    source = teachers
    if config.teacher_cache.enabled:
        source = build_teacher_cache(config, data, teachers, [key for _, key in obtained], device, runtime)

    runs: dict[str, tuple[Transformer, FitResult]] = {}
    variants = [("distilled", config.adversarial)]
    if config.adversarial.method != "none" and config.adversarial.compare:
        variants.append(("distilled_no_adversarial", config.adversarial.model_copy(update={"method": "none"})))
    for name, adversarial in variants:
        student = build_student(config, data, teacher_models[0])
        objective = DistillationObjective(
            config.loss, data.task, student_config(config, data), teacher_models[0].config
        )
        optimization = runtime.optimization(student, objective, config.training)
        distiller = Distiller(
            student, objective, data, student_phase(name, adversarial), source, optimization, agreement_with=teachers
        )
        runs[name] = (student, distiller.fit(resume))
    if config.baseline:
        student = build_student(config, data, teacher_models[0])
        objective = DistillationObjective(config.loss, data.task, student_config(config, data), None)
        optimization = runtime.optimization(student, objective, config.training)
        distiller = Distiller(
            student,
            objective,
            data,
            student_phase("baseline", config.adversarial),
            None,
            optimization,
            agreement_with=teachers,
        )
        runs["baseline"] = (student, distiller.fit(resume))

    results = evaluate_all(
        config,
        data,
        {"teacher": teacher_models[0], **{k: m for k, (m, _) in runs.items()}},
        {k: fit for k, (_, fit) in runs.items()},
        device,
        precision,
    )
    if runtime.rank == 0:
        write_report(config, data, results, out_dir)
    return results


def model_config(model: TransformerConfig, data: TaskData, seq_len: int) -> TransformerConfig:
    """The model config with what the data determines: vocabulary, length, causal or not, classes."""
    classes = len(data.class_names) if data.task == "classify" else None
    return model.model_copy(
        update={
            "vocab_size": data.vocab_size,
            "max_seq_len": seq_len,
            "causal": data.task == "lm",
            "num_classes": classes,
        }
    )


def student_config(config: RecipeConfig, data: TaskData) -> TransformerConfig:
    return model_config(config.student.model, data, config.data.seq_len)


def obtain_teacher(
    i: int, config: RecipeConfig, data: TaskData, phase: Phase, resume: bool, runtime: Runtime
) -> tuple[nn.Module, str]:
    """Teacher i, placed by `runtime`, and a key identifying it: from its checkpoint, from the recipe's cache, or
    trained now (in one process, rank 0's, and cached)."""
    spec = config.teachers[i]
    model_cfg = model_config(spec.model, data, config.data.seq_len)
    path = Path(spec.checkpoint) if spec.checkpoint else None
    if path is None:
        key = fingerprint(
            model_cfg.model_dump(), config.teacher_training.model_dump(), spec.seed, data_fingerprint(data)
        )
        path = Path(config.data.cache_dir) / "teachers" / f"{key}.pt"
        with runtime.main_first():
            if not path.exists():
                torch.manual_seed(spec.seed)
                teacher = Transformer(model_cfg)
                phase = dataclasses.replace(phase, seed=spec.seed)
                Distiller(teacher, DistillationObjective(config.loss, data.task, model_cfg, None), data, phase).fit(
                    resume
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                save_atomically({"config": model_cfg.model_dump(), "model": teacher.state_dict()}, path)
            else:
                console.print(f"teacher {i}: loaded the cached teacher {path}")
    elif not path.is_file():
        raise FileNotFoundError(f"teachers[{i}].checkpoint not found: {path}")
    else:
        key = fingerprint(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
    return runtime.teacher(lambda: Transformer(model_cfg), path), key


def build_student(config: RecipeConfig, data: TaskData, teacher: Transformer) -> Transformer:
    """The student, identically initialized for every variant (seeded), from teacher layers if asked."""
    torch.manual_seed(config.seed + 1)
    student = Transformer(student_config(config, data))
    if config.student.init == "teacher_layers":
        layers = config.student.layers or every_kth_layer(teacher.config.n_layers, student.config.n_layers)
        init_from_teacher(student, teacher, layers)
    return student


def build_teacher_cache(
    config: RecipeConfig,
    data: TaskData,
    teachers: Teachers,
    teacher_keys: list[str],
    device: torch.device,
    runtime: Runtime,
) -> TopkTeacherCache:
    """The teachers' top-k over the training split, built once per (teachers, weights, data), by every rank."""
    cache = config.teacher_cache
    directory = Path(cache.dir) if cache.dir else Path(config.data.cache_dir) / "teacher_topk"
    key = fingerprint(teacher_keys, teachers.log_weights, data_fingerprint(data))
    return TopkTeacherCache.build(
        teachers,
        data.train,
        directory,
        temperature=float(config.loss.temperature),
        top_k=cache.top_k,
        fingerprint=key,
        batch_size=config.training.batch_size,
        device=device,
        progress=config.logging.progress,
        rank=runtime.rank,
        world_size=runtime.world_size,
        barrier=runtime.barrier,
    )


def evaluate_all(config, data, models, fits: dict[str, FitResult], device, precision) -> dict:
    """Validation and test metrics of every model, inference throughput. A student's validation metrics, with its
    agreement with the teachers, are its final validation in `fits` (name -> `Distiller.fit`'s result), which
    evaluated the whole split: only the teacher's are measured here."""
    autocast = Phase("eval", Path(), config.training, config.seed, device, precision).autocast
    epsilon = config.adversarial.epsilon if config.adversarial.method != "none" else None
    kwargs = dict(batch_size=config.training.batch_size, device=device, autocast=autocast)
    results = {}
    for name, model in models.items():
        fit = fits.get(name)
        validation = fit.validation if fit else evaluate(model, data.validation, data.task, **kwargs)
        test = evaluate(model, data.test, data.task, **kwargs)
        row = {
            "parameters": num_parameters(model),
            **{f"validation_{k}": v for k, v in validation.items()},
            **{f"test_{k}": v for k, v in test.items()},
        }
        if epsilon is not None:
            perturbed = evaluate(model, data.validation, data.task, epsilon=epsilon, **kwargs)
            row.update({f"validation_perturbed_{k}": v for k, v in perturbed.items()})
        if fit:
            row["train_tokens_per_s"] = fit.train_tokens_per_s
        results[name] = row
    speeds = tokens_per_second(models, data.validation, data.task, **kwargs)
    for name, row in results.items():
        row["inference_tokens_per_s"] = speeds[name]
        row["speedup_vs_teacher"] = speeds[name] / speeds["teacher"]
    return results


def headline_metrics(task: str) -> list[tuple[str, str, str]]:
    """(result key suffix, column title, format) of the table's quality columns."""
    if task == "lm":
        return [("perplexity", "ppl", "{:.2f}")]
    return [("accuracy", "acc", "{:.1%}"), ("macro_f1", "macro-F1", "{:.3f}")]


def write_report(config: RecipeConfig, data: TaskData, results: dict, out_dir: Path) -> None:
    """The table (printed, results.md), results.json, and curves.png."""
    columns = [("parameters", "params", "{:,}")]
    for split, short in (("validation", "val"), ("test", "test")):
        columns += [(f"{split}_{key}", f"{short} {title}", fmt) for key, title, fmt in headline_metrics(data.task)]
    if config.adversarial.method != "none":
        key, title, fmt = headline_metrics(data.task)[0]
        columns.append(
            (f"validation_perturbed_{key}", f"val {title} (perturbed, eps={config.adversarial.epsilon})", fmt)
        )
    columns += [
        ("validation_agreement", "top-1 agreement", "{:.1%}"),
        ("validation_kl", "KL(teacher, model)", "{:.3f}"),
        ("inference_tokens_per_s", "tokens/s", "{:,.0f}"),
        ("speedup_vs_teacher", "speed-up", "{:.2f}x"),
    ]
    write_table(f"{config.name}: {data.task}, validation and test", columns, results, out_dir)
    metric = headline_metrics(data.task)[0][0]
    curves = {name: out_dir / name / "metrics.csv" for name in results if (out_dir / name / "metrics.csv").exists()}
    curves.update(
        {
            name: out_dir / name / "metrics.csv"
            for name in os.listdir(out_dir)
            if name.startswith("teacher_") and (out_dir / name / "metrics.csv").exists()
        }
    )
    plot_curves(curves, out_dir / "curves.png", metric)
    console.print(f"results: {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 'curves.png'}")
