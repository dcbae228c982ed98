"""`tsa_fast.distillation_loss`: every backend against the float64 reference, edges, errors, compile."""

import importlib
import math
import sys

import pytest
import torch
from conftest import DEVICE, assert_rel_close, compile_for_gpus, rel_error, run_compiled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tsa_fast
from tsa_fast.reference.distillation_loss import DIVERGENCES, REDUCTIONS
from tsa_fast.reference.distillation_loss import distillation_loss as reference_loss

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(shape, vocab, *, ignore="some", dtype=torch.float32, scale=3.0, teacher_vocab=None):
    """Random student/teacher logits of shape (*shape, V) and labels with an ignore pattern."""
    student = (torch.randn(*shape, vocab) * scale).to(DEVICE, dtype)
    teacher = (torch.randn(*shape, teacher_vocab or vocab) * scale).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, shape, device=DEVICE)
    if ignore == "some":
        labels[torch.rand(shape, device=DEVICE) < 0.35] = -100
    elif ignore == "all":
        labels.fill_(-100)
    return student, teacher, labels


def loss_and_grad(fn, student, teacher, labels, upstream_seed=0, **options):
    """fn's loss and d(sum(w * loss))/d(student) for a random weighting w (tests backward scaling)."""
    student = student.detach().clone().requires_grad_()
    loss = fn(student, teacher, labels, **options)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
    (grad,) = torch.autograd.grad((loss * weights.to(loss)).sum(), student)
    return loss, grad


def check_against_reference(student, teacher, labels, tol, **options):
    """Loss and gradient against the float64 reference within `tol`, or within twice the error of the
    reference itself run in the input dtype, where that is larger (the FlashAttention test rule: a very
    peaked softmax makes some gradients ill-conditioned in fp32 for any implementation)."""
    loss, grad = loss_and_grad(tsa_fast.distillation_loss, student, teacher, labels, **options)
    ref_loss, ref_grad = loss_and_grad(reference_loss, student.double(), teacher.double(), labels, **options)
    same_dtype_loss, same_dtype_grad = loss_and_grad(reference_loss, student, teacher, labels, **options)
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype
    assert_rel_close(loss, ref_loss, max(tol, 2 * rel_error(same_dtype_loss, ref_loss)), "loss")
    # TVD's gradient jumps where p_j = q_j: an element within rounding of a tie may take either side.
    grad_tol = max(tol, 1e-4) if options.get("divergence") == "tvd" else tol
    assert_rel_close(grad, ref_grad, max(grad_tol, 2 * rel_error(same_dtype_grad, ref_grad)), "grad")
    return loss, grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=1.0),
        dict(temperature=2.5, softcap=15.0, hard_weight=0.4, soft_weight=0.6, label_smoothing=0.1, beta=0.3),
        dict(temperature=0.7, scale_by_t2=False, beta=0.8),
    ],
    ids=["plain", "T2.5-softcap-hard-smoothing", "T0.7-noT2"],
)
def test_matches_reference(backend, divergence, reduction, ignore, options):
    student, teacher, labels = make_inputs((7,), 300, ignore=ignore)
    if ignore == "none" and "hard_weight" not in options:
        labels = None
    check_against_reference(
        student, teacher, labels, TOL[torch.float32], divergence=divergence, reduction=reduction, **options
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fp16_inputs(backend, divergence):
    student, teacher, labels = make_inputs((6,), 257, dtype=torch.float16)
    check_against_reference(
        student, teacher, labels, TOL[torch.float16], divergence=divergence, hard_weight=0.5, temperature=2.0
    )


def test_mixed_input_dtypes(backend):
    student, teacher, labels = make_inputs((5,), 130)
    check_against_reference(student, teacher.half(), labels, TOL[torch.float32], divergence="jsd")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits(backend, divergence):
    """Logits at +-1e4 (one-hot softmaxes) stay finite and match the reference."""
    student, teacher, labels = make_inputs((6,), 200)
    student[:, ::7], teacher[:, ::5] = 1e4, 1e4
    student[:, 1::3], teacher[:, 2::3] = -1e4, -1e4
    check_against_reference(student, teacher, labels, TOL[torch.float32], divergence=divergence, hard_weight=0.3)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_teacher_minus_inf_entries(backend, divergence):
    """Tokens the teacher rules out (-inf) give zero-probability terms, not NaN."""
    student, teacher, labels = make_inputs((6,), 150)
    teacher[:, :40] = -math.inf
    loss, grad = check_against_reference(student, teacher, labels, TOL[torch.float32], divergence=divergence)
    assert loss.isfinite().all() and grad.isfinite().all()


@pytest.mark.parametrize("divergence", ["reverse_kl", "symmetric_kl"])
def test_teacher_minus_inf_gives_infinite_reverse_kl(backend, divergence):
    """KL(Q || P) is +inf where the student puts mass on a token the teacher rules out: +inf, as the math says."""
    student, teacher, _ = make_inputs((3,), 64)
    teacher[:, :8] = -math.inf
    loss = tsa_fast.distillation_loss(student, teacher, divergence=divergence, reduction="none")
    assert torch.equal(loss, torch.full_like(loss, math.inf))


@pytest.mark.parametrize("vocab", [1, 31, 4099, 5000])
def test_vocab_not_multiple_of_block(backend, vocab):
    student, teacher, labels = make_inputs((3,), vocab)
    check_against_reference(student, teacher, labels, TOL[torch.float32], divergence="symmetric_kl", hard_weight=0.5)


def test_one_row(backend):
    student, teacher, labels = make_inputs((1,), 333, ignore="none")
    check_against_reference(student, teacher, labels, TOL[torch.float32], divergence="jsd", hard_weight=1.0)


def test_leading_dims(backend):
    student, teacher, labels = make_inputs((2, 3, 4), 96)
    loss, _ = check_against_reference(student, teacher, labels, TOL[torch.float32], reduction="none", divergence="tvd")
    assert loss.shape == (2, 3, 4)
    assert torch.all(loss[labels == -100] == 0)


def test_vocab_size_truncates_both(backend):
    """vocab_size=K uses the first K columns of each; the student's columns past K get zero gradient."""
    student, teacher, labels = make_inputs((5,), 300, teacher_vocab=280)
    labels[labels >= 250] = 7
    _, grad = check_against_reference(student, teacher, labels, TOL[torch.float32], vocab_size=250, hard_weight=0.5)
    assert torch.all(grad[:, 250:] == 0)


def test_non_contiguous_inputs(backend):
    student, teacher, labels = make_inputs((4,), 70)
    student_t = student.t().contiguous().t()  # column stride 4
    teacher_wide = torch.randn(4, 90, device=DEVICE)[:, 10:80].copy_(teacher)  # row stride 90
    check_against_reference(student_t, teacher_wide, labels, TOL[torch.float32], divergence="reverse_kl")


def test_int32_labels(backend):
    student, teacher, labels = make_inputs((6,), 50)
    check_against_reference(student, teacher, labels.int(), TOL[torch.float32], hard_weight=1.0, label_smoothing=0.2)


def test_all_rows_ignored_gives_zero_loss_and_grad(backend):
    student, teacher, labels = make_inputs((5,), 64, ignore="all")
    loss, grad = loss_and_grad(tsa_fast.distillation_loss, student, teacher, labels, hard_weight=1.0)
    assert loss.item() == 0.0 and torch.all(grad == 0)


def test_teacher_gets_no_gradient(backend):
    student, teacher, labels = make_inputs((4,), 32)
    teacher.requires_grad_()
    student.requires_grad_()
    tsa_fast.distillation_loss(student, teacher, labels).backward()
    assert teacher.grad is None and student.grad is not None


def test_no_grad_forward_matches(backend):
    student, teacher, labels = make_inputs((4,), 100)
    with torch.no_grad():
        loss = tsa_fast.distillation_loss(student, teacher, labels, divergence="jsd", reduction="none")
    expected = reference_loss(student.double(), teacher.double(), labels, divergence="jsd", reduction="none")
    assert_rel_close(loss, expected, TOL[torch.float32], "loss")


@pytest.mark.parametrize("backend", ["triton", "cpp"], indirect=True)
def test_second_backward_raises(backend):
    """The stored gradient is consumed in place; a second backward must fail loudly, not return garbage."""
    student, teacher, labels = make_inputs((3,), 40)
    student.requires_grad_()
    loss = tsa_fast.distillation_loss(student, teacher, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_module_matches_functional(backend):
    student, teacher, labels = make_inputs((2, 5), 64)
    options = dict(divergence="jsd", beta=0.25, temperature=3.0, hard_weight=0.2, reduction="sum")
    module = tsa_fast.nn.DistillationLoss(**options)
    assert torch.equal(
        module(student, teacher, labels), tsa_fast.distillation_loss(student, teacher, labels, **options)
    )
    assert "beta=0.25" in repr(module)


def test_module_rejects_unknown_option():
    with pytest.raises(TypeError, match="temprature"):
        tsa_fast.nn.DistillationLoss(temprature=2.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradcheck(divergence):
    student = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 9, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4])
    options = dict(divergence=divergence, temperature=1.7, softcap=4.0, hard_weight=0.3, label_smoothing=0.1)
    assert torch.autograd.gradcheck(lambda s: reference_loss(s, teacher, labels, **options), (student,))


def test_float64_uses_reference_and_gradchecks():
    student = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 11, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: tsa_fast.distillation_loss(s, teacher, divergence="tvd"), (student,))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 9),
    vocab=st.integers(1, 600),
    divergence=st.sampled_from(DIVERGENCES),
    temperature=st.floats(0.25, 8.0),
    hard_weight=st.sampled_from([0.0, 0.5]),
    half=st.booleans(),
)
def test_property_random_shapes(backend, rows, vocab, divergence, temperature, hard_weight, half):
    dtype = torch.float16 if half else torch.float32
    student, teacher, labels = make_inputs((rows,), vocab, dtype=dtype)
    check_against_reference(
        student, teacher, labels, TOL[dtype], divergence=divergence, temperature=temperature, hard_weight=hard_weight
    )


