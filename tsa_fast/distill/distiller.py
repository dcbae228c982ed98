"""The training loop of one phase: a model trained for `training.steps` optimizer steps on its objective,
with or without teachers, with checkpoints it can resume from.

One loop serves teacher pre-training (no teacher: cross-entropy), distillation, and the no-teacher
baseline. Per optimizer step: `grad_accum` micro-batches (`loss.on_policy.fraction` of them replaced by the
student's own continuations: `tsa_fast.distill.on_policy`; teacher targets under `torch.no_grad()`, student
forward under autocast, optional adversarial loss on perturbed embeddings), global-norm clipping, AdamW,
warm-up + cosine learning rate. Data order is a function of (seed, step) (`batches.training_indices`), so
a checkpoint (model, objective, optimizer, scheduler, scaler, RNG, step) is the whole state: a run killed
anywhere resumes from its last checkpoint and continues the same loss curve.

The optimization itself (backward, step, checkpoint files) is the `Optimization` protocol
(`tsa_fast.distill.protocols`): `TorchOptimization` here, `DeepSpeedOptimization` in
`tsa_fast.integrations.deepspeed`. Under data parallelism each rank takes its slice of every global
micro-batch (`Phase.rank`, `Phase.world_size`).

The step leaves its loss and terms on the device: the host reads them (and the ranks average them) only
when a metrics row is written, every `log_every` steps, so the device runs ahead between rows.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from tsa_fast.distill.adversarial import adversarial_delta
from tsa_fast.distill.batches import num_examples, take, training_indices
from tsa_fast.distill.checkpoints import load_weights_only, save_atomically
from tsa_fast.distill.config import AdversarialConfig, LoggingConfig, TrainingConfig
from tsa_fast.distill.evaluate import evaluate
from tsa_fast.distill.metrics import MetricsLog
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.on_policy import is_on_policy, on_policy_batch, sample_generator
from tsa_fast.distill.protocols import Model, Optimization, TeacherSource
from tsa_fast.distill.teachers import Teachers

CHECKPOINT = "checkpoint.pt"


@dataclass
class Phase:
    """Where and how one phase runs."""

    name: str
    out_dir: Path
    training: TrainingConfig
    seed: int
    device: torch.device
    precision: torch.dtype | None = None  # autocast dtype; None: full precision
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rank: int = 0  # data-parallel rank and world size: rank r trains on slice r of each global micro-batch
    world_size: int = 1

    def autocast(self):
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)


class TorchOptimization:
    """Plain PyTorch optimization of `module` (the model and the objective's projections): AdamW (weight
    decay on matrices only), warm-up + cosine learning rate, GradScaler for fp16, global-norm clipping.
    A checkpoint is one file, `checkpoint.pt`, written atomically and read with weights_only."""

    def __init__(
        self, module: nn.Module, training: TrainingConfig, device: torch.device, precision: torch.dtype | None
    ):
        self.module, self.training = module, training
        self.optimizer = torch.optim.AdamW(
            param_groups(module.named_parameters(), training.weight_decay), lr=training.lr
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(training))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss (scaled by 1 / grad_accum)."""
        self.scaler.scale(loss / self.training.grad_accum).backward()

    def step(self) -> None:
        """Clip, step, advance the learning rate, zero the gradients: once per optimizer step."""
        if self.training.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.training.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def has_checkpoint(self, directory: Path) -> bool:
        return (directory / CHECKPOINT).exists()

    def save(self, directory: Path, client_state: dict) -> None:
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **client_state,
        }
        save_atomically(state, directory / CHECKPOINT)

    def load(self, directory: Path) -> dict:
        """Restore the checkpoint in `directory`; returns its client state. Raises ValueError for a file that
        holds anything but tensors, numbers, strings and containers (`load_weights_only`)."""
        state = load_weights_only(directory / CHECKPOINT)
        self.module.load_state_dict(state.pop("module"))
        for name in ("optimizer", "scheduler", "scaler"):
            getattr(self, name).load_state_dict(state.pop(name))
        return state


@dataclass(frozen=True)
class FitResult:
    """What `Distiller.fit` returns: the final validation (after the last step, on the whole validation
    split, with the agreement with `agreement_with` when given) and the training throughput: tokens per second
    and seconds per optimizer step (teacher targets, loss, backward and update; evaluation not counted)."""

    validation: dict[str, float]
    train_tokens_per_s: float
    train_seconds_per_step: float


