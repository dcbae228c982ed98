"""The decode path of `tsa_fast.attention` (kernels/attention_decode.py: few queries against a long KV cache,
split over the keys): the full kernel's and the float64 reference's results by the FlashAttention test rule for
N_q = 1..16 with every option, any number of splits; the op's choice of it (launches counted) and its fallback
when a gradient is needed; greedy generation through it (the engine's Transformer, a Hugging Face Llama) giving
the full kernel's tokens; the split rule; the kernels compiled for sm_80 and sm_90."""

import importlib
import math
import sys

import pytest
import torch
from conftest import DEVICE, assert_rel_close, compile_for_gpus, rel_error, run_compiled, unit_strides
from test_attention import ATOL, make_inputs, padding_mask, pytorch_banded_attention

import tsa_fast
from tsa_fast.backends import available_backends, triton_kernels
from tsa_fast.reference.attention import attention as reference_attention

attention_op = importlib.import_module("tsa_fast.ops.attention")  # the module (tsa_fast.ops.attention: the op)
pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="no triton backend here")
triton_backend = pytest.mark.parametrize("backend", ["triton"], indirect=True)


def decode_kernel():
    return tsa_fast.kernels.attention_decode


@pytest.fixture
def launches(monkeypatch):
    """{"decode": n, "full": n}: the launches of the decode path and of the full forward kernel."""
    counts = {"decode": 0, "full": 0}
    decode, full = triton_kernels.attention_decode_forward, triton_kernels.attention_forward

    def counted(name, fn):
        def run(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(triton_kernels, "attention_decode_forward", counted("decode", decode))
    monkeypatch.setattr(triton_kernels, "attention_forward", counted("full", full))
    return counts


def reference_options(options):
    """The op's options as the launchers take them: window (left, right), softcap 0 for none."""
    window = options.get("window") or (-1, -1)
    return window, options.get("softcap") or 0.0


def launch(kernel, q, k, v, options, **extra):
    """(out, lse) of a launcher (attention_forward or attention_decode_forward) with the op's options."""
    out = q.new_empty((*q.shape[:3], v.shape[3]))
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    scale = options.get("softmax_scale") or q.shape[3] ** -0.5
    window, softcap = reference_options(options)
    mask, causal = options.get("key_padding_mask"), options.get("causal", False)
    kernel(q, k, v, mask, out, lse, causal, scale, window, softcap, **extra)
    return out, lse


def check_decode(q, k, v, splits=(), **options):
    """The op under no_grad (the decode path, launched once) and the decode launcher at each forced number of
    splits: out and lse against the float64 reference within twice the error of PyTorch's attention in the
    inputs' dtype plus ATOL, and against the full kernel within the same bound."""
    expected = reference_attention(*(x.double() for x in (q, k, v)), return_lse=True, **options)
    torch_own = pytorch_banded_attention(q, k, v, **options)
    full = launch(triton_kernels.attention_forward, q, k, v, options)
    with torch.no_grad():
        results = [tsa_fast.attention(q, k, v, return_lse=True, **options)]
    results += [launch(triton_kernels.attention_decode_forward, q, k, v, options, num_splits=n) for n in splits]
    for out, lse in results:
        assert out.dtype == q.dtype and lse.dtype == torch.float32
        for actual, wanted, yardstick, kernel, what in zip((out, lse), expected, torch_own, full, ("out", "lse")):
            finite = wanted.isfinite()
            tolerance = 2 * rel_error(yardstick[finite], wanted[finite]) + ATOL[q.dtype]
            assert_rel_close(actual, wanted, tolerance, what)
            assert_rel_close(actual, kernel, tolerance, f"{what} against the full kernel")
    return results


# (shape, options): every option of the op, cache lengths that are no multiple of the tiles (16 keys under the
# interpreter) nor of the splits, GQA groups whose rows (G N_q) cross the 16-row blocks.
CASES = {
    "plain": (dict(n_k=70), dict()),
    "causal": (dict(n_k=83), dict(causal=True)),
    "causal-padding": (dict(n_k=90), dict(causal=True, key_padding_mask="mask")),
    "GQA-causal-padding": (dict(heads=6, heads_kv=2, n_k=77), dict(causal=True, key_padding_mask="mask")),
    "MQA-window": (dict(heads=4, heads_kv=1, n_k=100), dict(window=(20, -1))),
    "causal-window": (dict(n_k=95), dict(causal=True, window=(31, 4))),
    "window-both": (dict(n_k=60, d=24, d_v=40), dict(window=(7, 3), key_padding_mask="mask")),
    "softcap": (dict(n_k=75), dict(softcap=3.0, softmax_scale=0.4)),
    "softcap-GQA-causal-window": (dict(heads=4, heads_kv=2, n_k=110), dict(causal=True, window=(40, -1), softcap=1.5)),
    "zero-window": (dict(n_k=50), dict(window=(0, 0))),
    "wider-than-cache": (dict(n_k=30), dict(window=(100, 100), causal=True)),
}
N_Q_CASES = list(CASES)


@triton_backend
@pytest.mark.parametrize("n_q", range(1, 17))
def test_every_query_count_matches_full_kernel_and_reference(backend, launches, n_q):
    """N_q = 1..16, each with one of the cases in turn, through the op and at 1, 3 and 5 forced splits."""
    shape, options = CASES[N_Q_CASES[n_q % len(N_Q_CASES)]]
    q, k, v = make_inputs(n_q=n_q, **shape)
    if options.get("key_padding_mask") == "mask":
        options = dict(options, key_padding_mask=padding_mask(2, k.shape[2]))
    launches["decode"] = 0
    check_decode(q, k, v, splits=(1, 3, 5), **options)
    assert launches["decode"] == 4


@triton_backend
@pytest.mark.parametrize("n_q", [1, 4, 16])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_option_matches_full_kernel_and_reference(backend, case, n_q):
    """Each case at N_q = 1, 4 and 16, through the op (its split rule) and at 2 and 7 forced splits."""
    shape, options = case
    q, k, v = make_inputs(n_q=n_q, **shape)
    if options.get("key_padding_mask") == "mask":
        options = dict(options, key_padding_mask=padding_mask(2, k.shape[2], fully_padded=(1,)))
    check_decode(q, k, v, splits=(2, 7), **options)


@triton_backend
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    q, k, v = make_inputs(n_q=3, n_k=130, heads=4, heads_kv=2, d=40, dtype=dtype)
    check_decode(q, k, v, splits=(4,), causal=True, key_padding_mask=padding_mask(2, 130), softcap=2.0)


@triton_backend
@pytest.mark.parametrize("n_q, causal", [(1, False), (1, True), (16, True), (16, False)])
def test_a_single_key(backend, n_q, causal):
    """One cached key: causal with N_q = 16 leaves the first 15 rows without a key (out 0, lse -inf)."""
    q, k, v = make_inputs(n_q=n_q, n_k=1, heads=4, heads_kv=2)
    (out, lse), *_ = check_decode(q, k, v, splits=(3,), causal=causal)
    if causal and n_q > 1:
        assert torch.all(out[:, :, :-1] == 0) and torch.all(lse[:, :, :-1] == -math.inf)


@triton_backend
def test_rows_without_keys_and_empty_splits(backend):
    """Batch row 1 all padded, and a narrow window at the end of the cache, with more splits than key tiles
    (most splits see no key): zeros and lse -inf where no key is visible, never NaN."""
    q, k, v = make_inputs(n_q=5, n_k=90)
    mask = padding_mask(2, 90, fully_padded=(1,))
    for out, lse in check_decode(q, k, v, splits=(12,), causal=True, window=(2, -1), key_padding_mask=mask):
        assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf) and out.isfinite().all()


