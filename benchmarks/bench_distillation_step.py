"""Benchmarks of one whole distillation step of a causal LM: teacher forward, student forward, loss, backward,
gradient clipping and the AdamW step, as the engine runs it against the pipeline KD toolkits write.

    pytest benchmarks/bench_distillation_step.py --benchmark-json=results.json
    python -m benchmarks.report results.json

One problem: a frozen teacher and a smaller student (tsa_fast.models.Transformer, same vocabulary, rotary,
tied LM head), B sequences of N random tokens, loss = T^2 KL(P_t || P_s) + 0.5 CE(labels) at T = 2, mean over
tokens, global-norm clipping to 1. Every implementation runs the same models (copies of one initialization,
the same attention) on the same batch; they differ in the loss path only:
  fused               tsa_fast.distill.Distiller.train_step with LossConfig(fused=True): the teacher gives
                      its hidden states and LM-head weight, fused_linear_distillation_loss never materializes
                      the N x V logits of either model
  materialized        the same engine step with LossConfig(fused=False): logits of both models, then
                      tsa_fast.distillation_loss
  kldivloss           the loop KD toolkits write (torchdistill, most tutorials): logits of both models,
                      F.kl_div(F.log_softmax(s / T), F.softmax(t / T), reduction="batchmean") * T**2
                      + 0.5 * F.cross_entropy(s, labels), backward, clip, AdamW
  kldivloss_compiled  the same with that loss function under torch.compile (the models stay eager: compiling
                      the teacher and the student would not fit gpu.sh's time budget)
Each checks the loss of its first step (the shared initial weights) against the reference's
(tsa_fast.reference.distillation_loss on the fp32 logits, no autocast) with `common.check_loss`. The gain of
the teacher's final LayerNorm is raised 8x so that its predictions are peaked, as a trained teacher's are: the
KL term then weighs in that check about as much as the cross-entropy does.
Sizes (student and teacher as d_model x layers in the group's name):
CPU: B*N = 4 x 512 tokens, V=32000, student d=256 x 2 layers, teacher d=512 x 4 layers, fp32.
GPU: B*N = 8 x 1024 tokens, V=128256 (Llama 3), student d=1024 x 4 layers, teacher d=2048 x 8 layers, fp32
weights under bf16 autocast (as the engine runs on a GPU).
Smoke: B*N = 4 x 128 tokens, V=8192, student d=128 x 2, teacher d=256 x 2.
Roofline: the model FLOPs of the step (no recomputation counted) over the measured bf16 / fp32 matrix-product
rate: the teacher's forward plus three times the student's (forward, and backward for activations and
weights), each 2 x tokens x (matrix parameters + V d) plus causal attention, 2 x tokens x N x d per layer.
Peak extra memory: CUDA allocator peak of one step (its new .grad buffers included), or the RSS growth of
a fresh process on the CPU (`python -m benchmarks.bench_distillation_step IMPL`).
"""

from __future__ import annotations

import copy
import functools
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import DEVICE, SMOKE, benchmark_step, compiled, step_peak_extra_bytes, synchronize
from tsa_fast.distill.config import LoggingConfig, LossConfig, TrainingConfig
from tsa_fast.distill.distiller import Distiller, Phase
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.teachers import Teachers
from tsa_fast.models import Transformer, TransformerConfig
from tsa_fast.reference.distillation_loss import distillation_loss as reference_loss

MODULE = "benchmarks.bench_distillation_step"
if SMOKE:
    BATCH, SEQ, VOCAB, PRECISION = 4, 128, 8192, None
    STUDENT, TEACHER = dict(d_model=128, n_layers=2, n_heads=4), dict(d_model=256, n_layers=2, n_heads=4)
elif DEVICE.type == "cuda":
    BATCH, SEQ, VOCAB, PRECISION = 8, 1024, 128256, torch.bfloat16
    STUDENT, TEACHER = dict(d_model=1024, n_layers=4, n_heads=16), dict(d_model=2048, n_layers=8, n_heads=16)
else:
    BATCH, SEQ, VOCAB, PRECISION = 4, 512, 32000, None
    STUDENT, TEACHER = dict(d_model=256, n_layers=2, n_heads=4), dict(d_model=512, n_layers=4, n_heads=8)
DTYPE = PRECISION or torch.float32  # the compute dtype: bf16 autocast on a GPU, fp32 on the CPU
TEMPERATURE, HARD_WEIGHT, CLIP, LR, WEIGHT_DECAY = 2.0, 0.5, 1.0, 1e-4, 0.01
TEACHER_LOGIT_SCALE = 8.0  # peaked teacher predictions (see the module docstring)
IMPLS = ["fused", "materialized", "kldivloss", "kldivloss_compiled"]  # tsa_fast's first (gpu.sh's timeout)


def config(shape: dict) -> TransformerConfig:
    return TransformerConfig(vocab_size=VOCAB, max_seq_len=SEQ, causal=True, **shape)


def shape_name(shape: dict) -> str:
    """d_model x layers, as the group's name gives each model."""
    return f"{shape['d_model']}x{shape['n_layers']}"


