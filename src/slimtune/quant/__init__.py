"""Pure-torch weight quantization: RTN grids, GPTQ, LoRC/LoftQ and NF4 fake quantization."""

from slimtune.quant.compressed_tensors import save_compressed_tensors
from slimtune.quant.export import load_quantized, save_quantized, stored_bits_per_parameter
from slimtune.quant.gptq import GPTQ, GPTQResult, gptq_quantize_linear
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
from slimtune.quant.nf4 import nf4_fake_quantize

__all__ = [
    "GPTQ",
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
    "gptq_quantize_linear",
    "group_index",
    "lorc_factors",
    "lorc_init",
    "nf4_fake_quantize",
    "quantize_to_grid",
]
