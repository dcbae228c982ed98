"""Cross-tokenizer alignment and vocabulary map (tsa_fast.cross_tokenizer): hand-built offsets, real BPE tokenizers
of two vocabulary sizes, Hugging Face tokenizers, bad input."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tsa_fast.cross_tokenizer import (
    align_offsets,
    alignment_from_groups,
    byte_level_alphabet,
    special_ids,
    token_bytes,
    token_groups,
    vocabulary_map,
)
from tsa_fast.distill.batches import take
from tsa_fast.distill.config import LossConfig
from tsa_fast.distill.data import DataConfig, build_data, cross_tokenizer_blocks, lm_blocks, train_tokenizer
from tsa_fast.distill.evaluate import evaluate
from tsa_fast.distill.objective import DistillationObjective
from tsa_fast.distill.teachers import OwnTokenizerTeachers, Teachers
from tsa_fast.models import Transformer, TransformerConfig
from tsa_fast.ops.cross_tokenizer_loss import cross_tokenizer_loss
from tsa_fast.recipes.lm import load_config
from tsa_fast.reference.distillation_loss import distillation_loss as reference_distillation_loss

TEXT = [
    "Return the number of items in the container; raise ValueError when the key is missing.",
    "Unicode text: naïve café, Straße, 日本語のテキスト, emoji ✓ and → arrows, Ω ≈ 3.14.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away again.",
] * 20


@pytest.fixture(scope="module")
def tokenizers_pair() -> tuple[Tokenizer, Tokenizer]:
    return train_tokenizer(TEXT, 300), train_tokenizer(TEXT, 600)


def ends_of(tokenizer: Tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    ids = tokenizer.encode(text).ids
    pieces = token_bytes(tokenizer)
    return ids, np.cumsum([len(pieces[i]) for i in ids])


def test_byte_level_alphabet_is_the_tokenizers_one():
    table = byte_level_alphabet()
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet()) and sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["A"] == ord("A")


def test_token_bytes_concatenate_to_the_text(tokenizers_pair):
    for tokenizer in tokenizers_pair:
        pieces = token_bytes(tokenizer)
        for text in TEXT[:3] + ["unseen wörds ☃ \n\t tabs"]:
            assert b"".join(pieces[i] for i in tokenizer.encode(text).ids) == text.encode()
        assert pieces[tokenizer.token_to_id("<eos>")] == b"" and special_ids(tokenizer) == {0, 1}


def test_identical_tokenizers_give_the_identity(tokenizers_pair):
    tokenizer = tokenizers_pair[0]
    ids, ends = ends_of(tokenizer, TEXT[1])
    student, teacher = token_groups(ends, ends)
    assert student.tolist() == list(range(len(ids))) and teacher.tolist() == student.tolist()
    pairs = vocabulary_map(tokenizer, tokenizer)
    assert pairs[:, 0].tolist() == pairs[:, 1].tolist() == list(range(tokenizer.get_vocab_size()))


@pytest.mark.parametrize(
    "student_ends, teacher_ends, student_groups, teacher_groups",
    [
        ([2, 4, 6], [4, 6], [0, 0, 1], [0, 1]),  # one teacher token = two student tokens
        ([4, 6], [2, 4, 6], [0, 1], [0, 0, 1]),  # and the reverse
        ([1, 3, 5, 8, 9], [2, 4, 6, 8, 9], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]),  # no shared boundary for a stretch
        ([1, 2, 3], [3], [0, 0, 0], [0]),
        ([3, 5], [2, 4], [-1, -1], [-1, -1]),  # no boundary in common after the start: no group
        ([2, 5, 7], [2, 6], [0, -1, -1], [0, -1]),  # the ends differ: the tail after the last aligned boundary
    ],
)
def test_hand_built_groups(student_ends, teacher_ends, student_groups, teacher_groups):
    student, teacher = token_groups(student_ends, teacher_ends)
    assert student.tolist() == student_groups and teacher.tolist() == teacher_groups
    assert student.dtype == teacher.dtype == np.int64


def test_unicode_characters_of_several_bytes():
    """'añ✓b' is 1 + 2 + 3 + 1 bytes: the student splits ✓ (3 bytes) into 2 + 1 and 'añ' into 'a', 'ñ'; the
    teacher has 'añ', '✓', 'b'."""
    text = "añ✓b".encode()
    student_pieces = [b"a", "ñ".encode(), "✓".encode()[:2], "✓".encode()[2:], b"b"]
    teacher_pieces = ["añ".encode(), "✓".encode(), b"b"]
    assert b"".join(student_pieces) == b"".join(teacher_pieces) == text
    student, teacher = token_groups(
        np.cumsum([len(p) for p in student_pieces]), np.cumsum([len(p) for p in teacher_pieces])
    )
    assert student.tolist() == [0, 0, 1, 1, 2] and teacher.tolist() == [0, 1, 2]


def test_start_offsets_window_the_text():
    """Windows that start at different offsets: tokens before the first boundary of both are in no group."""
    student, teacher = token_groups([5, 7, 9], [7, 9], student_start=3, teacher_start=5)
    assert student.tolist() == [-1, 0, 1] and teacher.tolist() == [0, 1]
    student, teacher = token_groups([5, 7], [5, 7], student_start=3, teacher_start=4)
    assert student.tolist() == [-1, 0] and teacher.tolist() == [-1, 0]  # (3, 5] and (4, 5] are not the same bytes


def test_real_tokenizers_of_two_vocabulary_sizes(tokenizers_pair):
    small, large = tokenizers_pair
    small_pieces, large_pieces = token_bytes(small), token_bytes(large)
    for text in TEXT[:3]:
        s_ids, s_ends = ends_of(small, text)
        t_ids, t_ends = ends_of(large, text)
        assert len(s_ids) > len(t_ids) and s_ends[-1] == t_ends[-1] == len(text.encode())
        student, teacher = token_groups(s_ends, t_ends)
        # Both cover the whole text: every token is in a group, groups in order, each the same bytes on both sides.
        assert (student >= 0).all() and (teacher >= 0).all() and (np.diff(student) >= 0).all()
        assert student[-1] == teacher[-1] and (np.diff(teacher) >= 0).all()
        for g in range(student[-1] + 1):
            student_text = b"".join(small_pieces[i] for i, k in zip(s_ids, student) if k == g)
            teacher_text = b"".join(large_pieces[i] for i, k in zip(t_ids, teacher) if k == g)
            assert student_text == teacher_text and student_text, g
        assert student[-1] + 1 > len(t_ids) // 2  # most boundaries are shared


def test_vocabulary_map_of_real_tokenizers(tokenizers_pair):
    small, large = tokenizers_pair
    pairs = vocabulary_map(small, large)
    small_pieces, large_pieces = token_bytes(small), token_bytes(large)
    assert pairs.dtype == torch.int64 and pairs.shape[1] == 2
    assert len(set(pairs[:, 0].tolist())) == len(pairs) == len(set(pairs[:, 1].tolist()))
    for s, t in pairs.tolist():
        assert small_pieces[s] == large_pieces[t] or (s, t) in {(0, 0), (1, 1)}
    # Every byte string of the small vocabulary is also one of the large one (BPE on the same text: a prefix of merges).
    assert len(pairs) == small.get_vocab_size()


def sentencepiece_style(texts: list[str], vocab_size: int) -> Tokenizer:
    """A BPE with SentencePiece's conventions: the word-boundary mark '▁' for spaces and <0xHH> byte fallbacks
    (vocabulary entries of their own, as in Llama 2's tokenizer)."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    config = json.loads(tokenizer.to_str())
    vocab = config["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    tokenizer = Tokenizer.from_str(json.dumps(config))
    tokenizer.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def test_vocabulary_map_decodes_each_tokenizers_own_pieces(tokenizers_pair):
    """'▁the' (SentencePiece) and 'Ġthe' (byte-level) are both ' the'; '<0x41>' is the byte 'A'."""
    byte_level = tokenizers_pair[1]
    spm = sentencepiece_style(TEXT, 500)
    pieces = token_bytes(spm)
    assert pieces[spm.token_to_id("▁the")] == b" the" and pieces[spm.token_to_id("<0x41>")] == b"A"
    pairs = dict(vocabulary_map(spm, byte_level).tolist())
    assert pairs[spm.token_to_id("▁the")] == byte_level.token_to_id("Ġthe")
    assert pairs[spm.token_to_id("<eos>")] == byte_level.token_to_id("<eos>")
    # 'T' is both a byte fallback and (from the training text) a letter token: the lowest id maps, the other none.
    letter, fallback = spm.token_to_id("T"), spm.token_to_id("<0x54>")
    assert letter < fallback and pairs[letter] == byte_level.token_to_id("T") and fallback not in pairs


def test_hugging_face_tokenizers(tokenizers_pair, tmp_path):
    from transformers import PreTrainedTokenizerFast

    small, large = tokenizers_pair
    hf_small = PreTrainedTokenizerFast(tokenizer_object=small, eos_token="<eos>", pad_token="<pad>")
    hf_small.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert vocabulary_map(loaded, large).tolist() == vocabulary_map(small, large).tolist()
    assert token_bytes(loaded) == token_bytes(small)


@pytest.mark.parametrize(
    "student_ends, teacher_ends, kwargs, match",
    [
        ([3, 2], [3], {}, "student_ends must be strictly increasing"),
        ([2, 3], [3, 3], {}, "teacher_ends must be strictly increasing"),
        ([0, 3], [3], {}, "student_ends: the first token ends at 0"),
        ([[1, 2]], [2], {}, "student_ends must be a 1-D"),
        ([1.5, 2.0], [2], {}, "student_ends must be a 1-D sequence of integer"),
        ([3], [3], {"teacher_start": -1}, "teacher_ends: the start offset -1"),
        ([5], [3], {"student_start": 5}, "student_ends: the first token ends at 5, not after the start 5"),
    ],
)
def test_bad_offsets_name_the_argument(student_ends, teacher_ends, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_groups(student_ends, teacher_ends, **kwargs)


def test_align_offsets_identity_and_merged_groups():
    ids = [5, 6, 7]
    identity = align_offsets([1, 3, 4], [1, 3, 4], ids, ids)
    assert identity.student_rows.tolist() == identity.teacher_rows.tolist() == [0, 1, 2]
    assert identity.student_prefix.tolist() == identity.teacher_prefix.tolist() == [-1, -1, -1]
    assert identity.student_tokens.tolist() == ids
    # Student 'ab' 'c' 'de' against teacher 'a' 'bc' 'd' 'e': groups 'abc' (student rows 0-1, teacher 0-1), 'de'.
    merged = align_offsets([2, 3, 5], [1, 3, 4, 5], [10, 11, 12], [20, 21, 22, 23])
    assert merged.student_rows.tolist() == [1, 2] and merged.teacher_rows.tolist() == [1, 3]
    assert merged.student_prefix.tolist() == [0, -1, -1] and merged.teacher_prefix.tolist() == [0, -1, 1, -1]
    assert merged.teacher_tokens.tolist() == [20, 21, 22, 23]
    assert all(t.dtype == torch.int64 for t in merged)


def test_alignment_from_groups_numbers_the_groups_of_a_batch():
    student_group = torch.tensor([[-1, 0, 0, 1], [0, 1, 2, -1]])
    teacher_group = torch.tensor([[-1, 0, 1], [0, 1, 2]])
    tokens_s, tokens_t = torch.arange(8).view(2, 4), torch.tensor([[-100, 1, 2], [3, 4, -100]])
    alignment = alignment_from_groups(student_group, teacher_group, tokens_s, tokens_t)
    assert alignment.student_rows.tolist() == [2, 3, 4, 5, 6] and alignment.teacher_rows.tolist() == [1, 2, 3, 4, 5]
    assert alignment.student_prefix.tolist() == [-1, 0, -1, -1, -1, -1, -1, -1]
    assert alignment.teacher_prefix.tolist() == [-1] * 6 and alignment.teacher_tokens.tolist() == [0, 1, 2, 3, 4, 0]
    with pytest.raises(ValueError, match="differ in number"):
        alignment_from_groups(student_group, teacher_group[:, :2], tokens_s, tokens_t[:, :2])
    with pytest.raises(ValueError, match="same shape"):
        alignment_from_groups(student_group, teacher_group, tokens_s[:, :3], tokens_t)


def test_identical_tokenizations_give_distillation_loss():
    """The alignment of a text with itself, with the identity map, makes cross_tokenizer_loss's exact term the
    distillation loss's soft term and its ULD term 0."""
    import tsa_fast

    torch.manual_seed(0)
    ends = [2, 3, 7, 9]
    ids = torch.tensor([3, 1, 4, 1])
    alignment = align_offsets(ends, ends, ids, ids)
    logits = torch.randn(4, 6, dtype=torch.float64)
    identity = torch.arange(6).repeat(2, 1).T.contiguous()
    loss, parts = tsa_fast.cross_tokenizer_loss(
        logits, logits, alignment, identity, temperature=2.0, uld_weight=1.0, return_parts=True
    )
    teacher = torch.randn(4, 6, dtype=torch.float64)
    exact = tsa_fast.cross_tokenizer_loss(logits, teacher, alignment, identity, temperature=2.0, uld_weight=0.0)
    assert abs(float(parts.uld)) < 1e-12 and abs(float(loss)) < 1e-12
    expected = tsa_fast.distillation_loss(logits, teacher, None, temperature=2.0)
    assert torch.allclose(exact, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    "student_ends, teacher_ends, tokens, match",
    [
        ([1, 3], [1, 4], ([0, 0], [0, 0]), "do not cover the same text: they end at 3 and 4"),
        ([], [2], ([], [0]), "do not cover the same text"),
        ([1, 3], [3], ([0], [0]), "student_tokens must be one id per offset"),
        ([2, 1], [1], ([0, 0], [0]), "student_ends must be strictly increasing"),
    ],
)
def test_align_offsets_bad_input(student_ends, teacher_ends, tokens, match):
    with pytest.raises(ValueError, match=match):
        align_offsets(student_ends, teacher_ends, *tokens)


def test_bad_tokenizer_is_a_type_error(tokenizers_pair):
    with pytest.raises(TypeError, match="teacher_tokenizer"):
        vocabulary_map(tokenizers_pair[0], "gpt2")


# --- data: LM blocks in both tokenizations -----------------------------------------------------------------


def test_cross_tokenizer_blocks_align_the_same_text(tokenizers_pair):
    small, large = tokenizers_pair
    documents = [TEXT[i % 3][: 20 + 7 * i] for i in range(30)]
    student_ids = [e.ids for e in small.encode_batch(documents)]
    teacher_ids = [e.ids for e in large.encode_batch(documents)]
    sizes = [np.array([len(p) for p in token_bytes(t)]) for t in (small, large)]
    seq_len = 64
    blocks = cross_tokenizer_blocks(
        student_ids, teacher_ids, *sizes, student_eos=1, teacher_eos=1, teacher_pad=0, seq_len=seq_len
    )
    plain = lm_blocks(student_ids, 1, seq_len)
    assert torch.equal(blocks["input_ids"], plain["input_ids"]) and torch.equal(blocks["labels"], plain["labels"])
    assert all(blocks[k].shape == plain["labels"].shape for k in ("teacher_input_ids", "teacher_labels"))
    valid = blocks["teacher_labels"] != -100
    assert torch.equal(
        blocks["teacher_labels"][:, :-1][valid[:, :-1]], blocks["teacher_input_ids"][:, 1:][valid[:, :-1]]
    )
    small_pieces, large_pieces = token_bytes(small), token_bytes(large)
    piece = lambda pieces, i: pieces[i] if i != 1 else b"\n"  # noqa: E731  (EOS: one separator byte)
    covered = 0
    for b in range(len(blocks["labels"])):
        s_group, t_group = blocks["student_group"][b], blocks["teacher_group"][b]
        n = int(s_group.max()) + 1
        assert n == int(t_group.max()) + 1 and n > 0
        for g in range(n):  # every group: the same bytes on both sides, its tokens consecutive
            s_rows, t_rows = (s_group == g).nonzero().flatten(), (t_group == g).nonzero().flatten()
            assert len(s_rows) and len(t_rows) and s_rows.diff().eq(1).all() and t_rows.diff().eq(1).all()
            s_text = b"".join(piece(small_pieces, int(i)) for i in blocks["labels"][b, s_rows])
            t_text = b"".join(piece(large_pieces, int(i)) for i in blocks["teacher_labels"][b, t_rows])
            assert s_text == t_text, (b, g)
        # Only the blocks' edges fall out of the groups (a group cut by the block on either side).
        for group in (s_group, t_group[blocks["teacher_labels"][b] != -100]):
            rows = (group >= 0).nonzero().flatten()
            assert torch.equal(rows, torch.arange(int(rows[0]), int(rows[-1]) + 1))
        covered += int((s_group >= 0).sum())
    assert covered > 0.85 * blocks["labels"].numel()


def small_lm_data(tmp_path, vocab_size: int, teacher_vocab_size: int):
    source = tmp_path / "docs.txt"
    source.write_text("\n\n".join(f"{TEXT[i % 3]} Document {i}." for i in range(60)))
    config = DataConfig(source=str(source), vocab_size=vocab_size, seq_len=16, cache_dir=str(tmp_path / "cache"))
    teacher = build_data(config.model_copy(update={"vocab_size": teacher_vocab_size}))
    return build_data(config, teacher.tokenizer), teacher


def test_build_data_with_a_teacher_tokenizer(tmp_path):
    data, teacher = small_lm_data(tmp_path, 300, 600)
    config = DataConfig(
        source=str(tmp_path / "docs.txt"), vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "cache")
    )
    plain = build_data(config)
    assert data.teacher_tokenizer is teacher.tokenizer and "teacher tokens" in data.summary()
    for name in ("train", "validation", "test"):
        split = data.split(name)
        assert torch.equal(split["input_ids"], plain.split(name)["input_ids"])
        assert {"teacher_input_ids", "teacher_labels", "student_group", "teacher_group"} <= set(split)
        assert split["teacher_input_ids"].max() < teacher.vocab_size
    pieces = token_bytes(data.tokenizer)
    labels = data.test["labels"]
    assert data.test["label_bytes"].tolist() == [[len(pieces[i]) for i in row] for row in labels.tolist()]
    assert "label_bytes" not in data.train and "label_bytes" in teacher.validation
    with pytest.raises(ValueError, match="task='lm'"):
        build_data(config.model_copy(update={"task": "classify"}), teacher.tokenizer)


def test_bits_per_byte_is_the_nll_over_the_bytes_of_the_predicted_text():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=20, max_seq_len=6, d_model=16, n_heads=2, n_layers=1))
    ids = torch.randint(0, 20, (5, 7))
    split = {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone(), "label_bytes": torch.randint(0, 4, (5, 6))}
    split["labels"][0, :2] = -100  # ignored labels count in neither the NLL nor the bytes
    metrics = evaluate(model, split, "lm", batch_size=2, device=torch.device("cpu"))
    with torch.no_grad():
        logits = model.logits(model(split["input_ids"]).hidden)
    nll = F.cross_entropy(logits.flatten(0, 1), split["labels"].flatten(), reduction="sum", ignore_index=-100)
    counted = split["labels"].flatten() != -100
    expected = nll.item() / (math.log(2) * split["label_bytes"].flatten()[counted].sum().item())
    assert math.isclose(metrics["bits_per_byte"], expected, rel_tol=1e-6)
    del split["label_bytes"]
    assert "bits_per_byte" not in evaluate(model, split, "lm", batch_size=2, device=torch.device("cpu"))


