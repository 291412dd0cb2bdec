"""Where a per-input-channel scale can be folded so that the full-precision model computes the same function.

AWQ and SmoothQuant multiply the weight columns of the layers that read one tensor by ``s`` and divide that tensor by
``s``; the division is folded into the module that produced it: the gain (and bias) of the norm before the layers, or
the output rows (and bias) of the linear before them. :data:`FOLD_TABLES` is the one description, per transformers
``model_type``, of those positions inside a decoder block (paths relative to the block)::

    input_layernorm          -> self_attn.q_proj, k_proj, v_proj
    self_attn.v_proj         -> self_attn.o_proj        (attention is linear in the values)
    post_attention_layernorm -> mlp.gate_proj, up_proj  (Gemma 2/3: pre_feedforward_layernorm)
    mlp.up_proj              -> mlp.down_proj           (down reads act(gate) * up, linear in up)

Grouped-query attention: ``v_proj`` gives one channel per key/value head channel while ``o_proj`` reads one per query
head channel; the scale is one per value channel and repeats over the query heads sharing it (``expand``).

Gemma's RMSNorm multiplies by ``1 + weight``: the fold keeps that offset. A fold whose modules are missing or whose
widths do not match is not used; :func:`check_covered` refuses a target layer that no usable fold covers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.errors import SlimtuneError

__all__ = ["FOLD_TABLES", "Fold", "ScaleFold", "apply_fold", "check_covered", "fold_table_for", "resolve_folds"]


@dataclass(frozen=True)
class ScaleFold:
    """One position: ``prev`` (a norm or a linear, path in the block) produces the tensor that ``layers`` read."""

    prev: str
    layers: tuple[str, ...]


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA = (
    ScaleFold("input_layernorm", _ATTN),
    ScaleFold("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleFold("post_attention_layernorm", _MLP),
    ScaleFold("mlp.up_proj", ("mlp.down_proj",)),
)
# Gemma 2/3 normalise the attention output with post_attention_layernorm; the MLP reads pre_feedforward_layernorm.
_GEMMA2 = (
    ScaleFold("input_layernorm", _ATTN),
    ScaleFold("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleFold("pre_feedforward_layernorm", _MLP),
    ScaleFold("mlp.up_proj", ("mlp.down_proj",)),
)
FOLD_TABLES: dict[str, tuple[ScaleFold, ...]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA,
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
}


def fold_table_for(model: nn.Module, method: str) -> tuple[ScaleFold, ...]:
    """The fold table of `model`'s ``config.model_type``; a one-line SlimtuneError for a layout not described."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = FOLD_TABLES.get(model_type)
    if table is None:
        raise SlimtuneError(f"{method} cannot fold scales into model_type={model_type!r} (its block layout is not "
                            f"described); valid: {', '.join(sorted(FOLD_TABLES))}")
    return table


def base_linear(module: nn.Module | None) -> nn.Module | None:
    """The float linear under a PEFT wrapper (its ``base_layer``), else the module."""
    while module is not None and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


@dataclass
class Fold:
    """A usable fold position in one block.

    Attributes:
        prev_name, prev: the producing module (a PEFT wrapper replaced by its base layer).
        norm_offset: None when `prev` is a linear; else what the norm adds to its weight (Gemma: 1.0, others 0.0).
        names, layers: the reading layers (relative names; base ``nn.Linear`` modules), all of width ``in_features``.
        width: the number of scales (`prev`'s output width).
        expand: ``[in_features]`` index of the scale of each reading channel, or None when it is the identity.
    """

    prev_name: str
    prev: nn.Module
    norm_offset: float | None
    names: list[str]
    layers: list[nn.Linear]
    width: int
    expand: torch.Tensor | None

    @property
    def in_features(self) -> int:
        return self.layers[0].in_features

    def layer_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """Per reading channel scales from the ``[width]`` fold scales."""
        return scales if self.expand is None else scales[self.expand.to(scales.device)]

    def reduce(self, per_channel: torch.Tensor, how: str = "mean") -> torch.Tensor:
        """A ``[in_features]`` statistic brought to the ``[width]`` fold channels (mean or max over the shared ones)."""
        if self.expand is None:
            return per_channel
        idx = self.expand.to(per_channel.device)
        if how == "max":
            out = torch.full((self.width,), float("-inf"), dtype=per_channel.dtype, device=per_channel.device)
            return out.scatter_reduce(0, idx, per_channel, reduce="amax")
        out = torch.zeros(self.width, dtype=per_channel.dtype, device=per_channel.device).index_add_(0, idx, per_channel)
        counts = torch.bincount(idx, minlength=self.width).to(per_channel.dtype)
        return out / counts


