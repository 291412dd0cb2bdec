"""Finding the routers of an MoE model and reading what they chose: one small adapter per transformers family, and a
registration call for custom routers. Pure torch (transformers' classes are recognised by name, never imported).

In transformers 5 every family's router is its own module returning `(router_logits, top_k_weights, top_k_indices)`
for the flat tokens of a batch (the experts are fused 3-D parameters beside it), so an adapter says only how that
family scores (`softmax` of the logits, or DeepSeek-V3's `sigmoid`) and how it would choose with an extra per-expert
bias (`rebias`: aux-loss-free balancing). The families of transformers 5.25:

| family      | router class                           | scores  | choosing with a bias                        |
|-------------|----------------------------------------|---------|---------------------------------------------|
| Mixtral     | MixtralTopKRouter                      | softmax | top-k of probs + bias, weights renormalised |
| Qwen2/3-MoE | Qwen2MoeTopKRouter, Qwen3MoeTopKRouter | softmax | same, renormalised when `norm_topk_prob`    |
| OLMoE       | OlmoeTopKRouter                        | softmax | same as Qwen                                |
| GPT-OSS     | GptOssTopKRouter                       | softmax | top-k of logits + bias, softmax over the k  |
| DeepSeek-V3 | DeepseekV3TopkRouter                   | sigmoid | its own `e_score_correction_bias` buffer    |

DeepSeek-V3 already has the aux-loss-free bias in the model (a buffer saved with it), so the bias is written there
and exported with the model; for the others it is applied by a forward hook that re-chooses from the logits.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.errors import SlimtuneError
from slimtune.moe.aux_free import biased_top_k
from slimtune.moe.losses import SCORE_FUNCTIONS

__all__ = ["RouterAdapter", "RouterRef", "find_routers", "register_router", "unregister_router"]

Rebias = Callable[[nn.Module, Any, Tensor], Any]


@dataclass(frozen=True)
class RouterAdapter:
    """How to read one kind of router.

    `read(output) -> (logits (tokens, E), indices (tokens, top_k))`; `rebias(router, output, bias) -> output` chooses
    again with `bias` added to the scores (None: the router cannot take a bias this way); `native_bias` names a
    buffer of the router that already is the aux-loss-free bias (DeepSeek-V3).
    """

    family: str
    score: str = "softmax"
    read: Callable[[Any], tuple[Tensor, Tensor]] | None = None
    rebias: Rebias | None = None
    native_bias: str | None = None
    num_experts: int | None = None  # registered routers: fixed; families: read from the module
    top_k: int | None = None


@dataclass
class RouterRef:
    """A router found in a model: its name (module path in the plain model), the module, E, top-k, its adapter."""

    name: str
    module: nn.Module
    num_experts: int
    top_k: int
    adapter: RouterAdapter

    def read(self, output: Any) -> tuple[Tensor, Tensor]:
        """(logits, indices) of one forward, checked against the expert count and top-k the router declares."""
        logits, indices = (self.adapter.read or _read_hf)(output)
        logits = logits.reshape(-1, logits.shape[-1])
        if logits.shape[-1] != self.num_experts:
            raise SlimtuneError(f"router {self.name} returned logits for {logits.shape[-1]} experts but is declared "
                                f"with num_experts={self.num_experts}; valid: num_experts={logits.shape[-1]}")
        indices = indices.reshape(logits.shape[0], -1)
        if indices.shape[-1] != self.top_k:
            raise SlimtuneError(f"router {self.name} chose {indices.shape[-1]} experts per token but is declared with "
                                f"top_k={self.top_k}; valid: top_k={indices.shape[-1]}")
        return logits, indices


def _read_hf(output: Any) -> tuple[Tensor, Tensor]:
    if isinstance(output, Tensor):
        raise SlimtuneError("a router returned only logits and has no read function; valid: a router returning "
                            "(logits, weights, indices), or register_router(..., read=fn) giving (logits, indices)")
    return output[0], output[-1]


def _rebias_softmax(renormalize: Callable[[nn.Module], bool]) -> Rebias:
    def rebias(router: nn.Module, output: Any, bias: Tensor):
        logits, weights, _ = output
        probs = torch.softmax(logits.float(), dim=-1)
        indices = biased_top_k(probs, bias, router.top_k)
        chosen = probs.gather(1, indices)
        if renormalize(router):
            chosen = chosen / chosen.sum(dim=-1, keepdim=True)
        return logits, chosen.to(weights.dtype), indices.to(output[2].dtype)

    return rebias


def _rebias_gpt_oss(router: nn.Module, output: Any, bias: Tensor):
    logits, weights, old = output
    indices = biased_top_k(logits, bias, router.top_k)
    chosen = torch.softmax(logits.gather(1, indices), dim=1, dtype=weights.dtype)
    return logits, chosen, indices.to(old.dtype)


FAMILIES: dict[str, RouterAdapter] = {
    "MixtralTopKRouter": RouterAdapter("mixtral", rebias=_rebias_softmax(lambda r: True)),
    "Qwen2MoeTopKRouter": RouterAdapter("qwen2_moe", rebias=_rebias_softmax(lambda r: bool(r.norm_topk_prob))),
    "Qwen3MoeTopKRouter": RouterAdapter("qwen3_moe", rebias=_rebias_softmax(lambda r: bool(r.norm_topk_prob))),
    "OlmoeTopKRouter": RouterAdapter("olmoe", rebias=_rebias_softmax(lambda r: bool(r.norm_topk_prob))),
    "GptOssTopKRouter": RouterAdapter("gpt_oss", rebias=_rebias_gpt_oss),
    "DeepseekV3TopkRouter": RouterAdapter("deepseek_v3", score="sigmoid", native_bias="e_score_correction_bias"),
}

_REGISTERED_CLASSES: dict[type, RouterAdapter] = {}
_REGISTERED_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_router(router: nn.Module | type, num_experts: int, top_k: int, score: str = "softmax",
                    read: Callable[[Any], tuple[Tensor, Tensor]] | None = None, rebias: Rebias | None = None) -> None:
    """Declare a custom router (a module, or a module class for all its instances) so slimtune's MoE tools read it.

    Its forward must return `(logits, weights, indices)` like transformers' routers, or pass `read(output) ->
    (logits (tokens, E), indices (tokens, top_k))`. `rebias(router, output, bias) -> output` lets aux-loss-free
    balancing choose with a bias. A declared count that does not match what the router returns is a one-line error at
    its first training step.
    """
    if not (isinstance(router, nn.Module) or (isinstance(router, type) and issubclass(router, nn.Module))):
        raise SlimtuneError(f"register_router({type(router).__name__}) is not valid; valid: an nn.Module or its class")
    for key, value, low in (("num_experts", num_experts, 2), ("top_k", top_k, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise SlimtuneError(f"register_router {key}={value!r} is not valid; valid: an int >= {low}")
    if top_k > num_experts:
        raise SlimtuneError(f"register_router top_k={top_k} is not valid for num_experts={num_experts}; valid: an int "
                            f"in [1, {num_experts}]")
    if score not in SCORE_FUNCTIONS:
        raise SlimtuneError(f"register_router score={score!r} is not valid; valid: {', '.join(SCORE_FUNCTIONS)}")
    adapter = RouterAdapter("custom", score=score, read=read, rebias=rebias, num_experts=num_experts, top_k=top_k)
    if isinstance(router, nn.Module):
        _REGISTERED_MODULES[router] = adapter
    else:
        _REGISTERED_CLASSES[router] = adapter


def unregister_router(router: nn.Module | type) -> None:
    if isinstance(router, nn.Module):
        _REGISTERED_MODULES.pop(router, None)
    else:
        _REGISTERED_CLASSES.pop(router, None)


def _adapter_for(module: nn.Module) -> RouterAdapter | None:
    if module in _REGISTERED_MODULES:
        return _REGISTERED_MODULES[module]
    for cls in type(module).__mro__:
        if cls in _REGISTERED_CLASSES:
            return _REGISTERED_CLASSES[cls]
    for cls in type(module).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    return None


def find_routers(model: nn.Module) -> list[RouterRef]:
    """The routers of `model` (a transformers model, a PEFT model around one, or any module holding registered
    routers), in module order; names are paths in the plain model (`model.layers.3.mlp.gate`)."""
    from slimtune.select import base_model

    root = base_model(model)
    found = []
    for name, module in root.named_modules():
        adapter = _adapter_for(module)
        if adapter is None:
            continue
        num_experts = adapter.num_experts or int(getattr(module, "num_experts"))
        top_k = adapter.top_k or int(getattr(module, "top_k"))
        # PEFT's all-linear wraps a router's weight (its ParamWrapper holds the router as base_layer): the plain name
        found.append(RouterRef(name.replace(".base_layer", ""), module, num_experts, top_k, adapter))
    return found
