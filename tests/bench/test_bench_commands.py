"""The benchmark commands of README's command table that start Ray and Serve, each run once as a
subprocess exactly as written there plus its smoke flag (``--quick``), and the bench package's
import graph. What they print and write is checked; no timing is."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
# a bounded wait: each command starts a local Ray and the demo app, then runs a handful of requests
COMMAND_TIMEOUT_S = 900


def _command(args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_serve_overhead_quick_prints_the_http_over_in_process_ratio(tmp_path):
    out = tmp_path / "serve-overhead.json"
    printed = _command(["bench/serve_overhead.py", "--quick", "--out", str(out)])
    assert "| thinking | in_process_ms | http_post_ms | http_post_and_fetch_ms | http_over_in_process |" in printed
    result = json.loads(out.read_text())
    assert result["repeats"] == 1 and result["request"]["inference_steps"] == 2
    rows = {row["thinking"]: row for row in result["rows"]}
    assert set(rows) == {True, False}
    for row in rows.values():
        assert row["in_process_ms"] > 0 and row["http_post_and_fetch_ms"] >= row["http_post_ms"] > 0
        ratio = row["http_post_and_fetch_ms"] / row["in_process_ms"]
        assert row["http_over_in_process"] == pytest.approx(ratio, abs=1e-3)
        assert f"| {row['thinking']} | {row['in_process_ms']} |" in printed


@pytest.mark.slow
def test_soak_quick_holds_the_load_without_server_errors(tmp_path):
    out = tmp_path / "soak.json"
    printed = _command(["-m", "bench.soak", "--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["server_errors"] == 0 and '"server_errors": 0' in printed
    assert summary["bound"] == 5 and summary["finished"] >= 4  # --quick holds until 4 have finished
    assert result["statuses"]["202"] >= summary["finished"]
    last = result["samples"][-1]  # the closing sample: every replica of the app was seen
    assert {"LMDeployment", "DiTDeployment", "Ingress"} <= {name.split(":")[-1].split(".")[0].split("#")[0]
                                                           for name in last["rss_mb"]}
    assert all(mb > 0 for mb in last["rss_mb"].values())
    assert 0 < summary["state_mb_max"] and summary["state_mb_last"] == last["state_mb"]


@pytest.mark.slow
def test_stream_quick_prints_first_audio_and_done(tmp_path):
    out = tmp_path / "stream.json"
    printed = _command(["-m", "bench.stream", "--quick", "--out", str(out)])
    row = json.loads(out.read_text())["row"]
    assert row["song_s"] == 20 and row["steps"] == 2
    assert 0 < row["first_audio_s"] <= row["stream_end_s"] <= row["done_s"]
    assert row["first_audio_over_done"] == pytest.approx(row["first_audio_s"] / row["done_s"], abs=1e-3)
    assert row["stream_samples"] == row["file_samples"] == 20 * 48000  # Ogg Opus: the file's length
    assert f"| {row['song_s']} | {row['steps']} | {row['first_audio_s']} |" in printed


@pytest.mark.slow
def test_cold_start_quick_times_a_request_sent_at_zero_beside_a_warm_one(tmp_path):
    out = tmp_path / "cold-start.json"
    printed = _command(["-m", "bench.cold_start", "--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["request"]["inference_steps"] == 2 and len(result["rows"]) == 1
    (row,) = result["rows"]
    # the idle app reached zero LM and DiT replicas, stayed there, and /ready said so
    ready = row["ready_at_zero"]
    assert ready["http_status"] == 200 and {"LMDeployment", "DiTDeployment"} <= set(ready["scaled_to_zero"]), ready
    assert ready["unavailable"] == []
    # the song sent then waited for the LM's cold start (the note in its events), and came back whole
    assert row["waited_for"].startswith("LMDeployment") and row["warm_waited_for"] == "-", row
    assert row["cold_phases"][-1] == "done" and abs(row["cold_audio_s"] - result["request"]["duration"]) < 0.5
    assert row["cold_s"] > 0 and row["warm_s"] > 0 and row["start_wait_s"] > 0
    assert result["median"]["cold_start_s"] == round(row["cold_s"] - row["warm_s"], 2)
    assert f"| 1 | {row['cold_s']} | {row['warm_s']} |" in printed


def test_soak_quick_leaves_the_recorded_results_alone():
    from bench.soak import parse_args

    assert parse_args(["--quick"]).out is None
    assert parse_args([]).out == Path("bench/results/soak-cpu.json")
    assert parse_args(["--quick", "--minutes", "1"]).minutes == 1 and parse_args([]).minutes == 5.0


def test_serve_overhead_needs_five_repeats_unless_quick(capsys):
    from bench.serve_overhead import parse_args

    assert parse_args([]).repeats == 5 and parse_args(["--quick"]).repeats == 1
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "2"])
    assert "--repeats must be at least 5" in capsys.readouterr().err


def _bench_imports(path: Path):
    """The bench modules a file imports, at module level or inside functions."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "bench":
                yield from (f"bench.{alias.name}" for alias in node.names if (BENCH / f"{alias.name}.py").exists())
            elif node.module.startswith("bench."):
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("bench."))


def test_bench_modules_import_no_cycle():
    graph = {f"bench.{path.stem}": set(_bench_imports(path)) for path in BENCH.glob("*.py")
             if path.stem != "__init__"}
    state = {}  # module -> "open" while on the walk's path, "done" after

    def walk(module, path):
        if state.get(module) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if state.get(module) == "done":
            return
        state[module] = "open"
        for imported in graph.get(module, ()):
            walk(imported, path + [module])
        state[module] = "done"

    for module in graph:
        walk(module, [])
    assert {"bench.lm", "bench.serving", "bench.dit_serving", "bench.adapters"} <= graph["bench.gpu"]


def test_soak_samples_only_the_ray_processes_it_started():
    """Two process trees each holding a process named like a Ray worker (as another Ray on the same
    machine would): only the one under the given root is sampled."""
    from bench.soak import ray_processes

    fake_worker = 'exec -a "ray::FakeWorker" sleep 60'
    trees = [subprocess.Popen(["bash", "-c", f"{fake_worker} & wait"], start_new_session=True) for _ in range(2)]
    try:
        def workers_under(root):
            return {pid for pid, name in ray_processes(root).items() if name == "ray::FakeWorker"}

        for _ in range(200):  # bounded wait for both trees to have started their worker
            mine, other = workers_under(trees[0].pid), workers_under(trees[1].pid)
            if mine and other:
                break
            time.sleep(0.05)
        assert len(mine) == 1 and len(other) == 1 and mine != other
        assert workers_under(os.getpid()) == mine | other
    finally:
        for tree in trees:
            os.killpg(tree.pid, signal.SIGKILL)  # the tree's own session: bash and its worker
            tree.wait()
