"""`tsa_fast.attention_transfer_loss`: the three backends (triton, cpp on the CPU, torch) against the float64
reference that materializes the maps (loss and gradients), masks, relation heads, edges, errors, compile,
measured memory."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, assert_rel_close, compile_for_gpus, rel_error, run_compiled, unit_strides
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tsa_fast
from tsa_fast.reference.attention_transfer_loss import attention_transfer_loss as reference_loss
from tsa_fast.reference.attention_transfer_loss import relation_heads_split

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LOSS_ATOL = 1e-6  # per row: about 16 eps_fp32 x log N_k at the test sizes


def make_inputs(batch=2, heads=3, n_q=37, n_k=None, d_s=24, d_t=40, heads_t=None, dtype=torch.float32):
    """Student (q_s, k_s) (B, H, N, D_s) and teacher (q_t, k_t) (B, H_t, N, D_t) queries and keys."""
    n_k = n_q if n_k is None else n_k
    randn = lambda h, n, d: torch.randn(batch, h, n, d, device=DEVICE).to(dtype)  # noqa: E731
    heads_t = heads if heads_t is None else heads_t
    return randn(heads, n_q, d_s), randn(heads, n_k, d_s), 1.5 * randn(heads_t, n_q, d_t), randn(heads_t, n_k, d_t)


def padding_mask(batch, n_k, fully_padded=(1,)):
    """(B, N_k) bool, True = keep: about a third of the keys padded, the listed batch rows entirely."""
    mask = torch.rand(batch, n_k, device=DEVICE) > 0.35
    mask[list(fully_padded)] = False
    return mask


def loss_and_grads(fn, q_s, k_s, q_t, k_t, **options):
    """fn's loss and the gradients of w * loss (w random: backward scales) w.r.t. q_s and k_s."""
    q_s, k_s = (x.detach().clone().requires_grad_() for x in (q_s, k_s))
    loss = fn(q_s, k_s, q_t, k_t, **options)
    weight = torch.rand((), generator=torch.Generator().manual_seed(0), dtype=torch.float64).item() + 0.5
    return (loss, *torch.autograd.grad(loss * weight, (q_s, k_s)))


def check_against_reference(q_s, k_s, q_t, k_t, tol=TOL[torch.float32], grad_tol=None, **options):
    """Loss and gradients against the reference in float64 from the same input values, by the FlashAttention
    rule: the error may be tol plus twice the error of the fp32 reference (which computes in fp32 from the
    same inputs), plus, for the loss, LOSS_ATOL per row summed. A KL near 0 (close distributions, rows with
    2 keys) has an fp32 floor far above tol: one pass over the keys (Triton) rounds log-ratios taken
    against running sums, about eps x log N_k each."""
    results = loss_and_grads(tsa_fast.attention_transfer_loss, q_s, k_s, q_t, k_t, **options)
    expected = loss_and_grads(reference_loss, *(x.double() for x in (q_s, k_s, q_t, k_t)), **options)
    in_fp32 = loss_and_grads(reference_loss, q_s, k_s, q_t, k_t, **options)
    loss, dq, dk = results
    assert loss.dtype == torch.float32 and dq.dtype == q_s.dtype and dk.dtype == k_s.dtype
    heads = options.get("relation_heads") or q_s.shape[1]
    rows = q_s.shape[0] * heads * q_s.shape[2] if options.get("reduction") == "sum" else 1
    loss_atol = LOSS_ATOL * rows / max(expected[0].abs().item(), 1e-30)
    for actual, wanted, fp32, what in zip(results, expected, in_fp32, ("loss", "dq_s", "dk_s")):
        own_tol = tol + loss_atol if what == "loss" else grad_tol or tol
        assert_rel_close(actual, wanted, own_tol + 2 * rel_error(fp32, wanted), what)
    return results