def test_torch_compile_fullgraph(backend):
    """A compiled caller traces the custom op without a graph break and gives the eager result."""
    student, teacher, labels = make_inputs((2, 6), 80)

    def step(s, t, y):
        return tsa_fast.distillation_loss(s, t, y, divergence="jsd", temperature=2.0, hard_weight=0.5) * 3.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, grad = loss_and_grad(compiled, student, teacher, labels)
    expected_loss, expected_grad = loss_and_grad(step, student, teacher, labels)
    assert_rel_close(loss, expected_loss, 1e-6, "loss")
    assert_rel_close(grad, expected_grad, 1e-6, "grad")


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the bad value, never a silent wrong number.


def _logits(*shape, **kwargs):
    return torch.randn(*shape, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(divergence="kl"), ValueError, "divergence.*'kl'"),
        (dict(reduction="avg"), ValueError, "reduction.*'avg'"),
        (dict(divergence="jsd", beta=0.0), ValueError, "forward_kl"),
        (dict(divergence="jsd", beta=1.0), ValueError, "reverse_kl"),
        (dict(temperature=0.0), ValueError, "temperature.*0.0"),
        (dict(temperature=math.inf), ValueError, "temperature.*inf"),
        (dict(temperature=math.nan), ValueError, "temperature.*nan"),
        (dict(temperature=-1.0), ValueError, "temperature.*-1.0"),
        (dict(soft_weight=-0.5), ValueError, "soft_weight.*-0.5"),
        (dict(hard_weight=math.nan), ValueError, "hard_weight.*nan"),
        (dict(label_smoothing=1.0), ValueError, "label_smoothing.*1.0"),
        (dict(softcap=0.0), ValueError, "softcap.*0.0"),
        (dict(vocab_size=0), ValueError, "vocab_size.*0"),
        (dict(vocab_size=17), ValueError, "vocab_size.*17"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        tsa_fast.distillation_loss(_logits(4, 16), _logits(4, 16), torch.zeros(4, dtype=torch.long), **kwargs)


def test_bad_tensors_raise():
    s, t, y = _logits(4, 16), _logits(4, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="student 16 vs teacher 12"):
        tsa_fast.distillation_loss(s, _logits(4, 12))
    with pytest.raises(ValueError, match=r"leading shapes differ.*\(4, 16\).*\(5, 16\)"):
        tsa_fast.distillation_loss(s, _logits(5, 16))
    with pytest.raises(ValueError, match=r"labels shape \(3,\)"):
        tsa_fast.distillation_loss(s, t, y[:3])
    with pytest.raises(ValueError, match="labels must be int64 or int32, got torch.float32"):
        tsa_fast.distillation_loss(s, t, y.float())
    with pytest.raises(ValueError, match="student_logits must be float.*torch.int64"):
        tsa_fast.distillation_loss(s.long(), t)
    with pytest.raises(ValueError, match="non-empty last dim"):
        tsa_fast.distillation_loss(_logits(4, 0), _logits(4, 0))
    with pytest.raises(ValueError, match="hard_weight=0.5 needs labels"):
        tsa_fast.distillation_loss(s, t, hard_weight=0.5)
    with pytest.raises(TypeError, match="teacher_logits must be a torch.Tensor, got list"):
        tsa_fast.distillation_loss(s, [[0.0] * 16] * 4)
    with pytest.raises(ValueError, match="on meta"):
        tsa_fast.distillation_loss(s, t.to("meta"))


def test_labels_out_of_range_raise(backend):
    s, t, _ = make_inputs((4,), 16)
    for bad in (16, -1, -101):
        labels = torch.tensor([0, bad, 3, -100], device=DEVICE)
        with pytest.raises(ValueError, match=rf"labels must be in \[0, 16\).*\[{bad}\]"):
            tsa_fast.distillation_loss(s, t, labels)


def test_unknown_forced_backend_raises(monkeypatch):
    monkeypatch.setenv("TSA_FAST_BACKEND", "cuda_magic")
    with pytest.raises(ValueError, match="TSA_FAST_BACKEND.*cuda_magic"):
        tsa_fast.distillation_loss(_logits(2, 8), _logits(2, 8))


# ---------------------------------------------------------------------------------------------------
# Non-finite and extreme inputs: what the math gives, on every backend alike.


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_student_minus_inf_columns_get_zero_gradient(backend, divergence):
    """A padded vocabulary masked with -inf in both models (no softcap): finite loss, gradient exactly 0 there."""
    student, teacher, labels = make_inputs((5,), 80)
    student[:, 70:], teacher[:, 70:] = -math.inf, -math.inf
    loss, grad = check_against_reference(student, teacher, labels, TOL[torch.float32], divergence=divergence)
    assert loss.isfinite().all() and torch.all(grad[:, 70:] == 0)


def cross_entropy_loss_and_grad(student, labels, **options):
    """F.cross_entropy per row in float64 and its gradient (the hard term alone, as an independent oracle)."""
    return loss_and_grad(
        lambda s, _, y, **o: torch.nn.functional.cross_entropy(s, y, reduction="none", **o),
        student.double(),
        None,
        labels,
        **options,
    )


@pytest.mark.parametrize("divergence", ["reverse_kl", "symmetric_kl"])
def test_zero_soft_weight_ignores_an_infinite_divergence(backend, divergence):
    """soft_weight=0 contributes nothing, also where the divergence is +inf (not 0 * inf = NaN)."""
    student, teacher, labels = make_inputs((6,), 64)
    teacher[:, :8] = -math.inf  # KL(Q || P) = +inf
    options = dict(divergence=divergence, soft_weight=0.0, hard_weight=1.0, label_smoothing=0.1, reduction="none")
    loss, grad = loss_and_grad(tsa_fast.distillation_loss, student, teacher, labels, **options)
    expected_loss, expected_grad = cross_entropy_loss_and_grad(student, labels, label_smoothing=0.1)
    assert_rel_close(loss, expected_loss, TOL[torch.float32], "loss")
    assert_rel_close(grad, expected_grad, TOL[torch.float32], "grad")


def test_label_on_minus_inf_student_column_gives_infinite_loss(backend):
    """Without label smoothing a label where the student logit is -inf has CE = +inf (not 0 * inf = NaN), with
    the finite gradient softmax - onehot."""
    student, teacher, labels = make_inputs((4,), 50, ignore="none")
    student[:, 5], labels[0] = -math.inf, 5
    options = dict(soft_weight=0.0, hard_weight=1.0, reduction="none")
    loss, grad = loss_and_grad(tsa_fast.distillation_loss, student, teacher, labels, **options)
    expected_loss, expected_grad = cross_entropy_loss_and_grad(student, labels)
    assert loss[0] == math.inf and loss[1:].isfinite().all()
    assert_rel_close(loss, expected_loss, TOL[torch.float32], "loss")
    assert_rel_close(grad, expected_grad, TOL[torch.float32], "grad")


@pytest.mark.parametrize("softcap", [1e6, 1e3, 30.0])
def test_softcap_much_larger_than_logits_is_exact(backend, softcap):
    """softcap * tanh(z / softcap) keeps fp32's digits where |z| << softcap (c(z) ~ z there)."""
    student, teacher, labels = make_inputs((6,), 200)
    check_against_reference(student, teacher, labels, TOL[torch.float32], softcap=softcap, hard_weight=0.5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_finite_teacher_gives_nan_row(backend, divergence):
    """A NaN or +inf teacher logit, or a counted teacher row of only -inf, makes that row's loss and gradient
    NaN (NaN propagates, as in PyTorch); the other rows, and ignored rows whatever they hold, are unaffected."""
    student, teacher, labels = make_inputs((7,), 60, ignore="none")
    teacher[0, 3], teacher[1, 5], teacher[2], teacher[3, 0] = math.nan, math.inf, -math.inf, math.nan
    labels[3] = -100
    options = dict(divergence=divergence, hard_weight=0.5, reduction="none")
    loss, grad = loss_and_grad(tsa_fast.distillation_loss, student, teacher, labels, **options)
    assert loss[:3].isnan().all() and grad[:3].isnan().all(), (loss, grad[:3].isnan().sum(-1))
    assert loss[3] == 0 and torch.all(grad[3] == 0)
    check_against_reference(student[3:], teacher[3:], labels[3:], TOL[torch.float32], **options)


def test_fp16_gradient_under_loss_scaling_is_rounded_once(backend):
    """An fp16 student at a large vocabulary with the loss scaled by 65536 (mixed-precision training): each
    gradient entry is the float64 gradient rounded once to fp16, not d(row loss)/dz rounded to fp16 (often
    subnormal) and then scaled: no entry flushed to zero that fp16 represents, median error ~ fp16 rounding."""
    student, teacher, labels = make_inputs((4,), 32768, dtype=torch.float16, ignore="none")
    options = dict(divergence="forward_kl", hard_weight=0.5, reduction="sum")
    student = student.detach().requires_grad_()
    (tsa_fast.distillation_loss(student, teacher, labels, **options) * 65536.0).backward()
    z64 = student.detach().double().requires_grad_()
    (reference_loss(z64, teacher.double(), labels, **options) * 65536.0).backward()
    expected, grad = z64.grad, student.grad.double()
    representable = expected.half() != 0
    flushed = (grad == 0) & representable
    assert flushed.sum() == 0, f"{flushed.double().mean():.2%} of the entries flushed to zero"
    normal = expected.abs() >= torch.finfo(torch.float16).tiny
    median = ((grad - expected).abs() / expected.abs())[normal].median().item()
    assert median <= 2**-11, f"median relative error {median:.2e}"


def launch_rows(backend, student, teacher, labels, temperature, *, divergence, soft_weight, scale_by_t2, **options):
    """Per-row losses and d(row loss)/d(student) from the backend's launcher (the reference, by autograd, for
    torch), with `temperature` a float or one per row."""
    from tsa_fast.ops.distillation_loss import distillation_loss_forward_cpp
    from tsa_fast.reference.distillation_loss import distillation_loss_rows

    if backend == "torch":
        z = student.detach().clone().requires_grad_()
        rows = distillation_loss_rows(
            z,
            teacher,
            labels,
            divergence_name=divergence,
            temperature=temperature,
            soft_weight=soft_weight,
            scale_by_t2=scale_by_t2,
            **options,
        )
        return rows.detach(), torch.autograd.grad(rows.sum(), z)[0]
    launcher = distillation_loss_forward_cpp if backend == "cpp" else tsa_fast.kernels.distillation_loss_forward
    rows, grad = torch.empty(len(student), device=DEVICE), torch.empty_like(student)
    launcher(
        student,
        teacher,
        labels,
        rows,
        grad,
        DIVERGENCES.index(divergence),
        options.get("beta", 0.5),
        temperature,
        soft_weight,
        scale_by_t2,
        options.get("hard_weight", 0.0),
        options.get("label_smoothing", 0.0),
        -100,
        options.get("softcap") or 0.0,
        student.shape[-1],
    )
    return rows, grad


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("scale_by_t2", [True, False])
def test_temperature_per_row(backend, divergence, scale_by_t2):
    """The launchers (and the reference) take one temperature per row: each row is the loss at its own T,
    scaled by its own T^2 with scale_by_t2."""
    student, teacher, labels = make_inputs((6,), 90)
    temperature = torch.tensor([0.5, 1.0, 2.0, 3.5, 1.0, 7.0], device=DEVICE)
    options = dict(divergence=divergence, soft_weight=0.7, scale_by_t2=scale_by_t2, hard_weight=0.3)
    options |= dict(label_smoothing=0.1, softcap=20.0, beta=0.3)
    rows, grad = launch_rows(backend, student, teacher, labels, temperature, **options)
    for i, t in enumerate(temperature.tolist()):
        one = slice(i, i + 1)
        expected = launch_rows("torch", student[one].double(), teacher[one].double(), labels[one], t, **options)
        assert_rel_close(rows[one], expected[0], TOL[torch.float32], f"row {i} loss")
        assert_rel_close(grad[one], expected[1], TOL[torch.float32], f"row {i} grad")


def test_reference_takes_a_0d_temperature():
    student, teacher, labels = make_inputs((4,), 30)
    options = dict(divergence="symmetric_kl", soft_weight=1.0, scale_by_t2=True)
    as_tensor = launch_rows("torch", student, teacher, labels, torch.tensor(2.5), **options)
    as_float = launch_rows("torch", student, teacher, labels, 2.5, **options)
    assert torch.equal(as_tensor[0], as_float[0]) and torch.equal(as_tensor[1], as_float[1])


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logits_near_the_float32_limit(backend, divergence, temperature):
    """Logits up to +-3.4e38: wherever the float64 loss and gradient fit in fp32, every backend gives them
    (log-probabilities and row sums past the fp32 range must not overflow on the way). The torch backend
    within 1/16 of the fp32 range: its autograd multiplies the incoming gradient (here up to 2 T^2) by a
    log-ratio before the probability that makes their product small."""
    student, teacher, labels = make_inputs((1000,), 8, ignore="none")
    for logits in (student, teacher):
        huge = torch.rand(logits.shape, device=DEVICE) < 0.3
        logits[huge] = (torch.rand(logits.shape, device=DEVICE, dtype=torch.float64) * 6.8e38 - 3.4e38)[huge].float()
    options = dict(divergence=divergence, temperature=temperature, hard_weight=0.5, label_smoothing=0.1)
    options["reduction"] = "none"
    expected_loss, expected_grad = loss_and_grad(reference_loss, student.double(), teacher.double(), labels, **options)
    limit = torch.finfo(torch.float32).max / (16 if backend == "torch" else 1)
    fits = lambda x: x.isfinite() & (x.abs() < limit)  # noqa: E731
    rows = fits(expected_loss) & fits(expected_grad).all(-1)
    assert rows.sum() > 30
    student, teacher, labels = student[rows], teacher[rows], labels[rows]
    expected_loss, expected_grad = loss_and_grad(reference_loss, student.double(), teacher.double(), labels, **options)
    loss, grad = loss_and_grad(tsa_fast.distillation_loss, student, teacher, labels, **options)
    assert_rel_close(loss, expected_loss, TOL[torch.float32], "loss")
    assert_rel_close(grad, expected_grad, TOL[torch.float32], "grad")


def plain_divergence(student, teacher, labels=None, *, divergence, beta, temperature, reduction="none"):
    """Each divergence written plainly in PyTorch (log_softmax, log of the mixture, zero-probability terms
    dropped): the yardstick of what fp32 arithmetic gives on an input."""
    log_q, log_p = torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1)
    kl = lambda log_a, log_b: (log_a.exp() * torch.where(log_a.exp() > 0, log_a - log_b, 0.0)).sum(-1)  # noqa: E731
    if divergence == "forward_kl":
        rows = kl(log_p, log_q)
    elif divergence == "reverse_kl":
        rows = kl(log_q, log_p)
    elif divergence == "symmetric_kl":
        rows = 0.5 * (kl(log_p, log_q) + kl(log_q, log_p))
    elif divergence == "jsd":
        m = beta * log_p.exp() + (1 - beta) * log_q.exp()
        log_m = torch.log(torch.where(m > 0, m, 1.0))
        rows = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    else:
        rows = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    return rows * temperature**2


@pytest.mark.parametrize(
    "divergence, beta", [(name, 0.5) for name in DIVERGENCES] + [("jsd", 0.1), ("jsd", 0.9)], ids=str
)
@pytest.mark.parametrize(
    "scale, peak, temperature",
    [(3.0, 10.0, 1.0), (3.0, 20.0, 2.0), (1.0, 30.0, 1.0)],
    ids=["peak10", "peak20-T2", "peak30"],
)
def test_peaked_distributions_within_twice_plain_fp32_error(backend, divergence, beta, scale, peak, temperature):
    """Peaked, nearly equal teacher and student (a JSD near 0): loss and gradient within twice the error of the
    divergence written plainly in fp32 PyTorch on the same input, plus 1e-6 (the attention tests' rule)."""
    student = torch.randn(8, 1000, device=DEVICE) * scale
    teacher = student + 0.1 * scale * torch.randn(8, 1000, device=DEVICE)
    student[:, 0] += peak
    teacher[:, 0] += peak
    options = dict(divergence=divergence, beta=beta, temperature=temperature, reduction="none")
    loss, grad = loss_and_grad(tsa_fast.distillation_loss, student, teacher, None, **options)
    expected = loss_and_grad(reference_loss, student.double(), teacher.double(), None, **options)
    plain = loss_and_grad(plain_divergence, student, teacher, None, **options)
    for actual, wanted, yardstick, what in zip((loss, grad), expected, plain, ("loss", "grad")):
        assert_rel_close(actual, wanted, 2 * rel_error(yardstick, wanted) + 1e-6, what)


# ---------------------------------------------------------------------------------------------------
# Compiled for GPUs without one: Triton ships ptxas.


def compile_distillation_loss_kernel():
    """The kernel at the launcher's tiles for an LLM vocabulary (every divergence, every option on: bf16
    logits, labels, hard term, softcap, gradient, a temperature per row, the parts; forward KL also with
    none, as a no-grad forward without labels launches it) and for a small one, for sm_80 and sm_90."""
    import triton

    from tsa_fast.kernels import distillation_loss as kernels

    types = dict(
        labels_ptr="*i64",
        loss_ptr="*fp32",
        parts_ptr="*fp32",
        temperature_ptr="*fp32",
        inv_temperature="fp32",
        beta="fp32",
        soft_scale="fp32",
        hard_weight="fp32",
        label_smoothing="fp32",
        softcap="fp32",
    )
    options = dict(
        HAS_LABELS=True,
        HAS_HARD=True,
        HAS_SOFTCAP=True,
        COMPUTE_GRAD=True,
        ROW_TEMPERATURE=True,
        SCALE_BY_T2=True,
        STORE_PARTS=True,
    )
    no_options = {name: False for name in options} | dict(
        labels_ptr=None, grad_ptr=None, temperature_ptr=None, parts_ptr=None
    )
    forward_kl = DIVERGENCES.index("forward_kl")
    cases = [(128256, dict(options, DIVERGENCE=DIVERGENCES.index(d))) for d in DIVERGENCES]
    cases += [(128256, dict(no_options, DIVERGENCE=forward_kl)), (50, dict(options, DIVERGENCE=forward_kl))]
    for vocab, constants in cases:
        block_rows, block_v, num_warps = kernels.tiles(8192, vocab)
        config = triton.Config(dict(BLOCK_ROWS=block_rows, BLOCK_V=block_v), num_warps=num_warps)
        compile_for_gpus(kernels._distillation_loss_fwd_kernel, config, constants, types)


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas")
def test_kernel_compiles_for_ampere_and_hopper():
    run_compiled(__file__)


# ---------------------------------------------------------------------------------------------------
# GPU only (run by benchmarks/gpu.sh where a GPU is lent): bf16 and LLM-sized vocabularies.

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gpu_bf16_large_vocab(backend, divergence):
    student, teacher, labels = make_inputs((64,), 128256, dtype=torch.bfloat16)
    check_against_reference(student, teacher, labels, TOL[torch.bfloat16], divergence=divergence, hard_weight=0.5)


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_large_gradient_buffer_on_huge_pages(backend):
    """A gradient buffer past HUGE_PAGE_MIN_BYTES is advised onto huge pages before the kernel writes it."""
    from tsa_fast.ops.distillation_loss import HUGE_PAGE_MIN_BYTES

    student, teacher, labels = make_inputs((4,), HUGE_PAGE_MIN_BYTES // 16)
    check_against_reference(student, teacher, labels, TOL[torch.float32], divergence="symmetric_kl")


if __name__ == "__main__":  # test_kernel_compiles_for_ampere_and_hopper
    compile_distillation_loss_kernel()


# ---------------------------------------------------------------------------------------------------
# Option types: a flag is a bool, a number is a number, or a TypeError naming the option.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scale_by_t2="no"), "scale_by_t2 must be a bool, got 'no'"),
        (dict(scale_by_t2=None), "scale_by_t2 must be a bool, got None"),
        (dict(scale_by_t2=1), "scale_by_t2 must be a bool, got 1"),
        (dict(beta="0.5"), "beta must be a number, got '0.5'"),
        (dict(beta=None, divergence="jsd"), "beta must be a number, got None"),
        (dict(temperature="2"), "temperature must be a number.*, got '2'"),
        (dict(temperature=None), "temperature must be a number.*, got None"),
        (dict(temperature=True), "temperature must be a number.*, got True"),
        (dict(soft_weight="1"), "soft_weight must be a number, got '1'"),
        (dict(hard_weight=None), "hard_weight must be a number, got None"),
        (dict(label_smoothing="0.1"), "label_smoothing must be a number, got '0.1'"),
        (dict(softcap="30"), "softcap must be a number, got '30'"),
        (dict(softcap=True), "softcap must be a number, got True"),
        (dict(ignore_index=-100.0), "ignore_index must be an int, got -100.0"),
        (dict(ignore_index=None), "ignore_index must be an int, got None"),
        (dict(vocab_size=16.0), "vocab_size must be an int, got 16.0"),
        (dict(divergence=None), "divergence must be one of .*, got None"),
        (dict(reduction=0), "reduction must be one of .*, got 0"),
    ],
)
def test_wrong_option_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        tsa_fast.distillation_loss(_logits(4, 16), _logits(4, 16), torch.zeros(4, dtype=torch.long), **kwargs)


