"""Quality: NF4 QLoRA vs fp32 LoRA on SmolLM2-135M-Instruct, same data, steps and seed, through slimtune's run.

    python benchmarks/nf4_vs_fp32_lora.py        # 40 steps each, ~1 h on a busy 2-core CPU

Each variant is `slimtune.run.run(compose_config([...]))` in its own subprocess, with `model.quantization=nf4`
(double quant, fp32 compute) or `model.quantization=none` (fp32 base), LoRA r=8 alpha=16 dropout 0.05 on all linear
layers, AdamW lr 2e-4, grad clip 0.3, on WikiText-2 validation text packed into blocks of 256 tokens (the last 10%
held out), batch 2, seed 42. After the last step Lightning validates on the first `--val-batches` x 2 held-out blocks
(`val/loss`, mean next-token NLL); the same blocks are also scored before training (`eval_ppl_before`). Goal: the
final val losses within 1% of each other.
"""

from __future__ import annotations

import argparse
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

VARIANTS = {"nf4": "nf4", "fp32": "none"}


def overrides(args, quantization: str, out: str) -> list[str]:
    return [
        f"model.quantization={quantization}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",  # validate once, after the last step
        f"trainer.limit_val_batches={args.val_batches}",
        f"data.path={args.data}",
        f"data.block_size={args.block_size}",
        f"data.batch_size={args.batch_size}",
        f"seed={args.seed}",
        "logger=none",
        "trainer.enable_checkpointing=false",
        "trainer.enable_progress_bar=false",
        "callbacks=[perplexity]",  # the same held-out blocks scored before training
        f"callbacks.perplexity.max_windows={args.val_batches * args.batch_size}",
        "+callbacks.perplexity.at=[fit_start]",
        "+callbacks.perplexity.progress=false",
        "export.adapter=false",
        "export.merged=false",
        f"output_dir={out}",
    ]


def child(args) -> dict:
    from slimtune.config import compose_config
    from slimtune.run import run

    out = tempfile.mkdtemp(prefix=f"nf4_vs_fp32_{args.child}_")
    ov = overrides(args, VARIANTS[args.child], out)
    started = time.perf_counter()
    report = run(compose_config(ov))
    return {
        "variant": args.child,
        "overrides": ov,
        "val_loss": report["val_loss"],
        "val_loss_before": math.log(report["eval_ppl_before"]) if report.get("eval_ppl_before") else None,
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
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data", default=C.DEFAULT_DATA)
    p.add_argument("--out", default=str(C.RESULTS / "nf4_vs_fp32_lora.json"))
    args = p.parse_args()
    if args.child:
        C.emit(child(args))
        return
    if not Path(args.data).is_file():
        raise SystemExit(f"data file {args.data!r} does not exist (set SLIMTUNE_DATA or --data)")
    log_dir = C.RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--block-size",
               str(args.block_size), "--batch-size", str(args.batch_size), "--val-batches", str(args.val_batches),
               "--seed", str(args.seed), "--data", args.data]
        log = log_dir / f"{Path(args.out).stem}_{variant}.log"
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, cwd=str(C.ROOT)).returncode
        result = C.parse_emitted(log.read_text())
        if rc != 0 or result is None:
            raise SystemExit(f"{variant} failed (exit {rc}); see {log}")
        runs[variant] = result
        print(f"{variant:5s} val loss {result['val_loss']:.4f} (before training {result['val_loss_before']:.4f})  "
              f"{result['seconds']:.0f}s", flush=True)
    nf4, fp32 = runs["nf4"]["val_loss"], runs["fp32"]["val_loss"]
    rel = (nf4 - fp32) / fp32
    result = {
        "benchmark": "nf4_vs_fp32_lora",
        "command": "python " + " ".join([str(Path(__file__).relative_to(C.ROOT))] + sys.argv[1:]),
        "settings": {"model": C.SMOLLM2, "lora": "r=8 alpha=16 dropout=0.05 all-linear",
                     "optimizer": "AdamW lr 2e-4 constant", "grad_clip": 0.3, "steps": args.steps,
                     "block_size": args.block_size, "batch_size": args.batch_size, "seed": args.seed,
                     "val_blocks": args.val_batches * args.batch_size, "data": args.data},
        "runs": runs,
        "val_loss_nf4": nf4,
        "val_loss_fp32": fp32,
        "relative_difference": rel,
        "val_ppl_nf4": math.exp(nf4),
        "val_ppl_fp32": math.exp(fp32),
        "relative_difference_before_training": (runs["nf4"]["val_loss_before"] - runs["fp32"]["val_loss_before"])
        / runs["fp32"]["val_loss_before"],
        "goal": "|relative_difference| <= 0.01",
        "meets_goal": abs(rel) <= 0.01,
        "env": C.environment(),
    }
    path = C.write_json(Path(args.out), result)
    print(json.dumps({k: result[k] for k in ("val_loss_nf4", "val_loss_fp32", "relative_difference",
                                             "relative_difference_before_training", "meets_goal")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
