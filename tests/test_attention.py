"""`tsa_fast.attention` and `tsa_fast.scaled_dot_product_attention`: the triton and torch backends against the
float64 reference (output, lse and the gradients through both) by the FlashAttention test rule; masks,
GQA/MQA, head dims, rows with no key, the SDPA drop-in and its hand-offs to PyTorch, compile, errors."""

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICE,
    assert_rel_close,
    autotune_under_interpreter,
    compile_for_gpus,
    rel_error,
    run_compiled,
    unit_strides,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:  # Linux: a dependency; macOS, Windows: none, and the tests that launch a helper kernel here skip
    import triton
    import triton.language as tl
except ImportError:
    triton = None

import tsa_fast
from tsa_fast.backends import triton_kernels
from tsa_fast.reference.attention import attention as reference_attention
from tsa_fast.reference.attention import window_band
from tsa_fast.reference.attention_transfer_loss import visible_keys

attention_op = importlib.import_module("tsa_fast.ops.attention")  # the module (tsa_fast.ops.attention: the op)

# The "small atol" of the test rule, on relative norm errors: err <= 2 err(PyTorch, same dtype) + ATOL.
ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
both_backends = pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)  # no cpp kernel


def make_inputs(batch=2, heads=2, n_q=37, n_k=None, d=32, d_v=None, heads_kv=None, dtype=torch.float32):
    """q (B, H, N_q, D), k (B, H_kv, N_k, D), v (B, H_kv, N_k, D_v)."""
    n_k = n_q if n_k is None else n_k
    heads_kv = heads if heads_kv is None else heads_kv
    randn = lambda h, n, dim: torch.randn(batch, h, n, dim, device=DEVICE).to(dtype)  # noqa: E731
    return randn(heads, n_q, d), randn(heads_kv, n_k, d), randn(heads_kv, n_k, d if d_v is None else d_v)


def padding_mask(batch, n_k, fully_padded=()):
    """(B, N_k) bool, True = keep: about a third of the keys padded, the listed batch rows entirely."""
    mask = torch.rand(batch, n_k, device=DEVICE) > 0.35
    mask[list(fully_padded)] = False
    return mask


def outputs_and_grads(fn, q, k, v, grad_out, grad_lse, **options):
    """fn's (out, lse) and the gradients of sum(grad_out * out) + sum(grad_lse * lse) w.r.t. q, k, v
    (lse = -inf rows, which have no key, are left out of the sum)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, **options)
    finite = lse.isfinite()
    loss = (out * grad_out.to(out.dtype)).sum() + (torch.where(finite, lse, 0.0) * grad_lse.to(lse.dtype)).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def pytorch_attention(q, k, v, causal=False, softmax_scale=None, key_padding_mask=None):
    """PyTorch's own attention in the inputs' dtype, the yardstick of the test rule: F.scaled_dot_product_attention
    with the visible keys as a bool mask (GQA by enable_gqa), and torch.logsumexp of the scaled scores (a row
    with no key: -inf, by `where`, so that its gradient is 0 and not NaN)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    visible = visible_keys(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    has_key = visible.any(-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
    scores = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores.masked_fill(~(visible | ~has_key[..., None]), -torch.inf), dim=-1)
    return out, torch.where(has_key, lse, -torch.inf)


def check_against_reference(q, k, v, yardstick=pytorch_attention, **options):
    """Output, lse, dq, dk, dv against the float64 reference from the same input values, each within twice
    the error of PyTorch's attention in the inputs' dtype (`yardstick`) plus ATOL (the FlashAttention test
    rule)."""
    grad_out = torch.randn(*q.shape[:3], v.shape[3], device=DEVICE)
    grad_lse = torch.randn(q.shape[:3], device=DEVICE)
    results = outputs_and_grads(
        lambda *x, **o: tsa_fast.attention(*x, return_lse=True, **o), q, k, v, grad_out, grad_lse, **options
    )
    expected = outputs_and_grads(
        lambda *x, **o: reference_attention(*x, return_lse=True, **o),
        *(x.double() for x in (q, k, v)),
        grad_out,
        grad_lse,
        **options,
    )
    yardstick = outputs_and_grads(yardstick, q, k, v, grad_out, grad_lse, **options)
    out, lse, dq, dk, dv = results
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and (dq.dtype, dk.dtype, dv.dtype) == (q.dtype,) * 3
    for actual, wanted, torch_own, what in zip(results, expected, yardstick, ("out", "lse", "dq", "dk", "dv")):
        finite = wanted.isfinite()
        assert_rel_close(actual, wanted, 2 * rel_error(torch_own[finite], wanted[finite]) + ATOL[q.dtype], what)
    return results


@both_backends
@pytest.mark.parametrize(
    "shape, options",
    [
        (dict(), dict()),
        (dict(n_q=37, n_k=70, d=48, d_v=40), dict()),
        (dict(n_q=70), dict(causal=True)),
        (dict(n_q=37, n_k=70), dict(causal=True)),
        (dict(n_q=70, n_k=37), dict(causal=True)),
        (dict(n_q=70), dict(key_padding_mask="mask")),
        (dict(n_q=45, n_k=70), dict(key_padding_mask="mask", causal=True)),
        (dict(n_q=33, heads=4, heads_kv=2), dict(causal=True, key_padding_mask="mask")),
        (dict(n_q=50, n_k=20, heads=3, heads_kv=1), dict(causal=True)),
        (dict(n_q=20, n_k=45, d=16), dict(key_padding_mask="mask", softmax_scale=0.3)),
        (dict(batch=1, heads=1, n_q=150, n_k=130), dict(causal=True, key_padding_mask="mask")),
    ],
    ids=[
        "plain",
        "Nq<Nk-D48-Dv40",
        "causal",
        "causal-Nq<Nk",
        "causal-Nq>Nk",
        "padding",
        "padding-causal-Nq<Nk",
        "GQA-causal-padding",
        "MQA-causal-Nq>Nk",
        "scale",
        "multi-block-causal-padding",
    ],
)
def test_matches_reference(backend, shape, options):
    q, k, v = make_inputs(**shape)
    if options.get("key_padding_mask") == "mask":
        batch = q.shape[0]
        options = dict(
            options, key_padding_mask=padding_mask(batch, k.shape[2], fully_padded=(1,) if batch > 1 else ())
        )
    check_against_reference(q, k, v, **options)


@both_backends
@pytest.mark.parametrize("d, d_v", [(16, 16), (48, 48), (80, 96), (96, 80), (160, 160), (256, 64), (64, 256)])
def test_head_dims(backend, d, d_v):
    """Powers of two and not, padded inside the kernel."""
    q, k, v = make_inputs(batch=1, n_q=24, n_k=40, d=d, d_v=d_v)
    check_against_reference(q, k, v, causal=True, key_padding_mask=padding_mask(1, 40))


@both_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    q, k, v = make_inputs(n_q=45, n_k=70, heads=4, heads_kv=2, d=40, dtype=dtype)
    check_against_reference(q, k, v, causal=True, key_padding_mask=padding_mask(2, 70, fully_padded=(1,)))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize(
    "fwd, dkdv, dq",
    [((16, 64), (64, 16), (16, 32)), ((64, 64), (32, 32), (64, 16))],
    ids=["narrow-rows", "square"],
)
def test_other_tile_shapes(backend, monkeypatch, fwd, dkdv, dq):
    """Tiles longer along keys than queries and the reverse: the split of the causal sweeps at the diagonal."""
    kernels = tsa_fast.kernels.attention
    blocks = {
        kernels._attention_fwd_kernel: fwd,
        kernels._attention_bwd_dkdv_kernel: dkdv,
        kernels._attention_bwd_dq_kernel: dq,
    }
    monkeypatch.setattr(
        kernels, "INTERPRETER_BLOCKS", {kernel: dict(BLOCK_M=m, BLOCK_N=n) for kernel, (m, n) in blocks.items()}
    )
    for n_q, n_k in ((100, 100), (70, 150), (150, 70)):
        q, k, v = make_inputs(batch=1, heads=4, heads_kv=2, n_q=n_q, n_k=n_k, d=24)
        check_against_reference(q, k, v, causal=True, key_padding_mask=padding_mask(1, n_k))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("candidate", range(5))
def test_autotuning_candidate_tiles(backend, monkeypatch, candidate):
    """The tiles the GPU autotuner may pick (candidate i of each kernel, cycling), here under the interpreter:
    sequences crossing several tiles, partial tiles and the causal diagonal in both directions."""
    kernels = tsa_fast.kernels.attention
    configs = {
        kernels._attention_fwd_kernel: kernels.FWD_CONFIGS,
        kernels._attention_bwd_dkdv_kernel: kernels.DKDV_CONFIGS,
        kernels._attention_bwd_dq_kernel: kernels.DQ_CONFIGS,
    }
    blocks = {kernel: candidates[candidate % len(candidates)].kwargs for kernel, candidates in configs.items()}
    monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", blocks)
    for (n_q, n_k), causal in (((300, 300), True), ((170, 290), True), ((290, 170), False)):
        q, k, v = make_inputs(batch=1, heads=2, heads_kv=1, n_q=n_q, n_k=n_k, d=24)
        check_against_reference(q, k, v, causal=causal, key_padding_mask=padding_mask(1, n_k))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_through_the_autotuner(backend, monkeypatch, dtype):
    """The GPU's launch path, run here: Triton's autotuner prunes the candidates with this module's rule on the
    real arguments and launches each one it keeps 3 times before the winner runs (the kernels write their
    outputs, never add to them, so the repeats leave no trace)."""
    kernels = tsa_fast.kernels.attention
    tuned = (kernels._attention_fwd_kernel, kernels._attention_bwd_dkdv_kernel, kernels._attention_bwd_dq_kernel)
    monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", None)
    timed = autotune_under_interpreter(monkeypatch, *tuned)
    q, k, v = make_inputs(batch=1, heads=2, heads_kv=1, n_q=150, n_k=200, d=24, dtype=dtype)
    check_against_reference(q, k, v, causal=True, key_padding_mask=padding_mask(1, 200))
    assert {kernel.base_fn.__name__ for kernel in tuned} == set(timed)  # each tuned, on more than one candidate


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 2),
    heads_kv=st.integers(1, 2),
    group=st.integers(1, 3),
    n_q=st.integers(1, 80),
    n_k=st.integers(1, 80),
    d=st.integers(1, 72),
    d_v=st.integers(1, 72),
    causal=st.booleans(),
    masked=st.booleans(),
    half=st.booleans(),
)
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_property_random_shapes(backend, batch, heads_kv, group, n_q, n_k, d, d_v, causal, masked, half):
    dtype = torch.float16 if half else torch.float32
    q, k, v = make_inputs(batch, heads_kv * group, n_q, n_k, d, d_v, heads_kv, dtype=dtype)
    check_against_reference(q, k, v, causal=causal, key_padding_mask=padding_mask(batch, n_k) if masked else None)


