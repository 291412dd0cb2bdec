"""NF4/FP4 through bitsandbytes (QLoRA's 4-bit formats): fake quantization, layers, GPTQ-chosen codes, and a
whole model quantized to NF4 (:func:`quantize_model_nf4`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.bnb4bit import dequantize_4bit, guard_4bit, unpack_4bit
from slimtune.quant.targets import check_float_linear, find_linear_layers, set_module
from slimtune.select import base_model

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
    if not isinstance(compress_statistics, bool):
        raise ValueError(f"compress_statistics={compress_statistics!r} is not valid; valid: True or False")
    NF4Spec(blocksize, compress_statistics, quant_type)  # checks the block size and the type
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
    # slimtune's exact dequantization: bitsandbytes' CPU kernel is wrong for rows that do not fill whole blocks
    return dequantize_4bit(packed, state).to(weight.dtype)


@dataclass(frozen=True)
class NF4Spec:
    """bitsandbytes 4-bit storage for GPTQ: code table ``quant_type``, one absmax per ``blocksize`` weights.

    ``double_quant`` stores the absmax values in 8 bits (QLoRA's double quantization).
    """

    blocksize: int = 64
    double_quant: bool = True
    quant_type: str = "nf4"

    def __post_init__(self) -> None:
        if isinstance(self.blocksize, bool) or self.blocksize not in NF4_BLOCKSIZES:
            valid = ", ".join(str(b) for b in NF4_BLOCKSIZES)
            raise ValueError(f"blocksize={self.blocksize!r} is not supported; valid: {valid}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant={self.double_quant!r} is not valid; valid: True or False")
        if self.quant_type not in NF4_QUANT_TYPES:
            raise ValueError(f"quant_type={self.quant_type!r} is not supported; valid: {', '.join(NF4_QUANT_TYPES)}")


def nf4_linear(weight: torch.Tensor, bias: torch.Tensor | None, spec: NF4Spec,
               compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``weight`` rounded to nearest (bitsandbytes' own quantizer)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None,
                              compute_dtype=compute_dtype or weight.dtype, compress_statistics=spec.double_quant,
                              quant_type=spec.quant_type, device="meta")
    data = weight.detach()
    data = data if data.dtype in (torch.float16, torch.bfloat16, torch.float32) else data.float()
    # Params4bit quantizes when moved to an accelerator, or in place on the CPU.
    layer.weight = bnb.nn.Params4bit(data.to("cpu", copy=True), requires_grad=False, blocksize=spec.blocksize,
                                     compress_statistics=spec.double_quant, quant_type=spec.quant_type).to(weight.device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    guard_4bit(layer)
    return layer


def nf4_dequantize(layer: nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes ``Linear4bit`` computes with (exact; unpacks a CPU-packed layer first)."""
    unpack_4bit(layer)
    return dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def nf4_block_absmax(layer: nn.Module) -> torch.Tensor:
    """Per-block absmax of a ``Linear4bit`` as dequantization uses it (after double quantization), float32."""
    import bitsandbytes.functional as bnb_functional

    state = layer.weight.quant_state
    if state.nested:
        return (bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return state.absmax.float()


def check_nf4_width(name: str, in_features: int, spec: NF4Spec) -> None:
    """GPTQ-NF4 treats each block as a group of columns of one row: the block size must divide the layer's width."""
    if in_features % spec.blocksize:
        raise SlimtuneError(f"layer {name} has in_features={in_features}, not a multiple of the NF4 block size "
                            f"{spec.blocksize}; valid: a block size that divides it, or exclude the layer")


@torch.no_grad()
def gptq_nf4_linear(module: nn.Linear, gptq, spec: NF4Spec, damp: float = 0.01, block_size: int = 128,
                    act_order: bool = False, name: str = "layer") -> nn.Module:
    """GPTQ-quantize ``module`` into a bitsandbytes ``Linear4bit``: the storage is bitsandbytes' own, the codes GPTQ's.

    bitsandbytes fixes the per-block absmax (computed from the float weight and double-quantized as usual); GPTQ
    then picks each weight's 4-bit code with error feedback (:meth:`GPTQ.quantize_codebook`) instead of rounding
    to nearest, so the layer loads, saves and trains like any QLoRA layer and only its codes differ. Written here
    because bitsandbytes has no calibrated quantizer.
    """
    check_nf4_width(name, module.in_features, spec)
    weight = module.weight.detach()
    layer = nf4_linear(weight, module.bias, spec)
    scale = nf4_block_absmax(layer).reshape(module.out_features, module.in_features // spec.blocksize)
    # A block of zeros has absmax ~0 and dequantizes to ~0 whatever its codes: a tiny scale tells GPTQ just that, so
    # error fed into such a block stays error and moves on to the later columns.
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    state = layer.weight.quant_state
    result = gptq.quantize_codebook(weight, state.code, scale, spec.blocksize, damp=damp, block_size=block_size,
                                    act_order=act_order)
    flat = result.codes.reshape(-1).to(layer.weight.device)
    # bitsandbytes packs two codes per byte, the first in the high nibble, as a [n / 2, 1] uint8 tensor.
    layer.weight.data = ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8).reshape(-1, 1)
    return layer


@torch.no_grad()
def quantize_model_nf4(
    model: nn.Module,
    targets: str | Sequence[str] = "all-linear",
    *,
    exclude: Sequence[str] = ("lm_head",),
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    keep_original: bool = False,
) -> dict[str, torch.Tensor] | None:
    """Replace target ``nn.Linear`` layers by bitsandbytes ``Linear4bit`` (QLoRA's NF4), in place, on their device.

    Marks ``model.is_loaded_in_4bit = True`` so PEFT dispatches its 4-bit LoRA layer.
    """
    layers = find_linear_layers(model, targets, exclude)
    for name, module in layers.items():
        check_float_linear(name, module, "NF4 quantization")
    spec = NF4Spec(blocksize, compress_statistics, quant_type)
    originals: dict[str, torch.Tensor] | None = {} if keep_original else None
    for name, module in layers.items():
        if originals is not None:
            originals[name] = module.weight.detach().to("cpu", copy=True)
        set_module(base_model(model), name, nf4_linear(module.weight, module.bias, spec, compute_dtype))
    base_model(model).is_loaded_in_4bit = True
    return originals

