"""Reproduce the two bitsandbytes CPU problems slimtune guards against (see slimtune.quant.bnb4bit), bare and guarded.

    python benchmarks/bnb_cpu_trap.py        # a few seconds; writes benchmarks/results/bnb_cpu_trap.json

1. Packing trap: after one eval-mode forward without grad, a Linear4bit on a CPU with avx512_bf16 computes through
   `gemv_4bit`, which has no autograd kernel: the input gets no gradient. Printed: the input-gradient norm before and
   after such an evaluation, for a bare bitsandbytes layer and for one under `slimtune.quant.bnb4bit.guard_4bit`.
2. Ragged rows: bitsandbytes' native CPU `dequantize_4bit` disagrees with its own quantizer when a row is not a whole
   number of blocks (48 x 80 weight, blocks of 64). Printed: relative error of the dequantized weight against the
   float weight, from bitsandbytes' kernel and from slimtune's exact dequantization.
On a CPU without avx512_bf16 (and where the kernel is right) both halves show no difference: the machine decides.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C


def _layer(in_features=256, out_features=256):
    import bitsandbytes as bnb

    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.05
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, device="meta")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.to("cpu")


def _input_grad_norm(layer, x):
    x = x.detach().clone().requires_grad_(True)
    layer.train()
    layer(x).pow(2).sum().backward()
    return None if x.grad is None else float(x.grad.norm())


def packing_trap(guarded: bool) -> dict:
    from slimtune.quant.bnb4bit import guard_4bit, is_packed

    layer = _layer()
    if guarded:
        guard_4bit(layer)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    before = _input_grad_norm(layer, x)
    layer.eval()
    with torch.no_grad():
        layer(x)  # an evaluation: perplexity, validation, generation
    packed = is_packed(layer)
    after = _input_grad_norm(layer, x)
    return {"input_grad_norm_before_eval": before, "packed_after_eval": packed, "input_grad_norm_after_eval": after}


def ragged_rows() -> dict:
    import bitsandbytes.functional as bnbf

    from slimtune.quant.bnb4bit import dequantize_4bit

    weight = torch.randn(48, 80, generator=torch.Generator().manual_seed(0))
    data, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)

    def rel(w):
        return float((w - weight).norm() / weight.norm())

    return {"shape": [48, 80], "blocksize": 64, "bitsandbytes_dequantize_rel_error": rel(bnbf.dequantize_4bit(data, state)),
            "slimtune_dequantize_rel_error": rel(dequantize_4bit(data, state))}


def main() -> None:
    from bitsandbytes.functional import has_avx512bf16

    result = {
        "benchmark": "bnb_cpu_trap",
        "command": "python benchmarks/bnb_cpu_trap.py",
        "cpu_has_avx512_bf16": bool(has_avx512bf16()),
        "packing_trap": {"bitsandbytes": packing_trap(False), "slimtune_guard": packing_trap(True)},
        "ragged_rows": ragged_rows(),
        "env": C.environment(),
    }
    C.write_json(C.RESULTS / "bnb_cpu_trap.json", result)
    print(json.dumps({k: result[k] for k in ("cpu_has_avx512_bf16", "packing_trap", "ragged_rows")}, indent=2))


if __name__ == "__main__":
    main()
