"""`tsa_fast.fused_linear_distillation_loss`: against `distillation_loss` on materialized logits and
against the float64 reference, for the three teacher forms; memory measured, errors named."""

import importlib
import sys

import pytest
import torch
from conftest import (
    DEVICE,
    assert_rel_close,
    autotune_under_interpreter,
    compile_for_gpus,
    rel_error,
    run_compiled,
    unit_strides,
)

import tsa_fast
from tsa_fast.backends import available_backends, triton_kernels
from tsa_fast.ops.fused_linear_distillation_loss import default_chunk_size
from tsa_fast.reference.distillation_loss import DIVERGENCES
from tsa_fast.reference.fused_linear_distillation_loss import fused_linear_distillation_loss as reference_loss

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
# bf16 and model sizes: GPU only, run by benchmarks/gpu.sh (`-m gpu`).
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_problem(
    rows=12,
    hidden=16,
    teacher_hidden=24,
    vocab=70,
    *,
    bias=True,
    ignore="some",
    teacher="hidden",
    topk=9,
    temperature=1.0,
    dtype=torch.float32,
    device=DEVICE,
):
    """Student tensors (requires_grad), teacher keyword arguments, labels."""
    student = dict(
        student_hidden=torch.randn(rows, hidden, device=device, dtype=dtype),
        student_weight=(torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype),
    )
    if bias:
        student["student_bias"] = torch.randn(vocab, device=device, dtype=dtype)
    teacher_hidden_states = torch.randn(rows, teacher_hidden, device=device, dtype=dtype)
    teacher_weight = (2 * torch.randn(vocab, teacher_hidden, device=device) / teacher_hidden**0.5).to(dtype)
    if teacher == "hidden":
        teachers = dict(teacher_hidden=teacher_hidden_states, teacher_weight=teacher_weight)
        if bias:
            teachers["teacher_bias"] = torch.randn(vocab, device=device, dtype=dtype)
    else:
        logits = (teacher_hidden_states.float() @ teacher_weight.float().T).to(dtype)
        if teacher == "logits":
            teachers = dict(teacher_logits=logits)
        else:
            logprobs, indices = torch.log_softmax(logits.float() / temperature, -1).topk(topk, -1)
            teachers = dict(teacher_topk=(indices, logprobs))
    labels = torch.randint(0, vocab, (rows,), device=device)
    if ignore == "some":
        labels[torch.rand(rows, device=device) < 0.35] = -100
    elif ignore == "all":
        labels.fill_(-100)
    return student, teachers, labels


def loss_and_grads(fn, student, teachers, labels, **options):
    """fn's loss and the gradients of sum(w * loss) for the student tensors, w random (backward scaling)."""
    student = {k: v.detach().clone().requires_grad_() for k, v in student.items()}
    loss = fn(labels=labels, **student, **teachers, **options)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(loss)
    grads = torch.autograd.grad((loss * weights).sum(), list(student.values()))
    return loss, dict(zip(student, grads))


def check_against_reference(student, teachers, labels, tol, **options):
    loss, grads = loss_and_grads(tsa_fast.fused_linear_distillation_loss, student, teachers, labels, **options)
    as64 = lambda x: x.double() if x.is_floating_point() else x  # noqa: E731
    teachers64 = {k: tuple(map(as64, v)) if isinstance(v, tuple) else as64(v) for k, v in teachers.items()}
    student64 = {k: v.double() for k, v in student.items()}
    options64 = {k: v for k, v in options.items() if k != "chunk_size"}
    ref_loss, ref_grads = loss_and_grads(reference_loss, student64, teachers64, labels, **options64)
    assert loss.dtype == torch.float32
    assert_rel_close(loss, ref_loss, tol, "loss")
    for name, grad in grads.items():
        assert grad.dtype == student[name].dtype, name
        grad_tol = max(tol, 1e-4) if options.get("divergence") == "tvd" else tol  # TVD: ties may flip
        assert_rel_close(grad, ref_grads[name], grad_tol, f"grad {name}")
    return loss, grads


@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_matches_reference(backend, teacher, divergence, ignore):
    student, teachers, labels = make_problem(teacher=teacher, ignore=ignore, temperature=2.0)
    check_against_reference(
        student,
        teachers,
        labels,
        TOL[torch.float32],
        divergence=divergence,
        temperature=2.0,
        hard_weight=0.3,
        chunk_size=5,
    )


@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 12, 100, None])
@pytest.mark.parametrize("reduction", ["mean", "none", "batchmean"])
def test_chunking_and_bias(backend, teacher, bias, chunk_size, reduction):
    student, teachers, labels = make_problem(teacher=teacher, bias=bias)
    check_against_reference(
        student,
        teachers,
        labels,
        TOL[torch.float32],
        chunk_size=chunk_size,
        reduction=reduction,
        divergence="symmetric_kl",
    )


@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
def test_fp16(backend, teacher):
    student, teachers, labels = make_problem(teacher=teacher, dtype=torch.float16)
    check_against_reference(
        student, teachers, labels, TOL[torch.float16], divergence="jsd", hard_weight=0.5, chunk_size=4
    )


@pytest.mark.parametrize("fold_rows, chunk_size", [(7, 3), (2, 5), (1000, 4)])
def test_fp16_weight_gradient_folds(backend, monkeypatch, fold_rows, chunk_size):
    """fp16 weights: the logit gradients of several chunks are folded into the pair at once; folds of 2
    chunks with a partial last one (12 rows in chunks of 3), one chunk per fold, and a single fold."""
    monkeypatch.setattr(sys.modules["tsa_fast.ops.fused_linear_distillation_loss"], "PAIR_FOLD_ROWS", fold_rows)
    student, teachers, labels = make_problem(dtype=torch.float16)
    check_against_reference(student, teachers, labels, TOL[torch.float16], reduction="sum", chunk_size=chunk_size)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_distillation_loss_on_materialized_logits(backend, divergence):
    """Where both apply, the fused op and `distillation_loss` give the same loss and gradients."""
    student, teachers, labels = make_problem(teacher="logits", rows=10)
    options = dict(divergence=divergence, temperature=1.5, hard_weight=0.2, softcap=20.0, label_smoothing=0.1)

    def materialized(student_hidden, student_weight, student_bias, teacher_logits, labels=None, **options):
        logits = student_hidden @ student_weight.T + student_bias
        return tsa_fast.distillation_loss(logits, teacher_logits, labels, **options)

    loss, grads = loss_and_grads(
        tsa_fast.fused_linear_distillation_loss, student, teachers, labels, chunk_size=3, **options
    )
    expected_loss, expected_grads = loss_and_grads(materialized, student, teachers, labels, **options)
    assert_rel_close(loss, expected_loss, 1e-6, "loss")
    for name in grads:
        assert_rel_close(grads[name], expected_grads[name], 1e-5, name)


