"""The task store contract, run against both backends (SQLite file, real redis-server).

Every test gets an empty store; ``open_store`` opens more instances on the same location (to check
persistence, or with a different TTL / record cap / clock). Leases and ages are checked on a fake
clock the test moves, so none depends on how fast this machine runs. Claim races run across threads
and across spawned processes.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from serve.store.redis import RedisTaskStore
from serve.store.sqlite import SQLiteTaskStore
from serve.store.records import StoreFull, MAX_EVENTS, PHASES, IdempotencyConflict, TaskRecord, wait_events, wait_final
from serve.store import open_task_store
from tests.clock import FakeClock
from tests.serve.redis_server import start_redis

SUMMARY_KEYS = {"task_id", "phase", "progress", "message", "finished", "created_at", "updated_at",
                "result", "error", "detail", "attempts"}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with start_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/state/tasks.db"  # sqlite:// + an absolute path
    url = request.getfixturevalue("redis_url")
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def open_store(store_url):
    opened = []

    def factory(**kwargs):
        store = open_task_store(store_url, **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store):
    return open_store()


@pytest.fixture
def clock():
    return FakeClock()


def _claim_worker(url, task_ids, owner, barrier, results):
    """Runs in a spawned process: claim every task it can, report which ones it won."""
    store = open_task_store(url)
    try:
        barrier.wait(timeout=60)
        # The same order in every process, so that they contend for each task at the same moment.
        results.put((owner, [task_id for task_id in task_ids if store.claim(task_id, owner, 30.0)]))
    finally:
        store.close()


def test_create_get_and_summary(store):
    before = time.time()
    task_id, created = store.create({"caption": "lofi"}, key_name="alice")
    assert created and isinstance(task_id, str) and task_id
    record = store.get(task_id)
    assert isinstance(record, TaskRecord)
    assert (record.phase, record.progress, record.key_name, record.request) == ("queued", 0.0, "alice",
                                                                                {"caption": "lofi"})
    assert before <= record.created_at == record.updated_at <= time.time()
    assert (record.result, record.error, record.attempts, record.owner, record.lease_until) == (None, None, 0,
                                                                                                None, 0.0)
    summary = record.summary()
    assert set(summary) == SUMMARY_KEYS and summary["finished"] is False
    [event] = store.events(task_id)
    assert (event.seq, event.phase, event.progress) == (0, "queued", 0.0)
    assert store.get("missing") is None and store.events("missing") is None


def test_create_with_task_id_and_owner(open_store, clock):
    store = open_store(clock=clock)
    assert store.create({"a": 1}, task_id="fixed") == ("fixed", True)
    assert store.create({"a": 2}, task_id="fixed") == ("fixed", False)
    assert store.get("fixed").request == {"a": 1}
    task_id, _ = store.create({}, owner="replica-1", lease_s=30.0)
    record = store.get(task_id)
    assert (record.owner, record.attempts) == ("replica-1", 1)
    assert record.created_at == clock.now and record.lease_until == clock.now + 30.0
    assert task_id not in store.expired() and "fixed" in store.expired()


def test_update_is_forward_only(store):
    task_id, _ = store.create({})
    assert store.update(task_id, "lm", 0.5, "planning", {"tokens_done": 10})
    assert not store.update(task_id, "lm", 0.4)      # older
    assert not store.update(task_id, "lm", 0.5)      # not newer
    assert not store.update(task_id, "queued", 0.9)  # backward
    assert not store.update(task_id, "bogus", 0.9)
    assert not store.update(task_id, "lm", float("nan"))
    assert not store.update("missing", "lm", 0.9)
    assert store.update(task_id, "dit", 0.2, "denoising")
    record = store.get(task_id)
    assert (record.phase, record.progress, record.message, record.detail) == ("dit", 0.5, "denoising", None)
    assert not store.update(task_id, "dit", -3.0)    # clamped to 0, not newer
    assert store.update(task_id, "encode", 7.0)
    assert store.get(task_id).progress == 1.0
    assert not store.update(task_id, "encode", 1.0)
    assert store.finish(task_id, {"audio": []})
    assert not store.update(task_id, "encode", 1.0) and store.get(task_id).phase == "done"
    phases = [(e.phase, e.progress) for e in store.events(task_id)]
    assert phases == [("queued", 0.0), ("lm", 0.5), ("dit", 0.5), ("encode", 1.0), ("done", 1.0)]
    assert store.events(task_id)[1].detail == {"tokens_done": 10}


def test_finish_is_written_once(open_store, clock):
    store = open_store(clock=clock)
    task_id, _ = store.create({})
    clock.advance(1.0)
    assert store.finish(task_id, {"audios": ["a.flac"]})
    updated_at = store.get(task_id).updated_at
    assert updated_at == clock.now
    clock.advance(1.0)  # a second write would show in updated_at
    assert not store.finish(task_id, {"audios": ["b.flac"]})
    assert not store.fail(task_id, "internal")
    record = store.get(task_id)
    assert (record.phase, record.progress, record.result, record.error) == ("done", 1.0, {"audios": ["a.flac"]},
                                                                            None)
    assert record.updated_at == updated_at and record.summary()["finished"] is True
    assert len(store.events(task_id)) == 2
    assert not store.finish("missing", {})


def test_fail_sets_code_and_message(store):
    first, _ = store.create({})
    store.update(first, "dit", 0.3)
    assert store.fail(first, "timeout:lm", "the LM took too long")
    record = store.get(first)
    assert (record.phase, record.error, record.message, record.progress) == ("failed", "timeout:lm",
                                                                             "the LM took too long", 0.3)
    assert not store.fail(first, "internal") and not store.finish(first, {})
    assert store.get(first).error == "timeout:lm"
    second, _ = store.create({})
    assert store.fail(second, "cancelled")
    assert store.get(second).message == "cancelled" and store.events(second)[-1].phase == "failed"
    assert not store.fail("missing", "internal")


def test_events_order_and_after(open_store, clock):
    store = open_store(clock=clock)
    task_id, _ = store.create({})
    start = clock.now
    for step in range(1, 6):
        clock.advance(1.0)
        store.update(task_id, "lm", step / 10, f"step {step}")
    events = store.events(task_id)
    assert [e.seq for e in events] == list(range(6))
    assert [e.seq for e in store.events(task_id, after=3)] == [4, 5]
    assert store.events(task_id, after=5) == []
    assert events[-1].message == "step 5" and [e.time - start for e in events] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert store.get(task_id).updated_at == events[-1].time


def test_events_are_capped(store):
    task_id, _ = store.create({})
    for step in range(1, 401):
        assert store.update(task_id, "lm", step / 1000)
    events = store.events(task_id)
    assert len(events) == MAX_EVENTS
    assert (events[0].seq, events[0].phase) == (0, "queued")
    assert [e.seq for e in events[1:]] == list(range(400 - MAX_EVENTS + 2, 401))
    assert [e.seq for e in store.events(task_id, after=390)] == list(range(391, 401))
    assert store.get(task_id).progress == 0.4


def test_idempotency_keys(store):
    first, created = store.create({"a": 1}, key_name="alice", idempotency_key="k1", body_digest="d1")
    assert created
    assert store.create({"a": 1}, key_name="alice", idempotency_key="k1", body_digest="d1") == (first, False)
    with pytest.raises(IdempotencyConflict) as conflict:
        store.create({"a": 2}, key_name="alice", idempotency_key="k1", body_digest="d2")
    assert conflict.value.task_id == first
    other, created = store.create({"a": 1}, key_name="bob", idempotency_key="k1", body_digest="d1")
    assert created and other != first
    plain, created = store.create({"a": 1}, key_name="alice", body_digest="d1")
    assert created and plain not in (first, other)
    store.finish(first, {})
    assert store.create({}, key_name="alice", idempotency_key="k1", body_digest="d1") == (first, False)
    assert store.get(first).idempotency_key == "k1" and store.get(first).body_digest == "d1"
    assert store.stats()["records"] == 3


def test_count_unfinished_global_and_per_key(store):
    ids = {name: [store.create({}, key_name=name)[0] for _ in range(count)]
           for name, count in (("alice", 3), ("bob", 2), ("", 1))}
    assert store.count_unfinished() == 6
    assert [store.count_unfinished(name) for name in ("alice", "bob", "", "carol")] == [3, 2, 1, 0]
    store.update(ids["alice"][0], "lm", 0.5)
    store.claim(ids["alice"][1], "replica", 5.0)
    assert store.count_unfinished("alice") == 3
    store.finish(ids["alice"][0], {})
    store.fail(ids["bob"][0], "internal")
    assert store.count_unfinished() == 4
    assert [store.count_unfinished(name) for name in ("alice", "bob", "")] == [2, 1, 1]


def test_get_many(store):
    first, _ = store.create({"n": 1})
    second, _ = store.create({"n": 2})
    found = store.get_many([first, "missing", second])
    assert set(found) == {first, "missing", second} and found["missing"] is None
    assert (found[first].request, found[second].request) == ({"n": 1}, {"n": 2})
    assert store.get_many([]) == {}


def test_stats_counts_every_phase(store):
    ids = [store.create({})[0] for _ in range(8)]
    for task_id, phase in zip(ids[1:6], ("lm", "dit", "encode", "prepare", "train")):
        store.update(task_id, phase, 0.1)
    store.finish(ids[6], {})
    store.fail(ids[7], "overloaded")
    stats = store.stats()
    assert stats == {"tasks": {phase: 1 for phase in PHASES}, "records": 8}
    store.update(ids[0], "dit", 0.5)
    assert store.stats()["tasks"]["queued"] == 0 and store.stats()["tasks"]["dit"] == 2


def test_claim_rules_and_lease_expiry(open_store, clock):
    store = open_store(clock=clock)
    task_id, _ = store.create({})
    assert store.claim(task_id, "a", 30.0)
    assert not store.claim(task_id, "b", 30.0)
    assert store.claim(task_id, "a", 30.0)  # the owner may claim again
    assert store.get(task_id).attempts == 2
    clock.advance(29.0)
    assert task_id not in store.expired() and not store.claim(task_id, "b", 30.0)
    clock.advance(2.0)
    assert store.expired() == [task_id]
    assert store.claim(task_id, "b", 5.0)
    record = store.get(task_id)
    assert (record.owner, record.attempts, record.lease_until) == ("b", 3, clock.now + 5.0)
    assert not store.claim(task_id, "a", 5.0) and not store.renew(task_id, "a", 5.0)
    store.finish(task_id, {})
    assert not store.claim(task_id, "b", 5.0) and not store.claim("missing", "b", 5.0)


def test_renew_release_expired(open_store, clock):
    store = open_store(clock=clock)
    task_id, _ = store.create({}, owner="a", lease_s=30.0)
    store.update(task_id, "dit", 0.4)
    clock.advance(20.0)
    assert store.renew(task_id, "a", 30.0) and not store.renew(task_id, "b", 5.0)
    clock.advance(20.0)
    assert task_id not in store.expired()  # the renewal outlived the first lease
    assert store.get(task_id).lease_until == clock.now + 10.0
    assert not store.release(task_id, "b")
    assert store.release(task_id, "a")
    record = store.get(task_id)
    assert (record.owner, record.lease_until, record.phase, record.progress) == (None, 0.0, "dit", 0.4)
    assert store.expired() == [task_id] and not store.renew(task_id, "a", 5.0)
    assert store.claim(task_id, "b", 5.0) and store.get(task_id).attempts == 2
    store.fail(task_id, "replica_died")
    assert not store.renew(task_id, "b", 5.0) and not store.release(task_id, "b") and store.expired() == []


def test_expired_order_and_limit(open_store, clock):
    store = open_store(clock=clock)
    ids = []
    for owner, lease_s in ((None, 0.0), ("a", 30.0), ("a", 5.0), (None, 0.0), (None, 0.0)):
        ids.append(store.create({}, owner=owner, lease_s=lease_s)[0])
        clock.advance(1.0)  # created one after another
    oldest, leased, short, done, newest = ids
    store.finish(done, {})
    assert store.expired() == [oldest, newest], "the short lease runs 5 s"
    clock.advance(5.0)
    assert store.expired() == [oldest, short, newest]
    assert store.expired(limit=2) == [oldest, short]
    assert leased not in store.expired()


def _in_threads(count: int, work) -> list:
    """``work(index)`` in ``count`` threads at once; their results, re-raising any exception."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(work, range(count)))


