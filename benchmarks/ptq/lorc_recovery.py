"""How much of 3-bit GPTQ's perplexity loss LoRC adapters recover on SmolLM2-135M-Instruct, at init and after fine-tuning.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/ptq/lorc_recovery.py \
        [--from-export /tmp/slimtune_ptq/gptq3_g64_export] [--ranks 8,16] [--steps 40] [--lr 1e-4] [--plain-lora]

Quantized base: slimtune GPTQ, 3-bit, group 64, symmetric, damp 0.01, block 128, no act-order, lm_head kept in
float -- either re-run here on the calibration set of gptq_vs_llmcompressor.py (same .pt file), or reloaded with
load_quantized from the export that script kept (--from-export). LoRC: add_lorc_adapters(model, original_weights,
rank) with the float weights of the same model, so that Q + B A approximates W at step 0 (alpha = rank).
Fine-tune: AdamW on the adapters only, WikiText-2 *validation* text (GPTQ-protocol string) cut into non-overlapping
blocks of 256 tokens, seeded shuffle, batch 2. Perplexity: the same WikiText-2 test windows as the PTQ comparison.
Recovered share = (ppl_q - ppl_x) / (ppl_q - ppl_fp). Writes benchmarks/ptq/results/lorc_recovery.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, SMOLLM2, WORK, Timer, add_data_dir, data_digest, prepare_data, use_data_dir  # noqa: E402

import torch  # noqa: E402


def train_blocks(tokenizer, block: int) -> torch.Tensor:
    from slimtune.eval import read_eval_text, tokenize_eval_text

    ids = tokenize_eval_text(read_eval_text("wikitext2:valid"), tokenizer)
    n = ids.numel() // block
    return ids[: n * block].view(n, block)


def finetune(model, blocks: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    model.train()
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        idx = order[(step * batch) % len(order):][:batch]
        x = blocks[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return {"steps": steps, "batch": batch, "block": blocks.shape[1], "lr": lr, "optimizer": "AdamW (wd 0)",
            "trainable_params": sum(p.numel() for p in params), "loss_first5": sum(losses[:5]) / len(losses[:5]),
            "loss_last5": sum(losses[-5:]) / len(losses[-5:]), "train_s": time.perf_counter() - started}


def share(ppl_q: float, ppl_x: float, ppl_fp: float) -> float:
    return (ppl_q - ppl_x) / (ppl_q - ppl_fp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(WORK / "data.pt"), help="written by gptq_vs_llmcompressor.py "
                        "(created here with the same defaults if missing)")
    parser.add_argument("--from-export", default=None, help="a save_quantized dir of the 3-bit g64 GPTQ model")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--ranks", default="8,16")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain-lora", action="store_true", help="also fine-tune a default-init LoRA (rank = max)")
    parser.add_argument("--ptq-results", default=str(RESULTS / "gptq_vs_llmcompressor.json"),
                        help="reuse the fp (and, with --from-export, 3-bit GPTQ) perplexity measured there when its "
                             "data fingerprint matches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "lorc_recovery.json"))
    add_data_dir(parser)
    args = parser.parse_args()
    use_data_dir(args.data_dir)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from peft import LoraConfig, get_peft_model

    from slimtune.eval import perplexity
    from slimtune.models import load_base_model, load_tokenizer
    from slimtune.quant import (QuantLinear, QuantSpec, add_lorc_adapters, find_linear_layers, load_quantized,
                                quantize_model_gptq, register_quant_lora)

    data_file = Path(args.data)
    if not data_file.exists():
        prepare_data(data_file, 32, 512, 0, 16, 2048)
    data = torch.load(data_file)
    eval_ids, eval_len = data["eval_ids"], data["eval_len"]
    tokenizer = load_tokenizer(SMOLLM2)
    blocks = train_blocks(tokenizer, args.block)

    def ppl(model) -> float:
        return perplexity(model, eval_ids, eval_len, progress=False)["ppl"]

    digest = data_digest(data["calib"], eval_ids)
    reuse: dict = {}
    ptq_path = Path(args.ptq_results)
    if ptq_path.exists():
        ptq = json.loads(ptq_path.read_text())
        if ptq.get("data", {}).get("sha256_16") == digest:
            reuse = {k: v.get("ppl") for k, v in ptq.get("runs", {}).items() if isinstance(v.get("ppl"), float)}

    result: dict = {"data_sha256_16": digest, "eval": f"WikiText-2 test, first {eval_ids.numel() // eval_len} windows of {eval_len}",
                    "train_data": f"WikiText-2 validation, {blocks.shape[0]} blocks of {args.block} tokens",
                    "quant": {"method": "slimtune GPTQ", "bits": args.bits, "group_size": args.group,
                              "symmetric": True, "damp": 0.01, "block_size": 128, "act_order": False}}
    started = time.perf_counter()
    model = load_base_model(SMOLLM2).eval()
    if "fp" in reuse:
        result["ppl_fp"], result["ppl_fp_source"] = reuse["fp"], f"{ptq_path.name} runs.fp"
    else:
        with Timer() as t:
            result["ppl_fp"] = ppl(model)
        result["ppl_fp_source"] = f"measured here ({t.seconds:.0f} s)"
    print(f"fp ppl {result['ppl_fp']:.3f} ({result['ppl_fp_source']})", flush=True)

    spec = QuantSpec(bits=args.bits, group_size=args.group, symmetric=True)
    if args.from_export:
        originals = {n: m.weight.detach().clone() for n, m in find_linear_layers(model).items()}
        del model
        qmodel = load_quantized(args.from_export).eval()
        layer = next(m for m in qmodel.modules() if isinstance(m, QuantLinear))
        if layer.spec != spec:
            raise SystemExit(f"export {args.from_export} has {layer.spec}, not {spec}")
        result["quant"]["source"] = f"load_quantized({args.from_export})"
    else:
        calib = list(data["calib"].split(8))
        with Timer() as t:
            originals = quantize_model_gptq(model, calib, spec, damp=0.01, block_size=128, act_order=False,
                                            keep_original=True, progress=False)
        qmodel = model
        result["quant"]["source"] = f"quantize_model_gptq here, {tuple(data['calib'].shape)} calibration"
        result["quant"]["quant_s"] = t.seconds
    for p in qmodel.parameters():
        p.requires_grad_(False)
    tag = f"slimtune_gptq_w{args.bits}g{args.group}"
    if args.from_export and tag in reuse:
        result["ppl_q"], result["ppl_q_source"] = reuse[tag], f"{ptq_path.name} runs.{tag} (the model exported there)"
    else:
        with Timer() as t:
            result["ppl_q"] = ppl(qmodel)
        result["ppl_q_source"] = f"measured here ({t.seconds:.0f} s)"
    print(f"{args.bits}-bit GPTQ ppl {result['ppl_q']:.3f} ({result['ppl_q_source']})", flush=True)

    variants = [(f"lorc_r{r}", int(r)) for r in args.ranks.split(",")]
    if args.plain_lora:
        variants.append((f"lora_r{max(r for _, r in variants)}", max(r for _, r in variants)))
    result["variants"] = {}
    for name, rank in variants:
        m = copy.deepcopy(qmodel)
        entry: dict = {"rank": rank, "alpha": rank}
        if name.startswith("lorc"):
            with Timer() as t:
                m = add_lorc_adapters(m, originals, rank)
            entry["init"] = "LoRC: truncated SVD of W - Q (add_lorc_adapters)"
            entry["lorc_init_s"] = t.seconds
            entry["ppl_init"] = ppl(m)
        else:
            targets = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
            config = register_quant_lora(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                                    lora_dropout=0.0))
            m = get_peft_model(m, config)
            entry["init"] = "PEFT default (A Kaiming, B = 0): step 0 equals the quantized model"
            entry["ppl_init"] = result["ppl_q"]
        entry["share_recovered_init"] = share(result["ppl_q"], entry["ppl_init"], result["ppl_fp"])
        torch.manual_seed(args.seed)
        entry["finetune"] = finetune(m, blocks, args.steps, args.batch, args.lr, args.seed)
        entry["ppl_after"] = ppl(m)
        entry["share_recovered_after"] = share(result["ppl_q"], entry["ppl_after"], result["ppl_fp"])
        entry["goal_after_ge_0.70_met"] = entry["share_recovered_after"] >= 0.70
        result["variants"][name] = entry
        print(f"{name}: ppl init {entry['ppl_init']:.3f} (share {entry['share_recovered_init']:.1%}), after "
              f"{args.steps} steps {entry['ppl_after']:.3f} (share {entry['share_recovered_after']:.1%}), "
              f"train {entry['finetune']['train_s']:.0f} s", flush=True)
        del m
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    result["total_s"] = time.perf_counter() - started
    if any(not math.isfinite(v.get("ppl_after", float("nan"))) for v in result["variants"].values()):
        result["warning"] = "non-finite perplexity"
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
