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


def count_kernel_launches(monkeypatch, decode: bool = False) -> list:
    """A list that gets one entry per launch of the fused attention forward (with `decode`, of the decode path
    too, which the op takes for up to 16 query rows without gradient: generation)."""
    from tsa_fast.backends import triton_kernels

    calls = []
    for name in ("attention_forward", "attention_decode_forward") if decode else ("attention_forward",):
        launcher = getattr(triton_kernels, name)
        monkeypatch.setattr(
            triton_kernels, name, lambda *a, launcher=launcher, **k: calls.append(1) or launcher(*a, **k)
        )
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
    the logits and gradients of eager attention. Both layers' softcapped attention runs the kernel, the
    sliding-window one with its window."""
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


# ----------------------------------------------------------------------------------------------------------
# Sliding windows and padding-free (packed) batches: the kernels with a window, attention_varlen.


def count_varlen_launches(monkeypatch) -> list:
    """A list that gets one entry per launch of the fused packed-sequence attention forward."""
    from tsa_fast.backends import triton_kernels

    calls, forward = [], triton_kernels.attention_varlen_forward
    monkeypatch.setattr(triton_kernels, "attention_varlen_forward", lambda *a: calls.append(1) or forward(*a))
    return calls


def mistral_config():
    return transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        sliding_window=6,  # shorter than the sequences
    )


def qwen2_config():
    return transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,  # one full layer, one sliding-window layer
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=1,
    )


def logits_and_grads(model, select=slice(None), **inputs):
    """Logits (rows `select`) and the q_proj weight gradients of every layer of a loss on them."""
    logits = model(**inputs).logits[select]
    logits.square().mean().backward()
    return (logits, *(layer.self_attn.q_proj.weight.grad for layer in model.model.layers))


@both_backends
@pytest.mark.parametrize(
    "model_class, config", [("MistralForCausalLM", mistral_config), ("Qwen2ForCausalLM", qwen2_config)]
)
def test_sliding_window_layers_run_the_kernel_and_match_eager(backend, monkeypatch, model_class, config):
    """Sliding-window layers (window shorter than the padded sequences): the logits and gradients of eager
    attention, every layer on the kernel (the window is transformers' own: the sliding_window keys up to the
    query's)."""
    eager, fused = eager_and_fused(getattr(transformers, model_class), config())
    calls = count_kernel_launches(monkeypatch)
    ids, mask = padded_batch([20, 13], 20)
    kept = mask.bool()
    expected, actual = (logits_and_grads(model, kept, input_ids=ids, attention_mask=mask) for model in (eager, fused))
    assert len(calls) == (2 if backend == "triton" else 0)  # both layers, the sliding one too
    for got, wanted, what in zip(actual, expected, ("logits", "layer 0 q_proj grad", "layer 1 q_proj grad")):
        assert_rel_close(got, wanted, 1e-5, what)


@both_backends
def test_mistral_generation_past_the_window_matches_eager(backend, monkeypatch):
    """Greedy decoding past the sliding window, left-padded: transformers' sliding cache drops the oldest keys
    (its kv_offset grows), the kernel's window, aligned bottom-right, is still the mask's."""
    eager, fused = eager_and_fused(transformers.MistralForCausalLM, mistral_config())
    calls = count_kernel_launches(monkeypatch, decode=True)
    ids, mask = padded_batch([9, 5], 9, left=True)
    generated = [
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False) for model in (eager, fused)
    ]
    assert torch.equal(*generated)
    assert len(calls) == (2 * 8 if backend == "triton" else 0)


def packed_batch(lengths, collator):
    """Sequences of these lengths packed in one row, padding-free: TRL's padding_free (input_ids, position_ids
    restarting at 0 for each sequence, no attention_mask) or transformers' DataCollatorWithFlattening with
    FlashAttention's kwargs (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k as well)."""
    sequences = [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]
    if collator == "position_ids":
        ids = torch.tensor([sum(sequences, [])], device=DEVICE)
        return dict(input_ids=ids, position_ids=torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE))
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": sequence} for sequence in sequences]
    )
    return {name: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for name, x in batch.items() if name != "labels"}