@both_backends
def test_rows_without_keys_give_zeros_not_nan(backend):
    """Every key of batch row 1 padded, and causal N_q > N_k (the first rows see no key): zero outputs,
    lse -inf, zero and finite gradients."""
    q, k, v = make_inputs(n_q=40, n_k=25)
    mask = padding_mask(2, 25, fully_padded=(1,))
    out, lse, dq, dk, dv = check_against_reference(q, k, v, causal=True, key_padding_mask=mask)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf) and torch.all(out[0, :, :15] == 0)
    assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0) and torch.all(dv[1] == 0) and torch.all(dq[0, :, :15] == 0)
    assert all(x.isfinite().all() for x in (out, dq, dk, dv))


def poisoned_and_zeroed(mask, *tensors, value=math.nan):
    """Each (B, H, N, D) tensor with `value` at the positions `mask` (B, N) drops, and with 0 there."""
    padded = ~mask[:, None, :, None]
    return [x.masked_fill(padded, value) for x in tensors], [x.masked_fill(padded, 0.0) for x in tensors]


@pytest.mark.parametrize("backend", ["triton", "torch", "cpp"], indirect=True)  # cpp: the default, torch here
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_padded_key_and_value_slots_are_never_read(backend, causal, value):
    """NaN or inf in the keys and values of padded slots: the output, lse and gradients of the same inputs
    with zeros there (bit for bit), and zero gradients at the padded slots."""
    q, k, v = make_inputs(n_q=20, n_k=45, heads=4, heads_kv=2)
    mask = padding_mask(2, 45)
    (k_bad, v_bad), (k_zero, v_zero) = poisoned_and_zeroed(mask, k, v, value=value)
    grad_out, grad_lse = torch.randn(2, 4, 20, 32, device=DEVICE), torch.randn(2, 4, 20, device=DEVICE)
    options = dict(causal=causal, key_padding_mask=mask, return_lse=True)
    actual = outputs_and_grads(tsa_fast.attention, q, k_bad, v_bad, grad_out, grad_lse, **options)
    expected = outputs_and_grads(tsa_fast.attention, q, k_zero, v_zero, grad_out, grad_lse, **options)
    for a, e, what in zip(actual, expected, ("out", "lse", "dq", "dk", "dv")):
        assert torch.equal(a, e), what
    assert not actual[3].masked_select(~mask[:, None, :, None]).any()


