"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with optimal-brain-surgeon weight updates.

The layer's output error ``||W X - W' X||^2`` has Hessian ``H = 2/n X X^T`` (the same one GPTQ uses, accumulated by
:class:`slimtune.quant.GPTQ`). Columns are visited left to right; zeroing (and, jointly, quantizing) column ``i``
leaves an error that is spread over the later columns with row ``i`` of the upper Cholesky factor of ``H^-1``. Masks
are chosen adaptively per block of ``block_size`` columns (or per M columns for N:M) by the OBS saliency
``w^2 / [H^-1]_ii^2`` on the error-updated weights, and the block's effect on the later columns is applied once (lazy
batch), as in GPTQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.errors import SlimtuneError
from slimtune.prune.masks import check_nm
from slimtune.prune.schedule import check_sparsity
from slimtune.quant.gptq import GPTQ
from slimtune.quant.grid import QuantSpec, group_index, qparams_from_range

__all__ = ["SparseGPT", "SparseGPTResult", "sparsegpt_prune_linear"]


@dataclass
class SparseGPTResult:
    """``weight``: the pruned (and with a spec, quantized) weight in the input dtype; ``mask``: True where kept;
    ``loss``: the OBS error proxy ``sum(err^2) / 2`` summed over columns."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float


class SparseGPT(GPTQ):
    """Accumulates a layer's input Hessian (``add_batch``, inherited from GPTQ) and prunes its weight."""

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, sparsity: float = 0.5, n: int = 0, m: int = 0, block_size: int = 128,
              damp: float = 0.01, spec: QuantSpec | None = None) -> SparseGPTResult:
        """Prune ``weight [out, in]`` to ``sparsity`` (unstructured) or ``n:m`` (``n`` kept of every ``m``; ``sparsity``
        is then ignored); with ``spec`` the kept weights are also GPTQ-quantized on that grid (zeros stay exact)."""
        if n or m:
            check_nm(n, m, self.in_features)
            if block_size % m:
                raise SlimtuneError(f"block_size={block_size} is not a multiple of M={m}; valid: a multiple of {m}")
        else:
            sparsity = check_sparsity(sparsity)
        self._check_quantize_args(weight, spec, damp, block_size, False)
        W, Hinv, _ = self._prepare(weight, damp, act_order=False)
        n_out, n_cols = W.shape
        keep = torch.ones(n_out, n_cols, dtype=torch.bool, device=W.device)
        if spec is not None:
            g_of_col = group_index(n_cols, spec, device=W.device).tolist()
            scale = zero = None
            current_group = -1
        loss = torch.zeros((), dtype=torch.float32, device=W.device)
        for b1 in range(0, n_cols, block_size):
            b2 = min(b1 + block_size, n_cols)
            W1 = W[:, b1:b2]
            Hinv1 = Hinv[b1:b2, b1:b2]
            d = Hinv1.diagonal()
            Err1 = torch.zeros_like(W1)
            keep1 = keep[:, b1:b2]
            if not m:  # adaptive mask of the block: lowest OBS saliency, exactly round(s * block numel) of them
                k = int(round(sparsity * W1.numel()))
                if k:
                    saliency = (W1.square() / d.square().unsqueeze(0)).reshape(-1)
                    flat = keep1.reshape(-1).clone()
                    flat[torch.topk(saliency, k, largest=False, sorted=False).indices] = False
                    keep1.copy_(flat.reshape(keep1.shape))
            for i in range(b2 - b1):
                if m and i % m == 0:  # N:M: choose the group's m - n zeros on the error-updated weights
                    saliency = W1[:, i:i + m].square() / d[i:i + m].square().unsqueeze(0)
                    drop = torch.topk(saliency, m - n, dim=1, largest=False, sorted=False).indices
                    keep1[:, i:i + m].scatter_(1, drop, False)
                w = W1[:, i]
                q = w * keep1[:, i]
                if spec is not None:
                    g = g_of_col[b1 + i]
                    if g != current_group:  # fit the group's grid once, on its current (updated, masked) weights
                        cols = [c for c in range(b1 + i, min(n_cols, b1 + i + (spec.group_size or n_cols)))
                                if g_of_col[c] == g]
                        members = W[:, cols] * keep[:, cols]
                        scale, zero = qparams_from_range(members.amin(dim=1), members.amax(dim=1), spec)
                        current_group = g
                    q = (torch.round(q / scale) + zero).clamp_(0, spec.maxq).sub_(zero).mul_(scale)
                    q = q * keep1[:, i]  # an integer zero point makes 0 exact; this keeps it so for every grid
                err = (w - q) / d[i]
                Err1[:, i] = err
                W1[:, i] = q
                if i + 1 < b2 - b1:
                    W1[:, i + 1:].addr_(err, Hinv1[i, i + 1:], alpha=-1.0)
            loss += Err1.square().sum() / 2
            if b2 < n_cols:
                W[:, b2:].addmm_(Err1, Hinv[b1:b2, b2:], alpha=-1.0)
        W.mul_(keep)
        return SparseGPTResult(weight=W.to(device=weight.device, dtype=weight.dtype), mask=keep.to(weight.device),
                               loss=float(loss))


def sparsegpt_prune_linear(weight: torch.Tensor, inputs, sparsity: float = 0.5, **kw) -> SparseGPTResult:
    """SparseGPT of one weight from calibration inputs (a tensor ``[..., in]`` or an iterable of them)."""
    solver = SparseGPT(weight.shape[1])
    for batch in [inputs] if isinstance(inputs, torch.Tensor) else inputs:
        solver.add_batch(batch)
    return solver.prune(weight, sparsity, **kw)
