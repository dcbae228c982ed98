"""Benchmarks of `cross_tokenizer_loss` and `fused_linear_cross_tokenizer_loss`: one loss + backward between two
tokenizations against the same-tokenizer loss of the same sizes.

    pytest benchmarks/bench_cross_tokenizer_loss.py --benchmark-json=results.json
    python -m benchmarks.report results.json

Compared (default backend, forward + backward, temperature 2):
  cross_tokenizer        tsa_fast.cross_tokenizer_loss: N_s x V student rows against N_t x V teacher rows aligned
                         by `make_alignment` (most tokens shared, some merged on either side), the map over
                         80% of the vocabulary, ULD over the top 64
  distillation           tsa_fast.distillation_loss of N x V logits (same tokenizer)
  fused_cross_tokenizer  tsa_fast.fused_linear_cross_tokenizer_loss from hidden states (N x H) and heads (V x H)
  fused_distillation     tsa_fast.fused_linear_distillation_loss of the same sizes, teacher as hidden + weight
Each cross-tokenizer variant checks its loss against the float64 reference's at the smallest size.
CPU: N = 1024 and 4096, V = 32000, fp32 (fused: H = 256); GPU: N = 2048 and 8192, V = 128256, bf16 (fused:
H = 4096). Target on the CPU: at most 1.5x the time of the same-tokenizer loss, peak memory of the same order.
Peak extra memory is measured: on a GPU by the allocator, on the CPU as the RSS growth of a fresh process
(`python -m benchmarks.bench_cross_tokenizer_loss IMPL ROWS VOCAB DTYPE`).
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch

import tsa_fast
from benchmarks.common import (
    DEVICE,
    SMOKE,
    check_loss,
    cpu_peak_extra_bytes_of,
    describe,
    dtype_name,
    measure,
    record_peak_memory,
    synchronize,
)
from tsa_fast import TokenAlignment
from tsa_fast.reference.cross_tokenizer_loss import cross_tokenizer_loss as reference_loss

MODULE = "benchmarks.bench_cross_tokenizer_loss"
if SMOKE:
    SIZES, VOCAB, HIDDEN, DTYPE = [32, 64], 1000, 32, torch.float32
elif DEVICE.type == "cuda":
    SIZES, VOCAB, HIDDEN, DTYPE = [2048, 8192], 128256, 4096, torch.bfloat16
else:
    SIZES, VOCAB, HIDDEN, DTYPE = [1024, 4096], 32000, 256, torch.float32
TEMPERATURE, TOP_K, MAPPED = 2.0, 64, 0.8
IMPLS = ["cross_tokenizer", "distillation", "fused_cross_tokenizer", "fused_distillation"]


def token_ends(n_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """End offsets of n_tokens tokens of 1-4 bytes."""
    return torch.randint(1, 5, (n_tokens,), generator=generator).cumsum(0)


def make_alignment(rows: int, generator: torch.Generator) -> tuple[TokenAlignment, int]:
    """An alignment of `rows` student rows with a teacher tokenization of the same text that merges 10% of
    the student's adjacent token pairs and splits 10% of its tokens in two; returns it and the teacher's rows."""
    student = token_ends(rows, generator)
    starts = torch.cat([student.new_zeros(1), student[:-1]])
    keep = torch.rand(rows, generator=generator) >= 0.1  # a dropped boundary merges two tokens
    keep[-1] = True
    splits = starts + (student - starts) // 2
    split = (torch.rand(rows, generator=generator) < 0.1) & (splits > starts)
    teacher = torch.cat([student[keep], splits[split]]).unique()  # sorted
    n_t = teacher.shape[0]
    shared = torch.isin(student, teacher)

    def side(ends: torch.Tensor, is_shared: torch.Tensor):
        group = torch.cumsum(is_shared.long(), 0) - is_shared.long()  # the group each token belongs to
        last_rows = is_shared.nonzero().squeeze(1)
        prefix = torch.where(is_shared, -1, group)
        prefix[group >= last_rows.shape[0]] = -1  # tokens after the last shared boundary: no group
        return last_rows, prefix

    student_rows, student_prefix = side(student, shared)
    teacher_rows, teacher_prefix = side(teacher, torch.isin(teacher, student))
    tokens = lambda n: torch.randint(0, VOCAB, (n,), generator=generator)  # noqa: E731
    fields = (student_rows, teacher_rows, student_prefix, teacher_prefix, tokens(rows), tokens(n_t))
    return TokenAlignment(*(field.to(DEVICE) for field in fields)), n_t


@functools.cache
def make_problem(rows: int):
    """(alignment, vocab_map, n_t): the same for every implementation of one size."""
    generator = torch.Generator().manual_seed(0)
    alignment, n_t = make_alignment(rows, generator)
    mapped = int(MAPPED * VOCAB)
    vocab_map = torch.stack([torch.randperm(VOCAB, generator=generator)[:mapped] for _ in range(2)], 1)
    return alignment, vocab_map.to(DEVICE), n_t


def make_inputs(impl: str, rows: int, dtype: torch.dtype):
    """The tensors of one implementation: logits (N, V), or hidden states (N, H) and heads (V, H); the student's
    first tensor (and head) require grad."""
    _, _, n_t = make_problem(rows)
    teacher_rows = n_t if impl.endswith("cross_tokenizer") else rows
    generator = torch.Generator(DEVICE).manual_seed(1)
    randn = lambda *shape, scale=1.0: (  # noqa: E731
        torch.randn(*shape, device=DEVICE, generator=generator).mul_(scale).to(dtype)
    )
    if impl.startswith("fused"):
        head = 3.0 / HIDDEN**0.5
        tensors = [randn(rows, HIDDEN), randn(VOCAB, HIDDEN, scale=head), randn(teacher_rows, HIDDEN)]
        tensors.append(randn(VOCAB, HIDDEN, scale=head))
        tensors[1].requires_grad_()
    else:
        tensors = [randn(rows, VOCAB, scale=3.0), randn(teacher_rows, VOCAB, scale=3.0)]
    tensors[0].requires_grad_()
    return tensors


def loss_fn(impl: str, rows: int):
    alignment, vocab_map, _ = make_problem(rows)
    options = dict(temperature=TEMPERATURE, uld_top_k=TOP_K)
    if impl == "cross_tokenizer":
        return lambda s, t: tsa_fast.cross_tokenizer_loss(s, t, alignment, vocab_map, **options)
    if impl == "distillation":
        return lambda s, t: tsa_fast.distillation_loss(s, t, temperature=TEMPERATURE)
    if impl == "fused_cross_tokenizer":
        return lambda h, w, th, tw: tsa_fast.fused_linear_cross_tokenizer_loss(
            h, w, th, tw, alignment=alignment, vocab_map=vocab_map, **options
        )
    return lambda h, w, th, tw: tsa_fast.fused_linear_distillation_loss(h, w, th, tw, temperature=TEMPERATURE)


def step(fn, *tensors):
    """One forward + backward, the gradients handed over as optimizer.zero_grad() leaves them."""
    for tensor in tensors:
        tensor.grad = None
    loss = fn(*tensors)
    loss.backward()
    synchronize()
    return loss


def expected_loss(impl: str, rows: int, tensors) -> torch.Tensor:
    """The float64 reference of a cross-tokenizer variant (on logits computed from the heads for the fused one)."""
    alignment, vocab_map, _ = make_problem(rows)
    with torch.no_grad():
        if impl == "fused_cross_tokenizer":
            h, w, th, tw = (x.double() for x in tensors)
            logits = (h @ w.T, th @ tw.T)
        else:
            logits = tuple(x.double() for x in tensors)
        return reference_loss(*logits, alignment, vocab_map, temperature=TEMPERATURE, uld_top_k=TOP_K)


@pytest.mark.parametrize("rows", SIZES, ids=[f"N{n}" for n in SIZES])
@pytest.mark.parametrize("impl", IMPLS)
def test_cross_tokenizer_loss(benchmark, impl, rows):
    fn = loss_fn(impl, rows)
    tensors = make_inputs(impl, rows, DTYPE)
    loss = step(fn, *tensors)  # warm-up
    fused = impl.startswith("fused")
    size = {"N": rows}
    describe(
        benchmark,
        op="cross_tokenizer_loss",
        mode="fwd+bwd",
        impl=impl,
        dtype=DTYPE,
        size=size,
        x="N",
        V=VOCAB,
        **({"H": HIDDEN} if fused else {}),
    )
    if impl.endswith("cross_tokenizer") and rows == SIZES[0]:
        check_loss(impl, loss, expected_loss(impl, rows, tensors), DTYPE, benchmark)
    measure(benchmark, step, fn, *tensors)
    record_peak_memory(benchmark, lambda: step(fn, *tensors), MODULE, impl, str(rows), str(VOCAB), dtype_name(DTYPE))


def measure_cpu_peak(impl: str, rows: str, vocab: str, dtype: str) -> int:
    """Peak RSS growth of one step in this (fresh) process beyond the inputs (the new .grad buffers included)."""
    assert int(vocab) == VOCAB, f"this process's vocabulary is {VOCAB}"
    tensors = make_inputs(impl, int(rows), getattr(torch, dtype))
    fn = loss_fn(impl, int(rows))
    step(fn, *tensors)  # warm-up
    for tensor in tensors:
        tensor.grad = None
    return cpu_peak_extra_bytes_of(lambda: step(fn, *tensors))


if __name__ == "__main__":
    print(measure_cpu_peak(*sys.argv[1:]))
