"""`tsa_fast.attention_varlen`: packed sequences (flash_attn_varlen_func's layout) on the triton and torch backends
against the float64 reference by the FlashAttention test rule (output, lse and the gradients through both), with
causal, windows, softcap and GQA; a packed batch against its sequences run one by one; the grid; compiled for
sm_80 and sm_90; every bad input."""

import math
import re
import sys

import pytest
import torch
from conftest import DEVICE, assert_rel_close, compile_for_gpus, rel_error, run_compiled, unit_strides
from test_attention import ATOL, outputs_and_grads, pytorch_banded_attention

import tsa_fast
from tsa_fast.ops.attention import attention_varlen_prechecked, check_cu_seqlens
from tsa_fast.reference.attention import attention_varlen as reference_attention_varlen
from tsa_fast.reference.attention import per_sequence

both_backends = pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)


def cu_seqlens(lengths) -> torch.Tensor:
    """(S + 1,) int32 offsets of sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def packed_inputs(lengths_q, lengths_k=None, heads=2, heads_kv=None, d=16, d_v=None, dtype=torch.float32):
    """q (total_q, H, D), k (total_k, H_kv, D), v (total_k, H_kv, D_v) and the varlen arguments (cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k)."""
    lengths_k = lengths_q if lengths_k is None else lengths_k
    heads_kv = heads if heads_kv is None else heads_kv
    randn = lambda n, h, dim: torch.randn(n, h, dim, device=DEVICE).to(dtype)  # noqa: E731
    q, k, v = (
        randn(sum(lengths_q), heads, d),
        randn(sum(lengths_k), heads_kv, d),
        randn(sum(lengths_k), heads_kv, d_v or d),
    )
    return q, k, v, (cu_seqlens(lengths_q), cu_seqlens(lengths_k), max(lengths_q), max(lengths_k))


def pytorch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, **options):
    """The test rule's yardstick: PyTorch's attention in the inputs' dtype (`pytorch_banded_attention`) per
    sequence."""

    def attend(q, k, v, return_lse, **options):
        return pytorch_banded_attention(q, k, v, **options)

    return per_sequence(attend, q, k, v, cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), **options)


def varlen_rule(q, k, v, packed, grad_out, grad_lse, **options):
    """The float64 reference's out, lse, dq, dk, dv for these upstream gradients, and the error each may have:
    twice that of PyTorch's attention in the inputs' dtype plus ATOL (the FlashAttention test rule)."""

    def reference(q, k, v, **o):
        return reference_attention_varlen(q, k, v, *packed[:2], return_lse=True, **o)

    expected = outputs_and_grads(reference, *(x.double() for x in (q, k, v)), grad_out, grad_lse, **options)
    yardstick = outputs_and_grads(
        lambda q, k, v, **o: pytorch_varlen(q, k, v, *packed[:2], **o), q, k, v, grad_out, grad_lse, **options
    )
    allowed = [
        2 * rel_error(torch_own[wanted.isfinite()], wanted[wanted.isfinite()]) + ATOL[q.dtype]
        for torch_own, wanted in zip(yardstick, expected)
    ]
    return expected, allowed


def varlen_outputs_and_grads(q, k, v, packed, grad_out, grad_lse, **options):
    """`tsa_fast.attention_varlen`'s out, lse, dq, dk, dv for these upstream gradients."""

    def fused(q, k, v, **o):
        return tsa_fast.attention_varlen(q, k, v, *packed, return_lse=True, **o)

    return outputs_and_grads(fused, q, k, v, grad_out, grad_lse, **options)


