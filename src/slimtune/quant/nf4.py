"""NF4/FP4 fake quantization through bitsandbytes (QLoRA's 4-bit formats)."""

from __future__ import annotations

import torch

NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NF4_QUANT_TYPES = ("nf4", "fp4")


def nf4_fake_quantize(
    weight: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
) -> torch.Tensor:
    """Quantize ``weight`` to bitsandbytes 4-bit and dequantize it back, in ``weight.dtype``.

    ``compress_statistics`` double-quantizes the per-block absmax values as
    QLoRA does, so the result matches what a loaded 4-bit model computes with.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() == 0:
        desc = f"{tuple(weight.shape)} {weight.dtype}" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight={desc} is not valid; valid: a floating tensor")
    if isinstance(blocksize, bool) or blocksize not in NF4_BLOCKSIZES:
        valid = ", ".join(str(b) for b in NF4_BLOCKSIZES)
        raise ValueError(f"blocksize={blocksize!r} is not supported; valid: {valid}")
    if quant_type not in NF4_QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; valid: {', '.join(NF4_QUANT_TYPES)}")
    if not isinstance(compress_statistics, bool):
        raise ValueError(f"compress_statistics={compress_statistics!r} is not valid; valid: True or False")
    try:
        import bitsandbytes.functional as bnb_functional  # heavy import, only when used
    except ImportError as exc:
        raise ImportError("nf4_fake_quantize needs bitsandbytes: pip install bitsandbytes") from exc

    # bitsandbytes 4-bit kernels accept fp32/fp16/bf16 only.
    work = weight.detach()
    if work.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        work = work.float()
    packed, state = bnb_functional.quantize_4bit(
        work.contiguous(),
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
    )
    return bnb_functional.dequantize_4bit(packed, state).to(weight.dtype)
