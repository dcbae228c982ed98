"""Student initialization from a teacher (DistilBERT style) and the student-teacher layer map of the
hidden-state and attention-transfer losses.

Layers are block indices: block i's output is `hidden_states[i + 1]`, its attention inputs `qkv[i]`. The one
rule of both: teacher blocks are split into n_student equal groups, and the student's block i stands for the
last block of group i. So the last student block maps to the last teacher block, and a student initialized
from the teacher starts with the weights of the blocks whose outputs the layer map later matches it to.
"""

from __future__ import annotations

import torch

from tsa_fast.models.transformer import Transformer


def every_kth_layer(n_teacher_layers: int, n_student_layers: int) -> list[int]:
    """The teacher blocks a student of n_student_layers blocks keeps: the last of each of n_student_layers equal
    groups, (i + 1) * n_teacher_layers // n_student_layers - 1. With n_teacher = k * n_student that is every
    k-th block ending at the last one (6 -> 3: [1, 3, 5]); always includes the last teacher block.

    Raises ValueError unless 1 <= n_student_layers <= n_teacher_layers.
    """
    if not 1 <= n_student_layers <= n_teacher_layers:
        raise ValueError(
            f"need 1 <= n_student_layers <= n_teacher_layers, got n_student_layers={n_student_layers},"
            f" n_teacher_layers={n_teacher_layers}"
        )
    return [(i + 1) * n_teacher_layers // n_student_layers - 1 for i in range(n_student_layers)]


def default_layer_map(n_student_layers: int, n_teacher_layers: int) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs for the hidden-state and attention-transfer losses: every student
    block, mapped uniformly as in `every_kth_layer` (last to last; 3 student, 6 teacher blocks:
    [(0, 1), (1, 3), (2, 5)]). Raises ValueError unless 1 <= n_student_layers <= n_teacher_layers."""
    return list(enumerate(every_kth_layer(n_teacher_layers, n_student_layers)))


@torch.no_grad()
def init_from_teacher(student: Transformer, teacher: Transformer, layers: list[int] | None = None) -> Transformer:
    """Copy into `student` the teacher's token embedding (and learned positions, the first max_seq_len rows),
    the teacher blocks `layers` (default `every_kth_layer`) into student blocks 0, 1, ..., and the final norm.
    The classification head, if any, is left as initialized. Returns the student.

    Raises ValueError when vocab_size, d_model, n_heads, the FFN size or the positional encoding differ (naming
    them: a narrower student is trained from scratch, with projections in the loss), when learned positions of
    the student outnumber the teacher's, or when `layers` is not n_student_layers teacher block indices.
    """
    s, t = student.config, teacher.config
    fields = ("vocab_size", "d_model", "n_heads", "ffn_dim", "positional")
    mismatches = [
        f"{name}: student {getattr(s, name)}, teacher {getattr(t, name)}"
        for name in fields
        if getattr(s, name) != getattr(t, name)
    ]
    if mismatches:
        raise ValueError(f"init_from_teacher needs the teacher's width and encoding; differ: {'; '.join(mismatches)}")
    if s.positional == "learned" and s.max_seq_len > t.max_seq_len:
        raise ValueError(f"student max_seq_len={s.max_seq_len} > teacher's {t.max_seq_len}: no positions to copy")
    layers = every_kth_layer(t.n_layers, s.n_layers) if layers is None else list(layers)
    if len(layers) != s.n_layers or not all(isinstance(j, int) and 0 <= j < t.n_layers for j in layers):
        raise ValueError(
            f"layers must be {s.n_layers} teacher block indices (one per student block) in [0, {t.n_layers}),"
            f" got {layers}"
        )

    student.token_embedding.load_state_dict(teacher.token_embedding.state_dict())
    if s.positional == "learned":
        student.position_embedding.weight.copy_(teacher.position_embedding.weight[: s.max_seq_len])
    for student_block, j in zip(student.blocks, layers):
        student_block.load_state_dict(teacher.blocks[j].state_dict())
    student.final_norm.load_state_dict(teacher.final_norm.state_dict())
    return student