@pytest.mark.parametrize(
    "shape, options",
    [
        (dict(), dict()),
        (dict(n_q=70, d_s=40, d_t=24), dict(reduction="sum")),
        (dict(n_q=70), dict(causal=True)),
        (dict(n_q=37, n_k=70), dict(causal=True)),
        (dict(n_q=70, n_k=37), dict(causal=True, reduction="sum")),
        (dict(n_q=70), dict(key_padding_mask="mask")),
        (dict(n_q=70), dict(key_padding_mask="mask", causal=True, reduction="sum")),
        (dict(n_q=37, n_k=70), dict(key_padding_mask="mask", causal=True)),
        (dict(n_q=20, n_k=45, d_s=16, d_t=16), dict(key_padding_mask="mask", scale_s=0.3, scale_t=2.0)),
        (dict(batch=1, heads=1, n_q=150, d_s=16, d_t=32), dict(causal=True, key_padding_mask="mask")),
        (dict(batch=1, heads=2, n_q=100, n_k=150, d_s=16, d_t=32), dict(causal=True)),
    ],
    ids=[
        "plain",
        "N70-sum",
        "causal",
        "causal-Nq<Nk",
        "causal-Nq>Nk-sum",
        "padding",
        "padding-causal-sum",
        "padding-causal-Nq<Nk",
        "scales",
        "multi-block-causal-padding",
        "multi-block-causal-Nq<Nk",
    ],
)
def test_matches_reference(backend, shape, options):
    q_s, k_s, q_t, k_t = make_inputs(**shape)
    if options.get("key_padding_mask") == "mask":
        batch = q_s.shape[0]
        options = dict(
            options, key_padding_mask=padding_mask(batch, k_s.shape[2], fully_padded=(1,) if batch > 1 else ())
        )
    check_against_reference(q_s, k_s, q_t, k_t, **options)


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("causal", [False, True])
def test_cpp_work_split(backend, causal):
    """The C++ forward splits heads into chunks of 256 query rows and each chunk into blocks of 16: N_q = 700
    (a partial chunk and block) against N_k = 650 and 1100 keys, with padding."""
    for n_k in (650, 1100):
        q_s, k_s, q_t, k_t = make_inputs(batch=2, heads=2, n_q=700, n_k=n_k, d_s=8, d_t=12)
        check_against_reference(q_s, k_s, q_t, k_t, causal=causal, key_padding_mask=padding_mask(2, n_k))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ kernels run on the CPU")
@pytest.mark.parametrize("threads", [1, 4])
def test_cpp_backward_on_any_thread_count(tmp_path, threads):
    """With fewer heads than threads the C++ backward splits a head's query rows into parts and sums their dk
    shares: one head on 4 OpenMP threads (4 parts) and on 1 (none), each in a fresh process, against the
    reference."""
    q_s, k_s, q_t, k_t = make_inputs(batch=1, heads=1, n_q=150, n_k=130)
    mask = padding_mask(1, 130, fully_padded=())
    torch.save((q_s, k_s, q_t, k_t, mask), tmp_path / "inputs.pt")
    script = (
        "import sys, torch, tsa_fast\n"
        "from test_attention_transfer_loss import loss_and_grads\n"
        "q_s, k_s, q_t, k_t, mask = torch.load(sys.argv[1])\n"
        "results = loss_and_grads("
        "tsa_fast.attention_transfer_loss, q_s, k_s, q_t, k_t, causal=True, key_padding_mask=mask)\n"
        "torch.save([x.detach() for x in results], sys.argv[2])\n"
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "TSA_FAST_BACKEND": "cpp",
        "TRITON_INTERPRET": "0",
        "PYTHONPATH": os.path.dirname(__file__),
    }
    subprocess.run(
        [sys.executable, "-c", script, tmp_path / "inputs.pt", tmp_path / "out.pt"], env=env, check=True, timeout=120
    )
    expected = loss_and_grads(
        reference_loss, *(x.double() for x in (q_s, k_s, q_t, k_t)), causal=True, key_padding_mask=mask
    )
    for actual, wanted, what in zip(torch.load(tmp_path / "out.pt"), expected, ("loss", "dq_s", "dk_s")):
        assert_rel_close(actual, wanted, TOL[torch.float32], what)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    """fp16/bf16 inputs, math in fp32; the reference computes in float64 from the same values."""
    q_s, k_s, q_t, k_t = make_inputs(n_q=45, n_k=70, dtype=dtype)
    mask = padding_mask(2, 70, fully_padded=())
    check_against_reference(q_s, k_s, q_t, k_t, grad_tol=TOL[dtype], causal=True, key_padding_mask=mask)


