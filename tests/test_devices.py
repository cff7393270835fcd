"""Device memory reports, out-of-memory recognition and cache release (``acestep.devices``)."""

from __future__ import annotations

import pytest
import torch

from acestep.devices import device_memory, is_out_of_memory, release_cached_memory

KEYS = {"device", "allocated_bytes", "reserved_bytes", "peak_allocated_bytes", "process_rss_bytes",
        "process_peak_rss_bytes"}


def test_cpu_memory_has_no_allocator_counts_and_the_process_rss():
    before = device_memory("cpu")
    held = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    after = device_memory(torch.device("cpu"))
    assert set(after) == KEYS and after["device"] == "cpu"
    assert after["allocated_bytes"] is after["reserved_bytes"] is after["peak_allocated_bytes"] is None
    assert after["process_rss_bytes"] >= before["process_rss_bytes"] + held.numel() // 2
    assert after["process_peak_rss_bytes"] >= before["process_rss_bytes"]
    assert device_memory(None)["device"] == "cpu"  # a replica without a model reports its process only


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("HIP out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only runtime errors say it for real


def test_releasing_the_cache_on_the_cpu_keeps_tensors():
    x = torch.arange(10)
    release_cached_memory("cpu")
    assert torch.equal(x, torch.arange(10))


@pytest.mark.gpu
def test_cuda_memory_counts_a_tensor_and_release_returns_its_cache():
    torch.cuda.synchronize()
    base = device_memory("cuda")
    held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    now = device_memory("cuda:0")
    assert now["allocated_bytes"] >= base["allocated_bytes"] + held.numel()
    assert now["reserved_bytes"] >= now["allocated_bytes"]
    assert now["peak_allocated_bytes"] >= now["allocated_bytes"]
    del held
    assert device_memory("cuda")["reserved_bytes"] >= now["allocated_bytes"]  # freed blocks stay cached
    release_cached_memory("cuda")
    after = device_memory("cuda")
    assert after["reserved_bytes"] < now["reserved_bytes"]
    assert after["peak_allocated_bytes"] >= now["allocated_bytes"]  # the peak since start remains


# Releasing the cache is a no-op on the CPU: these record the calls to show when it happens.
def test_the_dit_worker_releases_cached_memory_when_it_goes_idle_not_every_step(turbo_handler, monkeypatch):
    from acestep.dit import worker
    from acestep.inference import GenerationConfig, GenerationParams, generate_music

    released = []
    monkeypatch.setattr(worker, "release_cached_memory", released.append)
    steps = turbo_handler.stats()["steps"]
    params = GenerationParams(thinking=False, caption="tidy", duration=10, inference_steps=4)
    result = generate_music(turbo_handler, None, params, GenerationConfig(batch_size=2, seeds=[1, 2],
                                                                          use_random_seed=False))
    assert result.success, result.error
    assert turbo_handler.stats()["steps"] - steps == 4
    assert released == [turbo_handler.bundle.device]


def test_the_lm_engine_releases_cached_memory_when_it_goes_idle_not_every_step(demo_root, monkeypatch):
    from acestep.inference import GenerationConfig, GenerationParams
    from acestep.lm import backend
    from acestep.llm_inference import LLMHandler

    released = []
    monkeypatch.setattr(backend, "release_cached_memory", released.append)
    llm = LLMHandler()
    llm.initialize(str(demo_root), "acestep-5Hz-lm-0.6B", backend="pt", device="cpu")
    try:
        params = GenerationParams(caption="rock", bpm=100, keyscale="E minor", timesignature="4", duration=10)
        assert llm.plan(params, GenerationConfig(batch_size=1), [7])[0].audio_codes
        steps = llm.stats()["steps"]
    finally:
        llm.unload()
    assert {str(d) for d in released} == {"cpu"} and 1 <= len(released) < steps
