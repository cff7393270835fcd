"""`python -m bench.gpu --tiny` runs every section on CPU and writes JSON + markdown (no timing asserted)."""

from __future__ import annotations

import json

from bench.gpu import main


def test_bench_gpu_tiny_runs(tmp_path):
    out = tmp_path / "gpu.json"
    assert main(["--tiny", "--out", str(out), "--iters", "1", "--budget-s", "300"]) == 0
    results = json.loads(out.read_text())
    assert set(results["sections"]) == {"dit ms/forward", "vae decode", "encoders", "lm decode (transformers generate)",
                                        "generate_music end to end", "throughput (in-process batching engines)",
                                        "lm decode (our engines)"}
    throughput = results["sections"]["throughput (in-process batching engines)"][0]
    assert throughput["songs"] == 4 and throughput["max_lm_engine_batch"] > 1
    dit_rows = results["sections"]["dit ms/forward"]
    assert all(row["diffusers_dense_ms"] > 0 and row["ours_band_ms"] > 0 for row in dit_rows)
    assert "| song_s |" in out.with_suffix(".md").read_text()


def test_bench_gpu_deadline_still_writes_results(tmp_path):
    out = tmp_path / "gpu.json"
    assert main(["--tiny", "--out", str(out), "--iters", "1", "--budget-s", "0"]) == 0
    results = json.loads(out.read_text())
    assert results["skipped"] and results["sections"] == {}
