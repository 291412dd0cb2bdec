"""The run: composed config -> tokenizer, data, model, callbacks, loggers, Trainer -> fit -> export -> report."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from slimtune.errors import SlimtuneError

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
    from slimtune.callbacks.ptq import ptq_first

    return ptq_first(callbacks)  # post-training quantization runs before anything measures the model


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


def _check_output_dir(cfg: DictConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise SlimtuneError(f"output_dir {str(out)!r} is a file; valid: a folder path")
    return out


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
    """Check every input and build tokenizer, data, model and callbacks; nothing is written yet."""
    import lightning.pytorch as L

    from slimtune.data.datasets import load_raw, tokenize
    from slimtune.lightning import CausalLMDataModule, CausalLMModule
    from slimtune.models import load_model, load_tokenizer, resolve_source
    from slimtune.models.loading import quantization_of

    started = time.perf_counter()
    out = _check_output_dir(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    resolve_source(cfg.model)  # a missing path fails here, before any work
    quantization_of(cfg.model)
    from slimtune.callbacks.ptq import check_run_config

    check_run_config(cfg)  # PostTrainingQuantization needs a float, frozen base
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and ckpt_path != "last" and not Path(ckpt_path).is_file():
        raise SlimtuneError(f"ckpt_path {ckpt_path!r} does not exist; valid: a .ckpt file, 'last', or null")
    if ckpt_path == "last" and not (out / "checkpoints" / "last.ckpt").is_file():
        raise SlimtuneError(f"ckpt_path=last but {str(out / 'checkpoints' / 'last.ckpt')!r} does not exist; run without ckpt_path first")
    tokenizer = load_tokenizer(cfg.model)
    data = tokenize(load_raw(cfg.data), tokenizer, cfg.data)
    model = load_model(cfg.model)
    module = CausalLMModule(model, tokenizer, optimizer=cfg.optimizer, scheduler=cfg.scheduler)
    datamodule = CausalLMDataModule(tokenizer, cfg.data, data=data)
    callbacks = build_callbacks(cfg)
    if (cfg.get("export") or {}).get("compressed_tensors", False):
        from slimtune.callbacks.ptq import check_compressed_tensors_export

        check_compressed_tensors_export(callbacks, model)  # refuse before training, not at export time
    return Job(cfg, tokenizer, model, module, datamodule, callbacks, started=started)


def fit(job: Job) -> Job:
    """Create the output folder, the logger and the Trainer, and train (resuming from cfg.ckpt_path)."""
    cfg = job.cfg
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    logger = build_logger(cfg)
    ckpt_file = resolve_ckpt_path(cfg)
    if logger and ckpt_file is not None:
        _keep_logged_rows(logger, ckpt_file)
    job.trainer = build_trainer(cfg, job.callbacks, logger)
    if logger:
        job.trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    job.trainer.fit(job.module, datamodule=job.datamodule, ckpt_path=cfg.get("ckpt_path") or None)
    return job


def resolve_ckpt_path(cfg: DictConfig) -> Path | None:
    """The checkpoint file `ckpt_path` names (`last`: <output_dir>/checkpoints/last.ckpt), or None."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    return Path(cfg.output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)


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
    checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    resumed_at = int(checkpoint.get("global_step", 0))
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
    """Export the adapter and the merged model, write and log the report."""
    from slimtune.callbacks import CompressionStats, PerplexityEvaluation, PostTrainingQuantization
    from slimtune.callbacks.ptq import export_compressed_tensors, export_quantized
    from slimtune.models import save_adapter, save_merged
    from slimtune.models.loading import dtype_of, quantization_of

    cfg, trainer, module, out = job.cfg, job.trainer, job.module, Path(job.cfg.output_dir)
    report: dict[str, Any] = {
        "name": cfg.get("name"),
        "model": str(cfg.model.get("name_or_path") or "config"),
        "quantization": quantization_of(cfg.model),
        "finetune": str(cfg.model.get("finetune", "lora")),
        "steps": trainer.global_step,
        "train_loss": _metric(trainer, "train/loss"),
        "val_loss": _metric(trainer, "val/loss"),
        "train_tokens": module.tokens_seen,
        "train_tokens_per_s": module.tokens_seen / module.train_seconds if module.train_seconds else None,
    }
    for cb in job.callbacks:
        if isinstance(cb, PerplexityEvaluation):
            for moment, result in cb.results.items():
                report[f"{cb.name}_ppl_{moment}"] = result["ppl"]
        if isinstance(cb, CompressionStats):
            report.update({f"{cb.name}_{k}": v for k, v in cb.stats.items()})
        if isinstance(cb, PostTrainingQuantization):
            report.update(cb.report())
    if not trainer.is_global_zero:
        return report
    export = cfg.get("export") or {}
    if export.get("adapter", True) and report["finetune"] == "lora":
        report["adapter_dir"] = str(save_adapter(job.model, out / "adapter", job.tokenizer))
    if export.get("quantized", True):  # a base quantized by PostTrainingQuantization: slimtune.quant.load_quantized
        quantized_dir = export_quantized(job.model, out / "quantized", job.tokenizer)
        if quantized_dir is not None:
            report["quantized_dir"] = str(quantized_dir)
    if export.get("compressed_tensors", False):  # the same base in compressed-tensors format, for vLLM
        ct_dir = export_compressed_tensors(job.model, out / "compressed_tensors", job.tokenizer)
        if ct_dir is not None:
            report["compressed_tensors_dir"] = str(ct_dir)
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

    Every input is checked before the output folder is created, so bad input leaves nothing behind.
    """
    return finish(fit(prepare(cfg)))


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