def test_topk_matches_dense_bucket_reference(backend):
    """Top-k with tail against the same k tokens + tail written densely: a (k+1)-way distribution."""
    student, teachers, labels = make_problem(teacher="topk", topk=5, ignore="none", vocab=40)
    indices, logprobs = teachers["teacher_topk"]
    loss = tsa_fast.fused_linear_distillation_loss(
        student["student_hidden"],
        student["student_weight"],
        student_bias=student["student_bias"],
        teacher_topk=(indices, logprobs),
        reduction="none",
    )
    logits = (student["student_hidden"] @ student["student_weight"].T + student["student_bias"]).double()
    q = torch.softmax(logits, -1)
    q_top = q.gather(-1, indices)
    student_buckets = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    p_top = logprobs.double().exp()
    teacher_buckets = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    expected = (teacher_buckets * (teacher_buckets / student_buckets).log()).sum(-1)
    assert_rel_close(loss, expected, 1e-5, "loss")


def test_topk_with_k_equal_vocab_is_the_dense_loss(backend):
    student, teachers, labels = make_problem(teacher="logits", vocab=24)
    logprobs, indices = torch.log_softmax(teachers["teacher_logits"], -1).topk(24, -1)
    common = dict(labels=labels, student_bias=student["student_bias"], divergence="reverse_kl")
    topk = tsa_fast.fused_linear_distillation_loss(
        student["student_hidden"], student["student_weight"], teacher_topk=(indices, logprobs), **common
    )
    dense = tsa_fast.fused_linear_distillation_loss(
        student["student_hidden"], student["student_weight"], **teachers, **common
    )
    assert_rel_close(topk, dense, 1e-5, "loss")


def test_leading_dims_and_module(backend):
    student, teachers, labels = make_problem(rows=12)
    module = tsa_fast.nn.FusedLinearDistillationLoss(chunk_size=5, divergence="tvd", reduction="none")
    reshaped = {k: v.reshape(3, 4, -1) for k, v in teachers.items() if k == "teacher_hidden"}
    loss = module(
        student["student_hidden"].reshape(3, 4, -1),
        student["student_weight"],
        reshaped["teacher_hidden"],
        teachers["teacher_weight"],
        labels.reshape(3, 4),
        student_bias=student["student_bias"],
        teacher_bias=teachers["teacher_bias"],
    )
    flat = tsa_fast.fused_linear_distillation_loss(
        **student, **teachers, labels=labels, divergence="tvd", reduction="none"
    )
    assert loss.shape == (3, 4)
    assert_rel_close(loss.reshape(-1), flat, 1e-6, "loss")
    assert "chunk_size=5" in repr(module)


def test_bf16_weight_gradient_rounds_once():
    """bf16 hidden states and weights: logits are fp32 and the weight gradient sums its chunks as a
    compensated bf16 pair, so with a unit incoming gradient it is the float64 gradient rounded once to
    bf16 (one more rounding for another incoming gradient), far below rounding the logits to bf16 first."""
    student, teachers, labels = make_problem(
        rows=64, hidden=64, teacher_hidden=64, vocab=512, dtype=torch.bfloat16, bias=False
    )
    student["student_hidden"] = student["student_hidden"] * 4
    options = dict(divergence="forward_kl", temperature=1.0)

    def bf16_logits(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, **options):
        logits = student_hidden @ student_weight.T
        return tsa_fast.distillation_loss(logits, teacher_hidden @ teacher_weight.T, labels, **options)

    def weight_grad(fn, student, teachers, scale=1.0, **chunking):
        student = {k: v.detach().clone().requires_grad_() for k, v in student.items()}
        loss = fn(**student, **teachers, labels=labels, **options, **chunking)
        return torch.autograd.grad(loss * scale, [student["student_weight"]])[0]

    as64 = lambda tensors: {k: v.double() for k, v in tensors.items()}  # noqa: E731
    expected = weight_grad(reference_loss, as64(student), as64(teachers))
    error = lambda g: ((g.double() - expected).norm() / expected.norm()).item()  # noqa: E731
    floor = error(expected.to(torch.bfloat16))
    fused = error(weight_grad(tsa_fast.fused_linear_distillation_loss, student, teachers, chunk_size=16))
    scaled = error(
        weight_grad(tsa_fast.fused_linear_distillation_loss, student, teachers, 0.3, chunk_size=16).double() / 0.3
    )
    naive = error(weight_grad(bf16_logits, student, teachers))
    print(
        f"grad_weight relative error vs float64: fused {fused:.2e} (bf16 rounding of float64 {floor:.2e}; "
        f"incoming gradient 0.3: {scaled:.2e}), bf16 logits {naive:.2e}"
    )
    assert fused < 1.1 * floor
    assert scaled < 2.5 * floor
    assert naive > 3 * scaled


@pytest.mark.skipif(triton_kernels is None, reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=[gpu, pytest.mark.gpu])])
def test_weight_grad_pair_kernel(dtype):
    """The Triton kernel that sums a low-precision weight gradient over chunks as a compensated pair: the
    pair holds the float64 sum to ~2x the dtype's bits, and `high` is that sum rounded once. Shapes cross
    partial tiles; the chunks have very different scales (small updates are not lost)."""
    check_weight_grad_pair_kernel(dtype, vocab=77, hidden_size=45, rows=37)


@pytest.mark.skipif(triton_kernels is None, reason="needs Triton")
@pytest.mark.parametrize("candidate", range(4))
def test_weight_grad_pair_kernel_candidate_tiles(monkeypatch, candidate):
    """The same with the tiles the GPU autotuner may pick (here under the interpreter), on shapes that cross
    several of them and partial ones in each dimension."""
    candidates = triton_kernels.fused_linear_distillation_loss.CONFIGS
    monkeypatch.setattr(
        triton_kernels.fused_linear_distillation_loss, "INTERPRETER_BLOCKS", candidates[candidate].kwargs
    )
    check_weight_grad_pair_kernel(torch.float16, vocab=300, hidden_size=150, rows=100)


