"""The job's input read by Ray Data read tasks: ids and bad lines as the rows give them, Parquet cells
as typed, a folder of part files behind a filesystem URI, and done rows dropped before any stage."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.source import input_keys, pending_rows


def _rows(paths, keys):
    return sorted((json.loads(item["row"]) for item in pending_rows(paths, keys, len(keys)).iter_rows()),
                  key=lambda row: row["index"])


def test_jsonl_ids_bad_lines_and_fields(ray_session, tmp_path, jsonl):
    path = jsonl(tmp_path / "p.jsonl", [{"id": "x", "caption": "a", "seed": 7}, {"caption": "b"}, "{oops",
                                        {"id": "x", "caption": "dup"}, {"id": "../evil"}])
    keys = input_keys(path)
    assert [k.id for k in keys] == ["x", "row-000001", "row-000002", "x.dup-000003", "row-000004"]
    assert [k.position for k in keys] == [1, 2, 3, 4, 5] and [k.index for k in keys] == [0, 1, 2, 3, 4]
    assert keys[0].error is None and keys[1].error is None
    assert "line 3: invalid JSON" in keys[2].error
    assert "repeats" in keys[3].error and "file-name safe" in keys[4].error
    rows = _rows(path, keys)
    assert [r["id"] for r in rows] == [k.id for k in keys]
    assert rows[0]["fields"] == {"caption": "a", "seed": 7} and rows[1]["fields"] == {"caption": "b"}
    assert rows[2]["fields"] == {} and [r["error"] for r in rows] == [k.error for k in keys]


def test_parquet_cells_keep_their_types_and_missing_ones_take_defaults(ray_session, tmp_path):
    table = pa.Table.from_pylist([{"id": "a", "caption": "x", "bpm": 90, "seed": 3},
                                  {"id": "b", "caption": "y", "bpm": None, "seed": None}])
    pq.write_table(table, tmp_path / "p.parquet")
    keys = input_keys(str(tmp_path / "p.parquet"))
    rows = _rows(str(tmp_path / "p.parquet"), keys)
    assert [r["id"] for r in rows] == ["a", "b"] and all(r["error"] is None for r in rows)
    assert rows[0]["fields"] == {"caption": "x", "bpm": 90, "seed": 3}  # an int column with a gap stays int
    assert rows[1]["fields"] == {"caption": "y"}


def test_a_folder_of_part_files_behind_a_uri_in_path_order(ray_session, tmp_path, jsonl):
    parts = tmp_path / "prompts"
    parts.mkdir()
    jsonl(parts / "part-1.jsonl", [{"caption": "c"}, {"caption": "d"}])
    pq.write_table(pa.Table.from_pylist([{"caption": "a"}, {"caption": "b"}]), parts / "part-0.parquet")
    (parts / "notes.txt").write_text("not a prompts file\n")
    keys = input_keys(parts.as_uri())  # file://...: resolved to its filesystem like s3://
    assert [k.id for k in keys] == [f"row-{i:06d}" for i in range(4)]
    assert [(k.source.rsplit("/", 1)[-1], k.position) for k in keys] == [
        ("part-0.parquet", 1), ("part-0.parquet", 2), ("part-1.jsonl", 1), ("part-1.jsonl", 2)]
    assert [r["fields"]["caption"] for r in _rows(parts.as_uri(), keys)] == ["a", "b", "c", "d"]


def test_only_pending_rows_reach_the_stages_one_per_block(ray_session, tmp_path, jsonl):
    path = jsonl(tmp_path / "p.jsonl", [{"id": f"r{i}", "caption": str(i)} for i in range(6)])
    keys = input_keys(path)
    pending = [k for k in keys if k.id not in {"r1", "r4"}]
    ds = pending_rows(path, pending, len(keys)).materialize()
    assert sorted(json.loads(r["row"])["id"] for r in ds.iter_rows()) == ["r0", "r2", "r3", "r5"]
    blocks = [ray_session.get(ref).num_rows for ref in ds.to_arrow_refs()]
    assert [n for n in blocks if n] == [1, 1, 1, 1], blocks  # a filtered-out block may stay, empty
