"""The data of a recipe: documents from a source, split by group, a byte-level BPE tokenizer, task tensors.

    data = build_data(DataConfig())          # the built-in corpus: Python standard library docstrings
    data.train["input_ids"], data.train["labels"]

Pipeline (every step deterministic, nothing downloaded):
1. documents: the built-in corpus (`stdlib_documents`: the docstrings of the standard library's `.py`
   files, parsed with `ast`, plus the `pydoc_data.topics` reference topics), or a user `.txt` / `.jsonl`
   file, or a directory written by `datasets` `save_to_disk`;
2. splits (`split_documents`): whole groups (a stdlib module; one document of a user file) go to train,
   validation or test, so no module's text is in two splits;
3. tokenizer (`load_or_train_tokenizer`): byte-level BPE trained on the train split only, cached on disk;
4. tensors, one row per example, so that the engine batches by index:
   - `lm`: `input_ids`, `labels`: (M, seq_len) int64, labels = inputs shifted by one token; validation and
     test also `label_bytes` (M, seq_len) int64, the UTF-8 bytes of text each label token stands for (EOS: 0),
     for bits per byte; with a teacher tokenizer of its own (`build_data(config, teacher_tokenizer)`), every
     split also has the same blocks in the teacher's tokens and their alignment (`cross_tokenizer_blocks`);
   - `classify`: `input_ids` (M, seq_len) int64 right-padded with `pad_id`, `attention_mask` (M, seq_len)
     bool (True = real token), `labels` (M,) int64 class ids into `class_names`.
Chat data (`read_conversations`: a .jsonl file or saved dataset of `messages` lists) is read into
`Conversation`s, which `split_documents` splits like documents; recipes render them with their tokenizer.
Bad data raises ValueError (FileNotFoundError for a missing source; ImportError for a saved dataset without
the `datasets` package) naming the file, record, field or split, before any training starts.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import platform
import re
import sys
import sysconfig
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from tsa_fast.cross_tokenizer import token_bytes, token_groups

__all__ = [
    "Conversation",
    "DataConfig",
    "Document",
    "TaskData",
    "block_label_bytes",
    "build_data",
    "classification_examples",
    "cross_tokenizer_blocks",
    "lm_blocks",
    "load_or_train_tokenizer",
    "load_splits",
    "random_rows",
    "read_conversations",
    "read_documents",
    "split_documents",
    "stdlib_documents",
    "stdlib_families",
    "train_tokenizer",
]

SPLITS = ("train", "validation", "test")
PAD, EOS = "<pad>", "<eos>"  # the special tokens, ids 0 and 1
MIN_VOCAB_SIZE = 256 + 2  # the 256 byte tokens and the two special tokens
MIN_DOCSTRING_CHARS = 40  # shorter docstrings ("Internal function.") are left out of the built-in corpus
# Package families the built-in classification never uses as classes, and why.
EXCLUDED_FAMILIES = {
    "pydoc_data": "reference-manual topics, not docstrings",
    "encodings": "templated codec docstrings ('Python Character Mapping Codec cp1250 generated from ...')",
}
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_CORPUS_VERSION = 1  # bump when the extraction rules change: it is part of the cache file name
_TOKENIZER_VERSION = 1  # likewise for the tokenizer's settings: part of its fingerprint


class DataConfig(BaseModel):
    """Where the text comes from, the task built from it, and the tokenizer. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(
        "stdlib",
        description="'stdlib' (built-in corpus), a .txt file (documents separated by blank lines), a .jsonl "
        "file (one object per line), or a directory saved by datasets' save_to_disk",
    )
    task: Literal["lm", "classify"] = Field(
        "lm", description="lm: next-token prediction; classify: the label of a text (stdlib: its package family)"
    )
    vocab_size: int = Field(8192, ge=MIN_VOCAB_SIZE, description="BPE vocabulary size, special tokens included")
    seq_len: int = Field(128, ge=8, description="lm: tokens per block; classify: max tokens per example")
    text_field: str = Field("text", description="the text's field in a .jsonl file or dataset")
    label_field: str = Field("label", description="the label's field (classify; strings or integers)")
    splits: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/validation/test fractions (ignored for a saved DatasetDict)"
    )
    max_train_tokens: int | None = Field(
        None, ge=1, description="lm: keep max_train_tokens // seq_len training blocks (a fixed random subset)"
    )
    max_train_examples: int | None = Field(
        None, ge=1, description="classify: keep this many training examples (a fixed random subset)"
    )
    min_family_examples: int = Field(
        8, ge=1, description="built-in classify: a package family is a class when every split has this many docstrings"
    )
    cache_dir: str = Field(".cache/tsa_fast", description="where the parsed corpus and the tokenizers are cached")

    @field_validator("splits")
    @classmethod
    def _fractions(cls, splits: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(splits) <= 0 or abs(sum(splits) - 1) > 1e-6:
            raise ValueError(f"splits must be three positive fractions that sum to 1, got {splits}")
        return splits

    @model_validator(mode="after")
    def _token_cap(self) -> DataConfig:
        if self.max_train_tokens is not None and self.max_train_tokens < self.seq_len:
            raise ValueError(
                f"max_train_tokens={self.max_train_tokens} is less than one block of seq_len={self.seq_len} tokens"
            )
        return self


class Document(NamedTuple):
    """One text. `group` is the unit of splitting: the dotted module name for the built-in corpus
    ("asyncio.tasks", or "pydoc_data.topics.<topic>"), the document's index for a user file. `label` is the
    class: the package family (top-level package) for the built-in corpus, the label field of a user file
    when the task is classify, else None."""

    text: str
    group: str
    label: str | int | None


# ----------------------------------------------------------------------------------------------------------
# The built-in corpus


def stdlib_documents(cache_dir: str | Path) -> list[Document]:
    """The built-in corpus of this Python: the module, class and function docstrings of the standard
    library's `.py` files (parsed, never imported; test and site-packages directories skipped; docstrings
    shorter than MIN_DOCSTRING_CHARS and exact repeats dropped), then one document per `pydoc_data.topics`
    topic. Cached as JSON under cache_dir, keyed by the Python version."""
    version = f"{sys.implementation.name}-{platform.python_version()}"
    cache_file = Path(cache_dir) / f"stdlib-corpus-{version}-v{_CORPUS_VERSION}.json"
    if cache_file.exists():
        pairs = json.loads(cache_file.read_text(encoding="utf-8"))
    else:
        pairs = _parse_stdlib()
        _write_atomically(cache_file, json.dumps(pairs))
    return [Document(text, module, module.split(".")[0]) for module, text in pairs]


def stdlib_modules() -> Iterator[tuple[str, ast.Module]]:
    """(dotted module name, parsed source) of every `.py` file of this Python's standard library, in file
    order; parsed, never imported; test and site-packages directories skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if _SKIPPED_DIRS.intersection(parts[:-1]) or not all(part.isidentifier() for part in parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # not Python of this version (e.g. a Python 2 sample file)
            continue
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), tree


def _parse_stdlib() -> list[tuple[str, str]]:
    """(module, text) pairs of the built-in corpus, in file and source order."""
    from pydoc_data.topics import topics  # a plain dict of strings: safe to import

    pairs, seen = [], set()
    for module, tree in stdlib_modules():
        for text in _docstrings(tree):
            if len(text) >= MIN_DOCSTRING_CHARS and text not in seen:
                seen.add(text)
                pairs.append((module, text))
    pairs += [(f"pydoc_data.topics.{name}", text.strip()) for name, text in sorted(topics.items())]
    return pairs


def _docstrings(tree: ast.Module) -> list[str]:
    """The cleaned docstrings of a module, its classes and functions, in source order."""
    owners = [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    owners.sort(key=lambda node: getattr(node, "lineno", 0))
    return [text.strip() for node in owners if (text := ast.get_docstring(node))]


# ----------------------------------------------------------------------------------------------------------
# User files


def read_documents(path: str | Path, config: DataConfig) -> list[Document] | dict[str, list[Document]]:
    """The documents of a user source: a list to split, or, for a saved DatasetDict, the three splits as
    given. `.txt`: documents separated by blank lines, no labels. `.jsonl`: one JSON object per line with a
    string `text_field` (and `label_field`, a string or an integer, when the task is classify); blank texts
    are skipped. A directory: a `datasets.Dataset` (read like a .jsonl file) or a `DatasetDict` with train,
    validation and test splits, saved by `save_to_disk`. Raises FileNotFoundError or ValueError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data source {str(path)!r} does not exist")
    if config.task == "classify" and path.suffix == ".txt":
        raise ValueError(f"{path}: a .txt file has no labels; task 'classify' needs a .jsonl file or a dataset")
    if path.is_dir():
        documents = _read_saved_dataset(path, lambda records: _documents_from_records(records, config))
    elif path.suffix == ".txt":
        texts = filter(None, (part.strip() for part in re.split(r"\n\s*\n", _read_utf8(path))))
        documents = [Document(text, str(index), None) for index, text in enumerate(texts)]
    elif path.suffix == ".jsonl":
        documents = _documents_from_records(_jsonl_records(path), config)
    else:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r} (use .txt, .jsonl or a saved dataset)")
    if not documents:
        raise ValueError(f"{path} contains no documents")
    return documents


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None