@pytest.mark.skipif(triton_kernels is None, reason="needs Triton")
def test_weight_grad_pair_kernel_through_the_autotuner(monkeypatch):
    """On a GPU the first launch for a (V, H, dtype) autotunes, launching every candidate again and again on
    the real pair, which the kernel adds to in place: those launches must leave no trace. Run here through
    Triton's autotuner under the interpreter, each candidate launched 3 times."""
    kernels = triton_kernels.fused_linear_distillation_loss
    monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", None)
    timed = autotune_under_interpreter(monkeypatch, kernels._weight_grad_accumulate_kernel)
    check_weight_grad_pair_kernel(torch.float16, vocab=300, hidden_size=150, rows=100)
    assert len(timed) == len(kernels.CONFIGS)  # tuned once, every candidate timed


def check_weight_grad_pair_kernel(dtype, vocab: int, hidden_size: int, rows: int) -> None:
    high = torch.zeros(vocab, hidden_size, device=DEVICE, dtype=dtype)
    low = torch.zeros_like(high)
    expected = torch.zeros(vocab, hidden_size, dtype=torch.float64)
    for scale in (1.0, 1e-3, 1e-3, 1e-3, 1e-2):
        # The logit gradient in the weight's dtype, as the op queues it on CUDA (an fp32 one would be rounded to
        # it for the tensor cores on a GPU, and that rounding, not the pair, would be measured).
        grad = (torch.randn(rows, vocab, device=DEVICE) * scale).to(dtype)
        hidden = torch.randn(rows, 2 * hidden_size, device=DEVICE, dtype=dtype)[:, ::2]  # strided
        triton_kernels.weight_grad_accumulate(high, low, grad, hidden)
        expected += grad.double().cpu().T @ hidden.double().cpu()
    pair = high.double() + low.double()
    bits = {torch.float16: 21, torch.bfloat16: 15}[dtype]
    assert_rel_close(pair, expected, 2.0**-bits, "high + low")
    floor = rel_error(expected.to(dtype), expected)
    assert rel_error(high, expected) <= 1.01 * floor


def compile_pair_kernel():
    """Every autotuning config of the pair kernel as the op launches it on a GPU: contiguous bf16 / fp16 logit
    gradients (queued in the weight's dtype), hidden states and pair."""
    from tsa_fast.kernels import fused_linear_distillation_loss as kernels

    kernel = kernels._weight_grad_accumulate_kernel
    for dtype in ("bf16", "fp16"):
        types = {name: f"*{dtype}" for name in ("grad_ptr", "hidden_ptr", "high_ptr", "low_ptr")}
        for config in kernels.CONFIGS:
            compile_for_gpus(kernel, config, dict(UPCAST=False, **unit_strides(kernel, ("gv", "hh", "wh"))), types)


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas")
def test_pair_kernel_compiles_for_ampere_and_hopper():
    run_compiled(__file__)


