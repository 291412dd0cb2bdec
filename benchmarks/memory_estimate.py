"""The memory estimate (`estimate=true`, slimtune.estimate) against measured peak memory, and its model-state part
against DeepSpeed's own estimator.

    python benchmarks/memory_estimate.py              # ~10 min on 2 CPU cores: 5 short training runs + arithmetic
    python benchmarks/memory_estimate.py --cases tiny_lora_fp32,tiny_full
    python benchmarks/memory_estimate.py --strategies ddp,deepspeed_zero2,deepspeed_zero3,deepspeed_zero3_offload,fsdp

**Measured.** Each case is a short run (3 optimizer steps; no validation, checkpoint, logger or callbacks) in its
own process on the CPU, built with the run's own pieces (`compose_config`, `load_tokenizer`, `tokenize`,
`load_model`, `CausalLMModule`, `build_trainer`). Compared: **peak resident memory during `trainer.fit`** (the
kernel's high-water mark `VmHWM`, reset through /proc/self/clear_refs right after the model is built, so loading's
transients such as GGUF dequantization do not count) **minus the process's resident memory just before the model
loads** (`VmRSS`, after every library is imported and the data tokenized). That difference holds the model, its
adapters, gradients, optimizer states and everything the training steps allocate. **Estimated:** the `peak` of
`slimtune.estimate.estimate_run(cfg)` for the same config (CPU numerics: fp32 dropout masks, AdamW one tensor at a
time), computed before anything loads. Goal: estimate / measured within 15%.

**Strategies** (`--strategies`, with `--cases`, default `tiny_lora_fp32,smollm2_lora_fp32`): each case again under
`strategy=S trainer.devices=2` on 2 CPU processes (Lightning starts the second by running this script again). Each
process measures the same quantity as above for itself (its own baseline, reset and high-water mark) and is compared
with the estimate of the same config for that strategy and 2 devices; with a CPU accelerator the estimate counts what
the process holds in its own memory (offloaded states included) and, of DeepSpeed's gradient buckets, the pages
DeepSpeed writes (see slimtune.estimate). Goal: every process within 15%. Results: memory_estimate_strategies.json.

**DeepSpeed.** For full fine-tunes with bf16 mixed precision and AdamW (tiny Llama, SmolLM2-135M, Llama-2
7B/13B/70B shapes, 1/2/8 devices, ZeRO-2/3 with and without offload) the estimate's per-device model states equal
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` for the same parameter counts.
Goal: within 5%.

Data: WikiText-2 validation (`wikitext2:valid`, see `--data-dir`) packed into blocks. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import gc
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

STEPS = 3
COMMON = ["logger=none", "callbacks=[]", "trainer.enable_checkpointing=false", "trainer.limit_val_batches=0",
          "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", f"trainer.max_steps={STEPS}",
          "trainer.accelerator=cpu", "trainer.devices=1", "data=wikitext2"]
# 16,384 tokens a step: the tensors estimated dominate the framework's own few tens of MiB (Python objects, Lightning,
# library code paged in by the first step)
TINY = ["data.block_size=512", "data.batch_size=32"]
CASES = {
    "tiny_lora_fp32": ["recipe=qlora_tiny", "model.quantization=none", *TINY],
    "tiny_qlora_nf4": ["recipe=qlora_tiny", *TINY],
    "tiny_full": ["recipe=full_tiny", *TINY],
    "smollm2_lora_fp32": ["recipe=lora_cpu", "data.block_size=256", "data.batch_size=2"],
    # qlora_cpu as shipped (NF4 + DQ, LoRA r=64 dropout 0.1, paged 8-bit AdamW, gradient checkpointing, accumulation 2)
    "smollm2_qlora_nf4": ["recipe=qlora_cpu", "data.block_size=256", "data.batch_size=2"],
}
DS_MODELS = {"tiny": ["recipe=full_tiny"], "smollm2_135m": ["recipe=lora_cpu"], "llama2_7b": ["recipe=qlora_7b"],
             "llama2_13b": ["recipe=qlora_13b"], "llama2_70b": ["recipe=qlora_70b"]}
PROCESSES = 2  # --strategies: CPU processes per run
STRATEGY_CASES = ("tiny_lora_fp32", "smollm2_lora_fp32")
DS_STRATEGIES = ("deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3", "deepspeed_zero3_offload")


def _status(key: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _step_probe():
    """A Lightning callback recording, per training step, the RSS at its start and the high-water mark during it."""
    import lightning.pytorch as L

    class StepProbe(L.Callback):
        def __init__(self):
            self.steps: list[tuple[int, int]] = []  # (RSS at batch start, peak RSS during the batch)
            self.between = 0  # the highest mark outside the batches (fit setup)
            self.at_train_start = 0  # RSS once fit's setup is done (strategy wrapping, ZeRO partitioning)

        def on_train_start(self, trainer, pl_module):
            self.at_train_start = _status("VmRSS")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.between = max(self.between, _status("VmHWM"))
            self._start = _status("VmRSS")
            _reset_peak()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append((self._start, _status("VmHWM")))

    return StepProbe()


def _import_strategy_libraries(strategy: str) -> None:
    """Import (and load the compiled ops of) what the strategy uses before the baseline, as every other library is:
    their code and module objects are no training memory. Lightning would import them inside fit."""
    import torch.distributed  # noqa: F401

    if strategy.startswith("deepspeed"):
        import deepspeed  # noqa: F401
        from deepspeed.runtime.zero import stage3, stage_1_and_2  # noqa: F401

        if strategy.endswith("offload"):
            from deepspeed.ops.op_builder import CPUAdamBuilder

            CPUAdamBuilder().load()  # DeepSpeedCPUAdam's C++ op (compiled on first use, then cached)
    elif strategy == "fsdp":
        import torch.distributed.fsdp  # noqa: F401


def worker(name: str, out_dir: str, strategy: str | None = None) -> dict:
    """One case in this process: estimate, then build and train, measuring resident memory. With `strategy`, the
    case runs on PROCESSES CPU processes and this is one of them (each process measures itself)."""
    from slimtune.config import check_config, compose_config
    from slimtune.data.datasets import load_raw, tokenize
    from slimtune.estimate import estimate_run
    from slimtune.lightning import CausalLMDataModule, CausalLMModule
    from slimtune.models import load_model, load_tokenizer
    from slimtune.run import build_trainer

    placement = [f"strategy={strategy}", f"trainer.devices={PROCESSES}"] if strategy else []
    cfg = compose_config([*CASES[name], *COMMON, *placement, f"output_dir={out_dir}"])
    check_config(cfg)
    est = estimate_run(cfg)
    import lightning.pytorch as L

    L.seed_everything(42, verbose=False)
    tokenizer = load_tokenizer(cfg.model)
    datamodule = CausalLMDataModule(tokenizer, cfg.data, data=tokenize(load_raw(cfg.data), tokenizer, cfg.data))
    gc.collect()
    before_imports = _status("VmRSS")
    if strategy:
        _import_strategy_libraries(strategy)
    gc.collect()
    baseline = _status("VmRSS")
    model = load_model(cfg.model)
    module = CausalLMModule(model, tokenizer, optimizer=cfg.optimizer, scheduler=cfg.scheduler)
    gc.collect()
    loaded = _status("VmRSS")
    _reset_peak()
    probe = _step_probe()
    trainer = build_trainer(cfg, [probe], False)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    peak = max(probe.between, _status("VmHWM"), *(high for _, high in probe.steps))
    measured = peak - baseline
    later = probe.steps[1:] or probe.steps  # the first step also pages in library code and allocates the states
    step_transient = max(high - start for start, high in later)
    extra = {}
    if strategy:
        extra = {"strategy": strategy, "processes": PROCESSES, "rank": trainer.global_rank,
                 "strategy_library_imports_mib": (baseline - before_imports) / 2**20,
                 "rss_at_train_start_above_baseline_mib": (probe.at_train_start - baseline) / 2**20}
    return {
        **extra,
        "case": name, "overrides": CASES[name], "steps": trainer.global_step,
        "fit_seconds": round(time.perf_counter() - started, 1),
        "baseline_rss_mib": baseline / 2**20, "after_load_rss_mib": loaded / 2**20, "peak_rss_mib": peak / 2**20,
        "measured_peak_mib": measured / 2**20,
        "measured_model_at_rest_mib": (loaded - baseline) / 2**20,
        "steps_rss_mib": [[start / 2**20, high / 2**20] for start, high in probe.steps],
        "measured_step_transient_mib": step_transient / 2**20,
        "first_step_start_above_load_mib": (probe.steps[0][0] - loaded) / 2**20,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        **estimate_fields(est, measured),
    }


def estimate_fields(est, measured: float) -> dict:
    """The estimate's figures for a record (measured: the measured peak in bytes)."""
    weights = sum(est.value(key) for key in ("buffers", "base_quantized", "base_other", "trainable"))
    return {
        "estimated_peak_mib": est.peak / 2**20, "ratio_estimate_to_measured": est.peak / measured,
        "estimated_weights_mib": weights / 2**20, "estimated_resident_mib": est.resident / 2**20,
        "estimated_step_transient_mib": max(est.backward, est.step) / 2**20,
        "estimate_lines_mib": {line.key: line.device / 2**20 for line in est.lines},
        "estimate_phase_mib": {"resident": est.resident / 2**20, "backward": est.backward / 2**20,
                               "step": est.step / 2**20},
        "tokens_per_step": est.settings.tokens, "gradient_checkpointing": est.settings.gradient_checkpointing,
    }


