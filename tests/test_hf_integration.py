"""`tsa_fast.integrations.hf`: `attn_implementation="tsa_fast"` in small randomly initialised transformers models
(BERT, Llama with GQA; built from a config, nothing downloaded) gives the outputs of `attn_implementation="eager"`."""

import copy
import subprocess
import sys

import pytest
import torch

import tsa_fast

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("tsa_fast.integrations.hf")  # skips only where transformers is missing or too old

from conftest import DEVICE, assert_rel_close  # noqa: E402
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function  # noqa: E402

both_backends = pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
VOCAB = 97


def bert_config():
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )


def llama_config():
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )


def eager_and_fused(model_class, config):
    """The same randomly initialised model with attn_implementation "eager" and "tsa_fast", in eval mode."""
    eager = model_class._from_config(copy.deepcopy(config), attn_implementation="eager").to(DEVICE).eval()
    fused = model_class._from_config(copy.deepcopy(config), attn_implementation="tsa_fast").to(DEVICE).eval()
    fused.load_state_dict(eager.state_dict())
    assert fused.config._attn_implementation == "tsa_fast" and eager.config._attn_implementation == "eager"
    return eager, fused


def padded_batch(lengths, n, left=False):
    ids = torch.randint(0, VOCAB, (len(lengths), n), device=DEVICE)
    mask = torch.zeros(len(lengths), n, dtype=torch.long, device=DEVICE)
    for row, length in enumerate(lengths):
        mask[row, slice(n - length, n) if left else slice(0, length)] = 1
    return ids, mask


@both_backends
def test_bert_matches_eager(backend):
    eager, fused = eager_and_fused(transformers.BertModel, bert_config())
    ids, mask = padded_batch([19, 12], 19)
    expected = eager(ids, attention_mask=mask).last_hidden_state
    actual = fused(ids, attention_mask=mask).last_hidden_state
    kept = mask.bool()  # padded positions' outputs are meaningless in either
    assert_rel_close(actual[kept], expected[kept], 1e-5, "hidden states")


@both_backends
def test_llama_gqa_matches_eager_with_left_padding_and_generation(backend):
    eager, fused = eager_and_fused(transformers.LlamaForCausalLM, llama_config())
    ids, mask = padded_batch([21, 15], 21, left=True)
    expected, actual = (model(ids, attention_mask=mask).logits for model in (eager, fused))
    assert_rel_close(actual[mask.bool()], expected[mask.bool()], 1e-5, "logits")
    # Greedy decoding with a cache: one query row against the cached keys (causal, aligned bottom-right).
    generated = [
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False) for model in (eager, fused)
    ]
    assert torch.equal(*generated)


@both_backends
def test_llama_gradients_match_eager(backend):
    eager, fused = eager_and_fused(transformers.LlamaForCausalLM, llama_config())
    ids, mask = padded_batch([16, 16], 16)
    grads = []
    for model in (eager, fused):
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert_rel_close(grads[1], grads[0], 1e-5, "q_proj grad")


def test_plain_masks_reach_the_kernel_as_padding():
    """Plain causal (aligned bottom-right) and bidirectional patterns: the (B, N_k) padding mask or None;
    any other pattern: transformers' 4D SDPA mask."""
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :3] = False
    args = dict(batch_size=2, q_length=4, kv_length=12, attention_mask=padding, device="cpu")
    assert torch.equal(hf.attention_mask(q_offset=8, mask_function=causal_mask_function, **args), padding)
    assert hf.attention_mask(q_offset=8, mask_function=causal_mask_function, **dict(args, attention_mask=None)) is None
    top_left = hf.attention_mask(q_offset=0, mask_function=causal_mask_function, **args)
    window = hf.attention_mask(q_offset=8, mask_function=sliding_window_causal_mask_function(3), **args)
    assert top_left.shape == window.shape == (2, 1, 4, 12) and top_left.dtype == window.dtype == torch.bool


def test_dropout_runs_transformers_sdpa(monkeypatch):
    """Dropout (training): transformers' SDPA attention with the mask spelled out, the same random draws."""
    query, key, value = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    torch.manual_seed(0)
    actual, _ = hf.attention_forward(module, query, key, value, None, dropout=0.5)
    torch.manual_seed(0)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    expected, _ = hf.sdpa_attention_forward(module, query, key, value, mask[None, None], dropout=0.5, is_causal=False)
    assert torch.equal(actual, expected)


def test_tsa_fast_imports_without_transformers():
    code = "import sys, tsa_fast, tsa_fast.nn, tsa_fast.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@both_backends