@pytest.mark.parametrize("teacher", ["hidden", "topk"])
def test_under_autocast(backend, teacher):
    """A training loop's autocast (bf16 on the CPU here) does not reach inside the op: it picks its own
    dtypes, so fp32 inputs give the fp32 result."""
    student, teachers, labels = make_problem(teacher=teacher)
    expected, expected_grads = loss_and_grads(tsa_fast.fused_linear_distillation_loss, student, teachers, labels)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, grads = loss_and_grads(tsa_fast.fused_linear_distillation_loss, student, teachers, labels)
    assert_rel_close(loss, expected, 1e-6, "loss")
    for name, grad in grads.items():
        assert_rel_close(grad, expected_grads[name], 1e-6, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
def test_torch_compile_fullgraph(backend, teacher, dtype):
    """A compiled caller traces the op (chunk loop, custom ops, the top-k path's autograd as one node, the
    fp16 weight-gradient pair) without a graph break and gives the eager result; bias and ignored labels
    included."""
    student, teachers, labels = make_problem(teacher=teacher, dtype=dtype)

    def step(labels, **tensors):
        return tsa_fast.fused_linear_distillation_loss(labels=labels, **tensors, chunk_size=5, hard_weight=0.5) * 3.0

    torch._dynamo.reset()  # graphs traced under another test's forced backend (not a guarded input) are dropped
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, grads = loss_and_grads(lambda **kw: compiled(**kw), student, teachers, labels)
    expected_loss, expected_grads = loss_and_grads(step, student, teachers, labels)
    assert_rel_close(loss, expected_loss, 1e-6, "loss")
    for name, grad in grads.items():
        assert_rel_close(grad, expected_grads[name], 1e-6, f"grad {name}")


def test_default_chunk_size():
    assert default_chunk_size(65536, 4096, 32000) == 8192  # logits tile ~ hidden states
    assert default_chunk_size(4096, 512, 32000) == 256  # at least 256 rows
    assert default_chunk_size(3, 8, 100000) == 3  # at most N
    assert default_chunk_size(10, 4096, 100) == 10


def test_peak_memory_is_chunk_bound():
    """Measured: at N=4096, V=8192 the reference's logits alone take 256 MB; the fused op stays within
    a few chunk x V tiles plus its O(V x H) accumulators."""
    from benchmarks.common import cpu_peak_extra_bytes_of

    rows, hidden, vocab, chunk = 4096, 64, 8192, 64
    student, teachers, labels = make_problem(rows=rows, hidden=hidden, teacher_hidden=hidden, vocab=vocab, bias=False)
    student = {k: v.requires_grad_() for k, v in student.items()}

    def fused():
        tsa_fast.fused_linear_distillation_loss(**student, **teachers, labels=labels, chunk_size=chunk).backward()

    def materialized():
        logits = student["student_hidden"] @ student["student_weight"].T
        tsa_fast.distillation_loss(logits, teachers["teacher_hidden"] @ teachers["teacher_weight"].T, labels).backward()

    fused()  # first call: one-time allocations (thread pools, caches)
    fused_peak = cpu_peak_extra_bytes_of(fused)
    materialized_peak = cpu_peak_extra_bytes_of(materialized)
    tile, accumulators = chunk * vocab * 4, 3 * vocab * hidden * 4 + rows * hidden * 4
    print(f"peak extra: fused {fused_peak / 2**20:.1f} MB, materialized {materialized_peak / 2**20:.1f} MB")
    assert materialized_peak > 256 * 2**20
    assert fused_peak < 8 * tile + 2 * accumulators


# ---------------------------------------------------------------------------------------------------
# Non-finite teacher inputs: NaN propagates, on every backend alike.


@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_non_finite_teacher_gives_nan_row(backend, teacher, divergence):
    """A NaN in a row of the teacher (its hidden state, logits or top-k log-probabilities) makes that row's loss
    and its student_hidden gradient NaN; the other rows are unaffected."""
    student, teachers, labels = make_problem(teacher=teacher, ignore="none", bias=False)
    key = {"hidden": "teacher_hidden", "logits": "teacher_logits", "topk": "teacher_topk"}[teacher]
    (teachers[key][1] if teacher == "topk" else teachers[key])[2, 1] = float("nan")
    loss, grads = loss_and_grads(
        tsa_fast.fused_linear_distillation_loss, student, teachers, labels, divergence=divergence, reduction="none"
    )
    assert loss[2].isnan() and grads["student_hidden"][2].isnan().all()
    others = torch.arange(len(loss)) != 2
    assert loss[others].isfinite().all() and grads["student_hidden"][others].isfinite().all()


# ---------------------------------------------------------------------------------------------------
# Bad input.


def _student():
    return dict(student_hidden=torch.randn(4, 8), student_weight=torch.randn(20, 8))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(), ValueError, "exactly one teacher form.*none"),
        (
            dict(
                teacher_logits=torch.randn(4, 20), teacher_topk=(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2))
            ),
            ValueError,
            "exactly one teacher form",
        ),
        (dict(teacher_hidden=torch.randn(4, 6)), ValueError, "needs both teacher_hidden and teacher_weight"),
        (
            dict(teacher_hidden=torch.randn(4, 6), teacher_weight=torch.randn(20, 7)),
            ValueError,
            r"teacher_weight must be \(V, 6\)",
        ),
        (
            dict(teacher_hidden=torch.randn(5, 6), teacher_weight=torch.randn(20, 6)),
            ValueError,
            "leading shapes differ",
        ),
        (
            dict(teacher_logits=torch.randn(4, 20), student_bias=torch.randn(19)),
            ValueError,
            r"student_bias must be \(20,\)",
        ),
        (dict(teacher_logits=torch.randn(4, 18)), ValueError, "student 20 vs teacher 18"),
        (dict(teacher_logits=torch.randn(4, 20), chunk_size=0), ValueError, "chunk_size.*0"),
        (dict(teacher_logits=torch.randn(4, 20), temprature=2.0), TypeError, "temprature"),
        (dict(teacher_logits=torch.randn(4, 20), divergence="kl"), ValueError, "divergence.*'kl'"),
        (dict(teacher_topk=(torch.zeros(4, 3), torch.zeros(4, 3))), ValueError, "indices must be an int64"),
        (dict(teacher_topk=(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 2))), ValueError, "differ in shape"),
        (
            dict(teacher_topk=(torch.full((4, 3), 20), torch.zeros(4, 3))),
            ValueError,
            r"indices must be in \[0, 20\).*20",
        ),
        (
            dict(teacher_topk=(torch.zeros(4, 21, dtype=torch.long), torch.zeros(4, 21))),
            ValueError,
            "k=21 > vocabulary size 20",
        ),
    ],
)
def test_bad_input_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        tsa_fast.fused_linear_distillation_loss(**_student(), **kwargs)


def test_student_weight_shape_raises():
    with pytest.raises(ValueError, match=r"student_weight must be \(V, 8\), got \(20, 9\)"):
        tsa_fast.fused_linear_distillation_loss(
            torch.randn(4, 8), torch.randn(20, 9), teacher_logits=torch.randn(4, 20)
        )


def test_labels_out_of_range_raise():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 20\).*\[25\]"):
        tsa_fast.fused_linear_distillation_loss(
            **_student(), labels=torch.tensor([0, 25, 1, 2]), teacher_logits=torch.randn(4, 20)
        )


