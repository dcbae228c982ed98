"""`tsa_fast.backends`: the package imports and every op works without Triton (macOS, Windows) and without the
compiled extension, each checked in a fresh process where importing it fails."""

import os
import subprocess
import sys

import pytest

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
