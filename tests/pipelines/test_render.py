"""The Ray Data job end to end on a local Ray (2 CPUs) and the tiny demo checkpoints.

One 12-row job (text2music, cover, repaint; 10 s and 12 s; fixed seeds) runs once in full; the same job
then runs again into a second folder in two parts (``--limit 5``, a simulated kill, the full rerun),
which checks resume (no duplicate, no missing row) and determinism (identical files) together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipelines.manifest import JOURNAL, MANIFEST_JSONL, read_manifest
from pipelines.render import main
from tests.conftest import write_tone

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--dit-actors", "2"]  # three actors (LM, 2 DiT) on 2 CPUs, each claiming its default share
README_RUN_BOUND_S = 600  # the README's command as its own driver, model loads included


def job_rows(source_audio: str):
    rows = []
    for i in range(12):
        row = {"id": f"song-{i:02d}", "caption": f"test song {i}", "duration": 10 if i % 2 else 12,
               "seed": 1000 + i, "batch_size": 1, "thinking": False}
        if i in (6, 7, 8):
            row.update(task_type="cover", src_audio=source_audio, audio_cover_strength=0.5)
        elif i in (9, 10, 11):
            row.update(task_type="repaint", src_audio=source_audio, repainting_start=2.0, repainting_end=6.0)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, source_audio):
    path = tmp_path_factory.mktemp("input") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in job_rows(source_audio)))
    return str(path)


def render(prompts, output, checkpoints, *extra) -> int:
    return main(["--input", prompts, "--output", str(output), "--checkpoints", str(checkpoints), "--no-lm",
                 *SMALL, *extra])


@pytest.fixture(scope="module")
def full_run(ray_session, prompts, demo_root, tmp_path_factory):
    output = tmp_path_factory.mktemp("full")
    assert render(prompts, output, demo_root) == 0
    return output


def test_twelve_rows_give_twelve_files_and_manifest(full_run):
    rows = read_manifest(full_run)
    assert [r["id"] for r in rows] == [f"song-{i:02d}" for i in range(12)]
    assert len((full_run / "manifest.jsonl").read_text().splitlines()) == 12
    for row in rows:
        assert row["error"] is None and row["seeds"] == [1000 + row["index"]]
        (name,) = row["files"]
        data, rate = sf.read(full_run / name)
        assert rate == 48000 and data.shape[1] == 2
        assert row["duration"] == pytest.approx(data.shape[0] / rate)
        assert row["time_costs"]["dit_total_time_cost"] > 0
        # the rows set no sampling fields: the turbo DiT's preset filled them, and turbo DCW is on
        assert row["preset"]["preset"] == "turbo" and row["preset"]["filled"] == {"shift": 3.0, "dcw_enabled": True,
                                                                           "guidance_scale": 1.0}
    durations = {row["index"]: row["duration"] for row in rows}
    assert durations[0] == pytest.approx(12.0) and durations[1] == pytest.approx(10.0)
    assert sorted(p.name for p in (full_run / "audio").iterdir()) == sorted(Path(r["files"][0]).name for r in rows)


def test_interrupted_run_resumes_without_duplicates_and_same_seeds_same_files(full_run, prompts, demo_root,
                                                                               tmp_path, capsys):
    assert render(prompts, tmp_path, demo_root, "--limit", "5") == 1  # stopped part-way
    assert len(read_manifest(tmp_path)) == 5
    # What a kill leaves behind: a torn journal line and a half-written file of a later row.
    (tmp_path / JOURNAL).write_text('{"id": "song-07", "files": ["audio/so')
    (tmp_path / "audio" / ".song-07_0.flac.part").write_bytes(b"partial")
    capsys.readouterr()
    assert render(prompts, tmp_path, demo_root) == 0
    assert "7 rows done, 0 failed, 5 skipped (of 12)" in capsys.readouterr().out
    rows = read_manifest(tmp_path)
    assert [r["id"] for r in rows] == [f"song-{i:02d}" for i in range(12)]
    assert all(r["error"] is None for r in rows)
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == 12
    assert not (tmp_path / JOURNAL).exists()
    for row in rows:  # fixed seeds: the uninterrupted run's audio (rows shared other DiT batches: fp32 rounding)
        (name,) = row["files"]
        resumed, full = sf.read(tmp_path / name)[0], sf.read(full_run / name)[0]
        assert resumed.shape == full.shape and abs(resumed - full).max() <= 2e-4, name
    # A rerun of a complete job renders nothing.
    capsys.readouterr()
    assert render(prompts, tmp_path, demo_root) == 0
    assert "0 rows done, 0 failed, 12 skipped" in capsys.readouterr().out


def test_bad_rows_fail_alone_and_the_lm_plans_the_good_one(ray_session, demo_root, tmp_path, jsonl, capsys):
    """Through the ``acestep render`` CLI, with the demo 5 Hz LM planning the one good row."""
    from acestep.cli import main as acestep_main

    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all")
    prompts = jsonl(tmp_path / "prompts.jsonl", [
        {"id": "good", "caption": "lofi piano", "duration": 10, "seed": 5, "thinking": True},
        {"id": "bad-steps", "caption": "x", "duration": 10, "inference_steps": 500, "thinking": False},
        {"id": "bad-audio", "task_type": "repaint", "src_audio": str(garbage), "duration": 10},
        {"id": "bad-field", "caption": "x", "captoin": "typo"},
        "{not json",
    ])
    output = tmp_path / "out"
    code = acestep_main(["render", "--input", prompts, "--output", str(output), "--", "--checkpoints", str(demo_root),
                         "--lm", "acestep-5Hz-lm-0.6B", *SMALL])
    assert code == 1
    assert "1 rows done, 4 failed" in capsys.readouterr().out
    rows = {r["id"]: r for r in read_manifest(output)}
    assert list(rows) == ["good", "bad-steps", "bad-audio", "bad-field", "row-000004"]
    good = rows["good"]
    assert good["error"] is None and sf.read(output / good["files"][0])[0].shape[1] == 2
    assert good["lm_metadata"] and good["codes"][0].startswith("<|audio_code_")
    assert good["time_costs"]["lm_total_time"] > 0
    assert "inference_steps" in rows["bad-steps"]["error"]
    assert "src_audio" in rows["bad-audio"]["error"] and "readable" in rows["bad-audio"]["error"]
    assert "captoin" in rows["bad-field"]["error"]
    assert "invalid JSON" in rows["row-000004"]["error"]
    assert all(not rows[k]["files"] for k in rows if k != "good")
    assert sorted(p.name for p in (output / "audio").iterdir()) == ["good_0.flac"]


def test_via_serve_sends_rows_to_a_running_app(ray_session, tmp_path, jsonl):
    """A tiny in-test app with the ingress's Python method ``generate(params, config, include_tensors)``."""
    from ray import serve

    from acestep.params import GenerationResult

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class FakeIngress:
        async def generate(self, params, config, include_tensors=True, explicit=None):
            import torch

            from acestep.inference import prepare_request

            try:
                params, config, seeds = prepare_request(params, config)
            except ValueError as error:
                return GenerationResult(success=False, error=str(error), status_message=f"Error: {error}")
            t = torch.arange(int(params.duration * 48000)) / 48000
            audios = [{"path": "", "tensor": torch.stack([torch.sin(t * 440 + s % 7)] * 2) * 0.1, "key": str(s),
                       "sample_rate": 48000, "params": {**params.to_dict(), "seed": s, "audio_codes": "<|audio_code_1|>"}}
                      for s in seeds]
            return GenerationResult(audios=audios, extra_outputs={"lm_metadata": {"bpm": 120},
                                                                  "time_costs": {"pipeline_total_time": 0.1}})

    serve.start(proxy_location="Disabled")
    serve.run(FakeIngress.bind(), name="fake-acestep", route_prefix=None)
    prompts = jsonl(tmp_path / "prompts.jsonl", [
        {"id": "one", "caption": "a", "duration": 10, "seed": 7, "batch_size": 2},
        {"id": "two", "caption": "b", "duration": 10, "bpm": 999},
    ])
    assert main(["--input", prompts, "--output", str(tmp_path / "out"), "--via-serve", "fake-acestep"]) == 1
    rows = {r["id"]: r for r in read_manifest(tmp_path / "out")}
    assert rows["one"]["error"] is None and rows["one"]["seeds"] == [7, 8]
    assert rows["one"]["files"] == ["audio/one_0.flac", "audio/one_1.flac"]
    assert rows["one"]["lm_metadata"] == {"bpm": 120} and rows["one"]["duration"] == pytest.approx(10.0)
    assert all(sf.read(tmp_path / "out" / name)[0].shape == (480000, 2) for name in rows["one"]["files"])
    assert "bpm" in rows["two"]["error"] and rows["two"]["files"] == []