@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="needs a torch built with CUDA (CI's torch 2.11 run)")
@pytest.mark.parametrize("backend", ["triton", "cpp"], indirect=True)
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_code_paths_on_fake_cuda_tensors(backend, teacher, dtype):
    """The op's CUDA-only branches, traced without a GPU: fp16/bf16 GEMMs with an fp32 result, the weight
    gradient as a compensated pair, the device-side label check. The forward (which computes the gradients
    too) runs on fake CUDA tensors, the kernels standing in by their fake implementations, and gives an fp32
    scalar on the device. (The top-k and torch paths run autograd inside, whose engine needs a real device.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if backend not in available_backends(torch.device("cuda"), dtype):
        pytest.skip(f"the {backend} backend has no CUDA kernels in this build")
    with FakeTensorMode():
        student, teachers, labels = make_problem(ignore="none", teacher=teacher, dtype=dtype, device="cuda")
        student = {k: v.requires_grad_() for k, v in student.items()}
        loss = tsa_fast.fused_linear_distillation_loss(
            **student, **teachers, labels=labels, chunk_size=5, hard_weight=0.5
        )
    assert (loss.shape, loss.dtype, loss.device.type) == ((), torch.float32, "cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
def test_gpu_bf16(backend, teacher):
    student, teachers, labels = make_problem(
        rows=256, hidden=256, teacher_hidden=384, vocab=32000, teacher=teacher, dtype=torch.bfloat16
    )
    check_against_reference(student, teachers, labels, 2e-2, divergence="jsd", hard_weight=0.5)


@gpu
@pytest.mark.gpu
def test_gpu_bf16_peak_memory_has_no_fp32_weight_copies():
    """Measured on the GPU: with bf16 weights the pass holds its outputs (bf16 grad_weight, grad_hidden),
    one bf16 weight-sized compensation buffer, the bf16 logit gradients of the rows folded at once and a few
    chunk x V fp32 tiles, never an fp32 copy of
    either weight or an fp32 weight-gradient accumulator (those alone would be 3 x 512 MB here)."""
    from benchmarks.common import cuda_peak_extra_bytes

    rows, hidden, vocab = 2048, 4096, 32000
    student, teachers, labels = make_problem(
        rows=rows, hidden=hidden, teacher_hidden=hidden, vocab=vocab, bias=False, dtype=torch.bfloat16
    )
    student = {k: v.requires_grad_() for k, v in student.items()}
    chunk = default_chunk_size(rows, hidden, vocab)

    def fused():
        tsa_fast.fused_linear_distillation_loss(**student, **teachers, labels=labels).backward()
        student["student_hidden"].grad = student["student_weight"].grad = None

    fused()  # first call: kernels compiled and autotuned
    peak = cuda_peak_extra_bytes(fused)
    weight_bytes = vocab * hidden * 2
    fold_buffer = sys.modules["tsa_fast.ops.fused_linear_distillation_loss"].PAIR_FOLD_ROWS * vocab * 2
    bound = 2 * weight_bytes + rows * hidden * 2 + 8 * chunk * vocab * 4 + fold_buffer
    print(
        f"peak extra {peak / 2**20:.0f} MB, bound {bound / 2**20:.0f} MB,"
        f" one fp32 weight copy {2 * weight_bytes / 2**20:.0f} MB"
    )
    assert peak < bound


# ---------------------------------------------------------------------------------------------------
# Option types: a TypeError naming the option (the loss options as in `distillation_loss`, and chunk_size).


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_size=4.0), "chunk_size must be an int, got 4.0"),
        (dict(chunk_size=True), "chunk_size must be an int, got True"),
        (dict(scale_by_t2="no"), "scale_by_t2 must be a bool, got 'no'"),
        (dict(beta="0.5"), "beta must be a number, got '0.5'"),
        (dict(soft_weight=None), "soft_weight must be a number, got None"),
    ],
)
def test_wrong_option_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        tsa_fast.fused_linear_distillation_loss(**_student(), teacher_logits=torch.randn(4, 20), **kwargs)


# ---------------------------------------------------------------------------------------------------
# Edges: zero rows.


@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_zero_rows(backend, teacher, reduction):
    """Leading shape (0,): the loss of no rows, as `distillation_loss` gives it (0, or an empty tensor for
    "none"), and zero gradients of the right shapes."""
    student, teachers, labels = make_problem(rows=0, teacher=teacher, topk=3)
    loss, grads = loss_and_grads(
        tsa_fast.fused_linear_distillation_loss, student, teachers, labels, reduction=reduction
    )
    logits = torch.zeros(0, 70, device=DEVICE)
    expected = tsa_fast.distillation_loss(logits, logits, labels, reduction=reduction)
    assert loss.shape == expected.shape and loss.dtype == torch.float32
    assert torch.equal(loss, expected)
    for name, grad in grads.items():
        assert grad.shape == student[name].shape and torch.all(grad == 0), name


# ---------------------------------------------------------------------------------------------------
# Top-k teachers: k = V, invalid teachers, renormalization over the k tokens.


def _topk_problem(vocab, k, temperature=1.0, ignore="some"):
    student, teachers, labels = make_problem(teacher="logits", vocab=vocab, ignore=ignore)
    logprobs, indices = torch.log_softmax(teachers["teacher_logits"].float() / temperature, -1).topk(k, -1)
    return student, teachers, (indices, logprobs), labels


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_with_k_equal_vocab_is_the_dense_loss_for_every_divergence(backend, divergence):
    """k = V: the fp32 log-probabilities sum to 1 within rounding, and the leftover (here ~1e-7 in some
    rows) is no tail: forward and symmetric KL were infinite (a tail bucket where the student has no mass)."""
    student, teachers, topk, labels = _topk_problem(vocab=300, k=300, temperature=2.0)
    leftover = 1 - topk[1].double().exp().sum(-1)
    assert (leftover > 0).any()  # the case under test: a positive rounding leftover
    options = dict(divergence=divergence, temperature=2.0, hard_weight=0.3, labels=labels, **student)
    loss = tsa_fast.fused_linear_distillation_loss(teacher_topk=topk, **options)
    dense = tsa_fast.fused_linear_distillation_loss(**teachers, **options)
    assert_rel_close(loss, dense, 1e-5, "loss")


def test_topk_tail_within_rounding_is_zero():
    """The reference's buckets: a tail within rounding is exactly zero; a real tail is kept."""
    from tsa_fast.reference.fused_linear_distillation_loss import topk_bucket_log_probs

    log_q = torch.log_softmax(torch.randn(2, 6), -1)
    indices = torch.tensor([[0, 1, 2], [3, 4, 5]])
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.2 - 3e-7], [0.5, 0.3, 0.1]]))
    log_p, _ = topk_bucket_log_probs(log_q, indices, teacher)
    assert log_p[0, -1] == -torch.inf
    assert_rel_close(log_p[1, -1].exp(), torch.tensor(0.1), 1e-5, "tail")


@pytest.mark.parametrize(
    "make_bad, match",
    [
        (lambda i, lp: (i.index_fill(-1, torch.tensor([1]), 0).index_fill(-1, torch.tensor([0]), 0), lp), "duplicate"),
        (lambda i, lp: (i, torch.zeros_like(lp)), r"sum to more than 1.*3\.0"),
        (lambda i, lp: (i, torch.full_like(lp, 1.0)), r"sum to more than 1.*8\.1"),
    ],
    ids=["duplicated-index", "probabilities-sum-3", "probabilities-sum-8"],
)
def test_invalid_topk_teacher_raises(backend, make_bad, match):
    """Duplicated indices in a row, or log-probabilities whose probabilities sum above 1: not a distribution."""
    student, _, (indices, logprobs), labels = _topk_problem(vocab=40, k=3, ignore="none")
    bad = make_bad(indices, logprobs)
    with pytest.raises(ValueError, match=f"teacher_topk.*{match}"):
        tsa_fast.fused_linear_distillation_loss(**student, teacher_topk=bad, labels=labels)