def test_claim_is_exclusive_across_threads(store):
    ids = [store.create({})[0] for _ in range(20)]
    barrier = threading.Barrier(8)

    def claimer(owner: int) -> list:
        order = list(ids)
        random.Random(owner).shuffle(order)
        barrier.wait(timeout=30)
        return [task_id for task_id in order if store.claim(task_id, f"t{owner}", 30.0)]

    wins = dict(enumerate(_in_threads(8, claimer)))
    won = [task_id for claimed in wins.values() for task_id in claimed]
    assert sorted(won) == sorted(ids)
    for owner, claimed in wins.items():
        assert all(store.get(task_id).owner == f"t{owner}" for task_id in claimed)
    assert {store.get(task_id).attempts for task_id in ids} == {1}


def test_bounds_hold_under_concurrent_creates(store):
    """Eight threads race to create 40 tasks under a bound of 5 (3 per key): never more."""
    barrier = threading.Barrier(8)

    def creator(index: int) -> int:
        barrier.wait(timeout=30)
        made = 0
        for _ in range(5):
            try:
                store.create({}, key_name=f"k{index % 2}", bounds=(5, 3))
                made += 1
            except StoreFull as full:
                assert full.scope in ("global", "key") and full.unfinished >= 3
        return made

    assert sum(_in_threads(8, creator)) == 5
    assert store.count_unfinished() == 5
    assert max(store.count_unfinished("k0"), store.count_unfinished("k1")) == 3
    store.fail(store.expired()[0], "cancelled")
    store.create({}, bounds=(5, None))  # a finished task frees its place
    with pytest.raises(StoreFull):
        store.create({}, bounds=(5, None))


