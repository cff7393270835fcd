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
