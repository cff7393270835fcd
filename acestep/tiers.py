"""GPU memory tiers: which memory savings and which request limits a card of a given size needs.

Eight tiers, by the card's total memory (GiB), with the boundaries and values of the upstream
project's GPU compatibility table: small cards keep the encoders and VAE (and, below 12 GB, the DiT)
on the CPU between their phases, hold the DiT's Linear weights in int8, and take shorter songs and
smaller batches; from 20 GB everything stays resident at full precision. The LM size and backend
are advice: the tier names the LM sizes that fit beside the DiT and the backend that suits the card.

``tier_for(gpu_memory_gb)`` picks a tier; ``detect_gpu_memory_gb()`` reads the card's size (None
without a GPU: a CPU deployment has no tier unless one is asked for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from acestep.quantize import Quantization

LM_0_6B, LM_1_7B, LM_4B = "acestep-5Hz-lm-0.6B", "acestep-5Hz-lm-1.7B", "acestep-5Hz-lm-4B"


@dataclass(frozen=True)
class Tier:
    """One row of the tier table.

    name: the tier's name (upstream's).
    up_to_gb: the largest card (GiB of total memory) this tier covers; the next tier starts above it.
        None: no upper bound.
    offload_to_cpu: text encoder, condition encoder and VAE (and the pt LM's weights) wait on the CPU
        between their phases.
    offload_dit_to_cpu: the DiT transformer waits on the CPU too.
    quantization: the DiT's Linear weights (torchao weight-only mode); None: full precision.
    lm_models: LM checkpoints that fit beside the DiT (advice); empty: run DiT-only.
    lm_model: the LM to serve by default on this card (advice); None: none.
    lm_backend: the LM backend that suits this card (advice): 'pt' where vLLM's reserved KV cache
        would not fit.
    max_duration_s: longest song (seconds) one request may ask for, with / without the LM loaded.
    max_batch_size: most songs one request may ask for, with / without the LM loaded.
    lm_kv_rows: the LM engine's KV-cache rows (``lm.engine.max_rows``; a CFG song takes two): the
        cache is allocated whole at start (0.875 GiB per two rows of 4096 positions for the 0.6B
        and 1.7B LMs), so small cards get the rows their largest batch needs; None: the config's.
    """

    name: str
    up_to_gb: Optional[float]
    offload_to_cpu: bool
    offload_dit_to_cpu: bool
    quantization: Optional[Quantization]
    lm_models: Tuple[str, ...]
    lm_model: Optional[str]
    lm_backend: str
    max_duration_s: Tuple[int, int]
    max_batch_size: Tuple[int, int]
    lm_kv_rows: Optional[int] = None

    def limits(self, lm_enabled: bool) -> Tuple[int, int]:
        """(max duration in seconds, max batch size) of a request, with or without the LM loaded."""
        index = 0 if lm_enabled else 1
        return self.max_duration_s[index], self.max_batch_size[index]

    def memory_range(self, lower_gb: Optional[float]) -> str:
        """'6-8 GB', '<= 4 GB' or '> 24 GB': the cards this tier covers, given the previous tier's bound."""
        if lower_gb is None:
            return f"<= {self.up_to_gb:g} GB"
        if self.up_to_gb is None:
            return f"> {lower_gb:g} GB"
        return f"{lower_gb:g}-{self.up_to_gb:g} GB"


INT8 = "int8_weight_only"

# Bounds are upper limits in GiB. 15.5 rather than 16: a 16 GB card reports a little under 16 GiB
# after the driver's reservation and belongs with the 16 GB class.
TIERS: Tuple[Tier, ...] = (
    Tier("tier1", 4, True, True, INT8, (), None, "pt", (240, 360), (1, 1), 2),
    Tier("tier2", 6, True, True, INT8, (), None, "pt", (480, 600), (1, 1), 2),
    Tier("tier3", 8, True, True, INT8, (LM_0_6B,), LM_0_6B, "pt", (480, 600), (2, 2), 4),
    Tier("tier4", 12, True, True, INT8, (LM_0_6B,), LM_0_6B, "vllm", (480, 600), (2, 4), 4),
    Tier("tier5", 15.5, True, False, INT8, (LM_0_6B, LM_1_7B), LM_1_7B, "vllm", (480, 600), (4, 4), 8),
    Tier("tier6a", 20, True, False, INT8, (LM_0_6B, LM_1_7B), LM_1_7B, "vllm", (480, 600), (4, 8), 8),
    Tier("tier6b", 24, False, False, None, (LM_0_6B, LM_1_7B, LM_4B), LM_1_7B, "vllm", (480, 480), (8, 8), 16),
    Tier("unlimited", None, False, False, None, (LM_0_6B, LM_1_7B, LM_4B), LM_4B, "vllm", (600, 600), (8, 8)),
)


def tier_for(gpu_memory_gb: float) -> Tier:
    """The tier of a card with ``gpu_memory_gb`` GiB of total memory (ValueError when not positive)."""
    if not gpu_memory_gb > 0:
        raise ValueError(f"gpu_memory_gb must be a positive number of GB, got {gpu_memory_gb!r}")
    for tier in TIERS:
        if tier.up_to_gb is None or gpu_memory_gb <= tier.up_to_gb:
            return tier
    raise AssertionError("the last tier has no upper bound")


def tier_range(tier: Tier) -> str:
    """The memory range ``tier`` covers, e.g. '6-8 GB'."""
    index = TIERS.index(tier)
    return tier.memory_range(TIERS[index - 1].up_to_gb if index else None)


def detect_gpu_memory_gb(device_index: int = 0) -> Optional[float]:
    """Total memory (GiB) of CUDA device ``device_index``; None without a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    _, total = torch.cuda.mem_get_info(device_index)
    return total / (1 << 30)