def test_mixed_model_dtypes(backend):
    q_s, k_s, q_t, k_t = make_inputs(n_q=33)
    check_against_reference(q_s, k_s, q_t.half(), k_t.half())


@pytest.mark.parametrize("options", [dict(), dict(causal=True, key_padding_mask="mask", reduction="sum")])
def test_relation_heads(backend, options):
    """MiniLM-v2: H_s * D_s = 3 * 24 and H_t * D_t = 2 * 40 split into 4 heads of 18 and 20 dims."""
    q_s, k_s, q_t, k_t = make_inputs(n_q=45, heads=3, d_s=24, heads_t=2, d_t=40)
    if options.get("key_padding_mask") == "mask":
        options = dict(options, key_padding_mask=padding_mask(2, 45))
    check_against_reference(q_s, k_s, q_t, k_t, relation_heads=4, **options)


@pytest.mark.parametrize("relation_heads, heads_t", [(8, 2), (None, 3)])
def test_value_relation_accumulates_gradient(backend, relation_heads, heads_t):
    """attention_transfer_loss(v_s, v_s, v_t, v_t): one tensor as queries and keys gets both gradients."""
    v_s, _, v_t, _ = make_inputs(n_q=50, heads=3, d_s=24, heads_t=heads_t, d_t=40)
    options = dict(relation_heads=relation_heads, key_padding_mask=padding_mask(2, 50, fully_padded=()))

    def loss_and_grad(fn, v_s, v_t):
        v = v_s.detach().clone().requires_grad_()
        loss = fn(v, v, v_t, v_t, **options)
        return loss, *torch.autograd.grad(loss, v)

    loss, grad = loss_and_grad(tsa_fast.attention_transfer_loss, v_s, v_t)
    expected_loss, expected_grad = loss_and_grad(reference_loss, v_s.double(), v_t.double())
    assert_rel_close(loss, expected_loss, TOL[torch.float32], "loss")
    assert_rel_close(grad, expected_grad, TOL[torch.float32], "dv_s")
    # The sum of the gradients of the same values passed as two tensors.
    q, k = (v_s.clone().requires_grad_() for _ in range(2))
    dq, dk = torch.autograd.grad(tsa_fast.attention_transfer_loss(q, k, v_t, v_t, **options), (q, k))
    assert_rel_close(grad, dq + dk, 1e-6, "dq + dk")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_masked_gives_zero_loss_and_grads(backend, reduction):
    q_s, k_s, q_t, k_t = make_inputs(n_q=20)
    mask = torch.zeros(2, 20, dtype=torch.bool, device=DEVICE)
    loss, dq, dk = loss_and_grads(
        tsa_fast.attention_transfer_loss, q_s, k_s, q_t, k_t, key_padding_mask=mask, reduction=reduction
    )
    assert loss.item() == 0.0 and torch.all(dq == 0) and torch.all(dk == 0)


def test_rows_without_keys_do_not_count(backend):
    """Causal with N_q > N_k: the first N_q - N_k rows see no key; the mean is over the other rows."""
    q_s, k_s, q_t, k_t = make_inputs(n_q=30, n_k=10)
    mean = tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t, causal=True)
    total = tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t, causal=True, reduction="sum")
    assert mean.isfinite() and torch.allclose(mean * (2 * 3 * 10), total, rtol=1e-6)


