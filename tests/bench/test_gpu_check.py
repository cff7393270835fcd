"""scripts/gpu-check.sh, the one prepared GPU run: its dry run walks every step on this CPU machine
(wheels into a clean target, the packages the GPU machine lacks importable only from there, the
`gpu` marker's selection, the benchmark's results), its deadline is honoured, and every CUDA test
carries the marker."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bench import gpu

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
USES_CUDA = re.compile(r"""device=["']cuda|\.to\(["']cuda|\.cuda\(\)|Generator\(["']cuda|["']cuda["']\)""")


def _run(args, env=None, timeout=600):
    environment = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def local_wheels(tmp_path_factory):
    dest = tmp_path_factory.mktemp("wheels")
    done = _run(["scripts/gpu-wheels.sh", "--local", "--dest", str(dest)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f'carry: ["{dest}"]' in done.stdout
    return dest


def _gpu_marked(path: Path):
    """(test name, marked gpu) for each test function in a file, by reading its source."""
    tree = ast.parse(path.read_text())
    module_marked = any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
                        and "gpu" in ast.unparse(node.value) for node in tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            marked = module_marked or any("mark.gpu" in ast.unparse(d) for d in node.decorator_list)
            yield node, marked


def test_every_cuda_test_carries_the_gpu_marker_and_none_skips_on_its_own():
    gpu_tests = []
    for path in TESTS.rglob("test_*.py"):
        source = path.read_text()
        for node, marked in _gpu_marked(path):
            for decorator in map(ast.unparse, node.decorator_list):
                assert not ("skip" in decorator and "cuda" in decorator), f"{path.name}::{node.name}: {decorator}"
            body = ast.get_source_segment(source, node)
            if USES_CUDA.search(body):
                assert marked, f"{path.name}::{node.name} uses CUDA without the gpu marker"
            if marked:
                gpu_tests.append(node.name)
    assert {"test_cuda_graph_replay_equals_eager", "test_cuda_graph_engine_matches_eager_engine",
            "test_compiled_band_attention_matches_dense_on_cuda", "test_compiled_blocks_match_eager_on_cuda",
            "test_untiled_cuda_decode_equals_tiled", "test_generate_music_on_cuda"} <= set(gpu_tests)


def test_dry_run_walks_every_step_and_writes_the_results(local_wheels, tmp_path):
    out = tmp_path / "out"
    done = _run(["scripts/gpu-check.sh", "--dry-run", "--wheels", str(local_wheels), "--out", str(out),
                 "--sections", "encoders", "--deadline", "400"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    steps = (out / "steps.txt").read_text()
    assert f"installed {len(list(local_wheels.glob('*.whl')))} wheels" in steps
    assert "pytest exit 0" in steps and "bench exit 0" in steps
    assert "no CUDA device" in (out / "env.txt").read_text()
    # the gpu marker selected the CUDA tests (skipped here, one place) from the rooms without Ray
    suite = ET.parse(out / "gpu-tests.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) >= 7 and all(case.find("skipped") is not None for case in cases)
    assert {"test_generate_music_on_cuda", "test_cuda_graph_replay_equals_eager"} <= {c.get("name") for c in cases}
    results = json.loads((out / "gpu.json").read_text())
    assert results["tiny"] and set(results["sections"]) == {"encoders"}
    assert "| text_encoder_256_tokens_ms |" in (out / "gpu.md").read_text()


def test_dry_run_stops_where_the_device_would(tmp_path):
    """No wheels carried: the library cannot import diffusers, as on the bare GPU machine."""
    done = _run(["scripts/gpu-check.sh", "--dry-run", "--wheels", str(tmp_path / "none"), "--out",
                 str(tmp_path / "out"), "--deadline", "60"])
    assert done.returncode != 0
    assert "does not import" in (tmp_path / "out" / "steps.txt").read_text()


def test_a_tiny_deadline_is_honoured(local_wheels, tmp_path):
    out = tmp_path / "out"
    done = _run(["scripts/gpu-check.sh", "--dry-run", "--wheels", str(local_wheels), "--out", str(out),
                 "--deadline", "4"])
    steps = (out / "steps.txt").read_text()
    assert done.returncode != 0  # the CUDA tests did not finish: not a pass
    assert "watchdog: out of time" in steps and "no time left for the benchmarks" in steps


def test_section_watchdog_moves_on_to_the_next_section(tmp_path, monkeypatch):
    def slow(bench, dtype, iters):
        while True:  # Python work that never ends on its own
            time.sleep(0.01)

    def fast(bench, dtype, iters):
        bench.add("fast", {"ok": 1})

    monkeypatch.setitem(gpu.SECTIONS, "slow", slow)
    monkeypatch.setitem(gpu.SECTIONS, "fast", fast)
    monkeypatch.setitem(gpu.SECTION_CAPS_S, "slow", 0.3)
    monkeypatch.setitem(gpu.SECTION_CAPS_S, "fast", 30)
    bench = gpu.Bench(tmp_path / "gpu.json", 60, __import__("torch").device("cpu"), True)
    gpu.run_sections(bench, ["slow", "fast"], None, 1, 1.0)
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["skipped"] == ["slow: section cap"]
    assert results["sections"] == {"fast": [{"ok": 1}]}