@triton_backend
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_padded_slots_are_never_read(backend, value):
    """NaN or inf in the padded keys and values: the same out and lse, bit for bit, as zeros there."""
    q, k, v = make_inputs(n_q=4, n_k=100, heads=4, heads_kv=2)
    mask = padding_mask(2, 100)
    padded = ~mask[:, None, :, None]
    for splits in (1, 4):
        bad = launch(
            triton_kernels.attention_decode_forward,
            q,
            k.masked_fill(padded, value),
            v.masked_fill(padded, value),
            dict(causal=True, key_padding_mask=mask),
            num_splits=splits,
        )
        zero = launch(
            triton_kernels.attention_decode_forward,
            q,
            k.masked_fill(padded, 0),
            v.masked_fill(padded, 0),
            dict(causal=True, key_padding_mask=mask),
            num_splits=splits,
        )
        assert torch.equal(bad[0], zero[0]) and torch.equal(bad[1], zero[1])


@triton_backend
def test_strided_cache_views(backend):
    """The generation cache's layout: k, v views of a longer (B, H_kv, max_len, D) buffer, a (B, N, H, D)
    transposed query, a strided mask."""
    q = torch.randn(2, 3, 4, 32, device=DEVICE).transpose(1, 2)
    cache_k, cache_v = torch.randn(2, 2, 2, 120, 32, device=DEVICE).unbind(0)
    mask = padding_mask(2, 180)[:, ::2][:, :81]
    check_decode(q, cache_k[:, :, :81], cache_v[:, :, :81], splits=(3,), causal=True, key_padding_mask=mask)


