"""Pure-torch weight quantization: RTN grids, GPTQ, LoRC/LoftQ, and bitsandbytes NF4 (incl. GPTQ-chosen codes)."""

from slimtune.quant.compressed_tensors import save_compressed_tensors
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
from slimtune.quant.lorc import lorc_factors, lorc_init
from slimtune.quant.model import (
    add_lorc_adapters,
    apply_lorc,
    check_calibration,
    find_linear_layers,
    lorc_nf4,
    quantize_model_gptq,
    quantize_model_nf4,
    quantize_model_rtn,
)
from slimtune.quant.nf4 import NF4Spec, gptq_nf4_linear, nf4_fake_quantize, nf4_linear

__all__ = [
    "GPTQ",
    "CodebookResult",
    "NF4Spec",
    "QuantLinear",
    "add_lorc_adapters",
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
