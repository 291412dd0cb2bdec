"""GPTQ / OPTQ post-training quantization (Frantar et al., 2022).

For a linear layer with weight ``W [out, in]`` and calibration inputs ``x``,
GPTQ quantizes ``W`` column by column and spreads each column's rounding error
onto the not-yet-quantized columns using the inverse Hessian of the layer's
squared output error, ``H = 2/n * sum(x x^T)``. Columns are processed in
blocks whose updates to the remaining columns are applied lazily (once per
block), and columns may be visited in order of decreasing Hessian diagonal
("act order").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from slimtune.quant.grid import (
    QuantSpec,
    dequantize,
    group_index,
    qparams_from_range,
)

# Cholesky retries multiply the damping by this factor each time.
_DAMP_GROWTH = 10.0
_MAX_CHOLESKY_TRIES = 5
# Damping used for the first retry when the caller asked for damp=0.
_FALLBACK_DAMP = 0.01


@dataclass
class GPTQResult:
    """Output of :meth:`GPTQ.quantize`; all tensors use the ORIGINAL column order.

    Attributes:
        q_int: uint8 codes ``[out, in]`` in ``[0, 2**bits - 1]``.
        scale: float32 ``[out, n_groups]``; the group of column ``c`` is
            ``c // group_size`` (see :func:`slimtune.quant.grid.group_index`).
        zero: float32 integer-valued zero points, same shape as ``scale``.
        dequantized_weight: ``dequantize(q_int, scale, zero, spec)`` in the
            input weight's dtype.
        perm: Column visiting order used with ``act_order``, else ``None``.
        loss: GPTQ's error proxy ``sum((w - q)^2 / d^2) / 2`` over all columns.
    """

    q_int: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    dequantized_weight: torch.Tensor
    perm: torch.Tensor | None
    loss: float


@dataclass
class CodebookResult:
    """Output of :meth:`GPTQ.quantize_codebook`, in the original column order.

    Attributes:
        codes: uint8 ``[out, in]`` indices into the given codebook.
        dequantized_weight: ``codebook[codes] * scale`` in the input weight's dtype.
        perm: Column visiting order used with ``act_order``, else ``None``.
        loss: GPTQ's error proxy.
    """

    codes: torch.Tensor
    dequantized_weight: torch.Tensor
    perm: torch.Tensor | None
    loss: float


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class GPTQ:
    """Accumulates one linear layer's input Hessian and GPTQ-quantizes its weight.

    Args:
        layer_in_features: Input width of the layer (columns of its weight).
        hessian_dtype: Accumulation dtype of the Hessian (float32 or float64).
    """

    def __init__(self, layer_in_features: int, hessian_dtype: torch.dtype = torch.float32) -> None:
        if not _is_int(layer_in_features) or layer_in_features <= 0:
            raise ValueError(
                f"layer_in_features={layer_in_features!r} is not valid; valid: a positive int"
            )
        if hessian_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"hessian_dtype={hessian_dtype} is not valid; valid: torch.float32, torch.float64"
            )
        self.in_features = layer_in_features
        self.hessian_dtype = hessian_dtype
        self.hessian: torch.Tensor | None = None  # created on the first batch's device
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, inputs: torch.Tensor) -> None:
        """Fold layer inputs ``[..., in_features]`` into ``H = 2/n * sum(x x^T)``."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0 or inputs.shape[-1] != self.in_features:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(
                f"inputs shape={shape} is not valid; valid: [..., {self.in_features}]"
            )
        x = inputs.detach().reshape(-1, self.in_features).to(self.hessian_dtype)
        n_new = x.shape[0]
        if n_new == 0:
            return
        if not torch.isfinite(x.sum()):  # one cheap reduction instead of an elementwise check per batch
            raise ValueError("inputs contain NaN/inf values; valid: finite activations")
        if self.hessian is None:
            self.hessian = torch.zeros(
                self.in_features, self.in_features, dtype=self.hessian_dtype, device=x.device
            )
        total = self.nsamples + n_new
        # Running average: rescale the old sum so H stays 2/n * sum(x x^T).
        self.hessian.mul_(self.nsamples / total)
        self.hessian.addmm_(x.T, x, alpha=2.0 / total)
        self.nsamples = total

    @torch.no_grad()
    def quantize(
        self,
        weight: torch.Tensor,
        spec: QuantSpec,
        damp: float = 0.01,
        block_size: int = 128,
        act_order: bool = False,
    ) -> GPTQResult:
        """GPTQ-quantize ``weight [out, in_features]`` with the accumulated Hessian.

        Args:
            weight: Layer weight; not modified.
            spec: Grid description (bits, group size, symmetry).
            damp: Fraction of the mean Hessian diagonal added to the diagonal.
            block_size: Columns per lazy-update block.
            act_order: Visit columns by decreasing Hessian diagonal. Groups stay
                defined on the original column order (``c // group_size``).
        """
        self._check_quantize_args(weight, spec, damp, block_size, act_order)
        W, Hinv, perm = self._prepare(weight, damp, act_order)
        device, (n_out, n_cols) = W.device, W.shape
        g_of_col = group_index(n_cols, spec, device=device)
        if perm is not None:
            g_of_col = g_of_col[perm]  # group id (original order) of each walk position

        n_groups = spec.n_groups(n_cols)
        scale = torch.zeros(n_out, n_groups, dtype=torch.float32, device=device)
        zero = torch.zeros_like(scale)
        group_ready = [False] * n_groups
        group_scale: list[torch.Tensor | None] = [None] * n_groups  # contiguous [out] vectors, made once per group
        group_zero: list[torch.Tensor | None] = [None] * n_groups
        g_list = g_of_col.tolist()
        maxq = float(spec.maxq)

        def quantize_column(pos: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g = g_list[pos]
            if not group_ready[g]:
                # First column of group g in walk order: fit its grid to the
                # current (error-updated) weights of all its columns.
                members_w = W[:, (g_of_col == g).nonzero().squeeze(1)]
                scale[:, g], zero[:, g] = qparams_from_range(members_w.amin(dim=1), members_w.amax(dim=1), spec)
                group_scale[g], group_zero[g] = scale[:, g].contiguous(), zero[:, g].contiguous()
                group_ready[g] = True
            s, z = group_scale[g], group_zero[g]
            # quantize_values/dequantize_values' formula, in place: this runs once per input column.
            q = torch.div(w, s).round_().add_(z).clamp_(0.0, maxq)
            return q, (q - z).mul_(s)

        codes, loss = _error_feedback_walk(W, Hinv, block_size, quantize_column)

        if perm is not None:
            codes = codes[:, torch.argsort(perm)]
        q_int = codes.to(torch.uint8).to(weight.device)
        scale, zero = scale.to(weight.device), zero.to(weight.device)
        # Dequantize from the returned tensors so they reproduce it exactly.
        dequantized = dequantize(q_int, scale, zero, spec).to(weight.dtype)
        return GPTQResult(
            q_int=q_int,
            scale=scale,
            zero=zero,
            dequantized_weight=dequantized,
            perm=None if perm is None else perm.to(weight.device),
            loss=loss,
        )

    @torch.no_grad()
    def quantize_codebook(
        self,
        weight: torch.Tensor,
        codebook: torch.Tensor,
        scale: torch.Tensor,
        group_size: int,
        damp: float = 0.01,
        block_size: int = 128,
        act_order: bool = False,
    ) -> CodebookResult:
        """GPTQ with a fixed non-uniform grid: each weight becomes ``codebook[code] * scale[row, col // group_size]``.

        The scales are given (static groups), which is what a storage format with precomputed per-block scales
        needs: bitsandbytes NF4/FP4 keep one absmax per block of ``group_size`` columns and a 16-value code table.
        Each column is rounded to its nearest grid value and its error spread over the later columns as in
        :meth:`quantize`; values beyond the grid's ends are clamped to them.

        Args:
            codebook: 1-D float table of grid values (any order, e.g. bitsandbytes' ``QuantState.code``).
            scale: ``[out, ceil(in / group_size)]`` positive scales.
        """
        self._check_quantize_args(weight, None, damp, block_size, act_order)
        n_out, n_cols = weight.shape
        if not _is_int(group_size) or group_size <= 0:
            raise ValueError(f"group_size={group_size!r} is not valid; valid: a positive int")
        if not isinstance(codebook, torch.Tensor) or codebook.dim() != 1 or codebook.numel() < 2 \
                or not codebook.is_floating_point() or not torch.isfinite(codebook).all():
            desc = tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__
            raise ValueError(f"codebook={desc} is not valid; valid: a 1-D finite float tensor of at least 2 values")
        expected = (n_out, math.ceil(n_cols / group_size))
        if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != expected or not (scale > 0).all():
            desc = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise ValueError(f"scale shape={desc} is not valid; valid: positive values of shape {expected}")
        W, Hinv, perm = self._prepare(weight, damp, act_order)
        device = W.device
        order = torch.argsort(codebook.to(device=device, dtype=torch.float32))
        values = codebook.to(device=device, dtype=torch.float32)[order]
        midpoints = (values[1:] + values[:-1]) / 2
        col_scale = scale.to(device=device, dtype=torch.float32).repeat_interleave(group_size, dim=1)[:, :n_cols]
        if perm is not None:
            col_scale = col_scale[:, perm]
        col_scale = col_scale.T.contiguous()  # one contiguous [out] row per walk position

        def quantize_column(pos: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s = col_scale[pos]
            nearest = torch.bucketize(w / s, midpoints)  # index into the sorted values; ends clamp
            return nearest, values[nearest].mul_(s)

        sorted_codes, loss = _error_feedback_walk(W, Hinv, block_size, quantize_column, code_dtype=torch.long)
        codes = order[sorted_codes]
        if perm is not None:
            codes = codes[:, torch.argsort(perm)]
        codes = codes.to(torch.uint8).to(weight.device)
        table = codebook.to(device=weight.device, dtype=torch.float32)
        full_scale = scale.to(device=weight.device, dtype=torch.float32).repeat_interleave(group_size, dim=1)
        dequantized = (table[codes.long()] * full_scale[:, :n_cols]).to(weight.dtype)
        return CodebookResult(codes=codes, dequantized_weight=dequantized,
                              perm=None if perm is None else perm.to(weight.device), loss=loss)

    def _prepare(self, weight: torch.Tensor, damp: float, act_order: bool):
        """Float32 working copy of the weight, the upper Cholesky factor of the damped inverse Hessian, the walk order."""
        device = self.hessian.device
        W = weight.detach().to(device=device, dtype=torch.float32, copy=True)
        H = self.hessian.to(torch.float64, copy=True)
        # Inputs that were always zero carry no information: make H invertible
        # there and drop the weight column (its output contribution is zero).
        dead = H.diagonal() == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        perm = None
        if act_order:
            perm = torch.argsort(H.diagonal(), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
        return W, self._inverse_hessian_cholesky(H, damp).to(torch.float32), perm

    def _check_quantize_args(
        self, weight: torch.Tensor, spec: QuantSpec | None, damp: float, block_size: int, act_order: bool
    ) -> None:
        if self.hessian is None:
            raise RuntimeError("GPTQ has no calibration data; call add_batch() before quantize()")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != self.in_features:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight shape={shape} is not valid; valid: [out, {self.in_features}]")
        if not weight.is_floating_point():
            raise ValueError(f"weight dtype={weight.dtype} is not valid; valid: a floating dtype")
        if spec is not None and not isinstance(spec, QuantSpec):
            raise ValueError(f"spec={spec!r} is not valid; valid: a QuantSpec")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
            raise ValueError(f"damp={damp!r} is not valid; valid: a finite float >= 0")
        if not _is_int(block_size) or block_size <= 0:
            raise ValueError(f"block_size={block_size!r} is not valid; valid: a positive int")
        if not isinstance(act_order, bool):
            raise ValueError(f"act_order={act_order!r} is not valid; valid: True or False")

    @staticmethod
    def _inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
        """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising damp on failure."""
        mean_diag = H.diagonal().mean()
        current = damp
        for attempt in range(_MAX_CHOLESKY_TRIES):
            if attempt:
                current = current * _DAMP_GROWTH if current > 0 else _FALLBACK_DAMP
            damped = H.clone()
            damped.diagonal().add_(current * mean_diag)
            L, info = torch.linalg.cholesky_ex(damped)
            if info.item() == 0:
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if info.item() == 0:
                    if current != damp:
                        warnings.warn(
                            f"GPTQ: Hessian needed damp={current:g} (requested {damp:g})",
                            stacklevel=3,
                        )
                    return U
        raise RuntimeError(
            f"GPTQ Cholesky failed {_MAX_CHOLESKY_TRIES} times, last with damp={current:g}; "
            "the Hessian is not positive definite (check calibration inputs or raise damp)"
        )


def _error_feedback_walk(W: torch.Tensor, Hinv: torch.Tensor, block_size: int, quantize_column,
                         code_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    """GPTQ's column walk over ``W`` (modified in place): quantize a column, spread its error onto later columns.

    ``quantize_column(pos, w)`` returns the column's codes and its dequantized values. Updates inside a block of
    ``block_size`` columns are applied column by column; the block's effect on the later columns once (lazy batch).
    Returns the codes (walk order) and GPTQ's error proxy ``sum((w - q)^2 / d^2) / 2``.
    """
    n_out, n_cols = W.shape
    codes = torch.zeros(n_out, n_cols, dtype=code_dtype, device=W.device)
    hinv_diag = Hinv.diagonal().tolist()
    loss = torch.zeros((), dtype=torch.float32, device=W.device)  # summed on the device: no sync per block
    for b1 in range(0, n_cols, block_size):
        b2 = min(b1 + block_size, n_cols)
        W1 = W[:, b1:b2]  # a view: in-block updates are visible to quantize_column (group fitting)
        Hinv1 = Hinv[b1:b2, b1:b2]
        Err1 = torch.zeros_like(W1)
        for i in range(b2 - b1):
            w = W1[:, i]
            q, deq = quantize_column(b1 + i, w)
            codes[:, b1 + i] = q
            err = Err1[:, i]
            torch.sub(w, deq, out=err)
            err.div_(hinv_diag[b1 + i])
            if i + 1 < b2 - b1:  # OBS update of the rest of the block (columns after i)
                W1[:, i + 1 :].addr_(err, Hinv1[i, i + 1 :], alpha=-1.0)
        loss += Err1.square().sum() / 2
        if b2 < n_cols:  # lazy batch update: the whole block's error onto later columns, once
            W[:, b2:].addmm_(Err1, Hinv[b1:b2, b2:], alpha=-1.0)
    return codes, float(loss)


def gptq_quantize_linear(
    weight: torch.Tensor,
    inputs_iterable: Iterable[torch.Tensor] | torch.Tensor,
    spec: QuantSpec,
    **kw,
) -> GPTQResult:
    """GPTQ-quantize ``weight`` from calibration inputs (one tensor or an iterable of batches).

    Extra keyword arguments (``damp``, ``block_size``, ``act_order``) go to
    :meth:`GPTQ.quantize`.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight shape={shape} is not valid; valid: a 2-D [out, in] tensor")
    gptq = GPTQ(weight.shape[1])
    # A single tensor is one batch, not an iterable of rows.
    batches = [inputs_iterable] if isinstance(inputs_iterable, torch.Tensor) else inputs_iterable
    for batch in batches:
        gptq.add_batch(batch)
    return gptq.quantize(weight, spec, **kw)