def check_varlen(q, k, v, packed, **options):
    """Output, lse, dq, dk, dv of `tsa_fast.attention_varlen` against the float64 reference, each within twice
    the error of PyTorch's attention in the inputs' dtype plus ATOL."""
    grad_out = torch.randn(*q.shape[:2], v.shape[2], device=DEVICE)
    grad_lse = torch.randn(q.shape[1], q.shape[0], device=DEVICE)
    results = varlen_outputs_and_grads(q, k, v, packed, grad_out, grad_lse, **options)
    expected, allowed = varlen_rule(q, k, v, packed, grad_out, grad_lse, **options)
    out, lse, dq, dk, dv = results
    assert out.shape == (*q.shape[:2], v.shape[2]) and lse.shape == (q.shape[1], q.shape[0])
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and (dq.dtype, dk.dtype, dv.dtype) == (q.dtype,) * 3
    for actual, wanted, tol, what in zip(results, expected, allowed, ("out", "lse", "dq", "dk", "dv")):
        assert_rel_close(actual, wanted, tol, what)
    return results


# Sequences of length 1 and lengths that are no multiples of the interpreter's tiles (16, 32).
LENGTHS = [1, 37, 16, 50, 1, 5]
CASES = {
    "plain": (dict(lengths_q=LENGTHS), dict()),
    "causal": (dict(lengths_q=LENGTHS), dict(causal=True)),
    "causal-Nq!=Nk": (dict(lengths_q=[1, 20, 33, 7], lengths_k=[5, 20, 64, 3]), dict(causal=True)),
    "cross-Nq!=Nk": (dict(lengths_q=[9, 1, 40], lengths_k=[30, 17, 2]), dict()),
    "window-left-causal": (dict(lengths_q=LENGTHS), dict(causal=True, window=(7, -1))),
    "window-both": (dict(lengths_q=[40, 3, 70], lengths_k=[50, 3, 45]), dict(window=(10, 4))),
    "window-zero": (dict(lengths_q=[30, 1, 18]), dict(window=(0, 0))),
    "window-wider-than-sequences": (dict(lengths_q=LENGTHS), dict(window=(100, 200))),
    "GQA-causal": (dict(lengths_q=LENGTHS, heads=4, heads_kv=2), dict(causal=True)),
    "MQA-window": (dict(lengths_q=[33, 1, 60], heads=3, heads_kv=1), dict(window=(12, -1), causal=True)),
    "softcap-GQA-causal": (dict(lengths_q=LENGTHS, heads=4, heads_kv=2), dict(causal=True, softcap=2.0)),
    "softcap-window": (dict(lengths_q=[45, 1, 38], lengths_k=[60, 4, 38]), dict(window=(9, 6), softcap=0.7)),
    "D40-Dv24-scale": (dict(lengths_q=[17, 1, 40], d=40, d_v=24), dict(causal=True, softmax_scale=0.3)),
    "empty-sequences": (dict(lengths_q=[12, 0, 5, 9], lengths_k=[12, 6, 0, 20]), dict(causal=True)),
}


@both_backends
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_varlen_matches_reference(backend, case):
    shape, options = case
    q, k, v, packed = packed_inputs(**shape)
    check_varlen(q, k, v, packed, **options)


@both_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_half_precision(backend, dtype):
    q, k, v, packed = packed_inputs(LENGTHS, heads=4, heads_kv=2, d=24, dtype=dtype)
    check_varlen(q, k, v, packed, causal=True, window=(20, -1), softcap=3.0)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize(
    "fwd, dkdv, dq",
    [((16, 64), (64, 16), (16, 32)), ((64, 16), (16, 64), (64, 16))],
    ids=["narrow-rows", "narrow-keys"],
)
def test_varlen_other_tile_shapes(backend, monkeypatch, fwd, dkdv, dq):
    """Tiles longer along keys than queries and the reverse: sequences end inside tiles of either kind."""
    kernels = tsa_fast.kernels.attention
    blocks = {
        kernels._attention_fwd_kernel: fwd,
        kernels._attention_bwd_dkdv_kernel: dkdv,
        kernels._attention_bwd_dq_kernel: dq,
    }
    monkeypatch.setattr(
        kernels, "INTERPRETER_BLOCKS", {kernel: dict(BLOCK_M=m, BLOCK_N=n) for kernel, (m, n) in blocks.items()}
    )
    q, k, v, packed = packed_inputs([70, 1, 100], [90, 1, 65], heads=2, heads_kv=1)
    check_varlen(q, k, v, packed, causal=True, window=(30, -1))


