"""The benchmark runs end to end at toy sizes and writes its figures with the expected keys;
its drivers time what they should; a section is added by one module and its registration."""

import gc
import json
import math
import sys
import types

import numpy as np
import pytest

from benchmarks import cli, report, timing
from benchmarks.collect import collect
from benchmarks.plans import PLANS
from benchmarks.section import Run, Section
from benchmarks.section import target as make_target
from benchmarks.sections import SECTIONS, load
from dynattn import LazyAttention
from dynattn.strategies import OnDemand
from dynattn.workloads import make_qkv


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(["--tiny", "--no-png", "--out", str(out)]) == 0
    return out, json.loads((out / "bench-tiny.json").read_text())


def test_json_has_every_section_and_the_machine(tiny_run):
    _, res = tiny_run
    assert {
        "meta",
        "updates",
        "builds",
        "queries",
        "query_baselines",
        "flush",
        "gemm_peak",
        "recompute",
        "lazy_vs_recompute",
        "demo",
        "memory",
        "targets",
        "notes",
    } <= set(res)
    machine = res["meta"]["machine"]
    assert machine["cpus"] >= 1 and machine["blas"] and "loadavg_end" in machine
    assert res["meta"]["mode"] == "tiny" and res["meta"]["d"] == 16


def test_every_cell_has_every_strategy(tiny_run):
    _, res = tiny_run
    plan = PLANS["tiny"]
    strategies = {
        "on-demand",
        "eager O(nd)",
        "eager Ã",
        "lazy adaptive",
        "lazy cost",
        "lazy error",
        "recompute",
    } | {f"lazy k={k}" for k in plan.ks}
    cells = {}
    for row in res["updates"]:
        key = (row["n"], row["dtype"], row["stream"], row["rate"])
        cells.setdefault(key, set()).add(row["strategy"])
        assert row["per_total"] >= row["per_update"] > 0
        if row["strategy"] in ("lazy cost", "on-demand"):  # timed in turns, real queries
            assert row["method"].startswith("interleaved") and "taking turns" in row["method"]
        else:
            assert math.isclose(
                row["per_total"], row["per_update"] + row["rate"] * row["per_query"], rel_tol=1e-9
            ), row
    assert len(cells) == len(plan.update_ns) * len(plan.dtypes) * 3 * 3
    assert all(found == strategies for found in cells.values())


def test_other_sections_have_their_figures(tiny_run):
    out, res = tiny_run
    assert [q["pending"] for q in res["queries"] if q["dtype"] == "float64"] == [1, 8, 64]
    assert {"single_s", "batch1000_s", "row_s"} <= set(res["queries"][0])
    flush = res["flush"][0]
    assert flush["flush_gflops"] > 0 and flush["gemm_gflops"] > 0 and flush["exp_s"] > 0
    assert res["demo"]["original_rule_s"] > 0 and res["demo"]["default_policy_speedup"] > 0
    assert res["memory"]["engine"]["peak_rss_mb"] > 0, res["memory"]["engine"]
    assert res["memory"]["dashboard"][0]["tick_s"] > 0, res["memory"]["dashboard"]
    assert {t["status"] for t in res["targets"]} <= {"PASS", "MISS", "SKIP"}
    md = (out / "results-tiny.md").read_text()
    assert "### Targets" in md and "| n " in md
    for name in ("cost_vs_k", "query_latency", "strategies"):
        assert (out / f"{name}-tiny.html").stat().st_size > 10_000