def test_module_wrong_option_type_raises_type_error():
    with pytest.raises(TypeError, match="scale_by_t2 must be a bool"):
        tsa_fast.nn.DistillationLoss(scale_by_t2="no")(_logits(2, 8), _logits(2, 8))


@pytest.mark.parametrize(
    "beta, points_to, not_to", [(0.0, "forward_kl", "reverse_kl"), (1.0, "reverse_kl", "forward_kl")]
)
def test_jsd_beta_limit_points_to_the_divergence_it_tends_to(beta, points_to, not_to):
    """As beta -> 0 this JSD tends to beta x forward KL, as beta -> 1 to (1 - beta) x reverse KL (Liger, TRL)."""
    student, teacher = _logits(4, 16), _logits(4, 16)
    for b, name in ((1e-5, "forward_kl"), (1 - 1e-5, "reverse_kl")):
        jsd = tsa_fast.distillation_loss(student, teacher, divergence="jsd", beta=b).double()
        limit = tsa_fast.distillation_loss(student, teacher, divergence=name).double()
        assert abs(jsd / min(b, 1 - b) / limit - 1) < 1e-2, name
    with pytest.raises(ValueError, match=f"beta={beta}.*use divergence='{points_to}'") as error:
        tsa_fast.distillation_loss(student, teacher, divergence="jsd", beta=beta)
    assert not_to not in str(error.value)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_rows(backend, reduction):
    """Leading shape (0,): 0 for the scalar reductions, an empty tensor for "none", a zero gradient."""
    student, teacher, labels = make_inputs((0,), 16)
    loss, grad = loss_and_grad(tsa_fast.distillation_loss, student, teacher, labels, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ()) and loss.dtype == torch.float32
    assert torch.all(loss == 0) and grad.shape == (0, 16)


