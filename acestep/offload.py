"""CPU offload: offloaded modules live on the CPU (in pinned memory where the execution device is
CUDA, so copies overlap with work) and come to the execution device for the phases that need them
(``acestep.memory``'s phase tables).

Entering a phase first sends back the offloaded modules the phase does not use, then brings in
those it does; they stay until another phase or ``release`` needs them gone. So consecutive
steps of one phase (every DiT sampling step) copy nothing, and the device never holds more
offloaded weights than the largest phase. Every move is recorded (``Offloader.moves``) in order.

``IdleOffload`` wraps a stepper (``acestep.steploop``): its modules come in for its steps and go
back when it runs out of work (the LM engine between requests)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Sequence

import torch
from torch import nn

from acestep.memory import Phases


@dataclass(frozen=True)
class Move:
    """One module copied between the CPU and the execution device."""

    phase: str  # the phase that asked for it ("release": the stepper ran out of work)
    module: str
    to_device: bool  # True: CPU → execution device; False: back to the CPU


class Offloader:
    """Moves offloaded modules between the CPU and ``device`` phase by phase."""

    def __init__(self, modules: Mapping[str, nn.Module], phases: Phases, offloaded: Sequence[str],
                 device: torch.device | str):
        self.device = torch.device(device)
        self.phases = {phase: tuple(members) for phase, members in phases.items()}
        self.modules: Dict[str, nn.Module] = {name: modules[name] for name in offloaded}
        self.pinned = self.device.type == "cuda"  # pinned host memory needs CUDA
        self.present: List[str] = []  # offloaded modules now on the execution device, in arrival order
        self.moves: List[Move] = []
        for module in self.modules.values():
            _place(module, torch.device("cpu"), self.pinned)
        self._synchronize()

    @property
    def active(self) -> bool:
        return bool(self.modules)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run the body with ``name``'s modules on the execution device."""
        with self.on_device(self.phases[name], name):
            yield

    @contextmanager
    def on_device(self, names: Sequence[str], phase: str = "") -> Iterator[None]:
        """Run the body with the named modules on the execution device (resident ones are there
        already); offloaded modules not named go back to the CPU first."""
        wanted = [n for n in dict.fromkeys(names) if n in self.modules]
        self._send_back([n for n in self.present if n not in wanted], phase)
        for name in wanted:
            if name not in self.present:
                _place(self.modules[name], self.device, self.pinned)
                self.present.append(name)
                self.moves.append(Move(phase, name, True))
        yield

    def release(self) -> None:
        """Send every offloaded module back to the CPU (its stepper has no work)."""
        self._send_back(list(self.present), "release")

    def _send_back(self, names: List[str], phase: str) -> None:
        for name in names:
            _place(self.modules[name], torch.device("cpu"), self.pinned)
            self.present.remove(name)
            self.moves.append(Move(phase, name, False))
        if names:
            self._synchronize()

    def _synchronize(self) -> None:
        # device → pinned host copies are asynchronous: finish them before host code may read the
        # weights (an adapter injected into an offloaded DiT, say)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _place(module: nn.Module, device: torch.device, pinned: bool) -> None:
    """Move a module's parameters and buffers in place (the tensors keep their identity, so
    whatever holds a reference to them sees the move)."""
    seen = set()
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in seen or tensor.device == device:
            continue
        seen.add(id(tensor))
        if device.type == "cpu" and pinned:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor.data, non_blocking=True)
            tensor.data = host
        else:
            tensor.data = tensor.data.to(device, non_blocking=pinned)


class Resident:
    """The no-offload stand-in for ``Offloader``: every module stays on the device."""

    active = False
    moves: List[Move] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def release(self) -> None:
        return None


RESIDENT = Resident()


class IdleOffload:
    """A stepper whose modules come to the device for its steps (``phase``) and go back to the CPU
    when it has no work left; everything else is the wrapped stepper's."""

    def __init__(self, stepper: Any, offloader: Offloader, phase: str):
        self.stepper, self.offloader, self.phase = stepper, offloader, phase

    def add(self, *args: Any) -> Any:
        return self.stepper.add(*args)

    def abort(self, key: Any) -> Any:
        return self.stepper.abort(key)

    @property
    def has_work(self) -> bool:
        return self.stepper.has_work

    def stats(self) -> Dict[str, Any]:
        return self.stepper.stats()

    def step(self) -> list:
        try:
            with self.offloader.phase(self.phase):
                return self.stepper.step()
        finally:
            if not self.stepper.has_work:
                self.offloader.release()
