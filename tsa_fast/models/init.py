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
def init_from_teacher(
    student: Transformer, teacher: Transformer, layers: list[int] | None = None, *, narrower: bool = False
) -> Transformer:
    """Copy into `student` the teacher's token embedding (and learned positions, the first max_seq_len rows),
    the teacher blocks `layers` (default `every_kth_layer`) into student blocks 0, 1, ..., and the final norm.
    The classification head, if any, is left as initialized. Returns the student.

    narrower=True also initializes a student narrower than the teacher (d_model, n_heads and the FFN size at
    most the teacher's, the same head size): every tensor is its leading slice of the teacher's, i.e. the
    first d_model dimensions of the residual stream, the first n_heads heads of q, k and v (and the matching
    columns of the output projection) and the first FFN units. Equal sizes copy whole tensors either way.

    Raises ValueError when vocab_size or the positional encoding differ, when d_model, n_heads or the FFN size
    differ (narrower=False) or exceed the teacher's or the head sizes differ (narrower=True), naming them; when
    learned positions of the student outnumber the teacher's, or when `layers` is not n_student_layers teacher
    block indices.
    """
    s, t = student.config, teacher.config
    exact = ("vocab_size", "positional") + (("head_dim",) if narrower else ("d_model", "n_heads", "ffn_dim"))
    mismatches = [
        f"{name}: student {getattr(s, name)}, teacher {getattr(t, name)}"
        for name in exact
        if getattr(s, name) != getattr(t, name)
    ]
    if narrower:
        mismatches += [
            f"{name}: student {getattr(s, name)} > teacher {getattr(t, name)}"
            for name in ("d_model", "n_heads", "ffn_dim")
            if getattr(s, name) > getattr(t, name)
        ]
    if mismatches:
        need = "a head size like the teacher's and no larger width" if narrower else "the teacher's width and encoding"
        raise ValueError(f"init_from_teacher needs {need}; differ: {'; '.join(mismatches)}")
    if s.positional == "learned" and s.max_seq_len > t.max_seq_len:
        raise ValueError(f"student max_seq_len={s.max_seq_len} > teacher's {t.max_seq_len}: no positions to copy")
    layers = every_kth_layer(t.n_layers, s.n_layers) if layers is None else list(layers)
    if len(layers) != s.n_layers or not all(isinstance(j, int) and 0 <= j < t.n_layers for j in layers):
        raise ValueError(
            f"layers must be {s.n_layers} teacher block indices (one per student block) in [0, {t.n_layers}),"
            f" got {layers}"
        )

    _copy_leading(student.token_embedding, teacher.token_embedding)
    if s.positional == "learned":
        _copy_leading(student.position_embedding, teacher.position_embedding)
    for student_block, j in zip(student.blocks, layers):
        _copy_leading(student_block, teacher.blocks[j])
        # q, k and v are three stacked (d_model, d_model) projections: each keeps its own leading heads.
        for name, param in student_block.qkv.named_parameters():
            source = getattr(teacher.blocks[j].qkv, name)
            param.copy_(_leading(source.unflatten(0, (3, -1)), param.unflatten(0, (3, -1)).shape).flatten(0, 1))
    _copy_leading(student.final_norm, teacher.final_norm)
    return student


def _leading(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return tensor[tuple(slice(0, n) for n in shape)]


def _copy_leading(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Every parameter of `student` := the leading slice of the same parameter of `teacher`, of its shape."""
    teacher_params = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        param.copy_(_leading(teacher_params[name], param.shape))
