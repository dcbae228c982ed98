"""Extractive question answering (SQuAD-style): examples and their checks, readers for user data, windows
of token features with the answer's token span, span decoding over all windows of a context, and the
official SQuAD metric (exact match and F1).

A context longer than the model's window is cut into overlapping windows of context tokens, each laid out
as `[CLS] question [SEP] context window [SEP] [PAD]...`, as the standard SQuAD pipeline does. Position 0
(CLS) is the "no answer" position: the label of a window that does not hold the whole answer, and of an
unanswerable question (SQuAD 2.0). Predictions are taken over all windows of a context.
"""

from __future__ import annotations

import ast
import collections
import json
import random
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from tsa_fast.distill.data import Document, split_documents, stdlib_modules

# ----------------------------------------------------------------------------------------------------------
# Examples


@dataclass(frozen=True)
class QAExample:
    """One question about one context. `answers`: (text, answer_start) pairs, the character offset of each
    answer in the context; empty for an unanswerable question (SQuAD 2.0). Training uses the first answer;
    evaluation scores a prediction against all of them."""

    id: str
    context: str
    question: str
    answers: tuple[tuple[str, int], ...]


def check_example(example: QAExample) -> None:
    """ValueError naming the example for an empty question or context, or an answer whose text is not at its
    offset in the context."""
    if not example.question.strip():
        raise ValueError(f"example {example.id!r}: the question is empty")
    if not example.context.strip():
        raise ValueError(f"example {example.id!r}: the context is empty")
    for text, start in example.answers:
        if not text:
            raise ValueError(f"example {example.id!r}: an answer text is empty")
        if example.context[start : start + len(text)] != text:
            found = example.context[start : start + len(text)]
            raise ValueError(
                f"example {example.id!r}: the answer {text!r} is not at answer_start={start} of the context "
                f"(found {found!r})"
            )


def _field(record: Mapping, name: str, where: str):
    if not isinstance(record, Mapping) or name not in record:
        raise ValueError(f"{where}: missing field {name!r}")
    return record[name]


def _string(record: Mapping, name: str, where: str) -> str:
    value = _field(record, name, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} must be a string, got {type(value).__name__}")
    return value


def _answers(value, where: str) -> tuple[tuple[str, int], ...]:
    """SQuAD's list of {"text", "answer_start"} or Hugging Face's {"text": [...], "answer_start": [...]}."""
    if isinstance(value, Mapping):
        texts, starts = _field(value, "text", where), _field(value, "answer_start", where)
        if not isinstance(texts, Sequence) or not isinstance(starts, Sequence) or len(texts) != len(starts):
            raise ValueError(f"{where}: answers.text and answers.answer_start must be lists of one length")
        pairs = list(zip(texts, starts))
    elif isinstance(value, Sequence) and not isinstance(value, str):
        pairs = [(_field(answer, "text", where), _field(answer, "answer_start", where)) for answer in value]
    else:
        raise ValueError(f"{where}: answers must be a list of {{text, answer_start}} or {{text: [], answer_start: []}}")
    for text, start in pairs:
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"{where}: an answer must have a string text and an int answer_start >= 0")
    return tuple(pairs)


def example_from_record(record: Mapping, where: str) -> QAExample:
    """A checked QAExample from a record with `context`, `question`, `answers` (and optionally `id`)."""
    example = QAExample(
        id=str(record.get("id", where)) if isinstance(record, Mapping) else where,
        context=_string(record, "context", where),
        question=_string(record, "question", where),
        answers=_answers(_field(record, "answers", where), where),
    )
    check_example(example)
    return example


