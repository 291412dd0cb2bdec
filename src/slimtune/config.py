"""Hydra configuration: the base config in `configs/`, recipes from `recipes/` (group `recipe`), callback presets from
`callbacks/` (group `callbacks`), and one-line errors for unknown recipes, groups and keys."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from slimtune.errors import SlimtuneError, choices
from slimtune.estimate import STRATEGIES as ESTIMATE_STRATEGIES

ROOT_ENV = "SLIMTUNE_ROOT"
PROJECT_FOLDERS = ("configs", "recipes", "callbacks")
# A wheel carries the checkout's top-level configs/, recipes/ and callbacks/ here (setup.py maps them in).
PACKAGED_ROOT = Path(__file__).resolve().parent / "_project"


def project_root() -> Path:
    """Folder holding configs/, recipes/ and callbacks/: $SLIMTUNE_ROOT; else the checkout this package lives in
    (src/slimtune inside it: a clone, or an editable install); else the copies an installed wheel carries in
    slimtune/_project/."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "configs" / "config.yaml").is_file() and all((checkout / d).is_dir() for d in PROJECT_FOLDERS):
        return checkout
    if (PACKAGED_ROOT / "configs" / "config.yaml").is_file():
        return PACKAGED_ROOT
    return checkout


def recipe_names(root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((root or project_root()) / "recipes").glob("*.yaml"))


def callback_preset_names(root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in ((root or project_root()) / "callbacks").glob("*.yaml"))


def register_configs(root: Path | None = None) -> None:
    """Put recipes/*.yaml into Hydra's group `recipe` (package _global_) and callbacks/*.yaml into group `callbacks`.

    Hydra names a group after its folder; the recipes folder sits at the top level as `recipes/`, so its files are
    registered through the ConfigStore under the group name users type: `recipe=NAME`.
    """
    from hydra.core.config_store import ConfigStore

    root = root or project_root()
    store = ConfigStore.instance()
    for path in sorted((root / "recipes").glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_",
                    provider="slimtune")
    for path in sorted((root / "callbacks").glob("*.yaml")):
        store.store(group="callbacks", name=path.stem, node=OmegaConf.load(path), package="callbacks",
                    provider="slimtune")


def config_dir(root: Path | None = None) -> str:
    return str((root or project_root()) / "configs")


_MISSING = re.compile(r"Could not find '([^']+)'")
_OVERRIDE = re.compile(r"Could not override '([^']+)'")
_APPEND = re.compile(r"Could not append to config\. An item is already at '([^']+)'")
_NOT_IN_STRUCT = re.compile(r"Key '([^']+)' is not in struct")


def explain_compose_error(err: Exception, overrides: list[str], root: Path | None = None) -> str:
    """Turn Hydra's multi-line composition errors into one line naming the bad value and the valid ones."""
    text = str(err)
    missing = _MISSING.search(text)
    if missing:
        group, _, name = missing.group(1).rpartition("/")
        options = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)*)", text)
        valid = [line.strip() for line in options.group(1).splitlines() if line.strip()] if options else []
        if group == "recipe":
            valid = recipe_names(root)
        return f"unknown {group or 'config'} {name!r}; valid: {choices(valid) if valid else '(none)'}"
    key = _OVERRIDE.search(text) or _NOT_IN_STRUCT.search(text)
    if key:
        full_key = key.group(1)
        parent, _, leaf = full_key.rpartition(".")
        valid = _valid_keys(parent, [o for o in overrides if not o.lstrip("+~").startswith(full_key)], root)
        where = f"under {parent!r}" if parent else "at the top level"
        return f"unknown config key {full_key!r}; valid keys {where}: {choices(valid)} (add a new key with +{full_key}=...)"
    if _APPEND.search(text):
        return f"{_APPEND.search(text).group(1)!r} already exists; override it without '+'"
    first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
    return first.strip()


def _valid_keys(parent: str, overrides: list[str], root: Path | None) -> list[str]:
    try:
        cfg = _compose(overrides, root)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:  # noqa: BLE001 - only used to word an error message
        return []