def test_padded_query_rows_do_not_count(backend):
    """Self-attention: the rows of padded positions do not count; cross lengths: the mask is keys only."""
    q_s, k_s, q_t, k_t = make_inputs(n_q=24)
    mask = torch.ones(2, 24, dtype=torch.bool, device=DEVICE)
    mask[:, 16:] = False
    mean = tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t, key_padding_mask=mask)
    total = tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t, key_padding_mask=mask, reduction="sum")
    kept = tsa_fast.attention_transfer_loss(*(x[:, :, :16] for x in (q_s, k_s, q_t, k_t)), reduction="sum")
    assert_rel_close(total, kept, TOL[torch.float32], "sum over kept rows")
    assert_rel_close(mean, total / (2 * 3 * 16), TOL[torch.float32], "mean over kept rows")
    # N_q != N_k: every query row that sees a key counts.
    q_s, q_t = q_s[:, :, :10], q_t[:, :, :10]
    mean = tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t, key_padding_mask=mask)
    total = tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t, key_padding_mask=mask, reduction="sum")
    assert_rel_close(mean, total / (2 * 3 * 10), TOL[torch.float32], "mean over all rows")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    n_q=st.integers(1, 80),
    n_k=st.integers(1, 80),
    d_s=st.integers(1, 48),
    d_t=st.integers(1, 48),
    causal=st.booleans(),
    masked=st.booleans(),
    half=st.booleans(),
)
@pytest.mark.parametrize("backend", ["triton", "cpp"], indirect=True)
def test_property_random_shapes(backend, batch, heads, n_q, n_k, d_s, d_t, causal, masked, half):
    dtype = torch.float16 if half else torch.float32
    q_s, k_s, q_t, k_t = make_inputs(batch, heads, n_q, n_k, d_s, d_t, dtype=dtype)
    mask = padding_mask(batch, n_k, fully_padded=()) if masked else None
    check_against_reference(q_s, k_s, q_t, k_t, grad_tol=TOL[dtype], causal=causal, key_padding_mask=mask)


def test_teacher_gets_no_gradient(backend):
    q_s, k_s, q_t, k_t = (x.requires_grad_() for x in make_inputs(n_q=20))
    tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t).backward()
    assert q_t.grad is None and k_t.grad is None and q_s.grad is not None and k_s.grad is not None


def test_no_grad_forward_matches(backend):
    q_s, k_s, q_t, k_t = make_inputs(n_q=40)
    with torch.no_grad():
        loss = tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t, causal=True)
    expected = reference_loss(*(x.double() for x in (q_s, k_s, q_t, k_t)), causal=True)
    assert_rel_close(loss, expected, TOL[torch.float32], "loss")


def test_non_contiguous_inputs(backend):
    """Queries as (B, N, H, D) transposed views and keys sliced from a wider head dim: strides, no copies."""
    q_s = torch.randn(2, 33, 3, 24, device=DEVICE).transpose(1, 2)
    k_s = torch.randn(2, 3, 33, 30, device=DEVICE)[..., 3:27]
    q_t = torch.randn(2, 33, 3, 40, device=DEVICE).transpose(1, 2)
    k_t = torch.randn(2, 3, 40, 33, device=DEVICE).transpose(2, 3)
    check_against_reference(q_s, k_s, q_t, k_t, causal=True)


def test_peaked_distributions(backend):
    """Large scales: near one-hot attention in both models stays finite and matches."""
    q_s, k_s, q_t, k_t = make_inputs(n_q=40)
    results = check_against_reference(q_s, k_s, q_t, k_t, scale_s=3.0, scale_t=8.0, causal=True)
    assert all(x.isfinite().all() for x in results)


def test_module_matches_functional(backend):
    q_s, k_s, q_t, k_t = make_inputs(n_q=20, heads=3, heads_t=2, d_t=36)
    mask = padding_mask(2, 20, fully_padded=())
    options = dict(causal=True, relation_heads=2, reduction="sum", scale_t=0.2)
    module = tsa_fast.nn.AttentionTransferLoss(**options)
    expected = tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t, key_padding_mask=mask, **options)
    assert torch.equal(module(q_s, k_s, q_t, k_t, mask), expected)
    assert "relation_heads=2" in repr(module) and "scale_s" not in repr(module)