@both_backends
@pytest.mark.parametrize("collator", ["position_ids", "flattening"])
@pytest.mark.parametrize(
    "model_class, config", [("LlamaForCausalLM", llama_config), ("MistralForCausalLM", mistral_config)]
)
def test_padding_free_training_runs_varlen_and_matches_eager(backend, monkeypatch, collator, model_class, config):
    """A padding-free batch (sequences of length 1 and others, packed in one row), in training mode: the
    logits and gradients of eager attention on the same batch (which masks each sequence off from the others),
    every layer on the packed-sequence kernel (Mistral: with its sliding window)."""
    eager, fused = eager_and_fused(getattr(transformers, model_class), config())
    eager.train(), fused.train()
    plain, packed = count_kernel_launches(monkeypatch), count_varlen_launches(monkeypatch)
    batch = packed_batch([7, 1, 12, 1, 9], collator)
    # No cache, as in training: with one, transformers (eager included) does not look for packed sequences.
    expected, actual = (logits_and_grads(model, use_cache=False, **batch) for model in (eager, fused))
    assert (len(plain), len(packed)) == ((0, 2) if backend == "triton" else (0, 0))
    for got, wanted, what in zip(actual, expected, ("logits", "layer 0 q_proj grad", "layer 1 q_proj grad")):
        assert_rel_close(got, wanted, 1e-5, what)


@both_backends
def test_flash_attention_varlen_kwargs_without_a_mask_run_varlen(backend):
    """cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k and no mask: each sequence of the flattened
    tokens attends within itself, as if run alone."""
    query, key, value = torch.randn(1, 4, 15, 8), torch.randn(1, 2, 15, 8), torch.randn(1, 2, 15, 8)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    cu_seqlens = torch.tensor([0, 6, 7, 15], dtype=torch.int32)
    varlen = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=8, max_length_k=8)
    actual, _ = hf.attention_forward(module, query, key, value, None, scaling=0.5, sliding_window=4, **varlen)
    bounds = cu_seqlens.tolist()
    alone = [
        tsa_fast.attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], causal=True, softmax_scale=0.5, window=(3, 0)
        )
        for a, b in zip(bounds, bounds[1:])
    ]
    expected = torch.cat(alone, dim=2).transpose(1, 2)
    assert_rel_close(actual, expected, 1e-6, "output")


def count_cu_seqlens_checks(monkeypatch) -> list:
    """A list that gets one entry per host check of cu_seqlens by the integration (`check_cu_seqlens`)."""
    calls, check = [], hf.check_cu_seqlens
    monkeypatch.setattr(hf, "check_cu_seqlens", lambda *a: calls.append(1) or check(*a))
    return calls


@both_backends
@pytest.mark.parametrize("collator", ["position_ids", "flattening"])
def test_padding_free_forward_checks_cu_seqlens_once_not_per_layer(backend, monkeypatch, collator):
    """A padding-free forward reads its cu_seqlens on the host once, where the mask builds them; each of the two
    layers runs attention_varlen_prechecked, which does not read them (no device sync per layer)."""
    _, fused = eager_and_fused(transformers.LlamaForCausalLM, llama_config())
    checks = count_cu_seqlens_checks(monkeypatch)
    layers, prechecked = [], hf.attention_varlen_prechecked
    monkeypatch.setattr(hf, "attention_varlen_prechecked", lambda *a, **k: layers.append(1) or prechecked(*a, **k))
    with torch.no_grad():
        fused(**packed_batch([7, 1, 12], collator), use_cache=False)
    assert (len(checks), len(layers)) == (1, 2)


