"""The memory planner: how many bytes of weights sit on the execution device in each phase of a
render, with and without CPU offload.

A phase is a named set of modules a piece of work needs on the device at once: the LM's decoding
(``lm``); on the DiT side, preparing a request (``encode``: source / reference audio through the
VAE encoder, codes through the audio tokenizers, the condition encoder's silence latent), text
encoding (``text``: the text encoder and the condition encoder), sampling (``sample``: the DiT
transformer) and decoding (``decode``: the VAE). Without offload every module stays resident, so
the device holds their sum; with offload the offloaded modules come in one phase at a time, so it
holds the resident ones plus the largest phase's offloaded ones. Activations and caches (KV cache,
latents) come on top of either number."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Sequence, Tuple

from torch import nn

Phases = Mapping[str, Sequence[str]]

LM_PHASES: Dict[str, Tuple[str, ...]] = {"lm": ("lm",)}
DIT_PHASES: Dict[str, Tuple[str, ...]] = {
    "encode": ("vae", "audio_tokenizer", "audio_token_detokenizer", "condition_encoder"),
    "text": ("text_encoder", "condition_encoder"),
    "sample": ("transformer",),
    "decode": ("vae",),
}
DIT_MODULES: Tuple[str, ...] = ("transformer", "condition_encoder", "audio_tokenizer", "audio_token_detokenizer",
                                "vae", "text_encoder")
# ``offload_dit_to_cpu=False`` keeps the DiT transformer resident while the others are offloaded
DIT_RESIDENT_WITHOUT_DIT_OFFLOAD: Tuple[str, ...] = ("transformer",)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (tied tensors counted once; meta tensors count
    their would-be size, so full-size shapes can be planned without memory)."""
    seen, total = set(), 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def dit_modules(bundle) -> Dict[str, nn.Module]:
    """The DiT side's modules of a ``DiTBundle``, by the names ``DIT_PHASES`` uses."""
    return {name: getattr(bundle, name) for name in DIT_MODULES}


def dit_offloaded(offload_to_cpu: bool, offload_dit_to_cpu: bool) -> Tuple[str, ...]:
    """Which DiT-side modules live on the CPU: none without ``offload_to_cpu``; with it all but the
    transformer, which ``offload_dit_to_cpu`` offloads too."""
    if not offload_to_cpu:
        return ()
    keep = () if offload_dit_to_cpu else DIT_RESIDENT_WITHOUT_DIT_OFFLOAD
    return tuple(name for name in DIT_MODULES if name not in keep)


@dataclass(frozen=True)
class MemoryPlan:
    """Weight bytes on the execution device."""

    module_bytes: Dict[str, int]  # every module's bytes, by name
    phases: Dict[str, Tuple[str, ...]]  # phase -> the modules it needs on the device
    offloaded: Tuple[str, ...] = field(default=())  # modules that live on the CPU between their phases

    @property
    def phase_bytes(self) -> Dict[str, int]:
        """What each phase needs on the device: its modules' bytes."""
        return {phase: self._bytes(members) for phase, members in self.phases.items()}

    @property
    def total_bytes(self) -> int:
        """Everything resident: the peak without offload."""
        return sum(self.module_bytes.values())

    @property
    def resident_bytes(self) -> int:
        """The modules never offloaded (always on the device)."""
        return sum(b for name, b in self.module_bytes.items() if name not in self.offloaded)

    @property
    def peak_bytes(self) -> int:
        """The most weight bytes on the device at once: the resident modules plus the largest
        phase's offloaded ones (without offload: the sum of all)."""
        if not self.offloaded:
            return self.total_bytes
        largest = max(self._bytes([n for n in members if n in self.offloaded]) for members in self.phases.values())
        return self.resident_bytes + largest

    def _bytes(self, names: Sequence[str]) -> int:
        return sum(self.module_bytes[n] for n in dict.fromkeys(names))

    def describe(self) -> str:
        gib = 1024 ** 3
        offload = f"offloaded {', '.join(self.offloaded)}" if self.offloaded else "no offload"
        return (f"weights on the device: peak {self.peak_bytes / gib:.2f} GiB ({offload}; "
                f"all resident {self.total_bytes / gib:.2f} GiB)")


def plan_memory(modules: Mapping[str, nn.Module], phases: Phases, offloaded: Sequence[str] = ()) -> MemoryPlan:
    """The ``MemoryPlan`` of ``modules`` run in ``phases`` (phase -> module names), ``offloaded``
    naming those that live on the CPU between their phases."""
    sizes = {name: module_bytes(module) for name, module in modules.items()}
    named = {n for members in phases.values() for n in members} | set(offloaded)
    unknown = sorted(named - set(sizes))
    if unknown:
        raise ValueError(f"phases name modules that are not given: {unknown}")
    return MemoryPlan(sizes, {phase: tuple(members) for phase, members in phases.items()}, tuple(offloaded))
