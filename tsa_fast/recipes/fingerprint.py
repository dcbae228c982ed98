"""Keys of what a recipe caches (trained teachers, the teacher top-k cache): hashes of everything that
determines it, so that a second run finds it and a changed option misses it."""

from __future__ import annotations

import hashlib
import json

from tsa_fast.distill.data import TaskData


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(data: TaskData) -> str:
    """A hash of the training tensors: what a cached teacher was trained on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(data.train.items()):
        digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
