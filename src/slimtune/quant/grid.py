"""Uniform integer quantization grids and round-to-nearest (RTN) quantization.

Weights are ``[out_features, in_features]``. Quantization parameters are
computed per output row and per group of consecutive input columns; a group
size that does not divide ``in_features`` leaves a smaller (ragged) last group.
Parameter tensors have shape ``[out_features, n_groups]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but True/False are never meant as sizes.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a weight matrix.

    Attributes:
        bits: Bit width, one of 2, 3, 4, 8.
        group_size: Input columns sharing one scale/zero; ``None`` means one
            group per output channel (the whole row).
        symmetric: Signed grid centred on zero (GPTQ ``sym``) instead of a
            min/max grid with an integer zero point.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in SUPPORTED_BITS:
            valid = ", ".join(str(b) for b in SUPPORTED_BITS)
            raise ValueError(f"bits={self.bits!r} is not supported; valid: {valid}")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size <= 0):
            raise ValueError(
                f"group_size={self.group_size!r} is not valid; valid: None or a positive int"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric={self.symmetric!r} is not valid; valid: True or False")

    @property
    def maxq(self) -> int:
        """Largest integer code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        """Number of groups along the input dimension (the last may be ragged)."""
        if self.group_size is None:
            return 1
        return math.ceil(in_features / self.group_size)


def group_index(in_features: int, spec: QuantSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """Group id of every input column (``g_idx``): ``col // group_size``, or all 0 per channel."""
    cols = torch.arange(in_features, device=device)
    if spec.group_size is None:
        return torch.zeros_like(cols)
    return cols // spec.group_size


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"weight shape={shape} is not valid; valid: a 2-D [out, in] tensor")
    if not w.is_floating_point():
        raise ValueError(f"weight dtype={w.dtype} is not valid; valid: a floating dtype")


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for value ranges ``[xmin, xmax]`` (any matching shapes).

    The range is widened to include 0 so that 0 is exactly representable
    (zeroed/dead weights stay zero); an all-zero range falls back to [-1, 1]
    to avoid a zero scale.
    """
    xmin = torch.clamp(xmin.float(), max=0.0)
    xmax = torch.clamp(xmax.float(), min=0.0)
    if spec.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)

    scale = (xmax - xmin) / spec.maxq
    if spec.symmetric:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) ``(scale, zero)`` of ``w``, each float32 ``[out, n_groups]``."""
    _check_weight(w)
    out_features, in_features = w.shape
    step = in_features if spec.group_size is None else spec.group_size
    n_groups = spec.n_groups(in_features)
    xmin = w.new_empty(out_features, n_groups, dtype=torch.float32)
    xmax = torch.empty_like(xmin)
    for g, start in enumerate(range(0, in_features, step)):
        block = w[:, start : start + step].float()  # slicing handles the ragged tail
        xmin[:, g] = block.amin(dim=1)
        xmax[:, g] = block.amax(dim=1)
    return qparams_from_range(xmin, xmax, spec)


def quantize_values(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Integer codes (as float) of ``w`` for broadcastable ``scale``/``zero``."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, spec.maxq)


def dequantize_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)`` in float32; the single formula every dequantization uses."""
    return scale * (q.float() - zero)


def quantize_to_grid(
    w: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN-quantize ``w`` to ``(q_int uint8 [out, in], scale, zero)``."""
    scale, zero = compute_qparams(w, spec)
    g_idx = group_index(w.shape[1], spec, device=w.device)
    q = quantize_values(w, scale[:, g_idx], zero[:, g_idx], spec)
    return q.to(torch.uint8), scale, zero


def dequantize(
    q_int: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Float32 weight ``scale * (q - zero)`` with the group params expanded per column."""
    if q_int.dim() != 2:
        raise ValueError(f"q_int shape={tuple(q_int.shape)} is not valid; valid: a 2-D [out, in] tensor")
    in_features = q_int.shape[1]
    expected = (q_int.shape[0], spec.n_groups(in_features))
    if tuple(scale.shape) != expected or tuple(zero.shape) != expected:
        raise ValueError(
            f"scale/zero shape={tuple(scale.shape)}/{tuple(zero.shape)} is not valid; valid: {expected}"
        )
    g_idx = group_index(in_features, spec, device=q_int.device)
    return dequantize_values(q_int, scale[:, g_idx], zero[:, g_idx])


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest quantize then dequantize ``w``; returns ``w.dtype``."""
    q_int, scale, zero = quantize_to_grid(w, spec)
    return dequantize(q_int, scale, zero, spec).to(w.dtype)
