"""Property tests (hypothesis) for `tsa_fast.attention`, `tsa_fast.attention_varlen` (also against its sequences
run alone, and the backends against each other), `tsa_fast.scaled_dot_product_attention` and
`tsa_fast.nn.MultiheadAttention`: random shapes (odd head dims, N_q != N_k, GQA/MQA, empty sequences), dtypes,
strides, options and bad values. Each outcome is either "equals float64 math within the FlashAttention test rule"
(an error at most twice that of PyTorch's own attention in the same dtype, plus a small atol) or "a ValueError /
TypeError naming the argument" (for the drop-ins: PyTorch's own error, the same type and message)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_rel_close, rel_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attention import ATOL, check_against_reference, outputs_and_grads
from test_attention_varlen import check_varlen, cu_seqlens, varlen_outputs_and_grads, varlen_rule

import tsa_fast
from tsa_fast.reference.attention import per_sequence

both_backends = pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEEDS = st.integers(0, 2**32 - 1)


def head_tensor(draw, batch, heads, n, d, dtype):
    """A (B, H, N, D) tensor, contiguous or a strided view: (B, N, H, D) transposed, or a slice of a wider
    head dim."""
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if layout == "transposed":
        return torch.randn(batch, n, heads, d, device=DEVICE).to(dtype).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(batch, heads, n, d + 3, device=DEVICE).to(dtype)[..., 2 : d + 2]
    return torch.randn(batch, heads, n, d, device=DEVICE).to(dtype)


@st.composite
def attention_problems(draw, max_n=40, max_d=40):
    """q, k, v and the options of a valid tsa_fast.attention call."""
    torch.manual_seed(draw(SEEDS))  # the tensors (and the test's own draws after them) follow the example
    batch, heads_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_q, n_k = draw(st.integers(1, max_n)), draw(st.integers(1, max_n))
    d, d_v = draw(st.integers(1, max_d)), draw(st.integers(1, max_d))
    dtype = draw(st.sampled_from(DTYPES))
    q = head_tensor(draw, batch, heads_kv * group, n_q, d, dtype)
    k = head_tensor(draw, batch, heads_kv, n_k, d, dtype)
    v = head_tensor(draw, batch, heads_kv, n_k, d_v, dtype)
    options = dict(causal=draw(st.booleans()))
    if draw(st.booleans()):
        keep = torch.rand(batch, n_k, device=DEVICE) > draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
        options["key_padding_mask"] = keep if draw(st.booleans()) else keep.repeat(1, 2)[:, ::2]
    if draw(st.booleans()):
        options["softmax_scale"] = draw(st.floats(0.05, 2.0))
    return q, k, v, options


@settings(max_examples=40, **SETTINGS)
@given(problem=attention_problems())
@both_backends
def test_attention_equals_float64_math(backend, problem):
    q, k, v, options = problem
    check_against_reference(q, k, v, **options)


# Bad calls of tsa_fast.attention: (arguments over the valid q, k, v (2, 4, 8, 16), the error, the name).
BAD_ATTENTION_CALLS = [
    (dict(causal=1), TypeError, "causal"),
    (dict(causal=None), TypeError, "causal"),
    (dict(causal="no"), TypeError, "causal"),
    (dict(return_lse=0), TypeError, "return_lse"),
    (dict(return_lse="yes"), TypeError, "return_lse"),
    (dict(softmax_scale="0.5"), TypeError, "softmax_scale"),
    (dict(softmax_scale=True), TypeError, "softmax_scale"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=-0.5), ValueError, "softmax_scale"),
    (dict(softmax_scale=math.inf), ValueError, "softmax_scale"),
    (dict(softmax_scale=math.nan), ValueError, "softmax_scale"),
    (dict(key_padding_mask=torch.ones(2, 8)), ValueError, "key_padding_mask"),
    (dict(key_padding_mask=torch.ones(2, 9, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(key_padding_mask=torch.ones(1, 8, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(key_padding_mask="all"), TypeError, "key_padding_mask"),
    (dict(q=torch.randn(2, 4, 8)), ValueError, "q"),
    (dict(k=torch.randn(2, 3, 8, 16), v=torch.randn(2, 3, 8, 16)), ValueError, "key/value heads"),
    (dict(k=torch.randn(2, 4, 8, 15)), ValueError, "head dim"),
    (dict(v=torch.randn(2, 4, 9, 16)), ValueError, "N_k"),
    (dict(v=torch.randn(2, 4, 8, 16).half()), ValueError, "dtype"),
    (dict(k=torch.randn(2, 4, 8, 16).long()), ValueError, "k must be"),
    (dict(v=[[0.0]]), TypeError, "v must be"),
    (dict(q=torch.randn(2, 4, 0, 16)), ValueError, "q must be"),
    (dict(q=torch.randn(2, 4, 8, 300), k=torch.randn(2, 4, 8, 300)), ValueError, "head dims"),
]


@settings(max_examples=40, **SETTINGS)
@given(call=st.sampled_from(BAD_ATTENTION_CALLS), causal=st.booleans())
@both_backends
def test_attention_bad_values_raise_naming_the_argument(backend, call, causal):
    arguments, error, name = call
    tensors = {name: torch.randn(2, 4, 8, 16) for name in ("q", "k", "v")}
    tensors.update({key: value for key, value in arguments.items() if key in tensors})
    options = {"causal": causal, **{key: value for key, value in arguments.items() if key not in tensors}}
    with pytest.raises(error, match=name):
        tsa_fast.attention(tensors["q"], tensors["k"], tensors["v"], **options)


def outcome(fn, *args, **kwargs):
    """fn's result, or (type, message) of what it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        return type(error), str(error)


