"""Text side of the DiT: the caption and lyric strings, and the encoder states they become.

Strings follow the official handler byte for byte (SFT_GEN_PROMPT, metas block, lyric header).
Each item is tokenized alone and right-padded, so batching does not change an item's tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from diffusers.pipelines.ace_step.pipeline_ace_step import SFT_GEN_PROMPT

MAX_CAPTION_TOKENS = 256
MAX_LYRIC_TOKENS = 2048


@dataclass
class TextCondition:
    """What the text encoder sees for one item."""

    instruction: str
    caption: str
    lyrics: str
    language: str
    bpm: Optional[int]
    timesignature: str
    keyscale: str
    duration_s: Optional[float]
    # Set (even to "") only for the SFT-stems checkpoint: its captions were trained as a
    # Global/Local block (stems_caption), with the chunk mask mode as "Mask Control"
    global_caption: Optional[str] = None
    mask_control: bool = False  # chunk_mask_mode "explicit"

    def caption_prompt(self) -> str:
        instruction = self.instruction if self.instruction.endswith(":") else self.instruction + ":"
        caption = self.caption if self.global_caption is None else stems_caption(self, instruction)
        return SFT_GEN_PROMPT.format(instruction, caption, metas_block(self))

    def lyric_prompt(self) -> str:
        return f"# Languages\n{self.language}\n\n# Lyric\n{self.lyrics}<|endoftext|>"


def stems_caption(cond: TextCondition, instruction: str) -> str:
    """The SFT-stems caption block: the song-level caption as Global, this track's as Local; a
    segment instruction ("Generate a segment of ...") has no Global line."""
    control = f"Mask Control: {'true' if cond.mask_control else 'false'}"
    if "a segment" in instruction.lower():
        return f"Local: {cond.caption}\n{control}"
    return f"Global: {cond.global_caption}\nLocal: {cond.caption}\n{control}"


def _meta_value(value) -> str:
    text = "" if value is None else str(value).strip()
    return "N/A" if not text or text.lower() == "n/a" else text


def metas_block(cond: TextCondition) -> str:
    bpm = str(cond.bpm) if cond.bpm else "N/A"
    duration = f"{int(cond.duration_s)} seconds" if cond.duration_s and cond.duration_s > 0 else "30 seconds"
    return (f"- bpm: {bpm}\n- timesignature: {_meta_value(cond.timesignature)}\n"
            f"- keyscale: {_meta_value(cond.keyscale)}\n- duration: {duration}\n")


def _tokenize(tokenizer, texts: Sequence[str], max_length: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tokenize each text alone (truncated), then right-pad the batch with the pad id, mask 0."""
    rows = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids.to(device), mask.to(device)


@torch.no_grad()
def encode_text(text_encoder, tokenizer, conditions: List[TextCondition], device, dtype):
    """→ (caption states [B,Lt,H], caption mask, lyric embeddings [B,Ll,H], lyric mask).

    Captions go through the whole encoder without a mask (causal, so right padding is inert);
    lyrics are only looked up in its embedding table, as upstream."""
    caption_ids, caption_mask = _tokenize(tokenizer, [c.caption_prompt() for c in conditions], MAX_CAPTION_TOKENS,
                                          device)
    lyric_ids, lyric_mask = _tokenize(tokenizer, [c.lyric_prompt() for c in conditions], MAX_LYRIC_TOKENS, device)
    caption_states = text_encoder(input_ids=caption_ids).last_hidden_state.to(dtype)
    lyric_states = text_encoder.get_input_embeddings()(lyric_ids).to(dtype)
    return caption_states, caption_mask, lyric_states, lyric_mask


@torch.no_grad()
def encode_conditions(bundle, conditions: List[TextCondition], timbre: torch.Tensor):
    """Text + lyrics + timbre (one reference [750, C] per item) → encoder states [B,S,D] and mask."""
    device, dtype = bundle.device, bundle.dtype
    caption_states, caption_mask, lyric_states, lyric_mask = encode_text(
        bundle.text_encoder, bundle.tokenizer, conditions, device, dtype)
    order = torch.arange(len(conditions), device=device, dtype=torch.long)
    return bundle.condition_encoder(
        text_hidden_states=caption_states, text_attention_mask=caption_mask,
        lyric_hidden_states=lyric_states, lyric_attention_mask=lyric_mask,
        refer_audio_acoustic_hidden_states_packed=timbre.to(device=device, dtype=dtype),
        refer_audio_order_mask=order,
    )
