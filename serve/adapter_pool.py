"""The adapters one DiT replica keeps loaded: at most ``max_loaded``, least recently used unloaded
first, never one a request still uses.

A request pins the adapters it names for as long as it renders (``using``); a pinned adapter is
never evicted, so a request never loses its adapter between loading and sampling. Requests whose
adapters are loaded go straight on; only a request that needs a load waits for it (one load at a
time: reading the files happens off the worker thread, only the injection waits for a step
boundary). Ray Serve's multiplexing (``DiTDeployment.adapter_set``) routes requests for an adapter
set to replicas that already hold it; this pool is what actually loads and unloads.

What a pool holds is also published in the task store (``HOLDINGS`` + the replica's name), so an
ingress can say which replicas of every DiT deployment hold an adapter (``holders``). A replica
republishes on each health check; a record older than ``fresh_s`` belongs to a replica that is
gone, and readers drop it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from acestep.dit.adapters import AdapterError, read_adapter, resolve_adapter_path
from serve import metrics
from serve.logs import log

HOLDINGS = "adapter_holdings/"  # task-store setting names: one record per DiT replica


def holders(store, fresh_s: float, now: Optional[float] = None) -> Dict[str, List[str]]:
    """{adapter name: [replica names holding it]} from the published pools; records not refreshed
    within ``fresh_s`` (their replica is gone) are deleted."""
    now = time.time() if now is None else now
    found: Dict[str, List[str]] = defaultdict(list)
    for name, record in store.settings(HOLDINGS).items():
        if now - float(record.get("at", 0)) > fresh_s:
            store.delete_setting(name)
            continue
        for adapter in record.get("loaded", []):
            found[adapter].append(name[len(HOLDINGS):])
    return {adapter: sorted(names) for adapter, names in found.items()}


class AdapterPool:
    def __init__(self, handler, root: str, max_loaded: int, replica: str = "",
                 open_store: Optional[Callable[[], Any]] = None):
        self.handler, self.root, self.max_loaded = handler, Path(root), max_loaded
        self._lru: "OrderedDict[str, None]" = OrderedDict()  # loaded names, least recently used first
        self._pins: Counter = Counter()
        self._lock = asyncio.Lock()
        self.loads = 0
        self.evictions = 0
        self.replica, self._open_store, self._store = replica, open_store, None
        self._published = False  # a record exists in the store: keep it fresh, delete it at the end
        self._publishing = threading.Lock()

    @contextlib.asynccontextmanager
    async def using(self, names: Iterable[str]):
        """Load (if needed) and pin ``names`` for the body of the block."""
        names = list(dict.fromkeys(names))
        await self._ensure(names)
        try:
            yield
        finally:
            self._pins.subtract(names)

    async def _ensure(self, names) -> None:
        self._pins.update(names)  # pinned before any await: a concurrent load cannot evict them
        try:
            if any(name not in self._lru for name in names):
                async with self._lock:
                    for name in names:
                        if name not in self._lru:
                            await self._load(name)
            for name in names:
                self._lru.move_to_end(name)
        except BaseException:
            self._pins.subtract(names)
            raise

    async def _load(self, name: str) -> None:
        path = resolve_adapter_path(self.root, name, "lora")
        adapter = await asyncio.to_thread(read_adapter, path, name)  # off the worker thread
        while len(self._lru) >= self.max_loaded and await self._evict_one():
            pass
        await asyncio.to_thread(self._inject, adapter)
        self._lru[name] = None
        self.loads += 1
        metrics.adapter_loaded(name)
        await asyncio.to_thread(self.publish)

    def _inject(self, adapter) -> None:
        slots = self.handler.adapters
        self.handler.loop.call(lambda: slots.load(adapter)).result()

    async def _evict_one(self) -> bool:
        """Unload the least recently used adapter nobody pins; False when every one is pinned."""
        for name in list(self._lru):
            if self._pins[name] <= 0:
                try:
                    await asyncio.to_thread(self.handler.unload_lora, name)
                except AdapterError:  # still sampling (a cancelled request's items): try the next one
                    continue
                del self._lru[name]
                self.evictions += 1
                metrics.adapter_evicted(name)
                log.info("adapter %s unloaded (least recently used)", name)
                await asyncio.to_thread(self.publish)
                return True
        log.warning("all %d loaded adapters are in use; loading one more", len(self._lru))
        return False

    async def unload(self, name: str) -> bool:
        """Unload ``name`` now (the official unload route); refused while a request pins it."""
        async with self._lock:
            if name not in self._lru:
                return False
            if self._pins[name] > 0:
                raise AdapterError(f"lora: {name!r} is in use by running requests")
            await asyncio.to_thread(self.handler.unload_lora, name)
            del self._lru[name]
            await asyncio.to_thread(self.publish)
            return True

    # -- the published record ----------------------------------------------------------------------

    def publish(self) -> None:
        """Write what this pool holds, with the time, to the task store (any thread). A store
        outage never fails a render: the record is written again at the next change or check."""
        if self._open_store is None:
            return
        with self._publishing:
            try:
                if self._store is None:
                    self._store = self._open_store()
                self._store.put_setting(HOLDINGS + self.replica, {"loaded": list(self._lru), "at": time.time()})
                self._published = True
            except Exception:
                log.warning("could not publish the adapters this replica holds", exc_info=True)

    def refresh(self) -> None:
        """Keep the record fresh (from the replica's health check): in the background, never blocking it."""
        if self._published and not self._publishing.locked():  # one write at a time, none piling up
            threading.Thread(target=self.publish, name="adapter-holdings", daemon=True).start()

    def withdraw(self) -> None:
        """Delete the record (a replica shutting down)."""
        if self._published and self._store is not None:
            with self._publishing:
                try:
                    self._store.delete_setting(HOLDINGS + self.replica)
                except Exception:
                    log.warning("could not withdraw the adapters record", exc_info=True)

    def stats(self) -> Dict[str, Any]:
        return {"loaded": list(self._lru), "max_loaded": self.max_loaded, "loads": self.loads,
                "evictions": self.evictions, "pinned": sorted(n for n, c in self._pins.items() if c > 0)}
