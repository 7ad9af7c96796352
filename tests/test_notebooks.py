"""Every notebook in notebooks/ runs top to bottom, in a fresh kernel of this interpreter.

The kernel is started from a kernelspec written for the test whose command is ``sys.executable``
itself, so the notebooks run against the package installed in the environment running pytest
(a fresh ``make test`` venv in CI), never against whatever ``python3`` kernel a user has
registered elsewhere. Notebooks are committed without outputs; a cheap test checks that, and
that each opens with what the reader will learn and closes with a summary.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets import default

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "dynattn-tests"
CELL_TIMEOUT = 120  # seconds per cell; each notebook is meant to finish in well under a minute
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="session")
def kernel_manager_class(tmp_path_factory) -> type[AsyncKernelManager]:
    """A kernel manager whose only kernelspec is ipykernel on this very interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL
    spec.mkdir()
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "dynattn tests",
                "language": "python",
            }
        )
    )

    class ThisInterpreter(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return KernelSpecManager(kernel_dirs=[str(root)], ensure_native_kernel=False)

    return ThisInterpreter


def execute(nb, kernel_manager_class):
    """Run ``nb`` in place in a fresh kernel (started and shut down by the client), from the
    notebooks directory."""
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT,
        kernel_manager_class=kernel_manager_class,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()
    return nb


def first_error(nb) -> str:
    """The first error output of an executed notebook, with its cell number and source."""
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                trace = ANSI.sub("", "\n".join(out.get("traceback", [])))
                return (
                    f"cell {index} raised {out['ename']}: {out['evalue']}\n"
                    f"--- source ---\n{cell.source}\n--- traceback ---\n{trace}"
                )
    return "no error output recorded"


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "00_five_minute_tour.ipynb",
        "01_quickstart.ipynb",
        "02_threshold_tradeoff.ipynb",
        "03_error_dynamics.ipynb",
        "04_dashboard_inline.ipynb",
        "05_real_attention.ipynb",
        "06_scaling_out.ipynb",
    ], names


def test_kernel_is_this_interpreter(kernel_manager_class):
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                "import sys, dynattn; print(sys.executable); print(dynattn.__file__)"
            )
        ]
    )
    out = execute(nb, kernel_manager_class).cells[0].outputs[0]["text"].split("\n")
    assert Path(out[0]).resolve() == Path(sys.executable).resolve()
    import dynattn

    assert Path(out[1]).resolve() == Path(dynattn.__file__).resolve()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_structure_and_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = nb.cells
    assert cells[0].cell_type == "markdown" and cells[0].source.lstrip().startswith("# "), (
        f"{path.name} must open with a markdown title cell saying what the reader will learn"
    )
    assert "learn" in cells[0].source.lower(), f"{path.name}: say what the reader will learn"
    assert cells[-1].cell_type == "markdown" and "summary" in cells[-1].source.lower(), (
        f"{path.name} must close with a markdown summary cell"
    )
    for index, cell in enumerate(cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: cell {index} has committed outputs; clear them before committing"
            )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, kernel_manager_class):
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    try:
        execute(nb, kernel_manager_class)
    except CellExecutionError:
        pytest.fail(f"{path.name} failed: {first_error(nb)}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
