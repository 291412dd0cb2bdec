"""Structured pruning that makes the model smaller: the heads and MLP channels whose masks drop them entirely are
removed from the layer shapes and the config, so stock transformers loads a smaller, faster model.

Removing is exact: a channel whose ``down_proj`` column is zero (and ``gate``/``up`` rows too) adds nothing to the
block's output, and a head whose ``o_proj`` columns are zero adds nothing to the attention's output, so its ``q``,
``k`` and ``v`` rows go with it. Heads are removed only under plain multi-head attention (as many key/value heads as
query heads): with grouped-query attention a query head shares its key/value head with others.

The config holds one width per model (``intermediate_size``, ``num_attention_heads``), so every block must lose the
same number of channels (heads): what :func:`slimtune.prune.masks.structured_masks` gives (``round(s * n)`` each).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.prune.masks import pruned_groups

__all__ = ["shrink_model"]


def _sliced_linear(layer: nn.Linear, keep: torch.Tensor, axis: int) -> nn.Linear:
    weight = layer.weight.detach()
    weight = weight[keep] if axis == 0 else weight[:, keep]
    bias = layer.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach()[keep] if axis == 0 else bias.detach())
    return new


def _keep_index(n: int, dropped: list[int], per: int, device) -> torch.Tensor:
    keep_groups = torch.ones(n, dtype=torch.bool)
    keep_groups[dropped] = False
    return keep_groups.repeat_interleave(per).nonzero().flatten().to(device)


@torch.no_grad()
def shrink_model(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, int]:
    """Remove the MLP channels and attention heads that ``masks`` (plain layer name -> keep-mask) drop entirely, from
    a plain transformers Llama-style model (``model.layers[i].mlp`` / ``.self_attn``), in place; update its config.

    Returns ``{"channels_removed": per block, "heads_removed": per block}``.
    """
    from slimtune.quant.drivers import find_decoder_blocks
    from slimtune.quant.targets import set_module

    if hasattr(model, "get_base_model"):
        raise SlimtuneError("shrink_model needs a plain transformers model; valid: the merged model "
                            "(slimtune.models.merge_to_dense), not a PEFT model")
    config = model.config
    path, blocks = find_decoder_blocks(model)
    channels, heads = set(), set()
    for i, block in enumerate(blocks):
        prefix = f"{path}.{i}"
        mlp, attn = getattr(block, "mlp", None), getattr(block, "self_attn", None)
        down = f"{prefix}.mlp.down_proj"
        if mlp is not None and down in masks:
            width = mlp.down_proj.in_features
            dropped = pruned_groups(masks[down], 1, width)
            for name in ("gate_proj", "up_proj"):  # a channel goes only when all its weights are pruned
                if f"{prefix}.mlp.{name}" in masks:
                    rows = set(pruned_groups(masks[f"{prefix}.mlp.{name}"], 0, width))
                    dropped = [c for c in dropped if c in rows]
            channels.add(len(dropped))
            keep = _keep_index(width, dropped, 1, mlp.down_proj.weight.device)
            for name in ("gate_proj", "up_proj"):
                if hasattr(mlp, name):
                    set_module(mlp, name, _sliced_linear(getattr(mlp, name), keep, 0))
            set_module(mlp, "down_proj", _sliced_linear(mlp.down_proj, keep, 1))
        o_name = f"{prefix}.self_attn.o_proj"
        if attn is not None and o_name in masks:
            n_heads = config.num_attention_heads
            n_kv = getattr(config, "num_key_value_heads", None) or n_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
            dropped = pruned_groups(masks[o_name], 1, n_heads)
            if dropped and n_kv != n_heads:
                raise SlimtuneError(f"removing attention heads needs plain multi-head attention; the model has "
                                    f"{n_heads} query and {n_kv} key/value heads; valid: granularity=channels, or "
                                    "keep the heads as zeros (export.merged)")
            heads.add(len(dropped))
            keep = _keep_index(n_heads, dropped, head_dim, attn.o_proj.weight.device)
            for name in ("q_proj", "k_proj", "v_proj"):
                set_module(attn, name, _sliced_linear(getattr(attn, name), keep, 0))
            set_module(attn, "o_proj", _sliced_linear(attn.o_proj, keep, 1))
    if len(channels) > 1 or len(heads) > 1:
        raise SlimtuneError(f"blocks lost different numbers of channels {sorted(channels)} / heads {sorted(heads)}; "
                            "valid: the same number in every block (the config holds one width)")
    removed = {"channels_removed": next(iter(channels), 0), "heads_removed": next(iter(heads), 0)}
    if removed["channels_removed"]:
        config.intermediate_size = config.intermediate_size - removed["channels_removed"]
    if removed["heads_removed"]:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        config.head_dim = head_dim
        config.num_attention_heads -= removed["heads_removed"]
        config.num_key_value_heads = config.num_attention_heads
        for block in blocks:
            attn = block.self_attn
            for attr in ("num_heads", "num_key_value_heads"):
                if hasattr(attn, attr):
                    setattr(attn, attr, config.num_attention_heads)
            if hasattr(attn, "num_key_value_groups"):
                attn.num_key_value_groups = 1
    return removed
