"""`tsa_fast.cross_tokenizer_loss`: every backend against the float64 reference, the identity alignment against
`distillation_loss`, hand-built alignments, edges and errors."""

import math
import sys

import pytest
import torch
from conftest import DEVICE, assert_rel_close, compile_for_gpus, rel_error, run_compiled

import tsa_fast
from tsa_fast import TokenAlignment
from tsa_fast.reference.cross_tokenizer_loss import cross_tokenizer_loss as reference_loss
from tsa_fast.reference.distillation_loss import DIVERGENCES

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def alignment_from_boundaries(student_ends, teacher_ends, n_s, n_t, v_s, v_t) -> TokenAlignment:
    """The alignment of two tokenizations of one text given by each token's end offset (increasing; the
    student's token i is predicted by row i, likewise the teacher's). A group ends where both end a token;
    rows past the tokens (n_s > len(student_ends)) belong to no group."""
    shared = sorted(set(student_ends) & set(teacher_ends))
    fields = {}
    for side, ends, n_rows, vocab in (("student", student_ends, n_s, v_s), ("teacher", teacher_ends, n_t, v_t)):
        prefix = torch.full((n_rows,), -1, dtype=torch.long)
        last_rows, group = [], 0
        for row, end in enumerate(ends):
            if end in shared:
                last_rows.append(row)
                group += 1
            else:
                prefix[row] = group
        fields[f"{side}_rows"] = torch.tensor(last_rows, dtype=torch.long)
        fields[f"{side}_prefix"] = prefix
        fields[f"{side}_tokens"] = torch.randint(0, vocab, (n_rows,))
    # A group whose text ends past the last shared boundary has no last row: its prefix rows belong to none.
    for side in ("student", "teacher"):
        prefix = fields[f"{side}_prefix"]
        prefix[prefix >= len(shared)] = -1
    return TokenAlignment(**{name: tensor.to(DEVICE) for name, tensor in fields.items()})


def random_alignment(n_s, n_t, v_s, v_t) -> TokenAlignment:
    """Two random tokenizations of one text of 3 * min(n_s, n_t) bytes with all their tokens in groups
    except a few trailing rows: merges on both sides, stretches without a shared boundary."""
    length = 3 * min(n_s, n_t)
    tokens_s, tokens_t = n_s - 1, n_t - 2  # trailing rows with no group
    student = sorted(torch.randperm(length - 1)[: tokens_s - 1].add(1).tolist() + [length])
    teacher = sorted(torch.randperm(length - 1)[: tokens_t - 1].add(1).tolist() + [length])
    return alignment_from_boundaries(student, teacher, n_s, n_t, v_s, v_t)


def random_map(v_s, v_t, m):
    return torch.stack([torch.randperm(v_s)[:m], torch.randperm(v_t)[:m]], 1).to(DEVICE)


def identity_alignment(n, vocab) -> TokenAlignment:
    rows = torch.arange(n, device=DEVICE)
    none = torch.full((n,), -1, dtype=torch.long, device=DEVICE)
    tokens = torch.zeros(n, dtype=torch.long, device=DEVICE)
    return TokenAlignment(rows, rows, none, none, tokens, tokens)


def make_inputs(n_s=9, n_t=8, v_s=40, v_t=48, m=25, dtype=torch.float32, scale=3.0):
    student = (torch.randn(n_s, v_s) * scale).to(DEVICE, dtype)
    teacher = (torch.randn(n_t, v_t) * scale).to(DEVICE, dtype)
    labels = torch.randint(0, v_s, (n_s,), device=DEVICE)
    labels[torch.rand(n_s, device=DEVICE) < 0.3] = -100
    return student, teacher, random_alignment(n_s, n_t, v_s, v_t), random_map(v_s, v_t, m), labels


def loss_and_grad(fn, student, teacher, alignment, vocab_map, labels, upstream=1.7, **options):
    student = student.detach().clone().requires_grad_()
    loss = fn(student, teacher, alignment, vocab_map, labels, **options)
    (grad,) = torch.autograd.grad(loss * upstream, student)
    return loss, grad


