"""LoRC: low-rank compensation of quantization error (with LoftQ-style refinement).

A quantized weight ``Q`` leaves an error ``E = W - Q``. LoRC stores a rank-r
approximation ``B @ A`` of ``E`` (the best one, from a truncated SVD), which
also serves as the initialisation of LoRA adapters on top of ``Q``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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
