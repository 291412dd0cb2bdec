"""Activation outliers at the inputs of linear layers: the channels that make quantization hard (LLM.int8, SmoothQuant).

`ActivationOutlierMonitor` puts forward pre-hooks on linear layers (a PEFT LoRA layer counts once, hooked at the
wrapper, whose input is its base layer's) and accumulates, per layer and over calls:

* per-channel running max |x| and per-channel median |x| (the mean over calls of each call's median over tokens);
* `max_abs` (the largest channel max), `median_abs` (the median over channels of the channel medians) and their ratio
  `max_median_ratio`, large when a few channels dwarf the rest;
* `outlier_share`: the share of channels whose max |x| exceeds `threshold` (6.0, LLM.int8's outlier threshold);
* `kurtosis` of all activation values (Pearson; a Gaussian gives 3), from running moments in float64.

A layer is *at risk* when `outlier_share > share_level` (5%) or `max_median_ratio > ratio_level` (50; inputs with
Gaussian-like channels give 5-10, one channel 100x the others behind an RMSNorm of width 64 about 100); it warns once per
layer (`rank_zero_warn` in a Trainer, `warnings.warn` standalone) naming those layers.

In a Trainer it samples the training batches of every `every_n_steps`-th optimizer step (hooks attached at train
start, active only on those batches, off during backward so recomputed checkpointed forwards are not counted twice), and on
each of them logs `<name>/*` scalars to every logger and the per-layer table: a W&B Table for a `WandbLogger`, else
rows appended to `<trainer.log_dir or default_root_dir>/outliers.csv`. At fit end it saves a plot
(`outliers.png`) when matplotlib is importable, else prints a one-line note. Standalone, e.g. over calibration data::

    monitor = ActivationOutlierMonitor().attach(model)
    for batch in calibration_batches:
        model(batch)
    rows = monitor.summary()   # list of dicts, one per layer
    monitor.check()            # warns naming the layers at risk; returns their names
    monitor.detach()
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.callbacks._base import (
    SlimtuneCallback,
    check_bool,
    check_int,
    check_model_arg,
    check_name,
    check_number,
    is_sequence,
    log_to_loggers,
    show,
)
from slimtune.errors import SlimtuneError
from slimtune.select import is_linear_like, select_layers

COLUMNS = ("layer", "calls", "tokens", "channels", "max_abs", "median_abs", "max_median_ratio", "outlier_channels",
           "outlier_share", "top_channel", "kurtosis", "at_risk")


def _warn(message: str, in_trainer: bool) -> None:
    if in_trainer:
        try:
            from lightning.pytorch.utilities import rank_zero_warn
        except ImportError:  # pragma: no cover
            pass
        else:
            rank_zero_warn(message)
            return
    warnings.warn(message, stacklevel=3)


class _LayerStats:
    """Running statistics of one layer's input."""

    def __init__(self, channels: int):
        self.channels = channels
        self.calls = 0
        self.tokens = 0
        self.ch_max = torch.zeros(channels, dtype=torch.float32)
        self.ch_median_sum = torch.zeros(channels, dtype=torch.float64)
        self.moments = torch.zeros(4, dtype=torch.float64)  # sums of x, x^2, x^3, x^4
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.channels).float()
        if x.shape[0] == 0:
            return
        absx = x.abs()
        self.ch_max = torch.maximum(self.ch_max, absx.amax(dim=0).cpu())
        self.ch_median_sum += absx.median(dim=0).values.double().cpu()
        d = x.double()
        p2 = d * d
        self.moments += torch.stack([d.sum(), p2.sum(), (p2 * d).sum(), (p2 * p2).sum()]).cpu()
        self.count += d.numel()
        self.calls += 1
        self.tokens += x.shape[0]

    def row(self, name: str, threshold: float, share_level: float, ratio_level: float) -> dict[str, Any]:
        if self.calls == 0:
            return {"layer": name, "calls": 0, "tokens": 0, "channels": self.channels, "max_abs": float("nan"),
                    "median_abs": float("nan"), "max_median_ratio": float("nan"), "outlier_channels": 0,
                    "outlier_share": 0.0, "top_channel": -1, "kurtosis": float("nan"), "at_risk": False}
        ch_median = self.ch_median_sum / self.calls
        max_abs = float(self.ch_max.max())
        median_abs = float(ch_median.median())
        ratio = max_abs / median_abs if median_abs > 0 else float("inf")
        outliers = int((self.ch_max > threshold).sum())
        share = outliers / self.channels
        mean, e2, e3, e4 = (self.moments / max(self.count, 1)).tolist()
        var = e2 - mean * mean
        central4 = e4 - 4 * mean * e3 + 6 * mean * mean * e2 - 3 * mean ** 4
        kurtosis = central4 / (var * var) if var > 0 else float("nan")
        return {"layer": name, "calls": self.calls, "tokens": self.tokens, "channels": self.channels,
                "max_abs": max_abs, "median_abs": median_abs, "max_median_ratio": ratio,
                "outlier_channels": outliers, "outlier_share": share, "top_channel": int(self.ch_max.argmax()),
                "kurtosis": kurtosis, "at_risk": bool(share > share_level or ratio > ratio_level)}

    def state(self) -> dict[str, Any]:
        return {"channels": self.channels, "calls": self.calls, "tokens": self.tokens, "ch_max": self.ch_max.clone(),
                "ch_median_sum": self.ch_median_sum.clone(), "moments": self.moments.clone(), "count": self.count}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _LayerStats:
        stats = cls(int(state["channels"]))
        stats.calls, stats.tokens, stats.count = int(state["calls"]), int(state["tokens"]), int(state["count"])
        stats.ch_max = state["ch_max"].float().cpu().clone()
        stats.ch_median_sum = state["ch_median_sum"].double().cpu().clone()
        stats.moments = state["moments"].double().cpu().clone()
        return stats


