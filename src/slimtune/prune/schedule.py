"""The cubic sparsity schedule of Zhu & Gupta (2017), "To prune, or not to prune", counted in optimizer steps.

From ``start_step`` the target rises from ``initial`` to ``final`` every ``update_every`` steps along
``s_t = final + (initial - final) * (1 - (t - start) / (end - start)) ** 3``: fast at first, while many redundant
weights remain, then slower. Before ``start_step`` nothing is pruned (target 0); from ``end_step`` on the target is
``final`` and the masks stay fixed (the recovery phase). Between updates the target is the last update's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimtune.errors import SlimtuneError

__all__ = ["CubicSchedule", "check_sparsity"]


def check_sparsity(value, key: str = "sparsity", owner: str = "pruning") -> float:
    """A sparsity in [0, 1): the fraction of weights set to zero."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value < 1
    if not ok:
        raise SlimtuneError(f"{owner} {key}={value!r} is not valid; valid: a number in [0, 1)")
    return float(value)


def _check_step(value, key: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SlimtuneError(f"{owner} {key}={value!r} is not valid; valid: an int >= 0")
    return value


@dataclass(frozen=True)
class CubicSchedule:
    """Zhu & Gupta's cubic schedule; see the module docstring. Steps are optimizer steps (``trainer.global_step``)."""

    final: float
    start_step: int
    end_step: int
    initial: float = 0.0
    update_every: int = 1

    def __post_init__(self) -> None:
        owner = "pruning schedule"
        check_sparsity(self.final, "final_sparsity", owner)
        check_sparsity(self.initial, "initial_sparsity", owner)
        if self.initial > self.final:
            raise SlimtuneError(f"{owner} initial_sparsity={self.initial!r} is above final_sparsity={self.final!r}; "
                                "valid: initial_sparsity <= final_sparsity")
        _check_step(self.start_step, "start_step", owner)
        _check_step(self.end_step, "end_step", owner)
        if self.end_step < self.start_step:
            raise SlimtuneError(f"{owner} end_step={self.end_step} is before start_step={self.start_step}; valid: "
                                f"end_step >= {self.start_step}")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise SlimtuneError(f"{owner} update_every={self.update_every!r} is not valid; valid: a positive int")

    def update_steps(self) -> list[int]:
        """The steps at which masks are recomputed: start, every ``update_every`` after it, and the end step."""
        steps = list(range(self.start_step, self.end_step, self.update_every))
        return steps + [self.end_step] if not steps or steps[-1] != self.end_step else steps

    def is_update_step(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.update_every == 0

    def target(self, step: int) -> float:
        """The sparsity the masks hold after the update at or before ``step``."""
        if step < self.start_step:
            return 0.0
        if step >= self.end_step:
            return self.final
        last = self.start_step + (step - self.start_step) // self.update_every * self.update_every
        progress = (last - self.start_step) / (self.end_step - self.start_step)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3