def _collect(results, workers, timeout_s: float = 60.0) -> list:
    """One report per worker; fails at once when a worker died without reporting."""
    reports, deadline = [], time.monotonic() + timeout_s
    while len(reports) < len(workers):
        try:
            reports.append(results.get(timeout=0.2))
        except queue.Empty:
            dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            assert not dead, f"claim workers died with exit codes {dead}"
            assert time.monotonic() < deadline, "claim workers did not report in time"
    return reports


def test_claim_is_exclusive_across_processes(store, store_url):
    ids = [store.create({})[0] for _ in range(150)]
    context = multiprocessing.get_context("spawn")
    processes = 4
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_claim_worker, args=(store_url, ids, f"p{n}", barrier, results))
               for n in range(processes)]
    for worker in workers:
        worker.start()
    try:
        reports = dict(_collect(results, workers))
    finally:
        for worker in workers:
            worker.join(timeout=30)
    won = [task_id for claimed in reports.values() for task_id in claimed]
    assert sorted(won) == sorted(ids)
    records = store.get_many(ids)
    for owner, claimed in reports.items():
        assert all(records[task_id].owner == owner for task_id in claimed)
    assert {record.attempts for record in records.values()} == {1}


def test_concurrent_updates_keep_events_consistent(open_store):
    stores = [open_store() for _ in range(4)]
    task_id, _ = stores[0].create({})
    barrier = threading.Barrier(len(stores))

    def reporter(index: int) -> int:
        barrier.wait(timeout=30)
        steps = range(index, 120, len(stores))
        return sum(stores[index].update(task_id, "lm", (step + 1) / 200) for step in steps)

    accepted = sum(_in_threads(len(stores), reporter))
    events = stores[1].events(task_id)
    assert [e.seq for e in events] == list(range(accepted + 1))
    assert all(a.progress < b.progress for a, b in zip(events[1:], events[2:]))
    assert stores[2].get(task_id).progress == events[-1].progress == max(e.progress for e in events)


