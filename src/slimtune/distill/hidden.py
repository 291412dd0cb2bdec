"""Hidden-state distillation: chosen (student, teacher) layer pairs, MSE or cosine, with a learned linear projection
of the student's states where the widths differ. Pure torch.

Layers are numbered as transformers' `output_hidden_states` returns them: 0 is the embedding output, i the output of
decoder layer i (1-based), n_layers the last (after the final norm in most models). `uniform_layer_map` pairs each
chosen student layer with the teacher layer at the same relative depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import SlimtuneError, choices

__all__ = ["HIDDEN_LOSSES", "HiddenStateLoss", "check_layer_pairs", "uniform_layer_map"]

HIDDEN_LOSSES = ("mse", "cosine")


def uniform_layer_map(student_layers: int, teacher_layers: int, count: int | None = None) -> list[tuple[int, int]]:
    """`count` pairs (default: one per student layer) at evenly spaced student depths, each with the teacher layer of
    the same relative depth; the last layers are always paired."""
    for key, value in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
        if not isinstance(value, int) or value < 1:
            raise SlimtuneError(f"uniform_layer_map {key}={value!r} is not valid; valid: a positive int")
    count = student_layers if count is None else count
    if not isinstance(count, int) or not 1 <= count <= student_layers:
        raise SlimtuneError(f"uniform_layer_map count={count!r} is not valid; valid: an int in [1, {student_layers}]")
    students = sorted({round(student_layers * (i + 1) / count) for i in range(count)})
    return [(s, round(s * teacher_layers / student_layers)) for s in students]


def check_layer_pairs(pairs, student_states: int, teacher_states: int) -> list[tuple[int, int]]:
    """Pairs as a list of (student, teacher) hidden-state indices that exist; negative indices count from the end."""
    if not isinstance(pairs, Sequence) or isinstance(pairs, str) or not pairs:
        raise SlimtuneError(f"hidden-state layer pairs {pairs!r} are not valid; valid: a non-empty list of "
                            "[student_layer, teacher_layer] pairs")
    checked = []
    for pair in pairs:
        if (not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)):
            raise SlimtuneError(f"hidden-state layer pair {pair!r} is not valid; valid: [student_layer, teacher_layer], "
                                "two ints")
        resolved = []
        for which, index, count in (("student", pair[0], student_states), ("teacher", pair[1], teacher_states)):
            if not -count <= index < count:
                raise SlimtuneError(f"hidden-state layer pair {list(pair)!r}: the {which} has no layer {index}; valid: "
                                    f"0 (embeddings) to {count - 1} (its last layer), or -1 to -{count}")
            resolved.append(index % count)
        checked.append((resolved[0], resolved[1]))
    return checked


class HiddenStateLoss(nn.Module):
    """Mean over layer pairs of MSE (or 1 - cosine similarity) between projected student states and teacher states,
    over the positions of `mask` (e.g. the attention mask: padding left out).

    `student_width` / `teacher_width`: hidden sizes; where they differ each pair gets a trainable
    `nn.Linear(student_width, teacher_width, bias=False)` (these parameters must be trained with the student).
    """

    def __init__(self, pairs, student_width: int, teacher_width: int, student_states: int, teacher_states: int,
                 loss: str = "mse"):
        super().__init__()
        if loss not in HIDDEN_LOSSES:
            raise SlimtuneError(f"hidden-state loss={loss!r} is not supported; valid: {choices(HIDDEN_LOSSES)}")
        self.pairs = check_layer_pairs(pairs, student_states, teacher_states)
        self.loss = loss
        self.student_width, self.teacher_width = int(student_width), int(teacher_width)
        if self.student_width != self.teacher_width:
            self.projections = nn.ModuleList(nn.Linear(self.student_width, self.teacher_width, bias=False)
                                             for _ in self.pairs)
        else:
            self.projections = None

    def forward(self, student_states: Sequence[Tensor], teacher_states: Sequence[Tensor],
                mask: Tensor | None = None) -> Tensor:
        terms = []
        for k, (s_index, t_index) in enumerate(self.pairs):
            student = student_states[s_index]
            teacher = teacher_states[t_index].detach().to(student.device)
            if mask is not None:
                keep = mask.to(student.device).bool()
                student, teacher = student[keep], teacher[keep]
            else:
                student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
            if self.projections is not None:
                projection = self.projections[k]
                student = projection(student.to(projection.weight.dtype))
            student, teacher = student.float(), teacher.float()
            if student.shape[0] == 0:
                terms.append(student.sum() * 0.0)
            elif self.loss == "mse":
                terms.append(F.mse_loss(student, teacher))
            else:
                terms.append((1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean())
        return torch.stack(terms).mean()
