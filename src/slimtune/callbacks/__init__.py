"""slimtune's Lightning callbacks; each works in `lightning.pytorch` and `pytorch_lightning` Trainers alike."""

from slimtune.callbacks.compression_stats import CompressionStats
from slimtune.callbacks.distillation import Distillation
from slimtune.callbacks.moe import MoEBalance
from slimtune.callbacks.outliers import ActivationOutlierMonitor
from slimtune.callbacks.perplexity import PerplexityEvaluation
from slimtune.callbacks.pruning import GradualPruning, OneShotPruning
from slimtune.callbacks.ptq import PostTrainingQuantization

__all__ = ["ActivationOutlierMonitor", "CompressionStats", "Distillation", "GradualPruning", "MoEBalance", "OneShotPruning",
           "PerplexityEvaluation", "PostTrainingQuantization"]