def _jsonl_records(path: Path) -> Iterable[tuple[str, object]]:
    """(where, record) for every non-blank line of a .jsonl file; raises ValueError on a line that is not JSON."""
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None


def _read_saved_dataset(path: Path, convert: Callable[[Iterable[tuple[str, object]]], list]) -> list | dict[str, list]:
    """`convert` of the (where, row) pairs of a saved Dataset, or of each split of a saved DatasetDict."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a directory: reading a saved dataset needs `pip install datasets`") from None

    def records(dataset, where: str) -> Iterable[tuple[str, object]]:
        return ((f"{where} row {index}", row) for index, row in enumerate(dataset))

    saved = datasets.load_from_disk(str(path))
    if not isinstance(saved, datasets.DatasetDict):
        return convert(records(saved, str(path)))
    if any(name not in saved for name in SPLITS):
        raise ValueError(f"{path}: a DatasetDict needs the splits {list(SPLITS)}, it has {list(saved)}")
    return {name: convert(records(saved[name], f"{path} [{name}]")) for name in SPLITS}


def _documents_from_records(records: Iterable[tuple[str, object]], config: DataConfig) -> list[Document]:
    """Documents from (where, record) pairs; `where` names the record in errors. Labels are read (and
    required) only for the classify task."""
    documents = []
    for where, record in records:
        if not isinstance(record, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        text = _field(record, config.text_field, where)
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {config.text_field!r} must be a string, got {type(text).__name__}")
        label = None
        if config.task == "classify":
            label = _field(record, config.label_field, where)
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise ValueError(f"{where}: label {label!r} must be a string or an integer")
        if text.strip():
            documents.append(Document(text, str(len(documents)), label))
    return documents


def _field(record: Mapping, name: str, where: str) -> object:
    if name not in record:
        raise ValueError(f"{where}: no field {name!r} (fields: {', '.join(map(str, record)) or 'none'})")
    return record[name]


class Conversation(NamedTuple):
    """One chat: `messages`, {"role": str, "content": str} dicts in order; `group` (its index) and `label`
    (None) as a Document's, so that `split_documents` splits conversations as it splits documents."""

    messages: list[dict[str, str]]
    group: str
    label: None = None