def test_lm_rows_stream_through_the_engine(ray_session, demo_root, tmp_path, jsonl):
    """One LM actor with 4 rows in flight: the three short rows leave the LM (and reach the manifest)
    while the long one is still decoding, instead of the four finishing together as one block."""
    rows = [{"id": "long", "caption": "long ambient piece", "duration": 120, "seed": 1, "thinking": True}]
    rows += [{"id": f"short-{i}", "caption": f"short jingle {i}", "duration": 10, "seed": 2 + i, "thinking": True}
             for i in range(3)]
    prompts = jsonl(tmp_path / "prompts.jsonl", rows)
    output = tmp_path / "out"
    assert main(["--input", prompts, "--output", str(output), "--checkpoints", str(demo_root),
                 "--lm-rows-in-flight", "4", *SMALL]) == 0
    planned = {r["id"]: r["planned_at"] for r in read_manifest(output)}
    assert set(planned) == {r["id"] for r in rows} and all(planned.values())
    assert max(planned, key=planned.get) == "long", planned  # the order the LM finished them, not a time


def test_readme_command_with_default_cpus_finishes_on_two_cpus(ray_session, demo_root, tmp_path, jsonl):
    """``acestep render --input … --output … --checkpoints …`` as the README writes it (default LM, no CPU
    options), as its own driver on this module's 2-CPU Ray: the pools' default claims leave room for the
    read tasks, so every row reaches the manifest (claims of one CPU per actor left none: no row, ever)."""
    prompts = jsonl(tmp_path / "prompts.jsonl", [
        {"id": "planned", "caption": "lofi piano", "duration": 10, "seed": 11, "thinking": True},
        {"id": "plain", "caption": "jazz trio", "duration": 10, "seed": 12, "thinking": False},
    ])
    output = tmp_path / "out"
    command = [sys.executable, "-m", "acestep.cli", "render", "--input", prompts, "--output", str(output),
               "--checkpoints", str(demo_root)]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=README_RUN_BOUND_S)
    except subprocess.TimeoutExpired as expired:  # its output comes back as bytes, whatever text= says
        log = (expired.stderr or b"").decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr
        raise AssertionError(f"the job ran past {README_RUN_BOUND_S} s:\n{(log or '')[-4000:]}") from None
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "2 rows done, 0 failed, 0 skipped (of 2)" in done.stdout
    rows = {r["id"]: r for r in read_manifest(output)}
    assert list(rows) == ["planned", "plain"] and all(r["error"] is None for r in rows.values())
    for row in rows.values():
        (name,) = row["files"]
        assert sf.read(output / name)[0].shape == (480000, 2)
    assert rows["planned"]["codes"][0].startswith("<|audio_code_")  # the default LM planned it


