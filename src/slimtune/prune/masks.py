"""Masks from importance scores: which weights to keep (True) and which to zero (False).

Granularities (each returns exactly the asked number of zeros; ties are broken by position):

* per layer: the ``round(s * numel)`` lowest scores of the matrix;
* per output row: ``round(s * in)`` in every row (Wanda's comparison group);
* global: the lowest ``round(s * total)`` over all given layers at once (scores must be comparable across layers);
* N:M: ``N`` of every ``M`` consecutive input weights of a row kept (2:4 and 4:8 are what sparse tensor cores run);
  ``prune_per_group`` < M - N gives the intermediate patterns of a gradual N:M schedule;
* structured: whole groups (attention heads, MLP channels) over the matrices that share them, see
  :class:`StructuredGroup`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.prune.schedule import check_sparsity

GRANULARITIES = ("layer", "row", "global", "nm", "heads", "channels")
STRUCTURED = ("heads", "channels")

__all__ = ["GRANULARITIES", "STRUCTURED", "StructuredGroup", "check_nm", "find_structured_groups", "global_masks",
           "layer_mask", "nm_mask", "parse_nm", "row_mask", "sparsity_of", "structured_masks"]


def _n_prune(total: int, sparsity: float) -> int:
    return min(total, int(round(sparsity * total)))


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask zeroing the ``round(sparsity * numel)`` lowest scores of the whole matrix."""
    sparsity = check_sparsity(sparsity)
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    k = _n_prune(score.numel(), sparsity)
    if k:
        keep[torch.topk(score.reshape(-1).float(), k, largest=False, sorted=False).indices] = False
    return keep.reshape(score.shape)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask zeroing the ``round(sparsity * in)`` lowest scores of every output row."""
    sparsity = check_sparsity(sparsity)
    keep = torch.ones_like(score, dtype=torch.bool)
    k = _n_prune(score.shape[1], sparsity)
    if k:
        keep.scatter_(1, torch.topk(score.float(), k, dim=1, largest=False, sorted=False).indices, False)
    return keep


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing the lowest ``round(sparsity * total)`` scores over all layers together."""
    sparsity = check_sparsity(sparsity)
    if not scores:
        raise SlimtuneError("global pruning got no layers; valid: at least one layer score")
    flat = torch.cat([s.reshape(-1).float().to(next(iter(scores.values())).device) for s in scores.values()])
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    k = _n_prune(flat.numel(), sparsity)
    if k:
        keep[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = keep[offset:offset + s.numel()].reshape(s.shape).to(s.device)
        offset += s.numel()
    return out


def parse_nm(pattern) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: N kept of every M."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern)) if isinstance(pattern, str) else None
    if m is None:
        raise SlimtuneError(f"N:M pattern={pattern!r} is not valid; valid: 'N:M' with 0 < N < M, e.g. '2:4' or '4:8'")
    n, mm = int(m.group(1)), int(m.group(2))
    check_nm(n, mm)
    return n, mm


def check_nm(n: int, m: int, in_features: int | None = None, name: str = "") -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise SlimtuneError(f"N:M pattern {n}:{m} is not valid; valid: 0 < N < M, e.g. 2:4 or 4:8")
    if in_features is not None and in_features % m:
        where = f" of layer {name}" if name else ""
        raise SlimtuneError(f"N:M pattern {n}:{m}: M={m} does not divide the input width {in_features}{where}; valid: "
                            f"an M dividing {in_features}, or exclude the layer")


def nm_mask(score: torch.Tensor, n: int, m: int, prune_per_group: int | None = None) -> torch.Tensor:
    """Keep-mask with ``n`` of every ``m`` consecutive input weights of each row kept (the highest scores).

    ``prune_per_group`` (0 to m - n) zeros that many per group instead of ``m - n``: a gradual schedule's way to 2:4.
    """
    check_nm(n, m, score.shape[1])
    k = m - n if prune_per_group is None else int(prune_per_group)
    if not 0 <= k <= m - n:
        raise SlimtuneError(f"prune_per_group={prune_per_group!r} is not valid for {n}:{m}; valid: 0 to {m - n}")
    groups = score.float().reshape(score.shape[0], -1, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    if k:
        keep.scatter_(2, torch.topk(groups, k, dim=2, largest=False, sorted=False).indices, False)
    return keep.reshape(score.shape)


def sparsity_of(tensor: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    return float((tensor == 0).sum()) / max(1, tensor.numel())


# --------------------------------------------------------------------------- structured groups


@dataclass(frozen=True)
class StructuredGroup:
    """Matrices sharing ``n_groups`` structural units: an attention block's heads (q_proj rows and o_proj columns of
    each head), or an MLP's intermediate channels (gate_proj/up_proj rows and the down_proj column of each channel).

    ``members`` are ``(layer name, axis)``: axis 0 splits the rows into ``n_groups`` equal slices, axis 1 the columns.
    """

    kind: str
    members: tuple[tuple[str, int], ...]
    n_groups: int


_ATTENTION = (("q_proj", 0), ("o_proj", 1))
_MLP = (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1))


def find_structured_groups(names: list[str], kind: str, num_heads: int | None = None,
                           widths: dict[str, tuple[int, int]] | None = None) -> list[StructuredGroup]:
    """The structured groups of a Llama-style model among the layer ``names`` (plain names).

    ``kind='heads'``: each ``<prefix>.q_proj`` with its ``<prefix>.o_proj`` (query heads; key/value heads are shared
    under grouped-query attention and stay). ``kind='channels'``: ``gate_proj`` (if present), ``up_proj``, ``down_proj``.
    ``widths`` (name -> (out, in)) gives the MLP channel count.
    """
    if kind not in STRUCTURED:
        raise SlimtuneError(f"structured kind={kind!r} is not valid; valid: heads, channels")
    parts = _ATTENTION if kind == "heads" else _MLP
    by_prefix: dict[str, dict[str, str]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        if leaf in dict(parts):
            by_prefix.setdefault(prefix, {})[leaf] = name
    groups = []
    for prefix, found in by_prefix.items():
        members = tuple((found[leaf], axis) for leaf, axis in parts if leaf in found)
        needed = {"q_proj", "o_proj"} if kind == "heads" else {"up_proj", "down_proj"}
        if not needed <= set(found):
            missing = sorted(needed - set(found))[0]
            raise SlimtuneError(f"structured pruning of {kind} needs {prefix}.{missing} among the targets; valid: "
                                f"targets that include every layer of {', '.join(sorted(needed))}")
        if kind == "heads":
            if not isinstance(num_heads, int) or num_heads < 1:
                raise SlimtuneError(f"structured pruning of heads needs num_heads; got {num_heads!r}; valid: a "
                                    "positive int (the model config's num_attention_heads)")
            n_groups = num_heads
        else:
            if widths is None:
                raise SlimtuneError("structured pruning of channels needs the layer widths")
            n_groups = widths[found["up_proj"]][0]
        groups.append(StructuredGroup(kind, members, n_groups))
    if not groups:
        leaves = ", ".join(leaf for leaf, _ in parts)
        raise SlimtuneError(f"structured pruning of {kind} found no {leaves} layers among the targets; valid: a "
                            "Llama-style model whose targets include them")
    return groups


def _group_view(tensor: torch.Tensor, axis: int, n_groups: int) -> torch.Tensor:
    """``[n_groups, ...]`` view of a matrix's rows (axis 0) or columns (axis 1) split into equal slices."""
    size = tensor.shape[axis]
    if size % n_groups:
        raise SlimtuneError(f"a matrix of shape {tuple(tensor.shape)} cannot be split into {n_groups} groups along "
                            f"axis {axis}; valid: a width divisible by the number of heads/channels")
    t = tensor if axis == 0 else tensor.T
    return t.reshape(n_groups, -1)


def structured_masks(scores: dict[str, torch.Tensor], groups: list[StructuredGroup], sparsity: float,
                     ) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing ``round(sparsity * n_groups)`` whole groups in every structured group, those with the lowest
    summed score over all member matrices."""
    sparsity = check_sparsity(sparsity)
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        k = _n_prune(group.n_groups, sparsity)
        if k >= group.n_groups:
            raise SlimtuneError(f"structured pruning of {k} {group.kind} of {group.n_groups} is not valid; valid: "
                                f"fewer than {group.n_groups} (sparsity below 1)")
        total = sum(_group_view(scores[n].float(), axis, group.n_groups).sum(dim=1).to("cpu")
                    for n, axis in group.members)
        pruned = torch.topk(total, k, largest=False).indices if k else torch.empty(0, dtype=torch.long)
        keep_groups = torch.ones(group.n_groups, dtype=torch.bool)
        keep_groups[pruned] = False
        for n, axis in group.members:
            s = scores[n]
            per = s.shape[axis] // group.n_groups
            keep_line = keep_groups.repeat_interleave(per).to(s.device)
            out[n] = (keep_line.unsqueeze(1) if axis == 0 else keep_line.unsqueeze(0)).expand(s.shape).clone()
    return out


@torch.no_grad()
def apply_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Zero the weights of ``module`` that ``mask`` drops (in place)."""
    module.weight.data.mul_(mask.to(module.weight.device, module.weight.dtype))


def pruned_groups(mask: torch.Tensor, axis: int, n_groups: int) -> list[int]:
    """Indices of the groups whose weights the mask drops entirely."""
    return torch.nonzero(~_group_view(mask, axis, n_groups).any(dim=1)).flatten().tolist()


def owl_sparsities(outlier_ratios: dict[str, float], target: float, lam: float) -> dict[str, float]:
    """OWL (Yin et al., 2024): per-block sparsities averaging ``target``, within ``target +- lam``, lower where the
    block holds more outliers (the fraction of scores above M times the block's mean score)."""
    target = check_sparsity(target, "target")
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not 0 <= lam <= min(target, 1 - target - 1e-9) + 1e-12:
        raise SlimtuneError(f"OWL lambda={lam!r} is not valid for target sparsity {target:g}; valid: a number in "
                            f"[0, {min(target, 1 - target):g}]")
    names = list(outlier_ratios)
    ratios = torch.tensor([float(outlier_ratios[n]) for n in names], dtype=torch.float64)
    spread = ratios.max() - ratios.min()
    if len(names) < 2 or spread == 0:
        return {n: target for n in names}
    scaled = (ratios - ratios.min()) / spread * (2 * lam)
    sparsities = target - (scaled - scaled.mean())
    return {n: float(min(max(s, 0.0), math.nextafter(1.0, 0.0))) for n, s in zip(names, sparsities.tolist())}


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """OWL's layerwise outlier ratio: the fraction of scores above ``threshold`` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())
