"""What a Pallas GPU kernel becomes, without a GPU: its Triton module, and (with the `triton`
package installed) the SASS that Triton compiles it to for a Hopper target.

    modules = triton_modules(fn, *args)            # [(name, TTIR text, num_warps, num_stages)]
    counts = sass_instruction_counts(*modules[0][1:])  # {"QGMMA.64x128x32.F32.E4M3.E4M3": 2, ...}

Lowering runs Pallas' own Triton rules for a CUDA target on any machine. Compiling uses the pip
`triton` package, whose version need not be the one inside jaxlib that compiles the kernels on a
GPU, so the SASS is evidence of the code's shape (which MMA, how tiles reach registers), not a
measurement of it.
"""

from __future__ import annotations

import collections
import contextlib
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax


@contextlib.contextmanager
def _capturing_triton_modules() -> Iterator[list[tuple[str, str]]]:
    """Record (kernel name, module text) of every pallas_call lowered for Triton meanwhile."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lowering = registration.lowering
    original = lowering.lower_jaxpr_to_triton_module
    captured: list[tuple[str, str]] = []

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        op = result.module.operation
        name = op.attributes["sym_name"].value if "sym_name" in op.attributes else "kernel"
        captured.append((name, op.get_asm(enable_debug_info=False)))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield captured
    finally:
        lowering.lower_jaxpr_to_triton_module = original


# jax >= 0.11 looks the GPU up when it lowers a Triton kernel; without one it takes the target from
# an abstract mesh's device. Lowering only reads its kind.
_HOPPER = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def lower_for_cuda(fn: Callable, *args) -> str:
    """The StableHLO text of `fn` lowered for a CUDA GPU, on any machine (Triton kernels included)."""

    def lower():
        # A fresh function: jit caches lowerings by function, and a cached one would lower no kernel.
        return jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    try:
        return lower()
    except RuntimeError as err:
        if "abstract GPU" not in str(err):
            raise
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=_HOPPER)):
        return lower()


def triton_modules(fn: Callable, *args) -> list[tuple[str, str, int, int]]:
    """(name, Triton module text, num_warps, num_stages) of each Pallas Triton kernel in `fn`,
    lowered for a CUDA target (no GPU needed)."""
    with _capturing_triton_modules() as captured:
        text = lower_for_cuda(fn, *args)
    # The launch parameters live on the custom calls, in the order the kernels were lowered.
    params = re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", text)
    if len(params) < len(captured):
        params += [("3", "4")] * (len(captured) - len(params))
    return [(name, ir, int(w), int(s)) for (name, ir), (s, w) in zip(captured, params)]


def sass_instruction_counts(module: str, num_warps: int, num_stages: int, capability: int = 90) -> dict[str, int]:
    """Opcode counts of the SASS that the installed `triton` compiles `module` to (sm_`capability`)."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ttir"
        path.write_text(module)
        kernel = triton.compile(
            str(path),
            target=GPUTarget("cuda", capability, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    opcode = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
    return dict(collections.Counter(m.group(1) for m in opcode.finditer(sass)))
