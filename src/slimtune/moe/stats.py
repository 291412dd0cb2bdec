"""Expert-utilisation statistics of MoE routers, gathered over micro-batches and data-parallel ranks: load shares,
coefficient of variation, router entropy, dead experts and load collapse. Pure torch.

A `StepLoad` holds, for each router layer, the routing slots each expert received and the real (unpadded) tokens
routed, summed over the micro-batches of one optimizer step; `reduced()` sums them over the ranks of the default
process group too (one all-reduce of one tensor), which is what global-batch balancing and the aux-loss-free bias
update use. Every rank must call `reduced()` the same number of times (it is a collective).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from slimtune.errors import SlimtuneError

__all__ = ["CollapseReport", "DeadExperts", "StepLoad", "all_reduce_sum", "coefficient_of_variation",
           "collapse_report", "load_shares", "routing_entropy"]


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """`tensor` summed over the ranks of the default process group (a copy; the tensor itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


class StepLoad:
    """Per layer: expert slots and real tokens summed over micro-batches (`add`), until `reset`. The sums stay on
    `device` (the model's: no host sync per micro-batch, and NCCL all-reduces device tensors only)."""

    def __init__(self, num_experts: list[int], device: torch.device | str | None = None):
        self.num_experts = list(num_experts)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.load = [torch.zeros(e, dtype=torch.float64, device=self.device) for e in self.num_experts]
        self.tokens = torch.zeros(len(self.num_experts), dtype=torch.float64, device=self.device)

    def add(self, layer: int, load: Tensor, tokens: Tensor | float) -> None:
        self.load[layer] += load.detach().to(self.device, torch.float64)
        self.tokens[layer] += torch.as_tensor(tokens, dtype=torch.float64).to(self.device)

    def reset(self) -> None:
        for load in self.load:
            load.zero_()
        self.tokens.zero_()

    def reduced(self) -> tuple[list[Tensor], Tensor]:
        """(load per layer, tokens per layer) summed over ranks: one all-reduce of everything at once."""
        flat = torch.cat([*self.load, self.tokens])
        total = all_reduce_sum(flat)
        loads = list(torch.split(total[: -len(self.num_experts)], self.num_experts))
        return loads, total[-len(self.num_experts):]


def load_shares(load: Tensor) -> Tensor:
    """Each expert's share of the routing slots (sums to 1); zeros when nothing was routed."""
    total = load.sum()
    return load / total if total > 0 else torch.zeros_like(load)


def coefficient_of_variation(load: Tensor) -> float:
    """std / mean of the expert loads (population std): 0 when uniform, sqrt(E - 1) when one expert takes all."""
    load = load.double()
    mean = load.mean()
    return float(load.std(unbiased=False) / mean) if mean > 0 else 0.0


def routing_entropy(probs: Tensor, mask: Tensor | None = None) -> tuple[float, float]:
    """(sum over unmasked tokens of the entropy of the routing distribution in nats, number of unmasked tokens);
    divide the sum by the count and by log(E) for a value in [0, 1] (1: every token spread evenly)."""
    from slimtune.moe.losses import token_mask

    weight = token_mask(mask, probs.shape[0], probs.device)
    p = probs.detach().float()
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    return float((entropy * weight).sum()), float(weight.sum())


class DeadExperts:
    """Experts whose share stayed below `threshold` x (1 / E) for `patience` consecutive observed steps, per layer."""

    def __init__(self, num_experts: list[int], threshold: float, patience: int):
        if not 0 < threshold < 1:
            raise SlimtuneError(f"dead-expert threshold={threshold!r} is not valid; valid: a number in (0, 1), a "
                                "share relative to the uniform share 1/E")
        if patience < 1:
            raise SlimtuneError(f"dead-expert patience={patience!r} is not valid; valid: a positive int (steps)")
        self.threshold = threshold
        self.patience = patience
        self.low_steps = [torch.zeros(e, dtype=torch.long) for e in num_experts]

    def observe(self, layer: int, load: Tensor) -> list[int]:
        """Count this step's load of `layer`; returns the experts now dead there (ascending)."""
        if load.sum() <= 0:
            return self.dead(layer)  # nothing routed (an empty step) says nothing about the experts
        shares = load_shares(load.double().cpu())
        low = shares < self.threshold / shares.numel()
        self.low_steps[layer] = torch.where(low, self.low_steps[layer] + 1, torch.zeros_like(self.low_steps[layer]))
        return self.dead(layer)

    def dead(self, layer: int) -> list[int]:
        return [int(i) for i in torch.nonzero(self.low_steps[layer] >= self.patience).flatten()]

    def state_dict(self) -> dict:
        return {"low_steps": [t.clone() for t in self.low_steps]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["low_steps"]
        if [t.numel() for t in saved] != [t.numel() for t in self.low_steps]:
            raise SlimtuneError(f"dead-expert state for experts per layer {[t.numel() for t in saved]} does not fit "
                                f"this model's {[t.numel() for t in self.low_steps]}; valid: a checkpoint of this "
                                "model")
        self.low_steps = [t.clone().long() for t in saved]


@dataclass
class CollapseReport:
    """A layer whose load concentrated: its coefficient of variation, the overloaded and the dead experts."""

    layer: str
    cv: float
    overloaded: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)

    def message(self) -> str:
        parts = [f"load collapse in {self.layer}: coefficient of variation {self.cv:.2f}"]
        if self.overloaded:
            parts.append(f"overloaded experts {self.overloaded}")
        if self.dead:
            parts.append(f"dead experts {self.dead}")
        return "; ".join(parts)


def collapse_report(layer: str, load: Tensor, dead: list[int], max_cv: float, overload: float = 2.0
                    ) -> CollapseReport | None:
    """A CollapseReport when the load's coefficient of variation reaches `max_cv` or experts are dead, else None;
    overloaded experts are those with at least `overload` times the uniform share."""
    cv = coefficient_of_variation(load)
    if cv < max_cv and not dead:
        return None
    shares = load_shares(load.double())
    overloaded = [int(i) for i in torch.nonzero(shares * shares.numel() >= overload).flatten()]
    if math.isnan(cv):  # pragma: no cover - a NaN load would be a bug upstream
        cv = float("inf")
    return CollapseReport(layer, cv, overloaded, list(dead))