def _compose(overrides: list[str], root: Path | None = None) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs(root)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(root), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def expand_shorthands(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """`estimate=VALUE` is short for `estimate.enabled=VALUE` (`estimate` is a group of settings, and Hydra would
    replace the whole group by the value)."""
    return [f"estimate.enabled={arg.split('=', 1)[1]}" if arg.startswith("estimate=") else arg for arg in overrides]


def compose_config(overrides: list[str] | tuple[str, ...] = (), root: Path | None = None) -> DictConfig:
    """The composed config `python train.py OVERRIDES...` would run, or a one-line SlimtuneError."""
    overrides = expand_shorthands(overrides)
    try:
        return _compose(list(overrides), root)
    except SlimtuneError:
        raise
    except Exception as err:  # Hydra's ConfigCompositionException, MissingConfigException, OverrideParseException
        raise SlimtuneError(explain_compose_error(err, list(overrides), root)) from err


# --- Checking a composed config before anything is built or written -------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low


def _number_in(low: float, high: float = math.inf, high_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and low <= v and (v < high if high_open else v <= high)


def _or_none(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _devices_ok(value) -> bool:
    if _is_int(value):
        return value > 0 or value == -1
    if isinstance(value, str):
        return value == "auto" or re.fullmatch(r"-1|\d+|(\d+\s*,\s*)*\d+\s*,?", value.strip()) is not None
    return isinstance(value, list) and len(value) > 0 and all(_is_int(v) and v >= 0 for v in value)


def _val_check_interval_ok(value) -> bool:
    if isinstance(value, (str, dict)):  # Lightning's time-based validation ("DD:HH:MM:SS" or timedelta fields)
        return True
    return value is None or (_is_int(value) and value > 0) or (isinstance(value, float) and 0.0 < value <= 1.0)


def _limit_batches_ok(value) -> bool:
    return value is None or (_is_int(value) and value >= 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)


def _betas_ok(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_number(b) and 0.0 <= b < 1.0 for b in value)


def _bool(value) -> bool:
    return isinstance(value, bool)


# Every numeric or boolean setting the run reads: (key, check, what is valid). Keys that a config does not hold are
# skipped (the code's default applies); Lightning checks the rest of the trainer (accelerator, strategy, precision).
SETTINGS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("seed", lambda v: _is_int(v) and 0 <= v < 2**32, "an integer from 0 to 4294967295"),
    ("optimizer.lr", _number_in(0.0), "a number >= 0 (e.g. 2e-4)"),
    ("optimizer.weight_decay", _number_in(0.0), "a number >= 0"),
    ("optimizer.betas", _betas_ok, "two numbers in [0, 1), e.g. [0.9,0.999]"),
    ("optimizer.eps", _number_in(0.0), "a number >= 0 (e.g. 1e-8)"),
    ("scheduler.warmup_steps", _or_none(_int_at_least(0)), "an integer >= 0"),
    ("scheduler.warmup_ratio", _or_none(_number_in(0.0, 1.0)), "a number from 0 to 1"),
    ("trainer.max_steps", lambda v: _is_int(v) and (v > 0 or v == -1), "a positive integer, or -1 for no step limit"),
    ("trainer.max_epochs", _or_none(lambda v: _is_int(v) and (v > 0 or v == -1)),
     "a positive integer, -1 for no epoch limit, or null"),
    ("trainer.devices", _devices_ok, "a positive integer, -1 (all), auto, or a list of device indices"),
    ("trainer.num_nodes", _int_at_least(1), "a positive integer"),
    ("trainer.accumulate_grad_batches", _int_at_least(1), "a positive integer"),
    ("trainer.gradient_clip_val", _or_none(_number_in(0.0)), "a number >= 0 (0 or null: no clipping)"),
    ("trainer.val_check_interval", _val_check_interval_ok,
     "a positive integer (steps), a fraction of an epoch in (0, 1], a time 'DD:HH:MM:SS', or null"),
    ("trainer.check_val_every_n_epoch", _or_none(_int_at_least(1)), "a positive integer or null"),
    ("trainer.limit_val_batches", _limit_batches_ok, "an integer >= 0 (batches) or a fraction in [0, 1]"),
    ("trainer.limit_train_batches", _limit_batches_ok, "an integer >= 0 (batches) or a fraction in [0, 1]"),
    ("trainer.log_every_n_steps", _int_at_least(1), "a positive integer"),
    ("trainer.num_sanity_val_steps", _int_at_least(-1), "an integer >= -1 (-1: all validation batches)"),
    ("trainer.enable_checkpointing", _bool, "true or false"),
    ("trainer.enable_progress_bar", _bool, "true or false"),
    ("trainer.deterministic", lambda v: v is None or _bool(v) or v == "warn", "true, false, warn or null"),
    ("data.block_size", _int_at_least(1), "a positive integer (tokens)"),
    ("data.batch_size", _int_at_least(1), "a positive integer"),
    ("data.val_fraction", _number_in(0.0, 1.0, high_open=True), "a number >= 0 and < 1"),
    ("data.num_workers", _int_at_least(0), "an integer >= 0"),
    ("data.seed", _int_at_least(0), "an integer >= 0"),
    ("data.max_examples", _or_none(_int_at_least(1)), "a positive integer, or null for all examples"),
    ("model.lora.r", _int_at_least(1), "a positive integer (e.g. 8)"),
    ("model.lora.alpha", lambda v: _is_number(v) and v > 0, "a positive number (e.g. 16)"),
    ("model.lora.dropout", _number_in(0.0, 1.0, high_open=True), "a number >= 0 and < 1"),
    ("data.path", lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
     "a file, folder or glob, a list of them, default, or default_instruct"),
    ("model.config", lambda v: v is None or isinstance(v, dict), "a transformers config (a mapping with model_type) or null"),
    ("model.lora.target_modules", lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) > 0 and all(
        isinstance(t, str) for t in v)), "all-linear, or a list of layer names (e.g. [q_proj,v_proj])"),
    ("model.lora.bias", lambda v: v in ("none", "all", "lora_only"), "none, all or lora_only"),
    ("model.double_quant", _bool, "true or false"),
    ("model.gradient_checkpointing", _bool, "true or false"),
    ("model.trust_remote_code", _bool, "true or false"),
    ("checkpoint.every_n_train_steps", _or_none(_int_at_least(1)), "a positive integer, or null (end of each epoch)"),
    ("checkpoint.save_top_k", lambda v: _is_int(v) and v in (-1, 0, 1),  # no monitored metric: Lightning's limits
     "-1 (keep every checkpoint), 0 (only last.ckpt) or 1 (the latest)"),
    ("export.adapter", _bool, "true or false"),
    ("export.merged", _bool, "true or false"),
    ("export.quantized", _or_none(_bool), "true, false or null (written when a callback in the run makes it)"),
    ("export.compressed_tensors", _or_none(_bool), "true, false or null"),
    ("estimate.enabled", _bool, "true or false (estimate=true prints the memory estimate and exits)"),
    ("estimate.gpu_gib", _or_none(lambda v: _is_number(v) and v > 0), "a device's memory in GiB > 0 (e.g. 24), or null"),
    ("estimate.strategy", lambda v: v is None or v in ESTIMATE_STRATEGIES,
     f"null (the run's trainer.strategy) or one of {choices(ESTIMATE_STRATEGIES)}"),
    ("estimate.devices", _or_none(_int_at_least(1)), "a positive integer (devices per node), or null (trainer.devices)"),
)

