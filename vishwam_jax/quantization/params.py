"""Quantizing a float model's parameters into a quantized model's layout (at load, under jit)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from vishwam_jax.quantization.formats import SCALE_NAME, Quantization, is_storage_dtype, quantize


def quantize_params(params: nnx.State, target: nnx.State, quantization: Quantization) -> nnx.State:
    """`params` (a float model's state) in the layout of `target` (the abstract state of the same
    model built with `quantization`): every kernel the target stores quantized gets its values and
    `kernel_scale`; every other leaf (norms, routers, embeddings) is taken as it is."""
    floats = dict(nnx.to_flat_state(params))
    targets = dict(nnx.to_flat_state(target))
    out = []
    for path, variable in targets.items():
        if path[-1] == SCALE_NAME:
            continue  # written with its kernel
        value = floats[path].get_value()
        if is_storage_dtype(variable.get_value().dtype):
            meta = variable.get_metadata()
            dims, k_major = tuple(meta["matrix_dims"]), bool(meta.get("k_major", False))
            values, scale = quantize(value, quantization.format, dims, quantization.block, xp=jnp, k_major=k_major)
            out.append((path, variable.replace(values)))
            scale_path = path[:-1] + (SCALE_NAME,)
            out.append((scale_path, targets[scale_path].replace(scale)))
        else:
            out.append((path, variable.replace(value)))
    return nnx.from_flat_state(out)
