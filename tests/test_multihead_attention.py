"""`tsa_fast.nn.MultiheadAttention` against `torch.nn.MultiheadAttention`: state_dicts load both ways, the same
outputs and gradients on the kernels (need_weights=False) and the same everything on PyTorch's path."""

import pytest
import torch
from conftest import DEVICE, assert_rel_close

import tsa_fast
from tsa_fast.backends import triton_kernels

both_backends = pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
CONFIGS = {
    "default": dict(embed_dim=32, num_heads=4),
    "batch_first-no-bias": dict(embed_dim=32, num_heads=2, bias=False, batch_first=True),
    "kdim-vdim": dict(embed_dim=48, num_heads=3, kdim=20, vdim=12, batch_first=True),
    "bias_kv-zero_attn": dict(embed_dim=32, num_heads=4, add_bias_kv=True, add_zero_attn=True),
}


def make_pair(config, dtype=torch.float32):
    """A torch.nn.MultiheadAttention and a tsa_fast one loaded from its state_dict."""
    theirs = torch.nn.MultiheadAttention(**CONFIGS[config], device=DEVICE, dtype=dtype)
    ours = tsa_fast.nn.MultiheadAttention(**CONFIGS[config], device=DEVICE, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def make_inputs(config, batch=3, tgt_len=17, src_len=None, self_attention=True):
    """query, key, value in the module's layout; self-attention passes one tensor three times."""
    options = CONFIGS[config]
    src_len = tgt_len if src_len is None else src_len
    shape = lambda n, dim: (batch, n, dim) if options.get("batch_first") else (n, batch, dim)  # noqa: E731
    query = torch.randn(shape(tgt_len, options["embed_dim"]), device=DEVICE)
    if self_attention:
        return query, query, query
    key = torch.randn(shape(src_len, options.get("kdim") or options["embed_dim"]), device=DEVICE)
    value = torch.randn(shape(src_len, options.get("vdim") or options["embed_dim"]), device=DEVICE)
    return query, key, value


def output_and_grads(module, query, key, value, **kwargs):
    """The module's (output, weights) and the gradients of a weighted sum of the output w.r.t. its parameters."""
    module.zero_grad()
    out, weights = module(query, key, value, **kwargs)
    (out * torch.linspace(-1, 1, out.shape[-1], device=DEVICE)).sum().backward()
    return out, weights, {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dicts_load_both_ways(config):
    theirs, ours = make_pair(config)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    other = torch.nn.MultiheadAttention(**CONFIGS[config], device=DEVICE)
    other.load_state_dict(ours.state_dict())  # strict
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), theirs.state_dict().values()))
    assert isinstance(ours, torch.nn.MultiheadAttention)


@both_backends
@pytest.mark.parametrize(
    "config, inputs, kwargs",
    [
        ("default", dict(), dict()),
        ("default", dict(), dict(key_padding_mask="pad", is_causal=True)),
        ("default", dict(self_attention=False, src_len=29), dict(key_padding_mask="pad")),
        ("batch_first-no-bias", dict(), dict(is_causal=True)),
        ("batch_first-no-bias", dict(self_attention=False, src_len=9), dict()),
        ("kdim-vdim", dict(self_attention=False, src_len=23), dict(key_padding_mask="pad")),
    ],
    ids=[
        "self",
        "self-causal-padding",
        "cross-padding",
        "batch_first-causal",
        "batch_first-cross",
        "kdim-vdim-padding",
    ],
)
def test_fused_path_matches_torch(backend, monkeypatch, config, inputs, kwargs):
    """need_weights=False: the kernels (triton backend) or PyTorch's own path (torch), the same outputs and
    parameter gradients as torch.nn.MultiheadAttention."""
    calls = []
    forward = triton_kernels.attention_forward
    monkeypatch.setattr(triton_kernels, "attention_forward", lambda *a: calls.append(1) or forward(*a))
    theirs, ours = make_pair(config)
    query, key, value = make_inputs(config, **inputs)
    src_len = key.shape[1 if CONFIGS[config].get("batch_first") else 0]
    if kwargs.get("key_padding_mask") == "pad":
        pad = torch.rand(3, src_len, device=DEVICE) < 0.3  # True = ignore, as in PyTorch
        pad[:, 0] = False  # every row keeps a key (PyTorch's slow path gives NaN for a row without one)
        kwargs = dict(kwargs, key_padding_mask=pad)
    if kwargs.get("is_causal"):
        causal_mask = torch.ones(src_len, src_len, dtype=torch.bool, device=DEVICE).triu(1)  # True = masked
        kwargs = dict(kwargs, attn_mask=causal_mask)
    expected = output_and_grads(theirs, query, key, value, need_weights=False, **kwargs)
    actual = output_and_grads(ours, query, key, value, need_weights=False, **kwargs)
    assert actual[1] is None and expected[1] is None
    assert_rel_close(actual[0], expected[0], 1e-5, "output")
    for name, grad in expected[2].items():
        assert_rel_close(actual[2][name], grad, 1e-5, f"grad {name}")
    assert len(calls) == (backend == "triton")


