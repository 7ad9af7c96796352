"""The benchmark runs end to end at toy sizes and writes its figures with the expected keys."""

import argparse
import json
import math

import numpy as np
import pytest

from dynattn import bench
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
    assert {"meta", "updates", "builds", "queries", "query_baselines", "flush", "gemm_peak",
            "recompute", "lazy_vs_recompute", "demo", "memory", "targets", "notes"} <= set(res)
    machine = res["meta"]["machine"]
    assert machine["cpus"] >= 1 and machine["blas"] and "loadavg_end" in machine
    assert res["meta"]["mode"] == "tiny" and res["meta"]["d"] == 16


def test_every_cell_has_every_strategy(tiny_run):
    _, res = tiny_run
    plan = bench.PLANS["tiny"]
    strategies = {"on-demand", "eager O(nd)", "eager Ã", "lazy adaptive", "lazy cost",
                  "lazy error", "recompute"} | {f"lazy k={k}" for k in plan.ks}
    cells = {}
    for row in res["updates"]:
        key = (row["n"], row["dtype"], row["stream"], row["rate"])
        cells.setdefault(key, set()).add(row["strategy"])
        assert row["per_total"] >= row["per_update"] > 0
        assert math.isclose(row["per_total"], row["per_update"] + row["rate"] * row["per_query"],
                            rel_tol=1e-9) or row["strategy"] == "lazy cost"
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


def test_drive_times_updates_and_queries_apart():
    Q, K, V = make_qkv("gaussian", 32, 4)
    target = OnDemand(Q, K, V)
    src = bench._Actions("entries", 32, 4, np.float64, seed=0)
    actions = src.take(20)
    update_s, query_s = bench._drive(target, actions, [4, 9], src.positions(2))
    assert update_s > 0 and len(query_s) == 2
    ref = OnDemand(Q, K, V)
    for code, args in actions:
        (ref.update_k, ref.update_v)[code](*args)
    np.testing.assert_array_equal(target.K, ref.K)
    np.testing.assert_array_equal(target.V, ref.V)


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