def test_purge_by_ttl(open_store, clock):
    store = open_store(ttl_s=60.0, clock=clock)
    finished = [store.create({})[0] for _ in range(3)]
    unfinished = [store.create({})[0] for _ in range(2)]
    store.finish(finished[0], {})
    store.fail(finished[1], "internal")
    store.finish(finished[2], {})
    assert store.purge() == 0 and store.stats()["records"] == 5
    clock.advance(59.0)
    assert store.purge() == 0 and store.stats()["records"] == 5
    clock.advance(2.0)
    assert store.purge() == 3
    assert all(store.get(task_id) is None and store.events(task_id) is None for task_id in finished)
    assert all(store.get(task_id) is not None for task_id in unfinished)
    assert store.stats() == {"tasks": {**{p: 0 for p in PHASES}, "queued": 2}, "records": 2}


def test_purge_frees_idempotency_keys(open_store, clock):
    store = open_store(ttl_s=60.0, clock=clock)
    first, _ = store.create({}, key_name="alice", idempotency_key="k", body_digest="d1")
    store.finish(first, {})
    clock.advance(61.0)
    assert store.purge() == 1
    second, created = store.create({}, key_name="alice", idempotency_key="k", body_digest="d2")
    assert created and second != first


def test_record_cap_keeps_storage_flat(open_store):
    store = open_store(max_records=200)
    ids, peak = [], 0
    for n in range(600):
        task_id, _ = store.create({"n": n})
        store.finish(task_id, {})
        ids.append(task_id)
        if n % 10 == 0:
            peak = max(peak, store.stats()["records"])
    assert 200 <= peak <= 200 + store.purge_every
    store.purge()
    assert store.stats()["records"] == 200
    assert store.get(ids[-1]) is not None and store.get(ids[0]) is None
    assert all(store.get(task_id) is not None for task_id in ids[-150:])