def read_squad_json(path: str | Path) -> list[QAExample]:
    """SQuAD v1.1 / v2.0 JSON: data -> paragraphs -> qas. A question with `is_impossible` true (2.0) has no
    answers."""
    tree = json.loads(Path(path).read_text(encoding="utf-8"))
    examples = []
    for a, article in enumerate(_field(tree, "data", str(path))):
        for p, paragraph in enumerate(_field(article, "paragraphs", f"{path}: data[{a}]")):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = _string(paragraph, "context", where)
            for q, qa in enumerate(_field(paragraph, "qas", where)):
                qa_where = f"{where}.qas[{q}]"
                record = {"context": context, **qa}
                if qa.get("is_impossible", False):
                    record["answers"] = []
                examples.append(example_from_record(record, str(qa.get("id", qa_where))))
    return examples


def read_qa(path: str | Path) -> list[QAExample] | dict[str, list[QAExample]]:
    """User QA data: SQuAD JSON (`.json`), JSONL with `context`, `question`, `answers` (`.jsonl`), or a
    directory written by `datasets`' save_to_disk (a Dataset, or a DatasetDict: then one list per split).
    Every example is checked (check_example); a bad one is a ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        import datasets

        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            return {name: _records(split, f"{path}[{name}]") for name, split in saved.items()}
        return _records(saved, str(path))
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [
            example_from_record(json.loads(line), f"{path}:{number}")
            for number, line in enumerate(lines, 1)
            if line.strip()
        ]
    return read_squad_json(path)


def _records(records: Iterable[Mapping], where: str) -> list[QAExample]:
    return [example_from_record(record, f"{where} row {i}") for i, record in enumerate(records)]


# ----------------------------------------------------------------------------------------------------------
# Windows of token features


class SpanTokenizer(Protocol):
    """What windowing needs of a tokenizer: token ids with each token's character span in the text."""

    cls_id: int
    sep_id: int
    pad_id: int

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...


@dataclass
class HFSpanTokenizer:
    """A Hugging Face fast tokenizer (BERT-style: its CLS, SEP and PAD tokens)."""

    tokenizer: object

    def __post_init__(self):
        self.cls_id, self.sep_id, self.pad_id = (
            self.tokenizer.cls_token_id,
            self.tokenizer.sep_token_id,
            self.tokenizer.pad_token_id,
        )

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]


@dataclass
class NativeSpanTokenizer:
    """The engine's byte-level BPE (`tokenizers.Tokenizer`): EOS stands for CLS and SEP."""

    tokenizer: object
    eos_id: int
    pad_id: int

    def __post_init__(self):
        self.cls_id = self.sep_id = self.eos_id

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = self.tokenizer.encode(text)
        return list(encoded.ids), [tuple(span) for span in encoded.offsets]


def answer_token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """The first and last token (indices into offsets) that overlap the characters [start, end), or None when
    the answer is not wholly inside these tokens."""
    if not offsets or start < offsets[0][0] or end > offsets[-1][1]:
        return None
    first = next(i for i, (_, token_end) in enumerate(offsets) if token_end > start)
    last = max(i for i, (token_start, _) in enumerate(offsets) if token_start < end)
    return (first, last) if first <= last else None


def build_windows(
    examples: Sequence[QAExample], tokenizer: SpanTokenizer, max_len: int, stride: int, max_question_tokens: int
) -> dict[str, Tensor]:
    """Token features of every window of every example, W windows in all, L = max_len:
    `input_ids` (W, L) int64; `attention_mask` (W, L) bool (real tokens); `token_type_ids` (W, L) int64 (1 on
    the context window and its SEP); `answer_mask` (W, L) bool, the positions an answer may take: CLS and the
    context tokens (question, separators and padding excluded); `start_positions`, `end_positions` (W,) int64,
    the first answer's tokens, 0 (CLS) when the window does not hold it whole or there is none;
    `offsets` (W, L, 2) int64, each context token's character span in its context, -1 elsewhere;
    `example_index` (W,) int64. Consecutive windows of a context share `stride` tokens.

    Raises ValueError when max_len leaves no room for the context or stride is not below that room."""
    rows = collections.defaultdict(list)
    for index, example in enumerate(examples):
        question = tokenizer.encode(example.question)[0][:max_question_tokens]
        context_ids, context_offsets = tokenizer.encode(example.context)
        room = max_len - len(question) - 3
        if room < 1:
            raise ValueError(f"max_len={max_len} leaves no room for the context after {len(question)} question tokens")
        if not 0 <= stride < room:
            raise ValueError(f"stride={stride} must be >= 0 and below the {room} context tokens a window holds")
        answer = example.answers[0] if example.answers else None
        first = 0
        while True:
            ids, spans = context_ids[first : first + room], context_offsets[first : first + room]
            _append_window(rows, index, question, ids, spans, answer, tokenizer, max_len)
            if first + room >= len(context_ids):
                break
            first += room - stride
    return {
        name: torch.tensor(values, dtype=torch.bool if name in ("attention_mask", "answer_mask") else torch.int64)
        for name, values in rows.items()
    }