# ---------------------------------------------------------------------------------------------------
# num_items_in_batch: the normalizer of reduction="mean" across micro-batches and ranks.


def _micro_batches(rows=(5, 11, 8), vocab=40):
    """A batch cut into uneven micro-batches with different numbers of ignored rows in each."""
    student, teacher, labels = make_inputs((sum(rows),), vocab, ignore="none")
    labels[[0, 1, 2, 7, 20]] = -100  # 3 of 5 ignored, 1 of 11, 1 of 8
    bounds = torch.tensor((0, *rows)).cumsum(0).tolist()
    return student, teacher, labels, list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("num_items_type", ["int", "tensor"])
def test_num_items_in_batch_accumulation_equals_full_batch(backend, num_items_type):
    """Summing the losses of uneven micro-batches, each normalized by the batch's count of counted rows,
    gives the full batch's token mean: loss and gradient (a per-micro-batch mean would weight rows wrongly)."""
    student, teacher, labels, parts = _micro_batches()
    options = dict(divergence="jsd", temperature=2.0, hard_weight=0.5)
    count = int((labels != -100).sum())
    num_items = count if num_items_type == "int" else torch.tensor(count, device=DEVICE)
    full_loss, full_grad = loss_and_grad(tsa_fast.distillation_loss, student, teacher, labels, **options)
    accumulated, naive = torch.zeros(()), torch.zeros(())
    grad = torch.zeros_like(student)
    for start, end in parts:
        loss, part_grad = loss_and_grad(
            tsa_fast.distillation_loss,
            student[start:end],
            teacher[start:end],
            labels[start:end],
            num_items_in_batch=num_items,
            **options,
        )
        accumulated, grad[start:end] = accumulated + loss.cpu(), part_grad
        naive = naive + tsa_fast.distillation_loss(student[start:end], teacher[start:end], labels[start:end], **options)
    assert_rel_close(accumulated, full_loss.cpu(), 1e-6, "loss")
    assert_rel_close(grad, full_grad, 1e-6, "grad")
    assert rel_error(naive / len(parts), full_loss) > 1e-4  # the uneven case: a mean of micro-batch means differs


