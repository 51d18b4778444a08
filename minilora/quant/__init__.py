"""QLoRA's 4-bit base: NF4 / FP4 / int4 blockwise quantization and double quantization.

- ``codebooks``: the code books, built step by step (NF4 from normal quantiles, without SciPy).
- ``nf4``: quantize / dequantize, packing, storage and bits-per-parameter, error statistics.
- ``double_quant``: QLoRA's quantization of the quantization constants (8-bit dynamic map).
- ``kernels``: the CUDA dequantization kernels (used automatically for CuPy arrays).
- ``linear``: ``NF4Linear`` (a frozen Linear stored in NF4, dequantized on the fly) and
  ``quantize_model`` (every Linear but ``lm_head`` to NF4): QLoRA's base model.
- ``report``: quantize a whole checkpoint and tabulate sizes and errors (``minilora quantize``).

Everything matches bitsandbytes 0.50.2's CPU path byte for byte (see tests/test_nf4.py).
"""
from .codebooks import (DYNAMIC_MAP, FP4_CODE, INT4_CODE, NF4_CODE, create_dynamic_map,
                        create_int4_map, create_normal_map, float32_linspace, get_code)
from .double_quant import (NESTED_BLOCKSIZE, DoubleQuantState, dequantize_blockwise_8bit,
                           double_quantize, quantize_blockwise_8bit)
from .linear import (NF4Linear, TransientWeight, dequantize_model, requantization_errors, format_quantization_summary,
                     load_quantized_model, nf4_linear, quantization_summary, quantize_model,
                     quantized_modules, quantized_state_dict, release_workspace,
                     save_quantized_model, workspace_bytes)
from .nf4 import (VALID_BLOCKSIZES, NF4Tensor, QuantizedTensor4bit, dequantize_4bit,
                  dequantize_nf4, nf4_bits_per_parameter, pack_4bit, quantization_error,
                  quantize_blockwise_4bit, quantize_fp4, quantize_int4, quantize_nf4,
                  storage_bytes, unpack_4bit)

__all__ = [
    "NF4_CODE", "FP4_CODE", "INT4_CODE", "DYNAMIC_MAP",
    "create_normal_map", "create_int4_map", "create_dynamic_map", "float32_linspace", "get_code",
    "NF4Tensor", "QuantizedTensor4bit", "VALID_BLOCKSIZES",
    "quantize_nf4", "dequantize_nf4", "quantize_fp4", "quantize_int4",
    "quantize_blockwise_4bit", "dequantize_4bit", "pack_4bit", "unpack_4bit",
    "storage_bytes", "nf4_bits_per_parameter", "quantization_error",
    "NESTED_BLOCKSIZE", "DoubleQuantState", "double_quantize",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
    "NF4Linear", "TransientWeight", "requantization_errors", "nf4_linear", "quantize_model", "dequantize_model", "quantized_modules",
    "quantization_summary", "format_quantization_summary", "quantized_state_dict",
    "save_quantized_model", "load_quantized_model", "workspace_bytes", "release_workspace",
]
