"""How many CPUs the job's actors claim, fitted to the Ray cluster the job starts on.

Ray Data starts each stage's actor pool before the first read task runs. Pools that claim every free
CPU leave none for the reads, and the job waits forever with nothing rendered (one LM and one DiT
actor at one CPU each on a 2-CPU machine). So a pool whose CPUs the user did not set claims an equal
share of the CPUs free at start, less room kept for the read tasks, and at most ``MAX_ACTOR_CPUS``
each. A claim below one CPU costs the actor nothing: Ray gives every actor at least one thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from pipelines.source import READ_CPUS

READ_ROOM_CPUS = 2 * READ_CPUS  # kept free so two read tasks can run beside the actors
MAX_ACTOR_CPUS = 1.0  # a model actor's claim where CPUs are plentiful
MIN_ACTOR_CPUS = 0.05  # a model actor's claim where none are free at start (an autoscaling cluster)
LIGHT_CPUS = 0.1  # an actor that holds no model: the LM stage under --no-lm, the --via-serve senders


@dataclass(frozen=True)
class Pool:
    """One actor pool as the job asks for it."""

    actors: int
    cpus: Optional[float]  # per actor as the user set it; None: fitted here
    light: bool = False  # holds no model: claims ``LIGHT_CPUS`` unless the user set its CPUs


@dataclass(frozen=True)
class Claims:
    """CPUs per actor of each pool."""

    lm: float
    dit: float


def fit_cpus(free_cpus: float, lm: Pool, dit: Pool) -> Claims:
    """Each pool's CPUs per actor: the user's, ``LIGHT_CPUS`` for a light pool, else an equal share
    of ``free_cpus`` left after the read room and the other claims (two decimals, rounded down)."""
    pools = {"lm": lm, "dit": dit}
    claims = {name: pool.cpus if pool.cpus is not None else LIGHT_CPUS if pool.light else None
              for name, pool in pools.items()}
    left = free_cpus - READ_ROOM_CPUS - sum(pools[n].actors * c for n, c in claims.items() if c is not None)
    sized = sum(pools[n].actors for n, c in claims.items() if c is None)
    share = math.floor(max(0.0, left) / max(1, sized) * 100) / 100
    fitted = min(MAX_ACTOR_CPUS, max(MIN_ACTOR_CPUS, share))
    return Claims(**{name: fitted if claim is None else claim for name, claim in claims.items()})


def free_cpus() -> float:
    """CPUs of the connected Ray cluster that nothing holds now (Ray leaves a resource out when none is
    free)."""
    import ray

    return float(ray.available_resources().get("CPU", 0.0))