@both_backends
@pytest.mark.parametrize(
    "options", [dict(), dict(causal=True), dict(window=(6, 2), softcap=1.5)], ids=["plain", "causal", "window-softcap"]
)
def test_packed_batch_equals_its_sequences_one_by_one(backend, options):
    """The packed batch gives each sequence what `tsa_fast.attention` gives it alone (a batch of one): outputs,
    lse and gradients."""
    lengths_q, lengths_k = [23, 1, 40, 16], [23, 9, 31, 16]
    q, k, v, packed = packed_inputs(lengths_q, lengths_k, heads=4, heads_kv=2)
    grad_out = torch.randn(*q.shape[:2], v.shape[2], device=DEVICE)
    grad_lse = torch.randn(q.shape[1], q.shape[0], device=DEVICE)

    def one_by_one(q, k, v, **o):
        return per_sequence(tsa_fast.attention, q, k, v, packed[0].tolist(), packed[1].tolist(), **o)

    results = varlen_outputs_and_grads(q, k, v, packed, grad_out, grad_lse, **options)
    expected = outputs_and_grads(one_by_one, q, k, v, grad_out, grad_lse, **options)
    for actual, wanted, what in zip(results, expected, ("out", "lse", "dq", "dk", "dv")):
        assert_rel_close(actual, wanted, 1e-6, what)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_grid_covers_the_longest_sequence_per_sequence(backend, monkeypatch):
    """The kernels' grids are (tiles of the longest sequence, sequences x heads), not tiles of the packed
    total: no tile spans two sequences, and the work grows with S x max_seqlen, never with total^2."""
    kernels = tsa_fast.kernels.attention
    grids, launch = [], kernels._launch
    monkeypatch.setattr(
        kernels,
        "_launch",
        lambda kernel, grid, *a, **m: (
            grids.append((kernel, grid(kernels.INTERPRETER_BLOCKS[kernel]))) or launch(kernel, grid, *a, **m)
        ),
    )
    q, k, v, packed = packed_inputs([40, 1, 70, 5], [40, 3, 100, 5], heads=4, heads_kv=2)
    tsa_fast.attention_varlen(*(x.requires_grad_() for x in (q, k, v)), *packed, causal=True).sum().backward()
    blocks = kernels.INTERPRETER_BLOCKS
    expected = {
        kernels._attention_fwd_kernel: (math.ceil(70 / blocks[kernels._attention_fwd_kernel]["BLOCK_M"]), 4 * 4),
        kernels._attention_bwd_dkdv_kernel: (
            math.ceil(100 / blocks[kernels._attention_bwd_dkdv_kernel]["BLOCK_N"]),
            4 * 2,
        ),
        kernels._attention_bwd_dq_kernel: (math.ceil(70 / blocks[kernels._attention_bwd_dq_kernel]["BLOCK_M"]), 4 * 4),
    }
    assert dict(grids) == expected


def test_varlen_float64_gradchecks():
    q, k, v, packed = packed_inputs([3, 1, 4], [5, 2, 4], heads=2, heads_kv=1, d=3, dtype=torch.float64)

    def fn(q, k, v):
        return tsa_fast.attention_varlen(q, k, v, *packed, causal=True, window=(2, -1), softcap=1.5, return_lse=True)

    assert torch.autograd.gradcheck(fn, tuple(x.requires_grad_() for x in (q, k, v)))


def bad_varlen_call(entry=tsa_fast.attention_varlen, **changes):
    """attention_varlen (or another entry point) on 10 query and 12 key tokens in 2 sequences, with `changes` to
    its arguments."""
    q, k, v = torch.randn(10, 2, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    args = dict(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 5, 12], dtype=torch.int32),
        max_seqlen_q=6,
        max_seqlen_k=7,
    )
    args.update(changes)
    return entry(**args)


