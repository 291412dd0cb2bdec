"""slimtune's Lightning callbacks; each works in `lightning.pytorch` and `pytorch_lightning` Trainers alike."""

from slimtune.callbacks.compression_stats import CompressionStats
from slimtune.callbacks.perplexity import PerplexityEvaluation

__all__ = ["CompressionStats", "PerplexityEvaluation"]