def _append_window(rows, index, question, ids, spans, answer, tokenizer: SpanTokenizer, max_len: int) -> None:
    head = [tokenizer.cls_id, *question, tokenizer.sep_id]
    tokens = [*head, *ids, tokenizer.sep_id]
    pad = max_len - len(tokens)
    context = range(len(head), len(head) + len(ids))
    start = end = 0
    if answer is not None:
        text, answer_start = answer
        span = answer_token_span(spans, answer_start, answer_start + len(text))
        if span is not None:
            start, end = span[0] + len(head), span[1] + len(head)
    offsets = [(-1, -1)] * len(head) + [tuple(s) for s in spans] + [(-1, -1)] * (1 + pad)
    rows["input_ids"].append(tokens + [tokenizer.pad_id] * pad)
    rows["attention_mask"].append([True] * len(tokens) + [False] * pad)
    rows["token_type_ids"].append([0] * len(head) + [1] * (len(ids) + 1) + [0] * pad)
    rows["answer_mask"].append([i == 0 or i in context for i in range(max_len)])
    rows["start_positions"].append(start)
    rows["end_positions"].append(end)
    rows["offsets"].append(offsets)
    rows["example_index"].append(index)


# ----------------------------------------------------------------------------------------------------------
# Predictions


def predict_answers(
    start_logits: Tensor,
    end_logits: Tensor,
    windows: Mapping[str, Tensor],
    examples: Sequence[QAExample],
    max_answer_tokens: int = 30,
    allow_no_answer: bool = False,
) -> dict[str, str]:
    """The best answer text of every example, over all its windows: the span (start <= end, at most
    max_answer_tokens tokens, inside the context) of highest start + end logit. With allow_no_answer (SQuAD
    2.0) the answer is "" when the no-answer score (CLS, the lowest over the windows) beats every span.
    start_logits, end_logits: (W, L), one row per window of build_windows."""
    allowed = windows["answer_mask"].clone()
    allowed[:, 0] = False
    length = allowed.shape[1]
    band = torch.triu(torch.ones(length, length, dtype=torch.bool))
    band &= ~torch.triu(band, diagonal=max_answer_tokens)
    best: dict[int, tuple[float, int, int, int]] = {}
    null: dict[int, float] = {}
    for first in range(0, start_logits.shape[0], 64):  # windows in chunks: an L x L score matrix each
        s, e = start_logits[first : first + 64].float(), end_logits[first : first + 64].float()
        ok = allowed[first : first + 64]
        score = s[:, :, None] + e[:, None, :]
        score = score.masked_fill(~(band & ok[:, :, None] & ok[:, None, :]), float("-inf"))
        flat = score.flatten(1).max(dim=1)
        for w in range(score.shape[0]):
            window = first + w
            index = int(windows["example_index"][window])
            null[index] = min(null.get(index, float("inf")), float(s[w, 0] + e[w, 0]))
            value = float(flat.values[w])
            if value > best.get(index, (float("-inf"),))[0]:
                position = int(flat.indices[w])
                best[index] = (value, window, position // length, position % length)
    answers = {}
    for index, example in enumerate(examples):
        value, window, start, end = best.get(index, (float("-inf"), 0, 0, 0))
        if value == float("-inf") or (allow_no_answer and null.get(index, float("-inf")) > value):
            answers[example.id] = ""
            continue
        offsets = windows["offsets"][window]
        answers[example.id] = example.context[int(offsets[start, 0]) : int(offsets[end, 1])].strip()
    return answers


# ----------------------------------------------------------------------------------------------------------
# The SQuAD metric


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, punctuation removed, the articles a / an / the removed, whitespace
    collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 of the normalized texts; for an empty one (no answer), 1 if both are empty, else 0."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str], examples: Sequence[QAExample]) -> dict[str, float]:
    """Exact match and F1 in percent, each the best over an example's gold answers ("" for an unanswerable
    one), averaged over the examples. ValueError if an example has no prediction."""
    missing = [example.id for example in examples if example.id not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} examples, e.g. {missing[:3]}")
    if not examples:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for example in examples:
        golds = [text for text, _ in example.answers] or [""]
        em += max(exact_match(predictions[example.id], gold) for gold in golds)
        f1 += max(f1_score(predictions[example.id], gold) for gold in golds)
    return {"exact_match": 100 * em / len(examples), "f1": 100 * f1 / len(examples)}


# ----------------------------------------------------------------------------------------------------------
# The built-in task: questions on the standard library's own API documentation
#
# A context lists a few documented functions of one module in source order, one line each:
# `name(param, param=default, ...): first sentence of its docstring.` The questions ask for a function's
# first or last parameter, the default value of one of its parameters, or the function listed just before
# or after it. Every candidate answer of one kind looks alike (a parameter name, a default, a function
# name) and sits among the same kind of words, so matching the question's words against the context finds
# the right entry but not the answer: the reader must know which position in which entry is asked for.

QUESTION_KINDS = ("first_parameter", "last_parameter", "default", "next", "previous")
MAX_SUMMARY_CHARS = 160
MAX_DEFAULT_CHARS = 24


@dataclass(frozen=True)
class APIEntry:
    """A documented public function or method: `name` (`Class.method` for a method), its parameters
    (name, default source or None; self and cls left out) and the first sentence of its docstring."""

    name: str
    params: tuple[tuple[str, str | None], ...]
    summary: str


def _summary(docstring: str) -> str:
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=[.!?])\s", paragraph)[0]
    if len(sentence) > MAX_SUMMARY_CHARS:
        sentence = sentence[:MAX_SUMMARY_CHARS].rsplit(" ", 1)[0] + " ..."
    return sentence


