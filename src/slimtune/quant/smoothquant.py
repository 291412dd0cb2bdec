"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights, then 8-bit weights and activations.

For the layers reading one tensor ``x`` (the fold positions of :mod:`slimtune.quant.folds`), the per-channel scale
``s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)`` (``max|w_j|`` over the rows of every layer reading ``x``) divides
``x`` (folded into the norm or linear producing it) and multiplies the weight columns: the float function is unchanged,
while ``x``'s channels become flatter (easier to quantize per token) and the weights take on the difference. ``alpha``
in [0, 1] is the migration strength (0.5 in the paper; 0 leaves ``x`` as it is).

Then :class:`W8A8Linear`: weights 8-bit symmetric per output channel (the codes of a :class:`QuantLinear` with
``QuantSpec(8, None, symmetric=True)``), activations quantized per token to 8 bits (symmetric, ``max|x|/127``) on
every call. The output is computed either in float from the dequantized operands (fake quantization, the reference
for quality) or, with ``int8_matmul``, by an int8 x int8 -> int32 matmul (``torch._int_mm``) scaled afterwards; both
compute the same sums of integer products. Gradients flow to the input through the activation rounding as identity
(straight-through), so LoRA layers below train; a forward that needs gradients uses the float path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.grid import QuantSpec
from slimtune.quant.layers import QuantLinear

__all__ = ["W8A8_SPEC", "SmoothResult", "W8A8Linear", "quantize_activations_per_token", "quantize_model_w8a8",
           "smooth_model", "smooth_scales"]

W8A8_SPEC = QuantSpec(8, None, symmetric=True)
_ACT_MAX = 127.0


def check_alpha(alpha: Any, what: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or not 0.0 <= alpha <= 1.0:
        raise SlimtuneError(f"{what}={alpha!r} is not valid; valid: a float in [0, 1]")
    return float(alpha)


def smooth_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|x|^alpha / max|w|^(1-alpha)`` per channel; channels that never fire (or all-zero columns) keep 1."""
    alpha = check_alpha(alpha)
    a, w = act_max.float(), weight_max.float().to(act_max.device)
    s = a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s))


def quantize_activations_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes of ``x [tokens, in]`` (float, in [-127, 127]) and the per-token scales ``[tokens, 1]``."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / _ACT_MAX
    return torch.clamp(torch.round(x / scale), -_ACT_MAX, _ACT_MAX), scale


class W8A8Linear(QuantLinear):
    """8-bit per-channel weights (:class:`QuantLinear` codes) and 8-bit per-token activations; see module docstring.

    Args:
        int8_matmul: compute inference forwards with ``torch._int_mm`` (int8 x int8 -> int32); the float path is used
            when gradients are needed or the device's kernel does not take the shapes.
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec = W8A8_SPEC, bias: bool = True, *,
                 int8_matmul: bool = False, **kwargs) -> None:
        if spec != W8A8_SPEC:
            raise SlimtuneError(f"W8A8Linear spec={spec!r} is not valid; valid: {W8A8_SPEC!r}")
        super().__init__(in_features, out_features, spec, bias, **kwargs)
        self.int8_matmul = bool(int8_matmul)

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: QuantSpec = W8A8_SPEC, *, scale_dtype: torch.dtype = torch.float32,
                    int8_matmul: bool = False) -> W8A8Linear:
        layer = super().from_linear(linear, spec, scale_dtype=scale_dtype)
        layer.int8_matmul = bool(int8_matmul)
        return layer

    def int_weight(self) -> torch.Tensor:
        """Signed weight codes ``[out, in]`` (int8; the symmetric grid's zero point is 128)."""
        return (self.codes().to(torch.int16) - 128).to(torch.int8)

    def _int_mm_ok(self, rows: int) -> bool:
        if not hasattr(torch, "_int_mm"):
            return False
        if self.qweight.device.type == "cuda":  # cuBLAS int8 GEMM shape limits
            return rows > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0
        return self.qweight.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xs = x.reshape(-1, self.in_features).float()
        codes, a_scale = quantize_activations_per_token(xs)
        w_scale = self.scales.float()[:, 0]
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if self.int8_matmul and not needs_grad and self._int_mm_ok(xs.shape[0]):
            acc = torch._int_mm(codes.to(torch.int8), self.int_weight().T)
            out = acc.float() * a_scale * w_scale
        else:
            x_q = codes * a_scale
            if needs_grad:  # straight-through: rounding passes the gradient unchanged
                x_q = xs + (x_q - xs).detach()
            out = F.linear(x_q, self.int_weight().float() * w_scale[:, None])
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activations=int8 per token, int8_matmul={self.int8_matmul}"


@dataclass
class SmoothResult:
    """What :func:`smooth_model` did: per fold the scales (CPU), and the changed non-target parameter names."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)


@torch.no_grad()
def smooth_model(
    model: nn.Module,
    calib_batches: Sequence[Any],
    targets: str | Sequence[str] = "all-linear",
    *,
    exclude: Sequence[str] = ("lm_head",),
    alpha: float = 0.5,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> SmoothResult:
    """Fold SmoothQuant scales into the float model in place (its function is unchanged); nothing is quantized."""
    from slimtune.quant.awq import _param_names
    from slimtune.quant.folds import apply_fold, walk_fold_blocks
    from slimtune.quant.targets import find_linear_layers
    from slimtune.select import base_model

    alpha = check_alpha(alpha)
    base = base_model(model)
    result = SmoothResult()

    def work(bw) -> None:
        for fold, x in zip(bw.folds, bw.inputs):
            act_max = fold.reduce(x.abs().amax(dim=0).float(), "max")
            w_cols = torch.cat([m.weight.detach().float().to(x.device) for m in fold.layers]).abs().amax(dim=0)
            s = smooth_scales(act_max, fold.reduce(w_cols, "max"), alpha)
            apply_fold(fold, s)
            result.scales[f"{bw.prefix}{fold.prev_name} -> {', '.join(fold.names)}"] = s.cpu()
        bw.verify()

    touched = walk_fold_blocks(base, calib_batches, targets, exclude, "SmoothQuant", work, device=device,
                               progress=progress)
    result.changed = _param_names(base, touched, list(find_linear_layers(base, targets, exclude)))
    return result


@torch.no_grad()
def quantize_model_w8a8(
    model: nn.Module,
    targets: str | Sequence[str] = "all-linear",
    *,
    exclude: Sequence[str] = ("lm_head",),
    int8_matmul: bool = False,
    keep_original: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor] | None:
    """Swap the target ``nn.Linear`` layers for :class:`W8A8Linear` in place; the original weights when asked."""
    from slimtune.quant.targets import check_float_linear, find_linear_layers, set_module
    from slimtune.select import base_model

    base = base_model(model)
    layers = find_linear_layers(base, targets, exclude)
    for name, module in layers.items():
        check_float_linear(name, module, "W8A8 quantization")
    originals: dict[str, torch.Tensor] | None = {} if keep_original else None
    for name, module in layers.items():
        if originals is not None:
            originals[name] = module.weight.detach().to("cpu", copy=True)
        set_module(base, name, W8A8Linear.from_linear(module, scale_dtype=scale_dtype, int8_matmul=int8_matmul))
    return originals
