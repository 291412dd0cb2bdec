"""A base class that both Lightning packages accept.

Lightning ships twice: `lightning.pytorch` (the unified package) and `pytorch_lightning`, and each Trainer refuses
callbacks derived from the other's `Callback`. The two classes are the same code, so slimtune's callbacks derive from
every one that is installed and work in either Trainer.
"""

from __future__ import annotations

from typing import Any


def _callback_bases() -> tuple[type, ...]:
    bases = []
    try:
        from lightning.pytorch import Callback as UnifiedCallback

        bases.append(UnifiedCallback)
    except ImportError:  # pragma: no cover - only pytorch_lightning installed
        pass
    try:
        from pytorch_lightning import Callback as ClassicCallback

        bases.append(ClassicCallback)
    except ImportError:
        pass
    if not bases:  # pragma: no cover
        raise ImportError("slimtune's callbacks need lightning (pip install lightning) or pytorch_lightning")
    return tuple(bases)


SlimtuneCallback: type = type("SlimtuneCallback", _callback_bases(), {"__module__": __name__, "__doc__": __doc__})


def unwrap_model(pl_module: Any):
    """The Hugging Face model inside a LightningModule (`.model`), or the module itself."""
    return getattr(pl_module, "model", pl_module)


def log_to_loggers(trainer, metrics: dict[str, float]) -> None:
    """Log outside a training step (fit start/end), where `LightningModule.log` is not allowed."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
