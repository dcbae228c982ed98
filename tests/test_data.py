"""tsa_fast.distill.data: the built-in corpus and its splits, the cached tokenizer, the LM and classification
tensors, user files (.txt, .jsonl, saved datasets) and the errors bad data raises before training."""

import json
import random
import sys

import pytest
import torch
from pydantic import ValidationError

from tsa_fast.distill import data
from tsa_fast.distill.data import (
    EXCLUDED_FAMILIES,
    SPLITS,
    DataConfig,
    build_data,
    lm_blocks,
    split_documents,
    stdlib_documents,
)

WORDS = [
    "the",
    "kernel",
    "fuses",
    "softmax",
    "and",
    "loss",
    "so",
    "memory",
    "stays",
    "small",
    "while",
    "student",
    "learns",
    "from",
    "its",
    "teacher",
    "over",
    "many",
    "steps",
    "of",
    "careful",
    "training",
    "on",
    "text",
    "data",
]


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(12, 30))).capitalize() + "." for _ in range(count)]


def write_jsonl(path, records) -> str:
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stdlib_cache")


@pytest.fixture(scope="module")
def stdlib_lm(stdlib_cache):
    return build_data(DataConfig(vocab_size=512, seq_len=64, cache_dir=str(stdlib_cache)))


@pytest.fixture(scope="module")
def stdlib_classify(stdlib_lm, stdlib_cache):  # after stdlib_lm: reuses its cached corpus and tokenizer
    return build_data(DataConfig(task="classify", vocab_size=512, seq_len=64, cache_dir=str(stdlib_cache)))


# ---------------------------------------------------------------------------------------------------------
# The built-in corpus


def test_stdlib_corpus_splits_by_module_and_is_deterministic(stdlib_lm, stdlib_cache, tmp_path):
    documents = stdlib_documents(stdlib_cache)  # cached by stdlib_lm
    assert documents == stdlib_documents(tmp_path)  # parsed afresh: the same corpus
    assert any(d.group.startswith("pydoc_data.topics.") for d in documents)
    assert any(d.group == "asyncio.tasks" and d.label == "asyncio" for d in documents)
    assert not any({"test", "tests", "idle_test"} & set(d.group.split(".")) for d in documents)
    assert min(len(d.text) for d in documents if d.label != "pydoc_data") >= data.MIN_DOCSTRING_CHARS

    splits = split_documents(documents, (0.8, 0.1, 0.1))
    assert splits == split_documents(documents, (0.8, 0.1, 0.1))
    modules = {name: {d.group for d in split} for name, split in splits.items()}
    assert all(modules.values())
    assert not modules["train"] & modules["validation"] and not modules["train"] & modules["test"]
    assert not modules["validation"] & modules["test"]
    assert sum(map(len, splits.values())) == len(documents)
    assert stdlib_lm.num_documents == {name: len(split) for name, split in splits.items()}


def test_stdlib_lm_blocks(stdlib_lm):
    assert stdlib_lm.task == "lm" and stdlib_lm.class_names is None
    assert stdlib_lm.vocab_size == 512 and (stdlib_lm.pad_id, stdlib_lm.eos_id) == (0, 1)
    for name in SPLITS:
        split = stdlib_lm.split(name)
        inputs, labels = split["input_ids"], split["labels"]
        assert inputs.dtype == labels.dtype == torch.int64
        assert inputs.shape == labels.shape and inputs.shape[1] == 64 and len(inputs) > 10
        assert torch.equal(labels[:, :-1], inputs[:, 1:])  # the next token ...
        assert torch.equal(labels[:-1, -1], inputs[1:, 0])  # ... across block boundaries too
        assert int(inputs.min()) >= 0 and int(inputs.max()) < stdlib_lm.vocab_size
        assert (inputs == stdlib_lm.eos_id).any() and not (inputs == stdlib_lm.pad_id).any()
    assert "validation" in stdlib_lm.summary()


def test_lm_blocks_cuts_one_stream():
    blocks = lm_blocks([[5, 6, 7], [8]], eos_id=1, seq_len=2)  # stream 5 6 7 1 8 1
    assert blocks["input_ids"].tolist() == [[5, 6], [7, 1]]
    assert blocks["labels"].tolist() == [[6, 7], [1, 8]]


