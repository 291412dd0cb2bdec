"""Keep bitsandbytes 4-bit layers computing, on every CPU, exactly what they train with.

Two problems of bitsandbytes 0.50 on the CPU, both invisible unless looked for:

1. **Packed weights cut the gradient.** On CPUs with ``avx512_bf16``, ``Linear4bit.forward`` repacks its weight into a
   bf16 layout for a fused kernel the first time it runs in eval mode on an input that needs no grad, and never
   unpacks it. From then on every forward, training ones included, takes ``gemv_4bit``, which has no autograd kernel:
   no gradient flows back through the layer (the "gemv_4bit: an autograd kernel was not registered" warning). Any
   evaluation before or during training (perplexity, validation, generation) triggers it. bitsandbytes' own inverse
   (used by ``state_dict()``) is lossy: the block scales were cast to bf16 and are re-quantized.
2. **Ragged rows dequantize wrongly.** The native CPU ``dequantize_4bit`` kernel of some CPUs treats each row as
   starting a new block, so a layer whose width is not a multiple of the block size computes with weights unlike
   the ones it stores (relative error 0.28 instead of 0.09 on a 48 x 80 weight).

:func:`guard_4bit` fixes both for every ``Linear4bit`` of a model: the layer never repacks (the flag bitsandbytes
reads is switched off), a layer already packed gets its exact weights back, and ragged layers compute with an exact
dequantization. :func:`fast_4bit_eval` opts back into the packed kernel for evaluation and generation (about 2.7x
faster batched, 4x token by token on such CPUs, outputs within bf16 rounding) with an unpacked copy kept aside and
restored, exactly, before anything trains or reads the weights. :func:`dequantize_4bit` is the exact pure-torch
dequantization slimtune uses wherever it reads a 4-bit weight (merge, LoRC, GPTQ-NF4).

Written here because bitsandbytes offers no switch for either behaviour; plain torch, no Lightning.
"""

from __future__ import annotations

import copy
import functools
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = [
    "cpu_packs_4bit",
    "cpu_dequantize_is_row_blocked",
    "dequantize_4bit",
    "fast_4bit_eval",
    "guard_4bit",
    "is_packed",
    "linear4bit_layers",
    "unpack_4bit",
]

_SNAPSHOT = "_slimtune_unpacked"  # (data, quant_state) as they were before bitsandbytes packed the layer
_EXACT_FORWARD = "_slimtune_exact_forward"


def _bnb_linear4bit() -> type | None:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return None
    return bnb.nn.Linear4bit


def linear4bit_layers(model: nn.Module) -> list[nn.Module]:
    cls = _bnb_linear4bit()
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


@functools.lru_cache(maxsize=1)
def cpu_packs_4bit() -> bool:
    """Whether bitsandbytes repacks 4-bit weights for its fused CPU kernel on this machine (``avx512_bf16``)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:  # pragma: no cover
        return False
    return bool(has_avx512bf16())


def is_packed(layer: nn.Module) -> bool:
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


# --------------------------------------------------------------------------- exact dequantization


def _absmax(quant_state) -> torch.Tensor:
    if quant_state.nested:
        import bitsandbytes.functional as bnbf

        return (bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset).float()
    return quant_state.absmax.float()


def dequantize_4bit(data: torch.Tensor, quant_state) -> torch.Tensor:
    """The float32 weight of a bitsandbytes 4-bit tensor (unpacked layout), computed in plain torch.

    Blocks run over the flattened weight, as bitsandbytes' quantizer makes them; two codes per byte, high nibble first.
    """
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("dequantize_4bit needs the unpacked layout; call unpack_4bit(layer) first")
    packed = data.reshape(-1).view(torch.uint8) if data.dtype != torch.uint8 else data.reshape(-1)
    codes = torch.stack(((packed >> 4) & 0xF, packed & 0xF), dim=1).reshape(-1).long()
    shape = torch.Size(quant_state.shape)
    n, block = shape.numel(), int(quant_state.blocksize)
    values = quant_state.code.float().to(codes.device)[codes[:n]]
    pad = (-n) % block
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    values = values.view(-1, block) * _absmax(quant_state).to(values.device).view(-1, 1)
    return values.reshape(-1)[:n].view(shape)


@functools.lru_cache(maxsize=1)
def cpu_dequantize_is_row_blocked() -> bool:
    """Whether bitsandbytes' native CPU dequantization disagrees with its quantizer on rows that do not fill whole
    blocks (checked once on a 2 x 96 tensor with blocks of 64)."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:  # pragma: no cover
        return False
    weight = torch.linspace(-1.0, 1.0, 192).view(2, 96)
    data, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
    return not torch.equal(bnbf.dequantize_4bit(data, state), dequantize_4bit(data, state))


