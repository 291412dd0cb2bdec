"""Strategies on 2 CPU processes, same global batch: step time, peak RSS and model-state memory per process.

    python benchmarks/strategies_cpu.py                          # tiny Llama and SmolLM2-135M, LoRA, 3 rounds
    python benchmarks/strategies_cpu.py --models tiny --rounds 2

One run alternates the strategies (ddp, deepspeed_zero2, deepspeed_zero3, deepspeed_zero3_offload, fsdp), the order
rotated each round so every strategy meets the machine's other load alike; figures are medians over rounds. Each run is
slimtune's own (`prepare` / `fit` / `finish` of the composed config `strategy=S trainer.devices=2`, Lightning starting
the second process), with a measuring callback added. Per process it records:

* step time: every training step's wall time, the median over the timed steps (the first `--warmup` are not timed);
* peak RSS: the process's own (`ru_maxrss`, from its start: loading included) and the largest RSS seen at the end of a
  training step;
* model states: the bytes of the distinct tensor storages the process holds for parameters (frozen base and trainable;
  ZeRO-3 partitions, FSDP shards), gradients, and optimizer states (Adam's two moments; DeepSpeed's fp32 master
  partition), in the last step after its backward, before the optimizer step (`on_before_optimizer_step`).
  Communication buffers (DDP's gradient buckets, DeepSpeed's reduce buckets) are not model states and are left out
  everywhere.

ZeRO's theory per process, with N processes, Psi trainable elements (4-byte parameters and gradients) and F bytes of
frozen parameters: ddp F + 4 Psi + 4 Psi + 8 Psi (torch AdamW: m, v); zero2 F + 4 Psi + (4 Psi + 12 Psi) / N (DeepSpeed
keeps an fp32 master copy of its partition besides m and v, the paper's K = 12); zero3 and zero3_offload
(F + 4 Psi + 4 Psi + 12 Psi) / N; fsdp (F + 4 Psi + 4 Psi + 8 Psi) / N. The report gives measured / theory.
The machine is shared with other jobs: read the times as medians of a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

C.offline()

STRATEGIES = ("ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload", "fsdp")
PROCESSES = 2
MODELS = {
    "tiny": ["model=tiny_llama"],
    "smollm2": ["model=smollm2_135m"],
}


# ----------------------------------------------------------------------------------------------- in each process


def _storage_key(tensor):
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class _Ledger:
    """Bytes of distinct storages, by kind: a storage counts once, in the first kind it is met in."""

    def __init__(self):
        self.seen: set = set()
        self.bytes = {"parameters": 0, "gradients": 0, "optimizer": 0}

    def add(self, tensor, kind: str) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        key = _storage_key(tensor)
        if key[1] == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.bytes[kind] += key[1]

    def add_all(self, value, kind: str, depth: int = 0) -> None:
        import torch

        if isinstance(value, torch.Tensor):
            self.add(value, kind)
            if value.grad is not None:
                self.add(value.grad, "gradients")
        elif isinstance(value, (list, tuple)) and depth < 3:
            for item in value:
                self.add_all(item, kind, depth + 1)
        elif isinstance(value, dict) and depth < 3:
            for item in value.values():
                self.add_all(item, kind, depth + 1)


def _deepspeed_kind(name: str) -> str | None:
    """Which model state a DeepSpeed ZeRO optimizer attribute holds (None: communication buffers, bookkeeping)."""
    lowered = name.lower()
    if "ipg" in lowered or "bucket" in lowered or "inf_or_nan" in lowered:
        return None
    if "grad" in lowered:  # grads_in_partition, averaged_gradients, grad_partitions_flat_buffer, ...
        return "gradients"
    if "fp32" in lowered or "single_partition" in lowered:  # the fp32 master copy of this process's partition
        return "optimizer"
    if any(key in lowered for key in ("bit16", "fp16", "lp_param", "param")):
        return "parameters"
    return None


def model_states(trainer, module) -> dict:
    """Bytes of parameters, gradients and optimizer states this process holds (see the module docstring)."""
    ledger = _Ledger()
    for param in module.parameters():
        if hasattr(param, "ds_tensor") and param.ds_tensor is not None:  # ZeRO-3: this process's partition
            ledger.add(param.ds_tensor, "parameters")
            if getattr(param, "ds_persist", False):
                ledger.add(param.data, "parameters")
        else:
            ledger.add(param.data, "parameters")
        if param.grad is not None:
            ledger.add(param.grad, "gradients")
    for optimizer in trainer.strategy.optimizers:
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning / DeepSpeed wrappers
        if inner is not optimizer:  # DeepSpeed's ZeRO optimizer: partitions, fp32 master copies, gradient partitions
            for name, value in vars(optimizer).items():
                kind = _deepspeed_kind(name)
                if kind is not None:
                    ledger.add_all(value, kind)
        for state in getattr(inner, "state", {}).values():
            ledger.add_all(state, "optimizer")
    result = dict(ledger.bytes)
    result["total"] = sum(ledger.bytes.values())
    return result


def theory(strategy: str, trainable: int, frozen_bytes: int, processes: int) -> dict:
    """ZeRO's per-process model states (bytes), for 4-byte trainable parameters and gradients."""
    p, n = trainable, processes
    if strategy == "ddp":
        parts = {"parameters": frozen_bytes + 4 * p, "gradients": 4 * p, "optimizer": 8 * p}
    elif strategy == "deepspeed_zero2":
        parts = {"parameters": frozen_bytes + 4 * p, "gradients": 4 * p / n, "optimizer": 12 * p / n}
    elif strategy in ("deepspeed_zero3", "deepspeed_zero3_offload"):
        parts = {"parameters": (frozen_bytes + 4 * p) / n, "gradients": 4 * p / n, "optimizer": 12 * p / n}
    elif strategy == "fsdp":
        parts = {"parameters": (frozen_bytes + 4 * p) / n, "gradients": 4 * p / n, "optimizer": 8 * p / n}
    else:
        raise ValueError(strategy)
    parts["total"] = sum(parts.values())
    return parts


