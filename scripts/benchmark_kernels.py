"""Checks and benchmarks both Pallas kernels in one run: the grouped MoE GEMM and MLA attention.

    python scripts/benchmark_kernels.py                 # both, full tables
    python scripts/benchmark_kernels.py gmm --quick     # one kernel; the rest of the flags go to its script
    python scripts/benchmark_kernels.py mla --no-prefill

Each kernel's own script (benchmark_gmm.py, benchmark_mla.py) holds its shapes and flags; this entry point
runs them back to back and exits non-zero if either kernel disagrees with its reference.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

SCRIPTS = pathlib.Path(__file__).resolve().parent
KERNELS = {"gmm": "benchmark_gmm.py", "mla": "benchmark_mla.py"}


def _load_main(filename: str):
    spec = importlib.util.spec_from_file_location(filename.removesuffix(".py"), SCRIPTS / filename)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses resolve string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    names = [argv.pop(0)] if argv and argv[0] in KERNELS else list(KERNELS)
    status = 0
    for name in names:
        print(f"\n======== {name} ========", flush=True)
        rc = _load_main(KERNELS[name])(argv if len(names) == 1 else [])
        if rc:
            print(f"{name}: FAILED (exit {rc})", flush=True)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
