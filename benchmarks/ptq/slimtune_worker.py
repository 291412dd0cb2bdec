"""One slimtune PTQ run on SmolLM2-135M-Instruct (system python); called by gptq_vs_llmcompressor.py.

    python benchmarks/ptq/slimtune_worker.py --data /tmp/slimtune_ptq/data.pt --method gptq --bits 3 --group 64 \
        --out /tmp/slimtune_ptq/run.json [--export-dir DIR]

Methods: fp (no quantization), gptq (quantize_model_gptq, damp 0.01, block 128, act_order off unless --act-order,
lm_head kept),
rtn (quantize_model_rtn), awq / awq_gptq (quantize_model_awq: AWQ scales, then RTN / GPTQ with the GPTQ settings
above), smoothquant (smooth_model with --alpha, then W8A8 layers; --bits/--group ignored). Writes a JSON with load / quantization / evaluation seconds, perplexity and stored bits.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMOLLM2, Timer, weight_checksum  # noqa: E402

import torch  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--method", choices=("fp", "gptq", "rtn", "awq", "awq_gptq", "smoothquant"), required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64, help="group size; 0 = per output channel")
    parser.add_argument("--act-order", action="store_true", help="GPTQ visits columns by decreasing Hessian diagonal")
    parser.add_argument("--asym", action="store_true", help="asymmetric grid (default symmetric)")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--true-sequential", action="store_true", help="calibrate q/k/v -> o -> gate/up -> down in turn")
    parser.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    parser.add_argument("--duo-scaling", action="store_true", help="AWQ: s = mean|x|^a / mean|w|^(1-a)")
    parser.add_argument("--clip", action="store_true", help="AWQ: also search weight clipping ranges")
    parser.add_argument("--max-search-tokens", type=int, default=None, help="AWQ: score alphas on this many tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--export-dir", default=None, help="keep the save_quantized export here")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from slimtune.eval import perplexity
    from slimtune.models import load_base_model
    from slimtune.quant import (QuantSpec, quantize_model_gptq, quantize_model_rtn, save_quantized,
                                stored_bits_per_parameter)

    data = torch.load(args.data)
    result: dict = {"side": "slimtune", "method": args.method}
    with Timer() as t_load:
        model = load_base_model(SMOLLM2).eval()
    result["load_s"] = t_load.seconds
    result["weight_checksum"] = weight_checksum(model)

    if args.method != "fp":
        spec = QuantSpec(bits=args.bits, group_size=args.group or None, symmetric=not args.asym)
        if args.method == "smoothquant":
            from slimtune.quant.smoothquant import W8A8_SPEC

            spec = W8A8_SPEC
        result.update(bits=args.bits, group_size=args.group, symmetric=spec.symmetric)
        calib = list(data["calib"].split(args.calib_batch))
        cpu0 = time.process_time()
        with Timer() as t_quant:
            if args.method == "gptq":
                quantize_model_gptq(model, calib, spec, damp=args.damp, block_size=args.block_size, act_order=args.act_order,
                                    true_sequential=args.true_sequential, progress=False)
            elif args.method in ("awq", "awq_gptq"):
                from slimtune.quant import quantize_model_awq

                gptq = {"damp": args.damp, "block_size": args.block_size, "act_order": args.act_order,
                        "true_sequential": args.true_sequential} if args.method == "awq_gptq" else {}
                awq = quantize_model_awq(model, calib, spec, method="gptq" if gptq else "rtn",
                                         duo_scaling=args.duo_scaling, clip=args.clip,
                                         max_search_tokens=args.max_search_tokens, **gptq)
                alphas = list(awq.alphas.values())
                result.update(awq_mean_alpha=sum(alphas) / len(alphas), duo_scaling=args.duo_scaling, clip=args.clip,
                              awq_search_error_vs_rtn=sum(a / r for a, r in awq.errors.values()) / len(awq.errors))
            elif args.method == "smoothquant":
                from slimtune.quant.smoothquant import quantize_model_w8a8, smooth_model

                smooth_model(model, calib, alpha=args.alpha)
                quantize_model_w8a8(model)
                result.update(alpha=args.alpha, activations="int8 per token (fake-quantized)")
            else:
                quantize_model_rtn(model, spec)
        result["quant_s"] = t_quant.seconds
        result["quant_cpu_s"] = time.process_time() - cpu0  # all threads of this process
        if args.method in ("gptq", "awq_gptq"):
            result.update(damp=args.damp, block_size=args.block_size, act_order=args.act_order,
                          true_sequential=args.true_sequential,
                          calibration=f"{data['calib'].shape[0]} x {data['calib'].shape[1]}, batches of {args.calib_batch}")
        q_bits, all_bits = stored_bits_per_parameter(model)
        result["stored_bits_per_param_quantized_layers"] = q_bits
        result["stored_bits_per_param_whole_model"] = all_bits
        tmp = Path(tempfile.mkdtemp(prefix="slimtune_ptq_export_"))
        try:
            export = save_quantized(model, tmp / "model")
            st = export / "model.safetensors"
            result["export_safetensors_bytes"] = st.stat().st_size
            result["export_dir_bytes"] = dir_bytes(export)
            if args.export_dir:
                dest = Path(args.export_dir)
                if dest.exists():
                    shutil.rmtree(dest)
                shutil.copytree(export, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    with Timer() as t_eval:
        ppl = perplexity(model, data["eval_ids"], data["eval_len"], progress=False)
    result.update(ppl=ppl["ppl"], nll=ppl["nll"], eval_windows=ppl["windows"], eval_s=t_eval.seconds)
    if not math.isfinite(result["ppl"]):
        result["warning"] = "non-finite perplexity"
    result["worker_total_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
