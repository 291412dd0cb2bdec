"""Which layers a method works on: one matching rule for every method (quantization, LoRA targets, monitors, and the
method families to come). Pure torch (PEFT only to see through its wrappers); no Lightning.

**Names.** A layer's name is its module path in the plain model: inside a PEFT model, the path within the base model
(`model.layers.0.self_attn.q_proj`, never `base_model.model.` or `.base_layer`), and a LoRA layer stands for the layer
it wraps. `LayerRef.path` is where the layer itself sits (`....q_proj.base_layer` under LoRA).

**The rule.** A pattern matches a name when

* the pattern is a plain name (letters, digits and `_`, dot-separated) and equals the name or a dot-bounded suffix of
  it: `q_proj` and `self_attn.q_proj` match `model.layers.0.self_attn.q_proj`; `proj` and `_proj` match nothing there;
* otherwise the pattern is a regular expression that must match the whole name: `model\\.layers\\.[0-3]\\..*_proj`.

For plain names this is PEFT's rule for a list of `target_modules`, so LoRA targets mean what they mean to PEFT.
`all-linear` selects every linear layer (`nn.Linear` and subclasses such as bitsandbytes layers, slimtune's
`QuantLinear`, transformers' `Conv1D`). Patterns match any layer with a weight matrix (a leaf module with a weight of
2 or more dimensions, embeddings excepted), so a pattern naming, say, an `nn.Conv1d` selects it and the method refuses
it by name instead of skipping it silently. Exclude patterns follow the same rule and are taken out afterwards. A
pattern matching no layer, a pattern matching only excluded layers, an invalid regular expression and a selection the
excludes leave empty are each a one-line SlimtuneError listing the valid names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.errors import SlimtuneError

ALL_LINEAR = "all-linear"
_PLAIN_NAME = re.compile(r"\w+(?:\.\w+)*")

__all__ = ["ALL_LINEAR", "LayerRef", "base_model", "is_linear_like", "is_weight_layer", "linear_layers",
           "name_matches", "select_layers", "select_names", "weight_layers"]


def is_plain_name(pattern: str) -> bool:
    """A pattern made of names only (`q_proj`, `self_attn.q_proj`), matched by equality or dot-bounded suffix."""
    return _PLAIN_NAME.fullmatch(pattern) is not None


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def name_matches(pattern: str, name: str) -> bool:
    """Whether `pattern` matches the layer name `name` (see the module docstring); raises on an invalid regex."""
    if is_plain_name(pattern):
        return name == pattern or name.endswith("." + pattern)
    try:
        return _regex(pattern).fullmatch(name) is not None
    except re.error as err:
        raise SlimtuneError(f"layer pattern {pattern!r} is not a valid regular expression ({err}); valid: a layer "
                            "name such as q_proj or self_attn.q_proj, or a regex over full names") from None


def _short_names(names: Iterable[str]) -> str:
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(n.rsplit(".", 1)[-1], None)
    return ", ".join(seen)


def _as_patterns(value: str | Sequence[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or ())


def select_names(names: Iterable[str], targets: str | Sequence[str] = ALL_LINEAR, exclude: Sequence[str] = (), *,
                 what: str = "target pattern", setting: str = "targets",
                 linear: Iterable[str] | None = None) -> list[str]:
    """The `names` that `targets` (`all-linear` or patterns) pick, minus those `exclude` matches, in `names`' order.

    `all-linear` picks the names in `linear` (default: all of `names`). `what` names one pattern in errors
    ("PostTrainingQuantization targets pattern"), `setting` the whole setting.
    """
    names = list(names)
    exclude = _as_patterns(exclude)
    for pattern in [*exclude, *([] if targets == ALL_LINEAR else _as_patterns(targets))]:
        name_matches(pattern, "")  # an invalid regex fails here, naming itself, before anything else
    excluded = {n for n in names if any(name_matches(p, n) for p in exclude)}
    if targets == ALL_LINEAR:
        chosen = set(names if linear is None else linear) - excluded
    else:
        chosen = set()
        for pattern in _as_patterns(targets):
            hits = {n for n in names if name_matches(pattern, n)}
            if not hits:
                example = f" (e.g. {names[0]!r})" if names else ""
                raise SlimtuneError(f"{what} {pattern!r} matches no layer; valid: names ending in one of "
                                    f"{_short_names(names)}{example} or a regex over full names")
            if hits <= excluded:
                raise SlimtuneError(f"{what} {pattern!r} only matches excluded layers (exclude={exclude}); valid: "
                                    "remove them from exclude, or a pattern matching other layers")
            chosen |= hits - excluded
    if not chosen:
        raise SlimtuneError(f"{setting}={targets!r} with exclude={exclude} leaves no layer; valid: fewer exclude "
                            f"patterns (layers: {_short_names(names)})")
    return [n for n in names if n in chosen]


# --------------------------------------------------------------------------- layers of a model


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear and its subclasses (bitsandbytes layers), slimtune's QuantLinear, and transformers' Conv1D."""
    from slimtune.quant.layers import QuantLinear  # here: slimtune.quant itself selects layers with this module

    if isinstance(module, (nn.Linear, QuantLinear)):
        return True
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def is_weight_layer(module: nn.Module) -> bool:
    """A layer a pattern may name: linear-like, or a leaf module with a weight of 2+ dimensions (a convolution, ...);
    not an embedding."""
    if is_linear_like(module):
        return True
    if isinstance(module, nn.Embedding) or next(module.children(), None) is not None:
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2


