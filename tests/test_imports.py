"""Importing the package and its command line loads no plotting library and nothing POSIX-only.

Each check runs in a fresh interpreter: this test process has long imported panel and friends.
"""

import json
import subprocess
import sys

import pytest

from dynattn.__main__ import main

# resource is POSIX-only (its import fails on Windows); the other three are the view's
FORBIDDEN = ("resource", "panel", "holoviews", "bokeh")

_REPORT = (
    "import json, sys\n"
    "loaded = {name.partition('.')[0] for name, mod in sys.modules.items() if mod is not None}\n"
    f"print('LOADED', json.dumps(sorted(loaded & set({FORBIDDEN!r}))))\n"
)


def _forbidden_after(code: str) -> list[str]:
    """The forbidden top-level modules loaded once ``code`` has run in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", code + "\n" + _REPORT],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED ")]
    return json.loads(line.removeprefix("LOADED "))


def test_import_dynattn_loads_no_plotting_library_nor_resource():
    assert _forbidden_after("import dynattn") == []


def test_the_report_sees_a_forbidden_module_when_one_is_loaded():
    # the check above could pass vacuously if the report never saw anything
    assert _forbidden_after("import dynattn, bokeh") == ["bokeh"]


def test_python_m_dynattn_demo_loads_no_plotting_library_nor_resource():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['dynattn', 'demo']\n"
        "try:\n"
        "    runpy.run_module('dynattn', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
    )
    assert _forbidden_after(code) == []


def test_bench_is_no_longer_a_package_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench"])
    assert exc.value.code == 2 and "invalid choice: 'bench'" in capsys.readouterr().err


def test_the_model_and_dask_load_when_first_named():
    code = (
        "import sys, dynattn\n"
        "before = {m for m in ('dask', 'tokenizers') if m in sys.modules}\n"
        "dynattn.MiniLM, dynattn.ShardedAttention\n"
        "after = {m for m in ('dask', 'tokenizers') if m in sys.modules}\n"
        "print(sorted(before), sorted(after))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    ).stdout.split("\n")[0]
    assert out == "[] ['dask', 'tokenizers']"
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        import dynattn

        dynattn.Nothing  # noqa: B018