def test_purge_never_deletes_unfinished(open_store, clock):
    store = open_store(max_records=50, clock=clock)
    unfinished = [store.create({})[0] for _ in range(80)]
    done = [store.create({})[0] for _ in range(10)]
    for task_id in done:
        store.finish(task_id, {})
    store.purge()
    assert store.stats()["records"] == 80 and store.count_unfinished() == 80
    assert all(record is not None for record in store.get_many(unfinished).values())
    clock.advance(10 ** 6)
    assert store.purge() == 0


def test_data_survives_reopening(open_store):
    first = open_store()
    task_id, _ = first.create({"caption": "x"}, key_name="alice", idempotency_key="k", body_digest="d")
    first.update(task_id, "lm", 0.5, "half", {"tokens_done": 5})
    first.claim(task_id, "a", 30.0)
    done, _ = first.create({})
    first.finish(done, {"audios": [1]})
    record, events = first.get(task_id), first.events(task_id)
    first.close()
    second = open_store()
    assert second.get(task_id) == record and second.events(task_id) == events
    assert second.get(done).result == {"audios": [1]}
    assert second.create({}, key_name="alice", idempotency_key="k", body_digest="d") == (task_id, False)
    assert second.count_unfinished("alice") == 1 and not second.claim(task_id, "b", 5.0)
    assert second.stats()["records"] == 2


def test_ping_and_close(open_store):
    store = open_store()
    assert store.ping()
    store.close()