BAD_INPUTS = [
    (dict(cu_seqlens_q=torch.tensor([0, 4, 10])), ValueError, "cu_seqlens_q must be int32.*torch.int64"),
    (dict(cu_seqlens_k=torch.tensor([0.0, 5.0, 12.0])), ValueError, "cu_seqlens_k must be int32.*torch.float32"),
    (dict(cu_seqlens_q=[0, 4, 10]), TypeError, "cu_seqlens_q must be a torch.Tensor, got list"),
    (
        dict(cu_seqlens_q=torch.tensor([0, 11, 10], dtype=torch.int32)),
        ValueError,
        "cu_seqlens_q must be non-decreasing from 0 to total_q = 10",
    ),
    (
        dict(cu_seqlens_k=torch.tensor([0, 13, 12], dtype=torch.int32)),
        ValueError,
        r"cu_seqlens_k must be non-decreasing.*\[0, 13, 12\]",
    ),
    (
        dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)),
        ValueError,
        r"cu_seqlens_q must be non-decreasing from 0.*\[1, 4, 10\]",
    ),
    (
        dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)),
        ValueError,
        r"cu_seqlens_q must be non-decreasing from 0 to total_q = 10 .*\[0, 4, 9\]",
    ),
    (
        dict(cu_seqlens_k=torch.tensor([0, 5, 13], dtype=torch.int32)),
        ValueError,
        r"cu_seqlens_k .* to total_k = 12 .*\[0, 5, 13\]",
    ),
    (dict(cu_seqlens_q=torch.zeros(1, 3, dtype=torch.int32)), ValueError, r"cu_seqlens_q must be 1-D.*\(1, 3\)"),
    (
        dict(cu_seqlens_k=torch.zeros(1, dtype=torch.int32)),
        ValueError,
        r"cu_seqlens_k must be 1-D with S \+ 1 >= 2",
    ),
    (
        dict(cu_seqlens_k=torch.tensor([0, 5, 6, 12], dtype=torch.int32)),
        ValueError,
        "cu_seqlens_q and cu_seqlens_k must have one length.*3 and 4",
    ),
    (dict(max_seqlen_q=5), ValueError, "max_seqlen_q = 5 is below the longest sequence's 6 tokens"),
    (dict(max_seqlen_k=6), ValueError, "max_seqlen_k = 6 is below the longest sequence's 7 tokens"),
    (dict(max_seqlen_q=6.0), TypeError, "max_seqlen_q must be an int"),
    (dict(max_seqlen_k=None), TypeError, "max_seqlen_k must be an int"),
    (dict(window=(-2, 0)), ValueError, r"window must be \(left, right\) with each side >= 0, or -1.*\(-2, 0\)"),
    (dict(window=(3, -4)), ValueError, r"window.*\(3, -4\)"),
    (dict(softcap=0.0), ValueError, "softcap must be None or a finite number > 0, got 0.0"),
    (dict(softcap=-2.0), ValueError, "softcap.*-2.0"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(q=torch.randn(1, 10, 2, 8)), ValueError, r"q must be a non-empty packed \(total, H, D\) tensor"),
    (dict(v=torch.randn(11, 2, 8)), ValueError, "k, v must share H_kv and N_k"),
    (dict(k=torch.randn(12, 3, 8), v=torch.randn(12, 3, 8)), ValueError, "query heads must be a multiple"),
    (dict(k=torch.randn(12, 2, 8).double()), ValueError, "q, k, v must share a dtype"),
]


@pytest.mark.parametrize("changes, error, match", BAD_INPUTS)
def test_bad_input_raises(changes, error, match):
    with pytest.raises(error, match=match):
        bad_varlen_call(**changes)