def test_invalid_topk_rows_that_are_ignored_pass():
    """Ignored rows (padding) may hold anything in range: they never reach the math."""
    student, _, (indices, logprobs), labels = _topk_problem(vocab=40, k=3, ignore="none")
    labels[:4] = -100
    indices[:4], logprobs[:4] = 0, 0.0  # duplicated, and probabilities summing to 3
    loss = tsa_fast.fused_linear_distillation_loss(**student, teacher_topk=(indices, logprobs), labels=labels)
    expected = tsa_fast.fused_linear_distillation_loss(
        student["student_hidden"][4:],
        student["student_weight"],
        student_bias=student["student_bias"],
        teacher_topk=(indices[4:], logprobs[4:]),
        labels=labels[4:],
    )
    assert_rel_close(loss, expected, 1e-6, "loss")


def test_topk_sum_within_rounding_above_one_passes():
    """Log-probabilities whose probabilities sum to 1 + 1e-5 (rounding) are a valid teacher."""
    student, _, (indices, logprobs), labels = _topk_problem(vocab=40, k=40, ignore="none")
    logprobs = logprobs + 1e-5
    loss = tsa_fast.fused_linear_distillation_loss(**student, teacher_topk=(indices, logprobs), labels=labels)
    assert loss.isfinite()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_topk_renormalize_matches_dense_loss_over_the_k_tokens(backend, divergence, reduction):
    """topk_tail="renormalize": teacher and student renormalized over the k tokens, no tail bucket; that is
    `distillation_loss` of the student's k gathered logits against teacher logits T * logprobs (whose
    softmax at T is the renormalized teacher)."""
    temperature = 1.5
    student, _, (indices, logprobs), labels = _topk_problem(vocab=50, k=6, temperature=temperature)
    options = dict(divergence=divergence, temperature=temperature, reduction=reduction)

    def gathered(student_hidden, student_weight, student_bias, labels=None, **options):
        logits = (student_hidden @ student_weight.T + student_bias).gather(-1, indices)
        counted_only = torch.where(labels == -100, labels, 0)  # labels index the k tokens here: only who counts
        return tsa_fast.distillation_loss(logits, logprobs * temperature, counted_only, **options)

    loss, grads = loss_and_grads(
        tsa_fast.fused_linear_distillation_loss,
        student,
        dict(teacher_topk=(indices, logprobs), topk_tail="renormalize", chunk_size=5),
        labels,
        **options,
    )
    expected_loss, expected_grads = loss_and_grads(gathered, student, {}, labels, **options)
    assert_rel_close(loss, expected_loss, 1e-5, "loss")
    for name in grads:
        assert_rel_close(grads[name], expected_grads[name], 1e-5, name)


def test_topk_renormalize_with_hard_term_matches_reference(backend):
    """The hard term uses the student's full distribution whatever the tail mode."""
    student, _, topk, labels = _topk_problem(vocab=50, k=6, temperature=2.0)
    check_against_reference(
        student,
        dict(teacher_topk=topk),
        labels,
        TOL[torch.float32],
        topk_tail="renormalize",
        divergence="jsd",
        temperature=2.0,
        hard_weight=0.4,
        label_smoothing=0.1,
        chunk_size=5,
    )


def test_module_takes_topk_tail_and_a_temperature_tensor():
    student, _, topk, labels = _topk_problem(vocab=40, k=3, temperature=2.0)
    temperature = torch.full((12,), 2.0, device=DEVICE)
    module = tsa_fast.nn.FusedLinearDistillationLoss(topk_tail="renormalize", temperature=temperature)
    loss = module(
        student["student_hidden"],
        student["student_weight"],
        labels=labels,
        teacher_topk=topk,
        student_bias=student["student_bias"],
    )
    expected = tsa_fast.fused_linear_distillation_loss(
        **student, teacher_topk=topk, labels=labels, topk_tail="renormalize", temperature=2.0
    )
    assert_rel_close(loss, expected, 1e-6, "loss")
    assert "topk_tail='renormalize'" in repr(module) and "temperature=tensor" in repr(module)


def test_topk_tail_option_checked():
    student, _, topk, labels = _topk_problem(vocab=40, k=3)
    with pytest.raises(ValueError, match="topk_tail must be one of .*'bucket', 'renormalize'.*'drop'"):
        tsa_fast.fused_linear_distillation_loss(**student, teacher_topk=topk, topk_tail="drop")
    with pytest.raises(TypeError, match="topk_tail must be one of .*, got None"):
        tsa_fast.fused_linear_distillation_loss(**student, teacher_topk=topk, topk_tail=None)


def test_topk_checks_off_the_cpu_are_device_asserts(monkeypatch):
    """Off the CPU the top-k checks are asynchronous device asserts, never a host read: on meta tensors
    (where any host read raises) each check is issued, with a message naming teacher_topk."""
    from tsa_fast.ops.fused_linear_distillation_loss import check_topk_teacher

    issued = []
    monkeypatch.setattr(torch, "_assert_async", lambda condition, message: issued.append(message))
    indices = torch.zeros(4, 3, dtype=torch.long, device="meta")
    check_topk_teacher(
        indices, torch.zeros(4, 3, device="meta"), 20, torch.zeros(4, dtype=torch.long, device="meta"), -100
    )
    assert len(issued) == 3 and all("teacher_topk" in message for message in issued)
    assert any("duplicate" in m for m in issued) and any("sum to more than 1" in m for m in issued)


# ---------------------------------------------------------------------------------------------------
# num_items_in_batch: the normalizer of reduction="mean" across micro-batches and ranks.


@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
def test_num_items_in_batch_accumulation_equals_full_batch(backend, teacher):
    """Uneven micro-batches (5, 11, 8 rows; 3, 1 and 1 ignored), each normalized by the batch's count of
    counted rows: their summed losses and accumulated gradients are the full batch's."""
    student, teachers, labels = make_problem(rows=24, teacher=teacher, ignore="none")
    labels[[0, 1, 2, 7, 20]] = -100
    options = dict(divergence="symmetric_kl", hard_weight=0.5, chunk_size=4)
    full_loss, full_grads = loss_and_grads(
        tsa_fast.fused_linear_distillation_loss, student, teachers, labels, **options
    )
    count = torch.tensor(int((labels != -100).sum()), device=DEVICE)
    accumulated, grads = 0.0, {name: 0.0 for name in student}
    for start, end in ((0, 5), (5, 16), (16, 24)):
        rows = lambda x, start=start, end=end: x[start:end]  # noqa: E731
        part_teachers = {
            k: tuple(map(rows, v)) if isinstance(v, tuple) else v if k.endswith(("weight", "bias")) else rows(v)
            for k, v in teachers.items()
        }
        part_student = {k: v if k != "student_hidden" else rows(v) for k, v in student.items()}
        loss, part_grads = loss_and_grads(
            tsa_fast.fused_linear_distillation_loss,
            part_student,
            part_teachers,
            rows(labels),
            num_items_in_batch=count,
            **options,
        )
        accumulated = accumulated + loss
        for name, grad in part_grads.items():
            if name == "student_hidden":
                grads[name] = torch.cat([grads[name], grad]) if start else grad
            else:
                grads[name] = grads[name] + grad
    assert_rel_close(accumulated, full_loss, 1e-6, "loss")
    for name, grad in grads.items():
        assert_rel_close(grad, full_grads[name], 1e-6, name)