def check_against_reference(student, teacher, alignment, vocab_map, labels, tol, **options):
    """Loss and gradient against the float64 reference within `tol`, or within twice the error of the reference
    run in the input dtype where that is larger."""
    loss, grad = loss_and_grad(tsa_fast.cross_tokenizer_loss, student, teacher, alignment, vocab_map, labels, **options)
    ref_loss, ref_grad = loss_and_grad(
        reference_loss, student.double(), teacher.double(), alignment, vocab_map, labels, **options
    )
    plain_loss, plain_grad = loss_and_grad(reference_loss, student, teacher, alignment, vocab_map, labels, **options)
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype
    assert_rel_close(loss, ref_loss, max(tol, 2 * rel_error(plain_loss, ref_loss)), "loss")
    assert_rel_close(grad, ref_grad, max(tol, 2 * rel_error(plain_grad, ref_grad)), "grad")
    return loss, grad


OPTIONS = [
    dict(),
    dict(temperature=2.0, uld_top_k=5, hard_weight=0.5, exact_weight=0.7, uld_weight=1.3, beta=0.3),
    dict(temperature=0.8, uld_top_k=1, reduction="sum", hard_weight=0.2),
    dict(uld_top_k=1000, exact_weight=0.0),
]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("options", OPTIONS, ids=["defaults", "T2-k5-hard", "T0.8-k1-sum", "fullsort-no-exact"])
def test_matches_reference(backend, divergence, options):
    student, teacher, alignment, vocab_map, labels = make_inputs()
    tol = 1e-4 if divergence == "tvd" else TOL[torch.float32]  # TVD's gradient jumps at ties p = q
    check_against_reference(student, teacher, alignment, vocab_map, labels, tol, divergence=divergence, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_low_precision_within_twice_plain_pytorch(backend, dtype, divergence):
    student, teacher, alignment, vocab_map, labels = make_inputs(dtype=dtype)
    check_against_reference(
        student, teacher, alignment, vocab_map, labels, TOL[dtype], divergence=divergence, uld_top_k=6, hard_weight=0.3
    )


def test_mixed_dtypes_and_vocabularies_smaller_than_k(backend):
    """A bf16 student against an fp32 teacher and an fp32 one against a float64 teacher, both vocabularies
    under k (the full sort, the shorter side padded)."""
    student, teacher, alignment, vocab_map, labels = make_inputs(v_s=10, v_t=14, m=6)
    check_against_reference(student.bfloat16(), teacher, alignment, vocab_map, labels, TOL[torch.bfloat16])
    check_against_reference(student, teacher.double(), alignment, vocab_map, labels, TOL[torch.float32])


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_identity_alignment_is_distillation_loss(backend, divergence, temperature):
    """Same tokenizer: the exact term is `distillation_loss`'s soft term (loss and gradient)."""
    student, teacher, _, _, labels = make_inputs(n_s=7, n_t=7, v_s=30, v_t=30)
    identity = torch.arange(30, device=DEVICE)[:, None].expand(30, 2)
    options = dict(divergence=divergence, temperature=temperature)
    loss, grad = loss_and_grad(
        tsa_fast.cross_tokenizer_loss,
        student,
        teacher,
        identity_alignment(7, 30),
        identity,
        None,
        uld_weight=0.0,
        **options,
    )
    expected, expected_grad = loss_and_grad(
        lambda s, t, *_, **o: tsa_fast.distillation_loss(s, t, **o), student, teacher, None, None, None, **options
    )
    assert_rel_close(loss, expected, 1e-5, "loss")
    assert_rel_close(grad, expected_grad, 1e-4 if divergence == "tvd" else 1e-5, "grad")


def test_identity_alignment_of_equal_logits_has_zero_uld(backend):
    student, _, _, _, _ = make_inputs(n_s=6, v_s=30)
    identity = torch.arange(30, device=DEVICE)[:, None].expand(30, 2)
    _, parts = tsa_fast.cross_tokenizer_loss(
        student, student.clone(), identity_alignment(6, 30), identity, uld_top_k=7, return_parts=True
    )
    assert parts.exact.abs() < 1e-6 and parts.uld.abs() < 1e-6 and parts.hard == 0


def test_reference_by_hand():
    """One teacher token = two student tokens (scale c_s = q_0[token]), and the reverse, worked out by hand."""
    z_s = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [0.5, 0.0, 1.0]], dtype=torch.float64)
    z_t = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]], dtype=torch.float64)
    # Group 0: student rows 0, 1 (row 0 predicts token 2) vs teacher row 0; group 1: student row 2 vs teacher
    # rows 1, 2 (row 1 predicts token 0).
    alignment = TokenAlignment(
        torch.tensor([1, 2]),
        torch.tensor([0, 2]),
        torch.tensor([0, -1, -1]),
        torch.tensor([-1, 1, -1]),
        torch.tensor([2, 0, 0]),
        torch.tensor([0, 0, 0]),
    )
    vocab_map = torch.tensor([[0, 1], [2, 0]])
    q, p = z_s.softmax(-1), z_t.softmax(-1)
    c_s = torch.tensor([q[0, 2], 1.0])
    c_t = torch.tensor([1.0, p[1, 0]])
    uld = 0.0
    exact = 0.0
    for g, (s, t) in enumerate([(1, 0), (2, 2)]):
        qs = torch.sort(q[s], descending=True).values
        ps = torch.nn.functional.pad(torch.sort(p[t], descending=True).values, (0, 1))
        uld += (c_s[g] * qs[:2] - c_t[g] * ps[:2]).abs().sum() + (c_s[g] * qs[2:].sum() - c_t[g] * ps[2:].sum()).abs()
        q_shared = q[s, [0, 2]] / q[s, [0, 2]].sum()
        p_shared = p[t, [1, 0]] / p[t, [1, 0]].sum()
        exact += (p_shared * (p_shared / q_shared).log()).sum()
    loss = reference_loss(z_s, z_t, alignment, vocab_map, uld_top_k=2)
    assert torch.allclose(loss, (uld + exact) / 2, rtol=1e-12)


