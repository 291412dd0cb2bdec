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
        device = self.hessian.device
        W = weight.detach().to(device=device, dtype=torch.float32, copy=True)
        H = self.hessian.to(torch.float64, copy=True)
        n_out, n_cols = W.shape

        # Inputs that were always zero carry no information: make H invertible
        # there and drop the weight column (its output contribution is zero).
        dead = H.diagonal() == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

        g_of_col = group_index(n_cols, spec, device=device)
        perm = None
        if act_order:
            perm = torch.argsort(H.diagonal(), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
            g_of_col = g_of_col[perm]  # group id (original order) of each walk position

        Hinv = self._inverse_hessian_cholesky(H, damp).to(torch.float32)
        del H

        n_groups = spec.n_groups(n_cols)
        scale = torch.zeros(n_out, n_groups, dtype=torch.float32, device=device)
        zero = torch.zeros_like(scale)
        group_ready = [False] * n_groups
        group_scale: list[torch.Tensor | None] = [None] * n_groups  # contiguous [out] vectors, made once per group
        group_zero: list[torch.Tensor | None] = [None] * n_groups
        g_list = g_of_col.tolist()
        hinv_diag = Hinv.diagonal().tolist()
        codes = torch.zeros_like(W)
        losses = torch.zeros(n_out, dtype=torch.float32, device=device)
        maxq = float(spec.maxq)

        # The column loop is the reference algorithm; its body is written with few, in-place kernels because it
        # runs once per input column of every layer (quantize_values/dequantize_values compute the same formula).
        for b1 in range(0, n_cols, block_size):
            b2 = min(b1 + block_size, n_cols)
            W1 = W[:, b1:b2]  # a view: in-block updates are visible to group params below
            Hinv1 = Hinv[b1:b2, b1:b2]
            Err1 = torch.zeros_like(W1)
            for i in range(b2 - b1):
                g = g_list[b1 + i]
                if not group_ready[g]:
                    # First column of group g in walk order: fit its grid to the
                    # current (error-updated) weights of all its columns.
                    members = (g_of_col == g).nonzero().squeeze(1)
                    members_w = W[:, members]
                    scale[:, g], zero[:, g] = qparams_from_range(
                        members_w.amin(dim=1), members_w.amax(dim=1), spec
                    )
                    group_scale[g], group_zero[g] = scale[:, g].contiguous(), zero[:, g].contiguous()
                    group_ready[g] = True
                s, z = group_scale[g], group_zero[g]
                w = W1[:, i]
                q = torch.div(w, s).round_().add_(z).clamp_(0.0, maxq)
                codes[:, b1 + i] = q
                err = Err1[:, i]
                torch.sub(w, (q - z).mul_(s), out=err)
                err.div_(hinv_diag[b1 + i])
                # OBS update of the rest of the block (columns after i).
                if i + 1 < b2 - b1:
                    W1[:, i + 1 :].addr_(err, Hinv1[i, i + 1 :], alpha=-1.0)
            losses += Err1.square().sum(dim=1) / 2
            # Lazy batch update: apply the whole block's error to later columns once.
            if b2 < n_cols:
                W[:, b2:].addmm_(Err1, Hinv[b1:b2, b2:], alpha=-1.0)

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
            loss=float(losses.sum()),
        )

    def _check_quantize_args(
        self, weight: torch.Tensor, spec: QuantSpec, damp: float, block_size: int, act_order: bool
    ) -> None:
        if self.hessian is None:
            raise RuntimeError("GPTQ has no calibration data; call add_batch() before quantize()")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != self.in_features:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight shape={shape} is not valid; valid: [out, {self.in_features}]")
        if not weight.is_floating_point():
            raise ValueError(f"weight dtype={weight.dtype} is not valid; valid: a floating dtype")
        if not isinstance(spec, QuantSpec):
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