@both_backends
@pytest.mark.parametrize(
    "config, case",
    [
        ("default", "need_weights"),
        ("default", "need_weights per head"),
        ("default", "dropout in training"),
        ("default", "float key_padding_mask"),
        ("default", "attn_mask without is_causal"),
        ("default", "unbatched"),
        ("bias_kv-zero_attn", "bias_kv"),
    ],
)
def test_other_calls_run_torch(backend, monkeypatch, config, case):
    """need_weights=True (the default), dropout, float masks, general masks, unbatched inputs, bias_kv:
    exactly torch.nn.MultiheadAttention.forward (the same dropout draws too), the kernels never run."""
    monkeypatch.setattr(triton_kernels, "attention_forward", None)  # would fail if called
    theirs, ours = make_pair(config)
    query, key, value = make_inputs(config, self_attention=False, src_len=11)
    kwargs = dict(need_weights=case.startswith("need_weights"), average_attn_weights=case != "need_weights per head")
    if case == "dropout in training":
        theirs.dropout = ours.dropout = 0.4
        theirs.train(), ours.train()
    if case == "float key_padding_mask":
        kwargs["key_padding_mask"] = torch.randn(3, 11, device=DEVICE)
    if case == "attn_mask without is_causal":
        kwargs["attn_mask"] = torch.rand(17, 11, device=DEVICE) < 0.2
    if case == "unbatched":
        query, key, value = query[:, 0], key[:, 0], value[:, 0]
    results = []
    for module in (theirs, ours):
        torch.manual_seed(0)
        results.append(output_and_grads(module, query, key, value, **kwargs))
    (out, weights, grads), (expected_out, expected_weights, expected_grads) = results[1], results[0]
    assert torch.equal(out, expected_out)
    assert (weights is None and expected_weights is None) or torch.equal(weights, expected_weights)
    assert all(torch.equal(grads[name], grad) for name, grad in expected_grads.items())


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_half_precision(backend):
    theirs, ours = make_pair("batch_first-no-bias", dtype=torch.float16)
    query = torch.randn(2, 40, 32, device=DEVICE, dtype=torch.float16)
    reference = torch.nn.MultiheadAttention(**CONFIGS["batch_first-no-bias"], device=DEVICE, dtype=torch.float64)
    reference.load_state_dict(theirs.state_dict())
    expected = reference(*(query.double(),) * 3, need_weights=False)[0]
    torch_error = (theirs(query, query, query, need_weights=False)[0].double() - expected).norm()
    our_error = (ours(query, query, query, need_weights=False)[0].double() - expected).norm()
    assert our_error <= 2 * torch_error + 1e-4 * expected.norm()


@both_backends
@pytest.mark.parametrize("config", ["default", "kdim-vdim", "bias_kv-zero_attn"])
def test_torch_jit_script(backend, config):
    """torch.jit.script works as on torch.nn.MultiheadAttention (cf. PyTorch's test_script_mha_in_proj_weight_none)
    and the scripted module (PyTorch's attention, sharing this module's parameters) gives the eager outputs."""
    _, ours = make_pair(config)
    scripted = torch.jit.script(ours)
    query, key, value = make_inputs(config, self_attention=False, src_len=11)
    pad = torch.rand(3, 11, device=DEVICE) < 0.3
    pad[:, 0] = False
    for kwargs in (dict(need_weights=False), dict(key_padding_mask=pad, need_weights=False), dict()):
        expected, actual = ours(query, key, value, **kwargs), scripted(query, key, value, **kwargs)
        assert_rel_close(actual[0], expected[0], 1e-5, "output")
        assert (actual[1] is None) == (expected[1] is None)
    with torch.no_grad():
        ours.out_proj.weight.mul_(2)  # parameters are shared, not copied
    assert_rel_close(scripted(query, key, value)[0], ours(query, key, value)[0], 1e-5, "output after an update")
    block = AttentionBlock(ours)
    expected = block(query, key, value)
    assert_rel_close(torch.jit.script(block)(query, key, value), expected, 1e-5, "a scripted parent's output")


