"""``acestep convert-to-diffusers``: write an official-layout checkpoint as a diffusers repo
(model_index.json + one folder per component), via diffusers' own AceStepPipeline.save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

from acestep.checkpoints.bundle import load_dit_bundle
from acestep.checkpoints.layout import resolve_dit_checkpoint


def convert_to_diffusers(checkpoints_root: str | Path, config_path: str, output_dir: str | Path) -> Path:
    from diffusers import AceStepPipeline, FlowMatchEulerDiscreteScheduler

    bundle = load_dit_bundle(resolve_dit_checkpoint(checkpoints_root, config_path), dtype=None, device="cpu")
    pipeline = AceStepPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
        transformer=bundle.transformer, condition_encoder=bundle.condition_encoder,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0),
        audio_tokenizer=bundle.audio_tokenizer, audio_token_detokenizer=bundle.audio_token_detokenizer,
    )
    with torch.no_grad():
        pipeline.save_pretrained(str(output_dir), safe_serialization=True)
    return Path(output_dir)
