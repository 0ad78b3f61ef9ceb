"""The research notebooks in notebooks/: each executes top to bottom in a fresh kernel and renders its plots,
and each is committed without outputs (so diffs show code, not pixels, and a stale output cannot pass for a
result).

    python -m pytest tests/test_notebooks.py -k quickstart
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Generous: a cell that compiles a model on a loaded 2-core CI machine can take minutes; a hung kernel still fails.
CELL_TIMEOUT_S = 600
# The sharding and DeepSeek notebooks run on 8 simulated CPU devices; the flag must be in the kernel's
# environment before jax initialises there.
DEVICE_FLAG = "--xla_force_host_platform_device_count=8"


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, DEVICE_FLAG])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return env


def _ids(paths):
    return [p.stem for p in paths]


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} hold outputs or execution counts; clear them before committing "
        f"(jupyter nbconvert --clear-output --inplace {path.relative_to(NOTEBOOK_DIR.parent)})"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes_and_plots(path: Path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    # A cell that raises fails the test here, with the cell's source and traceback in the message.
    client.execute(env=_kernel_env())

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    # Each notebook makes its point with at least one figure; one that rendered none has lost it.
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert images, f"{path.name}: executed without rendering any image/png output (no plot)"
