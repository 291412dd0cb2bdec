"""Knowledge distillation, pure torch: logit losses (forward/reverse KL, generalized JSD, total variation, skew KL;
temperature, top-k, chunked over the sequence; `losses`), hidden-state losses (`hidden`), the teacher (`teacher`), a
teacher-logit cache (`cache`), on-policy sampling (`on_policy`) and synthetic data (`synthetic`). Lightning wiring is
in `slimtune.callbacks.distillation`."""

from slimtune.distill.hidden import HIDDEN_LOSSES, HiddenStateLoss, check_layer_pairs, uniform_layer_map
from slimtune.distill.losses import (
    DIVERGENCES,
    HeadInput,
    KDSpec,
    TopKLogprobs,
    check_spec,
    divergence,
    kd_loss,
    kd_positions,
    mix_with_ce,
)

__all__ = ["DIVERGENCES", "HIDDEN_LOSSES", "HeadInput", "HiddenStateLoss", "KDSpec", "TopKLogprobs", "check_layer_pairs",
           "check_spec", "divergence", "kd_loss", "kd_positions", "mix_with_ce", "uniform_layer_map"]
