"""The language-model and classification recipe, the main job (`python train.py`, configs/stdlib_lm.yaml,
configs/classify.yaml): native `tsa_fast.models.Transformer` teachers and students on a `TaskData`
(`tsa_fast.distill.data`), next-token prediction or classification as `data.task` says (`recipe: classify`,
`tsa_fast.recipes.classify`, is this recipe with the classification defaults).

1. Data: the corpus, its tokenizer and the task tensors (`tsa_fast.distill.data`).
2. Teachers: loaded from `teachers[i].checkpoint`, or trained by the recipe and cached under
   `data.cache_dir/teachers/` by a fingerprint of everything that determines them (a second run loads them).
3. Students, each trained for the same steps on the same batches (the same initialization for the same init):
   `distilled` (the objective of `loss`, from the teachers or their top-k cache; on-policy batches with
   `loss.on_policy`, on the teacher's completions of the training prompts with `loss.sequence_kd`),
   `distilled_no_adversarial` (when adversarial training is on and `adversarial.compare`),
   `distilled_off_policy` (with `on_policy_compare`), and with `baseline`: `baseline` (no teacher, the
   training data: cross-entropy only) and each of `students` (a name, with or without the teachers, from
   random init or the teacher's layers).
4. Evaluation of every model on validation and test (LM: also the teacher's NLL of each model's sampled
   continuations of held-out prompts, their distinct-2, and greedy completions as text), a table (printed,
   results.md, results.json) and the training curves (curves.png), all under `output_dir`, with tokenizer.json
   and each phase a Transformer directory (config.json), as `python -m tsa_fast.generate` reads them. With a
   baseline, the table gives the share of the baseline-teacher gap each model closes (`add_gap_closed`).
Every phase checkpoints under `output_dir/PHASE/`; with `resume`, finished phases are loaded and an
interrupted one continues from its last checkpoint.

Where the models live and how the students are optimized is the runtime's (`tsa_fast.distill.protocols.Runtime`):
this process by default (`LocalRuntime`); `tsa_fast.integrations.deepspeed.DeepSpeedRuntime` runs the same
recipe on every rank of a DeepSpeed job.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator, model_validator
from torch import nn

from tsa_fast.cross_tokenizer import vocabulary_map
from tsa_fast.distill.checkpoints import load_weights_only, save_atomically
from tsa_fast.distill.config import (
    AdversarialConfig,
    LossConfig,
    OnPolicyConfig,
    Schedule,
    Section,
    TeacherCacheConfig,
    TrainingConfig,
    cross_tokenizer_unmet,
)
from tsa_fast.distill.data import MIN_VOCAB_SIZE, DataConfig, TaskData, build_data
from tsa_fast.distill.distiller import Distiller, FitResult, Phase
from tsa_fast.distill.evaluate import (
    evaluate,
    sample_metrics,
    sampled_continuations,
    tokens_per_second,
    until_eos,
)
from tsa_fast.distill.metrics import plot_curves
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.protocols import Runtime
from tsa_fast.distill.sequence_kd import sequence_kd_split, teacher_completions
from tsa_fast.distill.teacher_cache import TopkTeacherCache
from tsa_fast.distill.teachers import OwnTokenizerTeachers, Teachers
from tsa_fast.generate import TOKENIZER_FILE
from tsa_fast.models import Transformer, TransformerConfig, every_kth_layer, init_from_teacher, num_parameters
from tsa_fast.recipes.config import RunConfig, read_recipe
from tsa_fast.recipes.fingerprint import data_fingerprint, fingerprint
from tsa_fast.recipes.report import console, write_table
from tsa_fast.recipes.runtime import LocalRuntime, start_run

# ----------------------------------------------------------------------------------------------------------
# Config


class TeacherTokenizerConfig(Section):
    """A teacher's tokenizer of its own (cross-tokenizer distillation, LM): the built-in byte-level BPE trained on
    the same train split (cached like the student's), with this vocabulary size; the teacher is trained (and
    cached) on the data in its tokens, exactly as a recipe whose data.vocab_size is this one trains it."""

    vocab_size: int = Field(ge=MIN_VOCAB_SIZE, description="the teacher's BPE vocabulary size, special tokens included")


class TeacherConfig(Section):
    model: TransformerConfig = Field(
        TransformerConfig(d_model=128, n_layers=4, n_heads=4), description="its architecture"
    )
    checkpoint: str | None = Field(None, description="a teacher checkpoint to load; null: train it (cached)")
    weight: float = Field(1.0, gt=0, description="its weight in the teachers' mixture")
    seed: int = Field(0, description="initialization / data-order seed when trained by the recipe")
    tokenizer: TeacherTokenizerConfig | None = Field(
        None,
        description="LM: the teacher's own tokenizer (distilled through loss.cross_tokenizer); null: the student's",
    )


Init = Literal["random", "teacher_layers"]
INIT_DOC = (
    "random, or teacher_layers: the first teacher's embeddings, final norm and blocks `student.layers` (DistilBERT"
    " style); a narrower student (same head size) takes their leading dimensions, heads and FFN units"
    " (`init_from_teacher(narrower=True)`)"
)
RESERVED_NAMES = {"teacher", "distilled", "distilled_no_adversarial", "distilled_off_policy", "baseline"}


class StudentConfig(Section):
    model: TransformerConfig = Field(
        TransformerConfig(d_model=64, n_layers=2, n_heads=2), description="its architecture"
    )
    init: Init = Field("random", description=f"the initialization of distilled and baseline; {INIT_DOC}")
    layers: list[int] | None = Field(None, description="teacher blocks to copy; null: every k-th")


class StudentVariant(Section):
    """One more student of the comparison (with `baseline: true`): the student's architecture, trained for the
    same steps on the same batches as `distilled`, with the teachers or alone, from its own initialization."""

    name: str = Field(description="its row in the table and its phase directory under output_dir")
    distilled: bool = Field(description="true: the objective of `loss`, with the teachers; false: alone, cross-entropy")
    init: Init = Field(description=INIT_DOC)

    @field_validator("name")
    @classmethod
    def _own_name(cls, name):
        if name in RESERVED_NAMES or not name or "/" in name:
            raise ValueError(
                f"students[].name must be a new row name (not one of {sorted(RESERVED_NAMES)}), got {name!r}"
            )
        return name


class SamplesConfig(Section):
    """Completions of held-out prompts (LM): the first prompt_tokens of the first `prompts` test documents,
    continued by every model. Sampled at `temperature`: the teacher's NLL of each model's continuations and
    their distinct-2; greedy: the first `shown` completions as text in results.md / results.json."""

    prompts: int = Field(8, ge=1, description="held-out prompts (from the first test documents)")
    prompt_tokens: int = Field(16, ge=1, description="tokens of each prompt (less than data.seq_len)")
    max_new_tokens: int = Field(
        32, ge=1, description="tokens generated per prompt, at most what the context leaves (data.seq_len)"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the sampled metrics")
    seed: int = Field(0, description="seed of the sampling")
    shown: int = Field(3, ge=0, description="greedy completions (temperature 0) written per model; 0: none")


class RecipeConfig(RunConfig):
    """The recipe: data, teachers, student, losses, training, and where results go (every option of
    configs/stdlib_lm.yaml and configs/classify.yaml). A section given in part (in a YAML file or as
    `key=value` overrides: `data.cache_dir=...`, `student.model.d_model=32`) keeps the recipe's defaults for
    the options it does not give."""

    RECIPE = "lm"
    DEFAULTS = {
        "name": "stdlib_lm",
        "output_dir": "runs/stdlib_lm",
        "training": TrainingConfig(steps=100, eval_every=50, eval_batches=8, checkpoint_every=50),
    }

    data: DataConfig = Field(
        DataConfig(vocab_size=4096), description="corpus, tokenizer and task (tsa_fast.distill.data)"
    )
    teachers: list[TeacherConfig] = Field([TeacherConfig()], min_length=1, description="one or more (a mixture)")
    teacher_training: TrainingConfig = Field(
        TrainingConfig(steps=200, eval_every=100, checkpoint_every=100),
        description="how a teacher without a checkpoint is trained",
    )
    student: StudentConfig = Field(StudentConfig(), description="the student's architecture and initialization")
    loss: LossConfig = Field(LossConfig(temperature=1.0), description="the distillation objective")
    adversarial: AdversarialConfig = Field(AdversarialConfig(), description="adversarial distillation; off by default")
    teacher_cache: TeacherCacheConfig = Field(TeacherCacheConfig(), description="offline teacher top-k; off by default")
    baseline: bool = Field(
        True,
        description="also train the students of the comparison: baseline (the student alone, from student.init)"
        " and each of `students`; the table's gap columns are relative to baseline",
    )
    students: list[StudentVariant] = Field(
        [
            StudentVariant(name="baseline_teacher_layers", distilled=False, init="teacher_layers"),
            StudentVariant(name="distilled_teacher_layers", distilled=True, init="teacher_layers"),
        ],
        description="more students of the comparison (with baseline: true), each for the same steps and batches",
    )
    on_policy_compare: bool = Field(
        False, description="with loss.on_policy.fraction > 0: also distill a student off-policy (distilled_off_policy)"
    )
    samples: SamplesConfig = Field(SamplesConfig(), description="completions of held-out prompts (LM only)")
    same_tokenizer_compare: bool = Field(
        False,
        description="with a teacher tokenizer of its own: also distill the student in the teacher's tokenizer"
        " (distilled_same_tokenizer), for bits per byte and time per step",
    )

    @model_validator(mode="before")
    @classmethod
    def _partial_sections(cls, values):
        if not isinstance(values, dict):
            return values
        merged = dict(values)
        for name in ("data", "teacher_training", "training", "student", "loss"):
            default = cls.DEFAULTS.get(name, cls.model_fields[name].default)
            if isinstance(merged.get(name), dict):
                merged[name] = _over_defaults(merged[name], default)
        return merged

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
        if loss.on_policy.fraction > 0:
            if self.data.task != "lm":
                raise ValueError("loss.on_policy needs data.task='lm' (the student generates text)")
            if cache.enabled:
                raise ValueError(
                    "loss.on_policy needs the live teacher to score the student's samples, not teacher_cache"
                )
            if loss.on_policy.prompt_tokens >= self.data.seq_len:
                raise ValueError(
                    f"loss.on_policy.prompt_tokens={loss.on_policy.prompt_tokens} must be less than"
                    f" data.seq_len={self.data.seq_len}"
                )
        seq_kd = loss.sequence_kd
        if seq_kd.enabled:
            if self.data.task != "lm":
                raise ValueError("loss.sequence_kd needs data.task='lm' (the teacher generates text)")
            if cache.enabled:
                raise ValueError("loss.sequence_kd trains on new sequences, which the teacher_cache does not hold")
            if seq_kd.prompt_tokens >= self.data.seq_len:
                raise ValueError(
                    f"loss.sequence_kd.prompt_tokens={seq_kd.prompt_tokens} must be less than"
                    f" data.seq_len={self.data.seq_len}"
                )
        if self.on_policy_compare and loss.on_policy.fraction == 0:
            raise ValueError("on_policy_compare needs loss.on_policy.fraction > 0")
        if self.data.task == "lm" and self.samples.prompt_tokens >= self.data.seq_len:
            raise ValueError(
                f"samples.prompt_tokens={self.samples.prompt_tokens} must be less than data.seq_len={self.data.seq_len}"
            )
        if self.student.init == "teacher_layers" and len(self.teachers) != 1:
            raise ValueError(f"student.init='teacher_layers' needs exactly one teacher, got {len(self.teachers)}")
        names = [variant.name for variant in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"students[].name must be unique, got {names}")
        self._cross_tokenizer_consistent()
        return self

    def _cross_tokenizer_consistent(self) -> None:
        """A teacher tokenizer of its own: one for all teachers, and only the options that apply across tokenizers."""
        tokenizers = {t.tokenizer for t in self.teachers}
        if len(tokenizers) > 1:
            raise ValueError(
                f"teachers[i].tokenizer must be the same for every teacher, got {sorted(map(str, tokenizers))}"
            )
        if None in tokenizers:
            if self.same_tokenizer_compare:
                raise ValueError("same_tokenizer_compare needs teachers[i].tokenizer (a teacher tokenizer of its own)")
            return
        data = {"data.task='lm'": self.data.task == "lm", "teacher_cache.enabled=false": not self.teacher_cache.enabled}
        student = {
            "student.init='random'": self.student.init == "random",
            "students[].init='random'": all(variant.init == "random" for variant in self.students),
        }
        unmet = [name for name, met in data.items() if not met]
        unmet += cross_tokenizer_unmet(self.loss, self.adversarial)
        unmet += [name for name, met in student.items() if not met]
        if unmet:
            raise ValueError(f"teachers[i].tokenizer (a teacher tokenizer of its own) needs {', '.join(unmet)}")


def _over_defaults(given: dict, default: BaseModel) -> dict:
    """`given` (a section's options as mapping) over the options that `default` sets explicitly, nested
    sections and models merged the same way."""
    merged = default.model_dump(exclude_unset=True)
    for key, value in given.items():
        inner = getattr(default, key, None)
        merged[key] = (
            _over_defaults(value, inner) if isinstance(value, dict) and isinstance(inner, BaseModel) else value
        )
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RecipeConfig:
    """The recipe in YAML file `path` (None: the built-in defaults) with `key=value` overrides applied.

    Raises: FileNotFoundError for a missing file; ValueError for an override without '=', an unknown key
    or a bad value (pydantic's ValidationError is a ValueError) naming it.
    """
    return RecipeConfig.model_validate(read_recipe(path, overrides))


def prepare(config: RecipeConfig) -> Callable[..., dict]:
    """The job of `config` in this process, `job(resume=False)`, its data built now (bad data raises ValueError or
    FileNotFoundError before any training)."""
    data, teacher_data = build_recipe_data(config)
    return partial(run, config, data=data, teacher_data=teacher_data)


def build_recipe_data(config: RecipeConfig) -> tuple[TaskData, TaskData]:
    """(the students' data, the teachers' data): both `build_data(config.data)`, unless the teachers have a
    tokenizer of their own: then the teachers' is `build_data` at their vocabulary size (what such a teacher
    trains on) and the students' also holds the teachers' tokens and the alignment (`cross_tokenizer_blocks`)."""
    own = config.teachers[0].tokenizer
    if own is None:
        data = build_data(config.data)
        return data, data
    teacher_data = build_data(config.data.model_copy(update={"vocab_size": own.vocab_size}))
    return build_data(config.data, teacher_data.tokenizer), teacher_data


# ----------------------------------------------------------------------------------------------------------
# The run


def run(
    config: RecipeConfig,
    resume: bool = False,
    data: TaskData | None = None,
    runtime: Runtime | None = None,
    teacher_data: TaskData | None = None,
) -> dict:
    """Run the recipe (on `data` and `teacher_data` when already built: `build_recipe_data`) in `runtime` (default:
    `LocalRuntime`); returns {model name: {metric: value}} (also written to output_dir/results.json)."""
    runtime = runtime or LocalRuntime()
    device, precision, out_dir = start_run(config, runtime.rank)

    if data is None or (config.teachers[0].tokenizer is None) != (data.teacher_tokenizer is None):
        data, teacher_data = build_recipe_data(config)
    teacher_data = teacher_data or data
    cross = data.teacher_tokenizer is not None  # the teachers have a tokenizer of their own
    console.print(data.summary())
    if cross:
        console.print("teacher " + teacher_data.summary())
    phase = lambda name, training, **kw: Phase(  # noqa: E731
        name, out_dir / name, training, config.seed, device, precision, logging=config.logging, **kw
    )
    student_phase = lambda name, adversarial: phase(  # noqa: E731
        name, config.training, adversarial=adversarial, rank=runtime.rank, world_size=runtime.world_size
    )

    obtained = [
        obtain_teacher(i, config, teacher_data, phase(f"teacher_{i}", config.teacher_training), resume, runtime)
        for i in range(len(config.teachers))
    ]
    teacher_models = [model for model, _, _ in obtained]
    teachers = Teachers(teacher_models, [t.weight for t in config.teachers], data.task).to(device)
    source = teachers
    if config.teacher_cache.enabled:
        source = build_teacher_cache(config, data, teachers, [key for _, key, _ in obtained], device, runtime)
    if cross:
        source = OwnTokenizerTeachers(teachers, vocabulary_map(data.tokenizer, teacher_data.tokenizer)).to(device)

    if runtime.rank == 0:
        data.tokenizer.save(str(out_dir / TOKENIZER_FILE))
        for i, (_, _, path) in enumerate(obtained):
            export_teacher(teacher_models[i], path, out_dir / f"teacher_{i}")
            if cross:  # the phase's own tokenizer, which `python -m tsa_fast.generate` prefers to the run's
                teacher_data.tokenizer.save(str(out_dir / f"teacher_{i}" / TOKENIZER_FILE))

    student_data = data  # what the distilled students train on: the teacher's completions with sequence-level KD
    if config.loss.sequence_kd.enabled:
        train = build_sequence_kd(config, data, teacher_models[0], obtained[0][1], device, runtime)
        student_data = dataclasses.replace(data, train=train)

    runs: dict[str, tuple[Transformer, FitResult]] = {}

    def train_student(name: str, adversarial: AdversarialConfig, loss: LossConfig, init: str, on: TaskData, source):
        """Student `name` (initialized by `init`) trained on `on` from `source` (None: no teacher)."""
        student = build_student(config, on, init, obtained[0][2])
        teacher_shape = teacher_models[0].config if source is not None else None
        objective = DistillationObjective(loss, on.task, student_config(config, on), teacher_shape)
        optimization = runtime.optimization(student, objective, config.training)
        # Agreement and KL with the teachers compare distributions over one vocabulary: not across tokenizers.
        agreement = None if cross and on is not teacher_data else teachers
        distiller = Distiller(student, objective, on, student_phase(name, adversarial), source, optimization, agreement)
        runs[name] = (student, distiller.fit(resume))
        if runtime.rank == 0:
            write_model_config(student, out_dir / name)

    # Without the teachers' tokens and alignment, which a student without a teacher never reads.
    alone = data.without_teacher_tokens()
    init = config.student.init
    variants = [("distilled", config.adversarial, config.loss, init, student_data, source)]
    if config.adversarial.method != "none" and config.adversarial.compare:
        no_adversarial = config.adversarial.model_copy(update={"method": "none"})
        variants.append(("distilled_no_adversarial", no_adversarial, config.loss, init, student_data, source))
    if config.on_policy_compare:
        off_policy = config.loss.model_copy(update={"on_policy": OnPolicyConfig()})
        variants.append(("distilled_off_policy", config.adversarial, off_policy, init, student_data, source))
    if config.same_tokenizer_compare:
        variants.append(("distilled_same_tokenizer", config.adversarial, config.loss, init, teacher_data, teachers))
    if config.baseline:
        variants.append(("baseline", config.adversarial, config.loss, init, alone, None))
        variants += [
            (
                v.name,
                config.adversarial,
                config.loss,
                v.init,
                student_data if v.distilled else alone,
                source if v.distilled else None,
            )
            for v in config.students
        ]
    for variant in variants:
        train_student(*variant)

    models = {"teacher": teacher_models[0], **{k: m for k, (m, _) in runs.items()}}
    in_teacher_tokens = {"teacher", "distilled_same_tokenizer"} if cross else set()
    results = evaluate_all(
        config,
        data,
        models,
        {k: fit for k, (_, fit) in runs.items()},
        device,
        precision,
        data_of={name: teacher_data for name in in_teacher_tokens if name in models},
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
) -> tuple[nn.Module, str, Path]:
    """Teacher i, placed by `runtime`, a key identifying it and the file of its weights: from its checkpoint, from
    the recipe's cache, or trained now (in one process, rank 0's, and cached)."""
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
    return runtime.teacher(lambda: Transformer(model_cfg), path), key, path


def write_model_config(model: Transformer, directory: Path) -> None:
    """directory/config.json: the model's TransformerConfig, so that the phase directory (its checkpoint.pt) is a
    Transformer directory (`Transformer.from_pretrained`, `python -m tsa_fast.generate`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(model.config.model_dump_json(indent=2))


def export_teacher(teacher: Transformer, weights: Path, directory: Path) -> None:
    """Make `directory` the teacher's Transformer directory: config.json and model.pt, the file of its weights
    (a cached teacher or a given checkpoint: {"config", "model"}), hard-linked where the file system allows."""
    write_model_config(teacher, directory)
    target = directory / "model.pt"
    if target.exists() and os.path.samefile(target, weights):
        return
    tmp = target.with_name("model.pt.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(weights, tmp)
    except OSError:
        shutil.copyfile(weights, tmp)
    os.replace(tmp, target)


def build_student(config: RecipeConfig, data: TaskData, init: str, teacher_weights: Path) -> Transformer:
    """The student, identically initialized for every variant of the same `init` (seeded): random, or
    teacher_layers from the first teacher's weights file `teacher_weights` ({"config", "model"}; read on the
    CPU, so that a teacher partitioned across ranks serves as well), narrower students by leading slices."""
    torch.manual_seed(config.seed + 1)
    student = Transformer(student_config(config, data))
    if init == "teacher_layers":
        teacher = Transformer(model_config(config.teachers[0].model, data, config.data.seq_len))
        teacher.load_state_dict(load_weights_only(teacher_weights)["model"])
        layers = config.student.layers or every_kth_layer(teacher.config.n_layers, student.config.n_layers)
        init_from_teacher(student, teacher, layers, narrower=True)
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


def build_sequence_kd(
    config: RecipeConfig, data: TaskData, teacher: Transformer, teacher_key: str, device: torch.device, runtime: Runtime
) -> dict[str, torch.Tensor]:
    """The training split of sequence-level KD: the (first) teacher's completions of the training prompts,
    cached under a fingerprint of the teacher, the prompts and the sampling settings (`teacher_completions`)."""
    seq_kd = config.loss.sequence_kd
    key = fingerprint(
        teacher_key,
        data_fingerprint(data),
        seq_kd.prompt_tokens,
        seq_kd.max_new_tokens,
        seq_kd.temperature,
        config.seed,
    )
    directory = Path(seq_kd.dir) if seq_kd.dir else Path(config.data.cache_dir) / "sequence_kd"
    sequences = teacher_completions(
        teacher,
        data.train,
        directory / key,
        prompt_tokens=seq_kd.prompt_tokens,
        max_new_tokens=seq_kd.max_new_tokens,
        temperature=seq_kd.temperature,
        fingerprint=key,
        batch_size=config.training.batch_size,
        device=device,
        seed=config.seed,
        progress=config.logging.progress,
        rank=runtime.rank,
        barrier=runtime.barrier,
    )
    return sequence_kd_split(sequences, seq_kd.prompt_tokens, data.eos_id)


def evaluate_all(
    config, data, models, fits: dict[str, FitResult], device, precision, data_of: dict[str, TaskData] | None = None
) -> dict:
    """Validation and test metrics of every model, inference throughput. A student's validation metrics, with its
    agreement with the teachers, are its final validation in `fits` (name -> `Distiller.fit`'s result), which
    evaluated the whole split: only the teacher's are measured here. `data_of`: the data of the models of another
    tokenizer than `data`'s (name -> TaskData); their tokens/s are measured among themselves, the speed-up over the
    teacher only where a model has its tokenizer, the sampled continuations (the teacher's NLL of a student's
    tokens) only when every model has one tokenizer, and the gap closed in bits per byte when some has another."""
    data_of = data_of or {}
    autocast = Phase("eval", Path(), config.training, config.seed, device, precision).autocast
    epsilon = config.adversarial.epsilon if config.adversarial.method != "none" else None
    kwargs = dict(batch_size=config.training.batch_size, device=device, autocast=autocast)
    results = {}
    for name, model in models.items():
        fit, on = fits.get(name), data_of.get(name, data)
        validation = fit.validation if fit else evaluate(model, on.validation, on.task, **kwargs)
        test = evaluate(model, on.test, on.task, **kwargs)
        row = {
            "parameters": num_parameters(model),
            **{f"validation_{k}": v for k, v in validation.items()},
            **{f"test_{k}": v for k, v in test.items()},
        }
        if epsilon is not None:
            perturbed = evaluate(model, on.validation, on.task, epsilon=epsilon, **kwargs)
            row.update({f"validation_perturbed_{k}": v for k, v in perturbed.items()})
        if fit:
            row["train_tokens_per_s"] = fit.train_tokens_per_s
            row["train_ms_per_step"] = 1000 * fit.train_seconds_per_step
        results[name] = row
    by_tokenizer: dict[int, list[str]] = {}
    for name in models:
        by_tokenizer.setdefault(id(data_of.get(name, data)), []).append(name)
    for names in by_tokenizer.values():
        on = data_of.get(names[0], data)
        speeds = tokens_per_second({n: models[n] for n in names}, on.validation, on.task, **kwargs)
        for name in names:
            results[name]["inference_tokens_per_s"] = speeds[name]
            if "teacher" in names:
                results[name]["speedup_vs_teacher"] = speeds[name] / speeds["teacher"]
    if data.task == "lm" and not data_of:
        evaluate_samples(config.samples, data, models, results, device, autocast)
    # Perplexities of two tokenizers are not comparable: across tokenizers the gap is in bits per byte.
    add_gap_closed(results, "bits_per_byte" if data_of else headline_metrics(data.task)[0][0])
    return results


def add_gap_closed(results: dict, metric: str) -> None:
    """With a baseline row, add to every row `{split}_gap_closed`: the share of the gap between the baseline
    and the teacher on `metric` that the model closes, (baseline - model) / (baseline - teacher) (0: the
    baseline's quality, 1: the teacher's; negative: worse than the baseline); none on a split where the two
    are equal."""
    if "baseline" not in results:
        return
    for split in ("validation", "test"):
        key = f"{split}_{metric}"
        base, gap = results["baseline"][key], results["baseline"][key] - results["teacher"][key]
        if gap:
            for row in results.values():
                row[f"{split}_gap_closed"] = (base - row[key]) / gap


def held_out_prompts(data: TaskData, count: int, prompt_tokens: int) -> torch.Tensor:
    """(count', prompt_tokens) int64: the first prompt_tokens of the first `count` test documents that have that
    many tokens (documents start the test stream and follow each EOS); count' < count on a small test split.
    Raises ValueError when none has."""
    stream = data.test["input_ids"].flatten()
    starts = torch.cat((torch.zeros(1, dtype=torch.int64), (stream == data.eos_id).nonzero().flatten() + 1))
    starts = starts[starts + prompt_tokens <= len(stream)]
    windows = stream[starts.unsqueeze(1) + torch.arange(prompt_tokens)]
    prompts = windows[~(windows == data.eos_id).any(dim=1)][:count]
    if len(prompts) == 0:
        raise ValueError(f"no test document has samples.prompt_tokens={prompt_tokens} tokens")
    return prompts


def evaluate_samples(samples: SamplesConfig, data: TaskData, models: dict, results: dict, device, autocast) -> None:
    """Add to each model's row of `results` its sampled-continuation metrics on the held-out prompts
    (`sample_metrics`: the teacher's NLL, distinct-2) and its greedy completions as text ("completions")."""
    prompts = held_out_prompts(data, samples.prompts, samples.prompt_tokens).to(device)
    new = min(samples.max_new_tokens, data.test["input_ids"].shape[1] - samples.prompt_tokens)
    sampled = sample_metrics(
        models,
        models["teacher"],
        prompts,
        new,
        temperature=samples.temperature,
        seed=samples.seed,
        eos_id=data.eos_id,
        autocast=autocast,
    )
    shown = prompts[: samples.shown]
    greedy = sampled_continuations(models, shown, new, temperature=0.0, seed=samples.seed, autocast=autocast)
    decode = lambda ids: data.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for name, row in results.items():
        row.update(sampled[name])
        row["completions"] = [
            {"prompt": decode(prompt), "completion": decode(until_eos(sequence[samples.prompt_tokens :], data.eos_id))}
            for prompt, sequence in zip(shown.tolist(), greedy[name].tolist())
        ]


def headline_metrics(task: str) -> list[tuple[str, str, str]]:
    """(result key suffix, column title, format) of the table's quality columns."""
    if task == "lm":
        return [("perplexity", "ppl", "{:.2f}"), ("bits_per_byte", "bits/byte", "{:.3f}")]
    return [("accuracy", "acc", "{:.1%}"), ("macro_f1", "macro-F1", "{:.3f}")]


def write_completions(config: RecipeConfig, results: dict, path: Path) -> None:
    """Append each model's greedy completions of the held-out prompts to the markdown file `path`."""
    samples = config.samples
    new = min(samples.max_new_tokens, config.data.seq_len - samples.prompt_tokens)
    lines = [
        "",
        f"Greedy completions (temperature 0, {new} new tokens, cut at EOS) of held-out prompts"
        f" (the first {samples.prompt_tokens} tokens of test documents):",
    ]
    first = next(iter(results.values()))["completions"]
    for i, shown in enumerate(first):
        lines += ["", f"Prompt {i + 1}: `{_one_line(shown['prompt'])}`", ""]
        lines += [f"- {name}: `{_one_line(row['completions'][i]['completion'])}`" for name, row in results.items()]
    with path.open("a") as file:
        file.write("\n".join(lines) + "\n")


def _one_line(text: str) -> str:
    return text.replace("\n", "\\n").replace("`", "'")


def write_report(config: RecipeConfig, data: TaskData, results: dict, out_dir: Path) -> None:
    """The table (printed, results.md), results.json, and curves.png."""
    columns = [("parameters", "params", "{:,}")]
    for split, short in (("validation", "val"), ("test", "test")):
        columns += [(f"{split}_{key}", f"{short} {title}", fmt) for key, title, fmt in headline_metrics(data.task)]
    if "baseline" in results:
        columns += [
            (f"{split}_gap_closed", f"{short} gap closed", "{:.1%}")
            for split, short in (("validation", "val"), ("test", "test"))
        ]
    if config.adversarial.method != "none":
        key, title, fmt = headline_metrics(data.task)[0]
        columns.append(
            (f"validation_perturbed_{key}", f"val {title} (perturbed, eps={config.adversarial.epsilon})", fmt)
        )
    columns += [
        ("validation_agreement", "top-1 agreement", "{:.1%}"),
        ("validation_kl", "KL(teacher, model)", "{:.3f}"),
        ("sample_teacher_nll", "teacher NLL of samples", "{:.3f}"),
        ("sample_distinct_2", "distinct-2", "{:.3f}"),
        ("inference_tokens_per_s", "tokens/s", "{:,.0f}"),
        ("speedup_vs_teacher", "speed-up", "{:.2f}x"),
        ("train_ms_per_step", "train ms/step", "{:,.0f}"),
    ]
    write_table(f"{config.name}: {data.task}, validation and test", columns, results, out_dir)
    if any(row.get("completions") for row in results.values()):
        write_completions(config, results, out_dir / "results.md")
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
