"""Model sources (hub id, local folder, GGUF file, config), bitsandbytes quantization, LoRA, and export."""

from slimtune.models.loading import (
    build_skeleton,
    count_parameters,
    linear_module_names,
    load_base_model,
    load_config,
    load_model,
    load_tokenizer,
    prepare_for_training,
    resolve_source,
)
from slimtune.models.merge import merge_to_dense, save_adapter, save_merged

__all__ = [
    "build_skeleton",
    "count_parameters",
    "linear_module_names",
    "load_base_model",
    "load_config",
    "load_model",
    "load_tokenizer",
    "merge_to_dense",
    "prepare_for_training",
    "resolve_source",
    "save_adapter",
    "save_merged",
]
