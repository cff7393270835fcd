"""Row reading and the manifest's resume rules, without Ray."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.manifest import JOURNAL, Manifest, ManifestRecord, read_manifest
from pipelines.rows import RowError, read_rows, to_request


def test_jsonl_rows_ids_and_bad_lines(tmp_path, jsonl):
    path = jsonl(tmp_path / "p.jsonl", [{"id": "x", "caption": "a"}, {"caption": "b"}, "{oops",
                                              {"id": "x", "caption": "dup"}, {"id": "../evil"}])
    rows = read_rows(path)
    assert [r.id for r in rows][:3] == ["x", "row-000001", "row-000002"]
    assert rows[0].error is None and rows[1].fields == {"caption": "b"}
    assert "invalid JSON" in rows[2].error
    assert "repeats" in rows[3].error and rows[3].id != "x"
    assert "file-name safe" in rows[4].error


def test_parquet_rows_missing_cells_take_defaults(tmp_path):
    table = pa.Table.from_pylist([{"id": "a", "caption": "x", "bpm": 90, "seed": 3},
                                  {"id": "b", "caption": "y", "bpm": None, "seed": None}])
    pq.write_table(table, tmp_path / "p.parquet")
    rows = read_rows(tmp_path / "p.parquet")
    assert rows[1].fields == {"caption": "y"}
    params, config = to_request(rows[0].fields)
    assert params.bpm == 90 and config.batch_size == 1 and config.use_random_seed is False
    params, config = to_request(rows[1].fields)
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
