"""The ``python -m dynattn simulate`` command, run as a user would (in a subprocess)."""

import subprocess
import sys

import numpy as np
import pytest

from dynattn.simulation import TIMELINE_COLUMNS, Timeline
from dynattn.workloads import make_qkv

SMALL = ["--n", "32", "--d", "4", "--updates-per-tick", "4", "--queries-per-tick", "2"]


def simulate(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "dynattn", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_simulate_writes_csv_and_summary(tmp_path):
    out = tmp_path / "out.csv"
    proc = simulate(
        *SMALL,
        "--ticks",
        "25",
        "--policy",
        "fixed",
        "--threshold",
        "6",
        "--stream",
        "hotspot",
        "--seed",
        "3",
        "--csv",
        str(out),
    )
    text = proc.stdout
    assert "simulated 25 ticks: n=32, d=4" in text and "policy=Fixed(6)" in text
    assert "updates 100, queries 50" in text
    for label in ("lazy", "eager", "on-demand", "recompute (est.)"):
        assert f"\n{label} " in text
    assert "final relative error" in text and f"timeline: {out} (25 ticks)" in text
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    data = Timeline.read_csv(out)
    assert list(data) == list(TIMELINE_COLUMNS)
    np.testing.assert_array_equal(data["tick"], np.arange(25))
    assert (data["updates"] == 4).all() and (data["threshold"] == 6).all()
    flushes = int(text.split("lazy flushes ")[1].split()[0])
    assert data["flushed"].sum() == flushes
    assert data["recompute_flops"][-1] == 4.0 * 32 * 32 * 4 * 100


def test_simulate_from_a_file_with_every_option(tmp_path):
    Q, K, V = make_qkv("local", 20, 6, seed=1)
    path = tmp_path / "qkv.npz"
    np.savez(path, Q=Q, K=K, V=V)
    out = tmp_path / "t.csv"
    proc = simulate(
        "--file",
        str(path),
        "--ticks",
        "10",
        "--policy",
        "error",
        "--tolerance",
        "1e-4",
        "--stream",
        "bursts",
        "--k-share",
        "0.2",
        "--delta-scale",
        "0.01",
        "--dtype",
        "float32",
        "--unscaled",
        "--history",
        "4",
        "--csv",
        str(out),
    )
    assert "n=20, d=6, preset=file" in proc.stdout and "dtype=float32" in proc.stdout
    np.testing.assert_array_equal(Timeline.read_csv(out)["tick"], [6, 7, 8, 9])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "1"], "argument --n: n=1 must be in [2, 8192]"),
        (["--d", "x"], "argument --d: 'x' is not an integer"),
        (["--tolerance", "0"], "argument --tolerance: tolerance=0 must be in [1e-08, 1.0]"),
        (["--delta-scale", "nan"], "argument --delta-scale: delta_scale=nan must be in"),
        (["--policy", "lazy"], "argument --policy: invalid choice: 'lazy'"),
        (["--ticks", "0"], "argument --ticks: 0 must be >= 1"),
        (["--csv", "/no/such/folder/x.csv"], "folder '/no/such/folder' does not exist"),
        (["--preset", "local", "--d", "1"], "preset 'local' needs d >= 2"),
    ],
)
def test_simulate_bad_arguments_exit_2(args, message):
    proc = simulate(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_simulate_bad_file_exits_2(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    proc = simulate("--file", str(bad), "--ticks", "2", check=False)
    assert proc.returncode == 2
    assert f"{bad}: not an .npz file" in proc.stderr and "Traceback" not in proc.stderr
