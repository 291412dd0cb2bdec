"""What a model costs to store: trainable and total parameters, stored bits per parameter, size on disk/in memory."""

from __future__ import annotations

from torch import nn

from slimtune.models.loading import logical_numel, stored_numel

_QUANT_STATE_TENSORS = ("absmax", "code", "offset")


def _quant_state_bits(quant_state) -> int:
    bits = 0
    for name in _QUANT_STATE_TENSORS:
        tensor = getattr(quant_state, name, None)
        if tensor is not None and hasattr(tensor, "numel"):
            bits += tensor.numel() * tensor.element_size() * 8
    nested = getattr(quant_state, "state2", None)
    if nested is not None:
        bits += _quant_state_bits(nested)
    return bits


def tensor_storage_bits(tensor) -> int:
    """Bits a parameter occupies as stored, including bitsandbytes' quantization statistics."""
    bits = stored_numel(tensor) * tensor.element_size() * 8
    quant_state = getattr(tensor, "quant_state", None)
    if quant_state is not None:
        bits += _quant_state_bits(quant_state)
    scb = getattr(tensor, "SCB", None)  # LLM.int8 row scales
    if scb is not None:
        bits += scb.numel() * scb.element_size() * 8
    return bits


def compression_stats(model: nn.Module) -> dict[str, float]:
    """Counts each tensor once (tied embeddings are one tensor). `quantized_bits_per_param` covers quantized layers."""
    from slimtune.quant.bnb4bit import unpack_4bit

    unpack_4bit(model)  # a CPU-packed 4-bit layer holds bf16 scales and no double quantization: count what is stored
    seen: set[int] = set()
    trainable = total = stored_bits = 0
    quant_params = quant_bits = 0
    for module in model.modules():
        own_stats = getattr(module, "stored_bits", None)
        if callable(own_stats) and hasattr(module, "logical_numel"):  # slimtune's own quantized layers
            if id(module) not in seen:
                seen.add(id(module))
                n, b = int(module.logical_numel()), int(own_stats())
                total, stored_bits, quant_params, quant_bits = total + n, stored_bits + b, quant_params + n, quant_bits + b
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(tensor) in seen or tensor is None:
                continue
            seen.add(id(tensor))
            bits = tensor_storage_bits(tensor)
            stored_bits += bits
            if not isinstance(tensor, nn.Parameter):
                continue  # buffers (rotary tables, masks) cost storage but are no parameters
            n = logical_numel(tensor)
            total += n
            if tensor.requires_grad:
                trainable += n
            if getattr(tensor, "quant_state", None) is not None or getattr(tensor, "SCB", None) is not None:
                quant_params += n
                quant_bits += bits
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "bits_per_param": stored_bits / max(total, 1),
        "quantized_params": quant_params,
        "quantized_bits_per_param": quant_bits / quant_params if quant_params else float("nan"),
        "size_mb": stored_bits / 8 / 2**20,
    }
