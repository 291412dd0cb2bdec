"""Export: the PEFT adapter, and a merged dense model that plain transformers loads.

PEFT can merge LoRA into a 4-bit base, but the merged weight is re-quantized, which adds the rounding error PEFT warns
about. slimtune instead dequantizes each base weight, adds the LoRA delta in float32 and writes a dense model: the
merged model computes what the trained adapter model computed, up to float rounding.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 weight a (possibly quantized: bitsandbytes, slimtune) linear layer computes with."""
    if hasattr(layer, "dequantized_weight"):  # slimtune's QuantLinear (packed codes, no `.weight`)
        return layer.dequantized_weight().float()
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit: exact, from the unpacked layout (see slimtune.quant.bnb4bit)
        from slimtune.quant.bnb4bit import dequantize_4bit, unpack_4bit

        unpack_4bit(layer)
        return dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    scb = getattr(weight, "SCB", None)
    if scb is not None and weight.dtype == torch.int8:  # bitsandbytes LLM.int8 (row-wise absmax)
        return weight.data.float() * scb.float().unsqueeze(1) / 127.0
    return weight.detach().float()


def _base_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dense state dict (names as the plain transformers model has them) with LoRA deltas folded in."""
    from peft.tuners.lora import LoraLayer

    base = _base_of(model)
    state: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if type(module).__name__ == "ParamWrapper":
            if not any(type(parent).__name__ == "ParamWrapper" for parent in _ancestors(base, name)):
                state.update(_merged_parameters(name, module, dtype))
            continue
        if isinstance(module, LoraLayer):
            weight = dequantized_weight(module.get_base_layer())
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).float()
            weight = _keep_pruned_zeros(module.get_base_layer(), weight)
            state[f"{name}.weight"] = weight.to(dtype)
            bias = getattr(module.get_base_layer(), "bias", None)
            if bias is not None:
                state[f"{name}.bias"] = bias.detach().to(dtype)
            continue
        if any(isinstance(parent, LoraLayer) for parent in _ancestors(base, name)):
            continue
        direct = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        if not direct:
            continue
        if isinstance(module, nn.Linear) or hasattr(module, "dequantized_weight"):
            # A linear layer, quantized or not, becomes weight (+ bias); quantization buffers are not carried over.
            state[f"{name}.weight"] = dequantized_weight(module).to(dtype)
            direct = {"bias": direct["bias"]} if direct.get("bias") is not None else {}
        for key, tensor in direct.items():
            if tensor is None:
                continue
            state[f"{name}.{key}" if name else key] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
    return state


def _merged_parameters(name: str, wrapper: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's LoRA on parameters (`target_parameters`, and what all-linear adds on MoE models: a router's weight, the
    fused 3-D expert weights): one ParamWrapper per parameter, nested when a module has several. Each parameter of
    the innermost module plus its wrapper's delta, the module's other tensors as they are."""
    deltas: dict[str, torch.Tensor] = {}
    module = wrapper
    while type(module).__name__ == "ParamWrapper":
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                delta = module.get_delta_weight(adapter).float()
                deltas[module.parameter_name] = deltas.get(module.parameter_name, 0) + delta
        module = module.base_layer
    state = {}
    for key, tensor in (dict(module.named_parameters()) | dict(module.named_buffers())).items():
        value = tensor.detach().float() + deltas[key] if key in deltas else tensor.detach()
        state[f"{name}.{key}"] = value.to(dtype) if value.is_floating_point() else value
    return state


def _keep_pruned_zeros(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A pruned base layer (slimtune.callbacks.pruning) carries its keep-mask: the adapter's delta is masked, so the
    merged weight keeps the pruned zeros."""
    mask = getattr(layer, "slimtune_prune_mask", None)
    return weight if mask is None else weight * mask.to(weight.device, weight.dtype)


def _ancestors(root: nn.Module, name: str):
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield root.get_submodule(".".join(parts[:i]))


def dense_config(model: nn.Module, dtype: torch.dtype):
    config = _base_of(model).config.__class__.from_dict(_base_of(model).config.to_dict())
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    config.use_cache = True
    return config


def merge_to_dense(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain transformers model (no PEFT, no quantization) holding base + LoRA."""
    from transformers import AutoModelForCausalLM

    state = merged_state_dict(model, dtype)
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(dense_config(model, dtype), dtype=dtype)
    dense.load_state_dict(state, strict=False, assign=True)
    missing = [k for k, v in dense.state_dict().items() if v.is_meta]
    if getattr(dense.config, "tie_word_embeddings", False):
        dense.tie_weights()
        missing = [k for k, v in dense.state_dict().items() if v.is_meta]
    if missing:
        raise RuntimeError(f"merged model is missing weights {missing[:5]}: unsupported layer layout")
    return dense.eval()


@contextmanager
def atomic_directory(target: str | Path):
    """Write into a temporary sibling and rename into place: an error leaves nothing half-written at `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)


def save_merged(model: nn.Module, directory: str | Path, tokenizer=None, dtype: torch.dtype = torch.float32) -> Path:
    dense = merge_to_dense(model, dtype)
    with atomic_directory(directory) as tmp:
        dense.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)
