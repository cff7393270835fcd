"""``acestep prompt MODE --input FILE.json [--checkpoint LM_DIR]``: print the exact LM prompts.

Prints ``{"prompt": ..., "uncond_prompt": ...}`` (``uncond_prompt`` is null for the modes that
run without CFG). With ``--checkpoint`` the checkpoint's tokenizer renders its chat template;
without, the packaged stock Qwen3 template is rendered with jinja2 as transformers does.

Input keys per mode (all optional unless noted):
  cot            caption, lyrics, lm_negative_prompt
  codes          caption, lyrics, lm_negative_prompt, lm_cfg_scale, and the CoT the pipeline
                 re-serialises: metadata (the phase-1 dict: bpm, caption, duration, keyscale,
                 language, timesignature), or, when the user gave all of bpm, keyscale,
                 timesignature and duration (phase 1 is skipped then), those four fields
  create_sample  query, instrumental
  format_sample  caption, lyrics
  understand     audio_codes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional

from acestep.lm import constants as C
from acestep.lm import prompts as P

MODES = ("cot", "codes", "create_sample", "format_sample", "understand")


def build_prompts(mode: str, data: Dict[str, Any], render: P.Render) -> Dict[str, Optional[str]]:
    """The conditional and unconditional prompt of ``mode`` for the input ``data``."""
    caption, lyrics = data.get("caption", ""), data.get("lyrics", "")
    negative = data.get("lm_negative_prompt", C.NO_USER_INPUT)
    if mode == "cot":
        return {"prompt": P.cot_prompt(render, caption, lyrics),
                "uncond_prompt": P.cot_uncond_prompt(render, lyrics, negative)}
    if mode == "codes":
        return _codes_prompts(data, render)
    if mode == "create_sample":
        return {"prompt": P.create_sample_prompt(render, data.get("query", ""), bool(data.get("instrumental", False))),
                "uncond_prompt": None}
    if mode == "format_sample":
        return {"prompt": P.format_sample_prompt(render, caption, lyrics), "uncond_prompt": None}
    if mode == "understand":
        return {"prompt": P.understand_prompt(render, data.get("audio_codes", "")), "uncond_prompt": None}
    raise ValueError(f"unknown prompt mode {mode!r}; expected one of {MODES}")


def _codes_prompts(data: Dict[str, Any], render: P.Render) -> Dict[str, Optional[str]]:
    """Phase 2's prompts built by the planner's own functions, from the metadata the pipeline would
    have at that point: the CoT's, or the user's four values when phase 1 is skipped."""
    from acestep.lm import planner
    from acestep.params import GenerationParams

    fields = {k: data[k] for k in ("caption", "lyrics", "lm_negative_prompt", "lm_cfg_scale", "bpm", "keyscale",
                                   "timesignature", "duration") if data.get(k) is not None}
    params = GenerationParams(**fields)
    metadata = data.get("metadata") or planner.user_metadata_from_params(params)
    if not data.get("metadata") and not planner.has_all_metas(metadata):
        raise ValueError("mode 'codes' needs 'metadata' (the CoT written in phase 1) or all of bpm, keyscale, "
                         "timesignature and duration (then the pipeline skips phase 1)")
    prompt, uncond = planner.codes_prompts(SimpleNamespace(render=render), params, metadata)
    return {"prompt": prompt, "uncond_prompt": uncond}


def renderer_for(checkpoint: Optional[str]) -> P.Render:
    if checkpoint:
        from transformers import AutoTokenizer

        return P.chat_renderer(AutoTokenizer.from_pretrained(checkpoint))
    from acestep.checkpoints.demo_lm import qwen3_chat_template

    return P.template_renderer(qwen3_chat_template())


def add_prompt_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("prompt", help="print the exact 5 Hz LM prompts for an input (JSON)")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--input", required=True, help="JSON file with the mode's inputs ('-' = stdin)")
    parser.add_argument("--checkpoint", default=None, help="LM checkpoint folder whose chat template renders")
    parser.set_defaults(func=run_prompt)
    return parser


def run_prompt(args) -> int:
    text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text(encoding="utf-8")
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--input must hold a JSON object, got {type(data).__name__}")
    prompts = build_prompts(args.mode, data, renderer_for(args.checkpoint))
    print(json.dumps(prompts, ensure_ascii=False, indent=2))
    return 0