def test_module_rejects_unknown_option():
    with pytest.raises(TypeError, match="relation_head"):
        tsa_fast.nn.AttentionTransferLoss(relation_head=4)


def test_torch_compile_fullgraph(backend):
    """A compiled caller traces the custom ops (forward and backward) without a graph break."""
    q_s, k_s, q_t, k_t = make_inputs(n_q=30, heads=3, heads_t=2, d_t=36)
    mask = padding_mask(2, 30, fully_padded=())

    def step(q_s, k_s, q_t, k_t):
        return (
            tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t, key_padding_mask=mask, causal=True, relation_heads=6)
            * 3.0
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for actual, expected, what in zip(
        loss_and_grads(compiled, q_s, k_s, q_t, k_t), loss_and_grads(step, q_s, k_s, q_t, k_t), ("loss", "dq_s", "dk_s")
    ):
        assert_rel_close(actual, expected, 1e-6, what)


def test_reference_is_kl_of_softmaxes():
    """The reference against torch's own KL of the two attention maps (no masks)."""
    q_s, k_s, q_t, k_t = (x.double() for x in make_inputs(n_q=9, d_s=5, d_t=7))
    log_a_s = torch.log_softmax(q_s @ k_s.transpose(-1, -2) / math.sqrt(5), -1)
    log_a_t = torch.log_softmax(q_t @ k_t.transpose(-1, -2) / math.sqrt(7), -1)
    expected = torch.nn.functional.kl_div(log_a_s, log_a_t, log_target=True, reduction="sum") / (2 * 3 * 9)
    assert torch.allclose(reference_loss(q_s, k_s, q_t, k_t), expected, rtol=1e-12)


def test_relation_heads_split():
    x = torch.arange(2 * 3 * 4 * 2).reshape(2, 3, 4, 2)  # (B, H, N, D)
    split = relation_heads_split(x, 2)
    assert split.shape == (2, 2, 4, 3)
    # Position 1 of batch 0: heads concatenated [h0 d0, h0 d1, h1 d0, ...], then cut into 2 heads of 3.
    concatenated = x[0, :, 1].reshape(-1)
    assert torch.equal(split[0, 0, 1], concatenated[:3]) and torch.equal(split[0, 1, 1], concatenated[3:])


def test_reference_gradcheck():
    q_s, k_s, q_t, k_t = (x.double() for x in make_inputs(batch=2, heads=1, n_q=4, n_k=6, d_s=3, d_t=5))
    mask = torch.tensor([[True, False, True, True, True, False], [False] * 6])
    q_s.requires_grad_(), k_s.requires_grad_()
    fn = lambda q, k: reference_loss(q, k, q_t, k_t, causal=True, key_padding_mask=mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q_s, k_s))


def test_float64_uses_reference_and_gradchecks():
    q_s, k_s, q_t, k_t = (x.double() for x in make_inputs(batch=1, heads=2, n_q=5, d_s=3, d_t=4))
    q_s.requires_grad_(), k_s.requires_grad_()
    fn = lambda q, k: tsa_fast.attention_transfer_loss(q, k, q_t, k_t, causal=True)  # noqa: E731
    assert fn(q_s, k_s).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (q_s, k_s))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU resident memory; the GPU benchmarks measure the allocator")
