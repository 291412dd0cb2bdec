"""slimtune: compression-aware fine-tuning of large language models for PyTorch Lightning."""

from slimtune.errors import SlimtuneError

__version__ = "0.1.0"
__all__ = ["SlimtuneError", "__version__"]