def test_num_items_in_batch_module(backend):
    student, teacher, labels = make_inputs((6,), 30)
    module = tsa_fast.nn.DistillationLoss(divergence="reverse_kl")
    expected = tsa_fast.distillation_loss(student, teacher, labels, divergence="reverse_kl", reduction="sum") / 17
    assert_rel_close(module(student, teacher, labels, num_items_in_batch=17), expected, 1e-6, "loss")


@pytest.mark.parametrize(
    "num_items, kwargs, error, match",
    [
        (0, dict(), ValueError, "num_items_in_batch must be >= 1, got 0"),
        (-3, dict(), ValueError, "num_items_in_batch must be >= 1, got -3"),
        (torch.tensor(0), dict(), ValueError, "num_items_in_batch must be >= 1, got 0"),
        (2.5, dict(), TypeError, "num_items_in_batch must be an int or a 0-d integer tensor, got 2.5"),
        (True, dict(), TypeError, "num_items_in_batch must be an int or a 0-d integer tensor, got True"),
        ("12", dict(), TypeError, "num_items_in_batch must be an int or a 0-d integer tensor, got '12'"),
        (torch.tensor(3.0), dict(), TypeError, "num_items_in_batch must be .* integer tensor, got .*float32"),
        (torch.tensor([3]), dict(), ValueError, r"num_items_in_batch must be a 0-d tensor, got shape \(1,\)"),
        (5, dict(reduction="sum"), ValueError, "num_items_in_batch applies to reduction='mean', got 'sum'"),
    ],
)
def test_bad_num_items_in_batch_raises(num_items, kwargs, error, match):
    with pytest.raises(error, match=match):
        tsa_fast.distillation_loss(
            _logits(4, 16), _logits(4, 16), torch.zeros(4, dtype=torch.long), num_items_in_batch=num_items, **kwargs
        )


