"""`tsa_fast.models`: the Transformer's outputs against its contract (shapes, causality, padding, rotary,
what it returns against a recomputation with PyTorch's attention), its config and input errors, and the
student initialization helpers."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_rel_close
from pydantic import ValidationError

from tsa_fast.backends import available_backends
from tsa_fast.models import (
    Transformer,
    TransformerConfig,
    checkpoint_state_dict,
    default_layer_map,
    every_kth_layer,
    init_from_teacher,
    num_parameters,
)
from tsa_fast.models.transformer import apply_rotary, rotary_cos_sin

TINY = dict(vocab_size=97, max_seq_len=16, d_model=32, n_layers=2, n_heads=4)
BATCH, N = 3, 12
KINDS = {  # name: config overrides
    "lm-rotary": dict(causal=True, positional="rotary"),
    "lm-learned": dict(causal=True, positional="learned"),
    "encoder-rotary": dict(causal=False, positional="rotary", num_classes=5),
    "encoder-learned": dict(causal=False, positional="learned", num_classes=5),
}
TOL = 1e-5  # float32 recomputations in another order


def make_model(kind: str = "lm-rotary", **overrides) -> Transformer:
    return Transformer(TransformerConfig(**{**TINY, **KINDS[kind], **overrides})).to(DEVICE).eval()


def random_ids(batch: int = BATCH, n: int = N) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, n), device=DEVICE)


def padding_mask() -> torch.Tensor:
    """(BATCH, N) bool, True = real: row 0 unpadded, row 1 right-padded, row 2 left-padded."""
    mask = torch.ones(BATCH, N, dtype=torch.bool, device=DEVICE)
    mask[1, 7:] = False
    mask[2, :4] = False
    return mask


def test_config_defaults():
    config = TransformerConfig()
    sizes = (config.vocab_size, config.max_seq_len, config.d_model, config.n_layers, config.n_heads)
    assert sizes == (8192, 128, 256, 4, 4)
    assert (config.d_ff, config.ffn_dim, config.head_dim) == (None, 1024, 64)
    assert (config.dropout, config.positional, config.causal, config.num_classes) == (0.0, "rotary", True, None)
    assert TransformerConfig(d_ff=100).ffn_dim == 100


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(d_model=30, n_heads=4), "d_model=30 must be divisible by n_heads=4"),
        (dict(d_model=36, n_heads=4), "even head dim.*= 9"),
        (dict(n_layers=0), "n_layers"),
        (dict(d_ff=-1), "d_ff"),
        (dict(dropout=1.0), "dropout"),
        (dict(positional="alibi"), "positional"),
        (dict(hidden_size=32), "hidden_size"),
    ],
)
def test_config_errors_name_the_values(overrides, match):
    with pytest.raises(ValidationError, match=match):
        TransformerConfig(**overrides)
    assert issubclass(ValidationError, ValueError)


@pytest.mark.parametrize("kind", KINDS)
def test_output_shapes(kind):
    model = make_model(kind)
    config, ids = model.config, random_ids()
    out = model(ids, padding_mask() if not config.causal else None, output_hidden_states=True, output_qkv=True)
    assert out.hidden.shape == (BATCH, N, config.d_model)
    assert len(out.hidden_states) == config.n_layers + 1
    assert all(h.shape == (BATCH, N, config.d_model) for h in out.hidden_states)
    assert len(out.qkv) == config.n_layers
    assert all(x.shape == (BATCH, config.n_heads, N, config.head_dim) for qkv in out.qkv for x in qkv)
    assert model.logits(out.hidden).shape == (BATCH, N, config.vocab_size)
    if config.num_classes:
        assert model.classify(out.hidden, padding_mask()).shape == (BATCH, config.num_classes)
    plain = model(ids, padding_mask() if not config.causal else None)
    assert plain.hidden_states is None and plain.qkv is None
    torch.testing.assert_close(plain.hidden, out.hidden)


@pytest.mark.parametrize("kind", ["lm-rotary", "lm-learned", "encoder-rotary"])
def test_causality(kind):
    model, ids, changed_at = make_model(kind), random_ids(), 7
    other = ids.clone()
    other[:, changed_at] = (ids[:, changed_at] + 1) % TINY["vocab_size"]
    hidden, other_hidden = model(ids).hidden, model(other).hidden
    differs = (hidden - other_hidden).abs().amax(dim=(0, 2)) > 1e-6  # per position
    if model.config.causal:
        assert not differs[:changed_at].any() and differs[changed_at:].all()
    else:
        assert differs.all()


@pytest.mark.parametrize("kind", ["encoder-rotary", "encoder-learned", "lm-rotary"])
def test_padded_tokens_change_no_real_output(kind):
    model, ids, mask = make_model(kind), random_ids(), padding_mask()
    other = torch.where(mask, ids, (ids + 5) % TINY["vocab_size"])
    out, other_out = model(ids, mask), model(other, mask)
    torch.testing.assert_close(out.hidden[mask], other_out.hidden[mask], rtol=0, atol=1e-6)
    assert not torch.allclose(out.hidden[~mask], other_out.hidden[~mask])
    if model.config.num_classes:
        torch.testing.assert_close(model.classify(out.hidden, mask), model.classify(other_out.hidden, mask))
        # 0/1 integer masks mean the same
        torch.testing.assert_close(model(ids, mask.long()).hidden, out.hidden)


def test_classify_mean_pools_real_tokens():
    model, ids, mask = make_model("encoder-rotary"), random_ids(), padding_mask()
    hidden = model(ids, mask).hidden
    pooled = torch.stack([hidden[b, mask[b]].mean(dim=0) for b in range(BATCH)])
    torch.testing.assert_close(model.classify(hidden, mask), model.classifier(pooled))
    torch.testing.assert_close(model.classify(hidden), model.classifier(hidden.mean(dim=1)))


def test_rotary_scores_depend_on_position_differences_only():
    head_dim, n = 16, 20
    cos, sin = rotary_cos_sin(n, head_dim, DEVICE)
    q, k = torch.randn(2, head_dim, device=DEVICE)
    # the same q and k at every position: scores[i, j] = (R_i q) . (R_j k) must depend on i - j only
    scores = apply_rotary(q.expand(n, head_dim), cos, sin) @ apply_rotary(k.expand(n, head_dim), cos, sin).T
    for shift in range(1, 5):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift])
    torch.testing.assert_close(scores[0, 0], q @ k)  # position 0 is not rotated
    assert not torch.allclose(scores[0, 1:], scores[1:, 0])  # but direction matters: not symmetric in i - j


@pytest.mark.parametrize("kind", ["lm-rotary", "encoder-learned"])
def test_inputs_embeds_equal_input_ids(kind):
    model, ids, mask = make_model(kind), random_ids(), padding_mask()
    by_ids = model(ids, mask, output_hidden_states=True)
    by_embeds = model(inputs_embeds=model.embed_tokens(ids), attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(by_embeds.hidden, by_ids.hidden, rtol=0, atol=0)
    torch.testing.assert_close(by_embeds.hidden_states, by_ids.hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(model.embed_tokens(ids), model.token_embedding.weight[ids])


@pytest.mark.parametrize("kind", KINDS)
def test_returned_qkv_and_hidden_states_are_what_each_block_computes(kind):
    """Recompute every block from its returned input with PyTorch's attention on the returned q, k, v."""
    model = make_model(kind)
    config, ids = model.config, random_ids()
    mask = None if config.causal else padding_mask()
    out = model(ids, mask, output_hidden_states=True, output_qkv=True)
    embedded = model.token_embedding(ids)
    if config.positional == "learned":
        embedded = embedded + model.position_embedding.weight[:N]
    assert_rel_close(out.hidden_states[0], embedded, TOL, "embedding output")
    cos, sin = rotary_cos_sin(N, config.head_dim, DEVICE)
    for i, block in enumerate(model.blocks):
        x, (q, k, v) = out.hidden_states[i], out.qkv[i]
        heads = block.qkv(block.attn_norm(x)).view(BATCH, N, 3, config.n_heads, config.head_dim).transpose(1, 3)
        expected_q, expected_k, expected_v = heads.unbind(2)
        if config.positional == "rotary":
            expected_q, expected_k = apply_rotary(expected_q, cos, sin), apply_rotary(expected_k, cos, sin)
        for name, actual, expected in zip("qkv", (q, k, v), (expected_q, expected_k, expected_v)):
            assert_rel_close(actual, expected, TOL, f"block {i} {name}")
        attn_mask = None if mask is None else mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=config.causal)
        x = x + block.attn_out(attended.transpose(1, 2).reshape(BATCH, N, config.d_model))
        x = x + block.ffn_out(F.gelu(block.ffn_in(block.ffn_norm(x))))
        assert_rel_close(out.hidden_states[i + 1], x, TOL, f"block {i} output")
    assert_rel_close(out.hidden, model.final_norm(out.hidden_states[-1]), TOL, "final norm")


@pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="no triton backend here")
@pytest.mark.parametrize("kind", ["lm-rotary", "encoder-learned"])
def test_fused_kernel_path_matches_pytorch_path(kind, monkeypatch):
    model, ids = make_model(kind), random_ids(batch=2)
    mask = None if model.config.causal else padding_mask()[1:]
    monkeypatch.setenv("TSA_FAST_BACKEND", "torch")
    expected = model(ids, mask).hidden
    monkeypatch.setenv("TSA_FAST_BACKEND", "triton")
    assert_rel_close(model(ids, mask).hidden, expected, 1e-4, "triton vs torch")


def test_lm_head_is_tied_and_counted_once():
    model = make_model("lm-rotary")
    assert model.lm_head_weight is model.token_embedding.weight
    assert model.lm_head_weight.data_ptr() == model.token_embedding.weight.data_ptr()
    config = model.config
    d, ff, layers = config.d_model, config.ffn_dim, config.n_layers
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d)
    assert num_parameters(model) == config.vocab_size * d + layers * per_block + 2 * d
    hidden = model(random_ids()).hidden
    torch.testing.assert_close(model.logits(hidden), hidden @ model.token_embedding.weight.T)
    shared = torch.nn.Linear(4, 4)
    assert num_parameters(torch.nn.Sequential(shared, shared)) == 20