# --- engine: the teacher source and the objective -----------------------------------------------------------


def test_same_tokenizer_teacher_through_the_cross_tokenizer_path_is_the_distillation_loss(tmp_path):
    """A 'teacher tokenizer of its own' that is the student's: the alignment is the identity, and with uld_weight=0
    the objective is the same-tokenizer distillation loss of the same logits."""
    data, teacher_data = small_lm_data(tmp_path, 300, 300)
    torch.manual_seed(0)
    shape = dict(vocab_size=data.vocab_size, max_seq_len=16, d_model=16, n_heads=2)
    teacher_cfg, student_cfg = TransformerConfig(**shape, n_layers=2), TransformerConfig(**shape, n_layers=1)
    teacher, student = Transformer(teacher_cfg), Transformer(student_cfg)
    source = OwnTokenizerTeachers(
        Teachers([teacher], [1.0], "lm"), vocabulary_map(data.tokenizer, teacher_data.tokenizer)
    ).to(torch.device("cpu"))
    batch = take(data.train, torch.tensor([3, 0, 7]), torch.device("cpu"))
    assert torch.equal(batch["teacher_input_ids"], batch["input_ids"])
    targets = source.targets(batch, 2.0)
    assert targets.alignment.student_rows.tolist() == list(range(48)) == targets.alignment.teacher_rows.tolist()
    assert (targets.alignment.student_prefix == -1).all() and len(targets.vocab_map) == data.vocab_size
    config = LossConfig(temperature=2.0, hard_weight=0.3, cross_tokenizer={"uld_weight": 0.0})
    objective = DistillationObjective(config, "lm", student_cfg, teacher_cfg)
    loss, terms = objective(student, student(batch["input_ids"]), batch, targets, progress=0.0)
    expected = reference_distillation_loss(
        student.logits(student(batch["input_ids"]).hidden).double(),
        teacher.logits(teacher(batch["input_ids"]).hidden).double(),
        batch["labels"],
        temperature=2.0,
        hard_weight=0.3,
    )
    assert torch.allclose(loss.double(), expected, rtol=1e-5) and set(terms) == {"logit"}
    with pytest.raises(ValueError, match="no hidden states"):
        source.targets(batch, 2.0, hidden_states=True)