def make_probe(out_dir: Path, warmup: int):
    import lightning.pytorch as L

    class Probe(L.Callback):
        def __init__(self):
            self.step_s: list[float] = []
            self.rss_mb: list[float] = []
            self._t = 0.0
            self.states: dict | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t = time.perf_counter()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == trainer.max_steps - 1:  # the last step's gradients and the optimizer states exist
                self.states = model_states(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.step_s.append(time.perf_counter() - self._t)
            self.rss_mb.append(C.rss_mb())

        def setup(self, trainer, pl_module, stage):  # before the strategy shards anything
            params = list(pl_module.model.parameters())
            self.trainable = sum(p.numel() for p in params if p.requires_grad)
            self.frozen_bytes = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)

        def on_train_end(self, trainer, pl_module):
            trainable, frozen_bytes = self.trainable, self.frozen_bytes
            timed = self.step_s[warmup:]
            record = {
                "rank": trainer.global_rank, "pid": os.getpid(), "steps": len(self.step_s),
                "median_step_seconds": C.median(timed), "step_seconds": self.step_s,
                "peak_rss_mb": C.ru_maxrss_mb(), "peak_rss_in_training_mb": max(self.rss_mb) if self.rss_mb else None,
                "model_states_bytes": self.states, "trainable_elements": trainable, "frozen_bytes": frozen_bytes,
                "train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
            }
            (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    return Probe()


def child(args) -> None:
    """One run (this process is rank 0; Lightning starts rank 1 by running this command again)."""
    from slimtune.config import compose_config
    from slimtune.run import finish, fit, prepare

    out_dir = Path(args.results_dir)
    overrides = [*MODELS[args.model], "model.quantization=none", f"strategy={args.strategy}",
                 f"trainer.devices={PROCESSES}", "trainer.accelerator=cpu", f"trainer.max_steps={args.warmup + args.steps}",
                 f"data.batch_size={args.batch_size}", f"data.block_size={args.block_size}", "model.lora.dropout=0.0",
                 "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false",
                 "logger=none", "callbacks=[]", "export.adapter=false", "export.merged=false",
                 f"output_dir={out_dir / 'run'}", "seed=7"]
    cfg = compose_config(overrides)
    job = prepare(cfg)
    job.callbacks.append(make_probe(out_dir, args.warmup))
    finish(fit(job))


# ----------------------------------------------------------------------------------------------------- the parent


def one_run(args, model: str, strategy: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="strategies_cpu_") as tmp:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--strategy", strategy,
                   "--results-dir", tmp, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch-size", str(args.batch_size), "--block-size", str(args.block_size)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(C.ROOT / "src"), env.get("PYTHONPATH")) if p)
        started = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - started
        ranks = sorted(Path(tmp).glob("rank*.json"))
        if result.returncode != 0 or len(ranks) != PROCESSES:
            log = C.RESULTS / "logs" / f"strategies_cpu_{model}_{strategy}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(result.stdout + "\n" + result.stderr)
            return {"model": model, "strategy": strategy, "error": f"exit {result.returncode}, see {log}"}
        records = [json.loads(path.read_text()) for path in ranks]
    return {"model": model, "strategy": strategy, "wall_seconds": wall, "processes": records,
            "loadavg_1m": os.getloadavg()[0]}


def _step(run: dict) -> float:
    return C.median([p["median_step_seconds"] for p in run["processes"]])


def summarize(runs: list[dict], strategies: list[str], models: list[str]) -> dict:
    """Medians over rounds per strategy; step times also as the median over rounds of the ratio to the first strategy
    of the same round (the runs of one round are minutes apart, so they saw similar load)."""
    summary = {}
    for model in models:
        rows = {}
        for strategy in strategies:
            ok = [r for r in runs if r["model"] == model and r["strategy"] == strategy and "error" not in r]
            if not ok:
                rows[strategy] = {"error": next((r["error"] for r in runs if r["model"] == model
                                                 and r["strategy"] == strategy), "no run")}
                continue
            processes = [p for r in ok for p in r["processes"]]
            first = ok[0]["processes"][0]
            expected = theory(strategy, first["trainable_elements"], first["frozen_bytes"], PROCESSES)
            measured = [p["model_states_bytes"] for p in processes if p["model_states_bytes"]]
            measured_total = C.median([m["total"] for m in measured])
            baseline = {r["round"]: r for r in runs if r["model"] == model and r["strategy"] == strategies[0]
                        and "error" not in r}
            ratios = [_step(r) / _step(baseline[r["round"]]) for r in ok if r["round"] in baseline]
            rows[strategy] = {
                "rounds": len(ok),
                "median_step_seconds": C.median([p["median_step_seconds"] for p in processes]),
                f"step_time_over_{strategies[0]}_same_round": C.median(ratios),
                "peak_rss_mb_per_process": C.median([p["peak_rss_mb"] for p in processes]),
                "peak_rss_in_training_mb_per_process": C.median([p["peak_rss_in_training_mb"] for p in processes]),
                "model_states_mb_per_process": {k: C.median([m[k] for m in measured]) / 2**20 for k in measured[0]},
                "theory_mb_per_process": {k: v / 2**20 for k, v in expected.items()},
                "measured_over_theory": measured_total / expected["total"] if measured_total else None,
                "train_loss": C.median([p["train_loss"] for p in processes if p["rank"] == 0]),
                "trainable_elements": first["trainable_elements"], "frozen_mb": first["frozen_bytes"] / 2**20,
            }
        summary[model] = rows
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2", help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=2, help="per process; the global batch is twice this")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--out", default=str(C.RESULTS / "strategies_cpu.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--results-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    models = [m for m in args.models.split(",") if m]
    strategies = [s for s in args.strategies.split(",") if s]
    runs = []
    for model in models:
        for round_ in range(args.rounds):
            order = strategies[round_ % len(strategies):] + strategies[:round_ % len(strategies)]
            for strategy in order:
                run = one_run(args, model, strategy)
                run["round"] = round_
                runs.append(run)
                brief = run.get("error") or f"{C.median([q['median_step_seconds'] for q in run['processes']]):.3f} s/step"
                print(f"{model} round {round_ + 1} {strategy}: {brief}", flush=True)
    result = {
        "benchmark": "strategies_cpu",
        "command": "python " + " ".join([str(Path(__file__).relative_to(C.ROOT))] + sys.argv[1:]),
        "settings": {"processes": PROCESSES, "batch_size_per_process": args.batch_size,
                     "global_batch": args.batch_size * PROCESSES, "block_size": args.block_size,
                     "timed_steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
                     "finetune": "LoRA r=8 on all linear layers, fp32 base", "precision": "32-true"},
        "machine_shared": "yes: other jobs ran on the same 2 cores; times are medians over alternated rounds",
        "summary": summarize(runs, strategies, models),
        "runs": runs,
        "env": C.environment(),
    }
    C.write_json(Path(args.out), result)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
