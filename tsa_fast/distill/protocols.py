"""The four seams of the engine, as `typing.Protocol`s: what the engine calls on the model it trains, on the
optimization of a student, on the source of teacher targets, and on the runtime a recipe runs in.

- `Model`: `tsa_fast.models.Transformer`, `tsa_fast.integrations.hf.HFModel`;
- `Optimization`: `distill.distiller.TorchOptimization`, `integrations.deepspeed.DeepSpeedOptimization`;
- `TeacherSource`: `distill.teachers.Teachers`, `distill.teacher_cache.TopkTeacherCache`,
  `distill.teachers.EncoderTeacher` (the sentence-embedding and QA recipes' teachers);
- `Runtime`: `recipes.runtime.LocalRuntime`, `integrations.deepspeed.DeepSpeedRuntime`.

All are `runtime_checkable`; `isinstance` checks that the names exist, not their signatures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from torch import Tensor, nn

from tsa_fast.models import TransformerOutput

if TYPE_CHECKING:
    from tsa_fast.distill.config import TrainingConfig
    from tsa_fast.distill.teachers import TeacherTargets


@runtime_checkable
class ModelShape(Protocol):
    """What the engine reads of a model's config: the layer maps and the hidden-state projection of
    `DistillationObjective` (`TransformerConfig`, `integrations.hf.ModelShape`)."""

    n_layers: int
    d_model: int
    n_heads: int


@runtime_checkable
class Model(Protocol):
    """A teacher or a student: an `nn.Module` (the engine moves, freezes and optimizes it as one) with these.

    `forward` takes `input_ids` (B, N) or `inputs_embeds` (B, N, d_model), exactly one, and an optional
    attention_mask (B, N), True = real token; it returns a `TransformerOutput` (hidden (B, N, d_model); the
    hidden states and per-block (q, k, v) when asked). The heads apply to `hidden`: `logits` (LM) and
    `classify` (classification: (B, num_classes)); `lm_head_weight` (vocab_size, d_model) is what the fused
    loss multiplies by; `generate` continues prompts (causal LMs: on-policy batches, sequence-level KD,
    sampled evaluation).
    """

    config: ModelShape
    training: bool
    # generate(prompt_ids (B, N) int64, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, eos_id=None,
    # attention_mask=None, generator=None, ...) -> (B, N + T) int64, without gradient, greedy at temperature 0:
    # `tsa_fast.models.Transformer.generate`, `tsa_fast.integrations.hf.HFModel.generate` (each with options of
    # its own after these, so the member is an attribute, not one signature).
    generate: Callable[..., Tensor]

    def embed_tokens(self, input_ids: Tensor) -> Tensor: ...

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        output_hidden_states: bool = False,
        output_qkv: bool = False,
    ) -> TransformerOutput: ...

    @property
    def lm_head_weight(self) -> Tensor: ...

    def logits(self, hidden: Tensor) -> Tensor: ...

    def classify(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class Optimization(Protocol):
    """How a student phase is optimized. Per optimizer step the `Distiller` calls `backward` once per
    micro-batch (training.grad_accum times), then `step` once; checkpoints live in the phase's directory."""

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss (scaled by 1 / grad_accum)."""
        ...

    def step(self) -> None:
        """The optimizer step over the accumulated gradients: clip, update, advance the learning rate, zero
        the gradients."""
        ...

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        ...

    def has_checkpoint(self, directory: Path) -> bool: ...

    def save(self, directory: Path, client_state: dict) -> None:
        """Save the optimization's state and `client_state` (tensors, numbers, strings, containers of them) to
        `directory`."""
        ...

    def load(self, directory: Path) -> dict:
        """Restore the state saved in `directory`; returns its client state."""
        ...


@runtime_checkable
class TeacherSource(Protocol):
    """Where a student's teacher targets come from, batch by batch: live teachers, a cache of their outputs."""

    def targets(
        self,
        batch: dict[str, Tensor],
        temperature: float = 1.0,
        *,
        fused: bool = False,
        hidden_states: bool = False,
        qkv: bool = False,
    ) -> TeacherTargets:
        """The teacher side of the loss on `batch` (input_ids, attention_mask when padded, index): logits at
        `temperature` (mixtures need it), the last hidden state and LM-head weight instead of logits when
        `fused`, and the hidden states / q, k, v when asked. Raises ValueError for what the source cannot give."""
        ...


@runtime_checkable
class Runtime(Protocol):
    """Where a recipe's models live and how its students are optimized. Rank 0 of `world_size` processes writes
    the files; `main_first` (given here, in terms of `rank` and `barrier`) runs a block on rank 0 before the
    others."""

    rank: int
    world_size: int

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        ...

    def close(self) -> None:
        """Release what the runtime holds (teachers, process groups); the last call on it."""
        ...

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block before the other ranks do (it writes the files that they then read)."""
        if self.rank != 0:
            self.barrier()
        yield
        if self.rank == 0:
            self.barrier()

    def teacher(self, build: Callable[[], nn.Module], checkpoint: Path) -> nn.Module:
        """The teacher `build()` returns, with the weights of `checkpoint` (a torch file {"config", "model": state
        dict}, loaded with weights_only), placed where this runtime keeps teachers."""
        ...

    def optimization(self, model: nn.Module, objective: nn.Module, training: TrainingConfig) -> Optimization | None:
        """How a student phase is optimized; None: the Distiller's default (`TorchOptimization`)."""
        ...
