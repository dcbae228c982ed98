"""Two tokenizations of one text: their alignment by byte offsets and their shared vocabulary.

    student_group, teacher_group = token_groups(student_ends, teacher_ends)   # per token: its group, -1: none
    alignment = alignment_from_groups(student_group, teacher_group, ...)      # a batch's TokenAlignment
    vocab_map = vocabulary_map(student_tokenizer, teacher_tokenizer)          # (M, 2) int64 id pairs
    lengths = token_byte_lengths(text, encoding.offset_mapping, pieces)       # a fast tokenizer's offsets
    loss = tsa_fast.cross_tokenizer_loss(student_logits, teacher_logits, alignment, vocab_map, labels)

Offsets are byte offsets into the text's UTF-8 encoding: `ends[r]` is where token r ends, token r spans
(ends[r - 1], ends[r]] (the first from the side's `start`). A boundary is an offset where a side ends a token (or
its start); the aligned boundaries are those of both sides, and the stretch between two consecutive aligned
boundaries is a group: one or more tokens on each side that cover exactly the same bytes. Tokens before the first
or after the last aligned boundary are in no group (-1). Everything is vectorized (numpy, torch), so a data
pipeline aligns a whole token stream at once, before training (`tsa_fast.distill.data`), and a batch's
alignment is index arithmetic on its examples' groups.

A token's bytes are what the tokenizer's own decoder makes of its piece: byte-level pieces (GPT-2, Llama 3, the
built-in BPE) through the byte-level alphabet, SentencePiece-style pieces with their word-boundary mark as a space
and `<0xHH>` byte fallbacks as that byte, WordPiece continuations without their prefix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from tsa_fast.ops.cross_tokenizer_loss import TokenAlignment

__all__ = [
    "align_offsets",
    "alignment_from_groups",
    "byte_level_alphabet",
    "special_ids",
    "token_byte_lengths",
    "token_bytes",
    "token_groups",
    "vocabulary_map",
]

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def byte_level_alphabet() -> dict[str, int]:
    """The byte-level (GPT-2) alphabet: the printable character that stands for each of the 256 bytes -> the byte.
    Printable Latin-1 bytes stand for themselves; the others, in byte order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def _backend(tokenizer, name: str) -> Tokenizer:
    """The `tokenizers.Tokenizer` of `tokenizer` (itself, or a Hugging Face fast tokenizer's backend)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(
        f"{name} must be a tokenizers.Tokenizer or a Hugging Face fast tokenizer, got {type(tokenizer).__name__}"
    )


def _decoder_step(step: dict):
    """One step of a decoder config as a function of one piece (str, or bytes once a step made bytes of it); None
    for a step of a type this does not read. Fuse (joining pieces) and Strip (trimming the text's ends) do nothing
    to a piece in the middle of a text."""
    kind = step["type"]
    if kind in ("Fuse", "Strip"):
        return lambda piece: piece
    if kind == "ByteLevel":
        alphabet = byte_level_alphabet()
        return lambda piece: bytes(alphabet[c] for c in piece)  # KeyError: a character outside the alphabet
    if kind == "ByteFallback":
        return lambda piece: bytes([int(m.group(1), 16)]) if (m := _BYTE_FALLBACK.fullmatch(piece)) else piece
    if kind == "Metaspace":
        mark = step.get("replacement", "▁")
        return lambda piece: piece.replace(mark, " ")
    if kind == "Replace" and "String" in step["pattern"]:
        old, new = step["pattern"]["String"], step["content"]
        return lambda piece: piece.replace(old, new)
    if kind == "WordPiece":
        prefix = step.get("prefix", "##")
        return lambda piece: piece[len(prefix) :] if piece.startswith(prefix) else " " + piece
    return None


def _piece_decoder(config: dict | None):
    """A function piece -> bytes that applies the decoder `config` (a tokenizer JSON's "decoder") to one piece in
    the middle of a text; None for a decoder with a step of another type."""
    steps = [] if config is None else config["decoders"] if config["type"] == "Sequence" else [config]
    functions = [_decoder_step(step) for step in steps]
    if None in functions:
        return None

    def decode(piece: str) -> bytes:
        for function in functions:
            if isinstance(piece, bytes):
                break
            piece = function(piece)
        return piece if isinstance(piece, bytes) else piece.encode()

    return decode


def special_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens (added tokens marked special: padding, end of text, ...)."""
    backend = _backend(tokenizer, "tokenizer")
    return {i for i, token in backend.get_added_tokens_decoder().items() if token.special}


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id stands for in a text, by the tokenizer's own decoder (`tokenizers.Tokenizer` or a
    Hugging Face fast tokenizer); b"" for special tokens (they stand for no text). Ids the vocabulary skips are
    b"" too. Raises TypeError for another kind of tokenizer."""
    backend = _backend(tokenizer, "tokenizer")
    vocab = backend.get_vocab(with_added_tokens=True)
    specials = special_ids(backend)
    decode = _piece_decoder(json.loads(backend.to_str()).get("decoder"))
    pieces = [b""] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        if i in specials:
            continue
        if decode is not None:
            try:
                pieces[i] = decode(piece)
                continue
            except KeyError:  # a character outside the byte-level alphabet (an added normal token)
                pass
        pieces[i] = backend.decode([i], skip_special_tokens=False).encode()
    return pieces


def token_byte_lengths(text: str, offsets: Sequence[tuple[int, int]], piece_bytes: Sequence[int]) -> np.ndarray:
    """(T,) int64: the UTF-8 bytes of `text` each of its T tokens covers, from a Hugging Face fast tokenizer's
    character `offsets` (start, end) of the tokens and `piece_bytes`, the bytes of each token's piece (T entries:
    `token_bytes` of its id). Token r covers the bytes after token r - 1's end up to its own, the last one up to
    the text's end, so the lengths sum to the text's bytes (text the pre-tokenizer drops, as spaces, belongs to the
    token after it). Tokens that end within the same character (a character of several bytes split across
    byte-level tokens, whose offsets are all that character's) end at their pieces' bytes within it.

    Raises ValueError when offsets and pieces differ in number, or a token covers no byte of the text."""
    if len(offsets) != len(piece_bytes):
        raise ValueError(f"offsets ({len(offsets)} tokens) and piece_bytes ({len(piece_bytes)}) differ in length")
    if not len(offsets):
        return np.zeros(0, dtype=np.int64)
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    char_bytes = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
    byte_at = np.concatenate(([0], np.cumsum(char_bytes, dtype=np.int64)))  # byte offset of each character offset
    ends = byte_at[np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 1]]
    ends[-1] = byte_at[-1]
    # A run of tokens with one end: each ends its later run-mates' piece bytes before it.
    pieces = np.asarray(piece_bytes, dtype=np.int64)
    after = np.concatenate((np.cumsum(pieces[::-1])[::-1], [0]))  # after[r]: piece bytes of tokens r, r + 1, ...
    run_last = np.flatnonzero(np.r_[ends[1:] != ends[:-1], True])
    last_of = run_last[np.searchsorted(run_last, np.arange(len(ends)))]
    ends = ends - (after[1:] - after[last_of + 1])
    lengths = np.diff(ends, prepend=0)
    if (lengths <= 0).any():
        r = int(np.argmax(lengths <= 0))
        raise ValueError(f"token {r} (offsets {tuple(offsets[r])}) covers no byte of the text after token {r - 1}")
    return lengths


def vocabulary_map(student_tokenizer, teacher_tokenizer) -> torch.Tensor:
    """(M, 2) int64: the pairs (student id, teacher id) of tokens that stand for the same bytes (`token_bytes`: after
    each tokenizer's own decoding of its pieces), and of special tokens of the same content ("<eos>" and "<eos>"), in
    increasing student id. Each id is in at most one pair: where a tokenizer has several ids of the same bytes, its
    lowest. Tokens of no bytes are in no pair. Raises TypeError for a tokenizer of another kind."""
    student, teacher = (
        _backend(student_tokenizer, "student_tokenizer"),
        _backend(teacher_tokenizer, "teacher_tokenizer"),
    )

    def keys(tokenizer: Tokenizer) -> dict:
        """Key (("text", bytes) or ("special", content)) -> the lowest id with it."""
        out = {}
        for i, piece in enumerate(token_bytes(tokenizer)):
            if piece:
                out.setdefault(("text", piece), i)
        for i in sorted(special_ids(tokenizer)):
            out.setdefault(("special", tokenizer.id_to_token(i)), i)
        return out

    student_keys, teacher_keys = keys(student), keys(teacher)
    pairs = sorted((i, teacher_keys[key]) for key, i in student_keys.items() if key in teacher_keys)
    return torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)


def _checked_offsets(ends, start: int, name: str) -> np.ndarray:
    """`ends` as a 1-D int64 array, checked: integers, strictly increasing, after `start` >= 0."""
    array = np.asarray(ends)
    if array.ndim != 1 or not (array.dtype.kind in "iu" or array.size == 0):
        raise ValueError(
            f"{name} must be a 1-D sequence of integer byte offsets, got shape {array.shape} {array.dtype}"
        )
    array = array.astype(np.int64)
    if start < 0:
        raise ValueError(f"{name}: the start offset {start} is negative")
    if array.size and array[0] <= start:
        raise ValueError(f"{name}: the first token ends at {array[0]}, not after the start {start}")
    steps = np.diff(array)
    if (steps <= 0).any():
        r = int(np.argmax(steps <= 0))
        raise ValueError(
            f"{name} must be strictly increasing (every token covers at least one byte): token {r + 1} ends at"
            f" {array[r + 1]}, token {r} at {array[r]}"
        )
    return array


def token_groups(
    student_ends: Sequence[int] | np.ndarray,
    teacher_ends: Sequence[int] | np.ndarray,
    *,
    student_start: int = 0,
    teacher_start: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The group of every token of two tokenizations of one text (see the module docstring), as two int64 arrays
    shaped like the ends: group g holds the tokens that end in (B[g], B[g + 1]] where B are the aligned boundaries
    (the offsets in both {start} + ends), on each side; -1 for a token outside every group. Groups are numbered in
    text order from 0 and each has at least one token on each side.

    Raises ValueError naming the argument for ends that are not 1-D integers, not strictly increasing, or not
    after their start."""
    s = _checked_offsets(student_ends, student_start, "student_ends")
    t = _checked_offsets(teacher_ends, teacher_start, "teacher_ends")
    aligned = np.intersect1d(np.r_[student_start, s], np.r_[teacher_start, t], assume_unique=True)

    def groups(ends: np.ndarray) -> np.ndarray:
        # The first aligned boundary at or after a token's end closes its group; the one before opens it.
        closing = np.searchsorted(aligned, ends, side="left")
        return np.where((closing >= 1) & (closing < len(aligned)), closing - 1, -1)

    return groups(s), groups(t)


def alignment_from_groups(
    student_group: Tensor, teacher_group: Tensor, student_tokens: Tensor, teacher_tokens: Tensor
) -> TokenAlignment:
    """The `TokenAlignment` of a batch of B examples, over its flattened rows, from each row's group (`token_groups`
    of each example: groups 0 ... G_b - 1 in order, -1 outside every group).

    student_group, student_tokens: (B, N_s) int64, the group of each student row's predicted token and that token;
    teacher_group, teacher_tokens: (B, N_t) likewise (tokens are read only where a row predicts the earlier token of
    a group, so padding there may be any value; negative ones become 0). Example b's groups become groups
    sum_{b' < b} G_b' + g. Raises ValueError when the shapes disagree or an example's two sides have a different
    number of groups."""
    if student_group.shape != student_tokens.shape or teacher_group.shape != teacher_tokens.shape:
        raise ValueError(
            f"groups and tokens must have the same shape: student {tuple(student_group.shape)} and"
            f" {tuple(student_tokens.shape)}, teacher {tuple(teacher_group.shape)} and {tuple(teacher_tokens.shape)}"
        )
    if student_group.dim() != 2 or teacher_group.dim() != 2 or len(student_group) != len(teacher_group):
        raise ValueError(
            f"student_group (B, N_s) and teacher_group (B, N_t) must be 2-D with the same B, got"
            f" {tuple(student_group.shape)} and {tuple(teacher_group.shape)}"
        )
    counts, teacher_counts = _group_counts(student_group), _group_counts(teacher_group)
    if not torch.equal(counts, teacher_counts):
        raise ValueError(f"the examples' student and teacher groups differ in number: {counts} and {teacher_counts}")
    offsets = torch.cumsum(counts, 0) - counts
    n_groups = int(counts.sum())

    def side(group: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ids = torch.where(group >= 0, group + offsets[:, None], -1).flatten()
        counted = ids >= 0
        positions = torch.arange(len(ids), device=ids.device)
        # The row of a group's last token: its rows are consecutive, so the largest.
        rows = ids.new_zeros(n_groups).scatter_reduce_(0, ids[counted], positions[counted], "amax", include_self=False)
        prefix = ids.clone()
        prefix[rows] = -1
        return rows, prefix, tokens.flatten().clamp_min(0)

    student_rows, student_prefix, student_ids = side(student_group, student_tokens)
    teacher_rows, teacher_prefix, teacher_ids = side(teacher_group, teacher_tokens)
    return TokenAlignment(student_rows, teacher_rows, student_prefix, teacher_prefix, student_ids, teacher_ids)


def _group_counts(group: Tensor) -> Tensor:
    """(B,) the number of groups of each example (its largest group id + 1)."""
    return (group.amax(dim=1) + 1).clamp_min(0) if group.shape[1] else group.new_zeros(len(group))


def align_offsets(
    student_ends: Sequence[int] | np.ndarray,
    teacher_ends: Sequence[int] | np.ndarray,
    student_tokens: Sequence[int] | Tensor,
    teacher_tokens: Sequence[int] | Tensor,
) -> TokenAlignment:
    """The `TokenAlignment` of two tokenizations of one text: `*_ends` the byte offsets where each token ends (both
    from offset 0 to the text's length), `*_tokens` the tokens' ids, row r of a side predicting its token r.

    Raises ValueError naming the argument for offsets that are bad (`token_groups`) or that do not cover the same
    text (different last offsets), or tokens that are not one per offset."""
    s = _checked_offsets(student_ends, 0, "student_ends")
    t = _checked_offsets(teacher_ends, 0, "teacher_ends")
    if not s.size or not t.size or s[-1] != t[-1]:
        raise ValueError(
            "student_ends and teacher_ends do not cover the same text: they end at"
            f" {s[-1] if s.size else 0} and {t[-1] if t.size else 0} bytes"
        )
    student_tokens, teacher_tokens = torch.as_tensor(student_tokens), torch.as_tensor(teacher_tokens)
    for name, tokens, ends in (("student_tokens", student_tokens, s), ("teacher_tokens", teacher_tokens, t)):
        if tuple(tokens.shape) != ends.shape:
            raise ValueError(f"{name} must be one id per offset, shape {ends.shape}, got {tuple(tokens.shape)}")
    student_group, teacher_group = (torch.from_numpy(g)[None] for g in token_groups(s, t))
    return alignment_from_groups(student_group, teacher_group, student_tokens[None].long(), teacher_tokens[None].long())
