"""Task webhooks: the address rules, the signature, the outbox in both task store backends, and
deliveries from the driver to a real HTTP receiver on loopback (``allow_private``).

Store and driver read one fake clock, so leases lapse and retries fall due when a test moves it;
waits on real time are bounded guards against hangs only.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from serve.config import WebhookSettings
from serve.driver import DriverSettings, TaskDriver
from serve.store import open_task_store
from serve.webhooks import (
    WebhookRefused, WebhookSecrets, WebhookSender, check_url, pinned, resolve, sign, verify_signature,
)
from tests.clock import FakeClock
from tests.serve.hook_receiver import Receiver
from tests.serve.test_task_store import clock, open_store, redis_url, store_url  # noqa: F401 (both backends)

SECRET = "whsec-test"


# -- address rules ------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "http://127.0.0.1/h", "http://10.1.2.3/h", "http://192.168.0.9:8080/h", "http://172.16.0.1/h",
    "http://169.254.169.254/latest/meta-data", "http://224.0.0.1/h", "http://0.0.0.0/h", "http://240.0.0.1/h",
    "http://100.64.0.1/h", "http://[::1]/h", "http://[fe80::1]/h", "http://[fc00::1]/h", "http://[ff02::1]/h",
    "http://[::]/h", "http://[::ffff:127.0.0.1]/h", "http://[::ffff:10.0.0.1]/h", "https://localhost/h",
])
def test_non_public_addresses_are_refused_unless_allowed(url):
    with pytest.raises(WebhookRefused, match="address"):
        check_url(url)
    check_url(url, allow_private=True)


def test_public_addresses_pass_and_every_resolved_address_counts():
    check_url("https://93.184.216.34/hook")
    check_url("http://[2606:4700:4700::1111]:8443/hook")
    public = {"hooks.example": ["93.184.216.34"], "mixed.example": ["93.184.216.34", "10.0.0.7"],
              "mapped.example": ["::ffff:169.254.169.254"]}

    def resolver(host, port):
        return public[host]

    check_url("https://hooks.example/x", resolver=resolver)
    for host in ("mixed.example", "mapped.example"):  # one private answer among public ones is enough
        with pytest.raises(WebhookRefused, match="address"):
            check_url(f"https://{host}/x", resolver=resolver)


@pytest.mark.parametrize("url, reason", [
    ("ftp://93.184.216.34/h", "http"), ("file:///etc/passwd", "http"), ("http:///nohost", "http"),
    ("http://user:pw@93.184.216.34/h", "credentials"), ("http://93.184.216.34:99999/h", "valid URL"),
    ("http://93.184.216.34/" + "a" * 2100, "2048"),
])
def test_malformed_urls_are_refused(url, reason):
    with pytest.raises(WebhookRefused, match=reason):
        check_url(url, allow_private=True)


def test_unresolvable_hosts_are_refused():
    def resolver(host, port):
        raise OSError("no such host")

    with pytest.raises(WebhookRefused, match="resolved"):
        check_url("https://nowhere.example/h", resolver=resolver)


def test_pinned_calls_the_checked_address_under_the_name():
    assert pinned("https://h.example/x?q=1", "2606:4700::1") == (
        "https://[2606:4700::1]/x?q=1", {"Host": "h.example"}, {"sni_hostname": "h.example"})
    assert pinned("http://h.example:8080/x", "93.184.216.34") == (
        "http://93.184.216.34:8080/x", {"Host": "h.example:8080"}, {})


# -- signature ----------------------------------------------------------------------------------

def test_signature_round_trip_and_what_breaks_it():
    body = b'{"event":"task.done"}'
    header = sign(SECRET, body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify_signature(SECRET, header, body, tolerance_s=300, now=1_700_000_100)
    assert not verify_signature("another secret", header, body, now=1_700_000_100)
    assert not verify_signature(SECRET, header, body + b" ", now=1_700_000_100)  # body changed
    assert not verify_signature(SECRET, header, body, tolerance_s=300, now=1_700_000_301)  # too old: a replay
    forged = header.replace("t=1700000000", "t=1700000200")  # a fresh timestamp on an old signature
    assert not verify_signature(SECRET, forged, body, now=1_700_000_200)
    for bad in ("", "v1=abc", "t=abc,v1=00", "t=1700000000"):
        assert not verify_signature(SECRET, bad, body, now=1_700_000_000)
    rotated = f"{sign('old secret', body, 1_700_000_000)},{header.split(',')[1]}"
    assert verify_signature(SECRET, rotated, body, now=1_700_000_000)  # any v1 may match


def test_secrets_per_key_then_the_server_secret(tmp_path):
    keys = tmp_path / "webhook-secrets"
    keys.write_text("# key name:secret\nalice:alice-secret\n")
    settings = WebhookSettings(secrets_file=str(keys), secret_env="TEST_WEBHOOK_SECRET")
    secrets = WebhookSecrets.load(settings, env={"TEST_WEBHOOK_SECRET": "server-secret"})
    assert secrets.for_key("alice") == "alice-secret" and secrets.for_key("bob") == "server-secret"
    assert WebhookSecrets.load(WebhookSettings(), env={}).for_key("") is None
    keys.write_text("alice\n")
    with pytest.raises(ValueError, match="line 1"):
        WebhookSecrets.load(settings, env={})
    with pytest.raises(ValueError, match="lease_s"):
        WebhookSettings(lease_s=10, timeout_s=10)


# -- the outbox in both store backends -----------------------------------------------------------

def _hooked(url="http://hooks.example/h"):
    return {"extras": {"webhook_url": url}}


def test_finishing_writes_one_delivery_with_the_public_record(open_store, clock):
    store = open_store(clock=clock)
    done, _ = store.create(_hooked(), key_name="alice")
    failed, _ = store.create(_hooked())
    plain, _ = store.create({"extras": {}})
    assert store.finish(done, {"audios": []}) and store.fail(failed, "internal", "boom") and store.finish(plain, {})
    assert not store.finish(done, {"audios": ["again"]})  # written once: no second delivery either
    delivery = store.get_delivery(f"{done}.done")
    assert (delivery.state, delivery.event, delivery.key_name, delivery.url) == (
        "pending", "task.done", "alice", "http://hooks.example/h")
    assert delivery.payload["task"] == store.get(done).summary() and delivery.payload["id"] == f"{done}.done"
    assert "request" not in delivery.payload["task"] and "key_name" not in delivery.payload["task"]
    assert store.get_delivery(f"{failed}.failed").payload["task"]["error"] == "internal"
    assert store.get_delivery(f"{plain}.done") is None
    assert sorted(d.delivery_id for d in store.claim_deliveries("a", 60)) == sorted([f"{done}.done", f"{failed}.failed"])


def test_delivery_claim_lease_reschedule_and_done(open_store, clock):
    store = open_store(clock=clock)
    task_id, _ = store.create(_hooked())
    store.finish(task_id, {})
    delivery_id = f"{task_id}.done"
    [claimed] = store.claim_deliveries("a", 60)
    assert (claimed.delivery_id, claimed.attempts, claimed.owner) == (delivery_id, 1, "a")
    assert store.claim_deliveries("b", 60) == []  # leased to a
    assert not store.settle_delivery(delivery_id, "b", True)
    assert store.settle_delivery(delivery_id, "a", False, retry_at=clock() + 30, error="HTTP 500")
    assert store.get_delivery(delivery_id).last_error == "HTTP 500"
    clock.advance(29)
    assert store.claim_deliveries("b", 60) == []  # not due yet
    clock.advance(2)
    assert [d.attempts for d in store.claim_deliveries("b", 60)] == [2]
    clock.advance(61)  # b died mid-call: its lease lapses and the delivery is sent again
    assert [d.owner for d in store.claim_deliveries("a", 60)] == ["a"]
    assert not store.settle_delivery(delivery_id, "b", True)  # b lost it
    assert store.settle_delivery(delivery_id, "a", True)
    clock.advance(1000)
    assert store.claim_deliveries("a", 60) == [] and store.get_delivery(delivery_id).state == "delivered"
    assert not store.settle_delivery(delivery_id, "a", True)


def test_deliveries_are_abandoned_and_survive_reopening(open_store, clock):
    store = open_store(clock=clock)
    first, _ = store.create(_hooked())
    second, _ = store.create(_hooked())
    store.finish(first, {})
    clock.advance(1)  # due later: claimed after the first
    store.finish(second, {})
    assert [d.delivery_id for d in store.claim_deliveries("a", 60, limit=1)] == [f"{first}.done"]
    assert store.settle_delivery(f"{first}.done", "a", False, retry_at=None, error="HTTP 410")
    assert store.get_delivery(f"{first}.done").state == "abandoned"
    store.close()
    reopened = open_store(clock=clock)  # a restart: the pending delivery is still owed
    assert [d.delivery_id for d in reopened.claim_deliveries("b", 60)] == [f"{second}.done"]


def test_concurrent_claimers_never_share_a_delivery(open_store, clock):
    store = open_store(clock=clock)
    for _ in range(12):
        task_id, _ = store.create(_hooked())
        store.finish(task_id, {})
    others = [open_store(clock=clock) for _ in range(3)]
    results = [[] for _ in others]

    def claim(index):
        for _ in range(6):
            results[index] += [d.delivery_id for d in others[index].claim_deliveries(f"o{index}", 60, limit=2)]

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(others))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    claimed = [d for ids in results for d in ids]
    assert len(claimed) == 12 and len(set(claimed)) == 12


# -- deliveries to a loopback receiver ----------------------------------------------------------

@pytest.fixture
def receiver():
    made = []

    def factory(statuses=()):
        made.append(Receiver(SECRET, statuses))
        return made[-1]

    yield factory
    for item in made:
        item.close()


def _driver(store, owner, resolver=resolve, **webhooks):
    settings = WebhookSettings(allow_private=True, backoff_s=10, lease_s=60, timeout_s=10, **webhooks)
    sender = WebhookSender(store, settings, WebhookSecrets(SECRET), owner, resolver=resolver)
    timeouts = {"queued": 600.0, "lm": 600.0, "dit": 600.0, "encode": 600.0}
    driver = TaskDriver(store, _pipeline, DriverSettings(max_drives=4, lease_s=30, retries=0, retry_backoff_s=0,
                                                         timeouts=timeouts, poll_s=0.05),
                        owner, clock=store.clock, webhooks=sender)
    return driver, sender


async def _pipeline(record):
    if (record.request.get("extras") or {}).get("fail"):
        raise RuntimeError("the pipeline broke")
    return {"audios": [], "metadata": {}, "time_costs": {}, "status_message": "ok"}


async def _until(condition, what, timeout_s=30.0):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


def test_each_finished_task_is_delivered_once_signed(tmp_path, receiver):
    hook = receiver(statuses=[500])  # the first attempt fails and is retried after the backoff
    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}", clock=FakeClock())

    async def run():
        driver, sender = _driver(store, "a")
        ids = [store.create({"extras": {"webhook_url": hook.url, "fail": i == 2}})[0] for i in range(3)]
        for task_id in ids:
            driver.start(task_id)
        await _until(lambda: len(hook.received) == 3, "three first attempts")
        await _until(lambda: sender._pumping.done(), "the pump settled them")
        assert await sender.pump() == 0  # the failed one waits for its backoff
        store.clock.advance(11)
        assert await sender.pump() == 1
        return ids

    ids = asyncio.run(run())
    copies = hook.by_delivery()
    assert set(copies) == {f"{ids[0]}.done", f"{ids[1]}.done", f"{ids[2]}.failed"}
    assert len(hook.received) == 4 and sum(len(bodies) for bodies in copies.values()) == 4
    retried = next(bodies for bodies in copies.values() if len(bodies) == 2)
    assert retried[0] == retried[1]  # the same body each attempt: the receiver de-duplicates on its id
    failed = json.loads(copies[f"{ids[2]}.failed"][0])["task"]
    assert (failed["phase"], failed["error"]) == ("failed", "internal") and "request" not in failed
    assert all(store.get_delivery(d).state == "delivered" for d in copies)
    store.close()


def test_a_dead_senders_claim_lapses_and_a_restarted_server_delivers(tmp_path, receiver):
    hook = receiver()
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    fake = FakeClock()
    store = open_task_store(url, clock=fake)
    task_id, _ = store.create({"extras": {"webhook_url": hook.url}})
    assert store.finish(task_id, {"audios": []})
    assert len(store.claim_deliveries("replica-killed-mid-call", 60)) == 1
    store.close()

    async def restarted():
        reopened = open_task_store(url, clock=fake)
        _, sender = _driver(reopened, "b")
        assert await sender.pump() == 0  # still leased to the dead replica
        fake.advance(61)
        assert await sender.pump() == 1
        fake.advance(3600)
        assert await sender.pump() == 0  # delivered: never again
        reopened.close()

    asyncio.run(restarted())
    assert list(hook.by_delivery()) == [f"{task_id}.done"] and len(hook.received) == 1


def test_redirects_are_not_followed_and_attempts_run_out(tmp_path, receiver):
    hook = receiver(statuses=[302, 302])
    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}", clock=FakeClock())
    task_id, _ = store.create({"extras": {"webhook_url": hook.url}})
    store.finish(task_id, {})

    async def run():
        _, sender = _driver(store, "a", max_attempts=2)
        assert await sender.pump() == 1
        store.clock.advance(11)
        assert await sender.pump() == 1

    asyncio.run(run())
    delivery = store.get_delivery(f"{task_id}.done")
    assert (delivery.state, delivery.attempts, delivery.last_error) == ("abandoned", 2, "HTTP 302")
    assert [path for _, _, path in hook.received] == ["/hook", "/hook"]  # /elsewhere never called
    store.close()


def test_delivery_rechecks_the_address_rules(tmp_path, receiver):
    hook = receiver()
    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}", clock=FakeClock())
    task_id, _ = store.create({"extras": {"webhook_url": hook.url}})
    store.finish(task_id, {})

    async def run():
        _, sender = _driver(store, "a")
        sender.settings = WebhookSettings(allow_private=False)  # loopback is no longer allowed
        assert await sender.pump() == 1
        with pytest.raises(WebhookRefused, match="loopback"):
            await sender.check_submission(hook.url, "")

    asyncio.run(run())
    assert hook.received == [] and "loopback" in store.get_delivery(f"{task_id}.done").last_error
    store.close()


def test_an_attempt_connects_to_the_address_it_checked(tmp_path, receiver):
    hook = receiver()
    port = hook.server.server_port
    store = open_task_store(f"sqlite:///{tmp_path / 'tasks.db'}", clock=FakeClock())
    task_id, _ = store.create({"extras": {"webhook_url": f"http://hooks.invalid:{port}/hook"}})
    store.finish(task_id, {})

    async def run():
        # only the checked answer knows this name: had the client resolved it again, nothing would arrive
        _, sender = _driver(store, "a", resolver=lambda host, port: {"hooks.invalid": ["127.0.0.1"]}[host])
        assert await sender.pump() == 1

    asyncio.run(run())
    [(headers, _, _)] = hook.received
    assert headers["Host"] == f"hooks.invalid:{port}" and list(hook.by_delivery()) == [f"{task_id}.done"]
    store.close()
