"""The dataset job (Ray Data) on the demo checkpoints: sidecars and LM auto-labels end up in the
samples and the manifest, a broken file is recorded and skipped, and a rerun prepares only what is
new (and tries the broken file again)."""

from __future__ import annotations

import json

import pytest

from acestep.training.samples import SampleSet, read_sample
from pipelines.prepare_dataset import PrepareOptions, run
from tests.conftest import write_tone

pytestmark = pytest.mark.slow
LABEL_KEYS = {"caption", "lyrics", "bpm", "keyscale", "timesignature", "language"}


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("songs")
    write_tone(folder / "alpha.wav", 5.0, freq=220.0)
    (folder / "alpha.caption.txt").write_text("warm pad\n")
    (folder / "alpha.lyrics.txt").write_text("[Verse]\nla la la\n")
    (folder / "sub").mkdir()
    write_tone(folder / "sub" / "beta.wav", 6.0, freq=330.0)
    (folder / "sub" / "beta.json").write_text(json.dumps({"bpm": 96, "keyscale": "D minor"}))
    (folder / "broken.wav").write_bytes(b"RIFF this is not audio")
    return folder


@pytest.fixture(scope="module")
def first_run(ray_cpus, demo_root, songs, tmp_path_factory):
    output = tmp_path_factory.mktemp("prepared_job")
    summary = run(PrepareOptions(input=str(songs), output=str(output), checkpoints=str(demo_root), labels=True))
    return output, summary


def _records(summary):
    return {r.source.rsplit("/", 1)[-1]: r for r in summary.records}


def test_sidecars_and_auto_labels_reach_the_samples(first_run):
    output, summary = first_run
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (3, 2, 1, 0)
    records = _records(summary)
    alpha, beta = records["alpha.wav"], records["beta.wav"]
    for record in (alpha, beta):
        assert record.labels.keys() == LABEL_KEYS and isinstance(record.labels["bpm"], int)
        assert record.labels["keyscale"] and record.labels["language"]
        sample = read_sample(output / record.file)
        assert sample.metadata["labels"] == record.labels and sample.frames == record.frames > 0
    # the song's own text wins; the LM fills what it leaves out
    assert (alpha.caption, alpha.lyrics, alpha.bpm) == ("warm pad", "[Verse]\nla la la", alpha.labels["bpm"])
    assert (beta.bpm, beta.keyscale) == (96, "D minor")
    assert (beta.caption, beta.language) == (beta.labels["caption"], beta.labels["language"])
    assert json.loads((output / "manifest.json").read_text())["samples"] == [alpha.file, beta.file]
    assert len(SampleSet(output)) == 2


def test_a_broken_file_is_recorded_and_skipped(first_run):
    output, summary = first_run
    broken = _records(summary)["broken.wav"]
    assert broken.file is None and "broken.wav" in broken.error
    lines = [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["source"].rsplit("/", 1)[-1] for line in lines) == ["alpha.wav", "beta.wav", "broken.wav"]


def test_a_rerun_prepares_only_what_is_new(first_run, songs, demo_root):
    output, before = first_run
    prepared = {name: (output / r.file).stat().st_mtime_ns for name, r in _records(before).items() if r.file}
    write_tone(songs / "gamma.wav", 5.0, freq=550.0)
    summary = run(PrepareOptions(input=str(songs), output=str(output), checkpoints=str(demo_root)))
    assert (summary.total, summary.skipped, summary.done, summary.failed) == (4, 2, 1, 1)
    records = _records(summary)
    assert {name: (output / records[name].file).stat().st_mtime_ns for name in prepared} == prepared
    assert records["alpha.wav"].labels == _records(before)["alpha.wav"].labels  # kept from the first run
    assert (records["gamma.wav"].caption, records["gamma.wav"].labels) == ("gamma", None)  # no LM: its name
    assert "broken.wav" in records["broken.wav"].error
    assert len(json.loads((output / "manifest.json").read_text())["samples"]) == 3
