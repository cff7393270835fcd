"""The job's input on Ray Data: prompts files are read and parsed by read tasks on the cluster; the
driver only ever holds each row's place, id and read error (for ids, resume and the manifest's order).

``--input`` is anything Ray Data's file readers take: a file, a directory of part files, and URIs of
pyarrow / fsspec filesystems (``s3://bucket/prompts/``, ``gs://...``; credentials from the environment).
Files ending in ``.jsonl`` / ``.json`` / ``.ndjson`` hold one JSON object per line, ``.parquet`` files
one row per record; a directory may mix them. Rows are ordered by file path, then position.

Why a datasource of its own rather than ``read_json`` / ``read_parquet``: a row's default id is its
position in the input and a bad line is that row's error, not the job's. ``read_json(lines=True)``
parses through pandas (an integer column with one missing cell turns to floats, so seed 7 becomes 7.0;
one malformed line fails the whole file), and neither reader tells where a row sits in its file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ray.data.datasource import FileBasedDatasource

from pipelines.rows import InputRow, assign_ids, parse_line, split_fields

JSONL_EXTENSIONS = ("jsonl", "json", "ndjson")
EXTENSIONS = [*JSONL_EXTENSIONS, "parquet"]
KEY_COLUMNS = ["source", "position", "id", "error"]
READ_CHUNK = 1 << 20  # bytes read from a JSONL file at a time
ROWS_PER_BLOCK = 1024  # rows per block a read task yields
# CPUs per read / select task: parsing prompts is light, and the stages' actors, started first, may hold
# all but a fraction of a node's CPUs (a read asking for a whole CPU would then wait forever)
READ_CPUS = 0.1


def _schema():
    import pyarrow as pa

    return pa.schema([("source", pa.string()), ("position", pa.int64()), ("id", pa.string()),
                      ("text", pa.string()), ("error", pa.string())])


def jsonl_rows(stream) -> Iterator[Tuple[int, Optional[Dict[str, Any]], Optional[str]]]:
    """(line number, object or None, error or None) per non-blank line of a byte stream."""
    rest, number = b"", 0
    while True:
        chunk = stream.read(READ_CHUNK)
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop() if chunk else b""
        for line in lines:
            number += 1
            if line.strip():
                yield (number, *parse_line(line.rstrip(b"\r"), number))
        if not chunk:
            return


def parquet_rows(file) -> Iterator[Tuple[int, Optional[Dict[str, Any]], Optional[str]]]:
    """(row number, record, None) per record of a Parquet file (random access)."""
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=ROWS_PER_BLOCK):
        for values in batch.to_pylist():
            number += 1
            yield number, values, None


def key_entry(source: str, position: int, values: Optional[Dict[str, Any]], error: Optional[str]) -> Dict[str, Any]:
    """One row as the datasource yields it: ``text`` is its fields (id split off) as JSON text."""
    if values is None:
        return {"source": source, "position": position, "id": None, "text": None, "error": error}
    own, fields = split_fields(values)
    return {"source": source, "position": position, "id": own,
            "text": json.dumps(fields, ensure_ascii=False, default=str), "error": error}


class PromptsDatasource(FileBasedDatasource):
    """Rows of prompts files with their place in the input (``source`` path, 1-based ``position``)."""

    def __init__(self, paths, **kwargs):
        super().__init__(paths, file_extensions=EXTENSIONS, **kwargs)

    def _open_input_source(self, filesystem, path: str, **open_args):
        if path.endswith(".parquet"):  # footer first: needs random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str):
        import pyarrow as pa

        rows = parquet_rows(f) if path.endswith(".parquet") else jsonl_rows(f)
        block = []
        for position, values, error in rows:
            block.append(key_entry(path, position, values, error))
            if len(block) == ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(block, schema=_schema())
                block = []
        if block:
            yield pa.Table.from_pylist(block, schema=_schema())


def read_input(paths, **read_args):
    import ray

    return ray.data.read_datasource(PromptsDatasource(paths), num_cpus=READ_CPUS, **read_args)


@dataclass(frozen=True)
class RowKey:
    """What the driver knows of one input row."""

    source: str
    position: int
    id: str
    index: int  # position among all rows of the input
    error: Optional[str] = None


def input_keys(paths) -> List[RowKey]:
    """Every row's key, in input order (read by read tasks; only the key columns reach the driver)."""
    import pyarrow as pa

    tables = list(read_input(paths).select_columns(KEY_COLUMNS).iter_batches(batch_format="pyarrow",
                                                                             batch_size=None))
    if not tables:
        return []
    table = pa.concat_tables(tables).sort_by([("source", "ascending"), ("position", "ascending")])
    places = zip(table["source"].to_pylist(), table["position"].to_pylist())
    ids = assign_ids(zip(table["id"].to_pylist(), table["error"].to_pylist()))
    return [RowKey(source, position, row_id, index, error)
            for index, ((source, position), (row_id, error)) in enumerate(zip(places, ids))]


def select_rows(batch, plan: Dict[Tuple[str, int], Tuple[str, int, Optional[str]]]) -> Dict[str, List[str]]:
    """The planned rows of a read batch as the stages' ``row`` column; the others (done) are dropped."""
    out = []
    for source, position, text in zip(batch["source"].to_pylist(), batch["position"].to_pylist(),
                                      batch["text"].to_pylist()):
        planned = plan.get((source, position))
        if planned is not None:
            row_id, index, error = planned
            row = InputRow(id=row_id, index=index, fields=json.loads(text) if text else {}, error=error)
            out.append(json.dumps(dataclasses.asdict(row), ensure_ascii=False))
    return {"row": out}


def pending_rows(paths, pending: List[RowKey], rows: int):
    """The Dataset of the ``pending`` rows (column ``row``) of an input of ``rows`` rows, at most one row
    per block: each block is one call into a stage, so rows spread over the actors and stream through
    them one by one. (Ray Data splits each read task's output into that many blocks; the stages' own
    block shaping would merge them again.)"""
    plan = {(key.source, key.position): (key.id, key.index, key.error) for key in pending}
    return (read_input(paths, override_num_blocks=max(1, rows))
            .map_batches(select_rows, batch_format="pyarrow", fn_kwargs={"plan": plan}, num_cpus=READ_CPUS))
