"""Quantized weights, one representation for every family (docs/quantization.md).

A quantized matmul weight is its `values` in a narrow storage dtype and a float32 `scale`:
    int8  per output channel: w = values * scale, scale of the weight's rank with size 1 on the
          contracted dimensions (symmetric, amax / 127);
    fp8   float8 e4m3 in blocks: the weight's trailing dimensions form a matrix [K, N] (contracted
          ones flattened into K, output ones into N; leading dimensions, such as stacked layers and
          experts, are a batch) and scale[..., i, j] covers rows i*b0..(i+1)*b0 and columns
          j*b1..(j+1)*b1 of that matrix, the last block of each side partial: DeepSeek-V3's
          `weight_scale_inv` layout (amax / 448 per block).
Weight-only: a quantized linear computes exactly what the float linear computes with the
dequantized weight (values * scale in float32, then the activation dtype).
"""

from vishwam_jax.quantization.formats import (
    FORMATS,
    SCALE_NAME,
    STORAGE_DTYPES,
    MatrixDims,
    Quantization,
    QuantizationError,
    QuantizedWeight,
    check_format,
    dequantize,
    is_storage_dtype,
    keeps_stored_dtype,
    quantize,
    scale_axes,
    scale_shape,
)

__all__ = [
    "FORMATS",
    "SCALE_NAME",
    "STORAGE_DTYPES",
    "MatrixDims",
    "Quantization",
    "QuantizationError",
    "QuantizedWeight",
    "check_format",
    "dequantize",
    "is_storage_dtype",
    "keeps_stored_dtype",
    "quantize",
    "scale_axes",
    "scale_shape",
]
