"""Stored bits per parameter of SmolLM2-135M-Instruct's NF4 base, double quantization on and off.

    python benchmarks/stored_bits.py      # ~2 min: loads the model twice

`slimtune.models.stats.compression_stats` on the base `slimtune.models.load_base_model` builds (no LoRA), counting
each 4-bit weight at its logical size and its stored size, quantization statistics (absmax, nested absmax, code,
offset) included. Theory for NF4 with blocks of 64: 4 + 32/64 = 4.5 bits without double quant, and
4 + 8/64 + 32/(64*256) = 4.127 with it (8-bit absmax in blocks of 256 with one fp32 scale each). The goal for the
quantized layers is <= 4.2 with double quant. The whole-model figure also counts the embeddings (tied with lm_head,
kept in fp32) and the norms.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

C.offline()

THEORY = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4 + 32 / 64}


def measure(double_quant: bool, quantization: str = "nf4") -> dict:
    from slimtune.models.loading import load_base_model
    from slimtune.models.stats import compression_stats

    started = time.perf_counter()
    model = load_base_model(C.smollm2_model_cfg(quantization=quantization, double_quant=double_quant))
    stats = compression_stats(model)
    layer = model.model.layers[0].self_attn.q_proj
    state = getattr(layer.weight, "quant_state", None)
    stats.update({
        "quantization": quantization,
        "double_quant": double_quant,
        "layer_type": type(layer).__name__,
        "blocksize": getattr(state, "blocksize", None),
        "nested_blocksize": getattr(getattr(state, "state2", None), "blocksize", None),
        "theory_quantized_bits_per_param": THEORY[double_quant] if quantization == "nf4" else None,
        "seconds": round(time.perf_counter() - started, 1),
    })
    del model
    gc.collect()
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(C.RESULTS / "stored_bits.json"))
    args = p.parse_args()
    runs = {"nf4_double_quant": measure(True), "nf4": measure(False)}
    dq = runs["nf4_double_quant"]["quantized_bits_per_param"]
    result = {
        "benchmark": "stored_bits",
        "command": "python " + " ".join([str(Path(__file__).relative_to(C.ROOT))] + sys.argv[1:]),
        "model": C.SMOLLM2,
        "runs": runs,
        "quantized_bits_per_param_double_quant": dq,
        "quantized_bits_per_param_no_double_quant": runs["nf4"]["quantized_bits_per_param"],
        "whole_model_bits_per_param_double_quant": runs["nf4_double_quant"]["bits_per_param"],
        "whole_model_bits_per_param_no_double_quant": runs["nf4"]["bits_per_param"],
        "goal": "quantized_bits_per_param_double_quant <= 4.2 (theory 4.127)",
        "meets_goal": dq <= 4.2,
        "env": C.environment(),
    }
    path = C.write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "env")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
