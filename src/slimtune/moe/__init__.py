"""Mixture-of-experts load balancing on plain tensors: Switch, z- and sequence-level balance losses, aux-loss-free
expert bias, expert-utilisation statistics, router adapters for transformers' MoE families, sparse upcycling.
No Lightning here; `slimtune.callbacks.MoEBalance` wires it into training."""

from slimtune.moe.aux_free import ExpertBias, biased_top_k
from slimtune.moe.losses import (expert_load, mean_probability, routing_probabilities, sequence_balance_loss,
                                 switch_loss, z_loss)
from slimtune.moe.routers import RouterAdapter, RouterRef, find_routers, register_router, unregister_router
from slimtune.moe.stats import (DeadExperts, StepLoad, all_reduce_sum, coefficient_of_variation, collapse_report,
                                load_shares, routing_entropy)

__all__ = ["DeadExperts", "ExpertBias", "RouterAdapter", "RouterRef", "StepLoad", "all_reduce_sum", "biased_top_k",
           "coefficient_of_variation", "collapse_report", "expert_load", "find_routers", "load_shares",
           "mean_probability", "register_router", "routing_entropy", "routing_probabilities",
           "sequence_balance_loss", "switch_loss", "unregister_router", "z_loss"]
