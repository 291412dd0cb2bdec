"""A quantized layer as plain tensors and back: what a checkpoint carries so a resumed run rebuilds the quantized base
without calibrating again (slimtune's checkpoints hold only trainable tensors)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.bnb4bit import guard_4bit, unpack_4bit
from slimtune.quant.grid import QuantSpec
from slimtune.quant.layers import QuantLinear

__all__ = ["LAYER_KINDS", "is_quantized_layer", "layer_state", "rebuild_layer"]

LAYER_KINDS = ("quant_linear", "nf4")


def is_quantized_layer(module: nn.Module) -> bool:
    """A slimtune QuantLinear or a bitsandbytes layer."""
    return isinstance(module, QuantLinear) or type(module).__module__.startswith("bitsandbytes")


def layer_state(layer: nn.Module) -> dict[str, Any]:
    """Everything needed to rebuild a quantized layer (`QuantLinear` or bitsandbytes `Linear4bit`), as CPU tensors."""
    if isinstance(layer, QuantLinear):
        from slimtune.quant.smoothquant import W8A8Linear

        extra = {"activations": "int8_per_token", "int8_matmul": layer.int8_matmul} \
            if isinstance(layer, W8A8Linear) else {}
        return {
            **extra,
            "kind": "quant_linear",
            "in_features": layer.in_features, "out_features": layer.out_features,
            "bits": layer.spec.bits, "group_size": layer.spec.group_size, "symmetric": layer.spec.symmetric,
            "act_order": layer.act_order,
            "dtype": str(layer.bias.dtype if layer.bias is not None else torch.float32).removeprefix("torch."),
            "tensors": {k: v.detach().cpu() for k, v in layer.state_dict().items()},
        }
    unpack_4bit(layer)  # the stored layout, never bitsandbytes' CPU-packed one
    weight = layer.weight
    return {
        "kind": "nf4",
        "in_features": layer.in_features, "out_features": layer.out_features,
        "compute_dtype": str(layer.compute_dtype or torch.float32).removeprefix("torch."),
        "data": weight.data.detach().cpu(),
        "quant_state": {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                        for k, v in weight.quant_state.as_dict(packed=True).items()},
        "bias": None if layer.bias is None else layer.bias.detach().cpu(),
    }


def rebuild_layer(entry: Mapping[str, Any], device: torch.device) -> nn.Module:
    """The layer `layer_state` described, on `device`."""
    if entry["kind"] == "quant_linear":
        tensors = entry["tensors"]
        kind = QuantLinear
        extra = {}
        if entry.get("activations") == "int8_per_token":
            from slimtune.quant.smoothquant import W8A8Linear

            kind, extra = W8A8Linear, {"int8_matmul": bool(entry.get("int8_matmul", False))}
        layer = kind(
            entry["in_features"], entry["out_features"],
            QuantSpec(entry["bits"], entry["group_size"], entry["symmetric"]),
            bias=tensors.get("bias") is not None, has_g_idx=tensors.get("g_idx") is not None,
            act_order=entry["act_order"], dtype=getattr(torch, entry["dtype"]),
            scale_dtype=tensors["scales"].dtype, device="cpu", **extra,
        )
        layer.load_state_dict({k: v for k, v in tensors.items() if v is not None})
        return layer.to(device)
    if entry["kind"] == "nf4":
        import bitsandbytes as bnb

        stats = dict(entry["quant_state"])
        layer = bnb.nn.Linear4bit(entry["in_features"], entry["out_features"], bias=entry["bias"] is not None,
                                  compute_dtype=getattr(torch, entry["compute_dtype"]), device="meta")
        layer.weight = bnb.nn.Params4bit.from_prequantized(entry["data"].to(device), stats, requires_grad=False,
                                                           device=device)
        if entry["bias"] is not None:
            layer.bias = nn.Parameter(entry["bias"].to(device), requires_grad=False)
        guard_4bit(layer)
        return layer
    raise SlimtuneError(f"quantized layer kind {entry['kind']!r} is not valid; valid: {', '.join(LAYER_KINDS)}")
