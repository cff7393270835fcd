"""Fair share between tenants: which waiting work goes next.

One rule for every queue that serves several tenants (the serving layer's task claim order, the LM
engine's admission, the DiT running batch's admission), so that all stages agree:

1. the highest priority class with waiting work goes first (strict order between classes);
2. within that class, the tenant with the least work in service goes first (its running cost: the
   tasks or rows it holds now), so a tenant that floods the queue takes turns with the others
   instead of going ahead of them;
3. ties go to the tenant served least recently (never served: first), then to the one whose oldest
   waiting work arrived first; a tenant's own work keeps its arrival order.

With equal costs this is round robin over the tenants of a class (a deficit round robin with a
one-item quantum), so within a class a tenant's next item waits behind at most one item of each
other tenant with work waiting, however many those have queued. A tenant is an opaque name (the serving layer passes its
API key's name); the priority is a class rank, higher first (``PRIORITY_CLASSES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

# Priority classes by name → rank (higher goes first); requests without one are "normal".
PRIORITY_CLASSES: Dict[str, int] = {"low": 0, "normal": 1, "high": 2}
DEFAULT_CLASS = "normal"
DEFAULT_PRIORITY = PRIORITY_CLASSES[DEFAULT_CLASS]


@dataclass(frozen=True)
class Share:
    """Whose request it is and its class, as a caller hands them to an engine."""

    tenant: str = ""
    priority: int = DEFAULT_PRIORITY


@dataclass(frozen=True)
class Entry:
    """One waiting piece of work: whose it is, its class and what it costs once in service."""

    tenant: str = ""
    priority: int = DEFAULT_PRIORITY
    cost: float = 1.0


Queue = Tuple[int, str]  # (priority, tenant)


def next_queue(heads: Mapping[Queue, int], served: Mapping[str, float],
               last: Optional[Mapping[str, float]] = None) -> Optional[Queue]:
    """The (priority, tenant) queue served next: ``heads`` maps each non-empty queue to its oldest
    entry's arrival position, ``served`` each tenant's cost in service (absent: 0), ``last`` when
    each tenant was last served (any increasing measure; absent: never)."""
    if not heads:
        return None
    last = last or {}
    return min(heads, key=lambda q: (-q[0], served.get(q[1], 0.0), last.get(q[1], float("-inf")), heads[q]))


def fair_order(entries: Sequence[Entry], served: Mapping[str, float], last: Optional[Mapping[str, float]] = None,
               limit: Optional[int] = None) -> List[int]:
    """Indices of ``entries`` (given in arrival order) in the order the rule serves them, each pick
    adding its cost to its tenant's service and making it the last served; at most ``limit``."""
    queues: Dict[Queue, List[int]] = {}
    for index, entry in enumerate(entries):
        queues.setdefault((entry.priority, entry.tenant), []).append(index)
    cursor = {queue: 0 for queue in queues}
    load, recent = dict(served), dict(last or {})
    now = max(recent.values(), default=0.0)
    order: List[int] = []
    wanted = len(entries) if limit is None else min(limit, len(entries))
    while len(order) < wanted:
        heads = {q: ids[cursor[q]] for q, ids in queues.items() if cursor[q] < len(ids)}
        queue = next_queue(heads, load, recent)
        index = heads[queue]
        cursor[queue] += 1
        order.append(index)
        load[queue[1]] = load.get(queue[1], 0.0) + entries[index].cost
        now += 1.0
        recent[queue[1]] = now
    return order


def next_index(entries: Sequence[Entry], served: Mapping[str, float],
               last: Optional[Mapping[str, float]] = None) -> Optional[int]:
    """The index of the entry served next (None when there are none)."""
    order = fair_order(entries, served, last, limit=1)
    return order[0] if order else None


class Turns:
    """The memory the rule needs in one admission queue (an engine's): when each tenant was last
    served, as a count of admissions."""

    MAX_TENANTS = 4096  # past this, tenants with nothing waiting or running are forgotten

    def __init__(self):
        self.last: Dict[str, float] = {}
        self._count = 0

    def pick(self, waiting: Sequence[Entry], running: Sequence[Entry]) -> Optional[int]:
        """The index in ``waiting`` of the entry to admit next."""
        return next_index(waiting, in_service(running), self.last)

    def served(self, tenant: str, present: Sequence[Entry] = ()) -> None:
        """``tenant``'s entry was admitted (``present``: every entry waiting or running now)."""
        self._count += 1
        self.last[tenant] = float(self._count)
        if len(self.last) > self.MAX_TENANTS:
            keep = {e.tenant for e in present} | {tenant}
            self.last = {t: n for t, n in self.last.items() if t in keep}


def in_service(entries: Sequence[Entry]) -> Dict[str, float]:
    """Each tenant's cost over ``entries`` (the work running now)."""
    load: Dict[str, float] = {}
    for entry in entries:
        load[entry.tenant] = load.get(entry.tenant, 0.0) + entry.cost
    return load


def priority_rank(name: str) -> int:
    """A class name's rank; ValueError naming the classes otherwise."""
    try:
        return PRIORITY_CLASSES[name]
    except KeyError:
        raise ValueError(f"priority: {name!r} is not a class; allowed: {', '.join(PRIORITY_CLASSES)}") from None
