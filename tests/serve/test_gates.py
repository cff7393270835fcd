"""The fair-share gates in front of the model deployments (``serve.gates``): calls beyond a
deployment's room wait at the ingress in the fair-share order instead of in Serve's first-come queue."""

from __future__ import annotations

import asyncio

import pytest

from serve.config import AppConfig
from serve.gates import FairGate, Gates


async def _hold(gate, tenant, entered, release, priority=1):
    async with gate.slot(tenant, priority):
        entered.append(tenant)
        await release[tenant].wait()


def test_a_flood_waits_its_turn_behind_another_keys_call():
    async def main():
        gate, entered = FairGate(lambda: 2), []
        release = {"a": asyncio.Event(), "b": asyncio.Event()}
        flood = [asyncio.create_task(_hold(gate, "a", entered, release)) for _ in range(10)]
        await asyncio.sleep(0)
        late = asyncio.create_task(_hold(gate, "b", entered, release))
        await asyncio.sleep(0)
        assert entered == ["a", "a"] and gate.stats()["waiting"] == 9
        release["a"].set()  # every a call leaves as soon as it enters
        release["b"].set()
        await asyncio.gather(*flood, late)
        return entered

    entered = asyncio.run(main())
    assert entered.index("b") == 2, entered  # the first room that frees goes to b, not to a's 3rd call


def test_higher_classes_go_first_and_cancelled_waiters_leave_no_trace():
    async def main():
        gate, entered = FairGate(lambda: 1), []
        release = {name: asyncio.Event() for name in ("first", "low", "high", "gone")}
        first = asyncio.create_task(_hold(gate, "first", entered, release))
        await asyncio.sleep(0)
        low = asyncio.create_task(_hold(gate, "low", entered, release, priority=0))
        gone = asyncio.create_task(_hold(gate, "gone", entered, release, priority=2))
        high = asyncio.create_task(_hold(gate, "high", entered, release, priority=2))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        for event in release.values():
            event.set()
        await asyncio.gather(first, low, high)
        return entered, gate.stats()

    entered, stats = asyncio.run(main())
    assert entered == ["first", "high", "low"]
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_room_follows_the_replicas_and_a_deployment_at_zero_counts_as_one():
    config = {"demo": True, "dit": {"extra_models": ["acestep-v15-base"], "deployment": {"max_ongoing_requests": 16}},
              "lm": {"deployment": {"max_ongoing_requests": 8}}}
    gates = Gates.for_config(AppConfig.model_validate(config))
    counts = {}
    gates.replicas = lambda: counts
    assert gates.capacity("DiTDeployment") == 16 and gates.capacity("DiTDeployment-acestep-v15-base") == 16
    counts.update({"DiTDeployment": 3, "LMDeployment": 0, "Ingress": 2})
    assert gates.capacity("DiTDeployment") == 24 and gates.capacity("LMDeployment") == 4

    async def main():
        gate = gates.gate("LMDeployment")
        counts["LMDeployment"], held = 0, []
        release = {"a": asyncio.Event()}
        tasks = [asyncio.create_task(_hold(gate, "a", held, release)) for _ in range(12)]
        await asyncio.sleep(0)
        assert len(held) == 4
        counts.update({"LMDeployment": 2, "Ingress": 1})  # scaled up: the next refresh lets more in
        gates.refresh()
        await asyncio.sleep(0)
        assert len(held) == 12  # room for 16 now
        release["a"].set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