@st.composite
def sdpa_calls(draw):
    """Arguments of F.scaled_dot_product_attention, valid or not: the masks, flags and scales that the
    kernels take and those that go to PyTorch."""
    torch.manual_seed(draw(SEEDS))  # the tensors (and the test's own draws after them) follow the example
    batch, heads_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    n_q = draw(st.integers(1, 24))
    n_k = draw(st.sampled_from([n_q, draw(st.integers(1, 24))]))
    d, dtype = draw(st.integers(1, 40)), draw(st.sampled_from(DTYPES))
    query = head_tensor(draw, batch, heads_kv * group, n_q, d, dtype)
    key, value = (head_tensor(draw, batch, heads_kv, n_k, d, dtype) for _ in range(2))
    mask_kind = draw(st.sampled_from(["none", "keys", "keys 2D", "keys expanded", "full bool", "float"]))
    keep = torch.rand(batch, 1, 1, n_k, device=DEVICE) > 0.3
    attn_mask = {
        "none": None,
        "keys": keep,
        "keys 2D": keep[0, 0],
        "keys expanded": keep.expand(batch, heads_kv * group, n_q, n_k),
        "full bool": torch.rand(n_q, n_k, device=DEVICE) > 0.3,
        "float": torch.randn(batch, 1, n_q, n_k, device=DEVICE).to(dtype),
    }[mask_kind]
    kwargs = dict(
        attn_mask=attn_mask,
        is_causal=draw(st.sampled_from([False, True, 1])),
        scale=draw(st.sampled_from([None, 0.3, 1.7, "0.1"])),
        enable_gqa=draw(st.sampled_from([group > 1, True, False, "yes"])),
    )
    return query, key, value, kwargs


@settings(max_examples=40, **SETTINGS)
@given(call=sdpa_calls())
@both_backends
def test_sdpa_equals_float64_math_or_raises_pytorchs_error(backend, call):
    query, key, value, kwargs = call
    torch_own = outcome(F.scaled_dot_product_attention, query, key, value, **kwargs)
    actual = outcome(tsa_fast.scaled_dot_product_attention, query, key, value, **kwargs)
    if not isinstance(torch_own, torch.Tensor):  # PyTorch rejects the call: the same error
        assert actual == torch_own
        return
    mask = kwargs["attn_mask"]
    exact_mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    wanted = F.scaled_dot_product_attention(
        *(x.double() for x in (query, key, value)), **kwargs | {"attn_mask": exact_mask}
    )
    assert actual.dtype == query.dtype and actual.shape == wanted.shape
    finite = wanted.isfinite()
    assert torch.equal(actual.isfinite(), torch_own.isfinite())  # rows PyTorch makes NaN (no key) as well
    tol = 2 * rel_error(torch_own[finite], wanted[finite]) + ATOL[query.dtype]
    assert rel_error(actual[finite], wanted[finite]) <= tol


