"""The ``python -m dynattn simulate`` command, run as a user would (in a subprocess)."""

import contextlib
import fcntl
import os
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest

from dynattn.__main__ import main
from dynattn.cli import MAX_HISTORY_BYTES
from dynattn.simulation import TIMELINE_COLUMNS, Simulation, Timeline
from dynattn.workloads import make_qkv

SMALL = ["--n", "32", "--d", "4", "--updates-per-tick", "4", "--queries-per-tick", "2"]


def simulate(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "dynattn", "simulate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,  # the caller may expect a failure; asserted below otherwise
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


# ------------------------------------------------------------------ destinations, Ctrl-C, memory


def run_in_process(*args):
    """``main(['simulate', ...])`` in this process (so a test can patch the simulation)."""
    return main(["simulate", *SMALL, *args])


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("", "argument --csv: the path is empty"),
        ("{tmp}", "it is a folder"),
        ("{tmp}/file.txt/out.csv", "does not exist"),
        ("/proc/out.csv", "does not take new files"),
    ],
)
def test_an_unwritable_csv_destination_is_refused_before_running(tmp_path, target, message):
    (tmp_path / "file.txt").write_text("")
    if target.startswith("/proc") and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    # a billion ticks: the command would never end if the check came after the run
    args = ("--ticks", "1000000000", "--history", "10", "--csv", target.format(tmp=tmp_path))
    proc = simulate(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_read_only_csv_is_not_replaced(tmp_path, monkeypatch, capsys):
    out = tmp_path / "kept.csv"
    out.write_text("precious\n")
    out.chmod(0o444)
    real_access = os.access  # root may write anything: ask as an ordinary user would be told
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(out) else real_access(p, mode)
    )
    with pytest.raises(SystemExit) as exit_:
        run_in_process("--ticks", "2", "--csv", str(out))
    assert exit_.value.code == 2
    assert "the file is read-only" in capsys.readouterr().err
    assert out.read_text() == "precious\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ticks", "1000000000"], "--ticks 1,000,000,000 would keep 1,000,000,000 ticks"),
        (["--ticks", "5", "--history", "10000000000"], "--history 10,000,000,000 would keep"),
    ],
)
def test_a_timeline_too_large_is_refused_before_allocating(args, message):
    proc = simulate(*args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr and "GiB" in proc.stderr
    limit = MAX_HISTORY_BYTES // (8 * len(TIMELINE_COLUMNS))
    assert f"{limit:,}" in proc.stderr


def interrupt_at(tick):
    """A patch for Simulation.step: Ctrl-C arrives during tick ``tick``."""
    step = Simulation.step

    def patched(sim):
        if sim.tick == tick:
            raise KeyboardInterrupt
        return step(sim)

    return patched


def test_ctrl_c_prints_the_summary_writes_the_partial_csv_and_exits_130(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out.csv"
    monkeypatch.setattr(Simulation, "step", interrupt_at(7))
    assert run_in_process("--ticks", "1000", "--csv", str(out)) == 130
    text, err = capsys.readouterr()
    assert "interrupted after 7 of 1000 ticks" in err and "Traceback" not in err
    assert "simulated 7 ticks" in text and f"timeline: {out} (7 ticks)" in text
    np.testing.assert_array_equal(Timeline.read_csv(out)["tick"], np.arange(7))


@pytest.mark.parametrize(("signals", "ticks"), [(1, 5), (2, 4)])
def test_one_sigint_finishes_the_tick_two_stop_at_once(
    tmp_path, monkeypatch, capsys, signals, ticks
):
    # the signal arrives in the middle of tick 4 (before its step runs)
    step = Simulation.step

    def signalled(sim):
        if sim.tick == 4:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
        return step(sim)

    out = tmp_path / "out.csv"
    monkeypatch.setattr(Simulation, "step", signalled)
    assert run_in_process("--ticks", "1000", "--csv", str(out)) == 130
    assert f"interrupted after {ticks} of 1000 ticks" in capsys.readouterr().err
    np.testing.assert_array_equal(Timeline.read_csv(out)["tick"], np.arange(ticks))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_ctrl_c_before_the_first_tick_exits_130_without_writing(tmp_path, monkeypatch, capsys):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out.csv"
    monkeypatch.setattr(Simulation, "__init__", interrupted)
    assert run_in_process("--ticks", "10", "--csv", str(out)) == 130
    assert "interrupted before the first tick" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("failure", "status"), [(OSError("disk full"), 1), (KeyboardInterrupt, 130)]
)
def test_a_failed_write_leaves_the_old_file_whole_and_the_summary_printed(
    tmp_path, monkeypatch, capsys, failure, status
):
    out = tmp_path / "out.csv"
    out.write_text("previous results\n")

    def half_written(self, f):
        f.write("tick,updates\n0,")
        raise failure

    monkeypatch.setattr(Timeline, "to_csv", half_written)
    assert run_in_process("--ticks", "3", "--csv", str(out)) == status
    text, err = capsys.readouterr()
    assert f"{out} not written" in err and "simulated 3 ticks" in text
    assert out.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # no temporary left


def test_the_csv_replaces_a_file_atomically_with_ordinary_permissions(tmp_path):
    out = tmp_path / "out.csv"
    simulate("--ticks", "3", "--csv", str(out))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    out.chmod(0o640)
    simulate("--ticks", "4", "--csv", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert len(Timeline.read_csv(out)["tick"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_a_real_sigint_from_the_terminal(tmp_path):
    # stderr on a pseudo-terminal shows the progress bar, so the test knows when ticks run
    out = tmp_path / "out.csv"
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # tqdm's width
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynattn",
            "simulate",
            *SMALL,
            "--ticks",
            "1000000000",
            "--history",
            "50",
            "--csv",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 120
    try:
        while not re.search(rb"\| *[1-9]\d*/1000000000", seen) and time.monotonic() < deadline:
            if select.select([leader], [], [], 1)[0]:
                seen += os.read(leader, 4096)
        assert re.search(rb"\| *[1-9]\d*/1000000000", seen), seen  # a tick is done
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
        with contextlib.suppress(OSError):
            while select.select([leader], [], [], 0.2)[0]:
                seen += os.read(leader, 4096)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert proc.returncode == 130
    assert b"Traceback" not in seen and b"interrupted after" in seen
    assert "simulated" in stdout and f"timeline: {out}" in stdout
    ticks = Timeline.read_csv(out)["tick"]
    assert 1 <= len(ticks) <= 50 and (np.diff(ticks) == 1).all()
