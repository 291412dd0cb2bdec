"""Export QuantLinear models in the compressed-tensors ``pack-quantized`` format that vLLM serves.

:func:`save_compressed_tensors` writes a Hugging Face model folder::

    <directory>/
        config.json          the model config with a compressed-tensors "quantization_config"
        model.safetensors    float tensors under their usual names; each quantized layer N as
                             N.weight_packed (int32), N.weight_scale, N.weight_shape (int64 [2]),
                             N.weight_zero_point (packed int32, asymmetric grids only)
        adapter/             a peft.PeftModel's adapter (e.g. LoRC factors), via PeftModel.save_pretrained
        tokenizer files      when a tokenizer is given

The codes are written as they are -- packed with compressed-tensors' own ``pack_to_int32`` after the shift from
slimtune's unsigned codes ``q in [0, 2^b - 1]`` (weight ``s * (q - z)``) to compressed-tensors' signed ones
``q - 2^(b-1)`` (weight ``s * (q' - z')``, ``z' = z - 2^(b-1)``, 0 for symmetric grids) -- so nothing is
re-quantized and the loaded weights equal slimtune's to the bit (scales keep their float16 values).
transformers (``AutoModelForCausalLM.from_pretrained``) and vLLM read this folder; vLLM's kernels serve 4- and
8-bit weights, 2/3-bit folders load in transformers/compressed-tensors only.

The quantization config and the packing come from the compressed-tensors library rather than being written by
hand, so the files follow the library version installed (``pip install compressed-tensors``).

Not representable, and refused with a one-line error: a ragged last group (compressed-tensors derives the group
count as ``in_features // group_size``; use :func:`slimtune.quant.save_quantized` for such models), a column-to-group
map other than ``column // group_size`` (compressed-tensors 0.20 dropped ``actorder="group"``; slimtune's GPTQ
act-order keeps groups in column order and is stored as ``actorder="weight"``), and bitsandbytes layers. A LoRA adapter on the quantized base (the LoRC -> fine-tune path) cannot be folded into the
integer codes without re-quantizing, so it is saved next to the base, as vLLM loads LoRA adapters on quantized
bases.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.grid import QuantSpec
from slimtune.quant.layers import QuantLinear
from slimtune.select import linear_layers

__all__ = ["check_group_widths", "compressed_tensors_config", "export_compressed_tensors", "require_library",
           "save_compressed_tensors"]


def require_library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise SlimtuneError(
            "the compressed-tensors export needs the compressed-tensors package, which is not installed; "
            "valid: pip install compressed-tensors"
        ) from None


def _args_for(layer: QuantLinear, name: str):
    from compressed_tensors.quantization import QuantizationArgs

    spec: QuantSpec = layer.spec
    group = spec.group_size
    if group is not None and layer.in_features % group:
        raise SlimtuneError(
            f"layer {name} has {layer.in_features} input columns, not a multiple of group_size={group} "
            f"(a ragged last group), which compressed-tensors cannot store; valid: a group size dividing every "
            "quantized layer's width, per-channel, or slimtune.quant.save_quantized"
        )
    ordered = layer.g_idx is not None and not torch.equal(
        layer.g_idx.long().cpu(), torch.arange(layer.in_features) // (group or layer.in_features)
    )
    if ordered:  # compressed-tensors 0.20 removed actorder="group" (a stored g_idx)
        raise SlimtuneError(
            f"layer {name} has a column-to-group map (g_idx) other than column // group_size, which compressed-tensors "
            "no longer stores; valid: groups in column order (slimtune's GPTQ act-order keeps them so), or "
            "slimtune.quant.save_quantized"
        )
    if layer.act_order:
        actorder = "weight"  # act-order calibration with groups kept in column order: format unchanged
    else:
        actorder = None
    return QuantizationArgs(
        num_bits=spec.bits,
        type="int",
        symmetric=spec.symmetric,
        strategy="group" if group is not None else "channel",
        group_size=group,
        actorder=actorder,
    )


def compressed_tensors_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` (a dict, as in config.json) describing the model's QuantLinear layers."""
    require_library()
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    from slimtune.quant.export import _clean_name, _unwrap

    base, _ = _unwrap(model)
    layers = {_clean_name(n): m for n, m in base.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise SlimtuneError(f"model {type(base).__name__} has no QuantLinear layers; valid: a model quantized by slimtune")
    by_args: dict[str, tuple[Any, list[str]]] = {}
    for name, layer in layers.items():
        args = _args_for(layer, name)  # also refuses what the format cannot hold, before any tensor is built
        key = args.model_dump_json()
        by_args.setdefault(key, (args, []))[1].append(name)
    other_linear = sorted(n for n, ref in linear_layers(base).items()
                          if isinstance(ref.layer, nn.Linear) and n not in layers)
    if len(by_args) == 1:
        args, _ = next(iter(by_args.values()))
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}
    else:  # mixed grids: one group per grid, listing its layers by name
        groups = {
            f"group_{i}": QuantizationScheme(targets=[f"re:^{n.replace('.', '[.]')}$" for n in names], weights=args)
            for i, (args, names) in enumerate(by_args.values())
        }
    config = QuantizationConfig(
        config_groups=groups,
        format="pack-quantized",
        quantization_status="compressed",
        ignore=other_linear,
    )
    return config.model_dump(exclude_none=True)


