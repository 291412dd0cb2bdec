"""LoRC: low-rank compensation of quantization error (with LoftQ-style refinement).

A quantized weight ``Q`` leaves an error ``E = W - Q``. LoRC stores a rank-r
approximation ``B @ A`` of ``E`` (the best one, from a truncated SVD), which
also serves as the initialisation of LoRA adapters on top of ``Q``.

The factor math (:func:`lorc_factors`, :func:`lorc_init`) comes first; then LoRC on quantized models:
:func:`apply_lorc` (every ``QuantLinear``), :func:`add_lorc_adapters` (PEFT LoRA on them, LoRC-initialised),
:func:`lorc_nf4` (the same for bitsandbytes ``Linear4bit`` layers), and, for a model that already has LoRA layers,
:func:`lorc_factors_for_layer` with :func:`init_lora_from_factors`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.grid import dequantize_values, group_index, quantize_to_grid
from slimtune.quant.layers import QuantLinear, register_quant_lora
from slimtune.quant.nf4 import NF4Spec, nf4_dequantize, nf4_linear

# Above this smaller dimension, a small rank uses the randomized SVD.
_EXACT_SVD_MAX_DIM = 2048
# Extra sketch columns and power iterations for torch.svd_lowrank accuracy.
_LOWRANK_OVERSAMPLE = 16
_LOWRANK_NITER = 4
_SVD_METHODS = ("auto", "exact", "lowrank")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_matrix(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        desc = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}={desc} is not valid; valid: a 2-D floating [out, in] tensor")


def _check_rank(rank: int, shape: torch.Size) -> None:
    max_rank = min(shape)
    if not _is_int(rank) or not 1 <= rank <= max_rank:
        raise ValueError(f"rank={rank!r} is not valid; valid: an int in [1, {max_rank}] for shape {tuple(shape)}")


def lorc_factors(
    error: torch.Tensor, rank: int, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(lora_A [rank, in], lora_B [out, rank])`` with ``B @ A ≈ error``.

    Singular values are split as ``sqrt(S)`` onto both factors so A and B have
    balanced scales. ``method``: ``"exact"`` (full SVD), ``"lowrank"``
    (randomized ``torch.svd_lowrank``) or ``"auto"`` (lowrank only for large
    matrices with a comparatively small rank).
    """
    _check_matrix("error", error)
    _check_rank(rank, error.shape)
    if method not in _SVD_METHODS:
        raise ValueError(f"method={method!r} is not valid; valid: {', '.join(_SVD_METHODS)}")

    min_dim = min(error.shape)
    sketch = min(rank + _LOWRANK_OVERSAMPLE, min_dim)
    if method == "auto":
        method = "lowrank" if min_dim > _EXACT_SVD_MAX_DIM and 4 * sketch < min_dim else "exact"

    e32 = error.detach().float()  # SVD in half precision is unsupported/inaccurate
    if method == "exact":
        U, S, Vh = torch.linalg.svd(e32, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(e32, q=sketch, niter=_LOWRANK_NITER)
        Vh = V.T
    root_s = S[:rank].sqrt()
    lora_A = root_s.unsqueeze(1) * Vh[:rank]
    lora_B = U[:, :rank] * root_s.unsqueeze(0)
    return lora_A.to(error.dtype).contiguous(), lora_B.to(error.dtype).contiguous()


def lorc_init(
    weight: torch.Tensor,
    quantize_fn: Callable[[torch.Tensor], torch.Tensor],
    rank: int,
    iters: int = 1,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` and fit low-rank factors to the error: ``(dequantized_base, A, B)``.

    ``quantize_fn`` maps a weight to its dequantized quantization (RTN,
    GPTQ, NF4, ...). With ``iters > 1`` LoftQ alternation refines the pair:
    quantize ``W - B @ A``, then refit ``A, B`` to ``W - Q``. The iterate with
    the smallest residual ``||W - Q - B @ A||`` is returned, so extra
    iterations never make the result worse.
    """
    _check_matrix("weight", weight)
    _check_rank(rank, weight.shape)
    if not _is_int(iters) or iters < 1:
        raise ValueError(f"iters={iters!r} is not valid; valid: an int >= 1")
    if not callable(quantize_fn):
        raise ValueError(f"quantize_fn={quantize_fn!r} is not valid; valid: a callable weight -> weight")

    w32 = weight.detach().float()
    target = weight.detach()
    best: tuple[float, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for _ in range(iters):
        base = quantize_fn(target)
        if not isinstance(base, torch.Tensor) or base.shape != weight.shape:
            shape = tuple(base.shape) if isinstance(base, torch.Tensor) else type(base).__name__
            raise ValueError(
                f"quantize_fn output shape={shape} is not valid; valid: {tuple(weight.shape)}"
            )
        error = w32 - base.float()
        lora_A, lora_B = lorc_factors(error, rank, method=method)
        low_rank = lora_B.float() @ lora_A.float()
        residual = torch.linalg.matrix_norm(error - low_rank).item()
        if best is None or residual < best[0]:
            best = (residual, base, lora_A, lora_B)
        # Next round quantizes what the low-rank part does not already explain.
        target = (w32 - low_rank).to(weight.dtype)

    _, base, lora_A, lora_B = best
    return base.to(weight.dtype), lora_A.to(weight.dtype), lora_B.to(weight.dtype)


# --------------------------------------------------------------------------- LoRC on whole models


def _check_layer_rank(rank: Any, shape: tuple[int, int], name: str) -> None:
    limit = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise SlimtuneError(f"rank={rank!r} is not valid for layer {name} {tuple(shape)}; valid: an int in [1, {limit}]")


def _quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _check_originals(original_weights: Any, layers: dict[str, nn.Module], kind: str) -> None:
    if not isinstance(original_weights, dict) or not original_weights:
        raise SlimtuneError(
            "original_weights is missing; valid: the dict returned by quantizing with keep_original=True"
        )
    if not layers:
        raise SlimtuneError(f"the model has no {kind} layers; valid: quantize it first")
    missing = [n for n in layers if n not in original_weights]
    if missing:
        raise SlimtuneError(
            f"original weight of layer {missing[0]} is missing; valid: the dict returned by quantizing with keep_original=True"
        )


@torch.no_grad()
def apply_lorc(
    model: nn.Module,
    rank: int,
    iters: int = 1,
    original_weights: dict[str, torch.Tensor] | None = None,
    *,
    method: str = "auto",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRC factors of every ``QuantLinear``: ``B @ A ≈ W - dequant(Q)``.

    Returns ``{name: (A [rank, in], B [out, rank])}`` (float32, on the layer's
    device). With ``iters > 1`` (LoftQ alternation) the codes are refined:
    ``W - B @ A`` is RTN-requantized with the layer's grid and the factors
    refit to the new error; the iterate with the smallest residual
    ``||W - Q - B @ A||`` wins and its codes are written into the layer
    (iteration 0 keeps the existing, e.g. GPTQ, codes).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise SlimtuneError(f"iters={iters!r} is not valid; valid: an int >= 1")
    layers = _quant_layers(model)
    _check_originals(original_weights, layers, "QuantLinear")
    factors = {}
    for name, layer in layers.items():
        _check_layer_rank(rank, (layer.out_features, layer.in_features), name)
        dev = layer.qweight.device
        w = original_weights[name].to(device=dev, dtype=torch.float32)
        if tuple(w.shape) != (layer.out_features, layer.in_features):
            raise SlimtuneError(
                f"original weight of layer {name} has shape {tuple(w.shape)}; valid: "
                f"{(layer.out_features, layer.in_features)}"
            )
        base = layer.dequantized_weight()
        best = None
        new_codes = None
        lora_A = lora_B = None  # the previous iterate's factors
        for it in range(iters):
            if it > 0:
                q, s, z = quantize_to_grid(w - lora_B @ lora_A, layer.spec)
                s = s.to(layer.scales.dtype)  # dequantize as the layer will, with stored scales
                g = group_index(layer.in_features, layer.spec, device=dev)
                base = dequantize_values(q, s.float()[:, g], z[:, g])
                new_codes = (q, s, z)
            error = w - base
            lora_A, lora_B = lorc_factors(error, rank, method=method)
            lora_A, lora_B = lora_A.float(), lora_B.float()
            residual = torch.linalg.matrix_norm(error - lora_B @ lora_A).item()
            if best is None or residual < best[0]:
                best = (residual, lora_A, lora_B, new_codes)
        _, lora_A, lora_B, codes = best
        if codes is not None:
            layer.g_idx = None  # RTN groups are the default column order
            layer.set_codes(*codes)
        factors[name] = (lora_A, lora_B)
    return factors


@torch.no_grad()
def init_lora_from_factors(wrapper: nn.Module, adapter: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """Set the first ``k`` components of a PEFT LoRA layer's ``adapter`` so that ``scaling * B @ A`` equals
    ``lora_b @ lora_a`` (rank ``k``; PEFT computes ``scaling * B @ A``, so B is stored divided by the scaling). A
    rank below the LoRA r leaves the other rows of A at their init and zeroes the other columns of B."""
    k = lora_a.shape[0]
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    scaling = wrapper.scaling[adapter]
    a[:k].copy_(lora_a.to(device=a.device, dtype=a.dtype))
    b.zero_()
    b[:, :k].copy_((lora_b / scaling).to(device=b.device, dtype=b.dtype))


def _init_peft_lora(peft_model, factors, adapter_name: str) -> None:
    base = peft_model.get_base_model()
    for name, (lora_A, lora_B) in factors.items():
        init_lora_from_factors(base.get_submodule(name), adapter_name, lora_A, lora_B)


@torch.no_grad()
def lorc_factors_for_layer(layer: nn.Module, weight: torch.Tensor, rank: int, iters: int = 1,
                           nf4: NF4Spec | None = None) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """LoRC of one quantized layer: ``(A [rank, in], B [out, rank], layer)`` with ``B @ A ~= W - dequant(Q)``.

    ``layer`` is a ``QuantLinear`` or a bitsandbytes ``Linear4bit`` (then ``nf4`` is its spec), ``weight`` its float
    weight before quantization. With ``iters > 1`` LoftQ iterations may replace the codes: the returned layer is the
    one to use (the same ``QuantLinear``, codes rewritten in place; for NF4 possibly a new ``Linear4bit``).
    """
    if isinstance(layer, QuantLinear):
        holder = nn.Module()
        holder.add_module("layer", layer)
        (lora_a, lora_b), = apply_lorc(holder, rank, iters, {"layer": weight}).values()
        return lora_a, lora_b, layer
    # bitsandbytes NF4: the same alternation, re-quantizing W - B A with NF4 (round to nearest; the first iterate
    # keeps the layer's codes, e.g. GPTQ-NF4's, and the smallest residual wins).
    w = weight.to(device=layer.weight.device, dtype=torch.float32)
    best, current = None, layer
    for it in range(iters):
        if it > 0:
            current = nf4_linear((w - lora_b @ lora_a).to(weight.dtype), layer.bias, nf4,
                                 layer.compute_dtype or weight.dtype)
        error = w - nf4_dequantize(current)
        lora_a, lora_b = (f.float() for f in lorc_factors(error, rank))
        residual = torch.linalg.matrix_norm(error - lora_b @ lora_a).item()
        if best is None or residual < best[0]:
            best = (residual, lora_a, lora_b, current)
    return best[1], best[2], best[3]


def add_lorc_adapters(
    model: nn.Module,
    original_weights: dict[str, torch.Tensor],
    rank: int,
    alpha: float | None = None,
    iters: int = 1,
    *,
    adapter_name: str = "default",
    lora_dropout: float = 0.0,
    method: str = "auto",
    task_type: str | None = None,
):
    """Wrap ``model`` with PEFT LoRA on its ``QuantLinear`` layers initialised from LoRC.

    ``lora_A``/``lora_B`` are set so that ``scaling * B @ A`` (PEFT's
    ``scaling = alpha / rank``; ``alpha`` defaults to ``rank``) equals the
    LoRC factorisation of ``W - Q``, so at step 0 each layer computes
    ``(Q + B A) x ≈ W x``. ``iters > 1`` refines codes and factors LoftQ-style
    (see :func:`apply_lorc`). ``task_type`` (e.g. ``"CAUSAL_LM"``) goes to the
    ``LoraConfig``. The mapping QuantLinear -> QuantLinearLora is registered on
    the config (see :mod:`slimtune.quant.layers`). Returns the ``peft.PeftModel``.
    """
    from peft import LoraConfig, get_peft_model

    factors = apply_lorc(model, rank, iters, original_weights, method=method)
    alpha = rank if alpha is None else alpha
    config = register_quant_lora(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(factors), lora_dropout=lora_dropout,
                   init_lora_weights=False, task_type=task_type)
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _init_peft_lora(peft_model, factors, adapter_name)
    return peft_model




def lorc_nf4(
    model: nn.Module,
    original_weights: dict[str, torch.Tensor],
    rank: int,
    alpha: float | None = None,
    *,
    adapter_name: str = "default",
    lora_dropout: float = 0.0,
    method: str = "auto",
):
    """LoRC for bitsandbytes ``Linear4bit`` layers: PEFT LoRA initialised to ``W - dequant(NF4(W))``.

    Every ``Linear4bit`` in ``model`` needs its original weight in
    ``original_weights``. Returns the ``peft.PeftModel`` (works on CPU).
    """
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    _check_originals(original_weights, layers, "bitsandbytes Linear4bit")
    factors = {}
    with torch.no_grad():
        for name, layer in layers.items():
            _check_layer_rank(rank, (layer.out_features, layer.in_features), name)
            deq = nf4_dequantize(layer)
            w = original_weights[name].to(device=deq.device, dtype=torch.float32)
            if w.shape != deq.shape:
                raise SlimtuneError(
                    f"original weight of layer {name} has shape {tuple(w.shape)}; valid: {tuple(deq.shape)}"
                )
            lora_A, lora_B = lorc_factors(w - deq, rank, method=method)
            factors[name] = (lora_A.float(), lora_B.float())
    alpha = rank if alpha is None else alpha
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(factors), lora_dropout=lora_dropout,
                        init_lora_weights=False)
    model.is_loaded_in_4bit = True  # PEFT's bnb 4-bit dispatch keys on this flag
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _init_peft_lora(peft_model, factors, adapter_name)
    return peft_model
