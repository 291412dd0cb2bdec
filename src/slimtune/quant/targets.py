"""The layers a quantizer works on: selection (by `slimtune.select`'s one rule), swapping a layer in place, and
calibrating a PEFT model's base alone."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.select import ALL_LINEAR, base_model, select_layers

__all__ = ["adapters_disabled", "check_float_linear", "find_linear_layers", "layer_device", "set_module"]


def find_linear_layers(
    model: nn.Module,
    targets: str | Sequence[str] = ALL_LINEAR,
    exclude: Sequence[str] = ("lm_head",),
) -> dict[str, nn.Module]:
    """Target layers of ``model`` by module path (relative to the plain model), in module order.

    Args:
        targets: ``"all-linear"`` (every linear layer: ``nn.Linear`` and subclasses such as bitsandbytes layers,
            ``QuantLinear``, transformers ``Conv1D``), or name patterns matched by :mod:`slimtune.select`'s rule: a
            plain name matches a layer name it equals or ends with after a dot (``"q_proj"``, ``"self_attn.q_proj"``),
            anything else is a regex over the full name (``r"model\\.layers\\.[0-3]\\..*_proj"``).
        exclude: patterns (same rule) removed from the result.

    In a PEFT model a LoRA layer stands for the layer it wraps: the key is that layer's path
    (``...q_proj.base_layer``), the patterns match the plain name (``...q_proj``).

    Raises:
        SlimtuneError: a pattern matches no layer (the message lists the valid names), or only excluded ones.
    """
    if not isinstance(targets, str):
        if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise SlimtuneError(
                f"targets={targets!r} is not valid; valid: 'all-linear' or a non-empty list of name patterns"
            )
    return {ref.path: ref.layer for ref in select_layers(model, targets, exclude).values()}


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path` inside `root` (the module it replaces is dropped)."""
    parent_name, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def layer_device(module: nn.Module) -> torch.device:
    """Where a module's tensors are (its first non-meta parameter or buffer); the CPU for an empty module."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def check_float_linear(name: str, module: nn.Module, method: str) -> None:
    """A layer a quantizer reads must be a float `nn.Linear` (not a bitsandbytes or already-quantized layer)."""
    weight = getattr(module, "weight", None)
    ok = (
        isinstance(module, nn.Linear)
        and not type(module).__module__.startswith("bitsandbytes")
        and isinstance(weight, torch.Tensor)
        and weight.is_floating_point()
        and weight.dim() == 2
    )
    if not ok:
        raise SlimtuneError(f"{method} needs nn.Linear weights; layer {name} is {type(module).__name__}")


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base alone: PEFT layers skip their adapters (a flag only; no requires_grad change), e.g. to calibrate
    a quantizer on what the frozen base computes."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - PEFT is a dependency
        yield
        return
    layers = [m for m in base_model(model).modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "_disable_adapters")]
    previous = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, flag in zip(layers, previous):
            m._disable_adapters = flag