class ActivationOutlierMonitor(SlimtuneCallback):
    """Per-layer activation-outlier statistics of linear-layer inputs; see the module docstring.

    Args:
        patterns: `all-linear` or name patterns (a name equal to the pattern, ending in `"." + pattern`, or matching it
            as a full regex); a pattern matching no layer raises SlimtuneError.
        exclude: patterns of layers left out.
        threshold: |x| above which a channel is an outlier (6.0).
        every_n_steps: a sample every this many optimizer steps (the first at step 0).
        share_level, ratio_level: a layer is at risk above this outlier share (in [0, 1)) or max/median ratio.
        name: prefix of the logged metrics and of the W&B table; also this callback's checkpoint state key.
        plot: save `outliers.png` at fit end if matplotlib is importable.
        verbose: print one line at train start naming how many layers are watched.
        model: the model to watch in a Trainer: an `nn.Module`, or the name / dotted path of the LightningModule's
            attribute holding it (`"lm"`). Default: `pl_module.model`, else the only transformers / PEFT model it
            holds. (Standalone, `attach(model)` takes the model.)
    """

    def __init__(
        self,
        patterns: str | Sequence[str] = "all-linear",
        exclude: Sequence[str] = (),
        threshold: float = 6.0,
        every_n_steps: int = 50,
        share_level: float = 0.05,
        ratio_level: float = 50.0,
        name: str = "outliers",
        plot: bool = True,
        verbose: bool = True,
        model: Any = None,
    ):
        owner = "ActivationOutlierMonitor"
        if isinstance(patterns, str):
            if not patterns:
                raise SlimtuneError("ActivationOutlierMonitor patterns='' is not valid; valid: all-linear or name patterns")
        elif not is_sequence(patterns) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise SlimtuneError(f"ActivationOutlierMonitor patterns={show(patterns)} is not valid; valid: all-linear or a non-empty list of name patterns")
        if exclude is not None and not isinstance(exclude, str) and not is_sequence(exclude):
            raise SlimtuneError(f"ActivationOutlierMonitor exclude={show(exclude)} is not valid; valid: a list of name patterns")
        exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())
        if not all(isinstance(p, str) and p for p in exclude):
            raise SlimtuneError(f"ActivationOutlierMonitor exclude={show(exclude)} is not valid; valid: a list of name patterns")
        threshold = check_number(threshold, "threshold", owner, 0)
        ratio_level = check_number(ratio_level, "ratio_level", owner, 0)
        share_level = check_number(share_level, "share_level", owner, 0, 1, low_open=False)
        every_n_steps = check_int(every_n_steps, "every_n_steps", owner, 1)
        self.patterns = patterns if isinstance(patterns, str) else list(patterns)
        self.exclude = exclude
        self.threshold = float(threshold)
        self.every_n_steps = every_n_steps
        self.share_level = float(share_level)
        self.ratio_level = float(ratio_level)
        self.name = check_name(name, "name", owner)
        self.plot = check_bool(plot, "plot", owner)
        self.verbose = check_bool(verbose, "verbose", owner)
        self.model = check_model_arg(model, owner)
        self.stats: dict[str, _LayerStats] = {}
        self.warned: set[str] = set()
        self.active = False
        self._handles: list = []
        self._order: list[str] = []
        self._logged_step: int | None = None
        self._in_trainer = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------ standalone API

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers `patterns` name (minus `exclude`), in module order, by plain name (`slimtune.select`'s rule);
        a PEFT LoRA layer is watched at its wrapper, whose input is its base layer's."""
        layers = select_layers(model, self.patterns, self.exclude, what="ActivationOutlierMonitor pattern",
                               setting="ActivationOutlierMonitor patterns")
        other = next((ref for ref in layers.values() if not is_linear_like(ref.layer)), None)
        if other is not None:  # its channels are not the input's last dimension
            raise SlimtuneError(f"ActivationOutlierMonitor watches linear layers; layer {other.name} is "
                                f"{type(other.layer).__name__}; valid: patterns naming linear layers, or exclude it")
        return {name: ref.outer for name, ref in layers.items()}

    def attach(self, model: nn.Module, active: bool = True) -> ActivationOutlierMonitor:
        """Hook the selected layers of `model` (recording at once when `active`); keeps accumulated statistics."""
        self.detach()
        layers = self.select(model)
        for name, module in layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        self._order = list(layers)
        self.active = active
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.active = False

    def reset(self) -> None:
        self.stats = {}
        self.warned = set()

    def _hook(self, name: str):
        def hook(module, args):
            if not self.active or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
                return
            x = args[0]
            stats = self.stats.get(name)
            if stats is None or stats.channels != x.shape[-1]:
                stats = self.stats[name] = _LayerStats(int(x.shape[-1]))
            stats.update(x)
        return hook

    def summary(self) -> list[dict[str, Any]]:
        """One row per layer seen (module order): the COLUMNS of the module docstring."""
        names = [n for n in self._order if n in self.stats] + [n for n in self.stats if n not in self._order]
        return [self.stats[n].row(n, self.threshold, self.share_level, self.ratio_level) for n in names]

    def at_risk(self) -> list[dict[str, Any]]:
        return [row for row in self.summary() if row["at_risk"]]

    def check(self) -> list[str]:
        """Warn (once per layer) naming the layers at risk; returns the names of all layers at risk."""
        risky = self.at_risk()
        new = [row for row in risky if row["layer"] not in self.warned]
        if new:
            described = "; ".join(
                f"{r['layer']} (max/median {r['max_median_ratio']:.0f}, {100 * r['outlier_share']:.1f}% channels "
                f"> {self.threshold:g}, top channel {r['top_channel']})" for r in new[:10])
            more = f"; and {len(new) - 10} more" if len(new) > 10 else ""
            _warn(f"activation outliers: {len(new)} layer(s) at risk for quantization: {described}{more}; "
                  "activation-aware quantization moves such outliers into the weights: PostTrainingQuantization "
                  "method=awq or awq_gptq (weight-only), or method=smoothquant (8-bit weights and activations)",
                  self._in_trainer)
            self.warned.update(r["layer"] for r in new)
        return [row["layer"] for row in risky]

    def save_plot(self, path: str | Path) -> Path | None:
        """Bar chart of max/median ratio and outlier share per layer; None (and a note) without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("[slimtune] matplotlib is not installed: skipping the activation-outlier plot (pip install matplotlib)")
            return None
        rows = self.summary()
        if not rows:
            return None
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.25 * len(rows)), 6), sharex=True)
        xs = range(len(rows))
        ax1.bar(xs, [r["max_median_ratio"] for r in rows], color=["tab:red" if r["at_risk"] else "tab:blue" for r in rows])
        ax1.axhline(self.ratio_level, color="gray", linestyle="--")
        ax1.set_yscale("log")
        ax1.set_ylabel("max / median |x|")
        ax2.bar(xs, [100 * r["outlier_share"] for r in rows])
        ax2.axhline(100 * self.share_level, color="gray", linestyle="--")
        ax2.set_ylabel(f"% channels > {self.threshold:g}")
        ax2.set_xticks(list(xs), [r["layer"] for r in rows], rotation=90, fontsize=6)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer, pl_module) -> None:
        self.model_for(pl_module)  # a model that cannot be found fails at fit start, before the sanity check

    def on_train_start(self, trainer, pl_module) -> None:
        self._in_trainer = True
        self.attach(self.model_for(pl_module), active=False)  # after fit-start hooks (PTQ may have swapped layers)
        if self.verbose and trainer.is_global_zero:
            print(f"[slimtune] watching the inputs of {len(self._order)} linear layers every {self.every_n_steps} steps")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.active = trainer.global_step % self.every_n_steps == 0
        self._sampled_step = trainer.global_step if self.active else None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.active = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.active = False
        step = getattr(self, "_sampled_step", None)
        if step is not None and step != self._logged_step:
            self._logged_step = step
            self.log_summary(trainer, step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.detach()

    def on_fit_end(self, trainer, pl_module) -> None:
        log_dir = self._log_dir(trainer)
        if self.plot and self.stats and trainer.is_global_zero:
            self.save_plot(Path(log_dir) / "outliers.png")

    def _log_dir(self, trainer) -> str:
        return str(getattr(trainer, "log_dir", None) or trainer.default_root_dir)

    def log_summary(self, trainer, step: int) -> list[dict[str, Any]]:
        """Log the summary at `step`: scalars to every logger, the table to W&B or outliers.csv; warn."""
        rows = self.summary()
        log_dir = self._log_dir(trainer)  # every rank: trainer.log_dir broadcasts
        if not rows:
            return rows
        log_to_loggers(trainer, {f"{self.name}/{k}": float(v) for k, v in self._scalars(rows).items()})
        if trainer.is_global_zero:
            wandb_loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
            for logger in wandb_loggers:
                logger.log_table(key=f"{self.name}/table", columns=["step", *COLUMNS],
                                 data=[[step, *(r[c] for c in COLUMNS)] for r in rows], step=step)
            if not wandb_loggers:
                self.write_csv(Path(log_dir) / "outliers.csv", rows, step)
        self.check()
        return rows

    @staticmethod
    def _scalars(rows: list[dict[str, Any]]) -> dict[str, float | int]:
        """The summary over all layers: the largest max/median ratio, outlier share and kurtosis, layers at risk."""
        if not rows:
            return {}
        finite = [r["max_median_ratio"] for r in rows if r["max_median_ratio"] == r["max_median_ratio"]]
        return {
            "max_median_ratio": max(finite) if finite else float("nan"),
            "max_outlier_share": max(r["outlier_share"] for r in rows),
            "layers_at_risk": sum(r["at_risk"] for r in rows),
            "max_kurtosis": max((r["kurtosis"] for r in rows if r["kurtosis"] == r["kurtosis"]), default=float("nan")),
        }

    @staticmethod
    def write_csv(path: Path, rows: list[dict[str, Any]], step: int | None = None) -> Path:
        """Append `rows` (with a `step` column) to a CSV file, writing the header first when the file is new."""
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", *COLUMNS])
            for r in rows:
                writer.writerow([step, *(r[c] for c in COLUMNS)])
        return path

    def report(self) -> dict[str, Any]:
        """The last summary's scalars, as logged: `<name>_max_median_ratio`, `_max_outlier_share`, `_layers_at_risk`,
        `_max_kurtosis`; nothing before any sample."""
        return {f"{self.name}_{k}": v for k, v in self._scalars(self.summary()).items()}

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {n: s.state() for n, s in self.stats.items()}, "warned": sorted(self.warned)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stats = {n: _LayerStats.from_state(s) for n, s in state_dict.get("stats", {}).items()}
        self.warned = set(state_dict.get("warned", []))