def _norm_offset(module: nn.Module) -> float | None:
    """What a foldable norm adds to its gain, or None when `module` is not a norm with a per-channel gain."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if "Norm" not in name or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    return 1.0 if name.startswith("Gemma") else 0.0


def _gqa_expand(block: nn.Module, prev_name: str, width: int, in_features: int) -> torch.Tensor | None:
    """Index of the value channel each query-head channel reads (grouped-query attention), else None."""
    parent = block.get_submodule(prev_name.rpartition(".")[0]) if "." in prev_name else block
    head_dim = getattr(parent, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0 or width % head_dim or in_features % width:
        return None
    groups = in_features // width  # query heads per key/value head
    c = torch.arange(in_features)
    head, d = c // head_dim, c % head_dim
    return (head // groups) * head_dim + d


def resolve_folds(block: nn.Module, table: Sequence[ScaleFold]) -> list[Fold]:
    """The usable folds of `block` (missing modules or mismatched widths leave a position out)."""
    folds = []
    for entry in table:
        try:
            prev = block.get_submodule(entry.prev)
            layers = [base_linear(block.get_submodule(n)) for n in entry.layers]
        except AttributeError:
            continue
        if not all(isinstance(m, nn.Linear) for m in layers) or len({m.in_features for m in layers}) != 1:
            continue
        in_features = layers[0].in_features
        offset = _norm_offset(prev)
        expand = None
        if offset is not None:
            width = prev.weight.numel()
            if width != in_features:
                continue
        else:
            prev = base_linear(prev)
            if not isinstance(prev, nn.Linear):
                continue
            width = prev.out_features
            if width != in_features:
                expand = _gqa_expand(block, entry.prev, width, in_features)
                if expand is None:
                    continue
        folds.append(Fold(entry.prev, prev, offset, list(entry.layers), layers, width, expand))
    return folds


def check_covered(names: Sequence[str], folds: Sequence[Fold], prefix: str, method: str) -> None:
    """Every target layer (relative name) is read behind a usable fold."""
    covered = {n for f in folds for n in f.names}
    for n in names:
        if n not in covered:
            valid = ", ".join(sorted(covered)) or "none in this block"
            raise SlimtuneError(f"{method} has no foldable scale position for layer {prefix}{n}; valid: layers behind "
                                f"a norm or linear it can fold into ({valid}), or leave it out with exclude")


@torch.no_grad()
def apply_fold(fold: Fold, scales: torch.Tensor) -> None:
    """Multiply the reading layers' columns by `scales` (``[width]``) and divide `prev`'s output by them."""
    s = scales.detach().float()
    if not torch.isfinite(s).all() or not (s > 0).all():
        raise SlimtuneError("fold scales must be finite and positive; valid: scales > 0")
    col = fold.layer_scales(s)
    for layer in fold.layers:
        w = layer.weight
        w.copy_((w.float() * col.to(w.device)).to(w.dtype))
    prev = fold.prev
    w = prev.weight
    sp = s.to(w.device)
    if fold.norm_offset is not None:
        w.copy_(((w.float() + fold.norm_offset) / sp - fold.norm_offset).to(w.dtype))
    else:
        w.copy_((w.float() / sp[:, None]).to(w.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / sp).to(bias.dtype))


# --------------------------------------------------------------------------- walking a model's blocks


@dataclass
class BlockWork:
    """What a fold method sees for one decoder block: its usable folds covering targets, and their inputs.

    Attributes:
        index, prefix: block number and its path prefix (``model.layers.3.``).
        block: the decoder block.
        folds: the usable folds whose layers include a target.
        targets: target layer names (relative to the block) per fold, in fold order.
        inputs: each fold's calibration input ``[tokens, in_features]`` (in the block's dtype, on the compute device;
            a method takes a float32 copy of one fold at a time, which bounds the memory a large model needs).
        device: where the block computes.
        verify: call after folding (before any change that is meant to alter the function, such as clipping): raises
            when the block's output on the first batch moved beyond floating-point tolerance.
    """

    index: int
    prefix: str
    block: nn.Module
    folds: list[Fold]
    targets: list[list[str]]
    inputs: list[torch.Tensor]
    device: torch.device
    verify: Callable[[], None] = lambda: None


def _fold_targets(model: nn.Module, targets, exclude, method: str):
    """Per block, the target layer names relative to it (PEFT ``base_layer`` suffixes dropped)."""
    import re

    from slimtune.quant.drivers import find_decoder_blocks
    from slimtune.quant.targets import check_float_linear, find_linear_layers

    blocks_path, blocks = find_decoder_blocks(model)
    per_block: list[list[str]] = [[] for _ in blocks]
    for name, module in find_linear_layers(model, targets, exclude).items():
        m = re.match(rf"{re.escape(blocks_path)}\.(\d+)\.(.+?)(\.base_layer)*$", name)
        if m is None or int(m.group(1)) >= len(blocks):
            raise SlimtuneError(f"layer {name} is outside the decoder blocks ({blocks_path}); valid: {method} targets "
                                "inside them (exclude it)")
        check_float_linear(name, module, method)
        per_block[int(m.group(1))].append(m.group(2))
    return blocks_path, blocks, per_block


@torch.no_grad()
def walk_fold_blocks(model: nn.Module, batches, targets, exclude, method: str, work, *,
                     table: Sequence[ScaleFold] | None = None, device=None, progress: bool = False,
                     check_function: bool = True) -> set[int]:
    """Run ``work(BlockWork)`` on every decoder block in order, on calibration inputs computed by the blocks before it
    (after their work: the float model with scales folded, and whatever `work` changed).

    `work` folds scales into the block (and may then change target weights, e.g. clip them); with `check_function`,
    ``BlockWork.verify()`` compares the block's output on the first batch with its output before `work`, which catches
    a fold table that does not describe the model. Returns the ``id()`` of every parameter tensor of the blocks' fold
    producers and layers (what a fold may have changed).
    """
    from slimtune.quant.drivers import (
        _hidden,
        _module_device,
        _normalize_batches,
        _StopForward,
        _to,
        capture_block_inputs,
    )
    from slimtune.select import base_model

    model = base_model(model)
    table = fold_table_for(model, method) if table is None else table
    batches = _normalize_batches(batches)
    if not batches:
        raise SlimtuneError(f"{method} calibration set has 0 samples; valid: at least one input_ids batch")
    blocks_path, blocks, per_block = _fold_targets(model, targets, exclude, method)
    resolved = []
    for i, block in enumerate(blocks):  # refuse before any work
        folds = resolve_folds(block, table)
        check_covered(per_block[i], folds, f"{blocks_path}.{i}.", method)
        resolved.append(folds)
    device = torch.device(device) if device is not None else None
    touched: set[int] = set()
    was_training = model.training
    config = getattr(model, "config", None)
    old_use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None and old_use_cache is not None:
        config.use_cache = False
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    try:
        inputs = capture_block_inputs(model, blocks, batches, device)
        for i in tqdm(range(len(blocks)), desc=f"{method} blocks", disable=not progress):
            block = blocks[i]
            home = _module_device(block)
            dev = device if device is not None else home
            if device is not None:
                block.to(device)
            inputs = [(_to(a, dev), _to(k, dev)) for a, k in inputs]
            wanted = set(per_block[i])
            folds = [f for f in resolved[i] if wanted & set(f.names)]
            if folds:
                captured: list[list[torch.Tensor]] = [[] for _ in folds]
                fired: set[int] = set()

                def hook(mod, inp, out, k):
                    captured[k].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
                    fired.add(k)
                    if len(fired) == len(folds):
                        raise _StopForward

                handles = [f.layers[0].register_forward_hook(lambda m, i_, o, k=k: hook(m, i_, o, k))
                           for k, f in enumerate(folds)]
                try:
                    for args, kwargs in inputs:
                        fired.clear()
                        try:
                            block(*args, **kwargs)
                        except _StopForward:
                            pass
                finally:
                    for h in handles:
                        h.remove()
                reference = _hidden(block(*inputs[0][0], **inputs[0][1])).float() if check_function else None

                def verify(block=block, reference=reference, i=i):
                    if reference is None:
                        return
                    after = _hidden(block(*inputs[0][0], **inputs[0][1])).float()
                    rel = float((after - reference).norm() / reference.norm().clamp_min(1e-12))
                    dtype = next(block.parameters()).dtype
                    limit = 1e-3 if dtype == torch.float32 else 5e-2
                    if not rel <= limit:
                        raise SlimtuneError(f"{method}: folding scales changed block {blocks_path}.{i}'s output by "
                                            f"{rel:.2g} (relative); valid: a model whose block layout matches its "
                                            "fold table (a norm or linear directly before the scaled layers)")

                fold_inputs = [torch.cat(c) for c in captured]
                del captured
                work(BlockWork(i, f"{blocks_path}.{i}.", block, folds,
                               [[n for n in f.names if n in wanted] for f in folds], fold_inputs, dev, verify))
                del fold_inputs, reference
                for f in folds:
                    for m in [f.prev, *f.layers]:
                        touched.update(id(p) for p in m.parameters())
            for j, (args, kwargs) in enumerate(inputs):
                out = _hidden(block(*args, **kwargs))
                inputs[j] = ((out,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": out})
            if device is not None:
                block.to(home)
    finally:
        model.train(was_training)
        if config is not None and old_use_cache is not None:
            config.use_cache = old_use_cache
    return touched
