"""Benchmarks of generation: greedy decoding of a batch of prompts, generated tokens per second.

    pytest benchmarks/bench_generate.py --benchmark-json=results.json
    python -m benchmarks.report results.json

One problem per model: the main job's student and teacher (configs/stdlib_lm.yaml: d_model=128, 4 heads,
rotary, V=8192; 2 blocks the student, 4 the teacher), randomly initialized, B prompts of N random tokens,
T new tokens each, greedy, no EOS (every implementation generates B x T tokens). Implementations:
  kv_cache                    tsa_fast.models.Transformer.generate: one forward of the prompts, then one token
                              per step against the preallocated KV cache
  reference                   the same with use_cache=False: the whole sequence recomputed at every step
  sdpa_llama_generate         the peer: transformers' LlamaForCausalLM of the same shape (hidden 128, the same
                              heads, blocks and vocabulary, tied embeddings; intermediate_size 2/3 of the FFN
                              size, so that its SwiGLU has the FFN's parameter count) through its own
                              `generate` (DynamicCache), attention "sdpa" (transformers' default)
  hf_generate_tsa_fast        the same Llama through tsa_fast.integrations.hf.HFModel.generate: transformers'
                              generate on attention "tsa_fast"
The tokens of kv_cache must equal those of the reference, and the two Llama runs must agree, checked on the
warm-up call. extra_info["tokens_per_s"] = B x T / the median time; the report's speed-ups are ratios of
tokens/s (tsa_fast's vs the peer's: the peer's time over tsa_fast's).
Sizes: B = 8, N = 32, T = 128 (max_seq_len N + T); smoke: B = 2, N = 8, T = 8. fp32, on DEVICE.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.common import DEVICE, SMOKE, describe, measure, synchronize
from tsa_fast.models import Transformer, TransformerConfig

BATCH, PROMPT, NEW = (2, 8, 8) if SMOKE else (8, 32, 128)
VOCAB, D_MODEL, HEADS = 8192, 128, 4
MODELS = {"student": 2, "teacher": 4}  # blocks, as configs/stdlib_lm.yaml
IMPLS = ["kv_cache", "reference", "sdpa_llama_generate", "hf_generate_tsa_fast"]


def native_config(blocks: int) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=VOCAB, max_seq_len=PROMPT + NEW, d_model=D_MODEL, n_layers=blocks, n_heads=HEADS, causal=True
    )


@functools.cache
def native_model(blocks: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(native_config(blocks)).to(DEVICE).eval()


@functools.cache
def llama(blocks: int, attention: str):
    """The peer's Llama of the native model's shape, on `attention` ("sdpa" or "tsa_fast"), one
    initialization for both."""
    transformers = pytest.importorskip("transformers")
    if attention == "tsa_fast":
        pytest.importorskip("tsa_fast.integrations.hf")  # registers the attention
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D_MODEL,
        num_hidden_layers=blocks,
        num_attention_heads=HEADS,
        intermediate_size=2 * native_config(blocks).ffn_dim // 3,
        max_position_embeddings=PROMPT + NEW,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=attention)
    if attention != "sdpa":
        model.load_state_dict(llama(blocks, "sdpa").state_dict())
    return model.to(DEVICE).eval()


@functools.cache
def prompts() -> torch.Tensor:
    generator = torch.Generator(DEVICE).manual_seed(0)
    return torch.randint(0, VOCAB, (BATCH, PROMPT), device=DEVICE, generator=generator)


def make_step(impl: str, blocks: int):
    """A function generating NEW tokens per prompt with `impl`, returning the (BATCH, PROMPT + NEW) ids."""
    ids = prompts()
    if impl in ("kv_cache", "reference"):
        model = native_model(blocks)
        return lambda: model.generate(ids, NEW, temperature=0, use_cache=impl == "kv_cache")
    if impl == "sdpa_llama_generate":
        model, mask = llama(blocks, "sdpa"), torch.ones_like(ids)
        options = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        return lambda: model.generate(ids, attention_mask=mask, **options)
    from tsa_fast.integrations.hf import HFModel

    model = HFModel(llama(blocks, "tsa_fast"))
    return lambda: model.generate(ids, NEW, temperature=0)


def timed(step):
    def run():
        out = step()
        synchronize()
        return out

    return run


GENERATED: dict[tuple[str, int], torch.Tensor] = {}  # (impl, blocks): the tokens of its warm-up call
TWINS = {"kv_cache": "reference", "sdpa_llama_generate": "hf_generate_tsa_fast"}  # must generate the same
TWINS.update({twin: impl for impl, twin in TWINS.items()})


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("impl", IMPLS)
def test_generate(benchmark, impl, model):
    blocks = MODELS[model]
    step = make_step(impl, blocks)
    out = GENERATED[impl, blocks] = step()  # also the warm-up
    assert out.shape == (BATCH, PROMPT + NEW)
    twin = GENERATED.get((TWINS[impl], blocks))
    assert twin is None or torch.equal(out, twin), f"{impl} and {TWINS[impl]} generate different tokens"
    describe(
        benchmark,
        op="generate",
        mode="greedy",
        impl=impl,
        dtype=torch.float32,
        size={"new_tokens": NEW},
        x="new_tokens",
        model=f"{model} {D_MODEL}x{blocks}",
        B=BATCH,
        N=PROMPT,
        V=VOCAB,
    )
    measure(benchmark, timed(step))
    if not benchmark.disabled:
        benchmark.extra_info["tokens_per_s"] = BATCH * NEW / benchmark.stats.stats.median
