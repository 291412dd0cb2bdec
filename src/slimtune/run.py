"""The run: composed config -> tokenizer, data, model, callbacks, loggers, Trainer -> fit -> export -> report.

The run knows no compression method by name: it drives every slimtune callback through the seam of
`slimtune.callbacks._base.SlimtuneCallback` (`run_order`, `exports`, `check_run`, `check_model`, `report`, `export`),
so a method in a callback of its own (a `_target_` in `callbacks`) plugs in like slimtune's.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from slimtune.errors import SlimtuneError, choices

if TYPE_CHECKING:  # torch loads with the model; bad input fails before, in about a second
    import torch

log = logging.getLogger(__name__)


def _instantiate(node: Any) -> Any:
    from hydra.utils import instantiate

    if isinstance(node, DictConfig) and "_target_" in node:
        try:
            return instantiate(node, _convert_="all")
        except Exception as err:  # Hydra wraps a class's own argument error: surface slimtune's one-line message
            cause = err
            while cause is not None and not isinstance(cause, SlimtuneError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise SlimtuneError(f"{node._target_}: {str(err).splitlines()[0]}") from err
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


BUILTIN_EXPORTS = ("adapter", "merged")  # written by the run itself; callbacks claim the others (`exports`)


def seam_callbacks(callbacks: list) -> list:
    """The callbacks that speak the run's seam (slimtune's base class), in list order."""
    from slimtune.callbacks._base import SlimtuneCallback

    return [cb for cb in callbacks if isinstance(cb, SlimtuneCallback)]


def in_run_order(callbacks: list) -> list:
    """Sorted stably by `run_order` (lower first; callbacks without one count as 100, the measuring callbacks' place):
    methods that change the model at fit start come before anything that measures it."""
    return sorted(callbacks, key=lambda cb: getattr(cb, "run_order", 100))


def build_callbacks(cfg: DictConfig) -> list:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            # typically a recipe sets callbacks.NAME.* and the command line replaced the callbacks list without NAME
            raise SlimtuneError(f"callbacks.{name} has settings but no _target_ (its preset is not in the callbacks "
                                f"list); valid: list {name} in callbacks=[...], drop it with ~callbacks.{name}, or give "
                                "it a _target_ callback class")
        callbacks.append(_instantiate(node))
    ckpt = cfg.get("checkpoint") or {}
    if cfg.trainer.get("enable_checkpointing", True):
        callbacks.append(ModelCheckpoint(
            dirpath=str(Path(cfg.output_dir) / "checkpoints"), save_last=True, save_top_k=int(ckpt.get("save_top_k", 0)),
            every_n_train_steps=ckpt.get("every_n_train_steps"), filename="step{step}", auto_insert_metric_name=False,
        ))
    if cfg.get("logger"):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return in_run_order(callbacks)


def check_exports(cfg: DictConfig, callbacks: list) -> None:
    """Every `export.<key>` is true, false or null, and one that is true is written by the run (adapter, merged) or
    claimed by a callback in it (its `exports`)."""
    export = cfg.get("export") or {}
    claimed = {key for cb in seam_callbacks(callbacks) for key in cb.exports}
    for key, value in export.items():
        if value is not None and not isinstance(value, bool):
            raise SlimtuneError(f"export.{key}={value!r} is not valid; valid: true, false or null")
        if value is True and key not in BUILTIN_EXPORTS and key not in claimed:
            writers = _preset_writers(key)
            if writers:
                classes = " or ".join(sorted(set(writers.values())))
                raise SlimtuneError(f"export.{key}=true needs a {classes} callback and none in this run writes it; "
                                    f"valid: add one to callbacks (presets: {', '.join(writers)}), or "
                                    f"export.{key}=false")
            raise SlimtuneError(f"export.{key}=true: no callback in this run writes it; valid: add a callback whose "
                                f"exports include {key!r}, or export.{key}=false")


def _preset_writers(key: str) -> dict[str, str]:
    """Callback presets (callbacks/*.yaml) whose class writes `export.<key>`: preset name -> class name."""
    from hydra.utils import get_object

    from slimtune.config import project_root

    writers = {}
    for path in sorted((project_root() / "callbacks").glob("*.yaml")):
        for node in OmegaConf.load(path).values():
            target = node.get("_target_") if isinstance(node, DictConfig) else None
            try:
                cls = get_object(str(target)) if target else None
            except Exception:  # noqa: BLE001 - a preset that does not import claims nothing
                cls = None
            if key in getattr(cls, "exports", ()):
                writers[path.stem] = cls.__name__
    return writers


def build_logger(cfg: DictConfig):
    node = cfg.get("logger")
    if not node:
        return False
    return _instantiate(node)


def build_trainer(cfg: DictConfig, callbacks: list, logger):
    import lightning.pytorch as L

    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = cfg.trainer.get("strategy", "auto")
    trainer_kwargs["strategy"] = _instantiate(strategy) if isinstance(strategy, DictConfig) else strategy
    return L.Trainer(**trainer_kwargs, callbacks=callbacks, logger=logger, default_root_dir=cfg.output_dir)


@contextlib.contextmanager
def _quiet():
    """No log lines or warnings from a throwaway object (the check Trainer would print its device summary twice)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def check_trainer(cfg: DictConfig) -> None:
    """The accelerator, devices, strategy and precision must run on this machine: Lightning builds a throwaway Trainer
    from cfg.trainer (its own checks, so any strategy Lightning accepts passes), before anything is written."""
    import lightning.pytorch as L
    from lightning.pytorch.accelerators import CPUAccelerator

    from slimtune.config import check_accelerator, check_cpu_processes

    trainer_cfg = cfg.trainer
    check_accelerator(trainer_cfg.get("accelerator", "auto"), trainer_cfg.get("devices", "auto"))
    settings = ", ".join(f"trainer.{key}={_brief(trainer_cfg.get(key))}" for key in
                         ("accelerator", "devices", "strategy", "precision") if key in trainer_cfg)
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True)
    strategy = trainer_cfg.get("strategy", "auto")
    _check_target(strategy, "trainer.strategy")
    kwargs["strategy"] = _instantiate(strategy) if isinstance(strategy, DictConfig) else strategy
    kwargs.update(logger=False, callbacks=[], enable_checkpointing=False, default_root_dir=str(cfg.output_dir))
    with _quiet():
        try:
            trainer = L.Trainer(**kwargs)
        except TypeError as err:
            unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
            if unexpected:
                import inspect

                valid = sorted(k for k in inspect.signature(L.Trainer).parameters if k not in ("self", "callbacks", "logger"))
                raise SlimtuneError(f"trainer.{unexpected.group(1)} is not a Lightning Trainer argument; valid: "
                                    f"{choices(valid)}") from err
            raise SlimtuneError(f"trainer settings ({settings}) are not valid: {_first_line(err)}") from err
        except Exception as err:  # Lightning's MisconfigurationException / ValueError name the setting and the options
            raise SlimtuneError(f"trainer settings ({settings}) cannot run on this machine: {_first_line(err)}") from err
    if isinstance(trainer.accelerator, CPUAccelerator):  # Lightning would start that many processes, however few CPUs
        check_cpu_processes(trainer_cfg.get("devices"), trainer.num_devices)
    check_strategy(cfg, trainer)
    return trainer


# DeepSpeed that ZeRO-3 over a bitsandbytes base was tested with: its all-gathers group parameters by dtype (4-bit
# codes stay uint8, adapters float; DeepSpeed PRs #4647, #8073, #8128) and its mixed-precision cast leaves them uint8.
ZERO3_QUANTIZED_MIN_DEEPSPEED = "0.19.8"


def check_strategy(cfg: DictConfig, trainer) -> None:
    """What Lightning's Trainer accepts but cannot run with this model, data or checkpoint, in one line each: a
    strategy that cannot shard the quantized base, DeepSpeed settings Lightning sets itself, ZeRO-Offload without
    its CPU Adam, a checkpoint another strategy (or another number of processes) wrote."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from slimtune.config import checkpoint_file, deepspeed_checkpoint_info
    from slimtune.models.loading import quantization_of

    strategy = trainer.strategy
    name = _strategy_label(strategy)
    quant = quantization_of(cfg.model)
    if isinstance(strategy, FSDPStrategy) and quant != "none":
        raise SlimtuneError(f"trainer.strategy={name} cannot shard a bitsandbytes {quant} base (FSDP flattens "
                            f"parameters into float tensors; model.quantization={quant!r}); valid: "
                            "strategy=deepspeed_zero2 or deepspeed_zero3 for QLoRA, or model.quantization=none")
    processes = trainer.num_devices * trainer.num_nodes
    if isinstance(strategy, DeepSpeedStrategy):
        _check_deepspeed(cfg, strategy, quant, processes)
    ckpt = checkpoint_file(cfg.get("ckpt_path"), Path(cfg.output_dir))
    if ckpt is None:
        return
    info = deepspeed_checkpoint_info(ckpt)
    if info is None and isinstance(strategy, DeepSpeedStrategy) and not strategy.load_full_weights:
        raise SlimtuneError(f"ckpt_path {ckpt!r} is a single-file checkpoint and trainer.strategy={name} resumes only "
                            "from DeepSpeed checkpoint folders; valid: the strategy that wrote it (auto, ddp, fsdp), or "
                            "a checkpoint a DeepSpeed run wrote")
    if info is not None and not isinstance(strategy, DeepSpeedStrategy):
        raise SlimtuneError(f"ckpt_path {ckpt!r} is a DeepSpeed checkpoint (ZeRO stage {info['stage']}) and "
                            f"trainer.strategy={name}; valid: strategy=deepspeed_zero{info['stage']} (the strategy "
                            "that wrote it)")
    if info is not None:
        stage = int((strategy.config.get("zero_optimization") or {}).get("stage", 0))
        if stage != info["stage"]:
            raise SlimtuneError(f"ckpt_path {ckpt!r} holds ZeRO stage {info['stage']} shards and trainer.strategy runs "
                                f"stage {stage}; valid: the stage that wrote it (strategy=deepspeed_zero{info['stage']})")
        if processes != info["world_size"]:
            raise SlimtuneError(f"ckpt_path {ckpt!r} holds the ZeRO shards of {info['world_size']} processes and this "
                                f"run starts {processes}; valid: trainer.devices x trainer.num_nodes = {info['world_size']}")


def _strategy_label(strategy) -> str:
    """The preset name a user would type for this strategy (the class name for others)."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return f"deepspeed_zero{(strategy.config.get('zero_optimization') or {}).get('stage', 0)}"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    return "ddp" if type(strategy) is DDPStrategy else type(strategy).__name__


def _check_deepspeed(cfg: DictConfig, strategy, quant: str, processes: int) -> None:
    config = strategy.config
    source = cfg.trainer.strategy.get("config") if isinstance(cfg.trainer.strategy, DictConfig) else None
    where = f"the DeepSpeed config {source!r}" if isinstance(source, str) else "the DeepSpeed config"
    if "gradient_accumulation_steps" in config:
        raise SlimtuneError(f"{where} sets gradient_accumulation_steps={config['gradient_accumulation_steps']!r}, "
                            "which Lightning sets from trainer.accumulate_grad_batches; valid: leave it out and set "
                            "trainer.accumulate_grad_batches")
    batch = int(cfg.data.get("batch_size", 4))
    micro = config.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != "auto" and micro != batch:
        raise SlimtuneError(f"{where} sets train_micro_batch_size_per_gpu={micro!r} and data.batch_size={batch} (the "
                            f"batch each process draws); valid: train_micro_batch_size_per_gpu={batch}, or leave it out")
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    total = config.get("train_batch_size")
    if total is not None and total != "auto" and total != batch * accumulate * processes:
        raise SlimtuneError(f"{where} sets train_batch_size={total!r}, and data.batch_size x "
                            f"trainer.accumulate_grad_batches x processes = {batch} x {accumulate} x {processes} = "
                            f"{batch * accumulate * processes}; valid: leave train_batch_size out")
    stage = int((config.get("zero_optimization") or {}).get("stage", 0))
    if stage == 3 and quant != "none":
        import deepspeed
        from packaging.version import Version

        if Version(deepspeed.__version__) < Version(ZERO3_QUANTIZED_MIN_DEEPSPEED):
            raise SlimtuneError(f"ZeRO-3 over a bitsandbytes {quant} base needs deepspeed>={ZERO3_QUANTIZED_MIN_DEEPSPEED}"
                                f" (installed: {deepspeed.__version__}); valid: pip install -U deepspeed, or "
                                "strategy=deepspeed_zero2")
    from slimtune.lightning.strategies import cpu_adam_missing, offloads_optimizer

    if offloads_optimizer(config) and "optimizer" not in config:
        optimizer = str(OmegaConf.select(cfg, "optimizer.name") or "adamw")
        if optimizer != "adamw":
            raise SlimtuneError(f"ZeRO-Offload (offload_optimizer in {where}) steps with DeepSpeed's CPU Adam and cannot "
                                f"run optimizer.name={optimizer!r}; valid: optimizer.name=adamw, or a strategy without "
                                "offload (deepspeed_zero3)")
        missing = cpu_adam_missing()
        if missing:
            raise SlimtuneError(f"ZeRO-Offload (offload_optimizer in {where}) needs DeepSpeed's CPU Adam: {missing}; "
                                "valid: install ninja and a C++ compiler (or set CXX), DS_BUILD_CPU_ADAM=1 pip install "
                                "deepspeed, or strategy=deepspeed_zero3 (no offload)")


def _brief(value) -> str:
    if isinstance(value, DictConfig):
        return str(value.get("_target_", "{...}")).rsplit(".", 1)[-1]
    return repr(value)


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _check_target(node: Any, key: str) -> None:
    """A `_target_` class must import (the logger is built only when the run starts writing)."""
    if isinstance(node, DictConfig) and "_target_" in node:
        from hydra.utils import get_object

        try:
            with _quiet():  # get_object also logs the failure
                get_object(str(node._target_))
        except Exception as err:  # noqa: BLE001 - Hydra's ImportError around the ModuleNotFoundError/AttributeError
            raise SlimtuneError(f"{key}._target_={str(node._target_)!r} cannot be imported "
                                f"({_first_line(err.__cause__ or err)}); valid: an importable class path") from err


def check_checkpoint_fits(path: str, shapes: dict[str, tuple[int, ...]], module) -> None:
    """The checkpoint's weights must be this model's trainable weights (LoRA) or all of them (full fine-tune), with
    the same shapes: otherwise Lightning fails mid-restore, or silently skips what it does not know."""
    if module.trainable_only:
        expected = {f"model.{n}": tuple(p.shape) for n, p in module.model.named_parameters() if p.requires_grad}
    else:
        expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    valid = "valid: a checkpoint of a run with the same model and LoRA settings, or ckpt_path=null"
    wrong = [key for key in shapes if key in expected and shapes[key] != expected[key]]
    if wrong:
        raise SlimtuneError(f"ckpt_path {path!r} does not fit this model: {wrong[0]!r} is {list(shapes[wrong[0]])} in "
                            f"the checkpoint and {list(expected[wrong[0]])} in the model ({len(wrong)} such); {valid}")
    unknown = [key for key in shapes if key not in expected]
    absent = [key for key in expected if key not in shapes]
    if unknown or absent:
        example = unknown[0] if unknown else absent[0]
        raise SlimtuneError(f"ckpt_path {path!r} does not fit this model: {len(unknown)} of its weights are not in the "
                            f"model and {len(absent)} of the model's are not in it (e.g. {example!r}); {valid}")


@dataclass
class Job:
    """Everything a run builds, for tests and for users who want to step in between building and fitting."""

    cfg: DictConfig
    tokenizer: Any
    model: torch.nn.Module
    module: Any
    datamodule: Any
    callbacks: list
    trainer: Any = None
    started: float = field(default_factory=time.perf_counter)


def prepare(cfg: DictConfig) -> Job:
    """Check every input and build tokenizer, data, model and callbacks; nothing is written yet.

    The checks come first, before anything loads (and prints): config values, paths, data files and model source
    (`slimtune.config.check_config`), then the checkpoint's contents, the trainer on this machine, optimizer,
    scheduler, callbacks, the `export.*` switches and each callback's `check_run`. Only what needs the loaded model
    (LoRA targets, the checkpoint's shapes, each callback's `check_model`) comes later.
    """
    import lightning.pytorch as L

    from slimtune.config import check_checkpoint, check_config, checkpoint_file
    from slimtune.data.datasets import load_raw, tokenize
    from slimtune.lightning import CausalLMDataModule, CausalLMModule
    from slimtune.lightning.module import OPTIMIZERS, SCHEDULERS
    from slimtune.models import load_model, load_tokenizer

    started = time.perf_counter()
    check_config(cfg)
    out = Path(cfg.output_dir)
    ckpt_file = checkpoint_file(cfg.get("ckpt_path"), out)
    ckpt_shapes = check_checkpoint(ckpt_file) if ckpt_file else None  # checked by check_config; here for the shapes
    strategy = check_trainer(cfg).strategy
    for key, valid in (("optimizer.name", OPTIMIZERS), ("scheduler.name", SCHEDULERS)):
        name = OmegaConf.select(cfg, key)
        if name is not None and name not in valid:
            raise SlimtuneError(f"{key}={name!r} is not supported; valid: {choices(valid)}")
    _check_target(cfg.get("logger"), "logger")
    callbacks = build_callbacks(cfg)  # nothing loads or writes yet: each method checks the run config first
    check_exports(cfg, callbacks)
    for cb in seam_callbacks(callbacks):
        cb.check_run(cfg)
        cb.check_strategy(strategy)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    tokenizer = load_tokenizer(cfg.model)
    data = tokenize(load_raw(cfg.data), tokenizer, cfg.data)
    model = load_model(cfg.model)
    module = CausalLMModule(model, tokenizer, optimizer=cfg.optimizer, scheduler=cfg.scheduler)
    if ckpt_shapes is not None:
        check_checkpoint_fits(ckpt_file, ckpt_shapes, module)
    datamodule = CausalLMDataModule(tokenizer, cfg.data, data=data)
    for cb in seam_callbacks(callbacks):
        cb.check_model(model, cfg)  # e.g. an export format's limits: refused before training, not at the end
    return Job(cfg, tokenizer, model, module, datamodule, callbacks, started=started)


def fit(job: Job) -> Job:
    """Create the output folder, the logger and the Trainer, and train (resuming from cfg.ckpt_path)."""
    cfg = job.cfg
    try:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:  # what access() could not foresee (e.g. root on a read-only mount)
        raise SlimtuneError(f"output_dir {str(cfg.output_dir)!r} cannot be created: {err.strerror or err}") from err
    from slimtune.config import checkpoint_file

    logger = build_logger(cfg)
    ckpt_file = checkpoint_file(cfg.get("ckpt_path"), Path(cfg.output_dir))
    if logger and ckpt_file is not None:
        _keep_logged_rows(logger, Path(ckpt_file))
    job.trainer = build_trainer(cfg, job.callbacks, logger)
    if logger:
        job.trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    job.trainer.fit(job.module, datamodule=job.datamodule, ckpt_path=cfg.get("ckpt_path") or None)
    return job


def _keep_logged_rows(logger, ckpt_file: Path) -> None:
    """A resumed run keeps the CSV rows its checkpoint's steps logged before the interruption.

    Lightning's CSV writer deletes an existing metrics.csv when it starts; the rows logged before the checkpoint's
    step are read first and handed to the new writer, which writes them ahead of the resumed run's own rows (rows at or
    after that step are logged again by the resumed steps).
    """
    from lightning.pytorch.loggers import CSVLogger

    if not isinstance(logger, CSVLogger):
        return
    metrics_file = Path(logger.log_dir) / "metrics.csv"
    if not metrics_file.is_file():
        return
    from slimtune.config import checkpoint_global_step

    resumed_at = checkpoint_global_step(ckpt_file)
    with metrics_file.open(newline="") as handle:
        reader = csv.DictReader(handle)
        keys = list(reader.fieldnames or [])
        rows = [{k: v for k, v in row.items() if v not in ("", None)} for row in reader]
    kept = [row for row in rows if row.get("step") is not None and int(float(row["step"])) < resumed_at]
    writer = logger.experiment  # creating the writer removes the old file
    writer.metrics = [{k: _number(v) for k, v in row.items()} for row in kept] + writer.metrics
    writer.metrics_keys = sorted(set(writer.metrics_keys) | set(keys))


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def finish(job: Job) -> dict[str, Any]:
    """Export the adapter, each callback's artefacts and the merged model; write and log the report."""
    from slimtune.models.loading import quantization_of

    cfg, trainer, module = job.cfg, job.trainer, job.module
    report: dict[str, Any] = {
        "name": cfg.get("name"),
        "model": str(cfg.model.get("name_or_path") or "config"),
        "quantization": quantization_of(cfg.model),
        "finetune": str(cfg.model.get("finetune", "lora")),
        "steps": trainer.global_step,
        "train_loss": _metric(trainer, "train/loss"),
        "val_loss": _metric(trainer, "val/loss"),
        "train_tokens": _all_processes_sum(trainer, module.tokens_seen),
        "train_tokens_per_s": None,
    }
    if module.train_seconds:  # every process trains for the same wall time: all tokens over one process's seconds
        report["train_tokens_per_s"] = report["train_tokens"] / module.train_seconds
    for cb in seam_callbacks(job.callbacks):
        report.update(cb.report())
    from slimtune.lightning.strategies import full_weights

    with full_weights(trainer, job.model):  # ZeRO-3, FSDP: every process gathers the weights, rank 0 writes
        if not trainer.is_global_zero:
            return report
        return _write_exports(job, report)


def _all_processes_sum(trainer, value: int) -> int:
    if trainer.world_size == 1:
        return int(value)
    import torch

    return int(trainer.strategy.reduce(torch.tensor(float(value), device=trainer.strategy.root_device),
                                       reduce_op="sum"))


def _write_exports(job: Job, report: dict[str, Any]) -> dict[str, Any]:
    from slimtune.models import save_adapter, save_merged
    from slimtune.models.loading import dtype_of

    cfg, trainer, out = job.cfg, job.trainer, Path(job.cfg.output_dir)
    export = cfg.get("export") or {}
    if export.get("adapter", True) and report["finetune"] == "lora":
        report["adapter_dir"] = str(save_adapter(job.model, out / "adapter", job.tokenizer))
    for cb in seam_callbacks(job.callbacks):  # e.g. quantized/ and compressed_tensors/ of PostTrainingQuantization
        report.update(cb.export(job.model, out, job.tokenizer, cfg))
    if export.get("merged", True):
        report["merged_dir"] = str(save_merged(job.model, out / "merged", job.tokenizer, dtype=dtype_of(cfg.model)))
    report["seconds"] = time.perf_counter() - job.started
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    report["report_path"] = str(out / "report.json")
    _log_report(trainer, report, out)
    print(format_report(report))
    return report


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune as `cfg` says and return the report (also written to `<output_dir>/report.json`).

    Every input is checked before the output folder is created, so bad input leaves nothing behind; a run that
    fails later removes the folder it created if nothing useful is in it (see `_remove_if_nothing_useful`).
    With `estimate=true` it prints the memory the run needs instead (`slimtune.estimate`) and writes nothing.
    """
    if OmegaConf.select(cfg, "estimate.enabled", default=False):
        from slimtune.estimate import print_estimate

        return print_estimate(cfg)
    job = prepare(cfg)
    out = Path(cfg.output_dir)
    missing = [folder for folder in (out, *out.parents) if not folder.exists()]  # what mkdir(parents=True) creates
    try:
        return finish(fit(job))
    except BaseException:
        if missing:
            exports = (*BUILTIN_EXPORTS, *(key for cb in seam_callbacks(job.callbacks) for key in cb.exports))
            _remove_if_nothing_useful(out, outermost=missing[-1], exports=exports)
        raise


def _remove_if_nothing_useful(out: Path, outermost: Path, exports: tuple[str, ...] = BUILTIN_EXPORTS) -> None:
    """A folder this run created and then failed in, holding no checkpoint (to resume from) and no export, holds only
    the logs of a failed start: removed, with the empty parents the run created up to `outermost`, so a failure
    leaves nothing behind. Exports themselves are never half-written (`slimtune.models.merge.atomic_directory`)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0 or not out.is_dir():
        return
    useful = any((out / "checkpoints").glob("*.ckpt")) or any((out / name).exists() for name in exports)
    if useful:
        return
    shutil.rmtree(out, ignore_errors=True)
    for parent in out.parents:
        if parent == outermost.parent:
            break
        try:
            parent.rmdir()  # only while empty: never anything another process put there meanwhile
        except OSError:
            break


def _metric(trainer, key: str):
    value = trainer.callback_metrics.get(key)
    return float(value) if value is not None else None


def _log_report(trainer, report: dict[str, Any], out: Path) -> None:
    for logger in trainer.loggers:
        numbers = {f"report/{k}": float(v) for k, v in report.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v)}
        logger.log_metrics(numbers, step=trainer.global_step)
        experiment = getattr(logger, "experiment", None)
        summary = getattr(experiment, "summary", None)
        if summary is not None and hasattr(experiment, "save"):  # W&B: summary + the report file in the run
            summary.update({k: v for k, v in report.items() if v is not None})
            experiment.save(str(out / "report.json"), base_path=str(out), policy="now")
        logger.save()


def format_report(report: dict[str, Any]) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    width = max(len(k) for k in report)
    lines = ["", "slimtune report", "-" * (width + 24)]
    lines += [f"{k.ljust(width)}  {fmt(v)}" for k, v in report.items() if v is not None]
    return "\n".join(lines)


def set_offline_defaults() -> None:
    """Hubs are optional: when HF_HUB_OFFLINE is set, `datasets` must not try the network either."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
