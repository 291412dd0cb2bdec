"""Save and reload models quantized with :class:`slimtune.quant.layers.QuantLinear`.

Directory layout written by :func:`save_quantized`::

    <directory>/
        config.json           the transformers model config (``architectures`` filled in)
        model.safetensors     every tensor of the model's state dict, QuantLinear layers included
        slimtune_quant.json   the quantization manifest (below)
        adapter/              only for a peft.PeftModel: its adapter(s), via PeftModel.save_pretrained
        tokenizer files       only when a tokenizer is given

``model.safetensors`` holds the plain (non-PEFT) model state dict. A
``QuantLinear`` named ``N`` contributes ``N.qweight`` (uint8 packed codes),
``N.qzeros`` (uint8 packed zero points), ``N.scales`` (float16 by default),
``N.bias`` (if any) and ``N.g_idx`` (int32, if any); every other tensor is
stored under its usual name and dtype. Tensors that share memory (tied
embeddings) are stored once and listed under ``"tied"``. Non-persistent
buffers (rotary ``inv_freq``) are not stored: they are rebuilt from the config
and cast back to the dtype listed under ``"buffer_dtypes"``.

``slimtune_quant.json``::

    {
      "format": "slimtune-quant",
      "version": 1,
      "packing": {"order": "row-major, little-endian bit stream per row", ...},
      "tied": {"lm_head.weight": "model.embed_tokens.weight"},
      "buffer_dtypes": {"model.rotary_emb.inv_freq": "float32", ...},
      "layers": {
        "model.layers.0.self_attn.q_proj": {
          "in_features": 576, "out_features": 576,
          "bits": 4, "group_size": 128, "symmetric": false, "act_order": true,
          "bias": false, "g_idx": false,
          "scale_dtype": "float16", "dtype": "float32"
        }, ...
      }
    }

Packing (see :mod:`slimtune.quant.layers`): code ``j`` of an output row takes
bits ``[j*bits, (j+1)*bits)`` of that row's bytes, bit 0 being the least
significant bit of byte 0 (2/4/8-bit: ``8 // bits`` codes per byte; 3-bit:
8 codes per 3 bytes); rows are zero-padded to a whole number of packing
units. The weight is ``scales[r, g] * (q[r, c] - zero[r, g])`` with
``g = g_idx[c]`` if present, else ``c // group_size`` (0 when
``group_size`` is null); a last group narrower than ``group_size`` (ragged)
is allowed.

Adapters: a ``peft.PeftModel`` (e.g. from
:func:`slimtune.quant.lorc.add_lorc_adapters`) is saved unmerged -- the
quantized base as above and the adapter with PEFT's ``save_pretrained`` in
``adapter/`` -- because merging a LoRA update into integer codes would need a
re-quantization that changes the model. :func:`load_quantized` loads that
adapter back (or one from ``adapter_dir``) with ``QuantLinearLora`` registered.

The directory is written atomically: everything goes to a temporary directory
next to it that is renamed into place at the end; on error nothing is left.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.grid import QuantSpec
from slimtune.quant.layers import QuantLinear, register_quant_lora

FORMAT_NAME = "slimtune-quant"
FORMAT_VERSION = 1
MANIFEST_NAME = "slimtune_quant.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_DIRNAME = "adapter"

PACKING = {
    "order": "row-major, little-endian bit stream per row",
    "code_bits": "code j of a row occupies bits [j*bits, (j+1)*bits) of the row's bytes; bit 0 = LSB of byte 0",
    "codes_per_unit": {"2": "4 per byte", "3": "8 per 3 bytes", "4": "2 per byte", "8": "1 per byte"},
    "row_padding": "zero codes up to a whole packing unit",
    "qweight": "uint8 [out_features, packed(in_features)]",
    "qzeros": "uint8 [out_features, packed(n_groups)], integer zero points packed like the codes",
    "scales": "[out_features, n_groups] in scale_dtype",
    "g_idx": "optional int32 [in_features]; absent: group of column c is c // group_size (0 if group_size is null)",
    "dequantize": "w[r, c] = scales[r, g] * (q[r, c] - zero[r, g]), computed in float32",
}

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unwrap(model: nn.Module) -> tuple[nn.Module, Any]:
    """``(plain base model, PeftModel or None)``."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return model, None
    if isinstance(model, PeftModel):
        return model.get_base_model(), model
    return model, None


