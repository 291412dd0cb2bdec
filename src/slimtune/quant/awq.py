"""AWQ: activation-aware weight quantization (Lin et al., 2023), then RTN or GPTQ of the scaled weights.

For the layers that read one tensor ``x`` (q/k/v after the input norm, o after v, gate/up after the post-attention
norm, down after up; see :mod:`slimtune.quant.folds`), AWQ multiplies their weight columns by per-input-channel scales
``s`` and folds ``1/s`` into the module producing ``x``, so the float model computes the same function while the
channels that carry large activations get finer grid steps. ``s = mean|x|^alpha`` (normalised to geometric mean 1
over its extremes; ``duo_scaling`` divides by ``mean|w_normalised|^(1 - alpha)`` as llm-compressor does), with
``alpha`` from a grid chosen to minimise the squared error of the layers' RTN-quantized outputs on the calibration
activations. ``alpha = 0`` (``s = 1``) is on the grid, so the chosen scales never do worse than plain RTN on that
objective. Optional weight clipping (``clip``) then shrinks each (row, group)'s range where that lowers the group's
output error (q/k are left out, as the reference does: their errors are amplified by the softmax).

Everything happens block by block on calibration inputs computed by the already-scaled blocks before
(:func:`slimtune.quant.folds.walk_fold_blocks`); the quantization itself is then :func:`quantize_model_rtn` or
:func:`quantize_model_gptq` on the scaled model (``awq_gptq``: GPTQ of AWQ-scaled weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.grid import QuantSpec, qparams_from_range

__all__ = ["AWQResult", "AWQSearch", "awq_clip_ranges", "awq_model", "awq_search_scales", "check_alphas",
           "quantize_model_awq"]

# Rows of x per matmul while measuring the output error: bounds memory at (chunk x out) floats.
_TOKEN_CHUNK = 4096
# Calibration rows the clipping search scores on (the reference's 512).
_CLIP_TOKENS = 512


def check_alphas(alphas: Any, what: str = "alphas") -> tuple[float, ...]:
    """A non-empty list of floats in [0, 1]."""
    values = [alphas] if isinstance(alphas, (int, float)) and not isinstance(alphas, bool) else alphas
    try:
        values = tuple(values)
    except TypeError:
        values = None
    ok = bool(values) and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
                              and 0.0 <= a <= 1.0 for a in values)
    if not ok:
        raise SlimtuneError(f"{what}={alphas!r} is not valid; valid: floats in [0, 1]")
    return tuple(float(a) for a in values)


def default_alphas(n_grid: int = 20) -> tuple[float, ...]:
    """``0, 1/n, ..., (n-1)/n`` (the reference's grid)."""
    return tuple(i / n_grid for i in range(n_grid))


@dataclass
class AWQSearch:
    """Result of :func:`awq_search_scales`: the chosen scales (``[width]``), their alpha, and the output error
    (mean squared) of the RTN-quantized layers with these scales and without any (``alpha = 0``)."""

    scales: torch.Tensor
    alpha: float
    error: float
    rtn_error: float
    errors: dict[float, float] = field(default_factory=dict)


def _output_error(x: torch.Tensor, w_ref: torch.Tensor, w_new: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """Mean squared difference of ``x @ w_ref.T`` and ``x @ w_new.T``, i.e. of ``x @ (w_ref - w_new).T``.

    With ``gram = x.T @ x`` it is ``sum((D @ gram) * D) / (tokens * out)`` for ``D = w_ref - w_new``: the same number
    at ``in / tokens`` of the cost, which is what makes a grid search over many tokens affordable.
    """
    diff = w_ref - w_new
    if gram is not None:
        return float(((diff @ gram) * diff).sum()) / (x.shape[0] * w_ref.shape[0])
    total = 0.0
    for start in range(0, x.shape[0], _TOKEN_CHUNK):
        total += float((x[start:start + _TOKEN_CHUNK] @ diff.T).square().sum())
    return total / (x.shape[0] * w_ref.shape[0])


def _normalised_weight_mean(weights: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per input channel mean of ``|w|`` divided by its (row, group) max: where the weights, not the activations, are
    large relative to their group (duo scaling)."""
    out, n_in = weights.shape
    step = n_in if spec.group_size is None else spec.group_size
    w = weights.abs()
    normed = torch.empty_like(w)
    for start in range(0, n_in, step):
        block = w[:, start:start + step]
        normed[:, start:start + step] = block / block.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return normed.mean(dim=0)


@torch.no_grad()
def awq_search_scales(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    spec: QuantSpec,
    alphas: Sequence[float] | None = None,
    *,
    expand: torch.Tensor | None = None,
    width: int | None = None,
    duo_scaling: bool = False,
) -> AWQSearch:
    """Search per-channel scales for the layers ``weights`` (``[out_i, in]`` each) reading ``x`` (``[tokens, in]``).

    Args:
        spec: the grid the weights will be quantized to (RTN stands in for the final quantizer during the search).
        alphas: grid of exponents in [0, 1] (default ``0, 0.05, ..., 0.95``).
        expand, width: the scales are ``[width]`` and channel ``c`` of ``x`` uses ``scales[expand[c]]`` (grouped-query
            attention's value channels); default: one scale per channel of ``x``.
        duo_scaling: ``s = mean|x|^a / mean|w_normalised|^(1-a)`` instead of ``mean|x|^a``.
    """
    alphas = default_alphas() if alphas is None else check_alphas(alphas)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not weights:
        raise SlimtuneError("x must be [tokens, in] and weights a non-empty list; valid: 2-D tensors")
    n_in = x.shape[1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != n_in:
            raise SlimtuneError(f"weight shape={tuple(w.shape)} is not valid; valid: [out, {n_in}]")
    x = x.float()
    W = torch.cat([w.detach().float().to(x.device) for w in weights])
    width = n_in if expand is None else int(width)
    idx = None if expand is None else expand.to(x.device)

    def to_width(per_channel: torch.Tensor) -> torch.Tensor:
        if idx is None:
            return per_channel
        out = torch.zeros(width, dtype=per_channel.dtype, device=per_channel.device).index_add_(0, idx, per_channel)
        return out / torch.bincount(idx, minlength=width).to(per_channel.dtype)

    x_mean = to_width(x.abs().mean(dim=0))
    gram = x.T @ x if x.shape[0] > n_in else None
    w_mean = to_width(_normalised_weight_mean(W, spec)) if duo_scaling else None
    errors: dict[float, float] = {}
    best: tuple[float, float, torch.Tensor] | None = None
    for a in alphas:
        if w_mean is not None:
            s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp_min(1e-4)
        else:
            s = x_mean.pow(a).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        col = s if idx is None else s[idx]
        deq = _fake_quantize_2d(W * col, spec) / col
        err = _output_error(x, W, deq, gram)
        errors[a] = err
        if best is None or err < best[0]:
            best = (err, a, s)
    rtn_error = errors[0.0] if 0.0 in errors else _output_error(x, W, _fake_quantize_2d(W, spec), gram)
    return AWQSearch(scales=best[2], alpha=best[1], error=best[0], rtn_error=rtn_error, errors=errors)


def _fake_quant_groups(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN of ``w [out, n_groups, group]`` with one grid per (row, group)."""
    scale, zero = qparams_from_range(w.amin(dim=-1), w.amax(dim=-1), spec)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return (torch.clamp(torch.round(w / scale) + zero, 0, spec.maxq) - zero) * scale


def _fake_quantize_2d(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """:func:`~slimtune.quant.grid.fake_quantize` of ``w [out, in]`` in one vectorised pass over all groups (a ragged
    last group is zero-padded: zeros are inside every group's range already, so no grid changes)."""
    n_out, n_in = w.shape
    gs = n_in if spec.group_size is None else spec.group_size
    n_groups = math.ceil(n_in / gs)
    pad = n_groups * gs - n_in
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    return _fake_quant_groups(wp.reshape(n_out, n_groups, gs), spec).reshape(n_out, -1)[:, :n_in]


@torch.no_grad()
def awq_clip_ranges(
    x: torch.Tensor,
    weight: torch.Tensor,
    spec: QuantSpec,
    *,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_tokens: int = 512,
    rows_per_step: int = 256,
) -> torch.Tensor:
    """Per (row, group) clipping bound ``[out, n_groups]`` of ``weight`` minimising each group's output error.

    Each bound is ``max|w| * (1 - i / n_grid)`` for ``i < max_shrink * n_grid`` (``i = 0``: no clipping), scored by
    the squared error of the group's partial products ``x_g @ w_g`` after clamping to ``[-bound, bound]`` and RTN,
    on `n_tokens` evenly spaced calibration rows. A ragged last group is zero-padded (zeros change no range).
    """
    n_out, n_in = weight.shape
    gs = n_in if spec.group_size is None else spec.group_size
    n_groups = math.ceil(n_in / gs)
    pad = n_groups * gs - n_in
    step = max(1, x.shape[0] // n_tokens)
    xs = x[::step][:n_tokens].float()
    W = weight.detach().float().to(xs.device)
    if pad:
        xs = torch.nn.functional.pad(xs, (0, pad))
        W = torch.nn.functional.pad(W, (0, pad))
    xg = xs.reshape(xs.shape[0], n_groups, gs)
    bounds = torch.empty(n_out, n_groups, device=W.device)
    for r0 in range(0, n_out, rows_per_step):
        wg = W[r0:r0 + rows_per_step].reshape(-1, n_groups, gs)
        reference = torch.einsum("ngk,ogk->ong", xg, wg)
        top = wg.abs().amax(dim=-1)  # [rows, groups]
        best_err = torch.full_like(top, float("inf"))
        best = top.clone()
        for i in range(max(1, int(max_shrink * n_grid))):
            bound = top * (1 - i / n_grid)
            clipped = torch.maximum(torch.minimum(wg, bound.unsqueeze(-1)), -bound.unsqueeze(-1))
            out = torch.einsum("ngk,ogk->ong", xg, _fake_quant_groups(clipped, spec))
            err = (out - reference).square().mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, bound, best)
        bounds[r0:r0 + rows_per_step] = best
    return bounds


@torch.no_grad()
def _clip_weight(layer: nn.Linear, bounds: torch.Tensor, spec: QuantSpec) -> None:
    n_in = layer.in_features
    gs = n_in if spec.group_size is None else spec.group_size
    col_bound = bounds.repeat_interleave(gs, dim=1)[:, :n_in].to(layer.weight.device)
    w = layer.weight.float()
    layer.weight.copy_(torch.maximum(torch.minimum(w, col_bound), -col_bound).to(layer.weight.dtype))


# Attention scores amplify q/k errors through the softmax: the reference leaves them unclipped.
_NO_CLIP = ("q_proj", "k_proj")


@dataclass
class AWQResult:
    """What :func:`awq_model` did.

    Attributes:
        alphas, errors: per fold (``"<block prefix><producer> -> <layers>"``) the chosen alpha and the search's
            output error with it and with plain RTN (``(awq, rtn)``).
        originals: scaled, unclipped weights of the target layers (path -> CPU tensor) when ``keep_original``.
        changed: names (in the plain model) of the non-target parameters the folds changed (norm gains and biases,
            producer linears that are not targets): what a quantized base must carry besides its quantized layers.
    """

    alphas: dict[str, float] = field(default_factory=dict)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    originals: dict[str, torch.Tensor] | None = None
    changed: list[str] = field(default_factory=list)


def _param_names(model: nn.Module, ids: set[int], skip_prefixes: Sequence[str]) -> list[str]:
    names = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in ids and not any(name.startswith(s + ".") for s in skip_prefixes):
            names.append(name)
    return names


@torch.no_grad()
def awq_model(
    model: nn.Module,
    calib_batches: Sequence[Any],
    spec: QuantSpec,
    targets: str | Sequence[str] = "all-linear",
    *,
    exclude: Sequence[str] = ("lm_head",),
    alphas: Sequence[float] | None = None,
    duo_scaling: bool = False,
    clip: bool = False,
    max_search_tokens: int | None = None,
    device: torch.device | str | None = None,
    keep_original: bool = False,
    progress: bool = False,
) -> AWQResult:
    """Search and fold AWQ scales (and clip, with `clip`) into the float model in place; nothing is quantized yet.

    Args:
        max_search_tokens: score each alpha on at most this many evenly spaced calibration rows (None: all); the
            activation statistic ``mean|x|`` always uses all of them.
    """
    from slimtune.quant.drivers import _check_spec
    from slimtune.quant.folds import walk_fold_blocks
    from slimtune.quant.targets import find_linear_layers
    from slimtune.select import base_model

    _check_spec(spec)
    alphas = default_alphas() if alphas is None else check_alphas(alphas)
    if max_search_tokens is not None and (isinstance(max_search_tokens, bool) or not isinstance(max_search_tokens, int)
                                          or max_search_tokens < 1):
        raise SlimtuneError(f"max_search_tokens={max_search_tokens!r} is not valid; valid: null or a positive int")
    base = base_model(model)
    result = AWQResult(originals={} if keep_original else None)

    from slimtune.quant.folds import apply_fold

    def work(bw) -> None:
        clip_inputs = []
        for fold, names, captured in zip(bw.folds, bw.targets, bw.inputs):
            x = captured.float()
            xs = x if max_search_tokens is None or x.shape[0] <= max_search_tokens else \
                x[:: x.shape[0] // max_search_tokens][:max_search_tokens]
            layers = [fold.layers[fold.names.index(n)] for n in names]
            found = awq_search_scales(xs, [m.weight for m in layers], spec, alphas, expand=fold.expand,
                                      width=fold.width, duo_scaling=duo_scaling)
            if xs is not x:  # the statistic over all rows, the exponent from the search
                found.scales = _scales_for(x, fold, found.alpha, duo_scaling, layers, spec)
            apply_fold(fold, found.scales)
            key = f"{bw.prefix}{fold.prev_name} -> {', '.join(fold.names)}"
            result.alphas[key] = found.alpha
            result.errors[key] = (found.error, found.rtn_error)
            if clip:  # the clipping search reads the scaled inputs, on a few hundred tokens
                step = max(1, x.shape[0] // _CLIP_TOKENS)
                clip_inputs.append(x[::step][:_CLIP_TOKENS] / fold.layer_scales(found.scales.to(x.device)))
            del x, xs
        bw.verify()
        if result.originals is not None:
            for fold, names in zip(bw.folds, bw.targets):
                for n in names:
                    layer = fold.layers[fold.names.index(n)]
                    result.originals[_path_of(base, layer)] = layer.weight.detach().to("cpu", copy=True)
        if clip:
            for fold, names, x in zip(bw.folds, bw.targets, clip_inputs):
                for n in names:
                    if n.rpartition(".")[2] in _NO_CLIP:
                        continue
                    layer = fold.layers[fold.names.index(n)]
                    _clip_weight(layer, awq_clip_ranges(x, layer.weight, spec, n_tokens=_CLIP_TOKENS), spec)

    touched = walk_fold_blocks(base, calib_batches, targets, exclude, "AWQ", work,
                               device=device, progress=progress)
    target_paths = list(find_linear_layers(base, targets, exclude))
    result.changed = _param_names(base, touched, target_paths)
    return result


def _scales_for(x, fold, alpha, duo_scaling, layers, spec) -> torch.Tensor:
    x_mean = fold.reduce(x.abs().mean(dim=0))
    if duo_scaling:
        W = torch.cat([m.weight.detach().float().to(x.device) for m in layers])
        w_mean = fold.reduce(_normalised_weight_mean(W, spec))
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
    else:
        s = x_mean.pow(alpha).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def _path_of(root: nn.Module, layer: nn.Module) -> str:
    for name, m in root.named_modules():
        if m is layer:
            return name
    raise SlimtuneError("layer not found in the model")  # pragma: no cover - folds come from the model itself


@torch.no_grad()
def quantize_model_awq(
    model: nn.Module,
    calib_batches: Sequence[Any],
    spec: QuantSpec,
    targets: str | Sequence[str] = "all-linear",
    *,
    exclude: Sequence[str] = ("lm_head",),
    method: str = "rtn",
    alphas: Sequence[float] | None = None,
    duo_scaling: bool = False,
    clip: bool = False,
    max_search_tokens: int | None = None,
    device: torch.device | str | None = None,
    keep_original: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    progress: bool = False,
    **gptq_kwargs,
) -> AWQResult:
    """AWQ then RTN (``method="rtn"``) or GPTQ (``"gptq"``, with `gptq_kwargs`: damp, block_size, act_order,
    true_sequential) of the target layers, in place (``nn.Linear`` -> ``QuantLinear``).

    Returns the :class:`AWQResult`; with `keep_original` its ``originals`` are the scaled float weights (what LoRC
    should reconstruct: the layers compute on scaled inputs).
    """
    from slimtune.quant.drivers import quantize_model_gptq, quantize_model_rtn

    if method not in ("rtn", "gptq"):
        raise SlimtuneError(f"AWQ method={method!r} is not valid; valid: rtn, gptq")
    result = awq_model(model, calib_batches, spec, targets, exclude=exclude, alphas=alphas, duo_scaling=duo_scaling,
                       clip=clip, max_search_tokens=max_search_tokens, device=device, keep_original=keep_original,
                       progress=progress)
    if method == "rtn":
        quantize_model_rtn(model, spec, targets, exclude=exclude, scale_dtype=scale_dtype)
    else:
        quantize_model_gptq(model, calib_batches, spec, targets, exclude=exclude, device=device,
                            scale_dtype=scale_dtype, progress=progress, **gptq_kwargs)
    return result
