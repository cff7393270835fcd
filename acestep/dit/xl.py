"""The XL (4B) condition encoder: diffusers' module, plus the one behaviour the XL code adds.

The XL checkpoints keep the condition encoder, tokenizer and detokenizer 2048 wide under a 2560-wide
DiT (``condition_embedder`` projects between them; diffusers' transformer takes
``encoder_hidden_size`` for that). What diffusers cannot express is the XL timbre encoder: it
prepends its learned ``special_token`` to each reference before the layers and pools that token's
output (RoPE positions 0..T, the band mask over T + 1 rows); the 2B code never reads the token and
pools the first frame instead. Same parameters, same names, so the state dict is unchanged."""

from __future__ import annotations

import functools

import torch
from diffusers.pipelines.ace_step import AceStepConditionEncoder
from torch import nn


class AceStepXLConditionEncoder(AceStepConditionEncoder):
    """``AceStepConditionEncoder`` whose timbre encoder prepends its ``special_token``.

    The token is inserted right after the timbre ``embed_tokens`` projection (a forward hook), so the
    rest of diffusers' timbre forward -- RoPE, masks, layers, pooling row 0 -- runs unchanged on the
    longer sequence. Config and constructor are the parent's."""

    @functools.wraps(AceStepConditionEncoder.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A bound method (not a closure): deep copies of the module rebind it to the copy.
        self.timbre_encoder.embed_tokens.register_forward_hook(self._prepend_timbre_token)

    def _prepend_timbre_token(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        token = self.timbre_encoder.special_token.to(device=output.device, dtype=output.dtype)
        return torch.cat([token.expand(output.shape[0], 1, -1), output], dim=1)