_ABSENT = object()


def _lookup(values: dict, key: str):
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def resolved_values(cfg: DictConfig) -> dict:
    """The config as plain values with every ${...} resolved, or one line naming the value that does not resolve."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as err:  # InterpolationResolutionError, MissingMandatoryValue, a resolver's own error
        key = getattr(err, "full_key", None)
        where = f"{key}: " if key else ""
        raise SlimtuneError(f"config value {where}{str(err).splitlines()[0]}") from err


def check_output_dir(output_dir) -> Path:
    """The output folder must be a folder this process can create or write into; checked without creating anything."""
    if output_dir is None or not str(output_dir).strip():
        raise SlimtuneError(f"output_dir={output_dir!r} is empty; valid: a folder path (default outputs/<name>)")
    out = Path(str(output_dir))
    try:
        return _check_folder(out)
    except OSError as err:  # e.g. a parent folder this user may not even look into
        raise SlimtuneError(f"output_dir {str(out)!r} cannot be used: {err.strerror or err}; valid: a folder path you "
                            "can write") from err


def _check_folder(out: Path) -> Path:
    if out.exists():
        if not out.is_dir():
            raise SlimtuneError(f"output_dir {str(out)!r} is a file; valid: a folder path")
        if not os.access(out, os.W_OK | os.X_OK):
            raise SlimtuneError(f"output_dir {str(out)!r} is not writable by this user; valid: a folder you can write")
        return out
    existing = next(parent for parent in out.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise SlimtuneError(f"output_dir {str(out)!r} cannot be created: {str(existing)!r} is a file; valid: a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SlimtuneError(f"output_dir {str(out)!r} cannot be created: no write permission in {str(existing)!r}; "
                            "valid: a folder path you can write")
    return out


def check_config(cfg: DictConfig) -> dict:
    """Check a composed run config before anything is loaded or written; raises one SlimtuneError naming the first
    bad value and what is valid. Returns the resolved values. The value, path and data checks run before torch is
    imported (train.py answers those in about a second).

    Covers the type and range of every numeric and boolean setting (SETTINGS), the trainer's step/epoch limits, the
    output folder (creatable, checked without creating it), the data files (they exist and hold text), a GPU
    accelerator without a GPU, model dtype/quantization/finetune, the model source (name_or_path or config, not both;
    an existing path; a model folder with config.json) and the resume checkpoint (read safely, a Lightning checkpoint
    with optimizer state). `slimtune.run.prepare` adds what needs Lightning (devices, strategy, precision, optimizer,
    scheduler, logger, callbacks) and, once the model is built, whether the checkpoint fits it.
    """
    values = resolved_values(cfg)
    for key, is_valid, valid in SETTINGS:
        value = _lookup(values, key)
        if value is not _ABSENT and not is_valid(value):
            raise SlimtuneError(f"{key}={value!r} is not valid; valid: {valid}")
    if (values.get("estimate") or {}).get("enabled"):
        return check_estimate_config(values)
    trainer = values.get("trainer") or {}
    if trainer.get("max_steps", -1) == -1 and trainer.get("max_epochs", None) == -1:
        raise SlimtuneError("trainer.max_steps=-1 with trainer.max_epochs=-1 never stops; valid: a positive "
                            "trainer.max_steps or trainer.max_epochs")
    out = check_output_dir(values.get("output_dir"))
    ckpt_file = checkpoint_file(values.get("ckpt_path"), out)
    from slimtune.data.datasets import FORMATS, resolve_files
    from slimtune.data.sources import check_available, is_named_source

    data = values.get("data") or {}
    if str(data.get("format", "auto")) not in FORMATS:
        raise SlimtuneError(f"data.format={data.get('format')!r} is not supported; valid: {choices(FORMATS)}")
    path = data.get("path") or "default"
    if not data.get("dataset") and isinstance(path, str) and is_named_source(path):
        check_available(path)  # wikitext2, c4: a local copy, or the hub when online
    elif not data.get("dataset"):
        resolve_files(path)  # exist, one type, and text (not binary) where text is expected
    from slimtune.models.loading import check_source, dtype_of, finetune_of  # imports torch: after the cheap checks

    check_accelerator(trainer.get("accelerator", "auto"), trainer.get("devices", "auto"))
    model = values.get("model") or {}
    dtype_of(model)
    finetune_of(model)  # and the quantization
    check_source(model)
    if ckpt_file:
        check_checkpoint(ckpt_file)
    return values


def check_estimate_config(values: dict) -> dict:
    """What a memory estimate reads: the model's settings and source (its config, no weights). The output folder, the
    data and this machine's devices are not checked: an estimate plans a run for another machine and writes nothing."""
    from slimtune.models.loading import check_source, dtype_of, finetune_of

    model = values.get("model") or {}
    dtype_of(model)
    finetune_of(model)
    check_source(model)
    return values


