"""Prepared samples: one ``{id}.safetensors`` per song plus the dataset's manifest.

A sample file holds upstream's preprocessed tensors under upstream's names (``target_latents``
[T, C], ``attention_mask`` [T], ``encoder_hidden_states`` [S, D], ``encoder_attention_mask`` [S],
``context_latents`` [T, 2C]) and its text and labels as JSON in the safetensors header
(``metadata``). Safetensors, not pickles: a dataset can come from anywhere.

The folder's manifest:
- ``manifest.json``: ``{"samples": [file, ...]}`` as upstream's dataset reader expects, plus the format;
- ``manifest.jsonl``: one ``SampleRecord`` per source file, prepared or failed (with its error).
While a job runs, each finished file is appended to ``.manifest.journal.jsonl`` (flushed); the job's
end merges the old manifest and the journal (newest record per id) and removes the journal, so a
killed job's work is kept and a rerun prepares only what is not complete."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from acestep.jsonl import read_records, replace_atomically

FORMAT = "acestep-prepared-v1"
SAMPLE_SUFFIX = ".safetensors"
MANIFEST_JSON = "manifest.json"
MANIFEST_JSONL = "manifest.jsonl"
JOURNAL = ".manifest.journal.jsonl"
TENSOR_NAMES = ("target_latents", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                "context_latents")


class DatasetError(ValueError):
    """A prepared dataset that cannot be read or trained on."""


@dataclass
class PreparedSample:
    """One song, ready to train on."""

    target_latents: torch.Tensor  # [T, C] VAE latents (a posterior sample, seeded)
    encoder_hidden_states: torch.Tensor  # [S, D] condition-encoder states of its caption, lyrics, metas
    context_latents: torch.Tensor  # [T, 2C] the text2music context: silence latents | chunk mask ones
    metadata: Dict[str, Any] = field(default_factory=dict)  # caption, lyrics, metas, labels, source

    @property
    def frames(self) -> int:
        return int(self.target_latents.shape[0])


@dataclass
class SampleRecord:
    """What the manifest says about one source file. ``file`` is relative to the dataset folder."""

    id: str
    source: str  # the audio file as the job was given it (path or URL)
    file: Optional[str] = None  # the sample file ("" until prepared)
    frames: int = 0
    caption: str = ""
    lyrics: str = ""
    bpm: Optional[int] = None
    keyscale: str = ""
    timesignature: str = ""
    language: str = ""
    labels: Optional[Dict[str, Any]] = None  # what the LM said about the audio (None without auto-labels)
    error: Optional[str] = None
    finished_at: float = 0.0
    fingerprint: str = ""  # of the inputs it was prepared from (text, tag, audio size): changed ones are redone

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SampleRecord":
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


def write_sample(sample: PreparedSample, path: Path) -> Path:
    """Write through a temporary name and a rename, so a killed job never leaves a torn sample."""
    path = Path(path)
    frames = sample.frames
    tensors = {
        "target_latents": sample.target_latents.float().contiguous().cpu(),
        "attention_mask": torch.ones(frames),
        "encoder_hidden_states": sample.encoder_hidden_states.float().contiguous().cpu(),
        "encoder_attention_mask": torch.ones(sample.encoder_hidden_states.shape[0]),
        "context_latents": sample.context_latents.float().contiguous().cpu(),
    }
    tmp = path.with_name(f".{path.name}.part")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "metadata": json.dumps(sample.metadata)})
    os.replace(tmp, path)
    return path


def read_sample(path: Path) -> PreparedSample:
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in TENSOR_NAMES}
    except Exception as error:  # a torn or foreign file: name it
        raise DatasetError(f"{Path(path).name}: not a prepared sample ({type(error).__name__}: {error})") from None
    if header.get("format") != FORMAT:
        raise DatasetError(f"{Path(path).name}: format {header.get('format')!r}, expected {FORMAT!r}")
    return PreparedSample(tensors["target_latents"], tensors["encoder_hidden_states"], tensors["context_latents"],
                          json.loads(header.get("metadata") or "{}"))


def _write_text(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


class DatasetManifest:
    """Reads what earlier runs prepared and records what this run prepares."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._journal = None

    def load(self) -> Dict[str, SampleRecord]:
        """Newest record per id from manifest.jsonl and a left-over journal."""
        records: Dict[str, SampleRecord] = {}
        for path in (self.folder / MANIFEST_JSONL, self.folder / JOURNAL):
            for values in read_records(path):
                record = SampleRecord.from_dict(values)
                old = records.get(record.id)
                if old is None or record.finished_at >= old.finished_at:
                    records[record.id] = record
        return records

    def is_complete(self, record: Optional[SampleRecord]) -> bool:
        return bool(record and not record.error and record.file and (self.folder / record.file).is_file())

    def append(self, record: SampleRecord) -> None:
        if self._journal is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._journal = open(self.folder / JOURNAL, "a", encoding="utf-8")
            self._journal.write("\n")  # ends a killed run's torn last line (blank lines are skipped)
        record.finished_at = record.finished_at or time.time()
        self._journal.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
        self._journal.flush()

    def finalize(self, order: List[str]) -> List[SampleRecord]:
        """Write manifest.jsonl (the records of the ids in ``order``, in that order) and
        manifest.json (the complete samples), then drop the journal."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        records = self.load()
        final = [records[i] for i in order if i in records]
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in final)
        _write_text(self.folder / MANIFEST_JSONL, lines)
        samples = [r.file for r in final if self.is_complete(r)]
        _write_text(self.folder / MANIFEST_JSON, json.dumps({"format": FORMAT, "samples": samples}, indent=2))
        (self.folder / JOURNAL).unlink(missing_ok=True)
        return final


def sample_files(folder: str | Path) -> List[Path]:
    """The dataset's sample files: manifest.json's list, else every sample file in the folder."""
    folder = Path(folder)
    manifest = folder / MANIFEST_JSON
    if manifest.is_file():
        names = json.loads(manifest.read_text()).get("samples", [])
        files = [folder / name for name in names]
    else:
        files = sorted(p for p in folder.glob(f"*{SAMPLE_SUFFIX}") if not p.name.startswith("."))
    if not files:
        raise DatasetError(f"{folder}: no prepared samples (run the dataset job first)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DatasetError(f"{folder}: the manifest lists {len(missing)} missing sample file(s), e.g. {missing[0]}")
    return files


class SampleSet:
    """The samples of a prepared folder, each read on first use and kept in memory."""

    def __init__(self, folder: str | Path):
        self.files = sample_files(folder)
        self._samples: Dict[int, PreparedSample] = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> PreparedSample:
        if index not in self._samples:
            self._samples[index] = read_sample(self.files[index])
        return self._samples[index]
