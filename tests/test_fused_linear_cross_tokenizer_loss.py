"""`tsa_fast.fused_linear_cross_tokenizer_loss`: chunked over rows against the unfused op on the same logits."""

import pytest
import torch
from conftest import DEVICE, assert_rel_close
from test_cross_tokenizer_loss import random_alignment, random_map

import tsa_fast


def make_heads(n_s=11, n_t=9, h_s=8, h_t=12, v_s=40, v_t=48, m=25, dtype=torch.float32):
    hidden = torch.randn(n_s, h_s, device=DEVICE, dtype=dtype)
    weight = (torch.randn(v_s, h_s, device=DEVICE) / h_s**0.5 * 2).to(dtype)
    teacher_hidden = torch.randn(n_t, h_t, device=DEVICE, dtype=dtype)
    teacher_weight = (torch.randn(v_t, h_t, device=DEVICE) / h_t**0.5 * 2).to(dtype)
    labels = torch.randint(0, v_s, (n_s,), device=DEVICE)
    labels[torch.rand(n_s, device=DEVICE) < 0.3] = -100
    return (
        hidden,
        weight,
        teacher_hidden,
        teacher_weight,
        random_alignment(n_s, n_t, v_s, v_t),
        random_map(v_s, v_t, m),
        labels,
    )


def fused_and_unfused(
    hidden, weight, teacher_hidden, teacher_weight, alignment, vocab_map, labels, chunk_size, **options
):
    """Loss, parts and gradients (hidden, weight) of the fused op and of the unfused op on the logits."""
    results = []
    for fused in (True, False):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        if fused:
            loss, parts = tsa_fast.fused_linear_cross_tokenizer_loss(
                h,
                w,
                teacher_hidden,
                teacher_weight,
                alignment=alignment,
                vocab_map=vocab_map,
                labels=labels,
                chunk_size=chunk_size,
                return_parts=True,
                **options,
            )
        else:
            dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
            loss, parts = tsa_fast.cross_tokenizer_loss(
                h.to(dtype) @ w.to(dtype).T,
                teacher_hidden.to(dtype) @ teacher_weight.to(dtype).T,
                alignment,
                vocab_map,
                labels,
                return_parts=True,
                **options,
            )
        grads = torch.autograd.grad(loss * 1.3, (h, w))
        results.append((loss, parts, *grads))
    return results


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(temperature=2.0, uld_top_k=5, hard_weight=0.5, divergence="jsd"),
        dict(reduction="sum", uld_top_k=100),
    ],
    ids=["defaults", "T2-k5-hard-jsd", "sum-fullsort"],
)
def test_matches_unfused(backend, chunk_size, options):
    (loss, parts, gh, gw), (ref, ref_parts, ref_gh, ref_gw) = fused_and_unfused(*make_heads(), chunk_size, **options)
    assert_rel_close(loss, ref, 1e-5, "loss")
    for name, part, ref_part in zip(parts._fields, parts, ref_parts):
        assert_rel_close(part, ref_part, 1e-5, name)
    assert_rel_close(gh, ref_gh, 1e-5, "grad hidden")
    assert_rel_close(gw, ref_gw, 1e-5, "grad weight")


def test_float64_and_bf16(backend):
    for dtype, tol in ((torch.float64, 1e-10), (torch.bfloat16, 1e-2)):
        heads = make_heads(dtype=dtype)
        (loss, _, gh, gw), (ref, _, ref_gh, ref_gw) = fused_and_unfused(*heads, 3, hard_weight=0.2)
        assert gh.dtype == dtype and gw.dtype == dtype
        assert_rel_close(loss, ref, tol, f"{dtype} loss")
        assert_rel_close(gh, ref_gh, tol, f"{dtype} grad hidden")
        assert_rel_close(gw, ref_gw, tol, f"{dtype} grad weight")


def test_bad_input_raises():
    hidden, weight, teacher_hidden, teacher_weight, alignment, vocab_map, labels = make_heads()

    def call(h, w, th, tw, **kw):
        return tsa_fast.fused_linear_cross_tokenizer_loss(h, w, th, tw, alignment=alignment, vocab_map=vocab_map, **kw)

    args = dict(h=hidden, w=weight, th=teacher_hidden, tw=teacher_weight)
    with pytest.raises(ValueError, match=r"student_weight must be \(V, 8\)"):
        call(**{**args, "w": weight[:, :5]})
    with pytest.raises(ValueError, match=r"teacher_weight must be \(V, 12\)"):
        call(**{**args, "tw": teacher_weight[:, :5]})
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        call(**args, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        call(**args, chunk_size=2.0)
    with pytest.raises(TypeError, match=r"unknown options \['softcap'\]"):
        call(**args, softcap=3.0)
    with pytest.raises(ValueError, match="uld_top_k must be >= 1"):
        call(**args, uld_top_k=0)
    with pytest.raises(ValueError, match=r"alignment.student_rows must be in \[0, 3\)"):
        tsa_fast.fused_linear_cross_tokenizer_loss(
            hidden[:3],
            weight,
            teacher_hidden,
            teacher_weight,
            alignment=alignment._replace(
                student_prefix=alignment.student_prefix[:3], student_tokens=alignment.student_tokens[:3]
            ),
            vocab_map=vocab_map,
        )
