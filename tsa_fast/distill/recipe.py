"""The main job: a recipe run end to end (`python train.py [--config ...] [key=value ...]`).

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

Where the models live and how the students are optimized is the `Runtime`'s: this process, by default;
`tsa_fast.integrations.deepspeed.DeepSpeedRuntime` runs the same recipe on every rank of a DeepSpeed job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from tsa_fast.distill.config import RecipeConfig, TrainingConfig
from tsa_fast.distill.data import TaskData, build_data
from tsa_fast.distill.distiller import Distiller, FitResult, Phase
from tsa_fast.distill.evaluate import evaluate, tokens_per_second
from tsa_fast.distill.metrics import plot_curves
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.teacher_cache import TopkTeacherCache
from tsa_fast.distill.teachers import Teachers
from tsa_fast.models import Transformer, TransformerConfig, every_kth_layer, init_from_teacher, num_parameters

console = Console(width=None if Console().is_terminal else 160)  # logs keep the table's full width


class Runtime:
    """Where a recipe's models live and how its students are optimized: here one process, teachers as
    built, students by the Distiller's default optimization. A multi-process runtime (DeepSpeed) overrides
    these methods; rank 0 writes the files."""

    rank = 0
    world_size = 1

    def barrier(self) -> None:
        """Wait until every rank gets here (one process: nothing to wait for)."""

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block before the other ranks do (it writes the files that they then read)."""
        if self.rank != 0:
            self.barrier()
        yield
        if self.rank == 0:
            self.barrier()

    def teacher(self, build: Callable[[], nn.Module], checkpoint: Path) -> nn.Module:
        """The teacher `build()` returns, with the weights of `checkpoint` ({"config", "model": state dict})."""
        model = build()
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
        return model

    def optimization(self, model: nn.Module, objective: nn.Module, training: TrainingConfig):
        """How a student phase is optimized; None: the Distiller's default (`TorchOptimization`)."""
        return None


def run(
    config: RecipeConfig, resume: bool = False, data: TaskData | None = None, runtime: Runtime | None = None
) -> dict:
    """Run the recipe (on `data` when already built from config.data) in `runtime` (default: this process);
    returns {model name: {metric: value}} (also written to output_dir/results.json)."""
    runtime = runtime or Runtime()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if runtime.rank == 0:
        (out_dir / "config.json").write_text(config.model_dump_json(indent=2))

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


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name if name != "auto" else "cpu")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full fp32). auto: bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if name == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA device (CPU autocast supports bf16)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


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


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(data: TaskData) -> str:
    """A hash of the training tensors: what a cached teacher was trained on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(data.train.items()):
        digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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
                tmp = path.with_suffix(".tmp")
                torch.save({"config": model_cfg.model_dump(), "model": teacher.state_dict()}, tmp)
                os.replace(tmp, path)
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


def write_table(title: str, columns: list[tuple[str, str, str]], results: dict[str, dict], out_dir: Path) -> None:
    """Print `results` (model name -> metrics) as a table of `columns` (result key, column title, format; "-"
    where a model has no such key) and write it to out_dir/results.md, and the results to results.json."""
    cells = {
        name: [fmt.format(row[key]) if key in row else "-" for key, _, fmt in columns] for name, row in results.items()
    }
    table = Table(title=title)
    table.add_column("model")
    for _, column_title, _ in columns:
        table.add_column(column_title, justify="right")
    for name, row in cells.items():
        table.add_row(name, *row)
    console.print(table)

    header = ["model"] + [column_title for _, column_title, _ in columns]
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join([name, *row]) + " |" for name, row in cells.items()]
    (out_dir / "results.md").write_text("\n".join(markdown) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))


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