def _is_ragged(layer: nn.Module) -> bool:
    state = layer.weight.quant_state
    return state is not None and int(state.shape[-1]) % int(state.blocksize) != 0


def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit's forward with an exact dequantization: for ragged layers where the CPU kernel is wrong."""
    unpack_4bit(self)
    dtype = self.compute_dtype or x.dtype
    weight = dequantize_4bit(self.weight.data, self.weight.quant_state).to(dtype)
    bias = None if self.bias is None else self.bias.to(dtype)
    return nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)


# --------------------------------------------------------------------------- packing


def _restore(layer: nn.Module, data: torch.Tensor, quant_state) -> None:
    layer.weight.data = data
    layer.weight.quant_state = quant_state
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = quant_state


def unpack_4bit(model_or_layer: nn.Module) -> int:
    """Give every packed ``Linear4bit`` its unpacked weight back; returns how many were packed.

    Exact when the unpacked copy was kept (:func:`fast_4bit_eval`); otherwise bitsandbytes' own inverse, which
    re-quantizes the bf16 block scales (a packing slimtune did not see, e.g. an evaluation before the guard).
    """
    count = 0
    for layer in linear4bit_layers(model_or_layer):
        snapshot = layer.__dict__.pop(_SNAPSHOT, None)
        if not is_packed(layer):
            continue
        if snapshot is not None:
            _restore(layer, *snapshot)
        else:
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            _restore(layer, *_convert_weight_packed_for_cpu_inverse(layer.weight.data, layer.weight.quant_state))
        count += 1
    return count


def guard_4bit(model: nn.Module) -> int:
    """Make every bitsandbytes ``Linear4bit`` in ``model`` train correctly after any evaluation; idempotent.

    Layers never repack for the fused CPU kernel (so gradients always flow), packed layers are unpacked, and ragged
    layers on CPUs whose dequantization kernel is row-blocked compute with :func:`dequantize_4bit`. Returns the number
    of 4-bit layers. Call it again after adding 4-bit layers (slimtune's loaders, callbacks and module do).
    """
    layers = linear4bit_layers(model)
    unpack_4bit(model)
    fix_ragged = cpu_dequantize_is_row_blocked()
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        on_cpu = layer.weight.device.type == "cpu"
        if fix_ragged and on_cpu and _is_ragged(layer) and _EXACT_FORWARD not in layer.__dict__:
            layer.forward = _exact_forward.__get__(layer)
            layer.__dict__[_EXACT_FORWARD] = True
    return len(layers)


def _state_dict_unpacks(layer, prefix, keep_vars):  # bitsandbytes would invert the packing lossily, in place
    unpack_4bit(layer)


def _packing_allowed(layer, args):
    x = args[0] if args else None
    allowed = (isinstance(x, torch.Tensor) and x.device.type == "cpu" and not torch.is_grad_enabled()
               and not layer.training)
    if allowed and not is_packed(layer):
        # bitsandbytes packs in this very forward: keep the unpacked tensors (its packing replaces, never mutates,
        # the data tensor; the quant state object is mutated, so it is copied).
        layer.__dict__[_SNAPSHOT] = (layer.weight.data, copy.copy(layer.weight.quant_state))
    elif not allowed and is_packed(layer):
        unpack_4bit(layer)  # a forward that may train, inside the context: exact weights, gradients flow
    layer.support_avx512bf16_for_cpu = allowed


@contextmanager
def fast_4bit_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, 4-bit layers of ``model`` may use bitsandbytes' fused bf16 CPU kernel for forwards without
    grad in eval mode (evaluation, generation); on leaving, every layer gets its exact unpacked weight back.

    A forward with grad enabled inside the block unpacks first, so nothing trains on packed weights. On CPUs without
    ``avx512_bf16`` (and on CUDA) this changes nothing. Ragged layers keep their exact forward.
    """
    layers = [m for m in linear4bit_layers(model) if _EXACT_FORWARD not in m.__dict__]
    if not cpu_packs_4bit() or not layers:
        yield model
        return
    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(_packing_allowed))
        handles.append(layer.register_state_dict_pre_hook(_state_dict_unpacks))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        guard_4bit(model)