# ---------------------------------------------------------------------------------------------------
# return_parts: the soft (divergence) and hard (cross-entropy) parts of the loss, for logging.


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", [(0.6, 0.4), (1.0, 0.0), (0.0, 0.7)], ids=["both", "soft-only", "hard-only"])
def test_return_parts(backend, reduction, weights):
    """(loss, LossParts(soft, hard)): each part is the loss with the other weight 0, reduced alike, detached;
    the loss is the loss without return_parts, and so is its gradient."""
    soft_weight, hard_weight = weights
    student, teacher, labels = make_inputs((3, 4), 90)
    options = dict(divergence="jsd", temperature=2.0, soft_weight=soft_weight, hard_weight=hard_weight)
    options.update(label_smoothing=0.1, reduction=reduction)
    z = student.clone().requires_grad_()
    loss, parts = tsa_fast.distillation_loss(z, teacher, labels, return_parts=True, **options)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(loss)
    (grad,) = torch.autograd.grad((loss * weights).sum(), z)
    expected, expected_grad = loss_and_grad(tsa_fast.distillation_loss, student, teacher, labels, **options)
    assert torch.equal(loss, expected) and torch.equal(grad, expected_grad)
    only = dict(options, hard_weight=0.0), dict(options, soft_weight=0.0)
    for part, part_options in zip(parts, only):
        assert not part.requires_grad and part.shape == loss.shape
        assert_rel_close(part, reference_loss(student.double(), teacher.double(), labels, **part_options), 1e-5)
    assert_rel_close(parts.soft + parts.hard, loss, 1e-6, "soft + hard")
    assert parts._fields == ("soft", "hard")