@st.composite
def mha_calls(draw):
    """A torch.nn.MultiheadAttention configuration and call arguments (valid, or shapes PyTorch rejects)."""
    torch.manual_seed(draw(SEEDS))  # the tensors (and the test's own draws after them) follow the example
    num_heads = draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 12))
    embed_dim = num_heads * head_dim
    config = dict(
        embed_dim=embed_dim,
        num_heads=num_heads,
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        kdim=draw(st.sampled_from([None, 5])),
        vdim=draw(st.sampled_from([None, 7])),
    )
    batch, tgt_len, src_len = draw(st.integers(1, 3)), draw(st.integers(1, 20)), draw(st.integers(1, 20))
    self_attention = config["kdim"] is None and config["vdim"] is None and draw(st.booleans())
    if self_attention:
        src_len = tgt_len
    bad = draw(st.sampled_from([None, None, None, "query dim", "key length", "mask shape"]))

    def shape(n, dim):
        return (batch, n, dim) if config["batch_first"] else (n, batch, dim)

    query = torch.randn(shape(tgt_len, embed_dim + (bad == "query dim")), device=DEVICE)
    key = query if self_attention else torch.randn(shape(src_len, config["kdim"] or embed_dim), device=DEVICE)
    value_len = src_len + (bad == "key length")
    value = key if self_attention and bad is None else torch.randn(shape(value_len, config["vdim"] or embed_dim))
    kwargs = dict(need_weights=draw(st.booleans()))
    if draw(st.booleans()):
        padded = torch.rand(batch, src_len + (bad == "mask shape"), device=DEVICE) < 0.3
        padded[:, 0] = False  # every row keeps a key (PyTorch's slow path gives NaN for a row without one)
        kwargs["key_padding_mask"] = padded
    if self_attention and draw(st.booleans()):
        kwargs.update(is_causal=True, attn_mask=torch.ones(tgt_len, tgt_len, dtype=torch.bool).triu(1))
    return config, query, key, value, kwargs


@settings(max_examples=40, **SETTINGS)
@given(call=mha_calls())
@both_backends
def test_multihead_attention_equals_float64_math_or_raises_pytorchs_error(backend, call):
    config, query, key, value, kwargs = call
    theirs = torch.nn.MultiheadAttention(**config, device=DEVICE)
    ours = tsa_fast.nn.MultiheadAttention(**config, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    exact = torch.nn.MultiheadAttention(**config, device=DEVICE, dtype=torch.float64)
    exact.load_state_dict(theirs.state_dict())
    expected = outcome(theirs, query, key, value, **kwargs)
    actual = outcome(ours, query, key, value, **kwargs)
    if not isinstance(expected, tuple) or not isinstance(expected[0], torch.Tensor):  # PyTorch rejects it
        assert actual == expected
        return
    wanted = exact(query.double(), key.double(), value.double(), **kwargs)
    for mine, torch_own, exact_value in zip(actual, expected, wanted):
        if exact_value is None:
            assert mine is None and torch_own is None
            continue
        tol = 2 * rel_error(torch_own, exact_value) + ATOL[torch.float32]
        assert mine.shape == exact_value.shape and rel_error(mine, exact_value) <= tol


@st.composite
def varlen_problems(draw, max_n=24, max_d=24):
    """q, k, v, the (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of a valid
    `tsa_fast.attention_varlen` call and its options: 1 to 3 sequences (empty ones too), GQA, strided views."""
    torch.manual_seed(draw(SEEDS))  # the tensors follow the example
    heads_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    lengths_q = draw(st.lists(st.integers(0, max_n), min_size=1, max_size=3))
    lengths = st.lists(st.integers(0, max_n), min_size=len(lengths_q), max_size=len(lengths_q))
    lengths_k = draw(st.sampled_from([lengths_q, draw(lengths)]))
    lengths_q[0], lengths_k[0] = max(lengths_q[0], 1), max(lengths_k[0], 1)  # no empty packed tensor
    d, d_v, dtype = draw(st.integers(1, max_d)), draw(st.integers(1, max_d)), draw(st.sampled_from(DTYPES))
    # (total, H, D) as a (B=1, H, total, D) head tensor's view: contiguous, transposed or sliced likewise.
    q, k, v = (
        head_tensor(draw, 1, heads, sum(lengths), dim, dtype)[0].transpose(0, 1)
        for heads, lengths, dim in (
            (heads_kv * group, lengths_q, d),
            (heads_kv, lengths_k, d),
            (heads_kv, lengths_k, d_v),
        )
    )
    packed = (
        cu_seqlens(lengths_q),
        cu_seqlens(lengths_k),
        max(lengths_q) + draw(st.integers(0, 3)),  # a larger max_seqlen only launches idle tiles
        max(lengths_k) + draw(st.integers(0, 3)),
    )
    side = st.integers(-1, 8)
    options = dict(
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([None, (-1, -1), (draw(side), draw(side))])),
        softcap=draw(st.sampled_from([None, 0.5, 5.0])),
    )
    if draw(st.booleans()):
        options["softmax_scale"] = draw(st.floats(0.05, 2.0))
    return q, k, v, packed, options


