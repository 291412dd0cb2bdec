"""Compact students made from the teacher: a copy keeping only some of its decoder layers (weights copied), e.g. every
other one, the usual start for distilling a model into a shallower one. Pure torch / transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from slimtune.errors import SlimtuneError

__all__ = ["decoder_layers", "drop_layers"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (`model.get_decoder().layers`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SlimtuneError(f"{type(model).__name__} has no decoder layers slimtune can find; valid: a transformers "
                            "causal LM whose decoder keeps its blocks in .layers (Llama, Mistral, Qwen2, ...)")
    return layers


def drop_layers(model: nn.Module, keep: Sequence[int] | str = "every_other") -> nn.Module:
    """A copy of `model` with only the decoder layers `keep` (indices in order, or `every_other`: 0, 2, 4, ...), their
    weights copied, the config's layer count (and per-layer lists) updated; the original is untouched."""
    count = len(decoder_layers(model))
    if keep == "every_other":
        keep = list(range(0, count, 2))
    if (isinstance(keep, str) or not isinstance(keep, Sequence) or not keep
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep)):
        raise SlimtuneError(f"drop_layers keep={keep!r} is not valid; valid: 'every_other' or a list of layer indices")
    bad = [i for i in keep if not 0 <= i < count]
    if bad or len(set(keep)) != len(keep) or list(keep) != sorted(keep):
        raise SlimtuneError(f"drop_layers keep={list(keep)!r} is not valid; valid: increasing, distinct indices in "
                            f"0..{count - 1}")
    student = copy.deepcopy(model)
    layers = decoder_layers(student)
    kept = nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # the index each attention layer reads its KV cache slot by
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    student.get_decoder().layers = kept
    config = student.config.get_text_config() if hasattr(student.config, "get_text_config") else student.config
    config.num_hidden_layers = len(keep)
    for name in ("layer_types",):  # per-layer settings (sliding / full attention) follow their layers
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == count:
            setattr(config, name, [values[i] for i in keep])
    return student