@pytest.mark.parametrize("backend", ["triton", "cpp"], indirect=True)
def test_peak_memory_is_linear_in_rows(backend):
    """Measured: at N=1024 the reference's N x N maps take tens of MB; the fused op (forward + backward)
    stays within a few times its O(B x H x N) row statistics and O(B x H x N x D) gradients, plus, for the
    C++ kernels, each thread's O(N x D) scratch (keys in fp32, a block of score rows, dk)."""
    from benchmarks.common import cpu_peak_extra_bytes_of

    batch, heads, n, head_dim = 1, 1, 1024, 32
    q_s, k_s, q_t, k_t = make_inputs(batch=batch, heads=heads, n_q=n, d_s=head_dim, d_t=head_dim)
    q_s.requires_grad_(), k_s.requires_grad_()
    mask = torch.ones(batch, n, dtype=torch.bool, device=DEVICE)

    def run(fn, *inputs):
        return lambda: fn(*inputs, causal=True, key_padding_mask=mask[:, : inputs[0].shape[2]]).backward()

    run(tsa_fast.attention_transfer_loss, *(x[:, :, :64] for x in (q_s, k_s, q_t, k_t)))()  # one-time allocations
    fused_peak = cpu_peak_extra_bytes_of(run(tsa_fast.attention_transfer_loss, q_s, k_s, q_t, k_t))
    reference_peak = cpu_peak_extra_bytes_of(run(reference_loss, q_s, k_s, q_t, k_t))
    map_bytes, linear_bytes = batch * heads * n * n * 4, batch * heads * n * (4 * 4 + 2 * head_dim * 4)
    # The C++ backward's fp32 scratch per thread: transposed keys of both models (2 D rows), row-major keys
    # and dk (2 D columns; D = 32 needs no padding), 3 x 16 rows of scores and dS, each of N (+ at most 48).
    scratch_bytes = len(os.sched_getaffinity(0)) * (4 * head_dim + 3 * 16) * (n + 48) * 4 if backend == "cpp" else 0
    print(f"peak extra: fused {fused_peak / 2**20:.2f} MB, reference {reference_peak / 2**20:.1f} MB")
    assert reference_peak > 3 * map_bytes  # the reference holds several N x N maps at once
    assert fused_peak < min(4 * linear_bytes + scratch_bytes + 2**20, reference_peak / 10)


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the bad value.


def _tensors(**shapes):
    """(q_s, k_s, q_t, k_t) of shape (2, 3, 8, 4), with overrides by name."""
    return [torch.randn(shapes.get(name, (2, 3, 8, 4))) for name in ("q_s", "k_s", "q_t", "k_t")]


@pytest.mark.parametrize(
    "shapes, kwargs, error, match",
    [
        (dict(), dict(reduction="none"), ValueError, r"reduction.*\('mean', 'sum'\).*'none'"),
        (dict(), dict(scale_s=0.0), ValueError, "scale_s.*0.0"),
        (dict(), dict(scale_t=math.inf), ValueError, "scale_t.*inf"),
        (dict(), dict(scale_s=-1), ValueError, "scale_s.*-1"),
        (dict(), dict(scale_t=math.nan), ValueError, "scale_t.*nan"),
        (dict(), dict(causal=1), TypeError, "causal must be a bool, got 1"),
        (dict(), dict(relation_heads=0), ValueError, "relation_heads.*0"),
        (dict(), dict(relation_heads=2.0), TypeError, "relation_heads.*2.0"),
        (
            dict(),
            dict(relation_heads=5),
            ValueError,
            r"relation_heads=5 must divide the student's H \* D = 3 \* 4 = 12",
        ),
        (
            dict(q_t=(2, 2, 8, 9), k_t=(2, 2, 8, 9)),
            dict(relation_heads=4),
            ValueError,
            "teacher's H \\* D = 2 \\* 9 = 18",
        ),
        (
            dict(q_t=(2, 4, 8, 4), k_t=(2, 4, 8, 4)),
            dict(),
            ValueError,
            "student has 3 heads and teacher 4: pass relation_heads",
        ),
        (
            dict(q_s=(2, 3, 8)),
            dict(),
            ValueError,
            r"q_s must be a non-empty \(B, H, N, D\) tensor, got shape \(2, 3, 8\)",
        ),
        (dict(k_t=(2, 3, 0, 4)), dict(), ValueError, r"k_t must be a non-empty.*\(2, 3, 0, 4\)"),
        (
            dict(k_s=(2, 3, 8, 5)),
            dict(),
            ValueError,
            r"q_s \(2, 3, 8, 4\) and k_s \(2, 3, 8, 5\) must share B, H and D",
        ),
        (dict(q_t=(2, 3, 7, 4)), dict(), ValueError, r"share B, N_q, N_k.*q_t \(2, 3, 7, 4\)"),
        (dict(k_t=(1, 3, 8, 4), q_t=(1, 3, 8, 4)), dict(), ValueError, "share B, N_q, N_k"),
        (dict(), dict(key_padding_mask=torch.ones(2, 8)), ValueError, "key_padding_mask must be bool.*torch.float32"),
        (
            dict(),
            dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)),
            ValueError,
            r"key_padding_mask must be \(B, N_k\) = \(2, 8\), got \(2, 7\)",
        ),
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
        tsa_fast.attention_transfer_loss(*_tensors(**shapes), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(causal="no"), "causal must be a bool, got 'no'"),
        (dict(causal=None), "causal must be a bool, got None"),
        (dict(scale_s="0.5"), "scale_s must be a number, got '0.5'"),
        (dict(scale_t=True), "scale_t must be a number, got True"),
        (dict(relation_heads="2"), "relation_heads must be an int, got '2'"),
        (dict(reduction=None), "reduction must be one of .*, got None"),
    ],
)
def test_wrong_option_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        tsa_fast.attention_transfer_loss(*_tensors(), **kwargs)


