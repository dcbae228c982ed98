"""Batches by example index: a split is a dict of tensors with one row per example, so a batch is a row
selection and the data position of a run is just its step (resuming needs no iterator state).

Training order: epoch e visits the examples in the permutation of torch.Generator seeded by (seed, e);
optimizer step s takes micro-batches s * accum ... s * accum + accum - 1 of that endless stream.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def num_examples(split: dict[str, Tensor]) -> int:
    return len(next(iter(split.values())))


def take(split: dict[str, Tensor], index: Tensor, device: torch.device) -> dict[str, Tensor]:
    """The rows `index` of every tensor of the split, on `device`, plus the indices themselves ("index")."""
    batch = {name: tensor[index].to(device, non_blocking=True) for name, tensor in split.items()}
    batch["index"] = index
    return batch


def training_indices(n: int, batch_size: int, micro_batch: int, seed: int) -> Tensor:
    """Example indices of micro-batch number `micro_batch` of the shuffled endless stream over n examples."""
    start = micro_batch * batch_size
    pieces, offset = [], start
    while offset < start + batch_size:
        epoch, position = divmod(offset, n)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator)
        piece = order[position : position + start + batch_size - offset]
        pieces.append(piece)
        offset += len(piece)
    return torch.cat(pieces)


def in_order(
    split: dict[str, Tensor], batch_size: int, device: torch.device, max_batches: int | None = None
) -> Iterator[dict[str, Tensor]]:
    """The split in order, batch by batch (evaluation)."""
    n = num_examples(split)
    for number, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and number >= max_batches:
            return
        yield take(split, torch.arange(start, min(n, start + batch_size)), device)