class AttentionBlock(torch.nn.Module):
    """A parent module for torch.jit.script."""

    def __init__(self, attention: torch.nn.MultiheadAttention):
        super().__init__()
        self.attention = attention

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.attention(query, key, value, need_weights=False)[0]


def outcome(fn):
    """fn()'s result, or (type, message) of what it raised."""
    try:
        return fn()
    except Exception as error:
        return type(error), str(error)


@both_backends
@pytest.mark.parametrize("batch_first", [True, False])
def test_nested_tensors_run_torch(backend, monkeypatch, batch_first):
    """Nested (ragged) inputs: what PyTorch does, not a crash: a nested result on its fast path (eval mode,
    batch_first), its own error otherwise."""
    monkeypatch.setattr(triton_kernels, "attention_forward", None)  # would fail if called
    options = dict(embed_dim=32, num_heads=4, batch_first=batch_first, device=DEVICE)
    theirs = torch.nn.MultiheadAttention(**options).eval()
    ours = tsa_fast.nn.MultiheadAttention(**options).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.nested.nested_tensor([torch.randn(n, 32, device=DEVICE) for n in (5, 9)])
    with torch.inference_mode():
        expected, actual = (outcome(lambda m=m: m(x, x, x, need_weights=False)[0]) for m in (theirs, ours))
    if batch_first:
        assert actual.is_nested and expected.is_nested
        assert all(torch.equal(a, e) for a, e in zip(actual.unbind(), expected.unbind()))
    else:
        assert actual == expected and "NestedTensor" in expected[1]


def _bad_call(case):
    """(config, query, key, value, kwargs) of a call torch.nn.MultiheadAttention rejects."""
    query, key, value = make_inputs("default", self_attention=False, src_len=11)
    return {
        "query embedding dim": ("default", query[..., :30], key, value, {}),
        "key embedding dim": ("default", query, key[..., :30], value[..., :30], {}),
        "key and value shapes": ("default", query, key, value[:9], {}),
        "batch sizes": ("default", query, key[:, :2], value[:, :2], {}),
        "key_padding_mask shape": ("default", query, key, value, dict(key_padding_mask=torch.zeros(3, 5).bool())),
        "kdim": ("kdim-vdim", *make_inputs("kdim-vdim", self_attention=False)[:1], torch.randn(3, 17, 19), None, {}),
        "causal mask shape": (
            "default",
            query,
            query,
            query,
            dict(is_causal=True, attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1)),
        ),
    }[case]


@both_backends
@pytest.mark.parametrize(
    "case",
    [
        "query embedding dim",
        "key embedding dim",
        "key and value shapes",
        "batch sizes",
        "key_padding_mask shape",
        "kdim",
        "causal mask shape",
    ],
)
def test_bad_shapes_fail_as_in_pytorch(backend, case):
    """The fused path (need_weights=False) fails on bad shapes as torch.nn.MultiheadAttention does: the same
    exception type and message (an AssertionError naming the embedding dimension, ...), or, for the causal
    hint's mask, which PyTorch does not check here, the same output."""
    config, query, key, value, kwargs = _bad_call(case)
    if value is None:
        value = key[..., :12]
    theirs, ours = make_pair(config)
    expected, actual = (outcome(lambda m=m: m(query, key, value, need_weights=False, **kwargs)) for m in (theirs, ours))
    if case == "causal mask shape":  # PyTorch ignores the hint's mask here: the same output
        assert_rel_close(actual[0], expected[0], 1e-5, "output")
        return
    assert actual == expected
    if case == "query embedding dim":
        assert expected[0] is AssertionError and "embedding dimension of 32" in expected[1]