def test_num_items_in_batch_checked():
    with pytest.raises(ValueError, match="num_items_in_batch must be >= 1, got 0"):
        tsa_fast.fused_linear_distillation_loss(**_student(), teacher_logits=torch.randn(4, 20), num_items_in_batch=0)
    with pytest.raises(TypeError, match="num_items_in_batch must be an int or a 0-d integer tensor, got 2.5"):
        tsa_fast.fused_linear_distillation_loss(**_student(), teacher_logits=torch.randn(4, 20), num_items_in_batch=2.5)


# ---------------------------------------------------------------------------------------------------
# return_parts: the soft and hard parts of the loss, for logging.


@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_parts(backend, teacher, reduction):
    """(loss, LossParts(soft, hard)): each part is the loss with the other weight 0, reduced alike, detached;
    the loss and its gradients are those without return_parts."""
    student, teachers, labels = make_problem(teacher=teacher, temperature=2.0)
    options = dict(divergence="reverse_kl", temperature=2.0, hard_weight=0.4, reduction=reduction, chunk_size=5)
    tensors = {k: v.detach().clone().requires_grad_() for k, v in student.items()}
    loss, parts = tsa_fast.fused_linear_distillation_loss(
        **tensors, **teachers, labels=labels, return_parts=True, **options
    )
    expected, expected_grads = loss_and_grads(
        tsa_fast.fused_linear_distillation_loss, student, teachers, labels, **options
    )
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(loss)
    grads = torch.autograd.grad((loss * weights).sum(), list(tensors.values()))
    assert torch.equal(loss, expected)
    for grad, name in zip(grads, tensors):
        assert torch.equal(grad, expected_grads[name]), name
    for part, part_options in zip(parts, (dict(options, hard_weight=0.0), dict(options, soft_weight=0.0))):
        assert not part.requires_grad and part.shape == loss.shape
        expected_part = tsa_fast.fused_linear_distillation_loss(**student, **teachers, labels=labels, **part_options)
        assert_rel_close(part, expected_part, 1e-6)
    assert_rel_close(parts.soft + parts.hard, loss, 1e-6, "soft + hard")


TEACHER_FORMS = {
    "hidden": ("hidden", {}),
    "logits": ("logits", {}),
    "topk-bucket": ("topk", {}),
    "topk-renormalize": ("topk", dict(topk_tail="renormalize")),
}
PART_WEIGHTS = {"both": (0.6, 0.4), "soft-only": (1.0, 0.0), "hard-only": (0.0, 0.7)}


def _as64(tensors: dict) -> dict:
    as64 = lambda x: x.double() if x.is_floating_point() else x  # noqa: E731
    return {k: tuple(map(as64, v)) if isinstance(v, tuple) else as64(v) for k, v in tensors.items()}