def test_flash_attention_varlen_kwargs_are_checked_once_and_bad_ones_raise(monkeypatch):
    """FlashAttention's varlen kwargs are checked at the first layer that gets them, not again for the same
    tensors (the other layers of the forward); tensors changed in place since, or other tensors, are checked
    again, and bad ones raise attention_varlen's ValueErrors."""
    query, key, value = torch.randn(1, 4, 15, 8), torch.randn(1, 2, 15, 8), torch.randn(1, 2, 15, 8)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    checks = count_cu_seqlens_checks(monkeypatch)
    cu_seqlens = torch.tensor([0, 6, 7, 15], dtype=torch.int32)
    varlen = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=8, max_length_k=8)
    for _ in range(3):
        hf.attention_forward(module, query, key, value, None, **varlen)
    assert len(checks) == 1
    cu_seqlens[2] = 5
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be non-decreasing.*\[0, 6, 5, 15\]"):
        hf.attention_forward(module, query, key, value, None, **varlen)
    valid, short = torch.tensor([0, 6, 7, 15], dtype=torch.int32), torch.tensor([0, 6, 7, 14], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing from 0 to total_k = 15"):
        hf.attention_forward(module, query, key, value, None, **dict(varlen, cu_seq_lens_q=valid, cu_seq_lens_k=short))
    with pytest.raises(ValueError, match="max_seqlen_q = 7 is below the longest sequence's 8 tokens"):
        hf.attention_forward(module, query, key, value, None, **dict(varlen, cu_seq_lens_q=valid, max_length_q=7))
    assert len(checks) == 4


def test_sliding_and_packed_masks_reach_the_kernel_as_kernel_masks():
    """transformers' sliding-window mask (with the local_size it passes) and packed-sequence masks become
    KernelMasks with transformers' window and the sequences' offsets; their dense() is transformers' 4D mask;
    a chunked mask stays 4D."""
    from transformers.masking_utils import (
        and_masks,
        chunked_causal_mask_function,
        packed_sequence_mask_function,
        remap_positions_for_packed_sequence,
        sdpa_mask,
    )

    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :3] = False
    args = dict(batch_size=2, q_length=4, kv_length=12, attention_mask=padding, device="cpu")
    sliding = sliding_window_causal_mask_function(3)
    mask = hf.attention_mask(q_offset=8, mask_function=sliding, local_size=3, **args)
    assert isinstance(mask, hf.KernelMask) and mask.window == (2, 0) and mask.causal
    assert torch.equal(mask.padding, padding) and mask.cu_seqlens is None
    assert torch.equal(
        mask.dense(), sdpa_mask(2, 4, 12, 8, 0, sliding, padding, local_size=3, allow_is_causal_skip=False)
    )
    # Packed: sequences of 3, 1 and 4 tokens in one row, causal, with position ids restarting at 0.
    positions = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]])
    sequence_ids = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2]])
    packed = and_masks(
        remap_positions_for_packed_sequence(causal_mask_function, positions),
        packed_sequence_mask_function(sequence_ids),
    )
    mask = hf.attention_mask(batch_size=1, q_length=8, kv_length=8, mask_function=packed, device="cpu")
    assert isinstance(mask, hf.KernelMask) and mask.window is None and mask.max_seqlen == 4
    assert mask.cu_seqlens.dtype == torch.int32 and mask.cu_seqlens.tolist() == [0, 3, 4, 8]
    chunked = chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long))
    assert hf.attention_mask(q_offset=8, mask_function=chunked, local_size=4, **args).shape == (2, 1, 4, 12)


def test_kernel_mask_with_dropout_runs_transformers_sdpa_on_its_dense_mask():
    """Dropout (training) on a sliding-window layer: transformers' SDPA attention with the KernelMask's dense()
    mask, the same random draws."""
    query, key, value = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[0, :2] = False
    sliding = sliding_window_causal_mask_function(4)
    mask = hf.attention_mask(2, 10, 10, mask_function=sliding, attention_mask=padding, local_size=4, device="cpu")
    assert isinstance(mask, hf.KernelMask)
    torch.manual_seed(0)
    actual, _ = hf.attention_forward(module, query, key, value, mask, dropout=0.5)
    torch.manual_seed(0)
    expected, _ = hf.sdpa_attention_forward(module, query, key, value, mask.dense(), dropout=0.5, is_causal=False)
    assert torch.equal(actual, expected)
