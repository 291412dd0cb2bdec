"""Where the NF4-vs-fp32 loss gap of SmolLM2-135M comes from (a companion to nf4_vs_fp32_lora.py).

    python benchmarks/nf4_gap_diagnosis.py                   # ~10 min on 2 CPU cores
    python benchmarks/nf4_gap_diagnosis.py --by-layer-type   # which layers the gap comes from (~3 min)

Scores the untrained base, no LoRA, on the same held-out WikiText-2 blocks nf4_vs_fp32_lora.py validates on (the first
`--blocks` blocks of 256 tokens of slimtune's held-out tail), for:

* fp32: the GGUF dequantized by transformers (what `quantization=none` trains);
* slimtune nf4 (+/- double quant): `load_base_model`, i.e. slimtune's in-place bitsandbytes swap;
* transformers nf4 + double quant: the same fp32 weights saved and loaded back with `BitsAndBytesConfig`, the usual
  HF path, to tell a slimtune problem from NF4's own error;
* fp4 + double quant (bitsandbytes' other 4-bit type).

It also reports the relative weight error ||W - dequant(W)|| / ||W|| of the NF4 layers, and the same for Gaussian
weights of the same shapes and scale (NF4's design case). SmolLM2 here comes from a Q4_1 GGUF, so its weights already
sit on another 4-bit grid (blocks of 32 with scale + min); the two errors show whether that makes NF4 worse than usual.

`--by-layer-type` instead scores the fp32 model with only one layer type (q_proj, ..., down_proj) of every block
rounded to NF4 + double quant (bitsandbytes quantize + dequantize: the weights a Linear4bit computes with), one type at
a time, and with all of them; results/nf4_gap_by_layer_type.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

C.offline()


def heldout_blocks(args, tokenizer):
    import torch

    from slimtune.data.datasets import load_raw, tokenize

    data_cfg = {"path": args.data, "block_size": args.block_size, "val_fraction": 0.1, "format": "auto",
                "text_field": "text", "seed": 42}
    val = tokenize(load_raw(data_cfg), tokenizer, data_cfg).val
    return torch.tensor(val["input_ids"][: args.blocks], dtype=torch.long)


def mean_loss(model, blocks, batch_size: int) -> float:
    import torch

    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size]
            losses.append(float(model(input_ids=ids, labels=ids).loss) * len(ids))
    return sum(losses) / len(blocks)


def weight_errors(model, seed: int = 0) -> dict:
    """Relative Frobenius error of each 4-bit layer, and of Gaussian weights of the same shape and std."""
    import bitsandbytes.functional as F
    import torch

    gen = torch.Generator().manual_seed(seed)
    gauss = []
    for _name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None:
            continue
        deq = F.dequantize_4bit(weight.data, state).float()
        g = torch.randn(deq.shape, generator=gen) * deq.std()
        qg, sg = F.quantize_4bit(g, blocksize=state.blocksize, quant_type=state.quant_type,
                                 compress_statistics=state.nested)
        gauss.append(float((F.dequantize_4bit(qg, sg) - g).norm() / g.norm()))
    return {"layers": len(gauss), "gaussian_nf4_relative_error_mean": sum(gauss) / len(gauss)}


def fp32_relative_errors(fp32_model, nf4_model) -> float:
    import bitsandbytes.functional as F

    errors = []
    quantized = dict(nf4_model.named_modules())
    for name, module in fp32_model.named_modules():
        q = quantized.get(name)
        state = getattr(getattr(q, "weight", None), "quant_state", None)
        if state is None:
            continue
        w = module.weight.data.float()
        deq = F.dequantize_4bit(q.weight.data, state).float()
        errors.append(float((deq - w).norm() / w.norm()))
    return sum(errors) / len(errors)


def by_layer_type(args, blocks) -> None:
    import torch

    from slimtune.models.loading import load_base_model
    from slimtune.quant import nf4_fake_quantize

    model = load_base_model(C.smollm2_model_cfg(quantization="none"))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    originals = {n: m.weight.data.clone() for n, m in linears.items()}

    def loss_with_nf4(names):
        for n in names:
            linears[n].weight.data = nf4_fake_quantize(originals[n])
        try:
            return mean_loss(model, blocks, args.batch_size)
        finally:
            for n in names:
                linears[n].weight.data = originals[n]

    fp32 = mean_loss(model, blocks, args.batch_size)
    types = sorted({n.rsplit(".", 1)[1] for n in linears})
    increase = {}
    for t in [*types, "all"]:
        names = [n for n in linears if t == "all" or n.endswith("." + t)]
        increase[t] = loss_with_nf4(names) - fp32
        print(f"{t:10s} ({len(names):3d} layers) loss +{increase[t]:.4f}", flush=True)
    result = {
        "benchmark": "nf4_gap_by_layer_type",
        "command": "python " + " ".join([str(Path(__file__).relative_to(C.ROOT))] + sys.argv[1:]),
        "blocks": args.blocks, "block_size": args.block_size, "loss_fp32": fp32,
        "loss_increase": increase,
        "share_of_all": {t: v / increase["all"] for t, v in increase.items() if t != "all"},
        "env": C.environment(),
    }
    print(f"wrote {C.write_json(C.RESULTS / 'nf4_gap_by_layer_type.json', result)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--data", default=C.DEFAULT_DATA, help="a text file or a named set (default: wikitext2:valid)")
    C.add_data_dir(p)
    p.add_argument("--out", default=str(C.RESULTS / "nf4_gap_diagnosis.json"))
    p.add_argument("--by-layer-type", action="store_true", help="the loss increase of NF4 on each layer type alone")
    args = p.parse_args()
    C.use_data_dir(args.data_dir)

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from slimtune.models import load_tokenizer
    from slimtune.models.loading import load_base_model

    torch.manual_seed(0)
    tokenizer = load_tokenizer(C.smollm2_model_cfg())
    blocks = heldout_blocks(args, tokenizer)
    if args.by_layer_type:
        by_layer_type(args, blocks)
        return
    losses, seconds = {}, {}

    def score(name, model):
        t = time.perf_counter()
        losses[name] = mean_loss(model, blocks, args.batch_size)
        seconds[name] = round(time.perf_counter() - t, 1)
        print(f"{name:28s} loss {losses[name]:.4f}  ({seconds[name]:.0f}s)", flush=True)

    fp32 = load_base_model(C.smollm2_model_cfg(quantization="none"))
    score("fp32", fp32)
    fp32.hf_quantizer = None  # dequantized GGUF weights; save_pretrained refuses the GGUF marker
    if hasattr(fp32.config, "quantization_config"):
        del fp32.config.quantization_config
    folder = tempfile.mkdtemp(prefix="nf4_gap_fp32_")
    fp32.save_pretrained(folder)

    nf4 = load_base_model(C.smollm2_model_cfg(quantization="nf4", double_quant=True))
    score("slimtune_nf4_dq", nf4)
    errors = {"smollm2_nf4_relative_error_mean": fp32_relative_errors(fp32, nf4), **weight_errors(nf4)}
    del nf4, fp32
    gc.collect()

    for name, quant, dq in (("slimtune_nf4", "nf4", False), ("slimtune_fp4_dq", "fp4", True)):
        model = load_base_model(C.smollm2_model_cfg(quantization=quant, double_quant=dq))
        score(name, model)
        del model
        gc.collect()

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.float32)
    score("transformers_nf4_dq", hf)
    del hf
    gc.collect()

    ref = losses["fp32"]
    result = {
        "benchmark": "nf4_gap_diagnosis",
        "command": "python " + " ".join([str(Path(__file__).relative_to(C.ROOT))] + sys.argv[1:]),
        "blocks": args.blocks, "block_size": args.block_size,
        "loss": losses,
        "ppl": {k: math.exp(v) for k, v in losses.items()},
        "relative_to_fp32": {k: (v - ref) / ref for k, v in losses.items()},
        "weight_errors": errors,
        "seconds": seconds,
        "env": C.environment(),
    }
    path = C.write_json(Path(args.out), result)
    print(json.dumps({k: result[k] for k in ("loss", "relative_to_fp32", "weight_errors")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
