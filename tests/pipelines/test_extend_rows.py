"""Extend rows in a Ray Data job (local Ray, demo checkpoints): a row extends its source, a row asking
for no extension fails alone with the field named."""

from __future__ import annotations

import soundfile as sf

from pipelines.manifest import read_manifest
from pipelines.render import main


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