def test_bad_tensors_raise():
    q_s, k_s, q_t, k_t = _tensors()
    with pytest.raises(TypeError, match="k_t must be a torch.Tensor, got list"):
        tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t.tolist())
    with pytest.raises(ValueError, match="q_t must be float32/float16/bfloat16/float64, got torch.int64"):
        tsa_fast.attention_transfer_loss(q_s, k_s, q_t.long(), k_t)
    with pytest.raises(ValueError, match="q_s and k_s must share a dtype, got torch.float32 and torch.float16"):
        tsa_fast.attention_transfer_loss(q_s, k_s.half(), q_t, k_t)
    with pytest.raises(ValueError, match="q_s on cpu but k_t on meta"):
        tsa_fast.attention_transfer_loss(q_s, k_s, q_t, k_t.to("meta"))


def test_default_backend_is_a_kernel(monkeypatch):
    """Unforced, fp32/fp16/bf16 run a fused kernel: the C++ one on the CPU, Triton on CUDA."""
    monkeypatch.delenv("TSA_FAST_BACKEND", raising=False)
    from tsa_fast.ops.attention_transfer_loss import kernel_backend

    q = torch.randn(1, 1, 4, 8, device=DEVICE)
    assert kernel_backend(q, q) == ("cpp" if DEVICE.type == "cpu" else "triton")
    assert kernel_backend(q, q.double()) == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forced_cpp_backend_on_cuda_takes_triton(monkeypatch):
    """A forced TSA_FAST_BACKEND=cpp (for the losses' CUDA kernels) leaves CUDA tensors on Triton."""
    tensors = [x.cuda() for x in _tensors()]
    monkeypatch.delenv("TSA_FAST_BACKEND", raising=False)
    expected = tsa_fast.attention_transfer_loss(*tensors)
    monkeypatch.setenv("TSA_FAST_BACKEND", "cpp")
    assert torch.equal(tsa_fast.attention_transfer_loss(*tensors), expected)


# ---------------------------------------------------------------------------------------------------
# Non-finite teacher inputs: NaN propagates, on every backend alike.