def _tuner_prefixes(model: nn.Module) -> list[str]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover
        return []
    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def _clean_name(name: str) -> str:
    """Module/tensor name without PEFT's ``.base_layer`` wrapping segments."""
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the model without PEFT adapter tensors and ``base_layer`` segments."""
    tuners = _tuner_prefixes(model)
    state = {}
    for key, tensor in model.state_dict().items():
        owner = max((p for p in tuners if key.startswith(p + ".")), key=len, default=None)
        if owner is not None:
            rest = key[len(owner) + 1 :]
            if not rest.startswith("base_layer."):
                continue  # adapter tensors (lora_A, lora_B, ...) go to adapter/
        state[_clean_name(key)] = tensor
    return state


def _quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {_clean_name(n): m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _layer_entry(layer: QuantLinear) -> dict[str, Any]:
    from slimtune.quant.smoothquant import W8A8Linear

    extra = {"activations": "int8_per_token", "int8_matmul": layer.int8_matmul} if isinstance(layer, W8A8Linear) else {}
    return {
        **extra,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bits": layer.spec.bits,
        "group_size": layer.spec.group_size,
        "symmetric": layer.spec.symmetric,
        "act_order": layer.act_order,
        "bias": layer.bias is not None,
        "g_idx": layer.g_idx is not None,
        "scale_dtype": _dtype_name(layer.scales.dtype),
        "dtype": _dtype_name(layer.bias.dtype) if layer.bias is not None else "float32",
    }


def _nonpersistent_buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """dtypes of buffers left out of the state dict (e.g. rotary ``inv_freq``, cast by ``model.to(bf16)``)."""
    out = {}
    for prefix, module in model.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            buf = module._buffers.get(name)
            if isinstance(buf, torch.Tensor):
                out[_clean_name(f"{prefix}.{name}" if prefix else name)] = _dtype_name(buf.dtype)
    return out


def _restore_buffer_dtypes(model: nn.Module, dtypes: dict[str, str]) -> None:
    for full, dtype_name in dtypes.items():
        prefix, _, name = full.rpartition(".")
        try:
            module = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            continue
        buf = module._buffers.get(name)
        dtype = _DTYPES.get(dtype_name)
        if isinstance(buf, torch.Tensor) and dtype is not None and buf.dtype != dtype:
            module._buffers[name] = buf.to(dtype)


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors sharing memory once; return ``(tensors, {alias: source})``."""
    seen: dict[tuple, str] = {}
    out, tied = {}, {}
    for key, t in state.items():
        if t.device.type == "meta":
            raise SlimtuneError(f"tensor {key} is on the meta device; valid: a model with materialised weights")
        sig = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and sig in seen:
            tied[key] = seen[sig]
            continue
        seen[sig] = key
        out[key] = t.detach().to("cpu").contiguous()
    return out, tied


