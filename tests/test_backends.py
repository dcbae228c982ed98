"""`tsa_fast.backends`: the package imports and every op works without Triton (macOS, Windows) and without the
compiled extension, each checked in a fresh process where importing it fails."""

import os
import subprocess
import sys

import pytest
import torch

import tsa_fast

# Run in a fresh process after the blocked modules are made unimportable (sys.modules[name] = None): every op
# on small CPU inputs against its float64 reference, and the backends it then has.
SCRIPT = """
import sys
for name in sys.argv[1:]:
    sys.modules[name] = None
import torch, tsa_fast
from tsa_fast import backends
from tsa_fast.reference.attention import attention as reference_attention
from tsa_fast.reference.attention_transfer_loss import attention_transfer_loss as reference_attention_transfer
from tsa_fast.reference.distillation_loss import distillation_loss as reference_distillation
from tsa_fast.reference.fused_linear_distillation_loss import fused_linear_distillation_loss as reference_fused

def close(actual, expected):
    error = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert error < 1e-5, error

torch.manual_seed(0)
s, t, labels = torch.randn(6, 50), torch.randn(6, 50), torch.randint(0, 50, (6,))
expected = reference_distillation(s.double(), t.double(), labels, hard_weight=0.5)
close(tsa_fast.distillation_loss(s, t, labels, hard_weight=0.5), expected)
h, w, th, tw = torch.randn(6, 8), torch.randn(50, 8), torch.randn(6, 12), torch.randn(50, 12)
expected = reference_fused(h.double(), w.double(), th.double(), tw.double(), labels)
close(tsa_fast.fused_linear_distillation_loss(h, w, th, tw, labels), expected)
q, k, v = (torch.randn(2, 2, 9, 16) for _ in range(3))
close(tsa_fast.attention(q, k, v, causal=True), reference_attention(q.double(), k.double(), v.double(), causal=True))
expected = reference_attention_transfer(q.double(), k.double(), v.double(), k.double())
close(tsa_fast.attention_transfer_loss(q, k, v, k), expected)
from tsa_fast.reference.cross_tokenizer_loss import cross_tokenizer_loss as reference_cross_tokenizer
rows, none = torch.arange(6), torch.full((6,), -1)
alignment = tsa_fast.TokenAlignment(rows[1:], rows[:5], none, none, none + 1, none + 1)
alignment.student_prefix[0], alignment.teacher_prefix[5] = 0, 4
vocab_map = torch.stack([torch.arange(30), torch.arange(30) + 20], 1)
expected = reference_cross_tokenizer(s.double(), t.double(), alignment, vocab_map, labels, uld_top_k=5, hard_weight=0.5)
close(tsa_fast.cross_tokenizer_loss(s, t, alignment, vocab_map, labels, uld_top_k=5, hard_weight=0.5), expected)
mha = tsa_fast.nn.MultiheadAttention(16, 2, batch_first=True)
assert mha(q[0], q[0], q[0])[0].isfinite().all()
print(",".join(backends.available_backends(torch.device("cpu"))))
"""


@pytest.mark.parametrize(
    "blocked, backends",
    [(["triton"], "cpp,torch"), (["tsa_fast._C"], "torch"), (["triton", "tsa_fast._C"], "torch")],
    ids=["no-triton", "no-extension", "neither"],
)
def test_works_without(blocked, backends):
    # Neither TRITON_INTERPRET nor a forced backend: CPU tensors take what the default dispatch picks.
    env = {name: value for name, value in os.environ.items() if name not in ("TRITON_INTERPRET", "TSA_FAST_BACKEND")}
    command = [sys.executable, "-c", SCRIPT, *blocked]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == backends