def test_wait_helpers(store):
    task_id, _ = store.create({})

    def later(action) -> None:
        threading.Timer(0.1, action).start()

    async def scenario():
        assert [e.seq for e in await wait_events(store, task_id, timeout_s=1.0, poll_s=0.02)] == [0]
        assert await wait_events(store, task_id, after=0, timeout_s=0.1, poll_s=0.02) == []
        assert await wait_events(store, "missing", timeout_s=0.1) is None
        later(lambda: store.update(task_id, "lm", 0.3))
        # it returns on the event: waiting out its own minute would trip the half-minute guard
        events = await asyncio.wait_for(wait_events(store, task_id, after=0, timeout_s=60.0, poll_s=0.02), 30)
        assert [e.seq for e in events] == [1]
        assert await wait_final(store, task_id, timeout_s=0.1, poll_s=0.02) == "lm"
        assert await wait_final(store, "missing", timeout_s=0.1) is None
        later(lambda: store.finish(task_id, {}))
        assert await asyncio.wait_for(wait_final(store, task_id, timeout_s=60.0, poll_s=0.02), 30) == "done"

    asyncio.run(scenario())


def test_open_task_store_urls(tmp_path, redis_url, monkeypatch):
    nested = tmp_path / "a" / "b" / "tasks.db"
    store = open_task_store(f"sqlite://{nested}", ttl_s=5.0, max_records=7)
    assert isinstance(store, SQLiteTaskStore) and nested.exists() and store.path == str(nested)
    assert (store.ttl_s, store.max_records) == (5.0, 7)
    store.close()
    plain = open_task_store(str(tmp_path / "plain" / "tasks.db"))
    assert isinstance(plain, SQLiteTaskStore) and (tmp_path / "plain" / "tasks.db").exists()
    plain.close()
    monkeypatch.chdir(tmp_path)
    relative = open_task_store("state/tasks.db")
    assert relative.path == str(tmp_path / "state" / "tasks.db")
    relative.close()
    four_slashes = open_task_store(f"sqlite:///{nested}")
    assert four_slashes.path == str(nested)
    four_slashes.close()
    remote = open_task_store(redis_url, max_records=9)
    assert isinstance(remote, RedisTaskStore) and remote.max_records == 9 and remote.ping()
    remote.close()
    for bad in ("ftp://host/tasks", "sqlite://"):
        with pytest.raises(ValueError, match=bad.partition(":")[0]):
            open_task_store(bad)


def test_redis_gives_finished_records_a_ttl(redis_url):
    store = RedisTaskStore(redis_url, ttl_s=100.0, prefix="ttl-test")
    client = redis.Redis.from_url(redis_url)
    try:
        running, _ = store.create({})
        done, _ = store.create({}, idempotency_key="k")
        store.finish(done, {})
        assert client.ttl(f"ttl-test:task:{running}") == -1
        for key in (f"ttl-test:task:{done}", f"ttl-test:events:{done}", store._idem_key("", "k")):
            assert 100 < client.ttl(key) <= math.ceil(100.0) + 60
    finally:
        client.close()
        store.close()


def test_redis_server_helper_needs_the_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="redis-server"):
        with start_redis(tmp_path):
            pass


def test_settings_are_shared_by_every_store_on_the_same_url(open_store, clock):
    first, second = open_store(clock=clock), open_store(clock=clock)
    assert first.get_setting("lora_default") is None
    first.put_setting("lora_default", {"adapters": {"warm": 0.5}, "use_lora": True})
    assert second.get_setting("lora_default") == {"adapters": {"warm": 0.5}, "use_lora": True}
    second.put_setting("lora_default", {"adapters": {}, "use_lora": False})
    assert first.get_setting("lora_default") == {"adapters": {}, "use_lora": False}
    first.fail(first.create({"caption": "x"})[0], "internal")
    clock.advance(10 ** 9)
    assert first.purge() == 1
    assert second.get_setting("lora_default") == {"adapters": {}, "use_lora": False}  # purge keeps settings


def test_settings_by_prefix_and_deleted(open_store):
    first, second = open_store(), open_store()
    first.put_setting("holdings/a", {"loaded": ["warm"]})
    second.put_setting("holdings/b", {"loaded": []})
    first.put_setting("holdingsX", 1)
    first.put_setting("lora_default", {"adapters": {}})
    first.put_setting("hold_%_like", 2)  # SQL LIKE wildcards in a name are plain characters
    assert second.settings("holdings/") == {"holdings/a": {"loaded": ["warm"]}, "holdings/b": {"loaded": []}}
    assert first.settings("hold_%") == {"hold_%_like": 2}
    second.delete_setting("holdings/a")
    second.delete_setting("never-set")
    assert first.settings("holdings/") == {"holdings/b": {"loaded": []}}
    assert first.get_setting("holdings/a") is None


