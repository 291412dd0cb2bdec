"""Pure-torch pruning (no Lightning): importance scores, masks at every granularity, the cubic schedule, SparseGPT,
and one-shot pruning of a whole model.

Rooms by job: `scores` (magnitude, Wanda, movement, Taylor), `masks` (per layer, per row, global, N:M, structured;
OWL layer sparsities), `schedule` (Zhu & Gupta's cubic schedule), `sparsegpt` (one layer, optionally with GPTQ
quantization), `drivers` (magnitude / Wanda / SparseGPT over a model, block by block), `shrink` (remove pruned heads and channels
from the shapes and the config).
"""

from slimtune.prune.drivers import ONE_SHOT_METHODS, prune_model_oneshot
from slimtune.prune.masks import (
    GRANULARITIES,
    StructuredGroup,
    apply_mask,
    find_structured_groups,
    global_masks,
    layer_mask,
    nm_mask,
    owl_sparsities,
    parse_nm,
    row_mask,
    sparsity_of,
    structured_masks,
)
from slimtune.prune.schedule import CubicSchedule, check_sparsity
from slimtune.prune.scores import (
    SCORES,
    InputNormAccumulator,
    MovementScore,
    TaylorScore,
    magnitude_score,
    wanda_score,
)
from slimtune.prune.shrink import shrink_model
from slimtune.prune.sparsegpt import SparseGPT, SparseGPTResult, sparsegpt_prune_linear

__all__ = [
    "GRANULARITIES", "ONE_SHOT_METHODS", "SCORES", "CubicSchedule", "InputNormAccumulator", "MovementScore",
    "SparseGPT", "SparseGPTResult", "StructuredGroup", "TaylorScore", "apply_mask", "check_sparsity",
    "find_structured_groups", "global_masks", "layer_mask", "magnitude_score", "nm_mask", "owl_sparsities",
    "parse_nm", "prune_model_oneshot", "row_mask", "shrink_model", "sparsegpt_prune_linear", "sparsity_of", "structured_masks",
    "wanda_score",
]