@settings(max_examples=40, **SETTINGS)
@given(problem=varlen_problems())
@both_backends
def test_attention_varlen_equals_float64_math(backend, problem):
    """Output, lse and the gradients through both against the float64 reference by the FlashAttention rule."""
    q, k, v, packed, options = problem
    check_varlen(q, k, v, packed, **options)


@settings(max_examples=40, **SETTINGS)
@given(problem=varlen_problems())
@both_backends
def test_attention_varlen_equals_each_sequence_alone(backend, problem):
    """Each packed sequence gets what `tsa_fast.attention` gives it alone (a batch of one): outputs, lse and
    gradients, to fp32 rounding."""
    q, k, v, packed, options = problem
    grad_out = torch.randn(*q.shape[:2], v.shape[2], device=DEVICE)
    grad_lse = torch.randn(q.shape[1], q.shape[0], device=DEVICE)
    bounds = packed[0].tolist(), packed[1].tolist()
    results = varlen_outputs_and_grads(q, k, v, packed, grad_out, grad_lse, **options)
    alone = outputs_and_grads(
        lambda *x, **o: per_sequence(tsa_fast.attention, *x, *bounds, **o), q, k, v, grad_out, grad_lse, **options
    )
    for actual, wanted, what in zip(results, alone, ("out", "lse", "dq", "dk", "dv")):
        assert_rel_close(actual, wanted, ATOL[torch.float32], what)


@settings(max_examples=40, **SETTINGS)
@given(problem=varlen_problems())
def test_attention_varlen_backends_agree(monkeypatch, problem):
    """triton and torch give one answer: outputs, lse and gradients within the sum of what each may differ from
    float64 (twice PyTorch's error in the dtype plus ATOL)."""
    q, k, v, packed, options = problem
    grad_out = torch.randn(*q.shape[:2], v.shape[2], device=DEVICE)
    grad_lse = torch.randn(q.shape[1], q.shape[0], device=DEVICE)
    names = [name for name in ("triton", "torch") if name in tsa_fast.available_backends(DEVICE)]
    if len(names) < 2:
        pytest.skip(f"one backend on {DEVICE.type}: {names}")
    answers = []
    for name in names:
        monkeypatch.setenv("TSA_FAST_BACKEND", name)
        answers.append(varlen_outputs_and_grads(q, k, v, packed, grad_out, grad_lse, **options))
    _, allowed = varlen_rule(q, k, v, packed, grad_out, grad_lse, **options)
    for on_triton, on_torch, tol, what in zip(*answers, allowed, ("out", "lse", "dq", "dk", "dv")):
        assert_rel_close(on_triton, on_torch, 2 * tol, what)