def test_stdlib_classification(stdlib_classify):
    names = stdlib_classify.class_names
    assert len(names) >= 8 and names == sorted(names) and not set(names) & set(EXCLUDED_FAMILIES)
    counts = stdlib_classify.class_counts()
    assert all(count >= DataConfig().min_family_examples for split in counts.values() for count in split)
    for name in SPLITS:
        split = stdlib_classify.split(name)
        inputs, mask, labels = split["input_ids"], split["attention_mask"], split["labels"]
        assert inputs.shape == mask.shape == (len(labels), 64)
        assert (inputs.dtype, mask.dtype, labels.dtype) == (torch.int64, torch.bool, torch.int64)
        assert torch.equal(mask, mask.sort(dim=1, descending=True).values)  # real tokens first, then padding
        assert mask[:, 0].all() and (inputs[~mask] == stdlib_classify.pad_id).all()
        assert not (inputs[mask] == stdlib_classify.pad_id).any()
        assert sum(counts[name]) == len(labels) and int(labels.max()) < len(names)
    assert all(name in stdlib_classify.summary() for name in names)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer cache and user files


def test_tokenizer_is_cached(tmp_path, monkeypatch):
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n".join(sentences(40, seed=1)))
    config = DataConfig(source=str(source), vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "cache"))
    first = build_data(config)
    assert len(list((tmp_path / "cache").glob("tokenizer-*.json"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(data, "train_tokenizer", no_training)
    second = build_data(config)
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    for name in SPLITS:
        assert all(torch.equal(second.split(name)[key], tensor) for key, tensor in first.split(name).items())


def test_txt_lm_round_trip(tmp_path):
    texts = sentences(60, seed=2)
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n \n".join(texts) + "\n\n")
    config = DataConfig(source=str(source), vocab_size=400, seq_len=16, cache_dir=str(tmp_path))
    built = build_data(config)
    assert sum(built.num_documents.values()) == 60 and built.num_documents["train"] == 48
    train_texts = [d.text for d in data.load_splits(config)["train"]]
    decoded = built.tokenizer.decode(built.train["input_ids"].flatten().tolist())  # EOS is skipped
    assert "".join(train_texts).startswith(decoded)

    capped = build_data(config.model_copy(update={"max_train_tokens": 50}))
    assert len(capped.train["input_ids"]) == 50 // 16 and torch.equal(capped.test["labels"], built.test["labels"])


@pytest.mark.parametrize("labels", [("negative", "neutral", "positive"), (0, 1, 2)])
def test_jsonl_classification_round_trip(tmp_path, labels):
    records = [{"text": text, "label": labels[i % 3], "id": i} for i, text in enumerate(sentences(60, seed=3))]
    config = DataConfig(
        source=write_jsonl(tmp_path / "reviews.jsonl", records),
        task="classify",
        vocab_size=300,
        seq_len=24,
        cache_dir=str(tmp_path),
    )
    built = build_data(config)
    assert built.class_names == [str(label) for label in labels]
    assert built.class_counts() == {"train": [16, 16, 16], "validation": [2, 2, 2], "test": [2, 2, 2]}
    label = built.class_names[built.train["labels"][0]]
    decoded = built.tokenizer.decode(built.train["input_ids"][0][built.train["attention_mask"][0]].tolist())
    assert any(r["text"].startswith(decoded) for r in records if str(r["label"]) == label)  # truncated to 24 tokens

    capped = build_data(config.model_copy(update={"max_train_examples": 10}))
    assert capped.train["labels"].shape == (10,)


def test_jsonl_lm_reads_the_text_field(tmp_path):
    records = [{"body": text} for text in sentences(30, seed=4)]
    config = DataConfig(
        source=write_jsonl(tmp_path / "docs.jsonl", records),
        text_field="body",
        vocab_size=300,
        seq_len=8,
        cache_dir=str(tmp_path),
    )
    built = build_data(config)
    assert built.num_documents == {"train": 24, "validation": 3, "test": 3}
    assert torch.equal(built.validation["labels"][:, :-1], built.validation["input_ids"][:, 1:])


def test_saved_datasets_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": sentences(40, seed=5), "label": ["a", "b"] * 20}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "flat"))
    built = build_data(
        DataConfig(source=str(tmp_path / "flat"), task="classify", vocab_size=300, seq_len=16, cache_dir=str(tmp_path))
    )
    assert built.class_names == ["a", "b"] and all(min(c) > 0 for c in built.class_counts().values())

    given = {"train": 30, "validation": 5, "test": 5}
    start = {"train": 0, "validation": 30, "test": 35}
    splits = {
        name: datasets.Dataset.from_dict({"text": rows["text"][start[name] : start[name] + n]})
        for name, n in given.items()
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "split"))
    built = build_data(DataConfig(source=str(tmp_path / "split"), vocab_size=300, seq_len=8, cache_dir=str(tmp_path)))
    assert built.num_documents == given

    datasets.DatasetDict({"train": splits["train"]}).save_to_disk(str(tmp_path / "train_only"))
    with pytest.raises(ValueError, match=r"needs the splits .* it has \['train'\]"):
        build_data(DataConfig(source=str(tmp_path / "train_only"), cache_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------------------
# Bad data and bad configs


def labeled(count: int, label_of=lambda i: ("x", "y")[i % 2]) -> list[dict]:
    return [{"text": text, "label": label_of(i)} for i, text in enumerate(sentences(count, seed=6))]


BAD_SOURCES = {  # name: (file name, content, config overrides, error type, message pattern)
    "missing file": ("absent.txt", None, {}, FileNotFoundError, "does not exist"),
    "unsupported type": ("data.csv", "a,b\n", {}, ValueError, "unsupported data file type '.csv'"),
    "empty txt": ("empty.txt", "\n \n\n", {}, ValueError, "contains no documents"),
    "blank jsonl": ("blank.jsonl", '\n{"text": "  "}\n', {}, ValueError, "contains no documents"),
    "invalid json": ("bad.jsonl", '{"text": "a"}\n{"text": \n', {}, ValueError, r"bad.jsonl:2: not valid JSON"),
    "not an object": ("list.jsonl", "[1, 2]\n", {}, ValueError, "list.jsonl:1: expected a JSON object, got list"),
    "no text field": ("t.jsonl", '{"body": "a"}\n', {}, ValueError, r"t.jsonl:1: no field 'text' \(fields: body\)"),
    "text not a string": ("n.jsonl", '{"text": 3}\n', {}, ValueError, "field 'text' must be a string, got int"),
    "no label": ("l.jsonl", '{"text": "a"}\n', {"task": "classify"}, ValueError, "l.jsonl:1: no field 'label'"),
    "float label": (
        "f.jsonl",
        '{"text": "a", "label": 1.5}\n',
        {"task": "classify"},
        ValueError,
        "label 1.5 must be a string or an integer",
    ),
    "txt for classify": ("c.txt", "a\n\nb\n", {"task": "classify"}, ValueError, "a .txt file has no labels"),
    "too few documents": (
        "few.txt",
        "one\n\ntwo\n\nthree\n",
        {},
        ValueError,
        r"the validation split is empty: 3 documents in 3 groups are too few",
    ),
    "too few tokens": (
        "short.txt",
        "\n\n".join(sentences(20, seed=7)),
        {"seq_len": 512},
        ValueError,
        "the validation split has too few tokens for one block of seq_len \\+ 1 = 513",
    ),
    "unknown label": (
        "u.jsonl",
        labeled(30, lambda i: ("x", "y")[i % 2] if i < 20 else f"rare{i}"),
        {"task": "classify"},
        ValueError,
        r"validation labels \['rare\d+'\] are not among the train",
    ),
    "one class": (
        "one.jsonl",
        labeled(20, lambda i: "x"),
        {"task": "classify"},
        ValueError,
        r"1 class\(es\) \['x'\]; need at least 2",
    ),
    "mixed labels": (
        "m.jsonl",
        labeled(20, lambda i: ("x", 1)[i % 2]),
        {"task": "classify"},
        ValueError,
        "labels mix strings and integers",
    ),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_source_raises_a_clear_error(tmp_path, case):
    file_name, content, overrides, error, message = BAD_SOURCES[case]
    path = tmp_path / file_name
    if isinstance(content, list):
        write_jsonl(path, content)
    elif content is not None:
        path.write_text(content)
    config = DataConfig(
        **{"source": str(path), "vocab_size": 300, "seq_len": 8, "cache_dir": str(tmp_path), **overrides}
    )
    with pytest.raises(error, match=message):
        build_data(config)


def test_saved_dataset_needs_the_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="needs `pip install datasets`"):
        build_data(DataConfig(source=str(tmp_path), cache_dir=str(tmp_path)))


def test_builtin_classification_without_enough_families(stdlib_lm, stdlib_cache):
    config = DataConfig(task="classify", vocab_size=512, min_family_examples=10_000, cache_dir=str(stdlib_cache))
    with pytest.raises(ValueError, match="min_family_examples=10000 docstrings in every split; lower it"):
        build_data(config)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"sources": "x.txt"}, "Extra inputs are not permitted"),
        ({"splits": (0.8, 0.1, 0.2)}, "sum to 1"),
        ({"splits": (1.0, 0.0, 0.0)}, "three positive fractions"),
        ({"vocab_size": 100}, "greater than or equal to 258"),
        ({"seq_len": 4}, "greater than or equal to 8"),
        ({"task": "regress"}, "'lm' or 'classify'"),
        ({"max_train_tokens": 100, "seq_len": 128}, "less than one block of seq_len=128"),
    ],
)
def test_bad_config_raises(fields, message):
    with pytest.raises(ValidationError, match=message):
        DataConfig(**fields)
