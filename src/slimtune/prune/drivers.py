"""One-shot pruning of a whole model: magnitude (no data), Wanda and SparseGPT (calibration data), block by block.

Wanda and SparseGPT use the layer-by-layer machinery of GPTQ (:mod:`slimtune.quant.drivers`): the first decoder
block's inputs are recorded for every calibration batch, then each block in turn is run once over them with hooks
accumulating its target layers' statistics (per-channel input norms for Wanda, the Hessian for SparseGPT; layers
reading the same tensor share them), its layers are pruned, and the pruned block is run again to give the next
block's inputs, so later blocks are calibrated on what the pruned model computes (as both papers do).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError, choices
from slimtune.prune.masks import check_nm, layer_mask, nm_mask, row_mask
from slimtune.prune.schedule import check_sparsity
from slimtune.prune.scores import InputNormAccumulator, magnitude_score, wanda_score
from slimtune.prune.sparsegpt import SparseGPT
from slimtune.quant.drivers import (
    _hidden,
    _module_device,
    _normalize_batches,
    _to,
    capture_block_inputs,
    find_decoder_blocks,
)
from slimtune.quant.grid import QuantSpec
from slimtune.quant.targets import check_float_linear
from slimtune.select import base_model, select_layers

ONE_SHOT_METHODS = ("magnitude", "wanda", "sparsegpt")

__all__ = ["ONE_SHOT_METHODS", "prune_model_oneshot"]


@torch.no_grad()
def prune_model_oneshot(
    model: nn.Module,
    method: str = "sparsegpt",
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    calib_batches: Sequence[Any] | None = None,
    targets: str | Sequence[str] = "all-linear",
    exclude: Sequence[str] = ("lm_head",),
    *,
    damp: float = 0.01,
    block_size: int = 128,
    spec: QuantSpec | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Prune the target layers of ``model`` (transformers or PEFT: its base) in place; return their keep-masks by plain
    layer name.

    Args:
        method: ``magnitude`` (per layer, or N:M), ``wanda`` (per output row, or N:M; needs ``calib_batches``) or
            ``sparsegpt`` (needs ``calib_batches``; ``spec`` also GPTQ-quantizes the kept weights: e.g. 2:4 + 4-bit).
        sparsity: fraction zeroed per layer, in [0, 1); ignored with ``nm``.
        nm: ``(n, m)``: ``n`` kept of every ``m`` consecutive inputs.
        calib_batches: input_ids LongTensors ``[b, T]`` (or dicts with ``input_ids``/``attention_mask``).
        device: where each block is moved while calibrated (None: where it is).
    """
    if method not in ONE_SHOT_METHODS:
        raise SlimtuneError(f"pruning method={method!r} is not valid; valid: {choices(ONE_SHOT_METHODS)}")
    if nm is not None:
        check_nm(*nm)
    else:
        sparsity = check_sparsity(sparsity)
    if spec is not None and method != "sparsegpt":
        raise SlimtuneError(f"joint quantization is not valid with method={method}; valid: method=sparsegpt")
    base = base_model(model)
    refs = select_layers(base, targets, exclude, what="pruning targets pattern", setting="pruning targets")
    for name, ref in refs.items():
        check_float_linear(name, ref.layer, f"{method} pruning")
        if nm is not None:
            check_nm(*nm, ref.layer.in_features, name)
    if method == "magnitude":
        masks = {}
        for name, ref in refs.items():
            score = magnitude_score(ref.layer.weight)
            masks[name] = nm_mask(score, *nm) if nm else layer_mask(score, sparsity)
            ref.layer.weight.mul_(masks[name].to(ref.layer.weight.dtype))
        return masks
    if calib_batches is None:
        raise SlimtuneError(f"pruning method={method} needs calibration data and got none; valid: calibration batches, "
                            "or method=magnitude")
    batches = _normalize_batches(calib_batches)
    if not batches:
        raise SlimtuneError("calibration set has 0 samples; valid: at least one input_ids batch")
    blocks_path, blocks = find_decoder_blocks(base)
    per_block: list[dict[str, Any]] = [{} for _ in blocks]
    for name, ref in refs.items():
        match = re.match(rf"{re.escape(blocks_path)}\.(\d+)\.(.+)$", ref.path)
        if match is None or int(match.group(1)) >= len(blocks):
            raise SlimtuneError(f"layer {name} is outside the decoder blocks ({blocks_path}); valid: {method} targets "
                                "inside them (exclude it, or prune it with method=magnitude)")
        per_block[int(match.group(1))][match.group(2)] = name
    device = torch.device(device) if device is not None else None
    was_training = model.training
    config = getattr(base, "config", None)
    old_use_cache = getattr(config, "use_cache", None)
    base.eval()
    if old_use_cache is not None:
        config.use_cache = False
    masks: dict[str, torch.Tensor] = {}
    try:
        inputs = capture_block_inputs(base, blocks, batches, device)
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            def tqdm(x, **_):
                return x
        for i in tqdm(range(len(blocks)), desc=f"{method} blocks", disable=not progress):
            block = blocks[i]
            home = _module_device(block)
            dev = device if device is not None else home
            if device is not None:
                block.to(device)
            inputs = [(_to(a, dev), _to(k, dev)) for a, k in inputs]
            if per_block[i]:
                masks.update(_prune_block(block, per_block[i], inputs, method, sparsity, nm, damp, block_size, spec))
            for j, (args, kwargs) in enumerate(inputs):
                out = _hidden(block(*args, **kwargs))
                inputs[j] = ((out,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": out})
            if device is not None:
                block.to(home)
    finally:
        model.train(was_training)
        if old_use_cache is not None:
            config.use_cache = old_use_cache
    return {name: masks[name] for name in refs}


def _prune_block(block, names: dict[str, str], inputs, method, sparsity, nm, damp, block_size, spec):
    """Accumulate the statistics of ``names`` (path in block -> plain name) over all inputs, prune, return masks."""
    modules = {path: block.get_submodule(path) for path in names}
    stats = {p: (SparseGPT(m.in_features) if method == "sparsegpt" else InputNormAccumulator(m.in_features))
             for p, m in modules.items()}
    leader_of: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []

    def hook(mod, inp, out, path):
        x = inp[0]
        lead = next((p for t, p in seen if t is x), None)
        leader_of.setdefault(path, lead or path)
        if lead is None:
            stats[path].add_batch(x.detach())
            seen.append((x, path))

    handles = [m.register_forward_hook(lambda mod, inp, out, p=p: hook(mod, inp, out, p)) for p, m in modules.items()]
    try:
        for args, kwargs in inputs:
            seen.clear()
            block(*args, **kwargs)
    finally:
        seen.clear()
        for h in handles:
            h.remove()
    masks = {}
    for path, module in modules.items():
        stat = stats[leader_of.get(path, path)]
        if method == "sparsegpt":
            if stat.hessian is None:
                raise SlimtuneError(f"layer {names[path]} received no input during calibration")
            n, m = nm if nm else (0, 0)
            block_cols = block_size if not m else max(m, block_size - block_size % m)
            result = stat.prune(module.weight, sparsity, n=n, m=m, block_size=block_cols, damp=damp, spec=spec)
            module.weight.copy_(result.weight)
            masks[names[path]] = result.mask
        else:
            score = wanda_score(module.weight, stat.norm())
            mask = nm_mask(score, *nm) if nm else row_mask(score, sparsity)
            module.weight.mul_(mask.to(module.weight.dtype))
            masks[names[path]] = mask
    return masks


