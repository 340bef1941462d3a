"""The benchmark runner keeps working: ``benchmarks/run.py --quick --tiny`` end to end.

Benchmarks are not timed tests (nothing here checks a speed target); this only keeps
the runner from rotting: it must start its own moto_server, run every workload on
both sides, count requests, and write a complete JSON report where it is told to.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
WORKLOADS = {"small_push", "cold_read", "incremental", "large", "local", "processes"} | (
    {"dask"} if importlib.util.find_spec("distributed") is not None else set()
)
SCALE_STEPS = {"write", "initial_push", "boto3_push", "warm_reopen", "cold_read", "cold_len", "push_one",
               "push_pct", "local_get", "update"}

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("moto") is None, reason="the benchmarks need moto_server"
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the runner once on tiny sizes; its parsed JSON report."""
    workdir = tmp_path_factory.mktemp("bench")
    out = workdir / "results.json"
    # The previous generation needs a venv installed from the package index: it is
    # pointed at one that does not exist, so the runner skips it (and says why).
    env = {**os.environ, "EBOOKLET_BENCH_PREVIOUS_VENV": str(workdir / "no-venv")}
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--quick", "--tiny", "--out", str(out)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, f"runner failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "targets met" in proc.stdout  # the table was printed
    # The plot is drawn when matplotlib is there (the bench extra), else skipped, said so.
    plotted = importlib.util.find_spec("matplotlib") is not None
    expected = ["results-scale.png", "results.json"] if plotted else ["results.json"]
    assert sorted(p.name for p in workdir.iterdir() if p.name != "no-venv") == expected
    assert ("plot in" if plotted else "no plot: matplotlib is not installed") in proc.stdout
    return json.loads(out.read_text())


def test_report_covers_every_workload_and_side(report: dict) -> None:
    assert report["mode"] == "tiny"
    assert set(report["workloads"]) == WORKLOADS | {"scale"}
    assert {row["workload"] for row in report["rows"]} == WORKLOADS | {"scale"}
    assert "no venv with ebooklet 0.11.1" in report["skipped"]["previous"]
    for name, workload in report["workloads"].items():
        if name == "scale":
            continue
        sides = set(workload["steps"]) - {"setup"}
        assert "ebooklet" in sides and len(sides) == 2, name
        for step in workload["steps"].values():
            assert step["peak_rss"] > 0


def test_every_row_is_a_finite_measurement(report: dict) -> None:
    for row in report["rows"]:
        assert math.isfinite(row["ebooklet"]) and row["ebooklet"] >= 0, row
        if row["ratio"] is not None:
            assert math.isfinite(row["ratio"]), row
        assert row["met"] in (True, False, None), row
    assert any(row["met"] is not None for row in report["rows"])


def test_phases_count_requests_from_the_server_log(report: dict) -> None:
    """Requests are counted per phase: remote phases send some, local-only ones none."""
    steps = {name: w["steps"] for name, w in report["workloads"].items() if name != "scale"}
    push = steps["small_push"]["ebooklet"]["phases"]["push"]
    assert push["requests"].get("PUT", 0) >= 3  # a pack, an index shard, the manifest
    assert steps["small_push"]["boto3"]["phases"]["one_put"]["requests"] == {"PUT": 1}
    n = report["sizes"]["small_n"]
    assert steps["small_push"]["boto3"]["phases"]["many_puts"]["requests"] == {"PUT": n}
    assert steps["cold_read"]["ebooklet"]["phases"]["warm_reopen"]["statuses"] == {"GET 304": 1}
    for phase in steps["local"]["ebooklet"]["phases"].values():
        assert phase["requests"] == {}


def test_workloads_move_the_bytes_they_claim(report: dict) -> None:
    sizes = report["sizes"]
    cold = report["workloads"]["cold_read"]["steps"]
    everything = sizes["small_n"] * sizes["small_size"]
    assert cold["ebooklet"]["phases"]["read_all_load_items"]["bytes"] == everything
    assert cold["boto3"]["phases"]["one_get"]["bytes"] == everything
    large = report["workloads"]["large"]["steps"]
    assert large["boto3"]["phases"]["pull"]["bytes"] == sizes["large_n"] * sizes["large_size"]
    assert large["ebooklet"]["phases"]["pull"]["values"] == sizes["large_n"]
    if "dask" in WORKLOADS:
        dask = report["workloads"]["dask"]["steps"]
        assert dask["ebooklet"]["phases"]["read"]["bytes"] == sizes["dask_n"] * sizes["dask_size"]
        assert dask["process"]["phases"]["read"]["values"] == sizes["dask_n"]


def test_scale_measures_every_phase_at_every_size(report: dict) -> None:
    """Each size ran every phase in its own process: time, peak RSS, requests, bytes."""
    scale = report["workloads"]["scale"]
    sizes = report["sizes"]["scale_sizes"]
    assert scale["sizes"] == sizes and len(sizes) >= 2
    for n in sizes:
        result = scale["by_n"][str(n)]
        assert set(result["steps"]) == SCALE_STEPS
        assert result["server_peak_rss"] > 0
        for step in result["steps"].values():
            assert step["peak_rss"] > 0
            for phase in step["phases"].values():
                assert phase["seconds"] >= 0
                assert {"requests", "net_down", "net_up", "peak_rss_after"} <= set(phase)
        steps = result["steps"]
        assert steps["write"]["phases"]["write_loop"]["keys"] == n
        assert steps["write"]["phases"]["write_loop"]["requests"] == {}  # local only
        push = steps["initial_push"]["phases"]["initial_push"]
        assert push["keys"] == n and push["net_up"] > n * report["sizes"]["scale_size"]
        boto3 = steps["boto3_push"]["phases"]["boto3_push"]
        assert boto3["requests"] == {"PUT": push["requests"]["PUT"]}
        assert boto3["bytes"] >= push["bytes_uploaded"]
        assert steps["warm_reopen"]["phases"]["warm_reopen"]["statuses"] == {"GET 304": 1}
        read = steps["cold_read"]["phases"]["cold_read_one"]
        assert read["value_bytes"] == report["sizes"]["scale_size"]
        assert read["net_down"] > read["value_bytes"]
        assert steps["cold_len"]["metrics"]["len_ok"]
        assert steps["push_one"]["phases"]["push_one"]["keys"] == 1
        assert steps["push_pct"]["phases"]["push_pct"]["keys"] == max(1, n // 100)
    metrics = {row["metric"].rsplit(",", 1)[0] for row in report["rows"]
               if row["workload"] == "scale"}
    assert {"local write loop", "push of 1 changed key", "initial push, peak RSS",
            "cold open", "cold read of 1 key, down beyond the value"} <= metrics
    assert "push of 1 changed key" in report["scale_table"]