def test_return_parts_compiles(backend):
    student, teacher, labels = make_inputs((2, 6), 80)

    def step(s, t, y):
        loss, parts = tsa_fast.distillation_loss(s, t, y, hard_weight=0.5, return_parts=True)
        return loss, parts.soft, parts.hard

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(student, teacher, labels), step(student, teacher, labels)):
        assert_rel_close(got, expected, 1e-6)


PART_WEIGHTS = [(0.6, 0.4), (1.0, 0.0), (0.0, 0.7)]
PART_WEIGHT_IDS = ["both", "soft-only", "hard-only"]


@pytest.mark.parametrize("reduction", [*REDUCTIONS, "num_items"])
@pytest.mark.parametrize("weights", PART_WEIGHTS, ids=PART_WEIGHT_IDS)
@pytest.mark.parametrize("ignore", ["some", "all"])
def test_return_parts_are_the_reference_terms(backend, reduction, weights, ignore):
    """Each part equals the float64 reference's soft or hard term (its return_parts), for every reduction and
    num_items_in_batch, ignored rows and all rows ignored; soft + hard is the loss."""
    soft_weight, hard_weight = weights
    student, teacher, labels = make_inputs((2, 5), 70, ignore=ignore)
    options = dict(divergence="symmetric_kl", temperature=1.5, soft_weight=soft_weight, hard_weight=hard_weight)
    options.update(label_smoothing=0.2, softcap=8.0)
    num_items = dict(num_items_in_batch=13) if reduction == "num_items" else {}
    options["reduction"] = "mean" if num_items else reduction
    loss, parts = tsa_fast.distillation_loss(student, teacher, labels, return_parts=True, **options, **num_items)
    expected, expected_parts = reference_loss(student.double(), teacher.double(), labels, return_parts=True, **options)
    if num_items:  # the reference has no num_items_in_batch: its sums over 13 rows
        sums = reference_loss(
            student.double(), teacher.double(), labels, return_parts=True, **options | dict(reduction="sum")
        )
        expected, expected_parts = sums[0] / 13, [part / 13 for part in sums[1]]
    assert_rel_close(loss, expected, 1e-5, "loss")
    for part, expected_part, name in zip(parts, expected_parts, ("soft", "hard")):
        assert part.dtype == torch.float32 and not part.requires_grad
        assert_rel_close(part, expected_part, 1e-5, name)
    assert_rel_close(parts.soft + parts.hard, loss, 1e-6, "soft + hard")
    if ignore == "all":
        assert not parts.soft.any() and not parts.hard.any()
    if hard_weight == 0.0:
        assert not parts.hard.any()
    if soft_weight == 0.0:
        assert not parts.soft.any()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_return_parts_zero_rows(backend, reduction):
    """No rows: the loss and both parts are 0 (or empty for reduction="none")."""
    student, teacher = (torch.randn(0, 16, device=DEVICE) for _ in range(2))
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss, parts = tsa_fast.distillation_loss(
        student, teacher, labels, hard_weight=0.5, reduction=reduction, return_parts=True
    )
    for value in (loss, *parts):
        assert value.shape == ((0,) if reduction == "none" else ()) and not value.any()


def test_return_parts_infinite_term(backend):
    """A part that is infinite stays in its part: a label on a -inf student logit makes the hard part +inf
    and leaves the soft part (reverse KL: no student mass there) finite; the parts are not derived from each
    other."""
    student, teacher, labels = make_inputs((4,), 40, ignore="none")
    student[1, labels[1]] = -math.inf
    options = dict(divergence="reverse_kl", hard_weight=0.5, reduction="none")
    loss, parts = tsa_fast.distillation_loss(student, teacher, labels, return_parts=True, **options)
    expected, expected_parts = reference_loss(student.double(), teacher.double(), labels, return_parts=True, **options)
    assert math.isinf(loss[1]) and math.isinf(parts.hard[1]) and parts.soft.isfinite().all()
    assert_rel_close(parts.soft, expected_parts.soft, 1e-5, "soft")
    assert_rel_close(parts.hard, expected_parts.hard, 1e-5, "hard")