def check_accelerator(accelerator, devices) -> None:
    """A GPU accelerator needs a GPU torch can use; CPU processes are at most one per CPU. Lightning checks the rest
    (strategy, precision, GPU indices) when `slimtune.run.check_trainer` builds a throwaway Trainer."""
    import torch

    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda") and not (torch.cuda.is_available() or (accelerator == "gpu" and has_mps)):
        raise SlimtuneError(f"trainer.accelerator={accelerator!r} needs a GPU and torch finds none on this machine "
                            "(torch.cuda.is_available() is False); valid: trainer.accelerator=cpu or auto (or trainer=cpu)")
    if accelerator == "cpu" and _is_int(devices):
        check_cpu_processes(devices, devices)


def check_cpu_processes(devices, processes: int) -> None:
    cpus = os.cpu_count() or 1
    if processes > cpus:
        raise SlimtuneError(f"trainer.devices={devices!r} asks for {processes} CPU processes and this machine has {cpus} "
                            f"CPUs; valid: 1 to {cpus}, or auto")


CHECKPOINT_VALID = ("valid: a .ckpt file or a DeepSpeed checkpoint folder from a run's <output_dir>/checkpoints, "
                    "'last', or null")
# The only classes DeepSpeed pickles into its checkpoint files besides tensors and plain values (enums, a loss-scaler
# record, a fragment address); anything else in a checkpoint folder is refused before DeepSpeed unpickles it unsafely.
DEEPSPEED_CHECKPOINT_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def deepspeed_checkpoint_tag(folder: Path) -> Path | None:
    """The tag folder of a DeepSpeed checkpoint (`<folder>/<tag>/`, named by `<folder>/latest`), or None when `folder`
    is not one. Lightning's DeepSpeedStrategy writes `last.ckpt/` this way, with the tag `checkpoint`."""
    latest = folder / "latest"
    if not latest.is_file():
        return None
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    tag_dir = folder / tag
    if tag in ("", ".", "..") or "/" in tag or not tag_dir.is_dir() or not list(tag_dir.glob("*model_states.pt")):
        return None
    return tag_dir