@pytest.mark.parametrize("model_class, config", [("LlamaForCausalLM", llama_config), ("BertModel", bert_config)])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_models_through_a_global_sdpa_patch(backend, monkeypatch, model_class, config, padded):
    """transformers' own "sdpa" attention with torch.nn.functional.scaled_dot_product_attention patched to
    tsa_fast's (restored by monkeypatch): the outputs and gradients of the unpatched model. Unpadded batches run
    the kernel (where triton applies); transformers' padded 4D masks go on to PyTorch's own function."""
    from torch.nn import functional

    from tsa_fast.backends import triton_kernels

    model = getattr(transformers, model_class)._from_config(config(), attn_implementation="sdpa").to(DEVICE).eval()
    ids, mask = padded_batch([17, 11] if padded else [17, 17], 17)
    calls, forward = [], triton_kernels.attention_forward
    monkeypatch.setattr(triton_kernels, "attention_forward", lambda *a: calls.append(1) or forward(*a))
    weights = torch.randn(2, 17, VOCAB if model_class == "LlamaForCausalLM" else 64, device=DEVICE)
    results = []
    for sdpa in (tsa_fast.scaled_dot_product_attention, functional.scaled_dot_product_attention):  # patched, own
        monkeypatch.setattr(functional, "scaled_dot_product_attention", sdpa)
        model.zero_grad()
        out = model(ids, attention_mask=mask)
        hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
        (hidden * weights).sum().backward()  # random weights: a LayerNorm output's mean square is constant
        results.append((hidden[mask.bool()], next(model.parameters()).grad.clone()))
    assert bool(calls) == (backend == "triton" and not padded)
    for actual, expected, what in zip(*results, ("outputs", "embedding grad")):
        assert_rel_close(actual, expected, 1e-5, what)


def count_kernel_launches(monkeypatch) -> list:
    """A list that gets one entry per launch of the fused attention forward."""
    from tsa_fast.backends import triton_kernels

    calls, forward = [], triton_kernels.attention_forward
    monkeypatch.setattr(triton_kernels, "attention_forward", lambda *a: calls.append(1) or forward(*a))
    return calls


@both_backends
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "bidirectional"])
def test_sliding_window_and_softcap_with_a_plain_mask_run_the_kernel(backend, monkeypatch, is_causal):
    """`sliding_window` and `softcap` with a padding mask: the kernel, giving the eager result of transformers'
    own sliding-window mask (causal: the sliding_window keys up to the query's; bidirectional: within
    sliding_window of it) with the scores softcapped."""
    from transformers.masking_utils import sdpa_mask, sliding_window_bidirectional_mask_function

    calls = count_kernel_launches(monkeypatch)
    query, key, value = torch.randn(2, 4, 20, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    padding = torch.ones(2, 20, dtype=torch.bool)
    padding[1, :4] = False
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = is_causal, 2
    actual, _ = hf.attention_forward(
        module, query, key, value, padding, scaling=0.4, sliding_window=5, softcap=2.0, is_causal=is_causal
    )
    mask_function = (sliding_window_causal_mask_function if is_causal else sliding_window_bidirectional_mask_function)(
        5
    )
    mask = sdpa_mask(2, 20, 20, 0, 0, mask_function, padding, allow_is_causal_skip=False)
    expected, _ = hf._eager_softcapped_attention(module, query, key, value, mask, 0.0, 0.4, 2.0)
    kept = mask.any(-1)[:, 0]  # rows with a key to attend to
    assert_rel_close(actual[kept], expected[kept], 1e-5, "output")
    assert bool(calls) == (backend == "triton")


def gemma2_config():
    return transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,  # one sliding-window layer, one full
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=64,
        sliding_window=6,
        attn_logit_softcapping=3.0,
        query_pre_attn_scalar=16,
    )


@both_backends
@pytest.mark.skipif(not hasattr(transformers, "Gemma2ForCausalLM"), reason="transformers without Gemma 2")
def test_gemma2_softcap_and_sliding_window_match_eager(backend, monkeypatch):
    """A Gemma 2-style model (attention logit softcapping; a sliding-window layer and a full one), padded:
    the logits and gradients of eager attention. The full layer's softcapped attention runs the kernel; the
    sliding-window layer, whose mask transformers builds 4D, runs eager attention with the softcap (SDPA has
    none)."""
    eager, fused = eager_and_fused(transformers.Gemma2ForCausalLM, gemma2_config())
    assert eager.config.layer_types == ["sliding_attention", "full_attention"]
    calls = count_kernel_launches(monkeypatch)
    ids, mask = padded_batch([20, 13], 20)
    results = []
    for model in (eager, fused):
        logits = model(ids, attention_mask=mask).logits
        (logits[mask.bool()].square().mean()).backward()
        grads = [model.model.layers[i].self_attn.q_proj.weight.grad for i in range(2)]
        results.append((logits[mask.bool()], *grads))
    assert bool(calls) == (backend == "triton")
    for actual, expected, what in zip(*results, ("logits", "sliding layer q_proj grad", "full layer q_proj grad")):
        assert_rel_close(actual, expected, 1e-5, what)
