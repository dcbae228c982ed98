"""Benchmarks of one cross-tokenizer distillation step of a causal LM against a same-tokenizer step of the same
sizes: teacher forward, student forward, loss, backward, clipping and AdamW, as the engine runs them.

    pytest benchmarks/bench_cross_tokenizer_step.py --benchmark-json=results.json
    python -m benchmarks.report results.json

The models, batch and sizes are bench_distillation_step's (B sequences of N tokens, both vocabularies V); the
teacher is taken to have a tokenizer of its own: its input is another N random tokens over the same text, whose
tokens end where the student's do with probability 0.7 and otherwise at a byte of their own (token lengths 1 to
4 bytes), so that about 40% of the groups merge several tokens on one side; the vocabulary map pairs the first
V / 2 ids of each side. The alignment is computed once per example before timing (`token_groups`, as the data
pipeline does); the step itself only assembles the batch's `TokenAlignment`.
  same_tokenizer                bench_distillation_step's `fused` engine step (fused_linear_distillation_loss)
  cross_tokenizer               Distiller.train_step with OwnTokenizerTeachers and LossConfig(fused=True):
                                fused_linear_cross_tokenizer_loss (exact forward KL + ULD top-64 + 0.5 CE, T = 2)
  cross_tokenizer_materialized  the same with fused=False: both models' logits, then cross_tokenizer_loss
Each cross-tokenizer step checks its first loss against tsa_fast.reference.cross_tokenizer_loss on the fp32
logits. Target (issue 22): cross_tokenizer within 1.5x the time of same_tokenizer, peak memory of the same order.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch

from benchmarks.bench_distillation_step import (
    BATCH,
    DTYPE,
    HARD_WEIGHT,
    SEQ,
    TEMPERATURE,
    VOCAB,
    EngineStep,
    batch,
    initial_logits,
    step_flops,
    step_problem,
)
from benchmarks.bench_distillation_step import make_step as distillation_step
from benchmarks.common import DEVICE, benchmark_step, step_peak_extra_bytes
from tsa_fast.cross_tokenizer import alignment_from_groups, token_groups
from tsa_fast.distill.config import LossConfig
from tsa_fast.distill.teachers import OwnTokenizerTeachers
from tsa_fast.reference.cross_tokenizer_loss import cross_tokenizer_loss as reference_loss

MODULE = "benchmarks.bench_cross_tokenizer_step"
IMPLS = ["same_tokenizer", "cross_tokenizer", "cross_tokenizer_materialized"]
SHARED_BOUNDARY = 0.7  # probability that a teacher token ends where a student token does
ULD_TOP_K = 64


@functools.cache
def cross_batch() -> dict[str, torch.Tensor]:
    """bench_distillation_step's batch plus the teacher's tokens of the same (random) text and each label's group."""
    rng = np.random.default_rng(0)
    student_group, teacher_group = [], []
    for _ in range(BATCH):
        student_ends = np.cumsum(rng.integers(1, 5, SEQ))
        kept = student_ends[rng.random(SEQ) < SHARED_BOUNDARY]
        own = rng.integers(1, student_ends[-1], SEQ - len(kept))
        teacher_ends = np.unique(np.concatenate([kept, own, student_ends[-1:]]))[:SEQ]
        groups = token_groups(student_ends, teacher_ends)
        student_group.append(groups[0])
        teacher_group.append(np.pad(groups[1], (0, SEQ - len(teacher_ends)), constant_values=-1))
    generator = torch.Generator(DEVICE).manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device=DEVICE, generator=generator)
    return {
        **batch(),
        "teacher_input_ids": ids[:, :-1].contiguous(),
        "teacher_labels": ids[:, 1:].contiguous(),
        "student_group": torch.from_numpy(np.stack(student_group)).to(DEVICE),
        "teacher_group": torch.from_numpy(np.stack(teacher_group)).to(DEVICE),
    }


def vocab_map() -> torch.Tensor:
    shared = torch.arange(VOCAB // 2, device=DEVICE)
    return torch.stack([shared, shared], dim=1)


def loss_config(fused: bool) -> LossConfig:
    return LossConfig(
        fused=fused,
        temperature=TEMPERATURE,
        hard_weight=HARD_WEIGHT,
        cross_tokenizer={"uld_top_k": ULD_TOP_K},
    )


def make_step(impl: str) -> EngineStep:
    """same_tokenizer: bench_distillation_step's fused step; the others: `Distiller.train_step` with a teacher of
    its own tokenizer (`OwnTokenizerTeachers`) on `cross_batch`."""
    if impl == "same_tokenizer":
        return distillation_step("fused")
    source = functools.partial(OwnTokenizerTeachers, vocab_map=vocab_map())
    return EngineStep(loss_config(fused=impl == "cross_tokenizer"), cross_batch(), source)


@functools.cache
def reference_value() -> torch.Tensor:
    """The cross-tokenizer loss at the initial weights: the reference on fp32 logits, without autocast."""
    data = cross_batch()
    alignment = alignment_from_groups(
        data["student_group"], data["teacher_group"], data["labels"], data["teacher_labels"]
    )
    return reference_loss(
        *initial_logits(data["teacher_input_ids"]),
        alignment,
        vocab_map(),
        data["labels"].flatten(),
        temperature=TEMPERATURE,
        uld_top_k=ULD_TOP_K,
        hard_weight=HARD_WEIGHT,
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_tokenizer_step(benchmark, impl):
    expected = None if impl == "same_tokenizer" else reference_value  # bench_distillation_step checks that one
    step, problem = make_step(impl), step_problem("cross_tokenizer_step")
    benchmark_step(benchmark, step, expected, impl=impl, dtype=DTYPE, flops=step_flops(), module=MODULE, **problem)


if __name__ == "__main__":
    print(step_peak_extra_bytes(make_step(*sys.argv[1:])))
