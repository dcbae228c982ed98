"""DeepSpeed ZeRO for teachers too large for one device: the recipe of `train.py` run on every rank of a job.

    deepspeed --num_gpus N train.py --config configs/RECIPE.yaml --deepspeed configs/ds/zero3_teacher.json
    deepspeed --num_accelerators 2 train.py ...          # CPU machine (gloo); torchrun --nproc_per_node 2 works too
    python -m tsa_fast.integrations.deepspeed export runs/RECIPE/distilled student.safetensors

The lm and classify recipes (`tsa_fast.recipes.lm.run`) run unchanged with `DeepSpeedRuntime` as their runtime
(the `Runtime` protocol of `tsa_fast.distill.protocols`):
- each teacher is a DeepSpeed engine of its own: ZeRO stage 3, no optimizer, frozen, in eval mode, run under
  `torch.no_grad()` (`Teachers`). It is built under `deepspeed.zero.Init`, so every block is partitioned across the
  ranks as it is built, then its checkpoint is loaded parameter by parameter from rank 0 (memory-mapped): no rank
  ever holds the whole teacher. `offload_param` keeps the partitions in CPU memory.
- each student phase is a DeepSpeed engine (`DeepSpeedOptimization`) with ZeRO stage 2 or 3 and the recipe's
  AdamW (DeepSpeedCPUAdam under `offload_optimizer`), warm-up + cosine schedule, batch size, accumulation and
  clipping. Data parallel: rank r trains on slice r of every global micro-batch of training.batch_size x
  world_size examples, so N ranks see the batches of one process with N times the batch size.
- ZeRO-3 LM-head weights are gathered only where they are used outside their module's forward: for the fused
  loss and for logits (`tsa_fast.models.gathered`), and released after; a ZeRO-3 student's is registered with
  its objective, so that DeepSpeed also gathers it for the backward of the loss.
- any model of the engine's protocol works, `tsa_fast.models.Transformer` or a Hugging Face `HFModel` (built
  from its config under `zero.Init`, its weights from a {"model": state dict} checkpoint).
- a teacher the recipe trains itself (no checkpoint, none cached) is trained first by rank 0 alone, exactly as
  `python train.py` trains it (the same cache file serves both), while the other ranks wait; large teachers come
  from `teachers[i].checkpoint`.
- rank 0 writes metrics, reports and the teacher cache's meta; every rank runs validation and evaluation
  (ZeRO-3 forwards are collective) and its share of the teacher top-k cache.
- checkpoints are DeepSpeed checkpoints of the student engine, `PHASE/step<N>/` (with the model's config as
  `model_config.json`) and `PHASE/latest` (written last, atomically); `--resume` continues from them. `export`
  turns the last one into a plain state dict. Every torch file is read with weights_only=True, DeepSpeed's own
  included (`weights_only_loads`, which allows the plain-data classes of `CHECKPOINT_CLASSES` in them).
- measured per rank and written to output_dir/deepspeed.json (and printed): the teacher parameter bytes the rank
  holds and their total over all ranks, its peak memory (CUDA: allocated; CPU: resident set), and the
  distillation tokens/s of the rank.

The DeepSpeed config (`--deepspeed FILE`, repeatable: each file is merged into the previous ones key by key) has
two sections, each a DeepSpeed config: "teacher" (default {"zero_optimization": {"stage": 3}}) and "student"
(default {"zero_optimization": {"stage": 2}}); configs/ds/ holds the common ones. The recipe supplies batch size,
gradient accumulation, clipping, optimizer and learning-rate schedule; `check` rejects a config that contradicts
it or that the engines cannot run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from pydantic import BaseModel
from rich.table import Table
from torch import Tensor, nn

from tsa_fast.distill.checkpoints import load_weights_only, weights_only_loads
from tsa_fast.distill.config import TrainingConfig
from tsa_fast.distill.data import TaskData, build_data
from tsa_fast.distill.distiller import lr_lambda, param_groups
from tsa_fast.distill.protocols import Runtime
from tsa_fast.recipes.lm import RecipeConfig, run
from tsa_fast.recipes.report import console

DEFAULTS = {"teacher": {"zero_optimization": {"stage": 3}}, "student": {"zero_optimization": {"stage": 2}}}
LATEST = "latest"  # DeepSpeed's name for the file that holds the tag of the last checkpoint
MODEL_CONFIG = "model_config.json"  # in each checkpoint's directory: the model's config, for `export`
# The classes DeepSpeed pickles into its optimizer-state files besides tensors: plain data (an enum, a dataclass
# of two ints, loss scalers' numbers), which weights_only loading rebuilds without running any code.
CHECKPOINT_CLASSES = (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)


def read_config(paths: list[str | Path]) -> dict:
    """The DeepSpeed config of a run: DEFAULTS with each JSON file of `paths` merged in turn.

    Raises: FileNotFoundError for a missing file; ValueError for a file that is not JSON, or a top-level key
    other than "teacher" and "student".
    """
    config = copy.deepcopy(DEFAULTS)
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config not found: {path}")
        try:
            sections = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON: {error}") from None
        unknown = sorted(set(sections) - set(DEFAULTS)) if isinstance(sections, dict) else [type(sections).__name__]
        if unknown:
            raise ValueError(
                f"{path}: a tsa_fast DeepSpeed config has the sections 'teacher' and 'student', "
                f"each a DeepSpeed config; got {unknown}"
            )
        _merge(config, sections)
    return config


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def check(config: RecipeConfig, ds: dict, world_size: int) -> None:
    """Raise ValueError naming every way the DeepSpeed config `ds` (from `read_config`) and the recipe cannot
    run together on `world_size` ranks."""
    teacher, student, training = ds["teacher"], ds["student"], config.training
    zero_t, zero_s = teacher.get("zero_optimization", {}), student.get("zero_optimization", {})
    problems = []
    if zero_t.get("stage") != 3:
        problems.append(
            f"teacher: zero_optimization.stage must be 3 (parameters partitioned), got {zero_t.get('stage')}:"
            " a frozen teacher has no optimizer state or gradients for stages 1 and 2 to partition"
        )
    for name in ("optimizer", "scheduler"):
        if name in teacher:
            problems.append(f"teacher: a frozen teacher has no {name}; remove '{name}'")
        if name in student:
            problems.append(
                f"student: the recipe's training section sets the {name} (AdamW, warm-up + cosine); remove '{name}'"
            )
    if "offload_optimizer" in zero_t:
        problems.append("teacher: a frozen teacher has no optimizer to offload; use offload_param")
    if zero_s.get("stage") not in (0, 1, 2, 3):
        problems.append(f"student: zero_optimization.stage must be 0, 1, 2 or 3, got {zero_s.get('stage')}")
    if "offload_param" in zero_s and zero_s.get("stage") != 3:
        problems.append(f"student: offload_param needs zero_optimization.stage 3, got {zero_s.get('stage')}")
    if "offload_optimizer" in zero_s and zero_s.get("stage") not in (1, 2, 3):
        problems.append(
            f"student: offload_optimizer needs zero_optimization.stage 1, 2 or 3, got {zero_s.get('stage')}"
        )
    expected = _batch_settings(training, world_size)
    for key, value in student.items():
        if key in expected and value != expected[key]:
            hint = f"remove {key}, or change the recipe"
            if key == "train_batch_size":
                per_rank, rest = divmod(value, training.grad_accum * world_size)
                hint = (
                    f"it is not a multiple of grad_accum x ranks = {training.grad_accum * world_size}"
                    if rest or not per_rank
                    else f"remove it, or set training.batch_size={per_rank}"
                )
            problems.append(
                f"student: {key}={value}, but the recipe gives {expected[key]}"
                f" (training.batch_size={training.batch_size}"
                f" per rank x training.grad_accum={training.grad_accum} x {world_size} ranks; gradient_clipping ="
                f" training.clip_grad): {hint}"
            )
    if config.precision == "fp16":
        problems.append(
            "precision=fp16: DeepSpeed scales fp16 losses itself; use precision=bf16, or fp32 with "
            '"fp16": {"enabled": true} in the student section'
        )
    if config.student.init == "teacher_layers":
        problems.append(
            "student.init=teacher_layers copies whole teacher blocks, which no rank holds of a ZeRO-3 "
            "teacher; use student.init=random"
        )
    if problems:
        raise ValueError("inconsistent DeepSpeed config:\n  " + "\n  ".join(problems))


def _batch_settings(training: TrainingConfig, world_size: int) -> dict:
    """The batch and clipping settings of the student engine, as the recipe determines them."""
    return {
        "train_batch_size": training.batch_size * training.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": training.batch_size,
        "gradient_accumulation_steps": training.grad_accum,
        "gradient_clipping": training.clip_grad or 0.0,
    }


class DeepSpeedRuntime(Runtime):
    """The recipe's `Runtime` on one rank of a DeepSpeed job (see the module docstring): initializes the process
    group (one process when no launcher set the environment), checks `ds` against `config`, and keeps the
    teacher engines. Rank 0's console is the only one that prints."""

    def __init__(self, config: RecipeConfig, ds: dict):
        for name, value in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ):
            os.environ.setdefault(name, value)  # plain `python train.py --deepspeed ...`: a job of one rank
        check(config, ds, int(os.environ["WORLD_SIZE"]))
        self.ds, self.training = ds, config.training
        deepspeed.init_distributed()
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        console.quiet = self.rank != 0
        self.teacher_engines: list = []

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Release the ZeRO-3 teachers (their partitioned parameters and hooks), let every rank finish its
        collectives, then end the process group through deepspeed.comm so that DeepSpeed drops its references
        too: torch's destroy_process_group alone leaves Gloo work alive until interpreter exit, which can abort
        a rank ("terminate called without an active exception")."""
        for engine in self.teacher_engines:
            engine.destroy()
        self.teacher_engines.clear()
        dist.barrier()
        deepspeed.comm.destroy_process_group()

    def teacher(self, build: Callable[[], nn.Module], checkpoint: Path) -> nn.Module:
        """`build()` under zero.Init (partitioned as built), `checkpoint`'s weights loaded from rank 0, frozen,
        wrapped in a ZeRO-3 engine without optimizer; returns the engine's module."""
        config = {"train_micro_batch_size_per_gpu": self.training.batch_size, **self.ds["teacher"]}
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = build()
        load_partitioned(model, checkpoint)
        engine, *_ = deepspeed.initialize(model=model.eval().requires_grad_(False), config=config)
        self.teacher_engines.append(engine)
        return engine.module

    def optimization(self, model: nn.Module, objective: nn.Module, training: TrainingConfig) -> DeepSpeedOptimization:
        """A DeepSpeed engine over the student and its objective. Under ZeRO-3 the LM-head weight, which the
        objective's loss uses outside the model's forward, is registered with the objective, so that DeepSpeed
        gathers it for the objective's forward and backward."""
        module = nn.ModuleDict({"model": model, "objective": objective})
        optimization = DeepSpeedOptimization(
            module, training, {**self.ds["student"], **_batch_settings(training, self.world_size)}
        )
        if objective.task == "lm" and self.ds["student"]["zero_optimization"]["stage"] == 3:
            deepspeed.zero.register_external_parameter(objective, model.lm_head_weight)
        return optimization

    def run(self, config: RecipeConfig, data: TaskData, resume: bool = False) -> dict:
        """`recipes.lm.run` on this rank, then the per-rank memory and throughput report (output_dir/deepspeed.json);
        returns the recipe's results. Ends the process group."""
        results = run(config, resume, data, self)
        figures = {
            "rank": self.rank,
            **teacher_bytes([engine.module for engine in self.teacher_engines]),
            "peak_memory_bytes": peak_memory_bytes(),
            "distilled_tokens_per_s": results["distilled"]["train_tokens_per_s"],
        }
        ranks = [None] * self.world_size
        dist.all_gather_object(ranks, figures)
        if self.rank == 0:
            report = {
                "world_size": self.world_size,
                "teacher": self.ds["teacher"],
                "student": self.ds["student"],
                "ranks": ranks,
            }
            (Path(config.output_dir) / "deepspeed.json").write_text(json.dumps(report, indent=2))
            print_report(report)
        self.close()
        return results