def _entry(function, owner: str | None) -> APIEntry | None:
    docstring = ast.get_docstring(function)
    if function.name.startswith("_") or not docstring:
        return None
    arguments = function.args
    positional = arguments.posonlyargs + arguments.args
    defaults = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
    pairs = list(zip(positional, defaults)) + list(zip(arguments.kwonlyargs, arguments.kw_defaults))
    params = []
    for argument, default in pairs:
        if argument.arg in ("self", "cls"):
            continue
        source = None if default is None else ast.unparse(default)
        if source is not None and (len(source) > MAX_DEFAULT_CHARS or "\n" in source):
            return None
        params.append((argument.arg, source))
    if not params:
        return None
    name = function.name if owner is None else f"{owner}.{function.name}"
    return APIEntry(name, tuple(params), _summary(docstring))


def stdlib_api_entries() -> dict[str, list[APIEntry]]:
    """Per standard-library module (see data.stdlib_modules), its documented public functions and the
    methods of its public classes that have parameters, in source order, each name once."""
    modules = {}
    for module, tree in stdlib_modules():
        entries, seen = [], set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                candidates = [_entry(node, None)]
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                candidates = [
                    _entry(child, node.name)
                    for child in node.body
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                ]
            else:
                continue
            for entry in candidates:
                if entry is not None and entry.name not in seen:
                    seen.add(entry.name)
                    entries.append(entry)
        if entries:
            modules[module] = entries
    return modules