def float64_cases() -> dict:
    """{name: (op, its reference, float64 inputs, indices of the inputs that get a gradient)} for every public op
    (a float32 student against a float64 teacher counts as float64)."""
    from tsa_fast.reference.attention import attention as reference_attention
    from tsa_fast.reference.attention_transfer_loss import attention_transfer_loss as reference_transfer
    from tsa_fast.reference.distillation_loss import distillation_loss as reference_distillation
    from tsa_fast.reference.fused_linear_distillation_loss import fused_linear_distillation_loss as reference_fused

    f64 = torch.float64
    s, t, labels = torch.randn(6, 50, dtype=f64), torch.randn(6, 50, dtype=f64), torch.randint(0, 50, (6,))
    h, w, th, tw = (torch.randn(*shape, dtype=f64) for shape in ((6, 8), (50, 8), (6, 12), (50, 12)))
    top = torch.log_softmax(t, -1).topk(5, -1)
    q, k, v = (torch.randn(2, 4, 7, 16, dtype=f64) for _ in range(3))
    mask = torch.rand(2, 7) > 0.3
    mha = tsa_fast.nn.MultiheadAttention(16, 2, batch_first=True, dtype=f64)
    torch_mha = torch.nn.MultiheadAttention(16, 2, batch_first=True, dtype=f64)
    torch_mha.load_state_dict(mha.state_dict())
    sdpa, flag = torch.nn.functional.scaled_dot_product_attention, dict(is_causal=True, enable_gqa=True)
    distill, fused = tsa_fast.distillation_loss, tsa_fast.fused_linear_distillation_loss
    return {
        "distillation_loss": (distill, reference_distillation, (s, t, labels), [0]),
        "distillation_loss-float32-student": (distill, reference_distillation, (s.float(), t, labels), [0]),
        "fused_linear-teacher-hidden": (fused, reference_fused, (h, w, th, tw, labels), [0, 1]),
        "fused_linear-teacher-logits": (
            lambda h, w, t: fused(h, w, teacher_logits=t),
            lambda h, w, t: reference_fused(h, w, teacher_logits=t),
            (h, w, t),
            [0, 1],
        ),
        "fused_linear-topk-teacher": (
            lambda h, w, i, lp: fused(h, w, teacher_topk=(i, lp)),
            lambda h, w, i, lp: reference_fused(h, w, teacher_topk=(i, lp)),
            (h, w, top.indices, top.values),
            [0, 1],
        ),
        "attention": (
            lambda q, k, v, m: tsa_fast.attention(q, k, v, causal=True, key_padding_mask=m),
            lambda q, k, v, m: reference_attention(q, k, v, causal=True, key_padding_mask=m),
            (q, k[:, :2], v[:, :2], mask),
            [0, 1, 2],
        ),
        "scaled_dot_product_attention": (
            lambda q, k, v: tsa_fast.scaled_dot_product_attention(q, k, v, **flag),
            lambda q, k, v: sdpa(q, k, v, **flag),
            (q, k[:, :2], v[:, :2]),
            [0, 1, 2],
        ),
        "MultiheadAttention": (
            lambda x: mha(x, x, x, need_weights=False)[0],
            lambda x: torch_mha(x, x, x, need_weights=False)[0],
            (q[0],),
            [0],
        ),
        "attention_transfer_loss": (tsa_fast.attention_transfer_loss, reference_transfer, (q, k, v, k), [0, 1]),
        "attention_transfer_loss-float32-student": (
            tsa_fast.attention_transfer_loss,
            reference_transfer,
            (q.float(), k.float(), v, k),
            [0, 1],
        ),
    }


@pytest.mark.parametrize("case", list(float64_cases()))
def test_float64_runs_the_reference_under_every_backend(backend, case):
    """float64 always runs the reference, whatever TSA_FAST_BACKEND forces: the reference's output (or loss)
    and gradients to float64 rounding (an fp32 kernel could not get closer than ~1e-7)."""
    *functions, inputs, grads = float64_cases()[case]
    results = []
    for fn in functions:
        leaves = [x.clone().requires_grad_(i in grads) for i, x in enumerate(inputs)]
        out = fn(*leaves)
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        results.append([out] + [leaves[i].grad for i in grads])
    for actual, expected in zip(*results):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
