"""One llm-compressor GPTQ run on SmolLM2-135M-Instruct; runs in the llm-compressor venv, imports nothing of slimtune.

    /work/venv-llmc/bin/python benchmarks/ptq/llmc_worker.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
        --data /tmp/slimtune_ptq/data.pt --bits 4 --group 64 --out /tmp/slimtune_ptq/run.json

Reads the calibration ids and evaluation ids written by gptq_vs_llmcompressor.py (the same tensors the slimtune
side uses), runs `llmcompressor.oneshot` with a GPTQModifier (int weights, strategy "group", symmetric, lm_head
ignored, dampening_frac / block_size / actorder set explicitly) on the CPU, then measures perplexity with its own
loop over the same non-overlapping windows. A refused configuration is recorded as {"refused": "<one line>"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402


@torch.no_grad()
def window_perplexity(model, ids: torch.Tensor, seq_len: int) -> dict:
    """exp(mean over windows of the mean next-token NLL) over non-overlapping windows of `seq_len` tokens."""
    n = ids.numel() // seq_len
    nll = 0.0
    for w in range(n):
        batch = ids[w * seq_len:(w + 1) * seq_len].unsqueeze(0)
        logits = model(input_ids=batch).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:]).item()
    return {"ppl": math.exp(nll / n), "nll": nll / n, "windows": n}


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import compressed_tensors
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result: dict = {"side": "llm-compressor", "method": "gptq", "bits": args.bits, "group_size": args.group,
                    "symmetric": True, "versions": {"llmcompressor": llmcompressor.__version__,
                                                    "compressed_tensors": compressed_tensors.__version__,
                                                    "transformers": transformers.__version__,
                                                    "torch": torch.__version__}}
    data = torch.load(args.data)
    folder, name = str(Path(args.gguf).parent), Path(args.gguf).name
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    model.config.use_cache = False
    # oneshot's validate_model() re-reads AutoConfig from model.config.name_or_path, which for a GGUF load is the
    # folder holding the .gguf file (no config.json there): point it at a folder with the same config written out.
    # It also refuses a config whose quantization_config says quant_method "gguf", although transformers has
    # already dequantized every tensor to float32 (plain nn.Linear weights): drop that entry.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    config_dir = tempfile.mkdtemp(prefix="llmc_config_")
    model.config.save_pretrained(config_dir)
    model.config._name_or_path = config_dir
    result["workarounds"] = [
        "oneshot.validate_model calls AutoConfig.from_pretrained(model.config.name_or_path), which fails for a "
        "GGUF-loaded model (no config.json next to the .gguf): name_or_path set to a folder with config.json",
        "oneshot refuses quant_method 'gguf' in the config although the loaded weights are float32: "
        "quantization_config removed from the config"]
    result["load_s"] = time.perf_counter() - t0
    result["weight_checksum"] = float(sum(p.detach().double().sum().item()
                                          for p in model.parameters() if p.is_floating_point()))

    calib = data["calib"]
    samples = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in calib]
    loader = torch.utils.data.DataLoader(samples, batch_size=args.calib_batch, shuffle=False)
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=True, strategy="group",
                               group_size=args.group)
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"], dampening_frac=args.damp, block_size=args.block_size, actorder=None,
    )
    result.update(damp=args.damp, block_size=args.block_size, actorder=None,
                  calibration=f"{calib.shape[0]} x {calib.shape[1]}, batches of {args.calib_batch}")
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        model = oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=loader,
                        num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1])
    except Exception as err:  # a refused configuration: record its one-line message
        lines = [ln for ln in str(err).splitlines() if ln.strip()]
        result["refused"] = f"{type(err).__name__}: {lines[0] if lines else ''}"
        result["refused_after_s"] = time.perf_counter() - t0
        result["traceback_tail"] = traceback.format_exc().splitlines()[-3:]
        result["worker_total_s"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        shutil.rmtree(config_dir, ignore_errors=True)
        return
    result["quant_s"] = time.perf_counter() - t0
    result["quant_cpu_s"] = time.process_time() - cpu0  # all threads of this process
    first = model.model.layers[0].self_attn.q_proj
    scheme = getattr(first, "quantization_scheme", None)
    if scheme is not None:
        result["resolved_weight_args"] = scheme.weights.model_dump(mode="json")
    result["lm_head_quantized"] = getattr(model.lm_head, "quantization_scheme", None) is not None

    t0 = time.perf_counter()
    ppl = window_perplexity(model, data["eval_ids"], data["eval_len"])
    result.update(ppl=ppl["ppl"], nll=ppl["nll"], eval_windows=ppl["windows"], eval_s=time.perf_counter() - t0)
    result["worker_total_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    shutil.rmtree(config_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
