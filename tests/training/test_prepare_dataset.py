"""The dataset job (Ray Data) on the demo checkpoints: sidecars and LM auto-labels end up in the
samples and the manifest, a broken file is recorded and skipped, a rerun prepares only what is new
(and tries the broken file again) or whose text changed. The caption rules (upstream's activation
tag, genre ratio, prompt override) hold upstream's own code as the reference."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from acestep.training.labels import TAG_POSITIONS, CaptionTag, apply_labels, genre_songs, training_caption
from acestep.training.samples import DatasetManifest, SampleSet, read_sample
from pipelines.prepare_dataset import PrepareOptions, run
from tests.conftest import write_tone

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


class UpstreamSample:
    """Upstream's ``AudioSample`` caption methods and ``select_genre_indices`` as upstream writes them
    (acestep/training/dataset_builder_modules/models.py, preprocess_utils.py): the reference."""

    def __init__(self, caption, genre, custom_tag, prompt_override):
        self.caption, self.genre, self.custom_tag, self.prompt_override = caption, genre, custom_tag, prompt_override

    def get_full_caption(self, tag_position="prepend"):
        if not self.custom_tag:
            return self.caption
        if tag_position == "prepend":
            return f"{self.custom_tag}, {self.caption}" if self.caption else self.custom_tag
        if tag_position == "append":
            return f"{self.caption}, {self.custom_tag}" if self.caption else self.custom_tag
        if tag_position == "replace":
            return self.custom_tag
        return self.caption

    def get_full_genre(self, tag_position="prepend"):
        if not self.custom_tag:
            return self.genre
        if tag_position == "prepend":
            return f"{self.custom_tag}, {self.genre}" if self.genre else self.custom_tag
        if tag_position == "append":
            return f"{self.genre}, {self.custom_tag}" if self.genre else self.custom_tag
        if tag_position == "replace":
            return self.custom_tag
        return self.genre

    def get_training_prompt(self, tag_position="prepend", use_genre=False):
        if self.prompt_override == "genre":
            return self.get_full_genre(tag_position)
        if self.prompt_override == "caption":
            return self.get_full_caption(tag_position)
        if use_genre:
            return self.get_full_genre(tag_position)
        return self.get_full_caption(tag_position)


def upstream_genre_indices(count, genre_ratio):
    num_genre_samples = int(count * genre_ratio / 100)
    random.seed(42)
    all_indices = list(range(count))
    random.shuffle(all_indices)
    return set(all_indices[:num_genre_samples])


def test_the_training_caption_is_upstreams_byte_for_byte():
    texts = ("", "warm pad, slow", "Ünïcode — ✓")
    for caption, genre, tag, override, position, use_genre in itertools.product(
            texts, texts, ("", "zq", "my style"), (None, "caption", "genre"), TAG_POSITIONS, (False, True)):
        expected = UpstreamSample(caption, genre, tag, override).get_training_prompt(position, use_genre)
        assert training_caption(CaptionTag(tag, position), caption, genre, override, use_genre) == expected
    for count, ratio in itertools.product((0, 1, 3, 7, 20), (0, 10, 33, 50, 100)):
        assert genre_songs(count, ratio) == upstream_genre_indices(count, ratio)
    for field, bad in (("tag_position", {"tag_position": "middle"}), ("genre_ratio", {"genre_ratio": 101})):
        with pytest.raises(ValueError, match=field):
            CaptionTag(**bad)


def test_auto_labels_follow_upstreams_label_rules():
    labels = {"caption": "lm caption", "lyrics": "[Verse]\nlm words", "bpm": 100, "keyscale": "C major",
              "timesignature": "4", "language": "en"}
    own = {"caption": "mine", "lyrics": "my words", "bpm": 90, "keyscale": ""}
    sung = apply_labels(own, labels, instrumental=False)
    assert (sung["caption"], sung["lyrics"], sung["bpm"], sung["keyscale"], sung["labeled"]) == (
        "lm caption", "my words", 90, "C major", True)
    assert apply_labels(own, labels, instrumental=False, transcribe_lyrics=True)["lyrics"] == labels["lyrics"]
    quiet = apply_labels({}, labels, instrumental=True, skip_metas=True)
    assert (quiet["lyrics"], quiet["language"], "bpm" in quiet, "timesignature" in quiet) == (
        "[Instrumental]", "unknown", False, False)


@pytest.fixture(scope="module")
def first_run(ray_cpus, demo_root, songs, tmp_path_factory):
    output = tmp_path_factory.mktemp("prepared_job")
    summary = run(PrepareOptions(input=str(songs), output=str(output), checkpoints=str(demo_root), labels=True))
    return output, summary


def _records(summary):
    return {r.source.rsplit("/", 1)[-1]: r for r in summary.records}


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_broken_file_is_recorded_and_skipped(first_run):
    output, summary = first_run
    broken = _records(summary)["broken.wav"]
    assert broken.file is None and "broken.wav" in broken.error
    lines = [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]
    assert sorted(line["source"].rsplit("/", 1)[-1] for line in lines) == ["alpha.wav", "beta.wav", "broken.wav"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_song_whose_text_changed_is_prepared_again(first_run, songs, demo_root):
    output, _ = first_run
    before = {r.source.rsplit("/", 1)[-1]: r for r in DatasetManifest(output).load().values()}
    (songs / "alpha.json").write_text(json.dumps({"caption": "cold pad"}))  # wins over alpha.caption.txt
    summary = run(PrepareOptions(input=str(songs), output=str(output), checkpoints=str(demo_root)))
    assert (summary.skipped, summary.done, summary.failed) == (summary.total - 2, 1, 1)
    after = _records(summary)
    assert after["alpha.wav"].caption == "cold pad" and read_sample(output / after["alpha.wav"].file).metadata[
        "caption"] == "cold pad"
    assert after["alpha.wav"].fingerprint != before["alpha.wav"].fingerprint
    assert after["beta.wav"].finished_at == before["beta.wav"].finished_at  # untouched