def test_a_cpu_dit_stage_renders_one_row_per_forward(ray_session, demo_root, tmp_path):
    from pipelines.stages import DiTStage

    stage = DiTStage(str(demo_root), str(tmp_path), device="cpu")
    try:
        assert stage.handler.worker.batch.limits.max_forward_rows == 1
    finally:
        stage.handler.loop.close()


def test_a_tracks_row_writes_a_labelled_file_per_track_and_song(ray_session, demo_root, tmp_path, jsonl):
    source = write_tone(tmp_path / "song.wav", 6.0)
    common = {"task_type": "extract", "src_audio": source, "inference_steps": 2, "seed": 5}
    prompts = jsonl(tmp_path / "prompts.jsonl", [
        {"id": "stems", **common, "tracks": ["bass", "vocals"], "batch_size": 2},
        {"id": "bad", **common, "tracks": ["kazoo"]},
        {"id": "plain", **common, "instruction": "Extract the BASS track from the audio:"},
    ])
    output = tmp_path / "out"
    code = main(["--input", prompts, "--output", str(output), "--checkpoints", str(demo_root), "--no-lm",
                 "--dit-config", "acestep-v15-base"])
    assert code == 1  # the bad row
    rows = {row["id"]: row for row in read_manifest(output)}
    stems = rows["stems"]
    assert stems["error"] is None
    assert stems["tracks"] == ["bass", "bass", "vocals", "vocals"] and stems["seeds"] == [5, 6, 5, 6]
    audio = [sf.read(output / name, dtype="float32")[0] for name in stems["files"]]
    assert len(audio) == 4 and all(a.shape == (6 * 48000, 2) for a in audio)
    assert rows["plain"]["tracks"] is None
    assert np.allclose(sf.read(output / rows["plain"]["files"][0], dtype="float32")[0], audio[0], atol=1e-4)
    assert "tracks" in rows["bad"]["error"] and not rows["bad"]["files"]
    journal = [json.loads(line) for line in (output / MANIFEST_JSONL).read_text().splitlines()]
    assert {r["id"]: r["tracks"] for r in journal}["stems"] == stems["tracks"]


def test_an_extend_row_renders_source_plus_extension(ray_session, demo_root, source_audio, tmp_path, jsonl):
    prompts = jsonl(tmp_path / "prompts.jsonl", [
        {"id": "longer", "task_type": "extend", "src_audio": source_audio, "extend_left_s": 2.0,
         "extend_right_s": 3.0, "caption": "warm pads", "seed": 11, "audio_format": "wav"},
        {"id": "nothing", "task_type": "extend", "src_audio": source_audio, "seed": 12},
    ])
    output = tmp_path / "out"
    code = main(["--input", prompts, "--output", str(output), "--checkpoints", str(demo_root), "--no-lm",
                 "--dit-actors", "1"])
    assert code == 1  # one bad row
    rows = {row["id"]: row for row in read_manifest(output)}
    assert rows["longer"]["error"] is None
    (name,) = rows["longer"]["files"]
    data, rate = sf.read(output / name, always_2d=True)
    source, _ = sf.read(source_audio, always_2d=True)
    assert rate == 48000 and data.shape == (source.shape[0] + 5 * 48000, 2)
    assert "extend_right_s" in rows["nothing"]["error"] and "> 0" in rows["nothing"]["error"]