@pytest.mark.parametrize("case", ["nan_query", "inf_key", "minus_inf_row"])
def test_non_finite_teacher_gives_nan(backend, case):
    """A NaN or +inf teacher score, or a row whose teacher scores are all -inf, makes the loss NaN and the
    gradients NaN where that row reaches them (the rows' own dq_s, the keys' dk_s), as PyTorch's math does."""
    q_s, k_s, q_t, k_t = make_inputs(n_q=20, d_s=16, d_t=16)
    if case == "nan_query":
        q_t[0, 1, 3, 2] = math.nan
    elif case == "inf_key":
        q_t[1, 0] = q_t[1, 0].abs()
        k_t[1, 0, 5] = math.inf  # every score against key 5 is +inf
    else:
        q_t[0, 2, 7, 0], k_t[0, 2, :, 0] = -math.inf, 1.0  # row 7's teacher scores are all -inf
    loss, dq, dk = loss_and_grads(tsa_fast.attention_transfer_loss, q_s, k_s, q_t, k_t)
    _, expected_dq, expected_dk = loss_and_grads(reference_loss, *(x.double() for x in (q_s, k_s, q_t, k_t)))
    assert loss.isnan()
    for actual, expected, what in ((dq, expected_dq, "dq_s"), (dk, expected_dk, "dk_s")):
        assert expected.isnan().any() and not expected.isnan().all(), what
        assert torch.equal(actual.isnan(), expected.isnan()), what


# ---------------------------------------------------------------------------------------------------
# Compiled for GPUs without one: Triton ships ptxas.


def compile_attention_transfer_kernels():
    """The three kernels with the launcher's tiles for head dims (64, 80) and (256, 256), bf16, causal, padding
    mask (and (64, 80) with neither, and in fp32), on contiguous inputs, for sm_80 and sm_90."""
    import triton

    from tsa_fast.kernels import attention_transfer_loss as kernels

    types = dict(
        mask_ptr="*i1",
        kl_ptr="*fp32",
        lse_s_ptr="*fp32",
        lse_t_ptr="*fp32",
        w_ptr="*fp32",
        scale_s="fp32",
        scale_t="fp32",
    )
    tensors = ("q_s_ptr", "k_s_ptr", "q_t_ptr", "k_t_ptr", "dq_ptr", "dk_ptr")
    mask = torch.empty(1, 4096, dtype=torch.bool, device="meta")
    cases = (
        (64, 80, (mask, True), "*bf16"),
        (256, 256, (mask, True), "*bf16"),
        (64, 80, (None, False), "*bf16"),
        (64, 80, (mask, True), "*fp32"),
    )
    for d_s, d_t, options, dtype in cases:
        q_s, q_t = torch.empty(1, 1, 4096, d_s, device="meta"), torch.empty(1, 1, 4096, d_t, device="meta")
        _, meta, _ = kernels._launch_args(q_s, q_s, q_t, q_t, *options, 1.0, 1.0)
        blocks = {name: meta.pop(name) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_DS", "BLOCK_DT")}
        config = triton.Config(blocks, num_warps=meta.pop("num_warps"))
        for kernel in (
            kernels._attention_transfer_fwd_kernel,
            kernels._attention_transfer_bwd_dq_kernel,
            kernels._attention_transfer_bwd_dk_kernel,
        ):
            constants = dict(meta, **unit_strides(kernel, ("_d", "mask_n")))
            if not meta["HAS_MASK"]:
                constants["mask_ptr"] = None  # as launched without a mask
            if kernel is kernels._attention_transfer_fwd_kernel:
                constants["QUERY_PADDING"] = meta["HAS_MASK"]
            compile_for_gpus(kernel, config, constants, {**types, **dict.fromkeys(tensors, dtype)})


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas")
def test_kernels_compile_for_ampere_and_hopper():
    run_compiled(__file__)


# ---------------------------------------------------------------------------------------------------
# GPU only (run by benchmarks/gpu.sh where a GPU is lent): bf16 / fp16 at model sizes, on the tensor cores.

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_model_sizes(backend, dtype):
    q_s, k_s, q_t, k_t = make_inputs(batch=2, heads=12, n_q=1000, d_s=64, heads_t=16, d_t=80, dtype=dtype)
    mask = padding_mask(2, 1000, fully_padded=())
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]  # 16-bit: dS rounded for the dot
    check_against_reference(q_s, k_s, q_t, k_t, tol=tol, causal=True, key_padding_mask=mask, relation_heads=8)


if __name__ == "__main__":  # test_kernels_compile_for_ampere_and_hopper
    compile_attention_transfer_kernels()
