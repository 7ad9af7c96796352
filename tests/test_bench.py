"""The benchmark runs end to end at toy sizes and writes its figures with the expected keys."""

import argparse
import gc
import json
import math

import numpy as np
import pytest

from dynattn import LazyAttention, bench
from dynattn.strategies import OnDemand
from dynattn.workloads import make_qkv


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    parser = argparse.ArgumentParser()
    bench.add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--tiny", "--no-png", "--out", str(out)])
    assert bench.run_bench(args) == 0
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
    plan = bench.PLANS["tiny"]
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
    src = bench._Actions("entries", 32, 4, np.float64, seed=0)
    actions = src.take(20)
    positions = src.positions(2)
    timed = bench._drive(targets, actions, [4, 9], positions)
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
    src = bench._Actions("entries", 8, 2, np.float64, seed=0)
    actions = [(code, args) for code, args in src.take(5)]
    bench._drive(
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
    src = bench._Actions("entries", 8, 2, np.float64, seed=0)
    actions = [(code, args) for code, args in src.take(10)]
    bench._drive(
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

    src = bench._Actions("entries", 8, 2, np.float64, seed=0)
    assert gc.isenabled()
    bench._drive([_Probe()], src.take(4), [1], src.positions(1))
    assert seen and not any(seen)
    assert gc.isenabled()


def test_interleaved_pairs_on_demand_with_the_engine():
    Q, K, V = make_qkv("gaussian", 64, 4, seed=1)
    src = bench._Actions("hotspot", 64, 4, np.float64, seed=0)
    out = bench._interleaved(
        {"lazy cost": LazyAttention(Q, K, V), "on-demand": OnDemand(Q, K, V)}, src, 40, 100, 0.1
    )
    lazy, od = out["lazy cost"], out["on-demand"]
    assert lazy["queries"] == od["queries"] == 10
    assert lazy["threshold_end"] is not None and od["threshold_end"] is None
    assert "taking turns with on-demand" in lazy["method"]
    out = bench._interleaved({"on-demand": OnDemand(Q, K, V)}, src, 40, 100, 0.001)
    assert out["on-demand"]["queries"] == 0 and "8 queries after" in out["on-demand"]["method"]


def test_rows_stream_yields_row_rewrites_in_the_working_dtype():
    src = bench._Actions("rows", 16, 4, np.float32, seed=0)
    actions = src.take(40)
    assert len(actions) == 40 and {code for code, _ in actions} <= {2, 3}
    assert all(args[1].dtype == np.float32 and args[1].shape == (4,) for _, args in actions)


def test_readme_results_are_replaced_between_the_markers(tiny_run, tmp_path):
    out, res = tiny_run
    readme = tmp_path / "README.md"
    start, end = bench.README_MARKERS
    readme.write_text(f"# Title\n\n## Benchmark results\n\n{start}\nOLD RESULTS\n{end}\n\nAfter.\n")
    assert "updated" in bench.update_readme(readme, res)
    text = readme.read_text()
    assert "OLD RESULTS" not in text and text.startswith("# Title")
    assert text.endswith(f"{end}\n\nAfter.\n")
    assert "### Targets" in text and "### 4. Original demo" in text
    assert "### 1. Cost per" not in text  # the long tables stay in benchmarks/results
    assert bench.update_readme(readme, res) and readme.read_text() == text  # idempotent
    readme.write_text("no markers\n")
    assert "not updated" in bench.update_readme(readme, res)
    assert readme.read_text() == "no markers\n"