# ---------------------------------------------------------------------------------------------------
# The op's choice.


@triton_backend
def test_the_op_chooses_the_decode_path_without_gradients(backend, launches):
    """N_q <= 16 with no gradient to compute (no_grad, inference_mode, or inputs that need none) runs the decode
    kernels, also behind the SDPA drop-in; N_q = 17 runs the full kernel."""
    q, k, v = make_inputs(n_q=16, n_k=50, heads=4, heads_kv=2)
    mask = padding_mask(2, 50)
    expected = reference_attention(q.double(), k.double(), v.double(), causal=True, key_padding_mask=mask)
    with torch.no_grad():
        out = tsa_fast.attention(q, k, v, causal=True, key_padding_mask=mask)
    with torch.inference_mode():
        tsa_fast.attention(q[:, :, :1], k, v)
    tsa_fast.attention(q, k, v)  # grad mode on, but nothing requires a gradient
    with torch.no_grad():
        tsa_fast.scaled_dot_product_attention(q[:, :, :1], k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
    assert launches == {"decode": 4, "full": 0}
    assert_rel_close(out, expected, 1e-5, "out")
    with torch.no_grad():
        tsa_fast.attention(*make_inputs(n_q=17, n_k=50), causal=True)
    assert launches == {"decode": 4, "full": 1}


@triton_backend
def test_gradients_take_the_full_kernels(backend, launches):
    """Inputs that require a gradient: the full forward (whose backward follows), gradients as the reference's."""
    q, k, v = (x.requires_grad_() for x in make_inputs(n_q=2, n_k=40, heads=4, heads_kv=2))
    out = tsa_fast.attention(q, k, v, causal=True, window=(9, -1))
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert launches == {"decode": 0, "full": 1}
    expected = [x.detach().double().requires_grad_() for x in (q, k, v)]
    reference = reference_attention(*expected, causal=True, window=(9, -1))
    for actual, wanted, what in zip(grads, torch.autograd.grad(reference.square().sum(), expected), "qkv"):
        assert_rel_close(actual, wanted, 1e-5, f"d{what}")


@triton_backend
def test_torch_compile_fullgraph_decode(backend, launches):
    """The decode op traces without a graph break under no_grad."""
    q, k, v = make_inputs(n_q=1, n_k=40, heads=4, heads_kv=2)
    mask = padding_mask(2, 40)

    def model(q, k, v):
        return tsa_fast.attention(q, k, v, causal=True, key_padding_mask=mask, window=(20, -1)).square().sum()

    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(q, k, v)
        eager = model(q, k, v)
    assert launches["decode"] == 2 and launches["full"] == 0
    assert_rel_close(compiled, eager, 1e-6, "loss")


# ---------------------------------------------------------------------------------------------------
# Generation through the decode path: the full kernel's tokens.


def without_decode_path(monkeypatch):
    monkeypatch.setattr(attention_op, "DECODE_MAX_QUERIES", 0)


@triton_backend
def test_engine_generation_gives_the_full_kernels_tokens(backend, launches, monkeypatch):
    """Transformer.generate (greedy, left-padded prompts, KV cache; a model trained to continue a periodic
    sequence, whose tokens a wrong cache read would change) decodes through the decode kernels and
    gives the tokens of the full kernel and of the torch backend."""
    from test_generate import copying_model, left_padded, random_ids

    with monkeypatch.context() as patch:  # trained on the torch backend (the interpreter would take minutes)
        patch.setenv("TSA_FAST_BACKEND", "torch")
        model = copying_model("rotary")
    ids, mask = left_padded([random_ids(1, n)[0] for n in (5, 11, 8)])
    tokens = model.generate(ids, 20, temperature=0, attention_mask=mask)
    assert launches["decode"] >= 19 * model.config.n_layers and len(tokens[:, 11:].unique()) > 4
    with monkeypatch.context() as patch:
        without_decode_path(patch)
        full = model.generate(ids, 20, temperature=0, attention_mask=mask)
        patch.setenv("TSA_FAST_BACKEND", "torch")
        torch_backend = model.generate(ids, 20, temperature=0, attention_mask=mask)
    assert torch.equal(tokens, full) and torch.equal(tokens, torch_backend)


@triton_backend
def test_hugging_face_generation_gives_the_full_kernels_tokens(backend, launches, monkeypatch, tmp_path):
    """A small random Llama (GQA) with attention "tsa_fast": transformers' generate (greedy, left padding)
    decodes through the decode kernels and gives the full kernel's and eager attention's tokens."""
    transformers = pytest.importorskip("transformers")
    from test_generate import left_padded, random_ids

    from tsa_fast.integrations.hf import HFModel

    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = HFModel(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)).to(DEVICE)
    ids, mask = left_padded([random_ids(1, n)[0] for n in (4, 9, 7)])
    tokens = model.generate(ids, 16, temperature=0, attention_mask=mask)
    assert launches["decode"] >= 15 * config.num_hidden_layers and len(tokens[:, 9:].unique()) > 4
    with monkeypatch.context() as patch:
        without_decode_path(patch)
        full = model.generate(ids, 16, temperature=0, attention_mask=mask)
    eager = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").to(DEVICE)
    expected = eager.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(tokens, full) and torch.equal(tokens, expected)


