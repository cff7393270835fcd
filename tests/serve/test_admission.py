"""Admission bounds, token buckets and Retry-After estimates, all on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from serve.edge.admission import Admission, AdmissionLimits, TokenBucket
from serve.edge.errors import APIError
from tests.clock import FakeClock


def _refusal(call) -> APIError:
    with pytest.raises(APIError) as info:
        call()
    error = info.value
    assert error.status_code == 429 and error.code == "overloaded"
    return error


def _retry(error: APIError) -> int:
    value = int(error.headers["Retry-After"])
    assert value >= 1
    return value


def _admission(clock=None, shared=None, **limits) -> Admission:
    values = {"max_unfinished": 4}
    values.update(limits)
    return Admission(AdmissionLimits(**values), clock=clock or FakeClock(), shared=shared)


def test_limits_validated():
    with pytest.raises(ValueError):
        AdmissionLimits(max_unfinished=0)
    with pytest.raises(ValueError):
        AdmissionLimits(max_unfinished=1, per_key_rpm=0)
    with pytest.raises(ValueError):
        AdmissionLimits(max_unfinished=1, per_key_unfinished=0)
    assert AdmissionLimits(max_unfinished=1, per_key_rpm=60).per_key_burst == 10
    assert AdmissionLimits(max_unfinished=1, per_key_rpm=2).per_key_burst == 1


def test_token_bucket_refill_timing():
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=0.5, burst=2, clock=clock)
    assert bucket.take() == 0.0 and bucket.take() == 0.0
    assert bucket.take() == pytest.approx(2.0)
    clock.advance(1.0)
    assert bucket.take() == pytest.approx(1.0)  # half a token there, none consumed
    clock.advance(1.0)
    assert bucket.take() == 0.0
    clock.advance(100.0)
    assert bucket.is_full()
    assert bucket.take() == 0.0 and bucket.take() == 0.0 and bucket.take() > 0  # capped at burst


def test_global_bound():
    admission = _admission(max_unfinished=4)
    admission.admit("k", 3, 0)
    error = _refusal(lambda: admission.admit("k", 4, 0))
    assert error.loc == ["body"]
    assert "server" in error.message and "4" in error.message


def test_key_unfinished_bound():
    admission = _admission(max_unfinished=100, per_key_unfinished=2)
    admission.admit("alice", 10, 1)
    error = _refusal(lambda: admission.admit("alice", 10, 2))
    assert error.loc == ["header", "authorization"]
    assert "this key" in error.message and "2" in error.message and "alice" not in error.message
    admission.admit("bob", 10, 0)


def test_key_rate_bound_and_refill():
    clock = FakeClock()
    admission = _admission(clock, max_unfinished=100, per_key_rpm=12)  # burst 2, a token every 5 s
    admission.admit("alice", 0, 0)
    admission.admit("alice", 0, 0)
    error = _refusal(lambda: admission.admit("alice", 0, 0))
    assert error.loc == ["header", "authorization"] and "12 requests per minute" in error.message
    assert _retry(error) == 5
    admission.admit("bob", 0, 0)  # buckets are per key
    clock.advance(2.0)
    assert _retry(_refusal(lambda: admission.admit("alice", 0, 0))) == 3
    clock.advance(3.0)
    admission.admit("alice", 0, 0)


def test_rate_bucket_untouched_when_unfinished_bound_refuses():
    admission = _admission(max_unfinished=2, per_key_unfinished=1, per_key_rpm=6)  # burst 1
    for _ in range(5):
        _refusal(lambda: admission.admit("alice", 5, 0))
        _refusal(lambda: admission.admit("alice", 0, 3))
    admission.admit("alice", 0, 0)  # the single token is still there
    assert admission.stats()["refused"]["key_rate"] == 0


def test_retry_after_grows_with_depth_and_task_time():
    admission = _admission(max_unfinished=4)
    admission.set_parallelism(1)
    assert _retry(_refusal(lambda: admission.admit("k", 4, 0))) == 10  # default task time
    admission.record_task_time(20.0)
    shallow = _retry(_refusal(lambda: admission.admit("k", 4, 0)))
    deep = _retry(_refusal(lambda: admission.admit("k", 6, 0)))
    assert (shallow, deep) == (20, 60)
    for _ in range(20):
        admission.record_task_time(60.0)
    slower = _retry(_refusal(lambda: admission.admit("k", 4, 0)))
    assert 55 <= slower <= 60
    assert _retry(_refusal(lambda: admission.admit("k", 1000, 0))) == 600  # clamped


def test_retry_after_divides_by_parallelism():
    admission = _admission(max_unfinished=4)
    admission.record_task_time(40.0)
    admission.set_parallelism(4)
    assert _retry(_refusal(lambda: admission.admit("k", 7, 0))) == 40  # 4 excess x 40 s / 4
    admission.set_parallelism(None)
    assert _retry(_refusal(lambda: admission.admit("k", 7, 0))) == 160  # no estimate yet: 1


def test_parallelism_estimated_from_completions():
    clock = FakeClock()
    admission = _admission(clock, max_unfinished=8)
    for _ in range(9):  # a 40 s task finishing every 10 s: four run at once
        admission.record_task_time(40.0)
        clock.advance(10.0)
    assert admission.stats()["parallelism"] == pytest.approx(4.0)
    assert _retry(_refusal(lambda: admission.admit("k", 11, 0))) == 40  # 4 excess x 40 s / 4


def test_key_retry_after_uses_key_depth():
    admission = _admission(max_unfinished=100, per_key_unfinished=2)
    admission.set_parallelism(8)
    admission.record_task_time(30.0)
    # Two unfinished tasks of this key can run side by side at most: 1 excess x 30 s / 2.
    assert _retry(_refusal(lambda: admission.admit("k", 10, 2))) == 15


def test_bad_task_times_ignored():
    admission = _admission()
    for bad in (float("nan"), float("inf"), -1.0, "x"):
        admission.record_task_time(bad)
    assert admission.stats()["recent_task_s"] == 10.0


def test_sync_slots():
    admission = _admission(sync_max_inflight=2)
    with admission.sync_slot():
        with admission.sync_slot():
            assert admission.stats()["sync_inflight"] == 2
            error = _refusal(lambda: admission.sync_slot().__enter__())
            assert error.loc == ["body"] and "sync" in error.message
        assert admission.stats()["sync_inflight"] == 1
    assert admission.stats()["sync_inflight"] == 0


def test_sync_slot_released_on_exception():
    admission = _admission(sync_max_inflight=1)
    with pytest.raises(RuntimeError):
        with admission.sync_slot():
            raise RuntimeError("boom")
    with admission.sync_slot():
        pass
    assert admission.stats()["sync_inflight"] == 0


def test_sync_slot_released_on_cancellation():
    admission = _admission(sync_max_inflight=1)

    async def hold():
        with admission.sync_slot():
            await asyncio.sleep(60)

    async def main():
        task = asyncio.create_task(hold())
        await asyncio.sleep(0)
        assert admission.stats()["sync_inflight"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert admission.stats()["sync_inflight"] == 0


def test_pruning_bounds_memory():
    clock = FakeClock()
    admission = Admission(AdmissionLimits(max_unfinished=10, per_key_rpm=60), clock=clock, max_buckets=256)
    for index in range(10_000):
        admission.admit(f"key-{index}", 0, 0)
    assert admission.stats()["rate_buckets"] <= 256
    clock.advance(3600.0)  # every bucket refilled: the next new key clears them all
    admission.admit("late", 0, 0)
    stats = admission.stats()
    assert stats["rate_buckets"] == 1
    assert stats["rate_buckets_dropped"] == 10_000
    assert stats["admitted"] == 10_001


def test_recently_used_buckets_survive_pruning():
    clock = FakeClock()
    admission = Admission(AdmissionLimits(max_unfinished=10, per_key_rpm=6), clock=clock, max_buckets=3)
    admission.admit("hot", 0, 0)
    for index in range(10):
        admission.admit(f"cold-{index}", 0, 0)
        _refusal(lambda: admission.admit("hot", 0, 0))  # touching it keeps it most recent
    assert admission.stats()["rate_buckets"] <= 3
    assert _retry(_refusal(lambda: admission.admit("hot", 0, 0))) == 10  # still its own, empty bucket


def test_stats_counts():
    admission = _admission(max_unfinished=2, per_key_unfinished=1, per_key_rpm=6, sync_max_inflight=1)
    admission.admit("a", 0, 0)
    _refusal(lambda: admission.admit("a", 2, 0))
    _refusal(lambda: admission.admit("a", 0, 1))
    _refusal(lambda: admission.admit("a", 0, 0))
    with admission.sync_slot():
        _refusal(lambda: admission.sync_slot().__enter__())
    admission.record_task_time(12.5)
    stats = admission.stats()
    assert stats["admitted"] == 1 and stats["sync_admitted"] == 1
    assert stats["refused"] == {"global": 1, "key_unfinished": 1, "key_rate": 1, "sync": 1}
    assert stats["sync_inflight"] == 0 and stats["sync_max_inflight"] == 1
    assert stats["recent_task_s"] == 12.5 and stats["recent_completions"] == 1


def test_two_replicas_share_one_key_rate(tmp_path):
    """Each ingress replica has its own Admission; with the task store's buckets a key gets its rate
    once in all, not once per replica."""
    from serve.store import open_task_store

    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}")
    try:
        replicas = [_admission(per_key_rpm=6.0, shared=store.take_token) for _ in range(4)]
        replicas[0].admit("alice", 0, 0)  # burst max(1, 6 / 6) = 1
        for replica in replicas:
            assert _retry(_refusal(lambda: replica.admit("alice", 0, 0))) >= 1
        replicas[3].admit("bob", 0, 0)
    finally:
        store.close()