class _Recorder:
    """A strategy that notes the order of the calls it gets."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getattr__(self, method):
        return lambda *args: self.calls.append((self.name, method))


def test_drive_times_updates_and_queries_apart():
    Q, K, V = make_qkv("gaussian", 32, 4)
    targets = [OnDemand(Q, K, V), LazyAttention(Q, K, V, policy=3)]
    src = timing.Actions("entries", 32, 4, np.float64, seed=0)
    actions = src.take(20)
    positions = src.positions(2)
    timed = timing.drive(targets, actions, [4, 9], positions)
    ref = OnDemand(Q, K, V)
    for code, args in actions:
        (ref.update_k, ref.update_v)[code](*args)
    for target, (update_s, query_s) in zip(targets, timed, strict=True):
        assert update_s > 0 and len(query_s) == 2
        np.testing.assert_array_equal(target.K, ref.K)
        np.testing.assert_array_equal(target.V, ref.V)


def _turns(calls) -> list:
    """The calls recorded by _Recorder, runs of the same (target, kind) merged."""
    seen = [(who, "query" if what == "query" else "update") for who, what in calls]
    turns = [seen[0]]
    for step in seen[1:]:
        if step != turns[-1]:
            turns.append(step)
    return turns


def test_drive_lets_targets_take_turns_in_alternating_order():
    calls = []
    src = timing.Actions("entries", 8, 2, np.float64, seed=0)
    actions = [(code, args) for code, args in src.take(5)]
    timing.drive(
        [_Recorder("a", calls), _Recorder("b", calls)], actions, [1, 3], src.positions(2), turn=1
    )
    # updates 0-1 then a query, 2-3 and a query, then update 4: a, b, then b, a, then a, b
    assert _turns(calls) == [
        ("a", "update"),
        ("a", "query"),
        ("b", "update"),
        ("b", "query"),
        ("b", "update"),
        ("b", "query"),
        ("a", "update"),
        ("a", "query"),
        ("a", "update"),
        ("b", "update"),
    ]
    assert calls.count(("a", "update_k")) + calls.count(("a", "update_v")) == 5


def test_drive_turns_last_at_least_turn_updates_up_to_a_query():
    calls = []
    src = timing.Actions("entries", 8, 2, np.float64, seed=0)
    actions = [(code, args) for code, args in src.take(10)]
    timing.drive(
        [_Recorder("a", calls), _Recorder("b", calls)],
        actions,
        [1, 3, 5, 7],
        src.positions(4),
        turn=4,
    )
    # turns: updates 0-3 with two queries, 4-7 with two, then 8-9 (a turn ends at a query)
    both = [("a", "update"), ("a", "query")] * 2, [("b", "update"), ("b", "query")] * 2
    assert _turns(calls) == (
        both[0] + both[1] + both[1] + both[0] + [("a", "update"), ("b", "update")]
    )
    assert sum(who == "b" and what != "query" for who, what in calls) == 10


def test_drive_pauses_the_cycle_collector_while_it_times():
    seen = []

    class _Probe:
        def __getattr__(self, method):
            return lambda *args: seen.append(gc.isenabled())

    src = timing.Actions("entries", 8, 2, np.float64, seed=0)
    assert gc.isenabled()
    timing.drive([_Probe()], src.take(4), [1], src.positions(1))
    assert seen and not any(seen)
    assert gc.isenabled()


def test_interleaved_pairs_on_demand_with_the_engine():
    Q, K, V = make_qkv("gaussian", 64, 4, seed=1)
    src = timing.Actions("hotspot", 64, 4, np.float64, seed=0)
    out = timing.interleaved(
        {"lazy cost": LazyAttention(Q, K, V), "on-demand": OnDemand(Q, K, V)}, src, 40, 100, 0.1
    )
    lazy, od = out["lazy cost"], out["on-demand"]
    assert lazy["queries"] == od["queries"] == 10
    assert lazy["threshold_end"] is not None and od["threshold_end"] is None
    assert "taking turns with on-demand" in lazy["method"]
    out = timing.interleaved({"on-demand": OnDemand(Q, K, V)}, src, 40, 100, 0.001)
    assert out["on-demand"]["queries"] == 0 and "8 queries after" in out["on-demand"]["method"]


def test_rows_stream_yields_row_rewrites_in_the_working_dtype():
    src = timing.Actions("rows", 16, 4, np.float32, seed=0)
    actions = src.take(40)
    assert len(actions) == 40 and {code for code, _ in actions} <= {2, 3}
    assert all(args[1].dtype == np.float32 and args[1].shape == (4,) for _, args in actions)


def test_readme_results_are_replaced_between_the_markers(tiny_run, tmp_path):
    _out, res = tiny_run
    readme = tmp_path / "README.md"
    start, end = report.README_MARKERS
    readme.write_text(f"# Title\n\n## Benchmark results\n\n{start}\nOLD RESULTS\n{end}\n\nAfter.\n")
    assert "updated" in report.update_readme(readme, res)
    text = readme.read_text()
    assert "OLD RESULTS" not in text and text.startswith("# Title")
    assert text.endswith(f"{end}\n\nAfter.\n")
    assert "### Targets" in text and "### 4. Original demo" in text
    assert "### 1. Cost per" not in text  # the long tables stay in benchmarks/results
    assert report.update_readme(readme, res) and readme.read_text() == text  # idempotent
    readme.write_text("no markers\n")
    assert "not updated" in report.update_readme(readme, res)
    assert readme.read_text() == "no markers\n"


def test_every_registered_section_loads_in_order():
    sections = load()
    assert [s.name for s in sections] == list(SECTIONS)
    assert all(isinstance(s, Section) for s in sections)


def _section_module(monkeypatch, name, section):
    """Register a module ``benchmarks.sections.<name>`` holding ``SECTION = section``."""
    module = types.ModuleType(f"benchmarks.sections.{name}")
    module.SECTION = section
    monkeypatch.setitem(sys.modules, module.__name__, module)


def test_a_section_is_one_module_and_its_registration(monkeypatch):
    seen = {}

    def measure(run: Run) -> dict:
        seen["plan"] = run.plan
        run.log("sustained play")
        run.notes.append("played on")
        return {"play": {"frames": 3}}

    def targets(res, plan):
        return [
            make_target("Three frames", "PASS" if res["play"]["frames"] == 3 else "MISS", "3", "3")
        ]

    def render(res, summary):
        return [] if summary else ["### 7. Sustained play", f"{res['play']['frames']} frames"]

    _section_module(monkeypatch, "play", Section("play", measure, targets, render))
    sections = load(("play",))
    lines = []
    res = collect(PLANS["tiny"], lines.append, sections)
    assert seen["plan"] is PLANS["tiny"] and "sustained play" in lines
    assert res["play"] == {"frames": 3} and res["notes"] == ["played on"]
    assert [(t["target"], t["status"]) for t in res["targets"]] == [("Three frames", "PASS")]
    md = report.render_markdown(res, sections=sections)
    assert "| Three frames | 3" in md and "### 7. Sustained play\n\n3 frames" in md
    assert "### 7." not in report.render_markdown(res, summary=True, sections=sections)
    assert md.rstrip().endswith("Notes: played on")


def test_sections_cannot_overwrite_entries_or_skip_their_declaration(monkeypatch):
    _section_module(monkeypatch, "greedy", Section("greedy", lambda run: {"notes": []}))
    with pytest.raises(ValueError, match=r"greedy.*notes"):
        collect(PLANS["tiny"], lambda line: None, load(("greedy",)))
    _section_module(monkeypatch, "bare", "not a Section")
    with pytest.raises(TypeError, match="bare must define SECTION"):
        load(("bare",))
    with pytest.raises(ValueError, match="unique"):
        load(("demo", "demo"))
    with pytest.raises(ValueError, match="status"):
        make_target("x", "OK", "1", "1")