def read_conversations(path: str | Path, messages_field: str = "messages") -> list[Conversation] | dict[str, list]:
    """The conversations of a chat source: a .jsonl file (one object per line) or a directory saved by
    `datasets`' save_to_disk (a Dataset, or a DatasetDict with train, validation and test: then a dict of the
    three), each record's `messages_field` a list of {"role", "content"} string mappings with at least one
    assistant turn. Raises FileNotFoundError, or ValueError naming the record that is not such a chat."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data source {str(path)!r} does not exist")
    if path.is_dir():
        conversations = _read_saved_dataset(path, lambda records: _conversations(records, messages_field))
    elif path.suffix == ".jsonl":
        conversations = _conversations(_jsonl_records(path), messages_field)
    else:
        raise ValueError(f"{path}: chat data is a .jsonl file or a saved dataset, not {path.suffix!r}")
    if not conversations:
        raise ValueError(f"{path} contains no conversations")
    return conversations


def _conversations(records: Iterable[tuple[str, object]], messages_field: str) -> list[Conversation]:
    conversations = []
    for where, record in records:
        if not isinstance(record, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        messages = _field(record, messages_field, where)
        if not isinstance(messages, list) or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError(f"{where}: {messages_field!r} must be a list of {{'role': str, 'content': str}} objects")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: the conversation has no assistant turn (nothing to learn from)")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        conversations.append(Conversation(messages, str(len(conversations))))
    return conversations


# ----------------------------------------------------------------------------------------------------------
# Splits


def split_documents(documents: Sequence[Document | Conversation], fractions: Sequence[float]) -> dict[str, list]:
    """Train/validation/test documents, whole groups at a time, in their original order within each split.

    Groups are stratified by label (a label found in a single group joins one pooled stratum), so that each
    stdlib package family, or each class of a user file, is spread over the splits in proportion. Within a
    stratum the groups are visited in the order of the SHA-256 of their name (a fixed pseudo-random order,
    the same on every machine: a user file's documents are thus split by a fixed permutation of their
    indices), each going to the split furthest below its fraction of the stratum's documents so far.
    Raises ValueError when a split gets no document."""
    sizes = Counter(document.group for document in documents)
    label_of_group = {document.group: document.label for document in documents}
    groups_of_label = defaultdict(list)
    for group, label in label_of_group.items():
        groups_of_label[label].append(group)
    pooled = object()  # the stratum of the labels found in one group only
    strata = defaultdict(list)
    for label, groups in groups_of_label.items():
        strata[label if len(groups) > 1 else pooled].extend(groups)
    split_of_group = {}
    for groups in strata.values():
        assigned, total = [0] * len(SPLITS), 0
        for group in sorted(groups, key=lambda name: hashlib.sha256(name.encode()).digest()):
            total += sizes[group]
            index = max(range(len(SPLITS)), key=lambda i: fractions[i] * total - assigned[i])
            assigned[index] += sizes[group]
            split_of_group[group] = SPLITS[index]
    splits = {name: [d for d in documents if split_of_group[d.group] == name] for name in SPLITS}
    for name, split in splits.items():
        if not split:
            raise ValueError(
                f"the {name} split is empty: {len(documents)} documents in {len(sizes)} groups are "
                f"too few to split by {tuple(fractions)}"
            )
    return splits


def load_splits(config: DataConfig) -> dict[str, list[Document]]:
    """The documents of config.source, split into train, validation and test (see split_documents)."""
    if config.source == "stdlib":
        return split_documents(stdlib_documents(config.cache_dir), config.splits)
    documents = read_documents(config.source, config)
    if isinstance(documents, dict):
        for name, split in documents.items():
            if not split:
                raise ValueError(f"{config.source}: the {name} split has no documents")
        return documents
    return split_documents(documents, config.splits)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style: any text encodes, decode inverts encode) with at most
    vocab_size tokens; ids 0 and 1 are the special tokens PAD and EOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_or_train_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: str | Path) -> Tokenizer:
    """train_tokenizer(texts, vocab_size), cached in cache_dir under a fingerprint of the texts, the vocab
    size and the tokenizer's settings: a second call with the same arguments loads the file."""
    fingerprint = hashlib.sha256(f"{_TOKENIZER_VERSION} {vocab_size} {len(texts)}".encode())
    for text in texts:
        fingerprint.update(f"\0{len(text)}\0{text}".encode())
    cache_file = Path(cache_dir) / f"tokenizer-{fingerprint.hexdigest()[:20]}.json"
    if cache_file.exists():
        return Tokenizer.from_file(str(cache_file))
    tokenizer = train_tokenizer(texts, vocab_size)
    _write_atomically(cache_file, tokenizer.to_str())
    return tokenizer