def prepare(config: RecipeConfig, ds_paths: list[str]) -> Callable[..., dict]:
    """The job `train.py --deepspeed` runs on this rank: `DeepSpeedRuntime.run` of `config` (the lm or classify
    recipe's) on its data, which rank 0 builds first (and caches) and the others then load. Raises ValueError /
    FileNotFoundError for another recipe's config, a bad DeepSpeed config or bad data, before any training."""
    if not isinstance(config, RecipeConfig):
        raise ValueError(f"recipe {config.recipe!r} does not run under DeepSpeed: --deepspeed runs lm and classify")
    runtime = DeepSpeedRuntime(config, read_config(ds_paths))
    with runtime.main_first():
        data = build_data(config.data)
    return lambda resume=False: runtime.run(config, data, resume)


def load_partitioned(model: nn.Module, checkpoint: Path) -> None:
    """Load `checkpoint` ({"model": state dict}) into `model`, whose parameters ZeRO-3 partitioned: one parameter
    at a time, gathered, written by rank 0 (from the memory-mapped file) and partitioned again. Persistent
    buffers, whole on every rank, are loaded by every rank. Raises ValueError for missing or unexpected keys
    (like `load_state_dict`), and for a file that holds anything but tensors and plain data (`load_weights_only`)."""
    state = load_weights_only(checkpoint, mmap=True)["model"]
    names = model.state_dict(keep_vars=True).keys()  # parameters (tied ones under each name), persistent buffers
    missing, unexpected = sorted(names - state.keys()), sorted(state.keys() - names)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: does not fit the teacher: missing {missing}, unexpected {unexpected}")
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters(param, modifier_rank=0):
            if dist.get_rank() == 0:
                param.data.copy_(state[name])
    for name, buffer in model.named_buffers():
        if name in names:
            buffer.copy_(state[name])