@pytest.mark.parametrize("changes, error, match", BAD_INPUTS)
def test_prechecked_entry_raises_all_but_the_value_errors_which_check_cu_seqlens_raises(changes, error, match):
    """attention_varlen_prechecked raises attention_varlen's errors but those of the values of cu_seqlens (and of
    the max_seqlens against them), which it never reads on the host; check_cu_seqlens raises those."""
    if re.search("non-decreasing|total_|is below the longest", match):
        with pytest.raises(error, match=match):
            bad_varlen_call(
                lambda q, k, v, **sequences: check_cu_seqlens(**sequences, total_q=10, total_k=12), **changes
            )
    else:
        with pytest.raises(error, match=match):
            bad_varlen_call(attention_varlen_prechecked, **changes)


@both_backends
def test_prechecked_entry_gives_attention_varlens_results(backend):
    """attention_varlen_prechecked on checked cu_seqlens: attention_varlen's outputs and gradients;
    check_cu_seqlens returns the offsets as lists."""
    q, k, v, packed = packed_inputs([5, 1, 12], [7, 0, 9], heads=4, heads_kv=2)
    assert check_cu_seqlens(*packed, q.shape[0], k.shape[0]) == ([0, 5, 6, 18], [0, 7, 7, 16])
    grad_out = torch.randn(*q.shape[:2], v.shape[2], device=DEVICE)
    grad_lse = torch.randn(q.shape[1], q.shape[0], device=DEVICE)

    def results(entry):
        def fn(q, k, v, **o):
            return entry(q, k, v, *packed, return_lse=True, **o)

        return outputs_and_grads(fn, q, k, v, grad_out, grad_lse, causal=True)

    expected, prechecked = results(tsa_fast.attention_varlen), results(attention_varlen_prechecked)
    for actual, wanted, what in zip(prechecked, expected, ("out", "lse", "dq", "dk", "dv")):
        assert torch.equal(actual, wanted), what


# ---------------------------------------------------------------------------------------------------
# Compiled for GPUs without one: Triton ships ptxas.


def compile_varlen_kernels():
    """The three kernels with VARLEN (their largest tile, bf16, head dim 80: causal; window with softcap) for
    sm_80 and sm_90, on contiguous packed inputs."""
    kernels = tsa_fast.kernels.attention
    types = dict(
        lse_ptr="*fp32",
        delta_ptr="*fp32",
        cu_seqlens_q_ptr="*i32",
        cu_seqlens_k_ptr="*i32",
        sm_scale="fp32",
        softcap="fp32",
    )
    options = dict(CAUSAL=True, HAS_MASK=False, WINDOW=False, SOFTCAP=False, VARLEN=True, UPCAST=False)
    options.update(BLOCK_D=128, BLOCK_DV=128, mask_ptr=None)
    for kernel, configs in (
        (kernels._attention_fwd_kernel, kernels.FWD_CONFIGS),
        (kernels._attention_bwd_dkdv_kernel, kernels.DKDV_CONFIGS),
        (kernels._attention_bwd_dq_kernel, kernels.DQ_CONFIGS),
    ):
        contiguous = unit_strides(kernel, ("d",))  # the packed views' strides along sequences are 0, not constants
        config = max(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        compile_for_gpus(kernel, config, dict(options, **contiguous), types)
        compile_for_gpus(kernel, config, dict(options, CAUSAL=False, WINDOW=True, SOFTCAP=True, **contiguous), types)


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas")
def test_varlen_kernels_compile_for_ampere_and_hopper():
    run_compiled(__file__)


# ---------------------------------------------------------------------------------------------------
# GPU only (run by benchmarks/gpu.sh where a GPU is lent): bf16 at model sizes, autotuned tiles.


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize(
    "options", [dict(causal=True), dict(causal=True, window=(256, -1), softcap=30.0)], ids=["causal", "window-softcap"]
)
def test_gpu_varlen_model_sizes(backend, options):
    lengths = [1, 700, 1500, 129, 2048, 3]
    q, k, v, packed = packed_inputs(lengths, heads=8, heads_kv=2, d=128, dtype=torch.bfloat16)
    check_varlen(q, k, v, packed, **options)


if __name__ == "__main__":  # test_varlen_kernels_compile_for_ampere_and_hopper
    compile_varlen_kernels()