@functools.cache
def initial_models() -> tuple[Transformer, Transformer]:
    """(student, teacher) at their initial weights, built once on DEVICE; each benchmark trains a copy of
    the student, the teacher stays frozen."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        student, teacher = Transformer(config(STUDENT)), Transformer(config(TEACHER))
    with torch.no_grad():
        teacher.final_norm.weight.mul_(TEACHER_LOGIT_SCALE)
    return student, teacher.eval().requires_grad_(False)


@functools.cache
def batch() -> dict[str, torch.Tensor]:
    """B random sequences of N tokens and their next tokens, on DEVICE."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device=DEVICE, generator=generator)
    return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}


def autocast():
    return torch.autocast(DEVICE.type, dtype=PRECISION, enabled=PRECISION is not None)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hinton's KD loss plus the hard-label term, as KD toolkits write it, on (tokens, V) logits."""
    T = TEMPERATURE
    soft = (
        F.kl_div(
            F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1), reduction="batchmean"
        )
        * T**2
    )
    return soft + HARD_WEIGHT * F.cross_entropy(student_logits, labels)


class EngineStep:
    """`Distiller.train_step` on a batch (all B examples each step; the engine permutes their order): `batch()`
    and the teacher as a `Teachers` source, or `train` and what `source(teachers)` makes of it."""

    def __init__(self, loss: LossConfig, train: dict | None = None, source=None):
        template, teacher = initial_models()
        self.student = copy.deepcopy(template)
        objective = DistillationObjective(loss, "lm", self.student.config, teacher.config)
        training = TrainingConfig(
            steps=10**9, batch_size=BATCH, lr=LR, warmup_steps=0, weight_decay=WEIGHT_DECAY, clip_grad=CLIP
        )
        phase = Phase(
            name="distill",
            out_dir=Path(tempfile.gettempdir()),
            training=training,
            seed=0,
            device=DEVICE,
            precision=PRECISION,
            logging=LoggingConfig(tensorboard=False, progress=False),
        )
        data = SimpleNamespace(task="lm", train=batch() if train is None else train)
        teachers = Teachers([teacher], [1.0], "lm")
        self.distiller = Distiller(
            self.student, objective, data, phase, teachers if source is None else source(teachers)
        )

    def __call__(self) -> float:
        loss, _ = self.distiller.train_step()  # its loss.item() waits for the GPU
        synchronize()
        return loss

    def clear_grads(self) -> None:
        self.distiller.optimization.optimizer.zero_grad(set_to_none=True)


class PlainStep:
    """The KD toolkits' loop: both models' logits, `kd_loss` (compiled or not), backward, clip, AdamW."""

    def __init__(self, compile_loss: bool):
        template, self.teacher = initial_models()
        self.student = copy.deepcopy(template).train()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.loss = compiled(kd_loss) if compile_loss else kd_loss

    def __call__(self) -> float:
        data = batch()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast():
            with torch.no_grad():
                teacher_logits = self.teacher.logits(self.teacher(data["input_ids"]).hidden)
            student_logits = self.student.logits(self.student(data["input_ids"]).hidden)
            loss = self.loss(student_logits.flatten(0, 1), teacher_logits.flatten(0, 1), data["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), CLIP)
        self.optimizer.step()
        return loss.item()

    def clear_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def make_step(impl: str):
    if impl in ("fused", "materialized"):
        return EngineStep(LossConfig(fused=impl == "fused", temperature=TEMPERATURE, hard_weight=HARD_WEIGHT))
    return PlainStep(compile_loss=impl == "kldivloss_compiled")


def initial_logits(teacher_input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) fp32 logits (tokens, V) at the initial weights, without autocast: the student's on the
    batch's input_ids, the teacher's on `teacher_input_ids`."""
    student, teacher = initial_models()
    with torch.no_grad():
        student_logits = student.logits(student(batch()["input_ids"]).hidden).flatten(0, 1).float()
        teacher_logits = teacher.logits(teacher(teacher_input_ids).hidden).flatten(0, 1).float()
    return student_logits, teacher_logits


@functools.cache
def reference_value() -> torch.Tensor:
    """The loss at the initial weights: the reference on fp32 logits, without autocast."""
    data = batch()
    return reference_loss(
        *initial_logits(data["input_ids"]), data["labels"].flatten(), temperature=TEMPERATURE, hard_weight=HARD_WEIGHT
    )


def forward_flops(model: TransformerConfig, tokens: int) -> int:
    """Matrix products of one forward: the blocks' and the LM head's, plus causal attention."""
    d, layers = model.d_model, model.n_layers
    matrices = layers * (4 * d * d + 2 * d * model.ffn_dim) + model.vocab_size * d
    return 2 * tokens * matrices + 2 * tokens * SEQ * d * layers


def step_flops() -> int:
    tokens = BATCH * SEQ
    return forward_flops(config(TEACHER), tokens) + 3 * forward_flops(config(STUDENT), tokens)


def step_problem(op: str) -> dict:
    """`benchmark_step`'s op, size and parameters of a step on these models and this batch."""
    sizes = dict(size={"tokens": BATCH * SEQ}, x="tokens", N=SEQ, V=VOCAB)
    return dict(op=op, **sizes, student=shape_name(STUDENT), teacher=shape_name(TEACHER))


@pytest.mark.parametrize("impl", IMPLS)
def test_distillation_step(benchmark, impl):
    problem = step_problem("distillation_step")
    benchmark_step(
        benchmark,
        make_step(impl),
        reference_value,
        impl=impl,
        dtype=DTYPE,
        flops=step_flops(),
        module=MODULE,
        **problem,
    )


if __name__ == "__main__":
    print(step_peak_extra_bytes(make_step(*sys.argv[1:])))
