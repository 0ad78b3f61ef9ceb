"""jax's GPU interpreter (Pallas Mosaic GPU kernels in interpret mode), taught what our kernels use.

The interpreter runs a Mosaic GPU kernel on a CPU, thread by thread, for the tests. It lacks a few
operations our kernels need; this module adds them to the interpreter, never to the kernels, which
are the same code in both modes.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

_TAUGHT = False


def teach() -> None:
    """Add what the installed interpreter lacks, each only if it lacks it; only interpret mode is
    affected: the accumulator store `acc_ref[...] = x` (an accumulator is an ordinary buffer there,
    so it becomes a ref store), `layout_cast` (values have no layout there: an identity; jax 0.10),
    `plgpu.load` with a layout (a plain ref read there), a wgmma operand read through `transpose_ref`
    (jax 0.10), and, for speed, one compilation per simulated thread program instead of one per
    thread and grid point."""
    global _TAUGHT
    if _TAUGHT:
        return
    _TAUGHT = True
    import inspect

    from jax._src.lax import lax as lax_internal
    from jax._src.pallas.mosaic_gpu import core as gpu_core
    from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, jaxpr_interpret
    from jax._src.state import primitives as state_primitives

    interpreter = getattr(jaxpr_interpret, "JaxprInterpreter", None)
    if interpreter is None:
        return
    known = inspect.getsource(jaxpr_interpret)
    rewrites = {}
    store_p = getattr(gpu_primitives, "wgmma_accumulator_store_p", None)
    if store_p is not None and "wgmma_accumulator_store_p" not in known:
        swap = dict(tree=jax.tree.structure(()))
        rewrites[store_p] = lambda e: e.replace(primitive=state_primitives.swap_p, params=swap)
    load_p = getattr(gpu_primitives, "load_p", None)
    if load_p is not None and "gpu_primitives.load_p" not in known:
        rewrites[load_p] = lambda e: e.replace(primitive=state_primitives.get_p, params=dict(tree=e.params["tree"]))
    cast_p = getattr(gpu_core, "layout_cast_p", None)
    if cast_p is not None and "layout_cast_p" not in known:
        rewrites[cast_p] = lambda e: e.replace(primitive=lax_internal.copy_p, params={})
    if rewrites:
        original = interpreter.interpret

        def interpret(self, jaxpr, token, *args):
            if any(e.primitive in rewrites for e in jaxpr.eqns):
                eqns = [rewrites[e.primitive](e) if e.primitive in rewrites else e for e in jaxpr.eqns]
                jaxpr = jaxpr.replace(eqns=eqns)
            return original(self, jaxpr, token, *args)

        interpreter.interpret = interpret
    if "to_range(b_transforms)" in inspect.getsource(gpu_callbacks.wgmma):  # jax 0.10: index-only operand views
        gpu_callbacks.wgmma = functools.partial(_interpreted_wgmma, gpu_callbacks.wgmma)
    try:  # speed only: each simulated thread of each grid point compiles its program afresh
        from jax._src.pallas.mosaic.interpret import thread_map
    except ImportError:  # pragma: no cover - another jax layout
        return
    if "traced.lower().compile()" in inspect.getsource(thread_map._run_jaxpr):
        thread_map._run_jaxpr = functools.partial(_run_jaxpr_cached, {})


def params(interpret, *, reads_past_the_end: bool = False):
    """`interpret` (True or an `InterpretGPUParams`) as the kernel's `interpret=` argument, with the
    interpreter taught; False: None (compile for the GPU). reads_past_the_end: the kernel's TMA boxes
    may reach past an array's end, where the hardware reads zeros; the interpreter then reads NaN
    there (its uninitialized value) instead of raising, which also shows that no such value reaches
    the output."""
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret import params as interpret_params

    teach()
    if isinstance(interpret, interpret_params.InterpretGPUParams):
        return interpret
    if reads_past_the_end:
        return interpret_params.InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="nan")
    return interpret_params.InterpretGPUParams()


def _run_jaxpr_cached(compiled, jaxpr, consts, *args):
    """thread_map._run_jaxpr with the executable kept per jaxpr (the same for every thread and grid
    point of one kernel): a few hundred ms saved per grid point."""
    entry = compiled.get(id(jaxpr))
    if entry is None or entry[0] is not jaxpr:
        run = jax.jit(lambda consts, *a: jax.core.eval_jaxpr(jaxpr, consts, *a))
        entry = compiled[id(jaxpr)] = (jaxpr, run.trace(consts, *args).lower().compile())
    entry[1](consts, *args)


def _interpreted_wgmma(original, **kw):
    """gpu_callbacks.wgmma, with operands that end in a transpose read untransposed and then
    transposed (jax 0.10's version reads every operand through an index-only view)."""
    from jax._src.pallas.mosaic.interpret import utils as interpret_utils
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.state.types import TransposeTransform

    def split(transforms):
        transforms = gpu_callbacks._remove_noop_transforms(transforms)
        if transforms and isinstance(transforms[-1], TransposeTransform):
            return jax.tree.map(int, transforms[:-1]), transforms[-1].permutation
        return jax.tree.map(int, transforms), None

    (a_tf, a_perm), (b_tf, b_perm) = split(kw["a_transforms"]), split(kw["b_transforms"])
    if a_perm is None and b_perm is None:
        return original(**kw)
    device_id, thread_id = int(kw["device_id"]), int(kw["thread_id"])
    memory = gpu_callbacks._get_shared_memory()
    thread = memory.get_global_thread_id(device_id, thread_id)
    info = interpret_utils.GPULoggingInfo(
        device_id=device_id,
        grid_point_coords=tuple(int(x) for x in kw["grid_point_coords"]),
        thread_id=thread_id,
        source_info=kw.get("source_info"),
    )

    def read(name, transforms, perm):
        key = gpu_callbacks.HostAllocationKey.from_array(kw[f"{name}_allocation_key_as_array"])
        value = memory.get_buffer_content(key, interpret_utils.to_range(transforms), thread, logging_info=info)[0]
        return value if perm is None else np.transpose(value, perm)

    acc_key = gpu_callbacks.HostAllocationKey.from_array(kw["acc_allocation_key_as_array"])
    acc_range = interpret_utils.to_range(split(kw["acc_transforms"])[0])
    acc = memory.get_buffer_content(acc_key, acc_range, thread, logging_info=info)[0]
    res = acc + np.matmul(read("a", a_tf, a_perm), read("b", b_tf, b_perm), dtype=kw["acc_dtype"])
    memory.store_buffer_content(acc_key, acc_range, res, thread, logging_info=info)
    return kw["token"]


def reset() -> None:
    """After an exception inside GPU interpret mode, its global state must be reset before reuse."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

    interpret_pallas_call.reset_gpu_interpret_mode_state()
