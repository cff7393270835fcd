"""Row reading and the manifest's resume rules, without Ray."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from pipelines.manifest import JOURNAL, Manifest, ManifestRecord, read_manifest
from acestep.validation import validate
from pipelines.rows import RowError, assign_ids, split_fields, to_request


def test_jsonl_lines_across_read_chunks_and_bad_lines(monkeypatch):
    """Lines split across read chunks come back whole, numbered as in the file; blank lines are no row."""
    import pipelines.source as source

    monkeypatch.setattr(source, "READ_CHUNK", 7)
    text = '{"id": "x", "caption": "a long caption"}\n\n{"caption": "b"}\r\n{oops\n[1, 2]\n\xff\n{"caption": "end"}'
    rows = list(source.jsonl_rows(io.BytesIO(text.encode("latin-1"))))
    assert [number for number, _, _ in rows] == [1, 3, 4, 5, 6, 7]
    assert rows[0][1:] == ({"id": "x", "caption": "a long caption"}, None)
    assert rows[1][1:] == ({"caption": "b"}, None)
    assert rows[2][1] is None and rows[2][2].startswith("line 4: invalid JSON")
    assert rows[3][2] == "line 5: expected a JSON object, got list"
    assert rows[4][2].startswith("line 6: not UTF-8")
    assert rows[5][1:] == ({"caption": "end"}, None)  # no newline at the end


def test_ids_default_to_the_position_and_bad_or_repeated_ids_are_bad_rows():
    ids = assign_ids([("x", None), (None, None), (None, "line 3: invalid JSON"), ("x", None), ("../evil", None)])
    assert [i for i, _ in ids] == ["x", "row-000001", "row-000002", "x.dup-000003", "row-000004"]
    assert ids[0][1] is None and ids[1][1] is None and "invalid JSON" in ids[2][1]
    assert "repeats" in ids[3][1] and "file-name safe" in ids[4][1]


def test_parquet_cells_missing_ones_take_defaults():
    assert split_fields({"id": "a", "caption": "x", "bpm": 90, "seed": 3}) == ("a", {"caption": "x", "bpm": 90, "seed": 3})
    own, fields = split_fields({"id": None, "caption": "y", "bpm": float("nan"), "seed": None})
    assert own is None and fields == {"caption": "y"}
    params, config = to_request({"caption": "x", "bpm": 90, "seed": 3})
    assert params.bpm == 90 and config.batch_size == 1 and config.use_random_seed is False
    params, config = to_request(fields)
    assert params.seed == -1 and config.use_random_seed is True


def test_unknown_field_is_a_row_error():
    try:
        to_request({"captoin": "x"})
    except RowError as error:
        assert "captoin" in str(error)
    else:
        raise AssertionError("expected RowError")


def test_manifest_resume_rules(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a_0.flac").write_bytes(b"x")
    manifest = Manifest(tmp_path)
    manifest.append(ManifestRecord(id="a", index=0, files=["audio/a_0.flac"], finished_at=1))
    manifest.append(ManifestRecord(id="b", index=1, error="ValidationError: bad", finished_at=1))
    manifest.append(ManifestRecord(id="c", index=2, files=["audio/c_0.flac"], finished_at=1))  # file missing
    with open(tmp_path / JOURNAL, "a") as handle:
        handle.write('{"id": "d", "ind')  # a killed writer's torn line
    records = Manifest(tmp_path).load()
    assert sorted(records) == ["a", "b", "c"]
    assert [manifest.is_complete(records[k]) for k in "abc"] == [True, False, False]
    manifest = Manifest(tmp_path)  # the next run retries b
    manifest.append(ManifestRecord(id="b", index=1, files=["audio/a_0.flac"], finished_at=2))
    final = manifest.finalize(["c", "b", "a"])
    assert [r.id for r in final] == ["c", "b", "a"] and final[1].error is None
    assert not (tmp_path / JOURNAL).exists()
    assert [json.loads(line)["id"] for line in (tmp_path / "manifest.jsonl").read_text().splitlines()] == ["c", "b", "a"]
    assert [row["id"] for row in read_manifest(tmp_path)] == ["c", "b", "a"]


def test_a_missing_lm_folder_is_one_line_before_ray_starts(tmp_path, jsonl, capsys, monkeypatch, demo_root):
    import pipelines.render as render
    from acestep.lm.constants import DEFAULT_LM_MODEL

    monkeypatch.setattr(render, "_ensure_ray", lambda: pytest.fail("Ray was started"))
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "caption": "x", "duration": 10}])
    args = ["--input", prompts, "--output", str(tmp_path / "out"), "--checkpoints", str(demo_root)]
    assert render.parse_options(args).lm == DEFAULT_LM_MODEL  # the folder the demo checkpoints hold
    assert render.main(args + ["--lm", "acestep-5Hz-lm-1.7B"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "acestep-5Hz-lm-1.7B" in line and f"LM folders in {demo_root}: {DEFAULT_LM_MODEL}" in line


def test_stage_resources_are_a_json_object_of_amounts(demo_root):
    from pipelines.render import parse_options

    args = ["--input", "p.jsonl", "--output", "out", "--checkpoints", str(demo_root)]
    options = parse_options(args + ["--lm-resources", '{"lm_gpu": 1}', "--dit-resources", '{"dit_gpu": 0.5}'])
    assert options.lm_resources == {"lm_gpu": 1.0} and options.dit_resources == {"dit_gpu": 0.5}
    assert parse_options(args).lm_resources == {}
    for bad in ('{"lm_gpu": "one"}', '["lm_gpu"]', "lm_gpu=1", '{"lm_gpu": -1}'):
        with pytest.raises(SystemExit):
            parse_options(args + ["--lm-resources", bad])


def test_items_with_stored_bytes_are_written_as_they_are(tmp_path, monkeypatch):
    """A Serve result carries each stored file's bytes: they are written unchanged, nothing encoded."""
    import io

    import numpy as np
    import soundfile as sf

    from acestep.params import GenerationResult
    from pipelines import stages

    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((48000 * 2, 2), dtype=np.float32), 48000, format="FLAC")
    encoded = buffer.getvalue()

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(stages, "save_audio", no_encoding)
    result = GenerationResult(audios=[{"tensor": None, "bytes": encoded, "sample_rate": 48000,
                                       "params": {"seed": 3, "audio_codes": ""}}])
    (tmp_path / "audio").mkdir()
    record = stages.finish_record(stages.new_record({"id": "x", "index": 0, "fields": {}}), result, tmp_path, "flac")
    assert (tmp_path / record.files[0]).read_bytes() == encoded and record.duration == 2.0


def test_rows_take_the_newer_upstream_fields_and_name_a_bad_one():
    from acestep.inference import prepare_request
    from acestep.validation import ValidationError

    params, config = to_request({"caption": "x", "sampler_mode": "heun", "dcw_enabled": False, "fade_out_duration": 2.0,
                                 "repaint_mode": "conservative", "retake_variance": 0.3, "audio_format": "opus"})
    assert (params.sampler_mode, params.dcw_enabled, params.fade_out_duration) == ("heun", False, 2.0)
    assert params.preset == "model" and config.audio_format == "opus"  # the DiT's preset fills the rest
    prepare_request(params, config)
    try:
        prepare_request(*to_request({"caption": "x", "dcw_wavelet": "db9"}))
    except ValidationError as error:
        assert error.field == "dcw_wavelet" and "haar" in str(error)
    else:
        raise AssertionError("a bad dcw_wavelet passed")


def test_a_parquet_list_cell_becomes_the_tracks_list():
    _, fields = split_fields({"task_type": "extract", "src_audio": "song.wav", "tracks": np.array(["vocals", "fx"])})
    params, config = to_request(fields)
    assert params.tracks == ["vocals", "fx"]
    validate(params, config)