@pytest.mark.parametrize("k", [3, 17])
def test_top_k_against_the_full_sort(backend, k):
    """k = V equals the full sort of both sides (vocabularies equal); any k < V the reference's sort cut at k."""
    student, teacher, alignment, vocab_map, labels = make_inputs(v_s=17, v_t=17, m=9)
    options = dict(uld_top_k=k, exact_weight=0.0)
    loss, _ = check_against_reference(student, teacher, alignment, vocab_map, labels, 1e-5, **options)
    if k == 17:
        full = reference_loss(
            student.double(), teacher.double(), alignment, vocab_map, uld_top_k=10**6, exact_weight=0.0
        )
        assert_rel_close(loss, full, 1e-5, "k = V vs the full sort")


def test_ignored_labels_contribute_nothing(backend):
    student, teacher, alignment, vocab_map, labels = make_inputs()
    labels[:4] = -100
    loss, grad = loss_and_grad(
        tsa_fast.cross_tokenizer_loss,
        student,
        teacher,
        alignment,
        vocab_map,
        labels,
        hard_weight=1.0,
        uld_weight=0.0,
        exact_weight=0.0,
    )
    expected = torch.nn.functional.cross_entropy(student.double(), labels, ignore_index=-100)
    assert_rel_close(loss, expected, 1e-5, "hard CE")
    assert torch.all(grad[:4] == 0) and torch.any(grad[4:] != 0)


def test_all_labels_ignored_and_zero_groups(backend):
    """G = 0 and every label ignored: a zero loss with a zero gradient."""
    student, teacher, _, vocab_map, labels = make_inputs()
    labels.fill_(-100)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    none_s = torch.full((student.shape[0],), -1, device=DEVICE)
    none_t = torch.full((teacher.shape[0],), -1, device=DEVICE)
    alignment = TokenAlignment(empty, empty, none_s, none_t, none_s * 0, none_t * 0)
    loss, grad = loss_and_grad(
        tsa_fast.cross_tokenizer_loss, student, teacher, alignment, vocab_map, labels, hard_weight=1.0
    )
    assert loss == 0 and torch.all(grad == 0)