def reestimate(path: Path) -> None:
    """Recompute the estimates of a --strategies result with the estimator as it is now; measurements stay."""
    from slimtune.config import compose_config
    from slimtune.estimate import estimate_run

    result = json.loads(path.read_text())
    estimates = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for record in result["runs"]:
            key = (record["case"], record["strategy"])
            if key not in estimates:
                estimates[key] = estimate_run(compose_config([
                    *CASES[record["case"]], *COMMON, f"strategy={record['strategy']}",
                    f"trainer.devices={record['processes']}", f"output_dir={out_dir}"]))
            record.update(estimate_fields(estimates[key], record["measured_peak_mib"] * 2**20))
    _summarize_strategy_runs(result["runs"])
    worst = max(abs(r["ratio_estimate_to_measured"] - 1) for r in result["runs"])
    result.update(worst_relative_difference=worst, goal_met=worst <= 0.15,
                  reestimated="estimates recomputed by --reestimate after the runs; measurements unchanged")
    C.write_json(path, result)
    print(f"worst difference {100 * worst:.1f}%; wrote {path}")


def deepspeed_rows() -> list[dict]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from slimtune.config import compose_config
    from slimtune.estimate import estimate_run

    rows = []
    for model, overrides in DS_MODELS.items():
        base = estimate_run(compose_config([*overrides, "model.quantization=none", "model.finetune=full",
                                            "optimizer.name=adamw", "trainer.precision=bf16-mixed"]))
        for strategy in DS_STRATEGIES:
            for devices in (1, 2, 8):
                est = base.with_settings(strategy=strategy, devices_per_node=devices, on_gpu=True)
                offload = strategy.endswith("offload")
                if strategy.startswith("deepspeed_zero2"):
                    cpu, gpu = estimate_zero2_model_states_mem_needs(est.params_total, num_gpus_per_node=devices,
                                                                     cpu_offload=offload)
                else:
                    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                        est.params_total, est.largest_layer_params, num_gpus_per_node=devices, cpu_offload=offload,
                        cpu_offload_params=offload)
                rows.append({"model": model, "strategy": strategy, "devices": devices, "params": est.params_total,
                             "largest_layer_params": est.largest_layer_params,
                             "slimtune_gpu_gib": est.model_states / 2**30,
                             "deepspeed_gpu_gib": gpu / 2**30, "gpu_ratio": est.model_states / gpu,
                             "slimtune_cpu_gib": est.model_states_cpu / 2**30, "deepspeed_cpu_gib": cpu / 2**30,
                             # DeepSpeed's CPU figure counts states only with offload, and for ZeRO-2 only while
                             # 4 bytes x params x processes (each process's fp32 copy at load) stays below them
                             "cpu_ratio": (est.model_states_cpu / cpu) if offload and not (
                                 strategy.startswith("deepspeed_zero2") and devices > 4) else None})
    return rows