# ---------------------------------------------------------------------------------------------------
# The split rule.


def test_split_rule():
    """Two programs per SM where the cache is long enough, no split shorter than the minimum, at most
    MAX_SPLITS, at least one."""
    kernels = decode_kernel()
    splits = kernels.decode_splits
    assert splits(131072, programs=8, sm_count=132, rows=4) == 33  # 8 programs x 33 splits >= 2 x 132
    assert splits(131072, programs=1, sm_count=132, rows=1) == kernels.MAX_SPLITS
    assert splits(8192, programs=8, sm_count=132, rows=4) == 8192 // kernels.MIN_SPLIT_KEYS
    assert splits(8192, programs=8, sm_count=132, rows=64) == 8192 // (16 * 64)  # partials under 1/8 of traffic
    assert splits(131072, programs=512, sm_count=132, rows=8) == 1  # the batch and heads fill the GPU
    assert splits(100, programs=1, sm_count=132, rows=1) == 1
    for n_keys in (1, 300, 5000, 131072):
        for programs in (1, 7, 64, 1000):
            n = splits(n_keys, programs, 132, 8)
            assert 1 <= n <= kernels.MAX_SPLITS and (n == 1 or n_keys // n >= kernels.MIN_SPLIT_KEYS)


def test_band_skips_keys_before_the_first_querys_window():
    band = decode_kernel().decode_band
    assert band(1, 1000, True, (-1, -1)) == (False, 1000, 0, 0)  # one causal query sees every key
    assert band(4, 1000, True, (-1, -1))[0]  # the first three queries do not see the last keys
    assert band(4, 1000, True, (99, -1)) == (True, 99, 0, 1000 - 4 - 99)
    assert band(2, 1000, False, (2000, 5)) == (False, 1000, 2, 0)


# ---------------------------------------------------------------------------------------------------
# Compiled for GPUs without one: Triton ships ptxas.


def compile_decode_kernels():
    """The decode kernel at every candidate tile the pruning keeps for bf16 head dim 128, 64 rows, every option
    (and none, one split), at head dim 256 and in fp32 at head dim 64 (16 rows); the combine kernel at 128
    splits."""
    import triton

    kernels = decode_kernel()
    kernel = kernels._attention_decode_kernel
    types = dict(
        mask_ptr="*i1", lse_ptr="*fp32", o_part_ptr="*fp32", lse_part_ptr="*fp32", sm_scale="fp32", softcap="fp32"
    )
    contiguous = unit_strides(kernel, ("d", "mask_n"))
    options = dict(BAND=True, HAS_MASK=True, SOFTCAP=True, SPLIT=True, UPCAST=False, **contiguous)
    for width, dtype in ((128, "*bf16"), (256, "*bf16"), (64, "*fp32")):
        options["BLOCK_M"] = kernels.MAX_BLOCK_M_FP32 if dtype == "*fp32" else kernels.MAX_BLOCK_M
        tensors = {name: dtype for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
        args = dict(BLOCK_D=width, BLOCK_DV=width, tune_n_k=131072, q_ptr=DtypeOnly(dtype), k_ptr=DtypeOnly(dtype))
        for config in kernels._prune(kernels.DECODE_CONFIGS, args):
            blocks = dict(options, BLOCK_D=width, BLOCK_DV=width)
            compile_for_gpus(kernel, config, blocks, {**types, **tensors})
            if width == 128:
                none = dict(blocks, BAND=False, HAS_MASK=False, SOFTCAP=False, SPLIT=False, mask_ptr=None)
                compile_for_gpus(kernel, config, none, {**types, **tensors})
    combine = kernels._attention_decode_combine_kernel
    blocks = dict(BLOCK_S=kernels.MAX_SPLITS, BLOCK_C=32, **unit_strides(combine, ("d",)))
    compile_for_gpus(combine, triton.Config({}), blocks, {**types, "o_part_ptr": "*fp32", "out_ptr": "*bf16"})


class DtypeOnly:
    """What `_prune` reads of a tensor argument: its element size."""

    def __init__(self, dtype: str):
        self.bytes = 4 if dtype == "*fp32" else 2

    def element_size(self) -> int:
        return self.bytes


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's bundled ptxas")
def test_kernels_compile_for_ampere_and_hopper():
    run_compiled(__file__)


# ---------------------------------------------------------------------------------------------------
# GPU only (run by benchmarks/gpu.sh where a GPU is lent): model sizes, autotuned tiles, long caches.

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@triton_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, n_k", [(128, 32768), (64, 5000), (256, 3000)])
def test_gpu_model_sizes(backend, dtype, d, n_k):
    for n_q in (1, 16):
        q, k, v = make_inputs(batch=2, heads=32, heads_kv=8, n_q=n_q, n_k=n_k, d=d, dtype=dtype)
        check_decode(q, k, v, causal=True, key_padding_mask=padding_mask(2, n_k))
        check_decode(q, k, v, causal=True, window=(4095, -1), softcap=30.0)


if __name__ == "__main__":  # test_kernels_compile_for_ampere_and_hopper
    compile_decode_kernels()
