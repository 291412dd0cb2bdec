"""Lightning wiring: the fine-tuning LightningModule, the data module, and extra loss terms (`loss_terms`)."""

from slimtune.lightning.datamodule import CausalLMDataModule
from slimtune.lightning.loss_terms import (
    LossTermProvider,
    attach_loss_terms,
    capture_outputs,
    detach_loss_terms,
    loss_providers,
)
from slimtune.lightning.module import CausalLMModule, build_optimizer

__all__ = ["CausalLMDataModule", "CausalLMModule", "LossTermProvider", "attach_loss_terms", "build_optimizer",
           "capture_outputs", "detach_loss_terms", "loss_providers"]
