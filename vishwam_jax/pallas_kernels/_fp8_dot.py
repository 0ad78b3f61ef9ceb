"""A float8 dot for Pallas kernels that lets Hopper's FP8 tensor cores run it.

Hopper's FP8 `wgmma` accumulates with reduced precision inside the instruction, so Triton emits it
only for a dot whose `max_num_imprecise_acc` allows that many products to be accumulated
imprecisely, and otherwise widens both float8 operands to float16 for the older `mma` (about half
the FP8 rate). Pallas' `dot_general` lowering never sets the attribute. This primitive does, to the
dot's own K extent: the kernels that use it scale each K step's float32 result and add it to a
float32 accumulator in registers, which is DeepSeek-V3's recipe (promotion every 128 products), so
imprecision never spans more than one step.

Off the Triton lowering (Pallas interpret mode, plain XLA) it is a float32 product of the float8
values, exact up to float32 rounding.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jax_core
from jax.interpreters import mlir

_log = logging.getLogger(__name__)

fp8_dot_p = jax_core.Primitive("vishwam_fp8_dot")


def fp8_dot(a: jax.Array, b: jax.Array, contracting: tuple[int, int]) -> jax.Array:
    """float32 `a · b` of two 2-D float8 tiles contracted over `contracting` = (axis of a, axis of b)."""
    if not TRITON_RULE_REGISTERED:  # a jax whose Pallas internals moved: Pallas' own dot (mma on float16)
        dims = (((contracting[0],), (contracting[1],)), ((), ()))
        return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
    return fp8_dot_p.bind(a, b, contracting=tuple(contracting))


def _out_shape(a_shape, b_shape, contracting) -> tuple[int, int]:
    ca, cb = contracting
    return a_shape[1 - ca], b_shape[1 - cb]


@fp8_dot_p.def_abstract_eval
def _abstract_eval(a, b, *, contracting):
    if a.ndim != 2 or b.ndim != 2 or a.shape[contracting[0]] != b.shape[contracting[1]]:
        raise ValueError(f"fp8_dot contracts two 2-D tiles over one shared axis, not {a.shape}, {b.shape}")
    return jax.core.ShapedArray(_out_shape(a.shape, b.shape, contracting), jnp.float32)


def _float32_dot(a, b, *, contracting):
    dims = (((contracting[0],), (contracting[1],)), ((), ()))
    return lax.dot_general(
        a.astype(jnp.float32), b.astype(jnp.float32), dims, precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )  # fmt: skip


fp8_dot_p.def_impl(_float32_dot)
mlir.register_lowering(fp8_dot_p, mlir.lower_fun(_float32_dot, multiple_results=False))


def _triton_rule(ctx, a, b, *, contracting):
    """tt.dot with max_num_imprecise_acc = K (operands transposed to [m, k] x [k, n] as Pallas does)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax._src.lib.triton import dialect as tt

    ca, cb = contracting
    if ca == 0:
        a = tt.trans(a, (1, 0))
    if cb == 1:
        b = tt.trans(b, (1, 0))
    k = ctx.avals_in[0].shape[ca]
    out_type = ir.RankedTensorType.get(list(ctx.avals_out[0].shape), ir.F32Type.get())
    zeros = arith.constant(out_type, ir.DenseElementsAttr.get_splat(out_type, ir.FloatAttr.get(ir.F32Type.get(), 0.0)))
    return tt.dot(a, b, zeros, max_num_imprecise_acc=k)


def _register_triton_rule() -> bool:
    """Add the rule to Pallas' Triton lowering (a private table: if it moves, the kernels fall back to
    Pallas' own dot and say so once)."""
    try:
        from jax._src.pallas.triton import lowering

        lowering.triton_lowering_rules[fp8_dot_p] = _triton_rule
    except (ImportError, AttributeError) as err:
        _log.warning("FP8 dots fall back to Pallas' dot_general (float16 mma): %s", err)
        return False
    return True


TRITON_RULE_REGISTERED = _register_triton_rule()