class Distiller:
    """Trains `model` on `objective` over `data` (a TaskData), teachers optional (a `TeacherSource`: Teachers, a
    top-k cache). `optimization`: how (default: `TorchOptimization` of the model and the objective's parameters).
    `agreement_with`: Teachers that the final validation compares the model with (top-1 agreement, KL), whatever
    it trained on (those teachers, their top-k cache, no teacher)."""

    def __init__(
        self,
        model: Model,
        objective: DistillationObjective,
        data,
        phase: Phase,
        teachers: TeacherSource | None = None,
        optimization: Optimization | None = None,
        agreement_with: Teachers | None = None,
    ):
        if objective.has_teacher != (teachers is not None):
            raise ValueError(f"{phase.name}: the objective {'needs' if objective.has_teacher else 'takes no'} teachers")
        self.model, self.objective, self.data, self.phase, self.teachers = model, objective, data, phase, teachers
        self.agreement_with = agreement_with
        on_policy = objective.config.on_policy
        # On-policy batches (GKD) need a teacher to score the samples and a causal LM to draw them.
        self.on_policy = (
            on_policy if teachers is not None and objective.task == "lm" and on_policy.fraction > 0 else None
        )
        self.model.to(phase.device).train()
        self.objective.to(phase.device)
        self.optimization = optimization or TorchOptimization(
            nn.ModuleDict({"model": model, "objective": objective}), phase.training, phase.device, phase.precision
        )
        self.step = 0
        self.train_tokens = 0
        self.train_seconds = 0.0

    # --- checkpoints -------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Everything the run needs to continue: the optimization's state, the step, the RNG."""
        self.optimization.save(
            self.phase.out_dir,
            {
                "step": self.step,
                "done": self.step >= self.phase.training.steps,
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "train_tokens": self.train_tokens,
                "train_seconds": self.train_seconds,
            },
        )

    def load_checkpoint(self) -> None:
        state = self.optimization.load(self.phase.out_dir)
        torch.set_rng_state(state["rng"].cpu())
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.step, self.train_tokens, self.train_seconds = state["step"], state["train_tokens"], state["train_seconds"]

    # --- training ----------------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitResult:
        """Train to `training.steps` (from the last checkpoint when `resume` and one exists); returns the
        final validation metrics (`validate` after the last step) and the training throughput."""
        phase, t = self.phase, self.phase.training
        phase.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = resume and self.optimization.has_checkpoint(phase.out_dir)
        if resumed:
            self.load_checkpoint()
        main = phase.rank == 0  # only rank 0 writes metrics and shows progress
        log = (
            MetricsLog(phase.out_dir / "metrics.csv", self.step if resumed else None, phase.logging.tensorboard)
            if main
            else None
        )
        final = {}
        with _progress(phase.logging.progress and main) as progress:
            bar = progress.add_task(phase.name, total=t.steps, completed=self.step, loss=float("nan"))
            while self.step < t.steps:
                start = time.perf_counter()
                loss, terms = self.train_step()
                last = self.step == t.steps
                logged = self.step % t.log_every == 0 or last
                if logged:  # the host sync: it waits for the queued steps, so that their time counts as training
                    loss, terms = self.step_values(loss, terms)
                self.train_seconds += time.perf_counter() - start
                row = {}
                if logged:
                    row = {
                        "step": self.step,
                        "loss": loss,
                        **terms,
                        "lr": self.optimization.lr,
                        "tokens_per_s": self.train_tokens / self.train_seconds,
                    }
                    progress.update(bar, loss=loss)
                progress.update(bar, advance=1)
                if self.step % t.eval_every == 0 or last:
                    final = self.validate()
                    row = {"step": self.step, **row, **{f"val_{k}": v for k, v in final.items()}}
                if row and main:
                    log.write(row)
                if self.step % t.checkpoint_every == 0 or last:
                    self.save_checkpoint()
        if not final:  # the run was already complete
            final = self.validate()
        return FitResult(
            final, self.train_tokens / max(self.train_seconds, 1e-9), self.train_seconds / max(self.step, 1)
        )

    def validate(self) -> dict[str, float]:
        """Metrics on the validation split: during training on its first eval_batches batches; after the last
        step (the final validation) on all of it, with the agreement with `agreement_with` when given."""
        t = self.phase.training
        final = self.step >= t.steps
        return evaluate(
            self.model,
            self.data.validation,
            self.data.task,
            batch_size=t.batch_size,
            device=self.phase.device,
            teachers=self.agreement_with if final else None,
            max_batches=None if final else t.eval_batches,
            autocast=self.phase.autocast,
        )

    def train_step(self) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimizer step over `grad_accum` micro-batches; returns this rank's mean loss and terms over them,
        float64 tensors on the device (no host sync: `step_values` reads them). The micro-batches are drawn
        first (on-policy ones generated by the same weights as they would be one at a time), so that the logit
        loss of each is normalized by the counted labels of the whole step on every rank (`objective.items`;
        one all-reduce of a count under data parallelism, no host sync)."""
        t, phase = self.phase.training, self.phase
        progress = self.step / t.steps
        mask = self.data.train.get("attention_mask")
        batches = []
        for micro in range(t.grad_accum):
            global_batch = training_indices(
                num_examples(self.data.train),
                t.batch_size * phase.world_size,
                self.step * t.grad_accum + micro,
                phase.seed,
            )
            index = global_batch[phase.rank * t.batch_size : (phase.rank + 1) * t.batch_size]
            batch = take(self.data.train, index, phase.device)
            batches.append(self.maybe_on_policy(batch, self.step * t.grad_accum + micro))
            # Counted on the CPU split, so that counting syncs nothing.
            self.train_tokens += int(mask[index].sum()) if mask is not None else batch["input_ids"].numel()
        num_items = self.step_items(batches)
        total, term_sums = 0.0, {}
        for batch in batches:
            loss, terms = self.micro_step_loss(batch, progress, num_items)
            self.optimization.backward(loss)
            total = total + loss.detach().double() / t.grad_accum
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + value.double() / t.grad_accum
        self.optimization.step()
        self.step += 1
        return total, term_sums

    def step_items(self, batches: list[dict[str, Tensor]]) -> Tensor | None:
        """The rows the objective's logit loss counts over the step: `objective.items` summed over the
        micro-batches and the ranks (at least 1: a step that counts nothing has a zero loss); None where the
        objective needs no normalizer."""
        counts = [self.objective.items(batch) for batch in batches]
        if counts[0] is None:
            return None
        total = torch.stack(counts).sum()
        if self.phase.world_size > 1:
            torch.distributed.all_reduce(total)
        return total.clamp(min=1)

    def maybe_on_policy(self, batch: dict[str, Tensor], micro_batch: int) -> dict[str, Tensor]:
        """The batch, or when micro-batch `micro_batch` is drawn on-policy (`is_on_policy`: loss.on_policy.fraction
        of them, from optimizer step loss.on_policy.start_step on), the student's own continuations of its prompts
        (`on_policy_batch`). Every rank draws the same decision and generates the same number of steps."""
        phase, on_policy = self.phase, self.on_policy
        if on_policy is None or self.step < on_policy.start_step:
            return batch
        if not is_on_policy(on_policy.fraction, phase.seed, micro_batch):
            return batch
        generator = sample_generator(phase.seed, micro_batch, phase.rank, phase.device)
        with phase.autocast():
            return on_policy_batch(
                self.model, batch, self.on_policy, generator=generator, eos_id=getattr(self.data, "eos_id", None)
            )

    def step_values(self, loss: Tensor, terms: dict[str, Tensor]) -> tuple[float, dict[str, float]]:
        """A step's loss and terms (`train_step`'s) as numbers: the host sync of a logged step. Under data
        parallelism the mean over the ranks' slices, the loss of the global batch (a collective: every rank
        calls it). Raises FloatingPointError when the loss is not finite."""
        values = torch.stack([loss, *terms.values()])
        if self.phase.world_size > 1:
            torch.distributed.all_reduce(values)
            values = values / self.phase.world_size
        total, *rest = values.tolist()
        if not math.isfinite(total):
            raise FloatingPointError(f"{self.phase.name}: loss is {total} at step {self.step}")
        return total, dict(zip(terms, rest))

    def micro_step_loss(
        self, batch: dict[str, Tensor], progress: float, num_items: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on one micro-batch (its logit loss normalized by the step's `num_items` when given, see
        `train_step`), plus the adversarial term when enabled."""
        objective, adversarial = self.objective, self.phase.adversarial
        teacher = None
        if self.teachers is not None:
            with self.phase.autocast():
                teacher = self.teachers.targets(
                    batch,
                    objective.temperature(progress),
                    fused=objective.config.fused,
                    hidden_states=objective.needs_hidden_states,
                    qkv=objective.needs_qkv,
                )
        mask = batch.get("attention_mask")
        with self.phase.autocast():
            embeds = self.model.embed_tokens(batch["input_ids"])
            out = self.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                output_hidden_states=objective.needs_hidden_states,
                output_qkv=objective.needs_qkv,
            )
            share = dict(num_items=num_items, micro_batches=self.phase.training.grad_accum * self.phase.world_size)
            loss, terms = objective(self.model, out, batch, teacher, progress, **share)
            if adversarial.method == "none":
                return loss, terms

            def perturbed_loss(perturbed: Tensor) -> Tensor:
                out = self.model(inputs_embeds=perturbed, attention_mask=mask)
                return objective.output_loss(self.model, out, batch, teacher, progress)

            steps = 1 if adversarial.method == "fgm" else adversarial.steps
            delta = adversarial_delta(perturbed_loss, embeds, adversarial.epsilon, steps)
            adversarial_loss = perturbed_loss(embeds + delta)
        terms["adversarial"] = adversarial_loss.detach()
        return loss + adversarial.weight * adversarial_loss, terms


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases); tied parameters once."""
    seen, decay, no_decay = set(), [], []
    for _, p in named_params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(t: TrainingConfig):
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio of it at the last step."""

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
