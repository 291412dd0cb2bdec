"""MoE balancing on upcycled SmolLM2-135M (4 experts, top-2): no balancing vs the Switch loss vs aux-loss-free bias,
same data, steps and seed, through slimtune's run (`recipe=moe_upcycle_smollm2`); and the step-time overhead of the
callback.

    python benchmarks/moe_balance_smollm2.py                      # 30 steps per variant, WikiText-2 valid text
    python benchmarks/moe_balance_smollm2.py --steps 60 --variants none,switch,aux_free --ppl-windows 4
    python benchmarks/moe_balance_smollm2.py --model tiny_llama_moe --steps 3 --out /tmp/moe_check.json  # script check

Variants (each `run(compose_config([...]))` in its own subprocess, LoRA r=8 on attention, routers and fused experts):
  none      `callbacks=[moe_monitor]`: metrics only, no loss added (shows collapse if it happens);
  switch    `callbacks=[moe_balance]`: Switch loss 0.01 + z-loss 1e-3, global batch;
  aux_free  `callbacks=[moe_aux_free]`: aux-loss-free bias, rate 1e-3, sequence-wise loss 1e-4;
  bare      `callbacks=[]`: no MoE callback at all (the overhead reference).
Reported per variant: the final load coefficient of variation per layer (max and mean over the 30 layers), dead
experts, WikiText-2 test perplexity on the first `--ppl-windows` windows of 2048 after training, and the median
training throughput (slimtune's train_tokens_per_s). Overhead = step time of a variant / `bare` (the inverse ratio of
their tokens/s), median over `--rounds` alternated rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

C.offline()

CALLBACKS = {"none": "[moe_monitor]", "switch": "[moe_balance]", "aux_free": "[moe_aux_free]", "bare": "[]"}


def child(variant: str, steps: int, out: str, ppl_windows: int, data: str, seed: int, model: str) -> None:
    """One run in this process; prints the result line the parent reads."""
    from slimtune.config import compose_config
    from slimtune.run import run

    callbacks = CALLBACKS[variant]
    if ppl_windows:
        callbacks = callbacks[:-1] + ("," if callbacks != "[]" else "") + "perplexity_wikitext2]"
    overrides = ["recipe=moe_upcycle_smollm2", f"model={model}", f"callbacks={callbacks}", f"output_dir={out}",
                 f"seed={seed}",
                 f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
                 "trainer.log_every_n_steps=1", f"data.path={data}", "export.merged=false", "export.adapter=false"]
    if ppl_windows:
        overrides += [f"callbacks.perplexity_wikitext2.max_windows={ppl_windows}"]
    report = run(compose_config(overrides))
    result = {"variant": variant, "steps": report["steps"], "cv_per_layer": report.get("moe_cv_per_layer"),
              "dead_experts": report.get("moe_dead_experts"), "aux_loss": report.get("moe_aux_loss"),
              "ppl_after": report.get("wikitext2_ppl_after"),
              "tokens_per_s": report.get("train_tokens_per_s"), "seconds": report.get("seconds"),
              "report": {k: v for k, v in report.items() if "ppl" in k}}
    print(C.MARKER + json.dumps(result, default=str), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", default="none,switch,aux_free,bare")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--data", default=C.DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default="smollm2_135m_moe",
                        help="a model config with model.upcycle (tiny_llama_moe: a seconds-long check of this script)")
    parser.add_argument("--out", default=str(C.RESULTS / "moe_balance_smollm2.json"))
    parser.add_argument("--child", default=None)
    parser.add_argument("--child-out", default=None)
    C.add_data_dir(parser)
    args = parser.parse_args()
    C.use_data_dir(args.data_dir)
    if args.child:
        return child(args.child, args.steps, args.child_out, args.ppl_windows, args.data, args.seed, args.model)
    import tempfile

    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for variant in args.variants.split(","):
                out = Path(tmp) / f"{variant}_{round_index}"
                started = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--child", variant, "--child-out", str(out),
                                       "--steps", str(args.steps), "--ppl-windows", str(args.ppl_windows),
                                       "--data", args.data, "--seed", str(args.seed), "--model", args.model],
                                      capture_output=True, text=True)
                line = next((l for l in proc.stdout.splitlines() if l.startswith(C.MARKER)), None)
                if line is None:
                    raise SystemExit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                result = json.loads(line[len(C.MARKER):])
                result["wall_s"] = time.perf_counter() - started
                results.setdefault(variant, []).append(result)
                cv = result["cv_per_layer"] or []
                print(f"{variant:9s} round {round_index}: cv max {max(cv, default=float('nan')):.3f} mean "
                      f"{statistics.mean(cv) if cv else float('nan'):.3f}, dead {result['dead_experts']}, ppl "
                      f"{result['ppl_after']}, {result['tokens_per_s']:.1f} tokens/s",
                      flush=True)
    summary = {}
    for variant, runs in results.items():
        cv = runs[-1]["cv_per_layer"] or []
        summary[variant] = {"cv_max": max(cv, default=None), "cv_mean": statistics.mean(cv) if cv else None,
                            "dead_experts": runs[-1]["dead_experts"], "ppl_after": runs[-1]["ppl_after"],
                            "tokens_per_s": [r["tokens_per_s"] for r in runs]}
    for variant in ("switch", "none", "aux_free"):
        if "bare" in results and variant in results:
            # step time ratio = tokens/s of the bare run / tokens/s of the variant, per round (alternated)
            ratios = [b["tokens_per_s"] / v["tokens_per_s"] for v, b in zip(results[variant], results["bare"])]
            summary[f"step_time_{variant}_vs_bare"] = statistics.median(ratios)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary, "runs": results}, indent=2,
                                         default=str))
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