@pytest.mark.parametrize("fused", [False, True])
def test_objective_calls_the_cross_tokenizer_loss_with_the_batchs_alignment(fused, tmp_path):
    """The objective's loss is cross_tokenizer_loss of the batch's alignment (fused: the fused linear form, the
    teacher as hidden + weight)."""
    data, teacher_data = small_lm_data(tmp_path, 300, 600)
    torch.manual_seed(0)
    teacher_cfg = TransformerConfig(
        vocab_size=teacher_data.vocab_size, max_seq_len=16, d_model=16, n_heads=2, n_layers=1
    )
    student_cfg = teacher_cfg.model_copy(update={"vocab_size": data.vocab_size})
    teacher, student = Transformer(teacher_cfg), Transformer(student_cfg)
    vocab_map = vocabulary_map(data.tokenizer, teacher_data.tokenizer)
    source = OwnTokenizerTeachers(Teachers([teacher], [1.0], "lm"), vocab_map)
    batch = take(data.train, torch.tensor([1, 2]), torch.device("cpu"))
    targets = source.targets(batch, 1.5, fused=fused)
    assert (targets.logits is None) == fused and targets.full_logits().shape == (2, 16, teacher_data.vocab_size)
    config = LossConfig(
        temperature=1.5, hard_weight=0.2, logit_weight=0.5, fused=fused, cross_tokenizer={"uld_top_k": 8}
    )
    out = student(batch["input_ids"])
    loss, _ = DistillationObjective(config, "lm", student_cfg, teacher_cfg)(student, out, batch, targets, 0.0)
    expected = cross_tokenizer_loss(
        student.logits(out.hidden).flatten(0, 1),
        targets.full_logits().flatten(0, 1),
        targets.alignment,
        vocab_map,
        batch["labels"].flatten(),
        temperature=1.5,
        exact_weight=0.5,
        uld_weight=0.5,
        uld_top_k=8,
        hard_weight=0.2,
    )
    assert torch.allclose(loss, expected, rtol=1e-5, atol=0) and loss > 0
    loss.backward()
    assert student.lm_head_weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["teachers.0.tokenizer={vocab_size: 600}", "teacher_cache.enabled=true"], "teacher_cache.enabled=false"),
        (["teachers.0.tokenizer={vocab_size: 600}", "loss.hidden_weight=1"], "loss.hidden_weight=0"),
        (["teachers.0.tokenizer={vocab_size: 600}", "data.task=classify"], "data.task='lm'"),
        (["teachers.0.tokenizer={vocab_size: 600}", "loss.scale_by_t2=false"], "scale_by_t2=true"),
        (["teachers=[{tokenizer: {vocab_size: 600}}, {}]"], "the same for every teacher"),
        (["same_tokenizer_compare=true"], "needs teachers"),
        (["teachers.0.tokenizer={vocab_size: 100}"], "vocab_size"),
        (["loss.cross_tokenizer.uld_top_k=0"], "uld_top_k"),
    ],
)
def test_cross_tokenizer_config_errors_name_the_option(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)