def _summarize_strategy_runs(records: list[dict]) -> None:
    for r in records:
        print(f"{r['case']:18} {r['strategy']:24} rank {r['rank']}: measured {r['measured_peak_mib']:7.1f} MiB, "
              f"estimated {r['estimated_peak_mib']:7.1f} MiB, ratio {r['ratio_estimate_to_measured']:.3f} | "
              f"step transient {r['measured_step_transient_mib']:7.1f} vs {r['estimated_step_transient_mib']:7.1f} | "
              f"at train start {r['rss_at_train_start_above_baseline_mib']:7.1f} vs resident "
              f"{r['estimated_resident_mib']:7.1f}", flush=True)


def strategy_runs(args, env: dict, logs: Path) -> None:
    """Each case under each strategy on PROCESSES CPU processes: every process's measured peak against the estimate."""
    runs = []
    cases = (args.cases or ",".join(STRATEGY_CASES)).split(",")
    strategies = [s for s in args.strategies.split(",") if s]
    for name in cases:
        for strategy in strategies:
            with tempfile.TemporaryDirectory(prefix="memory_estimate_") as ranks_dir:
                done = subprocess.run([sys.executable, __file__, "--worker", name, "--strategy", strategy,
                                       "--ranks-dir", ranks_dir, "--data-dir", str(args.data_dir or "")],
                                      capture_output=True, text=True, env=env)
                log = logs / f"memory_estimate_{name}_{strategy}.log"
                log.write_text(done.stdout + done.stderr)
                ranks = sorted(Path(ranks_dir).glob("rank*.json"))
                if done.returncode != 0 or len(ranks) != PROCESSES:
                    raise SystemExit(f"{name} under {strategy} failed (exit {done.returncode}); see {log}")
                records = [json.loads(path.read_text()) for path in ranks]
            runs.extend(records)
            _summarize_strategy_runs(records)
    worst = max(abs(r["ratio_estimate_to_measured"] - 1) for r in runs)
    out = Path(args.out or C.RESULTS / "memory_estimate_strategies.json")
    C.write_json(out, {
        "benchmark": "memory_estimate --strategies", "environment": C.environment(), "steps": STEPS,
        "processes": PROCESSES, "common_overrides": COMMON,
        "command": "python " + " ".join([str(Path(__file__).resolve().relative_to(C.ROOT))] + sys.argv[1:]),
        "compared": "per process: peak VmHWM during trainer.fit (reset after the model is built) minus VmRSS before "
                    "the model loads, against estimate_run(cfg).peak for the strategy and 2 CPU devices",
        "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_"),
        "runs": runs, "worst_relative_difference": worst, "goal": "within 15% in every process",
        "goal_met": worst <= 0.15,
    })
    print(f"worst difference {100 * worst:.1f}%; wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help=f"comma-separated, of {', '.join(CASES)} (default: all; with --strategies "
                        f"{','.join(STRATEGY_CASES)})")
    parser.add_argument("--strategies", help="comma-separated strategy presets (ddp, deepspeed_zero2, deepspeed_zero3, "
                        f"deepspeed_zero3_offload, fsdp): run the cases on {PROCESSES} CPU processes each (default "
                        f"cases: {','.join(STRATEGY_CASES)}) and write memory_estimate_strategies.json")
    parser.add_argument("--reestimate", metavar="JSON", help="recompute the estimates in a --strategies result with "
                        "the estimator as it is now (the measurements stay)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--ranks-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="default: results/memory_estimate.json, with --strategies "
                        "results/memory_estimate_strategies.json")
    parser.add_argument("--glibc-default", action="store_true",
                        help="keep glibc's dynamic mmap threshold (freed tensors below 32 MiB stay in the heap, so RSS "
                             "keeps what was freed); default: MALLOC_MMAP_THRESHOLD_=65536 in the runs")
    C.add_data_dir(parser)
    args = parser.parse_args()
    C.use_data_dir(args.data_dir)
    if args.reestimate:
        reestimate(Path(args.reestimate))
        return
    if args.worker and args.strategy:  # one process of a run (rank 0, or the copy Lightning starts)
        record = worker(args.worker, str(Path(args.ranks_dir) / "run"), args.strategy)
        (Path(args.ranks_dir) / f"rank{record['rank']}.json").write_text(json.dumps(record))
        return
    if args.worker:
        with tempfile.TemporaryDirectory() as out_dir:
            C.emit(worker(args.worker, out_dir))
        return
    logs = C.RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # a fixed threshold: every tensor above 64 KiB is its own mapping
    if args.strategies:
        strategy_runs(args, env, logs)
        return
    runs = []
    args.out = args.out or str(C.RESULTS / "memory_estimate.json")
    for name in (args.cases or ",".join(CASES)).split(","):
        done = subprocess.run([sys.executable, __file__, "--worker", name, "--data-dir", str(args.data_dir or "")],
                              capture_output=True, text=True, env=env)
        (logs / f"memory_estimate_{name}.log").write_text(done.stdout + done.stderr)
        result = C.parse_emitted(done.stdout)
        if done.returncode != 0 or result is None:
            raise SystemExit(f"case {name} failed (exit {done.returncode}); see {logs / f'memory_estimate_{name}.log'}")
        runs.append(result)
        print(f"{name:18} peak: measured {result['measured_peak_mib']:7.1f} MiB, estimated "
              f"{result['estimated_peak_mib']:7.1f} MiB, ratio {result['ratio_estimate_to_measured']:.3f} | step "
              f"transient {result['measured_step_transient_mib']:7.1f} vs {result['estimated_step_transient_mib']:7.1f}"
              f" | at rest {result['measured_model_at_rest_mib']:6.1f} vs weights {result['estimated_weights_mib']:6.1f}"
              f" | framework before step 1 {result['first_step_start_above_load_mib']:5.1f}", flush=True)
    ds = deepspeed_rows()
    worst_ds = max(abs(row["gpu_ratio"] - 1) for row in ds)
    worst_cpu = max(abs(row["cpu_ratio"] - 1) for row in ds if row["cpu_ratio"] is not None)
    print(f"DeepSpeed model states: {len(ds)} configurations, largest GPU difference {100 * worst_ds:.2f}%, "
          f"CPU (offload) {100 * worst_cpu:.2f}%")
    worst = max(abs(run["ratio_estimate_to_measured"] - 1) for run in runs)
    C.write_json(Path(args.out), {
        "benchmark": "memory_estimate", "environment": C.environment(), "steps": STEPS, "common_overrides": COMMON,
        "compared": "peak VmHWM during trainer.fit (reset after the model is built) minus VmRSS before the model loads",
        "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_"),
        "runs": runs, "worst_relative_difference": worst, "goal": "within 15%", "goal_met": worst <= 0.15,
        "deepspeed": {"rows": ds, "worst_gpu_relative_difference": worst_ds,
                      "worst_cpu_relative_difference_offload": worst_cpu, "goal": "within 5%",
                      "goal_met": max(worst_ds, worst_cpu) <= 0.05},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