def test_initialization_is_gpt2_and_deterministic():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=97, d_model=64, n_layers=8, n_heads=4))
    torch.manual_seed(0)
    again = Transformer(TransformerConfig(vocab_size=97, d_model=64, n_layers=8, n_heads=4))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    block = model.blocks[0]
    assert all(not m.bias.any() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert abs(block.qkv.weight.std().item() - 0.02) < 0.002
    for projection in (block.attn_out, block.ffn_out):
        assert abs(projection.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    model = make_model(kind, dropout=0.1).train()
    ids, mask = random_ids(), padding_mask()
    embeds = model.embed_tokens(ids).detach().requires_grad_()
    if model.config.causal:
        out = model(inputs_embeds=embeds)
        loss = F.cross_entropy(model.logits(out.hidden[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    else:
        out = model(inputs_embeds=embeds, attention_mask=mask)
        loss = F.cross_entropy(model.classify(out.hidden, mask), torch.arange(BATCH, device=DEVICE))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    if not model.config.causal:  # the encoder does not use the LM head: the embedding gets no gradient
        grads.pop("token_embedding.weight")
    assert all(g is not None and g.isfinite().all() and g.any() for g in grads.values()), [
        name for name, g in grads.items() if g is None or not g.any()
    ]
    assert embeds.grad is not None and embeds.grad.any()


def test_every_kth_layer_and_default_layer_map():
    assert every_kth_layer(6, 3) == [1, 3, 5]
    assert every_kth_layer(12, 6) == [1, 3, 5, 7, 9, 11]
    assert every_kth_layer(5, 2) == [1, 4]
    assert every_kth_layer(4, 4) == [0, 1, 2, 3]
    assert every_kth_layer(7, 1) == [6]
    assert default_layer_map(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert default_layer_map(2, 2) == [(0, 0), (1, 1)]
    for bad in [(2, 3), (4, 0)]:
        with pytest.raises(ValueError, match=f"n_student_layers={bad[1]}, n_teacher_layers={bad[0]}"):
            every_kth_layer(*bad)


@pytest.mark.parametrize("kind", ["lm-learned", "encoder-rotary"])
def test_init_from_teacher_gives_the_truncated_teacher(kind):
    teacher, student = make_model(kind, n_layers=3), make_model(kind, n_layers=2, max_seq_len=12)
    assert init_from_teacher(student, teacher, layers=[0, 1]) is student
    ids, mask = random_ids(), None if teacher.config.causal else padding_mask()
    truncated = teacher.final_norm(teacher(ids, mask, output_hidden_states=True).hidden_states[2])
    assert_rel_close(student(ids, mask).hidden, truncated, TOL, "student vs truncated teacher")


def test_init_from_teacher_copies_the_chosen_blocks():
    teacher, student = make_model("lm-rotary", n_layers=4), make_model("lm-rotary", n_layers=2)
    init_from_teacher(student, teacher)  # every_kth_layer(4, 2) = [1, 3]
    for student_block, j in zip(student.blocks, [1, 3]):
        for (name, s), t in zip(student_block.state_dict().items(), teacher.blocks[j].state_dict().values()):
            assert torch.equal(s, t), name
    assert torch.equal(student.token_embedding.weight, teacher.token_embedding.weight)
    assert torch.equal(student.final_norm.weight, teacher.final_norm.weight)


@pytest.mark.parametrize(
    "student_overrides, layers, match",
    [
        (dict(d_model=16), None, "d_model: student 16, teacher 32"),
        (dict(n_heads=2), None, "n_heads: student 2, teacher 4"),
        (dict(d_ff=64), None, "ffn_dim: student 64, teacher 128"),
        (dict(vocab_size=50), None, "vocab_size: student 50, teacher 97"),
        (dict(positional="learned"), None, "positional: student learned, teacher rotary"),
        ({}, [0, 3], r"in \[0, 3\).*\[0, 3\]"),
        ({}, [0], r"2 teacher block indices.*got \[0\]"),
    ],
)
def test_init_from_teacher_mismatches_raise(student_overrides, layers, match):
    teacher, student = make_model("lm-rotary", n_layers=3), make_model("lm-rotary", **student_overrides)
    with pytest.raises(ValueError, match=match):
        init_from_teacher(student, teacher, layers)


def test_init_from_teacher_narrower_takes_the_leading_dimensions_and_heads():
    teacher = make_model("lm-learned", n_layers=3)  # d_model 32, 4 heads of 8, FFN 128
    student = make_model("lm-learned", d_model=16, n_heads=2, d_ff=48, max_seq_len=12)
    init_from_teacher(student, teacher, layers=[0, 2], narrower=True)
    assert torch.equal(student.token_embedding.weight, teacher.token_embedding.weight[:, :16])
    assert torch.equal(student.position_embedding.weight, teacher.position_embedding.weight[:12, :16])
    for block, j in zip(student.blocks, [0, 2]):
        source = teacher.blocks[j]
        for part in range(3):  # q, k, v: heads 0 and 1 of each (rows 8h .. 8h + 7 of its 32), input dims :16
            rows = slice(part * 16, (part + 1) * 16)
            teacher_rows = slice(part * 32, part * 32 + 16)
            assert torch.equal(block.qkv.weight[rows], source.qkv.weight[teacher_rows, :16]), part
            assert torch.equal(block.qkv.bias[rows], source.qkv.bias[teacher_rows]), part
        assert torch.equal(block.attn_out.weight, source.attn_out.weight[:16, :16])
        assert torch.equal(block.ffn_in.weight, source.ffn_in.weight[:48, :16])
        assert torch.equal(block.ffn_out.weight, source.ffn_out.weight[:16, :48])
        assert torch.equal(block.ffn_norm.bias, source.ffn_norm.bias[:16])
    assert torch.equal(student.final_norm.weight, teacher.final_norm.weight[:16])
    # Same widths: narrower=True is the whole copy.
    whole, sliced = make_model("lm-rotary", n_layers=2), make_model("lm-rotary", n_layers=2)
    init_from_teacher(whole, teacher_rotary := make_model("lm-rotary", n_layers=4))
    init_from_teacher(sliced, teacher_rotary, narrower=True)
    for (name, a), b in zip(whole.state_dict().items(), sliced.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "student_overrides, match",
    [
        (dict(d_model=16), "head_dim: student 4, teacher 8"),
        (dict(d_model=64, n_heads=8), "d_model: student 64 > teacher 32.*n_heads: student 8 > teacher 4"),
        (dict(d_ff=256), "ffn_dim: student 256 > teacher 128"),
        (dict(positional="learned"), "positional: student learned, teacher rotary"),
    ],
)
def test_init_from_teacher_narrower_mismatches_raise(student_overrides, match):
    teacher, student = make_model("lm-rotary", n_layers=3), make_model("lm-rotary", **student_overrides)
    with pytest.raises(ValueError, match=match):
        init_from_teacher(student, teacher, narrower=True)


def test_classify_without_a_head_raises():
    model = make_model("lm-rotary")
    with pytest.raises(RuntimeError, match="num_classes"):
        model.classify(model(random_ids()).hidden)


BAD_INPUTS = {  # name: (forward kwargs from CPU (ids, mask), error, message)
    "neither": (lambda ids, mask: {}, ValueError, "got neither"),
    "both": (lambda ids, mask: dict(input_ids=ids, inputs_embeds=torch.zeros(3, 12, 32)), ValueError, "got both"),
    "list ids": (lambda ids, mask: dict(input_ids=ids.tolist()), TypeError, "got list"),
    "float ids": (lambda ids, mask: dict(input_ids=ids.float()), ValueError, "int64 or int32, got torch.float32"),
    "1-d ids": (lambda ids, mask: dict(input_ids=ids[0]), ValueError, r"\(B, N\) tensor, got shape \(12,\)"),
    "too long": (lambda ids, mask: dict(input_ids=ids.repeat(1, 2)), ValueError, r"N=24 .* max_seq_len=16"),
    "empty": (lambda ids, mask: dict(input_ids=ids[:, :0]), ValueError, "N=0"),
    "id too large": (lambda ids, mask: dict(input_ids=ids + 97), ValueError, r"\[0, 97\), got min \d+, max \d+"),
    "negative id": (lambda ids, mask: dict(input_ids=ids - 200), ValueError, r"\[0, 97\), got min -\d+"),
    "int embeds": (lambda ids, mask: dict(inputs_embeds=ids[..., None].expand(-1, -1, 32)), ValueError, "float"),
    "embeds width": (lambda ids, mask: dict(inputs_embeds=torch.zeros(3, 12, 31)), ValueError, r"d_model=32.*31\)"),
    "mask shape": (
        lambda ids, mask: dict(input_ids=ids, attention_mask=mask[:, :5]),
        ValueError,
        r"\(3, 12\).*\(3, 5\)",
    ),
    "float mask": (lambda ids, mask: dict(input_ids=ids, attention_mask=mask.float()), ValueError, "float32"),
    "list mask": (lambda ids, mask: dict(input_ids=ids, attention_mask=mask.tolist()), TypeError, "got list"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_values(case):
    model = Transformer(TransformerConfig(**TINY, causal=False)).eval()  # CPU: the id range is checked there
    kwargs, error, match = BAD_INPUTS[case]
    with pytest.raises(error, match=match):
        model(**kwargs(torch.randint(0, TINY["vocab_size"], (BATCH, N)), padding_mask().cpu()))


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model = make_model("lm-learned", dropout=0.1).cpu()
    model.save_pretrained(tmp_path / "model")
    loaded = Transformer.from_pretrained(tmp_path / "model")
    assert loaded.config == model.config and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # an engine phase directory: checkpoint.pt holds the weights under module/model. (with the optimizer's state)
    phase = tmp_path / "phase"
    phase.mkdir()
    (phase / "config.json").write_text(model.config.model_dump_json())
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"module": {**weights, "objective.w": torch.zeros(1)}, "step": 1}, phase / "checkpoint.pt")
    again = Transformer.from_pretrained(phase)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(model.config.model_dump_json())
    with pytest.raises(FileNotFoundError, match="neither model.pt nor checkpoint.pt"):
        Transformer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a state dict"):
        checkpoint_state_dict({"step": 1}, "x.pt")