def count_row_passes(monkeypatch, backend) -> list:
    """Records each pass over the logits: a launch of the loss kernel (triton, cpp; whether it was asked for
    the parts), or a call of the reference's row function (torch)."""
    from tsa_fast.backends import triton_kernels

    ops = importlib.import_module("tsa_fast.ops.distillation_loss")  # (tsa_fast.ops.distillation_loss: the function)
    reference = importlib.import_module("tsa_fast.reference.distillation_loss")

    module, name = {
        "torch": (reference, "distillation_loss_rows"),
        "cpp": (ops, "distillation_loss_forward_cpp"),
        "triton": (triton_kernels, "distillation_loss_forward"),
    }[backend]
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(kwargs.get("row_parts") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_return_parts_same_pass(backend, monkeypatch, grad):
    """return_parts launches the loss kernel (or calls the reference's row function) exactly as often as a call
    without parts, once: the parts come from the pass that gives the loss and its gradient. The kernels are
    asked to store the parts only with return_parts."""
    student, teacher, labels = make_inputs((3, 4), 50)
    options = dict(divergence="jsd", soft_weight=0.6, hard_weight=0.4, label_smoothing=0.1)
    calls = count_row_passes(monkeypatch, backend)
    z = student.clone().requires_grad_(grad)
    loss = tsa_fast.distillation_loss(z, teacher, labels, **options)
    without_parts = list(calls)
    calls.clear()
    loss_with_parts, _ = tsa_fast.distillation_loss(z, teacher, labels, return_parts=True, **options)
    assert len(calls) == len(without_parts) == 1
    if backend != "torch":
        assert without_parts == [False] and calls == [True]
    if grad:
        (loss_with_parts + loss).backward()
    assert len(calls) == 1
    assert torch.equal(loss, loss_with_parts)


def test_return_parts_checked():
    with pytest.raises(TypeError, match="return_parts must be a bool, got 1"):
        tsa_fast.distillation_loss(_logits(2, 8), _logits(2, 8), return_parts=1)


# ---------------------------------------------------------------------------------------------------
# temperature as a tensor: one per row (TextBrewer's dynamic temperature) or a 0-d tensor.


def per_row_reference(student, teacher, labels, temperature, **options):
    """Float64 per-row losses, each row at its own temperature (the reference run row by row)."""
    rows = [
        reference_loss(
            student[i : i + 1].double(),
            teacher[i : i + 1].double(),
            None if labels is None else labels[i : i + 1],
            temperature=float(temperature[i]),
            reduction="none",
            **options,
        )
        for i in range(student.shape[0])
    ]
    return torch.cat(rows)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("scale_by_t2", [True, False])
def test_row_temperature_matches_reference_row_by_row(backend, divergence, scale_by_t2):
    student, teacher, labels = make_inputs((9,), 70)
    temperature = torch.rand(9, device=DEVICE) * 3.5 + 0.5
    options = dict(divergence=divergence, scale_by_t2=scale_by_t2, hard_weight=0.3, label_smoothing=0.1, softcap=20.0)
    loss, grad = loss_and_grad(
        tsa_fast.distillation_loss, student, teacher, labels, temperature=temperature, reduction="none", **options
    )
    z = student.double().requires_grad_()
    expected = per_row_reference(z, teacher, labels, temperature, **options)
    weights = torch.rand(loss.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), z)
    assert_rel_close(loss, expected, TOL[torch.float32], "loss")
    grad_tol = 1e-4 if divergence == "tvd" else TOL[torch.float32]
    assert_rel_close(grad, expected_grad, grad_tol, "grad")


def test_row_temperature_of_the_leading_shape_and_zero_dim(backend):
    """A temperature of the leading shape (2, 3); a 0-d tensor equals the same float."""
    student, teacher, labels = make_inputs((2, 3), 50)
    temperature = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.5, 4.0]], device=DEVICE)
    loss = tsa_fast.distillation_loss(student, teacher, labels, temperature=temperature, reduction="sum")
    expected = per_row_reference(
        student.reshape(6, -1), teacher.reshape(6, -1), labels.reshape(6), temperature.reshape(6)
    )
    assert_rel_close(loss, expected.sum(), TOL[torch.float32], "loss")
    zero_dim = tsa_fast.distillation_loss(student, teacher, labels, temperature=torch.tensor(2.5, device=DEVICE))
    assert_rel_close(zero_dim, tsa_fast.distillation_loss(student, teacher, labels, temperature=2.5), 1e-6, "0-d")


def test_row_temperature_compiles(backend):
    student, teacher, labels = make_inputs((2, 6), 80)
    temperature = torch.rand(2, 6, device=DEVICE) + 0.5

    def step(s, t, y, temperature):
        return tsa_fast.distillation_loss(s, t, y, temperature=temperature, hard_weight=0.5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, grad = loss_and_grad(lambda *a: compiled(*a, temperature), student, teacher, labels)
    expected_loss, expected_grad = loss_and_grad(lambda *a: step(*a, temperature), student, teacher, labels)
    assert_rel_close(loss, expected_loss, 1e-6, "loss")
    assert_rel_close(grad, expected_grad, 1e-6, "grad")


@pytest.mark.parametrize(
    "temperature, error, match",
    [
        (torch.ones(3), ValueError, r"temperature must be a 0-d tensor or of the leading shape \(4,\), got \(3,\)"),
        (torch.ones(4, 1), ValueError, r"temperature must be .* leading shape \(4,\), got \(4, 1\)"),
        (torch.ones(4, dtype=torch.long), TypeError, "temperature must be a floating-point tensor, got torch.int64"),
        (torch.tensor([1.0, 0.0, 2.0, 1.0]), ValueError, r"temperature must be finite and > 0, got \[0.0\]"),
        (torch.tensor([1.0, -1.0, math.nan, math.inf]), ValueError, r"temperature .* got \[-1.0, nan, inf\]"),
        (torch.tensor(0.0), ValueError, r"temperature must be finite and > 0, got \[0.0, 0.0, 0.0, 0.0\]"),
        (torch.ones(4, device="meta"), ValueError, "temperature on meta but the logits on cpu"),
    ],
)
def test_bad_tensor_temperature_raises(temperature, error, match):
    with pytest.raises(error, match=match):
        tsa_fast.distillation_loss(_logits(4, 16), _logits(4, 16), temperature=temperature)


def test_tensor_checks_off_the_cpu_are_device_asserts(monkeypatch):
    """Off the CPU the value checks of num_items_in_batch and of per-row temperatures are asynchronous device
    asserts, never a host read: on meta tensors (where any host read raises) each is issued, naming its value."""
    from tsa_fast.ops.distillation_loss import check_num_items, check_temperature_values

    issued = []
    monkeypatch.setattr(torch, "_assert_async", lambda condition, message: issued.append(message))
    check_num_items(torch.tensor(5, device="meta"), "mean")
    check_temperature_values(torch.ones(4, device="meta"))
    assert len(issued) == 2 and "num_items_in_batch" in issued[0] and "temperature" in issued[1]


def test_kernel_divergence_codes_follow_the_one_list_of_names():
    """The Triton kernel's DIVERGENCE codes are the names' indices in reference.DIVERGENCES (what the ops pass)."""
    kernel = pytest.importorskip("tsa_fast.kernels.distillation_loss")
    codes = [kernel.FORWARD_KL, kernel.REVERSE_KL, kernel.SYMMETRIC_KL, kernel.JSD, kernel.TVD]
    names = ["forward_kl", "reverse_kl", "symmetric_kl", "jsd", "tvd"]
    assert [DIVERGENCES.index(name) for name in names] == [getattr(code, "value", code) for code in codes]
