"""Stems in the Ray Data job: a row naming ``tracks`` writes one file per track and song, and its
manifest row names each file's track; a bad ``tracks`` fails that row alone."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from acestep.validation import validate
from pipelines.manifest import MANIFEST_JSONL, read_manifest
from pipelines.render import main
from pipelines.rows import split_fields, to_request
from tests.conftest import write_tone


def test_a_parquet_list_cell_becomes_the_tracks_list():
    _, fields = split_fields({"task_type": "extract", "src_audio": "song.wav", "tracks": np.array(["vocals", "fx"])})
    params, config = to_request(fields)
    assert params.tracks == ["vocals", "fx"]
    validate(params, config)


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