class DeepSpeedOptimization:
    """The `Distiller`'s optimization (the interface of `TorchOptimization`) on a DeepSpeed engine over `module`
    (model and objective): AdamW with weight decay on matrices only (DeepSpeedCPUAdam, the same update, when the
    optimizer is offloaded), warm-up + cosine learning rate, the clipping, batch and accumulation of `config`
    (a DeepSpeed config). `backward` accumulates a micro-batch's gradient; `step`, after training.grad_accum
    of them, is the engine's accumulation boundary (DeepSpeed's `set_gradient_accumulation_boundary`: the last
    backward reduces the gradients, `engine.step()` clips and updates). Checkpoints are DeepSpeed checkpoints,
    `step<N>/` in the phase's directory, the previous one removed once `latest` names the new one."""

    def __init__(self, module: nn.ModuleDict, training: TrainingConfig, config: dict):
        offloaded = "offload_optimizer" in config.get("zero_optimization", {})
        adamw = deepspeed.ops.adam.DeepSpeedCPUAdam if offloaded else torch.optim.AdamW
        optimizer = adamw(param_groups(module.named_parameters(), training.weight_decay), lr=training.lr)
        self.module, self.grad_accum, self.micro_batches = module, training.grad_accum, 0
        self.engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(training)),
        )

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss (DeepSpeed scales it by 1 / grad_accum); the
        grad_accum-th of a step is the accumulation boundary, where DeepSpeed reduces the gradients over the ranks.
        Raises RuntimeError for more than grad_accum micro-batches before a `step`."""
        if self.micro_batches == self.grad_accum:
            raise RuntimeError(f"{self.grad_accum} micro-batches per step (training.grad_accum): call step()")
        self.micro_batches += 1
        self.engine.set_gradient_accumulation_boundary(self.micro_batches == self.grad_accum)
        self.engine.backward(loss)

    def step(self) -> None:
        """Clip, step AdamW and the learning rate, zero the gradients: the engine's step at the boundary. Raises
        RuntimeError before grad_accum micro-batches (their gradients would not have been reduced)."""
        if self.micro_batches != self.grad_accum:
            raise RuntimeError(
                f"step() after {self.micro_batches} of the {self.grad_accum} micro-batches (training.grad_accum)"
            )
        self.engine.step()
        self.micro_batches = 0

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def has_checkpoint(self, directory: Path) -> bool:
        return (directory / LATEST).exists()

    def save(self, directory: Path, client_state: dict) -> None:
        """Save on every rank (collective): the engine's checkpoint with `client_state`, and the model's config
        as JSON (a `TransformerConfig`, for `export`; null for other models)."""
        tag = f"step{client_state['step']}"
        config = self.module["model"].config
        self.engine.save_checkpoint(str(directory), tag, client_state, save_latest=False)
        if dist.get_rank() == 0:
            model_config = config.model_dump() if isinstance(config, BaseModel) else None
            (directory / tag / MODEL_CONFIG).write_text(json.dumps(model_config))
            (directory / (LATEST + ".tmp")).write_text(tag)
            os.replace(directory / (LATEST + ".tmp"), directory / LATEST)
            for old in directory.glob("step*"):
                if old.name != tag:
                    shutil.rmtree(old)

    def load(self, directory: Path) -> dict:
        """Restore the checkpoint `latest` names, every file with weights_only; returns its client state."""
        with weights_only_loads(CHECKPOINT_CLASSES):
            _, client_state = self.engine.load_checkpoint(str(directory))
        return client_state


def teacher_bytes(teachers: list[nn.Module]) -> dict:
    """The bytes of the teachers' parameters this rank holds (its ZeRO-3 partitions, and the whole of the
    parameters that ZeRO-3 keeps whole: `ds_persist`), their total, and where the partitions live."""
    params = [p for teacher in teachers for p in teacher.parameters()]
    held = sum((p.ds_numel if p.ds_persist else p.ds_tensor.numel()) * p.element_size() for p in params)
    return {
        "teacher_param_bytes": held,
        "teacher_param_bytes_total": sum(p.ds_numel * p.element_size() for p in params),
        "teacher_param_device": str(params[0].ds_tensor.device),
    }


def peak_memory_bytes() -> int:
    """The peak memory of this process: allocated on its CUDA device, else its resident set (Linux)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def print_report(report: dict) -> None:
    table = Table(title=f"DeepSpeed, {report['world_size']} ranks: per rank")
    for column in ("rank", "teacher params held", "of total", "on", "peak memory", "distillation tokens/s"):
        table.add_column(column, justify="right")
    for r in report["ranks"]:
        share = r["teacher_param_bytes"] / r["teacher_param_bytes_total"]
        table.add_row(
            str(r["rank"]),
            f"{r['teacher_param_bytes'] / 2**20:,.1f} MiB",
            f"{share:.1%}",
            r["teacher_param_device"],
            f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB",
            f"{r['distilled_tokens_per_s']:,.0f}",
        )
    console.print(table)


