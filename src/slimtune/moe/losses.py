"""Load-balancing losses of mixture-of-experts routers, on plain tensors.

Every function takes one router's output for a flat batch of tokens, in the layout transformers' routers use:
`logits` (tokens, experts) and the selected experts `indices` (tokens, top_k), plus an optional `mask` (tokens,) that
is 1 for real tokens and 0 for padding. Padding is excluded from every count, probability mean and token total.

The Switch loss is split into its two factors so it can be formed over more tokens than one forward sees:
`expert_load` (how many routing slots each expert received: no gradient) and `mean_probability` (the differentiable
mean router probability per expert). `switch_loss(load, tokens, mean_prob, top_k)` combines them; a caller that
gathers the load over gradient-accumulation micro-batches and data-parallel ranks (see `slimtune.moe.stats`) passes
the gathered load with the local mean probability, which is the global-batch balancing of Megatron-Core and of Qwen's
"global-batch load balance": the load only enters as a constant weight, so its gathering needs no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimtune.errors import SlimtuneError

__all__ = ["SCORE_FUNCTIONS", "expert_load", "mean_probability", "routing_probabilities", "sequence_balance_loss",
           "switch_loss", "token_mask", "z_loss"]

SCORE_FUNCTIONS = ("softmax", "sigmoid")


def routing_probabilities(logits: Tensor, score: str = "softmax") -> Tensor:
    """Each token's routing distribution over experts, in float32: softmax of the logits, or for sigmoid routers
    (DeepSeek-V3) the sigmoid scores normalised to sum to one per token, as DeepSeek-V3's balance loss uses them."""
    if score == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    if score == "sigmoid":
        scores = torch.sigmoid(logits.float())
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    raise SlimtuneError(f"score={score!r} is not valid; valid: {', '.join(SCORE_FUNCTIONS)}")


def token_mask(mask: Tensor | None, tokens: int, device=None) -> Tensor:
    """A float (tokens,) weight: the flattened mask, or ones when there is none."""
    if mask is None:
        return torch.ones(tokens, device=device)
    flat = mask.reshape(-1)
    if flat.numel() != tokens:
        raise SlimtuneError(f"an attention mask of {flat.numel()} tokens does not fit a router output of {tokens} "
                            "tokens; valid: a mask of the batch the router saw (batch x sequence)")
    return flat.to(device=device, dtype=torch.float32)


def expert_load(indices: Tensor, num_experts: int, mask: Tensor | None = None) -> Tensor:
    """Routing slots each expert received from the unmasked tokens, as float32 (experts,); sums to tokens x top_k.
    No gradient: which experts were chosen is not differentiable."""
    indices = indices.reshape(indices.shape[0], -1)
    weight = token_mask(mask, indices.shape[0], indices.device)
    slots = weight[:, None].expand_as(indices)
    return torch.zeros(num_experts, device=indices.device).scatter_add_(0, indices.reshape(-1).long(),
                                                                         slots.reshape(-1)).detach()


def mean_probability(probs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sum over unmasked tokens of each expert's probability (experts,), number of unmasked tokens); differentiable
    in the first. Returned as sums so they can be added over layers or micro-batches before dividing."""
    weight = token_mask(mask, probs.shape[0], probs.device)
    return (probs.float() * weight[:, None]).sum(dim=0), weight.sum()


def switch_loss(load: Tensor, load_tokens: Tensor | float, prob_sum: Tensor, prob_tokens: Tensor | float,
                top_k: int, normalize_top_k: bool = True) -> Tensor:
    """Switch Transformer's balance loss, top-k aware: E * sum_i f_i * P_i, with f_i = load_i / (tokens x top_k) the
    fraction of routing slots expert i received and P_i = prob_sum_i / tokens its mean router probability.

    It is 1 when load and probability are uniform, whatever top_k (Megatron-Core's normalisation); with
    `normalize_top_k=False` f_i is divided by the tokens only, as transformers' `load_balancing_loss_func` does, and
    the uniform value is top_k. `load` / `load_tokens` may cover more tokens (micro-batches, ranks) than
    `prob_sum` / `prob_tokens`, which carry the gradient.
    """
    num_experts = load.shape[-1]
    load_tokens = torch.as_tensor(load_tokens, dtype=torch.float32, device=load.device).clamp_min(1)
    prob_tokens = torch.as_tensor(prob_tokens, dtype=torch.float32, device=prob_sum.device).clamp_min(1)
    fraction = load / (load_tokens * (top_k if normalize_top_k else 1))
    return num_experts * (fraction.to(prob_sum.device) * (prob_sum / prob_tokens)).sum()


def z_loss(logits: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """ST-MoE's router z-loss as (sum over unmasked tokens of logsumexp(logits)^2, number of unmasked tokens); the
    loss is their quotient (kept apart so several layers or micro-batches add up before dividing)."""
    weight = token_mask(mask, logits.shape[0], logits.device)
    squared = torch.logsumexp(logits.float(), dim=-1).pow(2)
    return (squared * weight).sum(), weight.sum()


def sequence_balance_loss(probs: Tensor, indices: Tensor, num_sequences: int, mask: Tensor | None = None
                          ) -> tuple[Tensor, Tensor]:
    """DeepSeek-V2/V3's sequence-wise balance loss as (sum over sequences of the loss, number of sequences with a real
    token): for each sequence of T real tokens, sum_i f_i * P_i with f_i = E / (top_k T) x (slots of expert i) and
    P_i = the mean of the token's (normalised) routing probability for expert i (`routing_probabilities`).

    `probs` (tokens, experts) and `indices` (tokens, top_k) are the router's flat output for `num_sequences`
    sequences of equal length (the batch x sequence layout of a padded batch).
    """
    tokens, num_experts = probs.shape
    if tokens % num_sequences:
        raise SlimtuneError(f"{tokens} routed tokens do not split into {num_sequences} sequences; valid: the number of "
                            "rows of the batch the router saw")
    top_k = indices.reshape(tokens, -1).shape[1]
    length = tokens // num_sequences
    weight = token_mask(mask, tokens, probs.device).reshape(num_sequences, length)
    chosen = torch.zeros(tokens, num_experts, device=probs.device)
    chosen.scatter_(1, indices.reshape(tokens, top_k).long(), 1.0)
    chosen = chosen.reshape(num_sequences, length, num_experts) * weight[..., None]
    real = weight.sum(dim=1)  # real tokens per sequence
    denominator = real.clamp_min(1)[:, None]
    fraction = chosen.sum(dim=1) * num_experts / (top_k * denominator)
    mean_prob = (probs.float().reshape(num_sequences, length, num_experts) * weight[..., None]).sum(dim=1) / denominator
    per_sequence = (fraction.detach() * mean_prob).sum(dim=1) * (real > 0)
    return per_sequence.sum(), (real > 0).sum().float()