def _tuner_types() -> tuple[type, ...]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - PEFT is a dependency
        return ()
    return (BaseTunerLayer,)


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (its LoRA layers still in place), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass(frozen=True)
class LayerRef:
    """A linear layer of a model: `name` (the plain name the rule matches), `path` (where the layer sits, relative to
    `base_model(model)`), the layer itself, and the PEFT layer wrapping it (None for a plain layer)."""

    name: str
    path: str
    layer: nn.Module
    wrapper: nn.Module | None = None

    @property
    def outer(self) -> nn.Module:
        """The module the model calls: the PEFT wrapper if there is one, else the layer (hook this one)."""
        return self.wrapper if self.wrapper is not None else self.layer


def weight_layers(model: nn.Module) -> dict[str, LayerRef]:
    """Every layer with a weight matrix (`is_weight_layer`) of `model` (a transformers or PEFT model) by plain name,
    in module order.

    A PEFT layer (LoRA) counts once, as the layer it wraps; its adapters (`lora_A`, `lora_B`) are not layers of the
    model.
    """
    root = base_model(model)
    tuners = _tuner_types()
    wrappers = [n for n, m in root.named_modules() if n and tuners and isinstance(m, tuners)]
    found: dict[str, LayerRef] = {}
    for name, module in root.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue  # inside a PEFT layer: its base layer is reached through the wrapper
        if name in wrappers:
            path, inner = name, module
            while isinstance(getattr(inner, "base_layer", None), nn.Module):
                path, inner = path + ".base_layer", inner.base_layer
            if is_weight_layer(inner):
                found[name] = LayerRef(name, path, inner, module)
        elif is_weight_layer(module):
            found[name] = LayerRef(name, name, module)
    return found


def linear_layers(model: nn.Module) -> dict[str, LayerRef]:
    """The linear layers (`is_linear_like`) among `weight_layers(model)`."""
    return {n: ref for n, ref in weight_layers(model).items() if is_linear_like(ref.layer)}


def select_layers(model: nn.Module, targets: str | Sequence[str] = ALL_LINEAR, exclude: Sequence[str] = ("lm_head",),
                  *, what: str = "target pattern", setting: str = "targets") -> dict[str, LayerRef]:
    """The layers of `model` that `targets` pick (`all-linear`: its linear layers; patterns: any layer with a weight
    matrix), minus `exclude`, by plain name in module order. The caller refuses layer types it cannot work on."""
    layers = weight_layers(model)
    linear = [n for n, ref in layers.items() if is_linear_like(ref.layer)]
    if not linear:
        raise SlimtuneError(f"model {type(base_model(model)).__name__} has no linear layers; valid: a model with "
                            "nn.Linear layers")
    return {n: layers[n] for n in select_names(layers, targets, exclude, what=what, setting=setting, linear=linear)}
