"""Aux-loss-free load balancing (DeepSeek-V3): a per-expert bias added to the router scores for choosing the top-k
experts only (the experts' output weights still come from the unbiased scores, so no gradient changes), moved after
each optimizer step by `rate` times the sign of the load error: up for experts below the mean load, down above it.
Pure torch."""

from __future__ import annotations

import torch
from torch import Tensor

from slimtune.errors import SlimtuneError

__all__ = ["ExpertBias", "biased_top_k"]


def biased_top_k(scores: Tensor, bias: Tensor, top_k: int) -> Tensor:
    """The indices (tokens, top_k) of the largest `scores + bias`; the bias only chooses, it weights nothing."""
    return torch.topk(scores.detach().float() + bias.to(scores.device, torch.float32), top_k, dim=-1).indices


class ExpertBias:
    """One bias vector per router layer (float32, on the CPU here; routers read a copy on their device)."""

    def __init__(self, num_experts: list[int], rate: float):
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate > 0:
            raise SlimtuneError(f"bias update rate={rate!r} is not valid; valid: a positive number such as 1e-3")
        self.rate = float(rate)
        self.bias = [torch.zeros(e, dtype=torch.float32) for e in num_experts]

    def update(self, loads: list[Tensor]) -> None:
        """One step: bias_i += rate * sign(mean load - load_i) for each layer's expert loads (summed over the step's
        micro-batches and ranks, so every rank moves its bias identically). Layers that routed nothing keep theirs."""
        for bias, load in zip(self.bias, loads):
            load = load.double().cpu()
            if load.sum() > 0:
                bias += self.rate * torch.sign(load.mean() - load).float()

    def state_dict(self) -> dict:
        return {"rate": self.rate, "bias": [b.clone() for b in self.bias]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["bias"]
        if [b.numel() for b in saved] != [b.numel() for b in self.bias]:
            raise SlimtuneError(f"expert bias for experts per layer {[b.numel() for b in saved]} does not fit this "
                                f"model's {[b.numel() for b in self.bias]}; valid: a checkpoint of this model")
        self.bias = [b.clone().float() for b in saved]