def _compressed_tensors_of(name: str, layer: QuantLinear) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits = layer.spec.bits
    offset = 1 << (bits - 1)
    codes = layer.codes().to(torch.int16) - offset  # [out, in], signed
    out = {
        f"{name}.weight_packed": pack_to_int32(codes.to(torch.int8), bits),
        f"{name}.weight_scale": layer.scales.detach().clone(),
        f"{name}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64),
    }
    if not layer.spec.symmetric:
        zeros = layer.zeros().round().to(torch.int16) - offset  # [out, n_groups]
        out[f"{name}.weight_zero_point"] = pack_to_int32(zeros.to(torch.int8), bits, packed_dim=0)
    elif not torch.all(layer.zeros() == offset):
        raise SlimtuneError(f"layer {name} is symmetric but its zero points are not {offset}; valid: a QuantSpec grid")
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().clone()
    return out


def save_compressed_tensors(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    save_adapter: bool = True,
) -> Path:
    """Write ``model`` (plain or ``peft.PeftModel`` with QuantLinear layers) in compressed-tensors format.

    The folder is written atomically (a temporary sibling renamed into place). See the module docstring.

    Raises:
        SlimtuneError: the directory exists and ``overwrite`` is False; compressed-tensors is not installed; the
            model has no QuantLinear layers, a ragged group, or bitsandbytes layers.
    """

    from slimtune.quant.export import (
        _clean_name,
        _dedupe_shared,
        _plain_state_dict,
        check_export_target,
        write_model_folder,
    )

    require_library()
    target, base, peft_model, config = check_export_target(model, directory, overwrite)
    quant_config = compressed_tensors_config(base)

    layers = {_clean_name(n): m for n, m in base.named_modules() if isinstance(m, QuantLinear)}
    from slimtune.quant.smoothquant import W8A8Linear

    w8a8 = next((n for n, m in layers.items() if isinstance(m, W8A8Linear)), None)
    if w8a8 is not None:  # the weights alone would serve a different model than the one measured
        raise SlimtuneError(f"layer {w8a8} quantizes its activations too (W8A8Linear), which this export does not "
                            "write; valid: weight-only QuantLinear layers (save_quantized keeps W8A8 layers)")
    state = {k: v for k, v in _plain_state_dict(base).items()
             if not any(k.startswith(n + ".") for n in layers)}
    tensors, tied = _dedupe_shared(state)
    for name, layer in layers.items():
        tensors.update({k: v.to("cpu").contiguous() for k, v in _compressed_tensors_of(name, layer).items()})

    config = copy.deepcopy(config)
    config.architectures = [type(base).__name__]
    config.quantization_config = quant_config
    if tied and not getattr(config, "tie_word_embeddings", False):
        # Only the tied embedding/lm_head pair is rebuilt by transformers on load.
        raise SlimtuneError(f"tensors {sorted(tied)} share memory with others; valid: untied weights or tied embeddings")

    write_model_folder(target, tensors, config, tokenizer, peft_model if save_adapter else None)
    return target


def check_group_widths(widths: dict[str, int], group_size: int | None, setting: str = "export.compressed_tensors=true"):
    """Before quantizing: compressed-tensors has no ragged groups, so `group_size` must divide every layer width
    (`widths`: layer name -> input features)."""
    if group_size is None:
        return
    for name, width in widths.items():
        if width % group_size:
            raise SlimtuneError(
                f"{setting}: layer {name} is {width} wide, not a multiple of group_size={group_size} "
                "(compressed-tensors has no ragged groups); valid: a group size dividing every target width, or "
                f"{setting.replace('=true', '=false')}"
            )


def export_compressed_tensors(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path | None:
    """A run's export: `save_compressed_tensors` (replacing an existing folder); None when the model holds no
    QuantLinear layer."""
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        return None
    return save_compressed_tensors(model, directory, tokenizer, overwrite=True)