def check_export_target(model: nn.Module, directory, overwrite: bool) -> tuple[Path, nn.Module, Any, Any]:
    """``(target, plain base, PeftModel or None, config)`` for an export, refusing an existing ``directory`` (unless
    ``overwrite``), a model without a transformers config, and bitsandbytes layers, each in one line."""
    target = Path(directory)
    if target.exists() and not overwrite:
        raise SlimtuneError(f"directory {str(target)!r} already exists; valid: a new path, or overwrite=True")
    base, peft_model = _unwrap(model)
    config = getattr(base, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise SlimtuneError(f"model {type(base).__name__} has no transformers config; valid: a PreTrainedModel")
    for name, m in base.named_modules():
        if type(m).__module__.startswith("bitsandbytes"):
            raise SlimtuneError(
                f"layer {_clean_name(name)} is {type(m).__name__}; valid: QuantLinear or float layers "
                "(save bitsandbytes models with save_pretrained)"
            )
    return target, base, peft_model, config


def write_atomically(target: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary sibling folder, then rename it to ``target`` (replacing it); on any error
    the temporary folder is removed and ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, backup / "d")
            os.rename(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model_folder(target: Path, tensors: dict[str, torch.Tensor], config, tokenizer=None, peft_model=None,
                       *, metadata: dict[str, str] | None = None, files: dict[str, str] | None = None) -> None:
    """Atomically write a Hugging Face model folder: ``model.safetensors``, ``config.json``, extra text ``files``,
    the tokenizer (if given) and a PEFT model's adapter in ``adapter/`` (if given)."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})
        config.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if peft_model is not None:
            peft_model.save_pretrained(tmp / ADAPTER_DIRNAME)

    write_atomically(target, write)


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    save_adapter: bool = True,
) -> Path:
    """Write ``model`` (plain or ``peft.PeftModel`` with QuantLinear layers) to ``directory``; see module docstring.

    Raises:
        SlimtuneError: ``directory`` exists and ``overwrite`` is False; the model
            has bitsandbytes 4/8-bit layers or no config.
    """

    target, base, peft_model, config = check_export_target(model, directory, overwrite)

    layers = _quant_layers(base)
    tensors, tied = _dedupe_shared(_plain_state_dict(base))
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "packing": PACKING,
        "tied": tied,
        "buffer_dtypes": _nonpersistent_buffer_dtypes(base),
        "layers": {name: _layer_entry(layer) for name, layer in layers.items()},
    }
    config = copy.deepcopy(config)
    config.architectures = [type(base).__name__]

    write_model_folder(target, tensors, config, tokenizer, peft_model if save_adapter else None,
                       metadata={"slimtune": FORMAT_NAME},
                       files={MANIFEST_NAME: json.dumps(manifest, indent=2, sort_keys=True) + "\n"})
    return target


def has_quant_layers(model: nn.Module) -> bool:
    """Whether `model` holds slimtune QuantLinear layers (what `save_quantized` stores as integer codes)."""
    return any(isinstance(m, QuantLinear) for m in model.modules())


def export_quantized(model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path | None:
    """A run's export: `save_quantized` (adapter included, replacing an existing folder); None when the model holds
    no QuantLinear layer (e.g. a bitsandbytes NF4 base, saved as adapter and merged model instead)."""
    if not has_quant_layers(model):
        return None
    return save_quantized(model, directory, tokenizer, overwrite=True)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    for needed in (path, directory / WEIGHTS_NAME, directory / "config.json"):
        if not needed.is_file():
            raise SlimtuneError(
                f"{str(needed)!r} does not exist; valid: a directory written by save_quantized"
            )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SlimtuneError(f"{str(path)!r} is not valid JSON ({exc.msg})") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise SlimtuneError(
            f"{str(path)!r} has format={manifest.get('format')!r} version={manifest.get('version')!r}; "
            f"valid: {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    return manifest


def _build_skeleton(config) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    # Parameters on the meta device (no memory, no init); buffers such as rotary
    # inv_freq are real because they are not saved in the state dict.
    with init_empty_weights(include_buffers=False):
        if cls is not None:
            return cls(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def load_quantized(
    directory: str | os.PathLike,
    adapter_dir: str | os.PathLike | None = None,
    *,
    load_adapter: bool = True,
    is_trainable: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model written by :func:`save_quantized`.

    The model is built from ``config.json`` with empty (meta) parameters, the
    manifest's layers are swapped for ``QuantLinear``, and the saved tensors
    are assigned (no copy, no float weights allocated for quantized layers).
    With ``load_adapter``, the adapter in ``adapter_dir`` (default
    ``<directory>/adapter`` when it exists) is loaded on top as a
    ``peft.PeftModel`` (trainable if ``is_trainable``). Returned in eval mode.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    directory = Path(directory)
    manifest = _read_manifest(directory)
    config = AutoConfig.from_pretrained(directory)
    model = _build_skeleton(config)

    for name, entry in manifest["layers"].items():
        try:
            spec = QuantSpec(entry["bits"], entry["group_size"], entry["symmetric"])
            scale_dtype = _DTYPES[entry["scale_dtype"]]
            dtype = _DTYPES[entry["dtype"]]
            kind, extra = QuantLinear, {}
            if entry.get("activations") == "int8_per_token":  # SmoothQuant W8A8
                from slimtune.quant.smoothquant import W8A8Linear

                kind, extra = W8A8Linear, {"int8_matmul": bool(entry.get("int8_matmul", False))}
            elif entry.get("activations") is not None:
                raise ValueError(f"activations={entry['activations']!r}; valid: int8_per_token")
            layer = kind(
                entry["in_features"], entry["out_features"], spec, bias=entry["bias"],
                has_g_idx=entry["g_idx"], act_order=entry["act_order"], dtype=dtype,
                scale_dtype=scale_dtype, device="meta", **extra,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SlimtuneError(f"manifest entry of layer {name} is not valid ({exc})") from None
        try:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            getattr(parent, child)
        except AttributeError:
            raise SlimtuneError(f"manifest layer {name} is not in the {type(model).__name__} built from config.json") from None
        setattr(parent, child, layer)

    tensors = load_file(str(directory / WEIGHTS_NAME), device=str(device))
    for alias, source in manifest.get("tied", {}).items():
        tensors[alias] = tensors[source]
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        problem = result.missing_keys[0] if result.missing_keys else result.unexpected_keys[0]
        kind = "missing from" if result.missing_keys else "unexpected in"
        raise SlimtuneError(f"tensor {problem} is {kind} {WEIGHTS_NAME}; valid: a file written by save_quantized")
    if manifest.get("tied") and hasattr(model, "tie_weights"):
        model.tie_weights()
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if meta:
        raise SlimtuneError(f"tensor {meta[0]} was not loaded; valid: a file written by save_quantized")
    # Buffers that are rebuilt from the config rather than loaded get the saved dtype back.
    _restore_buffer_dtypes(model, manifest.get("buffer_dtypes", {}))
    model.to(device)
    model.eval()

    if load_adapter:
        if adapter_dir is None and (directory / ADAPTER_DIRNAME).is_dir():
            adapter_dir = directory / ADAPTER_DIRNAME
        if adapter_dir is not None:
            model = _load_adapter(model, Path(adapter_dir), is_trainable)
    return model


def _load_adapter(model: nn.Module, adapter_dir: Path, is_trainable: bool):
    from peft import LoraConfig, PeftConfig, PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise SlimtuneError(f"adapter_dir {str(adapter_dir)!r} has no adapter_config.json; valid: a PEFT adapter directory")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if isinstance(config, LoraConfig):
        register_quant_lora(config)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable)
    if not is_trainable:
        peft_model.eval()
    return peft_model


def stored_bits_per_parameter(model: nn.Module) -> tuple[float, float]:
    """``(bits per parameter over the quantized layers, over the whole model)``.

    Quantized layers (``QuantLinear``; bitsandbytes ``Linear4bit`` too) count
    every stored bit (packed codes, zeros, scales, g_idx / absmax statistics,
    bias) against the parameters of the float layer they replace. Everything
    else counts ``8 * element_size`` bits per parameter (tied tensors once;
    PEFT adapters included). The first value is ``nan`` when no layer is
    quantized.
    """
    q_bits = q_params = 0
    o_bits = o_params = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            q_bits += module.stored_bits()
            q_params += module.n_parameters()
            continue
        skip = set()
        if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes"):
            weight = module.weight
            bits = weight.numel() * weight.element_size() * 8
            state = getattr(weight, "quant_state", None)
            if state is not None:
                for t in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
                    if isinstance(t, torch.Tensor):
                        bits += t.numel() * t.element_size() * 8
            q_bits += bits
            q_params += module.in_features * module.out_features
            seen.add(id(weight))
            skip.add("weight")
            if module.bias is not None:
                q_bits += module.bias.numel() * module.bias.element_size() * 8
                q_params += module.bias.numel()
                seen.add(id(module.bias))
        for name, p in module.named_parameters(recurse=False):
            if name in skip or id(p) in seen:
                continue
            seen.add(id(p))
            o_bits += p.numel() * p.element_size() * 8
            o_params += p.numel()
    quant = q_bits / q_params if q_params else float("nan")
    total_params = q_params + o_params
    whole = (q_bits + o_bits) / total_params if total_params else float("nan")
    return quant, whole
