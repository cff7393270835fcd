"""The job's manifest: one record per input row, in ``manifest.jsonl`` and ``manifest.parquet``.

While a job runs, every finished row (rendered or failed) is appended to a journal,
``.manifest.journal.jsonl``, and flushed. When the job ends, the previous ``manifest.jsonl``, the
journal and nothing else are merged (the newest record per id wins), written as
``manifest.jsonl`` and ``manifest.parquet`` (each through a temporary file and a rename) and the
journal is removed. A run that was killed leaves its journal behind; the next run reads it, skips
the rows it completed and merges it, so an interrupted run plus a rerun has one record per row.

A record is complete when it has no error and all its audio files exist; complete rows are skipped
on a rerun, failed ones are tried again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from acestep.jsonl import ends_torn, read_records, replace_atomically

MANIFEST_JSONL = "manifest.jsonl"
MANIFEST_PARQUET = "manifest.parquet"
JOURNAL = ".manifest.journal.jsonl"
JSON_COLUMNS = ("params", "lm_metadata", "time_costs", "nodes", "preset")  # nested values: JSON text in Parquet


@dataclass
class ManifestRecord:
    """What the manifest says about one input row. ``files`` are relative to the output folder."""

    id: str
    index: int
    params: Dict[str, Any] = field(default_factory=dict)  # the row's fields as given (minus id)
    seeds: List[int] = field(default_factory=list)  # the seed each item used
    tracks: Optional[List[str]] = None  # each item's track when the row named ``tracks`` (files in this order)
    lm_metadata: Optional[Dict[str, Any]] = None  # the LM's CoT metadata (None without the LM)
    codes: List[str] = field(default_factory=list)  # each item's audio code string
    files: List[str] = field(default_factory=list)
    duration: Optional[float] = None  # seconds of audio per item
    time_costs: Dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None
    nodes: Dict[str, str] = field(default_factory=dict)  # Ray node id each model stage ran on ("lm", "dit")
    planned_at: float = 0.0  # unix time the LM stage finished the row (0 without the LM)
    finished_at: float = 0.0  # unix time the row finished
    preset: Optional[Dict[str, Any]] = None  # the DiT's preset report: what filled the unset fields, what it forced

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ManifestRecord":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class Manifest:
    """Reads what earlier runs finished and records what this run finishes."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.jsonl_path = self.output_dir / MANIFEST_JSONL
        self.parquet_path = self.output_dir / MANIFEST_PARQUET
        self.journal_path = self.output_dir / JOURNAL
        self._journal = None

    def load(self) -> Dict[str, ManifestRecord]:
        """Newest record per id from manifest.jsonl and a left-over journal."""
        records: Dict[str, ManifestRecord] = {}
        for path in (self.jsonl_path, self.journal_path):
            for values in read_records(path):
                record = ManifestRecord.from_dict(values)
                old = records.get(record.id)
                if old is None or record.finished_at >= old.finished_at:
                    records[record.id] = record
        return records

    def is_complete(self, record: Optional[ManifestRecord]) -> bool:
        if record is None or record.error or not record.files:
            return False
        return all((self.output_dir / name).is_file() and (self.output_dir / name).stat().st_size > 0
                   for name in record.files)

    def append(self, record: ManifestRecord) -> None:
        """Journal one finished row (flushed, so a killed job keeps it)."""
        if self._journal is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            torn = ends_torn(self.journal_path)
            self._journal = open(self.journal_path, "a", encoding="utf-8")
            if torn:  # a killed run's torn last line: end it, or the next record would join it
                self._journal.write("\n")
        self._journal.write(json.dumps(record.to_dict(), ensure_ascii=False, default=str) + "\n")
        self._journal.flush()

    def finalize(self, order: List[str]) -> List[ManifestRecord]:
        """Merge and write manifest.jsonl + manifest.parquet: the records of the ids in ``order``
        (the input's ids), in that order; then drop the journal."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        records = self.load()
        final = [records[row_id] for row_id in order if row_id in records]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        replace_atomically(self.jsonl_path, lambda tmp: tmp.write_text(
            "".join(json.dumps(r.to_dict(), ensure_ascii=False, default=str) + "\n" for r in final),
            encoding="utf-8"))
        replace_atomically(self.parquet_path, lambda tmp: write_parquet(final, tmp))
        self.journal_path.unlink(missing_ok=True)
        return final


def write_parquet(records: List[ManifestRecord], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("id", pa.string()), ("index", pa.int64()), ("params", pa.string()), ("seeds", pa.list_(pa.int64())),
        ("tracks", pa.list_(pa.string())),
        ("lm_metadata", pa.string()), ("codes", pa.list_(pa.string())), ("files", pa.list_(pa.string())),
        ("duration", pa.float64()), ("time_costs", pa.string()), ("error", pa.string()),
        ("nodes", pa.string()), ("planned_at", pa.float64()), ("finished_at", pa.float64()), ("preset", pa.string()),
    ])
    rows = []
    for record in records:
        values = record.to_dict()
        for name in JSON_COLUMNS:
            if values[name] is not None:
                values[name] = json.dumps(values[name], ensure_ascii=False, default=str)
        rows.append(values)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def read_manifest(output_dir: str | Path) -> List[Dict[str, Any]]:
    """manifest.parquet as dicts with the JSON columns decoded (for tests and tools)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(output_dir) / MANIFEST_PARQUET).to_pylist()
    for row in rows:
        for name in JSON_COLUMNS:
            if row[name] is not None:
                row[name] = json.loads(row[name])
    return rows
