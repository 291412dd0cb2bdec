"""Lightning wiring: the fine-tuning LightningModule and the data module."""

from slimtune.lightning.datamodule import CausalLMDataModule
from slimtune.lightning.module import CausalLMModule, build_optimizer

__all__ = ["CausalLMDataModule", "CausalLMModule", "build_optimizer"]
