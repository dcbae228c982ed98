"""The hf_lm recipe across tokenizers: a Llama teacher and a Qwen2-style student, each saved with its own tokenizer
(two BPEs trained offline on the same text: a SentencePiece-style one for the teacher, whose vocabulary the small
text saturates at about a hundred tokens, and a byte-level one of 290 for the student), distilled from their
directories as a user runs the recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
hf_lm = pytest.importorskip("tsa_fast.recipes.hf_lm")  # skips where transformers is missing or too old

from test_hf_lm import WORDS, save_model, sentences  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

import tsa_fast.distill.objective as objective_module  # noqa: E402
from tsa_fast.cross_tokenizer import alignment_from_groups, token_byte_lengths, token_bytes  # noqa: E402

TEACHER_TOKENS = 101  # what the teacher's BPE learns of this text (checked by the tests)
EXTRA = "café naïve über façade"  # characters of two bytes: the byte-level BPE splits some across tokens


def corpus(n: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    extra = EXTRA.split()
    return [
        text + " " + extra[int(i)]
        for text, i in zip(sentences(n, seed), torch.randint(len(extra), (n,), generator=generator))
    ]


def teacher_tokenizer(prepend_scheme: str = "never") -> transformers.PreTrainedTokenizerFast:
    """Llama-style: SentencePiece pieces (▁ for a space; with "first", one is added before the text), </s> the end
    of text."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme)
    tokenizer.decoder = decoders.Metaspace(prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(corpus(200, 0), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def student_tokenizer(vocab_size: int = 290) -> transformers.PreTrainedTokenizerFast:
    """Qwen-style: byte-level BPE, <|endoftext|> the end of text and the padding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(200, 0), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """(teacher dir, student dir, text file): a Llama teacher and a 2-block Qwen2 student with their tokenizers."""
    root = tmp_path_factory.mktemp("cross")
    teacher = save_model(root / "teacher", "llama", teacher_tokenizer())
    student = save_model(root / "student", "qwen2", student_tokenizer(), layers=2)
    text = root / "text.txt"
    text.write_text("\n\n".join(corpus(80, 1)))
    return teacher, student, text


def cross_config(tmp_path, models_dir, **extra):
    teacher, student, text = models_dir
    values = {
        "teacher": {"pretrained": str(teacher)},
        "student": {"pretrained": str(student)},
        "data": {"source": str(text), "seq_len": 32, "cache_dir": str(tmp_path / "cache")},
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "training": {"steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 12, "log_every": 1},
        "logging": {"tensorboard": False, "progress": False},
        "loss": {"temperature": 1.0, "cross_tokenizer": {"uld_top_k": 16}},
        "samples": {"prompts": 2, "prompt_tokens": 4, "max_new_tokens": 4},  # one tokenizer only
    }
    for key, value in extra.items():  # sections are updated, except the student, which is replaced
        merge = isinstance(value, dict) and key in values and key != "student"
        values[key] = {**values[key], **value} if merge else value
    return hf_lm.HFLMConfig.model_validate(values)


# --- token bytes from offsets ----------------------------------------------------------------------------------


def test_token_byte_lengths_from_offsets():
    # "é" split in two byte-level tokens that share its character offsets; a dropped space goes to the next token.
    assert token_byte_lengths("hé x", [(0, 1), (1, 2), (1, 2), (3, 4)], [1, 1, 1, 1]).tolist() == [1, 1, 1, 2]
    assert token_byte_lengths("", [], []).tolist() == []
    with pytest.raises(ValueError, match="covers no byte"):
        token_byte_lengths("ab", [(0, 1), (1, 1), (1, 2)], [1, 0, 1])
    with pytest.raises(ValueError, match="differ in length"):
        token_byte_lengths("ab", [(0, 2)], [1, 1])


@pytest.mark.parametrize("which", ["byte_level", "sentencepiece_first"])
def test_token_byte_lengths_of_fast_tokenizers(which):
    """The lengths cover the text exactly; byte-level pieces are the text's bytes, and a SentencePiece tokenizer
    that adds a space before the text has a first piece one byte longer than the text it covers."""
    tokenizer = student_tokenizer() if which == "byte_level" else teacher_tokenizer("first")
    pieces = token_bytes(tokenizer)
    for text in corpus(20, 3):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        piece_bytes = [len(pieces[i]) for i in encoding.input_ids]
        lengths = token_byte_lengths(text, encoding.offset_mapping, piece_bytes)
        assert lengths.sum() == len(text.encode())
        expected = piece_bytes if which == "byte_level" else [piece_bytes[0] - 1, *piece_bytes[1:]]
        assert lengths.tolist() == expected


# --- data: both tokenizations, aligned once ------------------------------------------------------------------


def test_alignment_of_a_batch_covers_the_same_bytes(tmp_path, models_dir):
    config = cross_config(tmp_path, models_dir)
    prepared = hf_lm.prepare_inputs(config)
    student_tok, teacher_tok = prepared.tokenizer, prepared.teacher_tokenizer
    assert prepared.cross_tokenizer and len(student_tok) == 290 and len(teacher_tok) == TEACHER_TOKENS != 290
    assert (prepared.vocab_size, prepared.teacher_vocab_size) == (290, TEACHER_TOKENS)
    data = prepared.data
    assert data.teacher_tokenizer is not None and "teacher tokens" in data.summary()
    train = data.train
    assert {"teacher_input_ids", "teacher_labels", "student_group", "teacher_group"} <= set(train)
    student_pieces, teacher_pieces = token_bytes(student_tok), token_bytes(teacher_tok)
    eos = {student_tok.eos_token_id: b"\n", teacher_tok.eos_token_id: b"\n"}  # a document's end: one byte both sides

    def text(pieces, ids) -> bytes:
        return b"".join(eos.get(int(i), pieces[int(i)]) for i in ids)

    corpus_bytes = b"\n".join(p.encode() for p in models_dir[2].read_text().split("\n\n"))
    split_char_groups = 0
    for b in range(8):  # the first batches' rows
        s_group, t_group = train["student_group"][b], train["teacher_group"][b]
        n = int(s_group.max()) + 1
        assert n == int(t_group.max()) + 1 and n > 1
        covered = []
        for g in range(n):
            s_ids = train["labels"][b][s_group == g]
            t_ids = train["teacher_labels"][b][t_group == g]
            assert len(s_ids) and len(t_ids)
            assert text(student_pieces, s_ids) == text(teacher_pieces, t_ids), (b, g)
            covered.append(text(student_pieces, s_ids))
            split_char_groups += any(
                len(student_pieces[int(i)]) == 1 and student_pieces[int(i)][0] >= 0x80 for i in s_ids
            )
        # Consecutive groups are consecutive text (a document's end, one byte, separates documents of the split).
        assert all(part in corpus_bytes for part in b"".join(covered).split(b"\n"))
        assert (s_group >= 0).float().mean() > 0.5
    assert split_char_groups > 0  # a two-byte character split across student tokens was aligned
    # What a training step makes of a batch of these rows: one alignment, as many groups on each side.
    batch = slice(0, 4)
    alignment = alignment_from_groups(
        train["student_group"][batch],
        train["teacher_group"][batch],
        train["labels"][batch],
        train["teacher_labels"][batch],
    )
    groups = int((train["student_group"][batch].amax(dim=1) + 1).sum())
    assert len(alignment.student_rows) == len(alignment.teacher_rows) == groups
    # Validation and test of both tokenizations count the bytes of the text their labels stand for.
    for split, whose in ((data.validation, student_tok), (prepared.teacher_data.validation, teacher_tok)):
        labels, label_bytes = split["labels"], split["label_bytes"]
        assert label_bytes.shape == labels.shape and int(label_bytes[labels == whose.eos_token_id].sum()) == 0
    assert prepared.teacher_data.validation["labels"].max() < TEACHER_TOKENS
    # Cached with the tokenized splits: a second prepare loads the same tensors.
    again = hf_lm.prepare_inputs(config)
    assert torch.equal(again.data.train["teacher_group"], train["teacher_group"])


def test_same_tokenizer_on_both_sides_is_not_cross_tokenizer(tmp_path, models_dir, monkeypatch):
    """A student directory with (a copy of) the teacher's tokenizer and a padded embedding: the one-tokenizer path,
    fused_linear_distillation_loss and no cross-tokenizer loss."""
    teacher = models_dir[0]
    own = transformers.AutoTokenizer.from_pretrained(teacher)
    # A Llama student: transformers loads a generic tokenizer saved in a Qwen2 directory as Qwen2's, which adds a token.
    student = save_model(tmp_path / "student", "llama", own, vocab_size=len(own) + 24, layers=2)
    calls = {"cross": 0, "same": 0}
    for name, key in (("fused_linear_cross_tokenizer_loss", "cross"), ("fused_linear_distillation_loss", "same")):
        original = getattr(objective_module, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(objective_module, name, counted)
    config = cross_config(
        tmp_path,
        models_dir,
        student={"pretrained": str(student)},
        training={"steps": 2, "eval_every": 2},
        baseline=False,
    )
    prepared = hf_lm.prepare_inputs(config)
    assert not prepared.cross_tokenizer and prepared.data.teacher_tokenizer is None
    assert prepared.vocab_size == prepared.teacher_vocab_size == len(own)
    assert "teacher_group" not in prepared.data.train
    results = hf_lm.run(config, prepared=prepared)
    assert calls["cross"] == 0 and calls["same"] >= 2
    assert "validation_kl" in results["distilled"]


# --- the run -------------------------------------------------------------------------------------------------


def test_cross_tokenizer_run(tmp_path, models_dir, monkeypatch):
    calls = []
    original = objective_module.fused_linear_cross_tokenizer_loss

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(objective_module, "fused_linear_cross_tokenizer_loss", counted)
    config = cross_config(tmp_path, models_dir)
    results = hf_lm.prepare(config)()
    assert len(calls) == 12  # every distilled step, none for the baseline
    assert calls[0]["uld_top_k"] == 16 and calls[0]["exact_weight"] == 1.0 and calls[0]["uld_weight"] == 1.0
    pairs, student_pieces = calls[0]["vocab_map"], token_bytes(student_tokenizer())
    teacher_pieces = token_bytes(transformers.AutoTokenizer.from_pretrained(models_dir[0]))
    assert pairs.shape[1] == 2 and len(pairs) > 20  # the teacher's pieces of one or more characters, and "e" ...
    assert all(student_pieces[s] == teacher_pieces[t] for s, t in pairs.tolist())
    for name in ("teacher", "distilled", "baseline"):
        for split in ("validation", "test"):
            assert (
                math.isfinite(results[name][f"{split}_bits_per_byte"]) and results[name][f"{split}_bits_per_byte"] > 0
            )
    # The gap closed is in bits per byte (perplexities of two tokenizers are not comparable).
    base, top = (results[name]["validation_bits_per_byte"] for name in ("baseline", "teacher"))
    closed = (base - results["distilled"]["validation_bits_per_byte"]) / (base - top)
    assert results["distilled"]["validation_gap_closed"] == pytest.approx(closed)
    # Agreement and KL compare one vocabulary's distributions: not reported across tokenizers.
    assert "validation_kl" not in results["distilled"] and "validation_agreement" not in results["distilled"]
    assert "bits/byte" in (tmp_path / "run" / "results.md").read_text()
    losses = np.genfromtxt(tmp_path / "run" / "distilled" / "metrics.csv", delimiter=",", names=True)
    train_loss = losses["loss"]
    assert np.isfinite(train_loss).all() and train_loss[-3:].mean() < train_loss[:3].mean()
    # The exported student loads as a Hugging Face model with its own tokenizer.
    exported = tmp_path / "run" / "distilled" / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert model.config.model_type == "qwen2"
    assert tokenizer.get_vocab() == student_tokenizer().get_vocab() and len(tokenizer) == 290
    ids = tokenizer(" ".join(WORDS[:6]), return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_student_tokenizer_option_with_a_student_config(tmp_path, models_dir):
    """`student.tokenizer`: a student from the teacher's config (random, its vocab_size set) in its own tokenizer."""
    tokenizer_dir = tmp_path / "student_tokenizer"
    student_tokenizer(270).save_pretrained(tokenizer_dir)
    config = cross_config(
        tmp_path,
        models_dir,
        student={"config": {"num_hidden_layers": 2, "vocab_size": 270}, "tokenizer": str(tokenizer_dir)},
    )
    prepared = hf_lm.prepare_inputs(config)
    assert prepared.cross_tokenizer and prepared.vocab_size == 270 and len(prepared.tokenizer) == 270
    small = cross_config(
        tmp_path, models_dir, student={"config": {"num_hidden_layers": 2}, "tokenizer": str(tokenizer_dir)}
    )
    with pytest.raises(ValueError, match=rf"vocab_size {TEACHER_TOKENS} is smaller than its tokenizer's 270 tokens"):
        hf_lm.prepare_inputs(small)  # the teacher's config, the teacher's vocab_size
    too_small = cross_config(
        tmp_path,
        models_dir,
        student={"config": {"num_hidden_layers": 2, "vocab_size": 200}, "tokenizer": str(tokenizer_dir)},
    )
    with pytest.raises(ValueError, match=r"vocab_size 200 is smaller than its tokenizer's 270 tokens.*student.config"):
        hf_lm.prepare_inputs(too_small)
    # student.tokenizer must be the one of student.pretrained's directory when that has one.
    with pytest.raises(ValueError, match=r"student.tokenizer=.* is not the student's tokenizer"):
        hf_lm.prepare_inputs(
            cross_config(
                tmp_path, models_dir, student={"pretrained": str(models_dir[1]), "tokenizer": str(tokenizer_dir)}
            )
        )


# --- what does not combine -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        ({"data": {"format": "chat"}}, "data.format='text'"),
        ({"loss": {"on_policy": {"fraction": 0.5}}}, "loss.on_policy.fraction=0"),
        ({"loss": {"sequence_kd": {"enabled": True}}}, "loss.sequence_kd.enabled=false"),
        ({"loss": {"hidden_weight": 1.0}}, "loss.hidden_weight=0"),
        ({"loss": {"label_smoothing": 0.1}}, "loss.label_smoothing=0"),
        ({"adversarial": {"method": "fgm"}}, "adversarial.method='none'"),
        ({"student": "from_teacher"}, "not student.from_teacher"),
    ],
)
def test_refused_combinations(tmp_path, models_dir, extra, option):
    if extra.get("student") == "from_teacher":
        tokenizer_dir = tmp_path / "student_tokenizer"
        student_tokenizer().save_pretrained(tokenizer_dir)
        extra = {"student": {"from_teacher": {"layers": [0, 3]}, "tokenizer": str(tokenizer_dir)}}
    config = cross_config(tmp_path, models_dir, **extra)
    with pytest.raises(
        ValueError, match=rf"a student tokenizer of its own \(290 tokens, the teacher's {TEACHER_TOKENS}"
    ) as error:
        hf_lm.prepare(config)
    assert option in str(error.value)