def checkpoint_file(ckpt_path, out: Path) -> str | None:
    """The checkpoint a run resumes from (`last`: <output_dir>/checkpoints/last.ckpt), which must exist: a file, or the
    folder DeepSpeed writes; or None."""
    if ckpt_path in (None, ""):
        return None
    if not isinstance(ckpt_path, str):
        raise SlimtuneError(f"ckpt_path={ckpt_path!r} is not valid; {CHECKPOINT_VALID}")
    if ckpt_path == "last":
        last = out / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise SlimtuneError(f"ckpt_path=last but {str(last)!r} does not exist; run without ckpt_path first")
        path, name = last, "ckpt_path=last"
    else:
        path, name = Path(ckpt_path), f"ckpt_path {ckpt_path!r}"
        if not path.exists():
            raise SlimtuneError(f"{name} does not exist; {CHECKPOINT_VALID}")
    if path.is_dir() and deepspeed_checkpoint_tag(path) is None:
        raise SlimtuneError(f"{name} is a folder but not a DeepSpeed checkpoint (no 'latest' file naming a folder of "
                            f"*model_states.pt); {CHECKPOINT_VALID}")
    return str(path)


def _deepspeed_checkpoint(path: str) -> dict:
    """The Lightning state DeepSpeed saved with the model states of rank 0 (loops, callbacks, global step, DeepSpeed's
    config and world size), after checking that every file of the folder holds only tensors, plain values and the
    few DeepSpeed classes above (DeepSpeed itself unpickles them unsafely)."""
    import torch

    tag_dir = deepspeed_checkpoint_tag(Path(path))
    files = sorted(tag_dir.glob("*.pt"))
    for file in files:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(file))) - DEEPSPEED_CHECKPOINT_GLOBALS
        except Exception as err:  # noqa: BLE001 - not a zip file torch.save writes, or damaged
            raise SlimtuneError(f"ckpt_path {path!r}: {file.name} is not a file torch.save writes; "
                                f"{CHECKPOINT_VALID}") from err
        if unsafe:
            raise SlimtuneError(f"ckpt_path {path!r}: {file.name} holds more than tensors and plain values (e.g. "
                                f"{sorted(unsafe)[0]}), so it could run code when DeepSpeed loads it; {CHECKPOINT_VALID}")
    states = [f for f in files if f.name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    if not states:
        raise SlimtuneError(f"ckpt_path {path!r} holds no model states of rank 0; {CHECKPOINT_VALID}")
    try:
        return torch.load(states[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001
        raise SlimtuneError(f"ckpt_path {path!r}: {states[0].name} does not load ({str(err).splitlines()[0]}); "
                            f"{CHECKPOINT_VALID}") from err


def deepspeed_checkpoint_info(path: str) -> dict[str, Any] | None:
    """For a DeepSpeed checkpoint folder: {'stage': ZeRO stage, 'world_size': processes that wrote it, 'global_step'};
    None for a checkpoint file."""
    if not Path(path).is_dir():
        return None
    ckpt = _deepspeed_checkpoint(path)
    stage = ((ckpt.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)
    return {"stage": int(stage), "world_size": int(ckpt.get("dp_world_size", 1)),
            "global_step": int(ckpt.get("global_step", 0))}


def checkpoint_global_step(path: str) -> int:
    """The training step a checkpoint (file or DeepSpeed folder) was saved at."""
    if Path(path).is_dir():
        return int(_deepspeed_checkpoint(path).get("global_step", 0))
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))


def check_checkpoint(path: str) -> dict[str, tuple[int, ...]]:
    """A resume checkpoint must be a Lightning checkpoint with optimizer and loop state: a file, read with torch's
    weights_only loader (tensors and plain values only: a file from elsewhere cannot run code) and memory-mapped (no
    weight is read), or a DeepSpeed checkpoint folder (every file checked the same way, see `_deepspeed_checkpoint`).
    Returns the shapes of its trainable weights, to match against the model."""
    import zipfile

    import torch

    valid = CHECKPOINT_VALID
    if Path(path).is_dir():
        ckpt = _deepspeed_checkpoint(path)
        if not (isinstance(ckpt.get("param_shapes"), list) and "pytorch-lightning_version" in ckpt and "loops" in ckpt):
            raise SlimtuneError(f"ckpt_path {path!r} is a DeepSpeed checkpoint without Lightning's training state "
                                f"(loops, pytorch-lightning_version); {valid}")
        return {key: tuple(shape) for group in ckpt["param_shapes"] for key, shape in group.items()}
    if not zipfile.is_zipfile(path):
        raise SlimtuneError(f"ckpt_path {path!r} is not a checkpoint (not a file torch.save writes); {valid}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError: torch's text would advise unsafe loading
        raise SlimtuneError(f"ckpt_path {path!r} is not a checkpoint that loads safely (it holds more than tensors and "
                            f"plain values, or is damaged); {valid}") from err
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) and "pytorch-lightning_version" in ckpt):
        raise SlimtuneError(f"ckpt_path {path!r} is not a Lightning checkpoint (no state_dict and "
                            f"pytorch-lightning_version); {valid}")
    missing = [key for key in ("optimizer_states", "loops") if key not in ckpt]
    if missing:
        raise SlimtuneError(f"ckpt_path {path!r} holds weights only (no {', '.join(missing)}), a run cannot resume from "
                            f"it; {valid}")
    return {key: tuple(value.shape) for key, value in ckpt["state_dict"].items() if isinstance(value, torch.Tensor)}
