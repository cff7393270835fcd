"""Training fixtures: a few synthetic songs prepared once per session (the library's own path, no
Ray), one local Ray (2 CPUs) shared by this folder's Ray tests, and one CPU thread while tiny
models train in the test process (their matmuls are too small to share)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import local_ray, write_tone

SONGS = (("low", 220.0, 5.0), ("mid", 330.0, 6.0), ("high", 440.0, 8.0))  # different lengths: padded batches


@pytest.fixture(scope="package")
def ray_cpus():
    """One local Ray for the Ray Train run and the dataset job (each start costs seconds)."""
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="session")
def prepared(demo_root, tmp_path_factory):
    """A prepared dataset folder of three tone songs (5, 6 and 8 s) with their manifest."""
    from acestep.checkpoints.bundle import load_dit_bundle
    from acestep.checkpoints.layout import resolve_dit_checkpoint
    from acestep.training.labels import SongText
    from acestep.training.prepare import encode_audio, prepare_sample
    from acestep.training.samples import DatasetManifest, SampleRecord, write_sample

    folder = tmp_path_factory.mktemp("prepared")
    audio = tmp_path_factory.mktemp("songs")
    bundle = load_dit_bundle(resolve_dit_checkpoint(demo_root, "acestep-v15-turbo"))
    manifest = DatasetManifest(folder)
    with one_thread():
        for seed, (name, freq, seconds) in enumerate(SONGS):
            path = write_tone(audio / f"{name}.wav", seconds, freq=freq)
            text = SongText(caption=f"a {name} sine tone", lyrics="[Instrumental]", bpm=120)
            sample = prepare_sample(bundle, encode_audio(bundle, path, seed), text, {"id": name, "source": path})
            write_sample(sample, folder / f"{name}.safetensors")
            manifest.append(SampleRecord(id=name, source=path, file=f"{name}.safetensors", frames=sample.frames,
                                         caption=text.caption))
    manifest.finalize([name for name, _, _ in SONGS])
    return folder


class one_thread:
    """Torch on one CPU thread inside the block (the previous count restored after)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)