@pytest.mark.parametrize("backend", ["triton", "torch", "cpp"], indirect=True)
@pytest.mark.parametrize("n_q", [45, 20], ids=["self-attention", "cross-attention"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_transfer_loss_never_reads_padded_slots(backend, n_q, causal):
    """tsa_fast.attention_transfer_loss with NaN in the padded keys of both models (and, in self-attention,
    in the padded positions' queries, whose rows do not count): the loss and gradients of zeros there."""
    q_s, k_s, q_t, k_t = (torch.randn(2, 3, n, 16, device=DEVICE) for n in (n_q, 45, n_q, 45))
    mask = padding_mask(2, 45)
    (k_s_bad, k_t_bad), (k_s_zero, k_t_zero) = poisoned_and_zeroed(mask, k_s, k_t)
    if n_q == 45:
        (q_s_bad, q_t_bad), (q_s_zero, q_t_zero) = poisoned_and_zeroed(mask, q_s, q_t)
    else:
        (q_s_bad, q_t_bad), (q_s_zero, q_t_zero) = (q_s, q_t), (q_s, q_t)
    results = []
    for inputs in ((q_s_bad, k_s_bad, q_t_bad, k_t_bad), (q_s_zero, k_s_zero, q_t_zero, k_t_zero)):
        student = [x.clone().requires_grad_() for x in inputs[:2]]
        loss = tsa_fast.attention_transfer_loss(*student, *inputs[2:], causal=causal, key_padding_mask=mask)
        results.append((loss, *torch.autograd.grad(loss, student)))
    for actual, expected, what in zip(*results, ("loss", "dq_s", "dk_s")):
        assert torch.equal(actual, expected), what


@both_backends
def test_non_contiguous_inputs(backend):
    """(B, N, H, D) transposed views, a slice of a wider head dim, a strided mask: strides, no copies."""
    q = torch.randn(2, 33, 4, 24, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 2, 40, 30, device=DEVICE)[..., 3:27]
    v = torch.randn(2, 40, 2, 16, device=DEVICE).transpose(1, 2)
    mask = padding_mask(2, 80)[:, ::2]
    check_against_reference(q, k, v, causal=True, key_padding_mask=mask)


@both_backends
def test_peaked_scores(backend):
    """A large scale: near one-hot rows stay finite and match."""
    q, k, v = make_inputs(n_q=40)
    results = check_against_reference(q, k, v, softmax_scale=4.0, causal=True)
    assert all(x.isfinite().all() for x in results)


@both_backends
def test_output_without_lse_and_no_grad(backend):
    q, k, v = make_inputs(n_q=30, heads=4, heads_kv=1)
    with torch.no_grad():
        out = tsa_fast.attention(q, k, v, causal=True)
    assert_rel_close(out, reference_attention(q.double(), k.double(), v.double(), causal=True), 1e-5, "out")


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_backward_is_deterministic(backend):
    q, k, v = (x.requires_grad_() for x in make_inputs(n_q=50, heads=4, heads_kv=2))
    grads = [torch.autograd.grad(tsa_fast.attention(q, k, v, causal=True).square().sum(), (q, k, v)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ---------------------------------------------------------------------------------------------------
# The torch backend: PyTorch's fused CPU flash attention where it applies, else chunks of query rows.


@pytest.fixture(params=["pytorch-flash", "chunked"])
def torch_path(request, monkeypatch):
    """The torch backend, on PyTorch's flash attention where it applies, or on the chunked path in 16-row
    chunks (several per test sequence) everywhere."""
    monkeypatch.setenv("TSA_FAST_BACKEND", "torch")
    if request.param == "chunked":
        monkeypatch.setattr(attention_op, "pytorch_flash_applies", lambda *args: False)
        monkeypatch.setattr(attention_op, "CHUNK_ELEMENTS", 1)
    return request.param


@pytest.mark.parametrize(
    "shape, options",
    [
        (dict(n_q=70), dict()),
        (dict(n_q=70), dict(causal=True)),
        (dict(n_q=45, n_k=70), dict(causal=True, key_padding_mask="mask")),
        (dict(n_q=70, n_k=37, d_v=24), dict(causal=True)),
        (dict(n_q=33, heads=4, heads_kv=2), dict(causal=True, key_padding_mask="left")),
        (dict(n_q=50, heads=3, heads_kv=1, dtype=torch.bfloat16), dict(key_padding_mask="mask", softmax_scale=0.3)),
        (dict(n_q=50, dtype=torch.float16), dict(causal=True)),
    ],
    ids=["plain", "causal", "causal-Nq<Nk-padding", "causal-Nq>Nk-Dv24", "GQA-causal-left-padding", "MQA-bf16", "fp16"],
)
@pytest.mark.parametrize("lse", ["lse-differentiated", "lse-unused"])
def test_torch_backend_paths(torch_path, shape, options, lse):
    """Both paths of the torch backend within the test rule of the float64 reference, with lse in the loss
    (the chunked backward) and without (PyTorch's flash backward where the forward ran it); left padding with
    causal leaves the first rows without a visible key."""
    q, k, v = make_inputs(**shape)
    if options.get("key_padding_mask") == "mask":
        options = dict(options, key_padding_mask=padding_mask(2, k.shape[2], fully_padded=(1,)))
    if options.get("key_padding_mask") == "left":
        options = dict(options, key_padding_mask=torch.arange(k.shape[2]) >= torch.tensor([[0], [9]]))
    if lse == "lse-differentiated":
        check_against_reference(q, k, v, **options)
        return
    grad_out = torch.randn(*q.shape[:3], v.shape[3])
    results = []
    for fn, inputs in ((tsa_fast.attention, (q, k, v)), (pytorch_attention, (q, k, v))):
        inputs = [x.detach().clone().requires_grad_() for x in inputs]
        out = fn(*inputs, **options)
        out = out[0] if isinstance(out, tuple) else out
        results.append((out, *torch.autograd.grad((out * grad_out.to(out.dtype)).sum(), inputs)))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    wanted = reference_attention(*leaves, **options)
    expected = (wanted, *torch.autograd.grad((wanted * grad_out.double()).sum(), leaves))
    for actual, torch_own, exact, what in zip(*results, expected, ("out", "dq", "dk", "dv")):
        assert_rel_close(actual, exact, 2 * rel_error(torch_own, exact) + ATOL[q.dtype], what)


MEMORY_SCRIPT = """
import sys, torch, tsa_fast
from benchmarks.common import cpu_peak_extra_bytes_of
torch.manual_seed(0)
n_q, n_k, lse_used = int(sys.argv[1]), 8192, sys.argv[2] == "lse"
banded = dict(window=(1024, -1), softcap=30.0) if sys.argv[3] == "banded" else {}
q = torch.randn(1, 2, n_q, 64, requires_grad=True)
k, v = (torch.randn(1, 2, n_k, 64, requires_grad=True) for _ in range(2))
mask = torch.rand(1, n_k) > 0.1

def step():
    out, lse = tsa_fast.attention(q, k, v, causal=True, key_padding_mask=mask, return_lse=True, **banded)
    (out.sum() + lse[lse.isfinite()].sum() if lse_used else out.sum()).backward()

step()
q.grad = k.grad = v.grad = None
print(cpu_peak_extra_bytes_of(step))
"""


@pytest.mark.parametrize(
    "n_q, lse, band",
    [(8192, "out", "plain"), (8192, "lse", "plain"), (4096, "out", "plain"), (8192, "out", "banded")],
    ids=["flash", "lse", "Nq<Nk", "window-softcap"],
)
def test_torch_backend_holds_no_n_by_n_scores(n_q, lse, band):
    """B=1, H=2, N_k=8192, causal with padding, forward + backward on the CPU (a fresh process, its resident
    memory sampled): PyTorch's flash attention (N_q = N_k, lse unused) and the chunked path (lse in the loss;
    N_q < N_k; a window of 1024 keys with a softcap) all peak under half of one N_q x N_k fp32 score map per
    head (256 MB at N_q = 8192), which the reference holds several of."""
    env = {name: value for name, value in os.environ.items() if name not in ("TRITON_INTERPRET", "TSA_FAST_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-c", MEMORY_SCRIPT, str(n_q), lse, band]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=300, check=True)
    peak = int(result.stdout.strip().splitlines()[-1])
    assert peak < 2 * n_q * 8192 * 4 / 2, f"{peak / 2**20:.0f} MB"


# ---------------------------------------------------------------------------------------------------
# scaled_dot_product_attention: a drop-in for PyTorch's.


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the forward kernel launches of the fused op."""
    calls = []
    forward = triton_kernels.attention_forward
    monkeypatch.setattr(triton_kernels, "attention_forward", lambda *a: calls.append(1) or forward(*a))
    return calls


def sdpa_output_and_grads(fn, query, key, value, **kwargs):
    query, key, value = (x.detach().clone().requires_grad_() for x in (query, key, value))
    out = fn(query, key, value, **kwargs)
    return (out, *torch.autograd.grad(out.square().sum(), (query, key, value)))


@both_backends
@pytest.mark.parametrize(
    "shape, kwargs",
    [
        (dict(), dict()),
        (dict(), dict(is_causal=True, scale=0.2)),
        (dict(n_k=50), dict(attn_mask="keys (B, 1, 1, N_k)")),
        (dict(n_k=50), dict(attn_mask="keys (1, N_k)")),
        (dict(n_k=50), dict(attn_mask="keys expanded (B, H, N_q, N_k)")),
        (dict(heads=4, heads_kv=2), dict(enable_gqa=True)),
    ],
    ids=["plain", "causal-scale", "mask-B11N", "mask-1N", "mask-expanded", "gqa"],
)
def test_sdpa_runs_the_kernel_and_matches_pytorch(backend, kernel_calls, shape, kwargs):
    q, k, v = make_inputs(**shape)
    mask = kwargs.get("attn_mask")
    if mask is not None:
        keep = padding_mask(2, k.shape[2])
        kwargs = dict(
            kwargs,
            attn_mask={
                "keys (B, 1, 1, N_k)": keep[:, None, None, :],
                "keys (1, N_k)": keep[:1],
                "keys expanded (B, H, N_q, N_k)": keep[:, None, None, :].expand(2, q.shape[1], q.shape[2], k.shape[2]),
            }[mask],
        )
    results = sdpa_output_and_grads(tsa_fast.scaled_dot_product_attention, q, k, v, **kwargs)
    expected = sdpa_output_and_grads(F.scaled_dot_product_attention, q, k, v, **kwargs)
    for actual, wanted, what in zip(results, expected, ("out", "dq", "dk", "dv")):
        assert_rel_close(actual, wanted, 1e-5, what)
    assert len(kernel_calls) == (backend == "triton")


@both_backends
def test_sdpa_key_mask_takes_this_path_and_never_reads_padded_slots(backend):
    """A key mask (as the engine's encoders pass it) runs this op's path on either backend (on the CPU the torch
    backend's, not PyTorch's SDPA, which would return NaN): NaN in padded keys and values gives PyTorch's result
    on zeros there, gradients included."""
    q, k, v = make_inputs(n_q=30, n_k=30, heads=4, heads_kv=2)
    keep = padding_mask(2, 30)
    (k_bad, v_bad), (k_zero, v_zero) = poisoned_and_zeroed(keep, k, v)
    kwargs = dict(attn_mask=keep[:, None, None, :], enable_gqa=True)
    actual = sdpa_output_and_grads(tsa_fast.scaled_dot_product_attention, q, k_bad, v_bad, **kwargs)
    expected = sdpa_output_and_grads(F.scaled_dot_product_attention, q, k_zero, v_zero, **kwargs)
    for a, e, what in zip(actual, expected, ("out", "dq", "dk", "dv")):
        assert_rel_close(a, e, 1e-5, what)


@both_backends
@pytest.mark.parametrize(
    "case",
    [
        "dropout",
        "float mask",
        "bool mask over queries",
        "1D bool mask",
        "causal Nq != Nk",
        "3D inputs",
        "float64",
        "head dim 320",
    ],
)
def test_sdpa_hands_the_rest_to_pytorch(backend, kernel_calls, case):
    """What the kernels do not cover gives exactly PyTorch's result (the same random dropout too)."""
    q, k, v = make_inputs(n_q=20, n_k=30, d=320 if case == "head dim 320" else 32)
    kwargs = {
        "dropout": dict(dropout_p=0.3),
        "float mask": dict(attn_mask=torch.randn(2, 1, 20, 30, device=DEVICE)),
        "bool mask over queries": dict(attn_mask=torch.rand(20, 30, device=DEVICE) > 0.3),
        "1D bool mask": dict(attn_mask=torch.rand(30, device=DEVICE) > 0.3),
        "causal Nq != Nk": dict(is_causal=True),
    }.get(case, {})
    if case == "3D inputs":
        q, k, v = q[0], k[0], v[0]
    if case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    results = []
    for fn in (tsa_fast.scaled_dot_product_attention, F.scaled_dot_product_attention):
        torch.manual_seed(1)
        try:
            results.append(fn(q, k, v, **kwargs))
        except Exception as error:  # PyTorch's own error, raised by both
            results.append(repr(error))
    assert (
        torch.equal(*results) if isinstance(results[0], torch.Tensor) else results[0] == results[1]
    ) and not kernel_calls


@pytest.fixture
def torch_sdpa_patched(monkeypatch):
    """torch.nn.functional.scaled_dot_product_attention replaced by tsa_fast's for the test (a global patch, as
    Liger-style patches do); returns PyTorch's own function. monkeypatch restores it afterwards."""
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", tsa_fast.scaled_dot_product_attention)
    return original


@both_backends
@pytest.mark.parametrize("case", ["kernel", "dropout", "float mask"])
def test_sdpa_patched_into_pytorch_falls_back_to_pytorchs_own(backend, kernel_calls, torch_sdpa_patched, case):
    """With PyTorch's name patched to the drop-in, what the kernels do not cover still reaches PyTorch's own
    function (captured at import), not the patched name (which would recurse forever)."""
    q, k, v = make_inputs(n_q=20, n_k=30)
    kwargs = {"dropout": dict(dropout_p=0.3), "float mask": dict(attn_mask=torch.randn(2, 1, 20, 30, device=DEVICE))}
    results = []
    for fn in (F.scaled_dot_product_attention, torch_sdpa_patched):
        torch.manual_seed(1)
        results.append(sdpa_output_and_grads(fn, q, k, v, **kwargs.get(case, {})))
    for actual, expected, what in zip(*results, ("out", "dq", "dk", "dv")):
        assert_rel_close(actual, expected, 0.0 if case != "kernel" else 1e-5, what)
    assert len(kernel_calls) == (backend == "triton" and case == "kernel")


@both_backends
def test_torch_multihead_attention_through_the_patched_sdpa(backend, torch_sdpa_patched, monkeypatch):
    """torch.nn.MultiheadAttention calls the patched name (its fast path with need_weights=False): the same
    output and gradients as with PyTorch's own SDPA."""
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).to(DEVICE)
    x = torch.randn(2, 19, 32, device=DEVICE)
    padded = torch.rand(2, 19, device=DEVICE) < 0.3
    results = []
    for sdpa in (tsa_fast.scaled_dot_product_attention, torch_sdpa_patched):
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        mha.zero_grad()
        out = mha(x, x, x, key_padding_mask=padded, need_weights=False)[0]
        out.square().sum().backward()
        results.append((out, mha.in_proj_weight.grad.clone()))
    for actual, expected, what in zip(*results, ("out", "in_proj_weight grad")):
        assert_rel_close(actual, expected, 1e-5, what)


@both_backends
@pytest.mark.parametrize(
    "kwargs",
    [dict(is_causal=1), dict(is_causal=None), dict(enable_gqa="yes"), dict(dropout_p="0"), dict(scale="0.1")],
    ids=str,
)
def test_sdpa_bad_option_types_raise_pytorchs_type_error(backend, kernel_calls, kwargs):
    """Options of the wrong type go to PyTorch, whose TypeError names them, never to the kernels."""
    q, k, v = make_inputs()
    with pytest.raises(TypeError) as expected:
        F.scaled_dot_product_attention(q, k, v, **kwargs)
    with pytest.raises(TypeError) as actual:
        tsa_fast.scaled_dot_product_attention(q, k, v, **kwargs)
    assert str(actual.value) == str(expected.value) and not kernel_calls


def test_sdpa_raises_pytorchs_errors():
    q, k, v = make_inputs(heads=4, heads_kv=2)
    with pytest.raises(RuntimeError) as expected:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError) as actual:
        tsa_fast.scaled_dot_product_attention(q, k, v)
    assert str(actual.value) == str(expected.value)


# ---------------------------------------------------------------------------------------------------
# torch.compile, float64, the reference itself.


@both_backends
def test_torch_compile_fullgraph(backend):
    """A compiled model calling the op (and the SDPA drop-in) traces without a graph break, forward and backward."""
    projection = torch.nn.Linear(32, 3 * 32).to(DEVICE)
    mask = padding_mask(2, 30)

    def model(x):
        q, k, v = projection(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        out = tsa_fast.attention(q, k, v, causal=True, key_padding_mask=mask)
        return out.square().sum() + tsa_fast.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    x = torch.randn(2, 30, 32, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, model):
        projection.zero_grad()
        loss = fn(x)
        loss.backward()
        grads.append((loss, projection.weight.grad.clone()))
    for (actual, expected), what in zip(zip(*grads), ("loss", "weight grad")):
        assert_rel_close(actual, expected, 1e-6, what)


def test_float64_uses_reference_and_gradchecks():
    q, k, v = (x.double().requires_grad_() for x in make_inputs(batch=1, heads=2, heads_kv=1, n_q=5, n_k=7, d=3))
    mask = torch.tensor([[True, False, True, True, True, False, True]])
    fn = lambda q, k, v: tsa_fast.attention(q, k, v, causal=True, key_padding_mask=mask, return_lse=True)  # noqa: E731
    assert [x.dtype for x in fn(q, k, v)] == [torch.float64, torch.float64]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_reference_matches_pytorch_in_float64():
    q, k, v = (x.double() for x in make_inputs(n_q=9, n_k=13, heads=4, heads_kv=2, d=5))
    mask = padding_mask(2, 13)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
    assert torch.allclose(reference_attention(q, k, v, key_padding_mask=mask), expected, rtol=1e-12, atol=1e-12)
    k, v = k[:, :, :9], v[:, :, :9]
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(reference_attention(q, k, v, causal=True), causal, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the bad value.


def _tensors(**shapes):
    """(q, k, v) of shape (2, 4, 8, 16), with overrides by name."""
    return [torch.randn(shapes.get(name, (2, 4, 8, 16))) for name in ("q", "k", "v")]


@pytest.mark.parametrize(
    "shapes, kwargs, error, match",
    [
        (dict(q=(2, 4, 8)), dict(), ValueError, r"q must be a non-empty \(B, H, N, D\) tensor, got shape \(2, 4, 8\)"),
        (dict(k=(2, 4, 0, 16), v=(2, 4, 0, 16)), dict(), ValueError, r"k must be a non-empty.*\(2, 4, 0, 16\)"),
        (
            dict(k=(2, 4, 9, 16)),
            dict(),
            ValueError,
            r"k, v must share H_kv and N_k: .*k \(2, 4, 9, 16\), v \(2, 4, 8, 16\)",
        ),
        (dict(q=(3, 4, 8, 16)), dict(), ValueError, r"must share B.*q \(3, 4, 8, 16\)"),
        (dict(k=(2, 4, 8, 12)), dict(), ValueError, r"q and k must share the head dim D: .*k \(2, 4, 8, 12\)"),
        (
            dict(k=(2, 3, 8, 16), v=(2, 3, 8, 16)),
            dict(),
            ValueError,
            "the 4 query heads must be a multiple of the 3 key/value heads",
        ),
        (dict(q=(2, 4, 8, 288), k=(2, 4, 8, 288)), dict(), ValueError, "head dims must be <= 256, got D=288, D_v=16"),
        (dict(v=(2, 4, 8, 300)), dict(), ValueError, "head dims must be <= 256, got D=16, D_v=300"),
        (dict(), dict(softmax_scale=0.0), ValueError, "softmax_scale.*0.0"),
        (dict(), dict(softmax_scale=math.inf), ValueError, "softmax_scale.*inf"),
        (dict(), dict(softmax_scale=-1), ValueError, "softmax_scale.*-1"),
        (dict(), dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a number, got '0.1'"),
        (dict(), dict(softmax_scale=True), TypeError, "softmax_scale must be a number, got True"),
        (dict(), dict(causal=1), TypeError, "causal must be a bool, got 1"),
        (dict(), dict(causal="no"), TypeError, "causal must be a bool, got 'no'"),
        (dict(), dict(return_lse=None), TypeError, "return_lse must be a bool, got None"),
        (dict(), dict(key_padding_mask=torch.ones(2, 8)), ValueError, "key_padding_mask must be bool.*torch.float32"),
        (
            dict(),
            dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)),
            ValueError,
            r"key_padding_mask must be \(B, N_k\) = \(2, 8\), got \(2, 7\)",
        ),
        (dict(), dict(key_padding_mask=torch.ones(2, 1, 1, 8, dtype=torch.bool)), ValueError, r"got \(2, 1, 1, 8\)"),
        (
            dict(),
            dict(key_padding_mask=[[True] * 8] * 2),
            TypeError,
            "key_padding_mask must be a torch.Tensor or None, got list",
        ),
        (
            dict(),
            dict(key_padding_mask=torch.ones(2, 8, dtype=torch.bool, device="meta")),
            ValueError,
            "key_padding_mask on meta",
        ),
    ],
)
def test_bad_input_raises(shapes, kwargs, error, match):
    with pytest.raises(error, match=match):
        tsa_fast.attention(*_tensors(**shapes), **kwargs)


def test_bad_tensors_raise():
    q, k, v = _tensors()
    with pytest.raises(TypeError, match="v must be a torch.Tensor, got list"):
        tsa_fast.attention(q, k, v.tolist())
    with pytest.raises(ValueError, match="k must be float32/float16/bfloat16/float64, got torch.int64"):
        tsa_fast.attention(q, k.long(), v)
    with pytest.raises(ValueError, match="q, k, v must share a dtype, got torch.float32, torch.float32, torch.float16"):
        tsa_fast.attention(q, k, v.half())
    with pytest.raises(ValueError, match="q on cpu but k on meta"):
        tsa_fast.attention(q, k.to("meta"), v)


def test_forced_cpp_backend_takes_the_default(monkeypatch):
    """No cpp kernel: a forced TSA_FAST_BACKEND=cpp (for the losses) leaves this op on its default backend."""
    tensors = _tensors()
    monkeypatch.delenv("TSA_FAST_BACKEND", raising=False)
    expected = tsa_fast.attention(*tensors)
    monkeypatch.setenv("TSA_FAST_BACKEND", "cpp")
    assert torch.equal(tsa_fast.attention(*tensors), expected)


# ---------------------------------------------------------------------------------------------------
# Compiled for GPUs without one: Triton ships ptxas.


def compile_attention_kernels():
    """Each kernel (its largest tile, bf16, head dim 80, causal, padding mask; the forward also with no option,
    and in fp32 at head dim 64) for sm_80 and sm_90, on contiguous inputs."""
    import triton

    kernels = tsa_fast.kernels.attention
    types = dict(
        mask_ptr="*i1", lse_ptr="*fp32", delta_ptr="*fp32", grad_lse_ptr="*fp32", sm_scale="fp32", softcap="fp32"
    )
    options = dict(CAUSAL=True, HAS_MASK=True, WINDOW=False, SOFTCAP=False, UPCAST=False, BLOCK_D=128, BLOCK_DV=128)
    options.update(VARLEN=False, cu_seqlens_q_ptr=None, cu_seqlens_k_ptr=None)  # packed: tests/test_attention_varlen.py
    for kernel, configs in (
        (kernels._attention_fwd_kernel, kernels.FWD_CONFIGS),
        (kernels._attention_bwd_dkdv_kernel, kernels.DKDV_CONFIGS),
        (kernels._attention_bwd_dq_kernel, kernels.DQ_CONFIGS),
    ):
        contiguous = unit_strides(kernel, ("d", "mask_n"))
        config = max(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        compile_for_gpus(kernel, config, dict(options, **contiguous), types)
        # Sliding window and softcap (the window with causal off: the launcher folds causal into it).
        compile_for_gpus(kernel, config, dict(options, CAUSAL=False, WINDOW=True, SOFTCAP=True, **contiguous), types)
        compile_for_gpus(kernel, config, dict(options, SOFTCAP=True, **contiguous), types)
        if kernel is kernels._attention_fwd_kernel:
            no_options = dict(options, CAUSAL=False, HAS_MASK=False, mask_ptr=None, **contiguous)
            compile_for_gpus(kernel, config, no_options, types)
            # fp32: full-precision dots on the CUDA cores (_prune: 64 x 64 tiles at most), head dim 64.
            fp32 = {name: "*fp32" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
            compile_for_gpus(
                kernel,
                triton.Config(dict(BLOCK_M=64, BLOCK_N=64), num_warps=4, num_stages=3),
                dict(options, BLOCK_D=64, BLOCK_DV=64, **contiguous),
                {**types, **fp32},
            )
    delta_blocks = dict(BLOCK_M=kernels.delta_rows(128), BLOCK_DV=128)
    contiguous = unit_strides(kernels._attention_bwd_delta_kernel, ("d",))
    compile_for_gpus(kernels._attention_bwd_delta_kernel, triton.Config(delta_blocks), contiguous, types)


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas")
def test_kernels_compile_for_ampere_and_hopper():
    run_compiled(__file__)


# ---------------------------------------------------------------------------------------------------
# GPU only (run by benchmarks/gpu.sh where a GPU is lent): bf16 / fp16 at model sizes, autotuned tiles.

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 96])
def test_gpu_model_sizes(backend, dtype, d):
    q, k, v = make_inputs(batch=2, heads=8, heads_kv=2, n_q=1000, n_k=1500, d=d, dtype=dtype)
    check_against_reference(q, k, v, causal=True, key_padding_mask=padding_mask(2, 1500))
    check_against_reference(q[:, :, :1], k, v)  # one query row: decoding


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_gpu_long_sequence_deterministic(backend):
    q, k, v = (x.requires_grad_() for x in make_inputs(batch=1, heads=4, n_q=4096, d=128, dtype=torch.bfloat16))
    grads = [
        torch.autograd.grad(tsa_fast.attention(q, k, v, causal=True).float().square().sum(), (q, k, v))
        for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    check_against_reference(q.detach(), k.detach(), v.detach(), causal=True)


# ---------------------------------------------------------------------------------------------------
# Sliding windows (FlashAttention's window_size, aligned bottom-right) and softcap (Gemma 2).


def pytorch_banded_attention(
    q, k, v, causal=False, softmax_scale=None, key_padding_mask=None, window=None, softcap=None
):
    """The test rule's yardstick for windows and softcap, in the inputs' dtype: `pytorch_attention` with the
    window folded into its bool mask; with a softcap (which SDPA lacks), eager attention (scores, tanh, masked
    softmax, as transformers' eager path)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    visible = visible_keys(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    if window is not None:
        visible = visible & window_band(q.shape[2], k.shape[2], window, q.device)
    has_key = visible.any(-1)
    group = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
    else:
        scores = softcap * torch.tanh(scores / softcap)
        weights = torch.softmax(scores.masked_fill(~visible, -torch.inf), dim=-1).nan_to_num(0.0)
        out = weights @ v.repeat_interleave(group, dim=1)
    lse = torch.logsumexp(scores.masked_fill(~(visible | ~has_key[..., None]), -torch.inf), dim=-1)
    return out, torch.where(has_key, lse, -torch.inf)


def check_banded(q, k, v, **options):
    """`check_against_reference` with the banded yardstick."""
    return check_against_reference(q, k, v, yardstick=pytorch_banded_attention, **options)


BANDED_CASES = {
    "left-only": (dict(n_q=70), dict(window=(9, -1))),
    "right-only": (dict(n_q=70), dict(window=(-1, 6))),
    "both-Nq<Nk": (dict(n_q=37, n_k=70), dict(window=(12, 5))),
    "both-Nq>Nk": (dict(n_q=70, n_k=37), dict(window=(8, 20))),
    "wider-than-sequence": (dict(n_q=45, n_k=40), dict(window=(100, 200))),
    "zero": (dict(n_q=50), dict(window=(0, 0))),
    "zero-Nq>Nk": (dict(n_q=60, n_k=35), dict(window=(0, 0))),
    "narrower-than-tiles": (dict(n_q=100), dict(window=(3, 2))),
    "causal-left": (dict(n_q=70), dict(causal=True, window=(16, -1))),
    "causal-overrides-right": (dict(n_q=70, n_k=90), dict(causal=True, window=(20, 10))),
    "unbounded-is-plain": (dict(n_q=40), dict(window=(-1, -1))),
    "GQA-padding": (dict(n_q=60, heads=4, heads_kv=2), dict(window=(10, 3), key_padding_mask="mask")),
    "MQA-causal-padding-Nq<Nk": (
        dict(n_q=45, n_k=80, heads=3, heads_kv=1),
        dict(causal=True, window=(25, -1), key_padding_mask="mask"),
    ),
    "multi-block-padding": (dict(batch=1, heads=1, n_q=150, n_k=130), dict(window=(40, 17), key_padding_mask="mask")),
    "softcap": (dict(n_q=70), dict(softcap=5.0)),
    "softcap-causal": (dict(n_q=70, n_k=50), dict(causal=True, softcap=0.5)),
    "softcap-GQA-causal-padding": (
        dict(n_q=45, heads=4, heads_kv=1),
        dict(causal=True, softcap=2.0, key_padding_mask="mask"),
    ),
    "softcap-window": (dict(n_q=40, n_k=90), dict(window=(20, 10), softcap=3.0)),
    "softcap-window-causal-GQA": (dict(n_q=64, heads=4, heads_kv=2), dict(causal=True, window=(15, -1), softcap=1.0)),
}


def banded_inputs(shape, options, dtype=torch.float32):
    q, k, v = make_inputs(**shape, dtype=dtype)
    if options.get("key_padding_mask") == "mask":
        batch = q.shape[0]
        options = dict(
            options, key_padding_mask=padding_mask(batch, k.shape[2], fully_padded=(1,) if batch > 1 else ())
        )
    return q, k, v, options


@both_backends
@pytest.mark.parametrize("case", BANDED_CASES.values(), ids=BANDED_CASES.keys())
def test_window_and_softcap_match_reference(backend, case):
    q, k, v, options = banded_inputs(*case)
    check_banded(q, k, v, **options)


@pytest.mark.parametrize("torch_path", ["chunked"], indirect=True)
@pytest.mark.parametrize("case", BANDED_CASES.values(), ids=BANDED_CASES.keys())
def test_torch_backend_window_and_softcap_in_chunks(torch_path, case):
    """The torch backend's chunked path (O(N) memory) with windows and softcaps in 16-row chunks, whose
    boundaries fall inside the bands (its own chunking: test_window_and_softcap_match_reference[torch])."""
    q, k, v, options = banded_inputs(*case)
    check_banded(q, k, v, **options)


@both_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_and_softcap_half_precision(backend, dtype):
    shape, options = dict(n_q=45, n_k=70, heads=4, heads_kv=2, d=40), dict(window=(12, 4), softcap=4.0)
    q, k, v, options = banded_inputs(shape, dict(options, key_padding_mask="mask"), dtype)
    check_banded(q, k, v, **options)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize(
    "fwd, dkdv, dq",
    [((16, 64), (64, 16), (16, 32)), ((64, 16), (16, 64), (64, 16))],
    ids=["narrow-rows", "narrow-keys"],
)
def test_window_other_tile_shapes(backend, monkeypatch, fwd, dkdv, dq):
    """Tiles longer along keys than queries and the reverse, against windows narrower and wider than them:
    the three runs (left edge masked, inside unmasked, right edge masked) meet at other boundaries."""
    kernels = tsa_fast.kernels.attention
    blocks = {
        kernels._attention_fwd_kernel: fwd,
        kernels._attention_bwd_dkdv_kernel: dkdv,
        kernels._attention_bwd_dq_kernel: dq,
    }
    monkeypatch.setattr(
        kernels, "INTERPRETER_BLOCKS", {kernel: dict(BLOCK_M=m, BLOCK_N=n) for kernel, (m, n) in blocks.items()}
    )
    for (n_q, n_k), window in (((100, 100), (5, 2)), ((70, 150), (40, 30)), ((150, 70), (70, -1))):
        q, k, v = make_inputs(batch=1, heads=2, heads_kv=1, n_q=n_q, n_k=n_k, d=24)
        check_banded(q, k, v, window=window, key_padding_mask=padding_mask(1, n_k))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_q=st.integers(1, 80),
    n_k=st.integers(1, 80),
    left=st.integers(-1, 90),
    right=st.integers(-1, 90),
    causal=st.booleans(),
    softcap=st.sampled_from([None, 0.7, 20.0]),
    masked=st.booleans(),
)
@both_backends
def test_property_random_windows(backend, n_q, n_k, left, right, causal, softcap, masked):
    q, k, v = make_inputs(batch=1, heads=2, heads_kv=1, n_q=n_q, n_k=n_k, d=24)
    mask = padding_mask(1, n_k) if masked else None
    check_banded(q, k, v, causal=causal, window=(left, right), softcap=softcap, key_padding_mask=mask)


@both_backends
def test_window_rows_without_keys_give_zeros_not_nan(backend):
    """A window (0, 0) with N_q > N_k: the first N_q - N_k rows have no key (their diagonal is before key 0)."""
    q, k, v = make_inputs(n_q=40, n_k=25)
    out, lse, dq, dk, dv = check_banded(q, k, v, window=(0, 0), softcap=2.0)
    assert torch.all(out[:, :, :15] == 0) and torch.all(lse[:, :, :15] == -math.inf) and torch.all(dq[:, :, :15] == 0)
    assert all(x.isfinite().all() for x in (dq, dk, dv))


def test_window_float64_gradchecks():
    q, k, v = (x.double().requires_grad_() for x in make_inputs(batch=1, heads=2, heads_kv=1, n_q=6, n_k=9, d=3))
    mask = torch.tensor([[True, False, True, True, True, False, True, True, True]])

    def fn(q, k, v):
        return tsa_fast.attention(q, k, v, window=(2, 1), softcap=1.5, key_padding_mask=mask, return_lse=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_reference_window_is_flash_attentions_band():
    """The reference's window, spelled out for (N_q, N_k) = (3, 5) (diagonal at j = i + 2) and window (1, 0)."""
    band = window_band(3, 5, (1, 0), "cpu")
    expected = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(band, expected)
    assert torch.equal(window_band(3, 5, (-1, 0), "cpu"), torch.ones(3, 5, dtype=torch.bool).tril(2))
    assert torch.equal(window_band(3, 5, (-1, -1), "cpu"), torch.ones(3, 5, dtype=torch.bool))


@both_backends
def test_torch_compile_fullgraph_window_softcap(backend):
    """The window and softcap options trace through the custom op without a graph break, forward and backward."""
    q, k, v = (x.requires_grad_() for x in make_inputs(batch=1, heads=2, n_q=30, d=16))

    def model(q, k, v):
        return tsa_fast.attention(q, k, v, causal=True, window=(7, -1), softcap=3.0).square().sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = [(fn(q, k, v), *torch.autograd.grad(fn(q, k, v), (q, k, v))) for fn in (compiled, model)]
    for actual, expected, what in zip(*results, ("loss", "dq", "dk", "dv")):
        assert_rel_close(actual, expected, 1e-6, what)


# Which tiles the kernels visit: the range helpers, launched the way the kernels call them.
if triton is not None:
    key_range = tsa_fast.kernels.attention._key_range
    query_range = tsa_fast.kernels.attention._query_range

    @triton.jit
    def _ranges_kernel(
        out_ptr,
        n_q,
        n_k,
        left,
        right,
        CAUSAL: tl.constexpr,
        WINDOW: tl.constexpr,
        KEYS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """out[block] = (first, full_lo, full_hi, end) of the forward / dq's key runs of query block `block` (KEYS),
        or of the dk, dv's query runs of key block `block`."""
        block = tl.program_id(0)
        if KEYS:
            first, full_lo, full_hi, end = key_range(
                block * BLOCK_M, n_q, n_k, left, right, CAUSAL, WINDOW, BLOCK_M, BLOCK_N
            )
        else:
            first, full_lo, full_hi, end = query_range(
                block * BLOCK_N, n_q, n_k, left, right, CAUSAL, WINDOW, BLOCK_M, BLOCK_N
            )
        tl.store(out_ptr + 4 * block, first)
        tl.store(out_ptr + 4 * block + 1, full_lo)
        tl.store(out_ptr + 4 * block + 2, full_hi)
        tl.store(out_ptr + 4 * block + 3, end)

    @triton.jit
    def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tsa_fast.kernels.utils.tanh(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


@pytest.mark.skipif(triton is None, reason="needs Triton")
def test_softcap_tanh_is_accurate_for_every_argument():
    """The softcap's tanh within 4 ulps (fp32) of float64 tanh from 1e-30 to 20 and at +-inf: a tanh taken as
    (1 - e) / (1 + e), e = exp(-2|x|), would lose most digits of small arguments (scores far below softcap)."""
    x = torch.cat([torch.logspace(-30, 1.3, 3000), torch.linspace(0.2, 0.3, 101), torch.tensor([math.inf])])
    x = torch.cat([x, -x, torch.zeros(1)]).float()
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = torch.tanh(x.double())
    assert torch.equal(y[-1:], torch.zeros(1)) and torch.equal(y.sign(), x.sign())
    ulps = (y.double() - expected).abs() / (expected.abs() * 2.0**-23).clamp_min(2.0**-149)  # relative / eps
    assert ulps.max() <= 4, f"{ulps.max():.1f} ulps at x = {x[ulps.argmax()]:.3e}"


def visited_tiles(n_q, n_k, causal, window, keys, block_m, block_n):
    """Per block, the tiles the kernel's loops visit, as {tile start: masked}, from the range helpers."""
    causal, windowed, left, right = tsa_fast.kernels.attention._band(n_q, n_k, causal, window)
    n_blocks = math.ceil((n_q / block_m) if keys else (n_k / block_n))
    ranges = torch.zeros(n_blocks, 4, dtype=torch.int32)
    _ranges_kernel[(n_blocks,)](
        ranges, n_q, n_k, left, right, CAUSAL=causal, WINDOW=windowed, KEYS=keys, BLOCK_M=block_m, BLOCK_N=block_n
    )
    step = block_n if keys else block_m
    visits = []
    for first, full_lo, full_hi, end in ranges.tolist():
        runs = ((first, full_lo, True), (full_lo, full_hi, False), (full_hi, end, True))
        visits.append({start: masked for lo, hi, masked in runs for start in range(lo, hi, step)})
        assert sum(len(range(lo, hi, step)) for lo, hi, _ in runs) == len(visits[-1]), "a tile visited twice"
    return visits


@pytest.mark.parametrize(
    "n_q, n_k, causal, window",
    [
        (256, 256, False, (16, 0)),
        (256, 256, False, (40, 40)),
        (200, 300, False, (-1, 20)),
        (300, 200, True, (50, -1)),
        (256, 256, True, (-1, -1)),
        (256, 256, False, (-1, -1)),
        (100, 100, False, (0, 0)),
        (90, 260, False, (1000, 1000)),
    ],
)
@pytest.mark.parametrize("keys, block_m, block_n", [(True, 32, 16), (True, 16, 64), (False, 16, 32), (False, 64, 16)])
@pytest.mark.skipif(triton is None, reason="needs Triton")
def test_tiles_outside_the_window_are_skipped(n_q, n_k, causal, window, keys, block_m, block_n):
    """The tiles each block's loops visit are exactly those holding a visible (query, key) pair (none hidden
    from every row is loaded: the work falls with the window), and the unmasked ones exactly those whose every
    pair (of rows < N_q, keys < N_k) is visible, for the forward / dq (key tiles per query block) and the
    dk, dv (query tiles per key block)."""
    band = window_band(n_q, n_k, window, "cpu") & visible_keys(n_q, n_k, causal, None, "cpu")[0, 0]
    size, step = (block_m, block_n) if keys else (block_n, block_m)
    grid = band if keys else band.T  # (blocks' dimension, visited dimension)
    visits = visited_tiles(n_q, n_k, causal, window, keys, block_m, block_n)
    for block, visited in enumerate(visits):
        part = grid[block * size : (block + 1) * size]
        tiles = [(start, part[:, start : start + step]) for start in range(0, grid.shape[1], step)]
        expected = {start: not bool(tile.all() and tile.shape[1] == step) for start, tile in tiles if tile.any()}
        if not keys:  # the dk, dv: rows past N_q add nothing, a row tile reaching N_q may skip the mask
            expected = {start: not bool(tile.all()) for start, tile in tiles if tile.any()}
        assert visited == expected, f"block {block}"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(window=(-2, 0)), ValueError, r"window must be \(left, right\) with each side >= 0, or -1.*\(-2, 0\)"),
        (dict(window=(3, -5)), ValueError, r"window.*\(3, -5\)"),
        (dict(window=(1, 2, 3)), ValueError, r"window.*\(1, 2, 3\)"),
        (dict(window=(4,)), ValueError, r"window.*\(4,\)"),
        (dict(window=4), TypeError, "window must be None or a pair of ints \\(left, right\\), got 4"),
        (dict(window=(4.0, 1)), TypeError, r"window must be None or a pair of ints.*\(4.0, 1\)"),
        (dict(window=(True, 1)), TypeError, r"window must be None or a pair of ints.*\(True, 1\)"),
        (dict(window="4,4"), TypeError, "window must be None or a pair of ints"),
        (dict(softcap=0.0), ValueError, "softcap must be None or a finite number > 0, got 0.0"),
        (dict(softcap=-1.0), ValueError, "softcap.*-1.0"),
        (dict(softcap=math.inf), ValueError, "softcap.*inf"),
        (dict(softcap=math.nan), ValueError, "softcap.*nan"),
        (dict(softcap="30"), TypeError, "softcap must be a number, got '30'"),
    ],
)
def test_bad_window_and_softcap_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        tsa_fast.attention(*_tensors(), **kwargs)


if __name__ == "__main__":  # test_kernels_compile_for_ampere_and_hopper
    compile_attention_kernels()
