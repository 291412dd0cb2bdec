"""Trainable parameters, stored bits per parameter and model size, logged at fit start and end."""

from __future__ import annotations

from typing import Any

from slimtune.callbacks._base import SlimtuneCallback, check_bool, check_model_arg, check_name, log_to_loggers
from slimtune.models.stats import compression_stats


class CompressionStats(SlimtuneCallback):
    """Logs `compression/*` (trainable_params, total_params, bits_per_param, quantized_bits_per_param, size_mb).

    Quantized weights count at their logical size (a 4-bit matrix of n weights is n parameters) and at their stored
    size, quantization statistics included, so NF4 with double quantization shows 4.127 bits per quantized parameter.
    Only the model counts, not other modules the LightningModule holds (a teacher, a head, metrics).

    Args:
        name: prefix of the logged metrics (`<name>/trainable_params`, ...) and of the run report's entries.
        verbose: print one line with the counts at fit start.
        model: the model to measure: an `nn.Module`, or the name / dotted path of the LightningModule's attribute
            holding it (`"lm"`). Default: `pl_module.model`, else the only transformers / PEFT model it holds.
    """

    def __init__(self, name: str = "compression", verbose: bool = True, model: Any = None):
        self.name = check_name(name, "name", "CompressionStats")
        self.verbose = check_bool(verbose, "verbose", "CompressionStats")
        self.model = check_model_arg(model, "CompressionStats")
        self.stats: dict[str, float] = {}

    def measure(self, trainer, pl_module) -> dict[str, float]:
        self.stats = compression_stats(self.model_for(pl_module))
        numeric = {f"{self.name}/{k}": float(v) for k, v in self.stats.items() if v == v}  # NaN: no quantized layer
        log_to_loggers(trainer, numeric)
        return self.stats

    def on_fit_start(self, trainer, pl_module) -> None:
        stats = self.measure(trainer, pl_module)
        if self.verbose and trainer.is_global_zero:
            print(
                f"[slimtune] trainable {stats['trainable_params']:,} of {stats['total_params']:,} parameters "
                f"({stats['trainable_percent']:.2f}%), {stats['bits_per_param']:.3f} bits/param stored, "
                f"{stats['size_mb']:.1f} MiB"
            )

    def on_fit_end(self, trainer, pl_module) -> None:
        self.measure(trainer, pl_module)

    def report(self) -> dict[str, Any]:
        """`<name>_<stat>` for each statistic of the last measurement."""
        return {f"{self.name}_{k}": v for k, v in self.stats.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"stats": dict(self.stats)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stats = dict(state_dict.get("stats", {}))
