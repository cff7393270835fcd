"""Fair-share gates in front of the model deployments, one per deployment in each ingress replica.

Serve queues the calls a deployment's replicas cannot take yet (beyond their ``max_ongoing_requests``)
in its router, first come first served: a key that floods the queue would go ahead of every later key
there, whatever the task store's claim order and the engines' admission order say. So an ingress
replica sends a deployment at most its share of the deployment's room (``max_ongoing_requests`` times
its running replicas, over the running ingress replicas) and keeps the other calls waiting here, in
the order of ``acestep.fairness`` (priority class, then the key with the fewest calls in service).
A deployment at zero replicas counts as one, so that the first call reaches Serve and starts one.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable, Dict, List, Tuple

from acestep.fairness import DEFAULT_PRIORITY, Entry, Turns
from serve.models import deployment_name

INGRESS_DEPLOYMENT = "Ingress"


class FairGate:
    """At most ``capacity()`` holders at once; waiters are let in by the fair-share rule."""

    def __init__(self, capacity: Callable[[], int]):
        self.capacity = capacity
        self.running: List[Entry] = []
        self.waiting: List[Tuple[Entry, asyncio.Future]] = []
        self.turns = Turns()
        self.waited = 0  # calls that found the gate full (a count for stats)

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str = "", priority: int = DEFAULT_PRIORITY) -> AsyncIterator[None]:
        entry = Entry(tenant, priority)
        if not self.waiting and len(self.running) < self.capacity():
            self._enter(entry)
        else:
            self.waited += 1
            ticket = asyncio.get_running_loop().create_future()
            self.waiting.append((entry, ticket))
            try:
                await ticket
            except asyncio.CancelledError:
                if ticket.done() and not ticket.cancelled():  # let in as it was cancelled: give it back
                    self._leave(entry)
                else:
                    self.waiting = [(e, t) for e, t in self.waiting if t is not ticket]
                raise
        try:
            yield
        finally:
            self._leave(entry)

    def admit(self) -> None:
        """Let waiters in while there is room (the room may have grown: call after a refresh)."""
        while self.waiting and len(self.running) < self.capacity():
            index = self.turns.pick([entry for entry, _ in self.waiting], self.running)
            entry, ticket = self.waiting.pop(index)
            if ticket.done():  # cancelled while waiting
                continue
            self._enter(entry)
            ticket.set_result(None)

    def _enter(self, entry: Entry) -> None:
        self.running.append(entry)
        self.turns.served(entry.tenant, [*self.running, *(e for e, _ in self.waiting)])

    def _leave(self, entry: Entry) -> None:
        self.running.remove(entry)
        self.admit()

    def stats(self) -> Dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting), "capacity": self.capacity(),
                "waited": self.waited}


class Gates:
    """One ``FairGate`` per deployment name; ``replicas()`` gives running replicas per deployment
    (the ingress's refreshed view) and ``room`` each deployment's ``max_ongoing_requests``."""

    def __init__(self, room: Dict[str, int], replicas: Callable[[], Dict[str, int]] = dict):
        self.room, self.replicas = dict(room), replicas
        self._gates: Dict[str, FairGate] = {}

    @classmethod
    def for_config(cls, config) -> "Gates":
        """A gate per served model's deployment, its room that deployment's ``max_ongoing_requests``."""
        room = {deployment_name("lm", name, config.lm.model): config.lm.deployment.max_ongoing_requests
                for name in config.lm_models()}
        room.update({deployment_name("dit", name, config.dit.model): config.dit.deployment.max_ongoing_requests
                     for name in config.dit_models()})
        return cls(room)

    def capacity(self, deployment: str) -> int:
        counts = self.replicas() or {}
        share = self.room[deployment] * max(1, counts.get(deployment, 0))
        return max(1, share // max(1, counts.get(INGRESS_DEPLOYMENT, 0)))

    def gate(self, deployment: str) -> FairGate:
        if deployment not in self._gates:
            self._gates[deployment] = FairGate(lambda: self.capacity(deployment))
        return self._gates[deployment]

    def refresh(self) -> None:
        for gate in self._gates.values():
            gate.admit()

    def stats(self) -> Dict[str, Dict[str, int]]:
        return {name: gate.stats() for name, gate in self._gates.items()}
