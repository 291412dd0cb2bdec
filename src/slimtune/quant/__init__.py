"""Pure-torch weight quantization: RTN grids, GPTQ, LoRC/LoftQ, and bitsandbytes NF4 (incl. GPTQ-chosen codes).

Rooms by job: `grid` (RTN grids), `gptq` (one layer), `awq` (activation-aware scales, then RTN/GPTQ), `folds`
(where a per-channel scale folds into a block), `layers` (QuantLinear), `nf4` (bitsandbytes NF4, one layer or a
whole model), `lorc` (LoRC factors, on layers and whole models), `targets` (which layers, by `slimtune.select`'s rule;
swapping them), `drivers` (RTN and GPTQ over a whole model), `state` (a quantized layer as tensors, for resume),
`export` / `compressed_tensors` (folders), `bnb4bit` (bitsandbytes 4-bit details).
"""

from slimtune.quant.awq import awq_model, quantize_model_awq
from slimtune.quant.compressed_tensors import save_compressed_tensors
from slimtune.quant.drivers import check_calibration, quantize_model_gptq, quantize_model_rtn
from slimtune.quant.export import load_quantized, save_quantized, stored_bits_per_parameter
from slimtune.quant.gptq import GPTQ, CodebookResult, GPTQResult, gptq_quantize_linear
from slimtune.quant.grid import (
    SUPPORTED_BITS,
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    group_index,
    quantize_to_grid,
)
from slimtune.quant.layers import QuantLinear, register_quant_lora
from slimtune.quant.lorc import add_lorc_adapters, apply_lorc, lorc_factors, lorc_init, lorc_nf4
from slimtune.quant.nf4 import NF4Spec, gptq_nf4_linear, nf4_fake_quantize, nf4_linear, quantize_model_nf4
from slimtune.quant.targets import find_linear_layers

__all__ = [
    "GPTQ",
    "CodebookResult",
    "NF4Spec",
    "QuantLinear",
    "add_lorc_adapters",
    "awq_model",
    "quantize_model_awq",
    "apply_lorc",
    "check_calibration",
    "find_linear_layers",
    "load_quantized",
    "lorc_nf4",
    "quantize_model_gptq",
    "quantize_model_nf4",
    "quantize_model_rtn",
    "register_quant_lora",
    "save_compressed_tensors",
    "save_quantized",
    "stored_bits_per_parameter",
    "GPTQResult",
    "SUPPORTED_BITS",
    "QuantSpec",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "gptq_nf4_linear",
    "gptq_quantize_linear",
    "group_index",
    "lorc_factors",
    "lorc_init",
    "nf4_fake_quantize",
    "nf4_linear",
    "quantize_to_grid",
]