@pytest.mark.parametrize("form", TEACHER_FORMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none", "num_items"])
@pytest.mark.parametrize("weights", PART_WEIGHTS)
def test_return_parts_are_the_reference_terms(backend, form, reduction, weights):
    """Each part equals the float64 reference's soft or hard term (its return_parts) for every teacher form
    (top-k with either tail), every reduction and num_items_in_batch, with ignored rows, over several
    chunks; soft + hard is the loss."""
    teacher, teacher_options = TEACHER_FORMS[form]
    soft_weight, hard_weight = PART_WEIGHTS[weights]
    student, teachers, labels = make_problem(teacher=teacher, temperature=2.0)
    options = dict(divergence="jsd", temperature=2.0, soft_weight=soft_weight, hard_weight=hard_weight)
    options.update(label_smoothing=0.1, **teacher_options)
    num_items = 9 if reduction == "num_items" else None
    options["reduction"] = "sum" if num_items else reduction
    expected, expected_parts = reference_loss(
        **_as64(student), **_as64(teachers), labels=labels, return_parts=True, **options
    )
    if num_items:  # the reference has no num_items_in_batch: its sums over 9 rows
        options["reduction"] = "mean"
        expected, expected_parts = expected / num_items, [part / num_items for part in expected_parts]
    loss, parts = tsa_fast.fused_linear_distillation_loss(
        **student, **teachers, labels=labels, return_parts=True, chunk_size=5, num_items_in_batch=num_items, **options
    )
    assert_rel_close(loss, expected, 1e-5, "loss")
    for part, expected_part, name in zip(parts, expected_parts, ("soft", "hard")):
        assert part.dtype == torch.float32 and not part.requires_grad
        assert_rel_close(part, expected_part, 1e-5, name)
    assert_rel_close(parts.soft + parts.hard, loss, 1e-6, "soft + hard")
    if hard_weight == 0.0:
        assert not parts.hard.any()
    if soft_weight == 0.0:
        assert not parts.soft.any()


@pytest.mark.parametrize("form", TEACHER_FORMS)
@pytest.mark.parametrize("rows", [0, 12], ids=["zero-rows", "all-ignored"])
def test_return_parts_of_no_counted_rows(backend, form, rows):
    """No rows, or every row ignored: the loss and both parts are 0 (mean) or zeros (none)."""
    teacher, teacher_options = TEACHER_FORMS[form]
    student, teachers, labels = make_problem(rows=rows, teacher=teacher, topk=3, ignore="all")
    for reduction in ("mean", "none"):
        loss, parts = tsa_fast.fused_linear_distillation_loss(
            **student,
            **teachers,
            labels=labels,
            hard_weight=0.5,
            reduction=reduction,
            return_parts=True,
            **teacher_options,
        )
        for value in (loss, *parts):
            assert value.shape == ((rows,) if reduction == "none" else ()) and not value.any()


def count_row_passes(monkeypatch, backend, teacher) -> list:
    """Records each pass over a chunk's logits: a call of the top-k row function, a launch of the loss kernel
    (triton, cpp; whether it was asked for the parts), or a call of the reference's row function (torch)."""
    ops = importlib.import_module("tsa_fast.ops.distillation_loss")  # (tsa_fast.ops.X is the function X)
    fused_ops = importlib.import_module("tsa_fast.ops.fused_linear_distillation_loss")
    reference = importlib.import_module("tsa_fast.reference.distillation_loss")

    if teacher == "topk":
        module, name = fused_ops, "topk_distillation_loss_rows"
    elif backend == "torch":
        module, name = reference, "distillation_loss_rows"
    elif backend == "cpp":
        module, name = ops, "distillation_loss_forward_cpp"
    else:
        module, name = triton_kernels, "distillation_loss_forward"
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(kwargs.get("row_parts") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("teacher", ["hidden", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_parts_same_pass(backend, monkeypatch, teacher, reduction):
    """return_parts makes exactly as many passes over the logits as a call without parts, one per chunk (and
    for reduction="none" one more per chunk in backward, also with parts): the parts are accumulated from the
    chunk pass that gives the loss and its gradients. The kernels store the parts only when asked."""
    student, teachers, labels = make_problem(teacher=teacher)
    options = dict(divergence="reverse_kl", hard_weight=0.4, reduction=reduction, chunk_size=5)  # 12 rows: 3 chunks
    calls = count_row_passes(monkeypatch, backend, teacher)
    runs = []
    for return_parts in (False, True):
        tensors = {k: v.detach().clone().requires_grad_() for k, v in student.items()}
        out = tsa_fast.fused_linear_distillation_loss(
            **tensors, **teachers, labels=labels, return_parts=return_parts, **options
        )
        loss = out[0] if return_parts else out
        forward_calls = list(calls)
        loss.sum().backward()
        runs.append((forward_calls, len(calls), loss.detach(), [t.grad for t in tensors.values()]))
        calls.clear()
    (plain_forward, plain_total, plain_loss, plain_grads), (forward, total, loss, grads) = runs
    assert len(forward) == len(plain_forward) == 3 and total == plain_total
    assert plain_total == (6 if reduction == "none" else 3)
    if teacher != "topk" and backend != "torch":
        assert plain_forward == [False] * 3 and forward == [True] * 3
    assert torch.equal(loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


@pytest.mark.parametrize("teacher", ["hidden", "topk"])
def test_return_parts_compiles(backend, teacher):
    student, teachers, labels = make_problem(teacher=teacher)

    def step(labels, **tensors):
        loss, parts = tsa_fast.fused_linear_distillation_loss(
            labels=labels, **tensors, chunk_size=5, hard_weight=0.5, return_parts=True
        )
        return loss, parts.soft, parts.hard

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(labels, **student, **teachers), step(labels, **student, **teachers)):
        assert_rel_close(got, expected, 1e-6)


# ---------------------------------------------------------------------------------------------------
# temperature as a tensor: one per row, or a 0-d tensor.


@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_row_temperature_matches_reference_row_by_row(backend, teacher, reduction):
    """Each row at its own temperature (a top-k teacher's log-probabilities at that row's T): the float64
    reference run row by row, for the loss and every gradient, across chunks."""
    student, teachers, labels = make_problem(teacher="logits", rows=10)
    temperature = torch.rand(10, device=DEVICE) * 3 + 0.5
    if teacher == "topk":
        logits = teachers.pop("teacher_logits")
        logprobs, indices = torch.log_softmax(logits / temperature[:, None], -1).topk(9, -1)
        teachers = dict(teacher_topk=(indices, logprobs))
    elif teacher == "hidden":
        student, teachers, labels = make_problem(teacher="hidden", rows=10)
    options = dict(divergence="jsd", hard_weight=0.3, reduction=reduction)
    loss, grads = loss_and_grads(
        tsa_fast.fused_linear_distillation_loss,
        student,
        teachers,
        labels,
        temperature=temperature,
        chunk_size=3,
        **options,
    )
    as64 = lambda x: x.double() if x.is_floating_point() else x  # noqa: E731

    def row_by_row(**tensors):
        rows = []
        for i in range(10):
            one = lambda x, i=i: x[i : i + 1] if x.shape[0] == 10 else x  # noqa: E731
            row = {
                k: tuple(one(as64(x)) for x in v) if isinstance(v, tuple) else one(as64(v)) for k, v in tensors.items()
            }
            rows.append(reference_loss(**row, temperature=float(temperature[i]), **dict(options, reduction="none")))
        rows = torch.cat(rows)
        counted = labels != -100
        return rows if reduction == "none" else rows.sum() / counted.sum().clamp(min=1)

    student64 = {k: v.double() for k, v in student.items()}
    expected, expected_grads = loss_and_grads(row_by_row, student64, teachers, labels)
    assert_rel_close(loss, expected, TOL[torch.float32], "loss")
    for name, grad in grads.items():
        assert_rel_close(grad, expected_grads[name], TOL[torch.float32], name)


def test_zero_dim_temperature_is_the_float():
    student, teachers, labels = make_problem(teacher="topk", temperature=2.0)
    common = dict(**student, **teachers, labels=labels, divergence="forward_kl")
    loss = tsa_fast.fused_linear_distillation_loss(**common, temperature=torch.tensor(2.0))
    assert_rel_close(loss, tsa_fast.fused_linear_distillation_loss(**common, temperature=2.0), 1e-6, "loss")


def test_bad_tensor_temperature_raises():
    with pytest.raises(ValueError, match=r"temperature must be a 0-d tensor or of the leading shape \(4,\)"):
        tsa_fast.fused_linear_distillation_loss(
            **_student(), teacher_logits=torch.randn(4, 20), temperature=torch.ones(5)
        )
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        tsa_fast.fused_linear_distillation_loss(
            **_student(), teacher_logits=torch.randn(4, 20), temperature=torch.tensor([1.0, 1.0, -2.0, 1.0])
        )


if __name__ == "__main__":  # test_pair_kernel_compiles_for_ampere_and_hopper
    compile_pair_kernel()