def test_token_buckets_are_shared_by_every_store_client(open_store, clock):
    """Two clients of one store (two ingress replicas) charge one bucket: a burst of 2 passes once
    across both, and the bucket refills at its rate (on the stores' clock, or at ``now``)."""
    first, second = open_store(clock=clock), open_store(clock=clock)
    now = 5000.0
    assert first.take_token("rpm:alice", 0.5, 2.0, now=now) == 0.0
    assert second.take_token("rpm:alice", 0.5, 2.0, now=now) == 0.0
    assert first.take_token("rpm:alice", 0.5, 2.0, now=now) == pytest.approx(2.0)  # 1 token / 0.5 per s
    assert second.take_token("rpm:bob", 0.5, 2.0, now=now) == 0.0  # another key, its own bucket
    assert second.take_token("rpm:alice", 0.5, 2.0, now=now + 1.0) == pytest.approx(1.0)  # half a token
    assert first.take_token("rpm:alice", 0.5, 2.0, now=now + 2.0) == 0.0
    assert second.take_token("rpm:alice", 0.5, 2.0, now=now + 2.0) > 0
    clock.now = now + 2.0
    assert first.take_token("rpm:alice", 0.5, 2.0) == pytest.approx(2.0)
    clock.advance(2.0)
    assert second.take_token("rpm:alice", 0.5, 2.0) == 0.0


def test_claim_order_is_fair_across_keys_and_classes(open_store, clock):
    """``expired`` lists claimable tasks in the claim order: a higher class first, then the key
    with fewest tasks under a live lease, then the key whose latest start is oldest; one key's
    own tasks oldest first."""
    store = open_store(clock=clock)
    flood = []
    for _ in range(6):
        flood.append(store.create({}, key_name="a")[0])
        clock.advance(1.0)
    assert store.expired() == flood  # one key alone: oldest first
    assert store.claim(flood[0], "driver", 30.0)
    late = store.create({}, key_name="b")[0]
    clock.advance(1.0)
    assert store.expired(limit=3) == [late, flood[1], flood[2]]  # a runs one task, b none
    assert store.claim(late, "driver", 30.0) and store.finish(late, {})
    store.finish(flood[0], {})
    again = store.create({}, key_name="b")[0]
    clock.advance(1.0)
    # nothing running: b's last start is newer than a's, so a's next task goes first
    assert store.expired(limit=2) == [flood[1], again]
    urgent = store.create({}, key_name="a", priority=2)[0]
    low = store.create({}, key_name="c", priority=0)[0]
    assert store.expired()[0] == urgent and store.expired()[-1] == low
    assert store.get(urgent).priority == 2 and store.get(late).started_at > 0


def test_sqlite_file_from_before_the_fair_share_columns_opens(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("""CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY, key_name TEXT NOT NULL, phase TEXT NOT NULL,
        finished INTEGER NOT NULL, progress REAL NOT NULL, message TEXT NOT NULL, detail TEXT,
        created_at REAL NOT NULL, updated_at REAL NOT NULL, request TEXT, result TEXT, error TEXT,
        attempts INTEGER NOT NULL, owner TEXT, lease_until REAL NOT NULL, idempotency_key TEXT,
        body_digest TEXT, last_seq INTEGER NOT NULL)""")
    conn.execute("INSERT INTO tasks VALUES ('old', 'a', 'queued', 0, 0, 'queued', NULL, 1, 1, '{}', NULL, NULL, "
                 "0, NULL, 0, NULL, NULL, 0)")
    conn.commit()
    conn.close()
    store = SQLiteTaskStore(str(path))
    try:
        assert store.get("old").priority == 1 and store.expired() == ["old"]
        assert store.claim("old", "driver", 30.0) and store.get("old").started_at > 0
    finally:
        store.close()
