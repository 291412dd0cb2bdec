"""Quality: NF4 QLoRA vs fp32 LoRA on SmolLM2-135M-Instruct, same data, steps and seed, through slimtune's run.

    python benchmarks/nf4_vs_fp32_lora.py                       # 40 steps: fp32, nf4, gptq_nf4 (~20 min on 2 cores)
    python benchmarks/nf4_vs_fp32_lora.py --steps 200 --val-every 40 \
        --out benchmarks/results/nf4_vs_fp32_lora_200steps.json  # the held-out curve over 200 steps (~1 h)

Each variant is `slimtune.run.run(compose_config([...]))` in its own subprocess, LoRA r=8 alpha=16 dropout 0.05 on all
linear layers, AdamW lr 2e-4, grad clip 0.3, on WikiText-2 validation text packed into blocks of 256 tokens (the last
10% held out), batch 2, seed 42. Lightning validates on the first `--val-batches` x 2 held-out blocks (`val/loss`, mean
next-token NLL) every `--val-every` steps and after the last; the same blocks are also scored before training
(`eval_ppl_before`). Goal: the final val loss of NF4 QLoRA within 1% of fp32 LoRA's.

Variants (all NF4 ones store the same bitsandbytes NF4, block 64, double quant, fp32 compute):
  fp32           `model.quantization=none`: the float base.
  nf4            `model.quantization=nf4`: bitsandbytes rounds each weight to nearest (QLoRA as published).
  gptq_nf4       the float base quantized at fit start by `PostTrainingQuantization(method=gptq_nf4)`: the same
                 block absmax scales, each 4-bit code chosen by GPTQ on `--calib` x `--calib-len` C4 tokens.
  gptq_nf4_lorc  gptq_nf4 with the LoRA factors set to the rank-8 SVD of each layer's remaining error (LoRC).
  nf4_lorc       round-to-nearest NF4 with that LoRC start.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

C.offline()

VARIANTS = {"nf4": "nf4", "fp32": "none", "nf4_lorc": "none", "gptq_nf4": "none", "gptq_nf4_lorc": "none"}
# nf4_lorc: the float base quantized to the same NF4 (block 64, double quant) by slimtune's PostTrainingQuantization at
# fit start, with the LoRA factors initialised to the rank-8 SVD of each layer's NF4 error (LoRC; LoftQ with one step).
NF4_LORC = ["callbacks=[ptq_lorc_w3,perplexity]", "callbacks.ptq_lorc_w3.method=nf4", "callbacks.ptq_lorc_w3.bits=4",
            "callbacks.ptq_lorc_w3.group_size=64", "callbacks.ptq_lorc_w3.lorc_rank=8",
            "callbacks.ptq_lorc_w3.progress=false"]
# gptq_nf4: the same NF4 storage (block 64, double quant), codes chosen by GPTQ on C4 calibration windows
# (callbacks/ptq_gptq_nf4.yaml); gptq_nf4_lorc adds the rank-8 LoRC start on top of it.
GPTQ_NF4 = ["callbacks=[ptq_gptq_nf4,perplexity]", "callbacks.ptq_gptq_nf4.progress=false"]
GPTQ_NF4_LORC = [*GPTQ_NF4, "callbacks.ptq_gptq_nf4.lorc_rank=8"]


def overrides(args, variant: str, out: str) -> list[str]:
    calib = [f"callbacks.ptq_gptq_nf4.n_samples={args.calib}", f"callbacks.ptq_gptq_nf4.seq_len={args.calib_len}"]
    PTQ = {"nf4_lorc": NF4_LORC, "gptq_nf4": GPTQ_NF4 + calib, "gptq_nf4_lorc": GPTQ_NF4_LORC + calib}
    return [
        f"model.quantization={VARIANTS[variant]}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.val_every or args.steps}",  # the held-out curve; the last point is final
        f"trainer.limit_val_batches={args.val_batches}",
        f"data.path={args.data}",
        f"data.block_size={args.block_size}",
        f"data.batch_size={args.batch_size}",
        f"seed={args.seed}",
        "logger=csv",  # val/loss at every validation, read back from logs/metrics.csv
        "trainer.enable_checkpointing=false",
        "trainer.enable_progress_bar=false",
        *PTQ.get(variant, ["callbacks=[perplexity]"]),  # held-out blocks scored before training
        f"callbacks.perplexity.max_windows={args.val_batches * args.batch_size}",
        "callbacks.perplexity.at=[fit_start]",
        "callbacks.perplexity.progress=false",
        "export.adapter=false",
        "export.merged=false",
        f"output_dir={out}",
    ]


def child(args) -> dict:
    from slimtune.config import compose_config
    from slimtune.run import run

    out = tempfile.mkdtemp(prefix=f"nf4_vs_fp32_{args.child}_")
    ov = overrides(args, args.child, out)
    started = time.perf_counter()
    report = run(compose_config(ov))
    rows = csv.DictReader((Path(out) / "logs" / "metrics.csv").read_text().splitlines())
    # Lightning's CSV rows carry the step index of the last optimizer step (0-based): +1 is the steps done
    curve = {int(r["step"]) + 1: float(r["val/loss"]) for r in rows if r.get("val/loss")}
    if max(curve) != args.steps or curve[args.steps] != report["val_loss"]:
        raise SystemExit(f"validation curve {curve} does not end at step {args.steps} with {report['val_loss']}")
    return {
        "variant": args.child,
        "overrides": ov,
        "val_loss": report["val_loss"],
        "val_loss_by_step": curve,
        "val_loss_before": math.log(report["eval_ppl_before"]) if report.get("eval_ppl_before") else None,
        "val_loss_fp_base": math.log(report["eval_ppl_before_quant"]) if report.get("eval_ppl_before_quant") else None,
        "val_loss_nf4_base": math.log(report["eval_ppl_after_quant"]) if report.get("eval_ppl_after_quant") else None,
        "train_loss_last": report["train_loss"],
        "steps": report["steps"],
        "train_tokens_per_s": report["train_tokens_per_s"],
        "seconds": round(time.perf_counter() - started, 1),
        "ru_maxrss_mb": round(C.ru_maxrss_mb(), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--val-batches", type=int, default=10, help="held-out batches scored (x batch size blocks)")
    p.add_argument("--val-every", type=int, default=0, help="validate every N steps too (0: only after the last)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data", default=C.DEFAULT_DATA, help="a text file or a named set (default: wikitext2:valid)")
    C.add_data_dir(p)
    p.add_argument("--calib", type=int, default=32, help="GPTQ-NF4 calibration windows (C4)")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--out", default=str(C.RESULTS / "nf4_vs_fp32_lora.json"))
    p.add_argument("--variants", default="fp32,nf4,gptq_nf4",
                   help="comma-separated; variants not run keep their result from --out (same settings); '' runs none")
    p.add_argument("--collect", action="store_true",
                   help="take each variant's result from its log of an earlier invocation with this --out (an "
                        "invocation stopped after its children finished) instead of running it")
    p.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                   help="add the runs of other result files with the same settings (variants run in parallel)")
    args = p.parse_args()
    C.use_data_dir(args.data_dir)
    if args.child:
        C.emit(child(args))
        return
    if not C.data_exists(args.data):
        raise SystemExit(f"data file {args.data!r} does not exist (set --data-dir or --data)")
    log_dir = C.RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = {"model": C.SMOLLM2, "lora": "r=8 alpha=16 dropout=0.05 all-linear",
                "optimizer": "AdamW lr 2e-4 constant", "grad_clip": 0.3, "steps": args.steps,
                "block_size": args.block_size, "batch_size": args.batch_size, "seed": args.seed,
                "val_blocks": args.val_batches * args.batch_size, "data": args.data,
                "gptq_nf4_calibration": f"{args.calib} x {args.calib_len} C4 tokens"}
    stored = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    # variants not run now keep their stored result only if it was measured with the same settings
    runs = dict(stored.get("runs", {})) if stored.get("settings") == settings else {}
    for other in args.merge:
        merged = json.loads(Path(other).read_text())
        if merged.get("settings") != settings:
            raise SystemExit(f"--merge {other}: measured with other settings ({merged.get('settings')})")
        runs.update(merged.get("runs", {}))
    for variant in [v for v in args.variants.split(",") if v]:
        cmd = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--block-size",
               str(args.block_size), "--batch-size", str(args.batch_size), "--val-batches", str(args.val_batches),
               "--val-every", str(args.val_every), "--seed", str(args.seed), "--data", args.data,
               "--calib", str(args.calib), "--calib-len", str(args.calib_len)]
        log = log_dir / f"{Path(args.out).stem}_{variant}.log"
        if args.collect:
            rc = 0 if log.is_file() else 1
        else:
            with open(log, "w") as fh:
                rc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, cwd=str(C.ROOT)).returncode
        result = C.parse_emitted(log.read_text()) if log.is_file() else None
        if result is not None and result.get("overrides") != overrides(args, variant, "")[:-1] + [result["overrides"][-1]]:
            raise SystemExit(f"{log} holds a run with other settings")
        if rc != 0 or result is None:
            raise SystemExit(f"{variant} failed (exit {rc}); see {log}")
        runs[variant] = result
        print(f"{variant:13s} val loss {result['val_loss']:.4f} (before training {result['val_loss_before']:.4f})  "
              f"{result['seconds']:.0f}s", flush=True)
    if "fp32" not in runs:  # a part run in parallel: keep its runs for --merge
        path = C.write_json(Path(args.out), {"benchmark": "nf4_vs_fp32_lora", "settings": settings, "runs": runs,
                                             "env": C.environment()})
        print(f"no fp32 run with these settings yet: wrote the runs alone to {path} (combine with --merge)")
        return
    fp32 = runs["fp32"]
    fp32_curve = {str(k): v for k, v in fp32.get("val_loss_by_step", {}).items()}
    comparisons = {}
    for name, r in runs.items():
        if name == "fp32":
            continue
        rel = (r["val_loss"] - fp32["val_loss"]) / fp32["val_loss"]
        comparisons[name] = {
            "val_loss": r["val_loss"],
            "relative_difference": rel,
            "relative_difference_before_training": (r["val_loss_before"] - fp32["val_loss_before"])
            / fp32["val_loss_before"],
            "relative_difference_by_step": {step: (loss - fp32_curve[str(step)]) / fp32_curve[str(step)]
                                            for step, loss in r.get("val_loss_by_step", {}).items()
                                            if str(step) in fp32_curve},
            "meets_goal": abs(rel) <= 0.01,
        }
    result = {
        "benchmark": "nf4_vs_fp32_lora",
        "command": "python " + " ".join([str(Path(__file__).relative_to(C.ROOT))] + sys.argv[1:]),
        "settings": settings,
        "runs": runs,
        "val_loss_fp32": fp32["val_loss"],
        "comparisons": comparisons,
        "goal": "|relative_difference| <= 0.01 (final held-out loss, NF4 QLoRA vs fp32 LoRA)",
        "env": C.environment(),
    }
    path = C.write_json(Path(args.out), result)
    print(json.dumps({"val_loss_fp32": fp32["val_loss"], "comparisons": comparisons}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