def api_context(entries: Sequence[APIEntry]) -> tuple[str, list[dict[str, object]]]:
    """The context text of a few entries, and for each entry the character offsets of its name, of each
    parameter name and of each default (None where it has none)."""
    lines, spans, offset = [], [], 0
    for entry in entries:
        line = entry.name + "("
        where = {"name": (offset, offset + len(entry.name)), "params": [], "defaults": []}
        for i, (param, default) in enumerate(entry.params):
            if i:
                line += ", "
            where["params"].append((offset + len(line), offset + len(line) + len(param)))
            line += param
            if default is None:
                where["defaults"].append(None)
            else:
                line += "="
                where["defaults"].append((offset + len(line), offset + len(line) + len(default)))
                line += default
        line += f"): {entry.summary}"
        lines.append(line)
        spans.append(where)
        offset += len(line) + 1
    return "\n".join(lines), spans


def api_questions(module: str, entries: Sequence[APIEntry], rng: random.Random) -> list[QAExample]:
    """The questions on one context made of `entries` (every kind that applies to each entry; for the
    default, one parameter that has one, chosen by rng)."""
    context, spans = api_context(entries)
    examples = []

    def ask(entry: APIEntry, kind: str, question: str, span: tuple[int, int]) -> None:
        answer = (context[span[0] : span[1]], span[0])
        examples.append(QAExample(f"{module}:{entry.name}:{kind}", context, question, (answer,)))

    for i, (entry, where) in enumerate(zip(entries, spans)):
        ask(entry, "first_parameter", f"What is the first parameter of {entry.name}?", where["params"][0])
        if len(entry.params) > 1:
            ask(entry, "last_parameter", f"What is the last parameter of {entry.name}?", where["params"][-1])
        with_default = [j for j, span in enumerate(where["defaults"]) if span is not None]
        if with_default:
            j = rng.choice(with_default)
            question = f"What is the default value of {entry.params[j][0]} in {entry.name}?"
            ask(entry, "default", question, where["defaults"][j])
        if i + 1 < len(entries):
            ask(entry, "next", f"Which function is listed after {entry.name}?", spans[i + 1]["name"])
        if i > 0:
            ask(entry, "previous", f"Which function is listed before {entry.name}?", spans[i - 1]["name"])
    return examples


def stdlib_qa_splits(
    fractions: Sequence[float], entries_per_context: int = 5, seed: int = 0
) -> dict[str, list[QAExample]]:
    """The built-in QA task: train / validation / test questions on standard-library contexts (see above),
    split by source module (no module's text in two splits, as data.split_documents splits the corpus).
    Each module's entries are cut into contexts of entries_per_context in source order (a short remainder
    joins the previous context)."""
    examples, documents = {}, []
    for module, entries in stdlib_api_entries().items():
        rng = random.Random(f"{seed}:{module}")
        chunks = [entries[i : i + entries_per_context] for i in range(0, len(entries), entries_per_context)]
        if len(chunks) > 1 and len(chunks[-1]) < 3:
            remainder = chunks.pop()
            chunks[-1] += remainder
        for chunk in chunks:
            for example in api_questions(module, chunk, rng):
                examples[example.id] = example
                documents.append(Document(example.id, module, module.split(".")[0]))
    splits = split_documents(documents, fractions)
    return {name: [examples[document.text] for document in split] for name, split in splits.items()}


def word_overlap_answer(example: QAExample, window: int = 6) -> str:
    """The word-overlap baseline: among the context's words (runs of characters other than whitespace and
    `(),:=`) that are not in the question, the one with the most question words among the `window` words on
    either side (the first on ties)."""
    question = set(normalize_answer(example.question).split())
    words = re.findall(r"[^\s(),:=]+", example.context)
    normalized = [normalize_answer(word) for word in words]
    best, best_score = "", -1
    for i, word in enumerate(words):
        if not normalized[i] or normalized[i] in question:
            continue
        around = normalized[max(0, i - window) : i] + normalized[i + 1 : i + 1 + window]
        score = sum(token in question for token in around)
        if score > best_score:
            best, best_score = word, score
    return best