def _write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so that a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------------
# Tasks


def lm_blocks(token_ids: Iterable[Sequence[int]], eos_id: int, seq_len: int) -> dict[str, Tensor]:
    """Next-token blocks: the documents' tokens, each followed by EOS, as one stream cut into M = (T - 1) //
    seq_len blocks (T tokens in the stream; the tail is dropped). `input_ids` (M, seq_len) int64 are
    consecutive non-overlapping slices; `labels` (M, seq_len) int64 are the same slices one token later, so
    every token after the first is predicted exactly once."""
    tokens = [token for ids in token_ids for token in (*ids, eos_id)]
    count = (len(tokens) - 1) // seq_len
    stream = torch.tensor(tokens[: count * seq_len + 1], dtype=torch.int64)
    return {"input_ids": stream[:-1].view(count, seq_len), "labels": stream[1:].view(count, seq_len)}


def cross_tokenizer_blocks(
    student_ids: Sequence[Sequence[int]],
    teacher_ids: Sequence[Sequence[int]],
    student_bytes: np.ndarray,
    teacher_bytes: np.ndarray,
    *,
    student_eos: int,
    teacher_eos: int,
    teacher_pad: int,
    seq_len: int,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    """The LM blocks of the student's tokens (`lm_blocks`), each with the same text in the teacher's tokens and the
    alignment of the two, for cross-tokenizer distillation.

    student_ids, teacher_ids: each document's tokens by each tokenizer (the same documents, in order);
    student_bytes, teacher_bytes: (V,) int, the UTF-8 bytes of text of each token id (`token_bytes`), or per
    document the bytes of text of each of its tokens (shaped like the ids: `token_byte_lengths` of a Hugging Face
    fast tokenizer's offsets).

    Both token streams (each document followed by its EOS) are aligned once, as a whole (`token_groups`, each EOS
    one byte long so that documents end together), in byte offsets. Block i holds `input_ids`, `labels` (M,
    seq_len) as `lm_blocks`, plus:
    - `teacher_input_ids` (M, seq_len): the teacher's tokens from the last one that ends no later than the
      student's first input token (so the teacher predicts from where the student does), padded with teacher_pad
      after the stream's end; `teacher_labels` (M, seq_len): the next teacher token, ignore_index where padded;
    - `student_group` (M, seq_len), `teacher_group` (M, seq_len) int64: the block's groups 0, 1, ... of each label
      token (`alignment_from_groups` reads them): the groups whose tokens are all among the block's labels on both
      sides; -1 for a label in no such group (cut by the block's edges on either side).
    Raises ValueError when the two tokenizations do not cover the same bytes."""
    blocks = lm_blocks(student_ids, student_eos, seq_len)
    count = len(blocks["input_ids"])
    _, student_ends = _stream_ends(student_ids, student_eos, student_bytes)
    teacher_stream, teacher_ends = _stream_ends(teacher_ids, teacher_eos, teacher_bytes)
    if student_ends[-1] != teacher_ends[-1]:
        raise ValueError(
            f"the student's and the teacher's tokens do not cover the same text: {student_ends[-1]} and"
            f" {teacher_ends[-1]} bytes (EOS counted as 1)"
        )
    groups = token_groups(student_ends, teacher_ends)
    first, last = zip(*(_group_spans(g) for g in groups))

    # Windows of stream positions: the student's labels; the teacher's inputs and labels.
    student_labels = np.arange(count)[:, None] * seq_len + 1 + np.arange(seq_len)
    start = np.searchsorted(teacher_ends, student_ends[student_labels[:, 0] - 1], side="right") - 1
    teacher_inputs = np.maximum(start, 0)[:, None] + np.arange(seq_len)
    teacher_labels = teacher_inputs + 1
    in_stream = teacher_labels < len(teacher_stream)
    windows = (
        (student_labels[:, 0], student_labels[:, -1]),
        (teacher_labels[:, 0], np.where(in_stream, teacher_labels, -1).max(axis=1)),
    )

    def complete(group: np.ndarray) -> np.ndarray:
        """Whether each entry's group lies wholly inside its block's window on both sides."""
        safe = np.maximum(group, 0)
        inside = group >= 0
        for (low, high), first_of, last_of in zip(windows, first, last):
            inside &= (first_of[safe] >= low[:, None]) & (last_of[safe] <= high[:, None])
        return inside

    student_group = groups[0][student_labels]
    teacher_group = np.where(in_stream, groups[1][np.minimum(teacher_labels, len(teacher_stream) - 1)], -1)
    student_ok, teacher_ok = complete(student_group), complete(teacher_group)
    lowest = np.where(student_ok, student_group, np.iinfo(np.int64).max).min(axis=1, keepdims=True)
    pad = np.full_like(teacher_inputs, teacher_pad)
    at = lambda positions: teacher_stream[np.minimum(positions, len(teacher_stream) - 1)]  # noqa: E731
    return {
        **blocks,
        "teacher_input_ids": torch.from_numpy(np.where(teacher_inputs < len(teacher_stream), at(teacher_inputs), pad)),
        "teacher_labels": torch.from_numpy(np.where(in_stream, at(teacher_labels), ignore_index)),
        "student_group": torch.from_numpy(np.where(student_ok, student_group - lowest, -1)),
        "teacher_group": torch.from_numpy(np.where(teacher_ok, teacher_group - lowest, -1)),
    }


def _stream_ends(
    ids: Sequence[Sequence[int]], eos: int, sizes: np.ndarray | Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """The token stream (each document followed by EOS) and the byte offset where each token ends (EOS: 1 byte);
    `sizes` per token id or per document and token (`cross_tokenizer_blocks`)."""
    stream = np.fromiter((token for doc in ids for token in (*doc, eos)), dtype=np.int64)
    if isinstance(sizes, np.ndarray):
        return stream, np.cumsum(sizes.astype(np.int64)[stream] + (stream == eos))
    lengths = _stream_lengths(sizes, eos_bytes=1)
    if len(lengths) != len(stream):
        raise ValueError(f"the byte lengths are given for {len(lengths)} tokens, the documents have {len(stream)}")
    return stream, np.cumsum(lengths)


def _stream_lengths(sizes: Sequence[Sequence[int]], eos_bytes: int) -> np.ndarray:
    """The bytes of each token of the stream of documents whose tokens have `sizes`, each followed by an EOS of
    `eos_bytes`."""
    return np.fromiter((n for doc in sizes for n in (*doc, eos_bytes)), dtype=np.int64)


def block_label_bytes(sizes: Sequence[Sequence[int]], seq_len: int) -> Tensor:
    """(M, seq_len) int64: the UTF-8 bytes of text of each label of `lm_blocks` of documents whose tokens stand for
    `sizes` bytes each (per document, per token; an EOS: 0), for bits per byte."""
    lengths = torch.from_numpy(_stream_lengths(sizes, eos_bytes=0))
    count = (len(lengths) - 1) // seq_len
    return lengths[1 : count * seq_len + 1].view(count, seq_len)


def _group_spans(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) stream position of each group 0 ... G - 1 of a stream's (non-decreasing where >= 0) groups."""
    positions = np.flatnonzero(group >= 0)
    ids = np.arange(group.max() + 1 if positions.size else 0)
    return (
        positions[np.searchsorted(group[positions], ids, side="left")],
        positions[np.searchsorted(group[positions], ids, side="right") - 1],
    )


def classification_examples(
    token_ids: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int, seq_len: int
) -> dict[str, Tensor]:
    """`input_ids` (M, seq_len) int64: each text's first seq_len tokens, right-padded with pad_id;
    `attention_mask` (M, seq_len) bool, True on real tokens; `labels` (M,) int64 class ids."""
    lengths = torch.tensor([min(len(ids), seq_len) for ids in token_ids], dtype=torch.int64)
    attention_mask = torch.arange(seq_len) < lengths.unsqueeze(1)
    input_ids = torch.full(attention_mask.shape, pad_id, dtype=torch.int64)
    input_ids[attention_mask] = torch.tensor([token for ids in token_ids for token in ids[:seq_len]], dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor(labels, dtype=torch.int64)}


def stdlib_families(splits: Mapping[str, Sequence[Document]], min_examples: int) -> list[str]:
    """The built-in classification classes, sorted: the package families (other than EXCLUDED_FAMILIES) with
    at least min_examples docstrings in every split."""
    counts = {name: Counter(document.label for document in split) for name, split in splits.items()}
    return sorted(
        family
        for family in counts["train"]
        if family not in EXCLUDED_FAMILIES and all(counts[name][family] >= min_examples for name in SPLITS)
    )


def _class_labels(splits: Mapping[str, Sequence[Document]], config: DataConfig) -> list[str | int]:
    """The sorted label values that become class ids 0, 1, ...; raises ValueError unless there are two or more
    and, for a user source, every validation and test label is one of the train labels."""
    if config.source == "stdlib":
        labels = stdlib_families(splits, config.min_family_examples)
        if len(labels) < 2:
            raise ValueError(
                f"only {labels} of the stdlib families have min_family_examples={config.min_family_examples} "
                "docstrings in every split; lower it"
            )
        return labels
    if len({type(document.label) for split in splits.values() for document in split}) > 1:
        raise ValueError(f"{config.source}: labels mix strings and integers")
    labels = sorted({document.label for document in splits["train"]})
    for name in SPLITS[1:]:
        unknown = sorted({document.label for document in splits[name]} - set(labels))
        if unknown:
            raise ValueError(f"{config.source}: {name} labels {unknown} are not among the train labels {labels}")
    if len(labels) < 2:
        raise ValueError(f"{config.source}: the train split has {len(labels)} class(es) {labels}; need at least 2")
    return labels


def random_rows(split: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """`count` rows of the split (all when it has fewer), a fixed random subset kept in order."""
    total = len(split["labels"])
    if count >= total:
        return split
    rows = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:count].sort().values
    return {name: tensor[rows] for name, tensor in split.items()}


@dataclass(frozen=True)
class TaskData:
    """A task's tensors for train, validation and test (see the module docstring for their keys, shapes and
    dtypes), the tokenizer (trained on train) and its special ids, and `class_names` (classify; None for lm):
    class id i is class_names[i]. `num_documents` counts the documents loaded per split. `teacher_tokenizer`:
    the teacher's own tokenizer whose tokens and alignment the LM splits also hold (None: the teacher's is
    this one)."""

    task: Literal["lm", "classify"]
    train: dict[str, Tensor]
    validation: dict[str, Tensor]
    test: dict[str, Tensor]
    tokenizer: Tokenizer
    pad_id: int
    eos_id: int
    vocab_size: int  # the tokenizer's actual size: at most the configured one on a small corpus
    class_names: list[str] | None
    num_documents: dict[str, int]
    teacher_tokenizer: Tokenizer | None = None

    def without_teacher_tokens(self) -> TaskData:
        """The data a student without a teacher reads: the training split without the teacher's tokens and
        alignment (the data itself when it has none)."""
        if self.teacher_tokenizer is None:
            return self
        return dataclasses.replace(self, train={k: self.train[k] for k in ("input_ids", "labels")})

    def split(self, name: str) -> dict[str, Tensor]:
        """The tensors of split `name` ("train", "validation" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}: expected one of {SPLITS}")
        return getattr(self, name)

    def class_counts(self) -> dict[str, list[int]]:
        """classify: per split, the number of examples of each class (indexed like class_names)."""
        if self.class_names is None:
            raise ValueError("class_counts needs the classify task")
        return {
            name: torch.bincount(self.split(name)["labels"], minlength=len(self.class_names)).tolist()
            for name in SPLITS
        }

    def summary(self) -> str:
        """A few lines: documents, examples and tokens per split, and the class balance for classify."""
        seq_len = self.train["input_ids"].shape[1]
        unit = "blocks" if self.task == "lm" else "examples"
        lines = [
            f"{self.task} data: vocabulary {self.vocab_size}, seq_len {seq_len}"
            + (f", {len(self.class_names)} classes" if self.class_names else "")
            + (
                f", teacher tokens (vocabulary {self.teacher_tokenizer.get_vocab_size()}) aligned"
                if self.teacher_tokenizer
                else ""
            )
        ]
        for name in SPLITS:
            split = self.split(name)
            tokens = int(split["attention_mask"].sum()) if "attention_mask" in split else split["input_ids"].numel()
            lines.append(
                f"  {name:<10} {self.num_documents[name]:>8,} documents {len(split['input_ids']):>8,} {unit}"
                f" {tokens:>10,} tokens"
            )
        if self.class_names is not None:
            counts = self.class_counts()
            lines.append("  class balance (train / validation / test):")
            width = max(map(len, self.class_names))
            lines += [
                f"    {label:<{width}} " + " / ".join(str(counts[name][i]) for name in SPLITS)
                for i, label in enumerate(self.class_names)
            ]
        return "\n".join(lines)


def build_data(config: DataConfig, teacher_tokenizer: Tokenizer | None = None) -> TaskData:
    """Load, split, tokenize and tensorize config.source for config.task (see the module docstring); with
    `teacher_tokenizer` (lm), every split also holds its blocks in the teacher's tokens, aligned
    (`cross_tokenizer_blocks`). Raises FileNotFoundError or ValueError on bad data, before any training."""
    if teacher_tokenizer is not None and config.task != "lm":
        raise ValueError(f"a teacher tokenizer of its own needs data.task='lm', got {config.task!r}")
    splits = load_splits(config)
    labels = _class_labels(splits, config) if config.task == "classify" else None
    tokenizer = load_or_train_tokenizer([d.text for d in splits["train"]], config.vocab_size, config.cache_dir)
    pad_id, eos_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOS)

    def encode(documents: Sequence[Document], by: Tokenizer = tokenizer) -> list[list[int]]:
        return [encoding.ids for encoding in by.encode_batch([d.text for d in documents])]

    tensors, class_names = {}, None
    if config.task == "lm":
        text_bytes = np.array([len(piece) for piece in token_bytes(tokenizer)], dtype=np.int64)
        for name, documents in splits.items():
            if teacher_tokenizer is None:
                tensors[name] = lm_blocks(encode(documents), eos_id, config.seq_len)
            else:
                tensors[name] = cross_tokenizer_blocks(
                    encode(documents),
                    encode(documents, teacher_tokenizer),
                    text_bytes,
                    np.array([len(piece) for piece in token_bytes(teacher_tokenizer)], dtype=np.int64),
                    student_eos=eos_id,
                    teacher_eos=teacher_tokenizer.token_to_id(EOS),
                    teacher_pad=teacher_tokenizer.token_to_id(PAD),
                    seq_len=config.seq_len,
                )
            if name != "train":
                tensors[name]["label_bytes"] = torch.from_numpy(text_bytes[tensors[name]["labels"].numpy()])
            if len(tensors[name]["input_ids"]) == 0:
                raise ValueError(
                    f"{config.source}: the {name} split has too few tokens for one block of "
                    f"seq_len + 1 = {config.seq_len + 1}; add text or lower seq_len"
                )
        if config.max_train_tokens is not None:
            tensors["train"] = random_rows(tensors["train"], config.max_train_tokens // config.seq_len)
    else:
        class_of = {label: index for index, label in enumerate(labels)}
        for name, documents in splits.items():
            examples = [d for d in documents if d.label in class_of]
            tensors[name] = classification_examples(
                encode(examples), [class_of[d.label] for d in examples], pad_id, config.seq_len
            )
        if config.max_train_examples is not None:
            tensors["train"] = random_rows(tensors["train"], config.max_train_examples)
        class_names = [str(label) for label in labels]
    return TaskData(
        task=config.task,
        **tensors,
        tokenizer=tokenizer,
        pad_id=pad_id,
        eos_id=eos_id,
        vocab_size=tokenizer.get_vocab_size(),
        class_names=class_names,
        num_documents={name: len(documents) for name, documents in splits.items()},
        teacher_tokenizer=teacher_tokenizer,
    )
