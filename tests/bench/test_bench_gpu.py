"""`python -m bench.gpu --tiny` runs every section on CPU and writes JSON + markdown; the serving
sections' own commands (README's `python -m bench.serving --quick`, `bench.dit_serving --quick`)
run their quick workload once each instead of through bench.gpu (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from bench.gpu import main
from bench.lm import SECTION as LM_SECTION, TINY_LABEL
from bench.serving import MIXED_SECTION, SHORT_SECTION, mixed_workload, percentile


def test_bench_gpu_tiny_runs(tmp_path):
    # lm-serving has its own test below (the same quick run, once)
    out = tmp_path / "gpu.json"
    assert main(["--tiny", "--out", str(out), "--iters", "1", "--budget-s", "300",
                 "--sections", "dit,vae,encoders,lm,e2e,samplers"]) == 0
    results = json.loads(out.read_text())
    assert set(results["sections"]) == {"dit ms/forward", "vae decode", "encoders", LM_SECTION,
                                        "generate_music end to end", "throughput (in-process batching engines)",
                                        "sampler step"}
    step = results["sections"]["sampler step"][0]
    assert step["heun_vs_euler"] > 1 and step["euler_ms"] > 0 and step["dcw_ms"] > 0
    throughput = results["sections"]["throughput (in-process batching engines)"][0]
    assert throughput["songs"] == 4 and throughput["lm_peak_rows_in_use"] > 2
    dit_rows = results["sections"]["dit ms/forward"]
    assert all(row["diffusers_dense_ms"] > 0 and row["ours_band_ms"] > 0 for row in dit_rows)
    lm_rows = results["sections"][LM_SECTION]
    assert [row["rows"] for row in lm_rows] == [2, 8] and all(row["model"] == TINY_LABEL for row in lm_rows)
    for row in lm_rows:
        assert {"generate_cfg_ms_per_step", "engine_ms_per_step", "plain_pt_ms_per_step",
                "speedup_vs_generate", "speedup_vs_plain"} <= set(row)
    assert "| song_s |" in out.with_suffix(".md").read_text()


def test_bench_serving_quick_runs_both_modes(tmp_path):
    from bench.serving import main as serving_main

    out = tmp_path / "serving.json"
    assert serving_main(["--quick", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["tiny"]  # demo models by default on a CPU
    sections = results["sections"]
    for name in (MIXED_SECTION, SHORT_SECTION):
        rows = {row["mode"]: row for row in sections[name]}
        assert set(rows) == {"engine service", "waves"}
        assert all(row["songs"] > 0 for row in rows.values())
    mixed = {row["mode"]: row for row in sections[MIXED_SECTION]}
    # both policies did the same work: every request came back with all its codes
    assert mixed["engine service"]["songs"] == mixed["waves"]["songs"] == mixed["waves"]["requests"]
    assert "songs_per_min_vs_waves" in mixed["engine service"]


def test_mixed_workload_is_fixed_and_spread():
    quick, full = mixed_workload(True), mixed_workload(False)
    assert quick == mixed_workload(True)
    assert len(full) == 16 and min(a.seconds for a in full) == 10 and max(a.seconds for a in full) == 240
    assert full[0].offset_s == 0.0 and max(a.offset_s for a in full) <= 4.0
    assert [a.offset_s for a in full] == sorted(a.offset_s for a in full)


def test_percentile_interpolates():
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert percentile([1.0, 2.0], 0.95) == pytest.approx(1.95)
    assert percentile([7.0], 0.95) == 7.0


def test_bench_gpu_deadline_still_writes_results(tmp_path):
    out = tmp_path / "gpu.json"
    assert main(["--tiny", "--out", str(out), "--iters", "1", "--budget-s", "0"]) == 0
    results = json.loads(out.read_text())
    assert results["skipped"] and results["sections"] == {}


def test_bench_dit_serving_quick_runs_both_modes(tmp_path):
    from bench.dit_serving import SECTION, main as dit_serving_main

    out = tmp_path / "dit-serving.json"
    assert dit_serving_main(["--quick", "--out", str(out)]) == 0
    assert f"### {SECTION}" in out.with_suffix(".md").read_text()
    rows = {row["mode"]: row for row in json.loads(out.read_text())["sections"][SECTION]}
    assert set(rows) == {"worker", "serial batch 1"}
    assert rows["worker"]["concurrent"] == rows["serial batch 1"]["concurrent"] == 4
    assert rows["worker"]["max_items_per_forward"] > 1 and rows["serial batch 1"]["max_items_per_forward"] == 1
    assert "songs_per_min_vs_serial" in rows["worker"]


def test_bench_adapters_reports_switch_cost_and_the_mixed_stream(tmp_path):
    # through bench.gpu: the section table's quick-when-tiny path (the same workload as --quick)
    from bench.adapters import SECTION as ADAPTERS_SECTION

    out = tmp_path / "gpu.json"
    assert main(["--tiny", "--out", str(out), "--budget-s", "300", "--sections", "adapters"]) == 0
    switch, mixed = json.loads(out.read_text())["sections"][ADAPTERS_SECTION]
    assert switch["load_s"] > 0 and switch["first_request_s"] > 0 and switch["warm_request_s"] > 0
    assert mixed["one_adapter_songs_per_min"] > 0 and mixed["four_adapters_songs_per_min"] > 0
    assert {"a1@1", "a2@1", "a3@1"} <= set(mixed["forwards_by_adapters"])  # each adapter ran its own forwards
