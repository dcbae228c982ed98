"""Benchmarks of one training step of a BERT-style encoder (the shape of all-MiniLM-L6-v2, configs/qa.yaml's
teacher): forward, a loss on the last hidden states, backward and the AdamW step, in training mode.

    pytest benchmarks/bench_hf_encoder_step.py --benchmark-json=results.json
    python -m benchmarks.report results.json

One problem: a randomly initialized transformers BertModel (hidden 384, 6 blocks, 12 heads, FFN 1536, vocabulary
30,522; the time does not depend on the weights), B windows of N tokens whose last quarter is padding, as QA
windows are. Implementations, each with hidden dropout 0.1 (BERT's):
  sdpa_dropout        the peer: the model as transformers loads it, attention "sdpa" with its attention dropout 0.1
                      (PyTorch has no fused CPU kernel with dropout: it falls back to the math path)
  sdpa                the same with attention dropout 0 (the QA recipe's `attention_dropout: 0`)
  tsa_fast            the same through tsa_fast.integrations.hf.HFModel (attention "tsa_fast"), attention dropout 0
in fp32 and under bf16 autocast (the QA recipe's `precision: bf16`; on a CPU with AMX or AVX512-BF16 its matrix
products run in bf16). extra_info["tokens_per_s"] = B x N / the median time.
Sizes: B x N = 32 x 192 (the QA recipe's batch and window); smoke: 2 x 32, hidden 64, 2 blocks.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from benchmarks.common import DEVICE, SMOKE, describe, measure, synchronize

BATCH, SEQ = (2, 32) if SMOKE else (32, 192)
SHAPE = (
    dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    if SMOKE
    else dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
)
VOCAB, HIDDEN_DROPOUT, ATTENTION_DROPOUT, LR = 30522, 0.1, 0.1, 1e-4
IMPLS = ["tsa_fast", "sdpa", "sdpa_dropout"]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@functools.cache
def initial_state() -> dict[str, torch.Tensor]:
    """The weights every implementation starts from (one initialization)."""
    return build("sdpa_dropout").state_dict()


def build(impl: str) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    if impl == "tsa_fast":
        pytest.importorskip("tsa_fast.integrations.hf")  # registers the attention
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_dropout_prob=HIDDEN_DROPOUT,
        attention_probs_dropout_prob=ATTENTION_DROPOUT if impl == "sdpa_dropout" else 0.0,
        **SHAPE,
    )
    torch.manual_seed(0)
    model = transformers.BertModel._from_config(config, attn_implementation="sdpa")
    if impl != "sdpa_dropout":
        model.load_state_dict(initial_state())
    if impl == "tsa_fast":
        from tsa_fast.integrations.hf import HFModel

        model = HFModel(model)
    return model.to(DEVICE).train()


@functools.cache
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask): B windows of N random tokens, the last quarter of each padding."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    ids = torch.randint(1000, VOCAB, (BATCH, SEQ), device=DEVICE, generator=generator)
    mask = torch.ones_like(ids)
    mask[:, SEQ - SEQ // 4 :] = 0
    return ids, mask


def make_step(impl: str, dtype: torch.dtype | None):
    """One training step of `impl`: forward under autocast(dtype), mean square of the last hidden states,
    backward, AdamW; returns the loss."""
    model = build(impl)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    ids, mask = batch()
    autocast = torch.autocast(DEVICE.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def step() -> torch.Tensor:
        with autocast:
            if impl == "tsa_fast":
                hidden = model(ids, mask).hidden
            else:
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = hidden.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        return loss.detach()

    return step


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_hf_encoder_step(benchmark, impl, precision):
    step = make_step(impl, PRECISIONS[precision])
    assert torch.isfinite(step())  # also a warm-up
    describe(
        benchmark,
        op="hf_encoder_step",
        mode="train",
        impl=impl,
        dtype=PRECISIONS[precision] or torch.float32,
        size={"N": SEQ},
        x="N",
        B=BATCH,
        d=SHAPE["hidden_size"],
        blocks=SHAPE["num_hidden_layers"],
    )
    measure(benchmark, step)
    if not benchmark.disabled:
        benchmark.extra_info["tokens_per_s"] = BATCH * SEQ / benchmark.stats.stats.median