def test_empty_map_gives_zero_exact_term(backend):
    student, teacher, alignment, _, labels = make_inputs()
    empty_map = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    loss, parts = tsa_fast.cross_tokenizer_loss(student, teacher, alignment, empty_map, labels, return_parts=True)
    assert parts.exact == 0 and parts.uld > 0
    check_against_reference(student, teacher, alignment, empty_map, labels, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_return_parts_sum_to_the_loss(backend, reduction):
    student, teacher, alignment, vocab_map, labels = make_inputs()
    options = dict(hard_weight=0.4, uld_top_k=4, reduction=reduction)
    loss, parts = tsa_fast.cross_tokenizer_loss(
        student, teacher, alignment, vocab_map, labels, return_parts=True, **options
    )
    _, expected = reference_loss(
        student.double(), teacher.double(), alignment, vocab_map, labels, return_parts=True, **options
    )
    for name, part, ref in zip(parts._fields, parts, expected):
        assert_rel_close(part, ref, 1e-5, name)
        assert not part.requires_grad
    assert torch.allclose(loss, sum(parts), rtol=1e-6)


def test_int32_indices(backend):
    student, teacher, alignment, vocab_map, labels = make_inputs()
    small = TokenAlignment(*(field.int() for field in alignment))
    expected = tsa_fast.cross_tokenizer_loss(student, teacher, alignment, vocab_map, labels, hard_weight=0.5)
    loss = tsa_fast.cross_tokenizer_loss(student, teacher, small, vocab_map.int(), labels.int(), hard_weight=0.5)
    assert torch.equal(loss, expected)


def test_second_backward_raises(backend):
    student, teacher, alignment, vocab_map, labels = make_inputs()
    student.requires_grad_()
    loss = tsa_fast.cross_tokenizer_loss(student, teacher, alignment, vocab_map, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_float64_gradient_matches_finite_differences(backend):
    """The op's float64 gradient against central differences along random directions (the ULD term is
    piecewise smooth: random inputs sit away from its kinks)."""
    student, teacher, alignment, vocab_map, labels = make_inputs(n_s=6, n_t=6, v_s=9, v_t=11, m=5)
    student, teacher = student.double(), teacher.double()
    options = dict(uld_top_k=3, hard_weight=0.5, divergence="jsd")
    fn = lambda s: tsa_fast.cross_tokenizer_loss(s, teacher, alignment, vocab_map, labels, **options)  # noqa: E731
    _, grad = loss_and_grad(
        tsa_fast.cross_tokenizer_loss, student, teacher, alignment, vocab_map, labels, 1.0, **options
    )
    for _ in range(3):
        direction = torch.randn_like(student)
        step = 1e-6
        numeric = (fn(student + step * direction) - fn(student - step * direction)) / (2 * step)
        assert torch.allclose((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# Bad input: a ValueError or TypeError naming it.


def _replace(alignment, **fields):
    return alignment._replace(**{name: torch.tensor(value, device=DEVICE) for name, value in fields.items()})


def test_bad_alignments_raise():
    student, teacher, alignment, vocab_map, labels = make_inputs(n_s=5, n_t=4, v_s=12, v_t=10, m=4)
    ok = TokenAlignment(
        torch.tensor([1, 3]),
        torch.tensor([0, 2]),
        torch.tensor([0, -1, 1, -1, -1]),
        torch.tensor([-1, 1, -1, -1]),
        torch.tensor([2, 0, 5, 0, 0]),
        torch.tensor([0, 9, 0, 0]),
    )
    ok = TokenAlignment(*(field.to(DEVICE) for field in ok))
    tsa_fast.cross_tokenizer_loss(student, teacher, ok, vocab_map)
    cases = [
        (dict(student_rows=[1, 5]), r"student_rows must be in \[0, 5\).*\[5\]"),
        (dict(teacher_rows=[-1, 2]), r"teacher_rows must be in \[0, 4\).*\[-1\]"),
        (dict(student_rows=[3, 3]), r"student_rows must be distinct"),
        (dict(student_prefix=[0, -1, 2, -1, -1]), r"student_prefix must be in \[-1, 2\).*\[2\]"),
        (dict(teacher_prefix=[-2, 1, -1, -1]), r"teacher_prefix must be in \[-1, 2\)"),
        (dict(student_tokens=[12, 0, 5, 0, 0]), r"student_tokens must be in \[0, 12\).*\[12\]"),
        (dict(teacher_tokens=[0, 10, 0, 0]), r"teacher_tokens must be in \[0, 10\).*\[10\]"),
        (dict(teacher_rows=[0, 1, 2]), r"teacher_rows must have shape \(2,\)"),
        (dict(student_prefix=[0, -1, 1, -1]), r"student_prefix must have shape \(5,\)"),
    ]
    for fields, match in cases:
        with pytest.raises(ValueError, match=match):
            tsa_fast.cross_tokenizer_loss(student, teacher, _replace(ok, **fields), vocab_map)
    with pytest.raises(ValueError, match="alignment.student_rows must be int64 or int32, got torch.float32"):
        tsa_fast.cross_tokenizer_loss(student, teacher, ok._replace(student_rows=ok.student_rows.float()), vocab_map)
    with pytest.raises(TypeError, match="alignment must be a TokenAlignment, got tuple"):
        tsa_fast.cross_tokenizer_loss(student, teacher, tuple(ok), vocab_map)
    with pytest.raises(TypeError, match="alignment.teacher_tokens must be a torch.Tensor, got list"):
        tsa_fast.cross_tokenizer_loss(student, teacher, ok._replace(teacher_tokens=[0, 0, 0, 0]), vocab_map)


def test_bad_maps_and_tensors_raise():
    student, teacher, alignment, vocab_map, labels = make_inputs(v_s=12, v_t=10, m=4)
    cases = [
        ([[0, 1], [12, 2]], r"vocab_map student ids must be in \[0, 12\).*\[12\]"),
        ([[0, 1], [3, -1]], r"vocab_map teacher ids must be in \[0, 10\).*\[-1\]"),
        ([[0, 1], [0, 2]], r"vocab_map student ids must be distinct.*got \[0\]"),
        ([[0, 1], [2, 1]], r"vocab_map teacher ids must be distinct"),
        ([[0, 1, 2]], r"vocab_map must have shape \(M, 2\), got \(1, 3\)"),
    ]
    for value, match in cases:
        with pytest.raises(ValueError, match=match):
            tsa_fast.cross_tokenizer_loss(student, teacher, alignment, torch.tensor(value, device=DEVICE))
    with pytest.raises(ValueError, match="vocab_map must be int64 or int32, got torch.float32"):
        tsa_fast.cross_tokenizer_loss(student, teacher, alignment, vocab_map.float())
    with pytest.raises(TypeError, match="vocab_map must be a torch.Tensor, got list"):
        tsa_fast.cross_tokenizer_loss(student, teacher, alignment, [[0, 1]])
    with pytest.raises(ValueError, match=r"student_logits must be \(N, V\)"):
        tsa_fast.cross_tokenizer_loss(student[None], teacher, alignment, vocab_map)
    with pytest.raises(ValueError, match="teacher_logits must be float.*torch.int64"):
        tsa_fast.cross_tokenizer_loss(student, teacher.long(), alignment, vocab_map)
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        tsa_fast.cross_tokenizer_loss(student.tolist(), teacher, alignment, vocab_map)
    with pytest.raises(ValueError, match=r"labels shape \(3,\)"):
        tsa_fast.cross_tokenizer_loss(student, teacher, alignment, vocab_map, labels[:3])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 12\)"):
        tsa_fast.cross_tokenizer_loss(student, teacher, alignment, vocab_map, labels.clamp(min=0) + 12)
    with pytest.raises(ValueError, match="hard_weight=0.5 needs labels"):
        tsa_fast.cross_tokenizer_loss(student, teacher, alignment, vocab_map, hard_weight=0.5)
    with pytest.raises(ValueError, match="on meta"):
        tsa_fast.cross_tokenizer_loss(student, teacher.to("meta"), alignment, vocab_map)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(uld_top_k=0), ValueError, "uld_top_k must be >= 1, got 0"),
        (dict(uld_top_k=2.0), TypeError, "uld_top_k must be an int"),
        (dict(uld_top_k=True), TypeError, "uld_top_k must be an int"),
        (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=math.inf), ValueError, "temperature must be finite and > 0"),
        (dict(temperature="1"), TypeError, "temperature must be a number"),
        (dict(exact_weight=-1.0), ValueError, "exact_weight must be finite and >= 0"),
        (dict(uld_weight=math.nan), ValueError, "uld_weight must be finite and >= 0"),
        (dict(hard_weight=None), TypeError, "hard_weight must be a number"),
        (dict(exact_weight=True), TypeError, "exact_weight must be a number"),
        (dict(divergence="kl"), ValueError, "divergence must be one of"),
        (dict(divergence="jsd", beta=1.0), ValueError, "beta strictly inside"),
        (dict(reduction="none"), ValueError, r"reduction must be one of \('mean', 'sum'\)"),
        (dict(return_parts=1), TypeError, "return_parts must be a bool"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    student, teacher, alignment, vocab_map, labels = make_inputs()
    with pytest.raises(error, match=match):
        tsa_fast.cross_tokenizer_loss(student, teacher, alignment, vocab_map, labels, **kwargs)


KERNELS = {
    "triton": ("cross_tokenizer_logsumexp", "cross_tokenizer_softmax_rows", "cross_tokenizer_exact"),
    "cpp": ("cross_tokenizer_statistics_cpu", "cross_tokenizer_gradient_cpu"),
}


@pytest.mark.parametrize("forced", ["triton", "cpp"])
def test_kernel_backends_run_their_kernels(monkeypatch, forced):
    """A forced kernel backend runs its own row sweeps (the answers are checked above)."""
    from tsa_fast import backends

    if forced not in backends.available_backends(DEVICE) or (forced == "cpp" and DEVICE.type != "cpu"):
        pytest.skip(f"{forced} kernels of this op are not available on {DEVICE.type}")
    module = backends.triton_kernels if forced == "triton" else backends.cpp_extension
    monkeypatch.setenv("TSA_FAST_BACKEND", forced)
    calls = []
    for name in KERNELS[forced]:
        launcher = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=launcher, _n=name, **k: calls.append(_n) or _f(*a, **k))
    student, teacher, alignment, vocab_map, labels = make_inputs()
    tsa_fast.cross_tokenizer_loss(student, teacher, alignment, vocab_map, labels, hard_weight=0.5)
    assert sorted(set(calls)) == sorted(KERNELS[forced])


# ---------------------------------------------------------------------------------------------------
# Compiled for GPUs without one: Triton ships ptxas.


def compile_cross_tokenizer_kernels():
    """The three kernels at the launchers' tiles for an LLM vocabulary (bf16 logits, every option on; the exact
    kernel for every divergence) and a small one, for sm_80 and sm_90."""
    import triton

    from tsa_fast.kernels import cross_tokenizer_loss as kernels
    from tsa_fast.kernels.distillation_loss import tiles

    scalars = dict(inv_t="fp32", beta="fp32", grad_scale="fp32")
    for vocab in (128256, 50):
        block_rows, block_v, num_warps = tiles(8192, vocab)
        config = triton.Config(dict(BLOCK_ROWS=block_rows, BLOCK_V=block_v), num_warps=num_warps)
        for kernel in (kernels._cross_tokenizer_logsumexp_kernel, kernels._cross_tokenizer_softmax_rows_kernel):
            types = dict(lse_ptr="*fp32", lse_hard_ptr="*fp32", grad_ptr="*fp32", **scalars)
            types |= dict(coefficient_ptr="*fp32", coefficient_hard_ptr="*fp32")
            compile_for_gpus(kernel, config, dict(HAS_HARD=True), types)
        block_m, num_warps = kernels.exact_tile(vocab)
        config = triton.Config(dict(BLOCK_M=block_m), num_warps=num_warps)
        types = dict(
            student_rows_ptr="*i64", teacher_rows_ptr="*i64", map_ptr="*i64", grad_ptr="*fp32", out_ptr="*fp32"
        )
        for divergence in DIVERGENCES:
            constants = dict(DIVERGENCE=DIVERGENCES.index(divergence))
            compile_for_gpus(kernels._cross_tokenizer_exact_kernel, config, constants, {**types, **scalars})


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas")
def test_kernels_compile_for_ampere_and_hopper():
    run_compiled(__file__)


if __name__ == "__main__":  # test_kernels_compile_for_ampere_and_hopper
    compile_cross_tokenizer_kernels()
