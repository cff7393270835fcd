"""Shared fixtures: one tiny demo checkpoint set per test session, DiT handlers on it, test audio."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np
import pytest
import soundfile as sf

from acestep.checkpoints.demo import write_demo_checkpoints


_EXIT_STATUS = pytest.StashKey[int]()

# The GPU machine has no Ray (nor FastAPI, Redis, a browser): there `pytest -m gpu tests` collects
# the library's rooms only. Wherever Ray is installed every room is collected.
def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


if not _importable("ray"):
    collect_ignore = ["serve", "pipelines", "cluster", "web"]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: without one they are skipped here, in one place,
    so `-m gpu` selects every CUDA test and none hides behind its own skip."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marker gpu: needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End a process that ran Ray without interpreter finalization: the suite starts and stops Ray
    many times, and a driver-side C++ thread left behind can call into the interpreter while it
    tears down (a SIGSEGV after every result was reported). Exit handlers still run; the session's
    status is the exit status."""
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None or "ray._raylet" not in sys.modules:
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@contextlib.contextmanager
def local_ray(num_cpus: int = 2):
    """A Ray of this process's own (never one it finds) for the tests of one module or package."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One real S3-compatible server for the session (moto's server mode: tests/serve/s3_server.py);
    each test takes its own bucket (``s3.bucket()``)."""
    from tests.serve.s3_server import start_s3

    with start_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The complete tiny set (official layout): turbo, base, vae, text encoder, 5 Hz LM."""
    return write_demo_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def xl_root(demo_root, tmp_path_factory):
    """A checkpoints root holding the tiny XL turbo DiT (its condition encoder narrower than the DiT,
    the timbre special token in use) beside the demo set's VAE and text encoder."""
    from acestep.checkpoints.demo import write_dit_folder
    from acestep.checkpoints.layout import TEXT_ENCODER_DIR, VAE_DIR

    root = tmp_path_factory.mktemp("xl_checkpoints")
    write_dit_folder(root / "acestep-v15-xl-turbo", "xl-turbo", seed=6)
    for name in (VAE_DIR, TEXT_ENCODER_DIR):
        (root / name).symlink_to(demo_root / name, target_is_directory=True)
    return root


def dit_handler(demo_root, variant: str = "turbo"):
    """A fresh DiT handler on the demo checkpoints (CPU)."""
    from acestep.handler import AceStepHandler

    handler = AceStepHandler()
    handler.initialize_service(str(demo_root), f"acestep-v15-{variant}", device="cpu")
    return handler


@pytest.fixture(scope="session")
def turbo_handler(demo_root):
    return dit_handler(demo_root, "turbo")


@pytest.fixture(scope="session")
def base_handler(demo_root):
    return dit_handler(demo_root, "base")


def write_tone(path, seconds: float, sample_rate: int = 48000, channels: int = 2, freq: float = 220.0):
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    mono = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * np.sin(2 * np.pi * 3 * freq * t)
    data = np.stack([mono] * channels, axis=1).astype(np.float32)
    sf.write(str(path), data, sample_rate)
    return str(path)


@pytest.fixture(scope="session")
def source_audio(tmp_path_factory):
    """12 s stereo 48 kHz tone."""
    return write_tone(tmp_path_factory.mktemp("audio") / "source.wav", 12.0)


@pytest.fixture(scope="session")
def reference_audio(tmp_path_factory):
    """7 s mono 44.1 kHz tone: exercises mono→stereo, resampling and tiling to 30 s."""
    return write_tone(tmp_path_factory.mktemp("audio") / "reference.wav", 7.0, sample_rate=44100, channels=1,
                      freq=330.0)
