"""Importance scores of a weight matrix ``W [out, in]``: a higher score means keep the weight.

* magnitude: ``|W|``;
* Wanda (Sun et al., 2023): ``|W| * ||X_j||_2``, the weight times the L2 norm of its input channel ``j`` over the
  calibration (or training) tokens, from :class:`InputNormAccumulator`;
* movement (Sanh et al., 2020): ``-sum_t W_t * grad_t``, accumulated over training steps by :class:`MovementScore`
  (weights moving away from zero score high);
* first-order Taylor (Molchanov et al., 2019): ``|W * grad|``, the first-order estimate of the loss change when the
  weight is set to zero, averaged over the steps it is accumulated on.
"""

from __future__ import annotations

import torch

from slimtune.errors import SlimtuneError

SCORES = ("magnitude", "wanda", "movement", "taylor")
NEEDS_ACTIVATIONS = ("wanda",)
NEEDS_GRADIENTS = ("movement", "taylor")

__all__ = ["InputNormAccumulator", "MovementScore", "NEEDS_ACTIVATIONS", "NEEDS_GRADIENTS", "SCORES", "TaylorScore",
           "magnitude_score", "wanda_score"]


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        desc = f"{tuple(weight.shape)} {weight.dtype}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise SlimtuneError(f"weight {desc} is not valid; valid: a 2-D float [out, in] tensor")


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """``|W|`` in float32."""
    _check_weight(weight)
    return weight.detach().float().abs()


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||_2`` with ``input_norm [in]`` the per-input-channel L2 norm of the layer's inputs."""
    _check_weight(weight)
    if not isinstance(input_norm, torch.Tensor) or tuple(input_norm.shape) != (weight.shape[1],):
        shape = tuple(input_norm.shape) if isinstance(input_norm, torch.Tensor) else type(input_norm).__name__
        raise SlimtuneError(f"input_norm shape={shape} is not valid; valid: [{weight.shape[1]}] (one per input channel)")
    return weight.detach().float().abs() * input_norm.to(weight.device, torch.float32).unsqueeze(0)


class InputNormAccumulator:
    """Sum of squared inputs per input channel of one layer; ``norm()`` is Wanda's ``||X_j||_2`` over all tokens seen."""

    def __init__(self, in_features: int) -> None:
        self.in_features = int(in_features)
        self.sum_sq: torch.Tensor | None = None
        self.n_tokens = 0

    @torch.no_grad()
    def add_batch(self, inputs: torch.Tensor) -> None:
        if inputs.shape[-1] != self.in_features:
            raise SlimtuneError(f"inputs shape={tuple(inputs.shape)} is not valid; valid: [..., {self.in_features}]")
        x = inputs.detach().reshape(-1, self.in_features).float()
        squared = x.square().sum(dim=0)
        self.sum_sq = squared if self.sum_sq is None else self.sum_sq.add_(squared.to(self.sum_sq.device))
        self.n_tokens += x.shape[0]

    def norm(self) -> torch.Tensor:
        if self.sum_sq is None:
            raise SlimtuneError("Wanda needs layer inputs and this layer received none; valid: calibration data or "
                                "training batches before the first pruning step")
        return self.sum_sq.sqrt()

    def state_dict(self) -> dict:
        return {"sum_sq": self.sum_sq, "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.sum_sq, self.n_tokens = state["sum_sq"], int(state["n_tokens"])


class MovementScore:
    """Movement pruning's score ``S = -sum_t W_t * grad_t`` of one weight, accumulated at each optimizer step."""

    def __init__(self) -> None:
        self.score: torch.Tensor | None = None
        self.n_steps = 0

    @torch.no_grad()
    def add(self, weight: torch.Tensor, grad: torch.Tensor) -> None:
        term = -(weight.detach().float() * grad.detach().float())
        self.score = term if self.score is None else self.score.add_(term)
        self.n_steps += 1

    def value(self) -> torch.Tensor:
        if self.score is None:
            raise SlimtuneError("movement score has no gradient yet; valid: start pruning after at least one step "
                                "(start_step >= 1)")
        return self.score

    def state_dict(self) -> dict:
        return {"score": self.score, "n_steps": self.n_steps}

    def load_state_dict(self, state: dict) -> None:
        self.score, self.n_steps = state["score"], int(state["n_steps"])


class TaylorScore(MovementScore):
    """First-order Taylor importance ``|W * grad|``, averaged over the steps it was accumulated on."""

    @torch.no_grad()
    def add(self, weight: torch.Tensor, grad: torch.Tensor) -> None:
        term = (weight.detach().float() * grad.detach().float()).abs()
        self.score = term if self.score is None else self.score.add_(term)
        self.n_steps += 1

    def value(self) -> torch.Tensor:
        if self.score is None:
            raise SlimtuneError("taylor score has no gradient yet; valid: start pruning after at least one step "
                                "(start_step >= 1)")
        return self.score / self.n_steps