def export(phase_dir: Path, out: Path) -> Path:
    """Write the student of the last DeepSpeed checkpoint in `phase_dir` as a plain state dict, loadable without
    DeepSpeed: `.safetensors` (the model's config as JSON in the metadata under "config") or `.pt`
    ({"config", "model"}: the format of teacher checkpoints). Returns `out`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (phase_dir / LATEST).read_text().strip()
    with weights_only_loads(CHECKPOINT_CLASSES):
        state = get_fp32_state_dict_from_zero_checkpoint(str(phase_dir), tag)
    model = {name.removeprefix("model."): t.contiguous() for name, t in state.items() if name.startswith("model.")}
    config = json.loads((phase_dir / tag / MODEL_CONFIG).read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(model, out, metadata=None if config is None else {"config": json.dumps(config)})
    else:
        torch.save({"config": config, "model": model}, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Convert the last DeepSpeed checkpoint of a student phase "
        "(output_dir/PHASE) to a state dict loadable without DeepSpeed."
    )
    parser.add_argument("command", choices=["export"])
    parser.add_argument("phase_dir", type=Path, help="e.g. runs/stdlib_lm/distilled")
    parser.add_argument("out", type=Path, help="FILE.safetensors or FILE.pt")
    args = parser.parse_args()
    if not (args.phase_dir / LATEST).is_file():
        parser.error(f"no DeepSpeed checkpoint in {args.phase_dir} (no '{LATEST}' file)")
    console.print(f"wrote {export(args.phase_dir, args.out)}")


if __name__ == "__main__":
    main()
