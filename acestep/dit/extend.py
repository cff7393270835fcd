"""Extend (``task_type="extend"``, ours): continue a source to the left and/or right with new audio
described by the request's caption and lyrics.

One DiT pass ("window") renders a canvas of kept audio with new latent frames on one side, on the
repaint path: the new frames are the repaint window, so the kept audio comes back as repaint keeps
it (noised source re-injected, latent edges blended, waveform spliced back outside the window). What
the DiT is conditioned on:
- with codes for the new part (the LM's plan, or the request's ``audio_codes``): hints over the
  whole canvas, the kept audio's own codes (VAE latents → FSQ tokenizer: the audio→codes path) next
  to the new codes, under the cover instruction, as upstream conditions on codes;
- without codes: the kept latents with silence in the new part under the repaint instruction,
  repaint's own context.
``audio_codes`` of an extension are the new part's in time order, the left part's first; each side
takes its codes from the source outward, and frames past the end of a side's codes get silence.

Windows (``plan_windows``): a canvas is at most ``ExtendConfig.window_s`` (the DiT's longest song).
The right side renders first, then the left, each in windows going outward from the source. When
the whole result fits one window, a window keeps everything rendered so far; otherwise it keeps
the ``context_s`` seconds next to its new part, which conditions it on the previous window's tail.
Windows run one after another on the DiT worker (each needs the audio of the one before); every
item of a request renders each window together. Each item's result is one waveform buffer, filled
window by window and normalised and faded once at the end, so a 20-minute song holds its own
waveform plus one window's work, never every window's.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch

from acestep.audio import HOP, SAMPLE_RATE, load_audio
from acestep.dit import vae as vae_ops
from acestep.dit.codes import FRAMES_PER_CODE, codes_to_hints, latents_to_codes, parse_audio_codes
from acestep.dit.items import DiTItem, PostProcess, Progress, RenderOutput, SamplingSettings
from acestep.dit.prepare import _text, post_process, reference_timbre
from acestep.dit.tasks import (FRAMES_PER_SECOND, MAX_DIT_S, TASK_INSTRUCTIONS, Repaint, Window, repaint_config,
                               silence_frames, task_context)
from acestep.params import GenerationParams

SIDES = ("right", "left")  # the order the sides render in
Submit = Callable[..., Future]  # a StepLoop's submit: (items or a function making them, settings, progress)


@dataclass(frozen=True)
class ExtendConfig:
    """How an extension is cut into DiT passes."""

    window_s: float = MAX_DIT_S  # the longest canvas one pass renders (kept audio + new audio)
    context_s: float = 60.0  # kept audio a window holds when the whole song does not fit one window

    def __post_init__(self):
        if not 0 < self.context_s <= self.window_s - 1:
            raise ValueError(f"ExtendConfig: context_s={self.context_s} must be > 0 and leave at least 1 s of "
                             f"window_s={self.window_s} for new audio")

    @property
    def window_frames(self) -> int:
        return int(self.window_s * FRAMES_PER_SECOND)

    @property
    def context_samples(self) -> int:
        return int(self.context_s * SAMPLE_RATE)


@dataclass(frozen=True)
class ExtendWindow:
    """One DiT pass: ``context`` samples of kept audio beside ``new_frames`` latent frames of new
    audio on ``side``. ``start``: where its canvas begins in the output (samples); ``distance``: the
    new frames of this side rendered before it (where its codes start)."""

    side: str
    start: int
    context: int
    new_frames: int
    distance: int

    @property
    def new_samples(self) -> int:
        return self.new_frames * HOP

    @property
    def end(self) -> int:
        return self.start + self.context + self.new_samples

    @property
    def kept(self) -> Tuple[int, int]:
        """[start, end) of the kept audio in the output."""
        if self.side == "right":
            return self.start, self.start + self.context
        return self.start + self.new_samples, self.end


def extension_frames(seconds: float) -> int:
    """Latent frames of new audio for ``seconds`` (at least one when any is asked for)."""
    return max(1, round(seconds * FRAMES_PER_SECOND)) if seconds > 0 else 0


def plan_windows(source: int, left: int, right: int, config: ExtendConfig = ExtendConfig()) -> List[ExtendWindow]:
    """The passes extending ``source`` samples by ``left`` / ``right`` latent frames. Every window
    but a side's last holds a whole number of codes of new audio, so the next one's codes start on
    a code."""
    total = (left + right) * HOP + source
    whole = math.ceil(total / HOP) <= config.window_frames
    lo, hi = left * HOP, left * HOP + source  # what is rendered so far
    windows = []
    for side, frames in zip(SIDES, (right, left)):
        done = 0
        while done < frames:
            context = hi - lo if whole else min(hi - lo, config.context_samples)
            new = min(frames - done, config.window_frames - math.ceil(context / HOP))
            if new < frames - done:
                new -= new % FRAMES_PER_CODE
            start = hi - context if side == "right" else lo - new * HOP
            windows.append(ExtendWindow(side, start, context, new, done))
            done += new
            hi, lo = (hi + new * HOP, lo) if side == "right" else (hi, lo - new * HOP)
    return windows


def split_codes(codes: List[int], left_frames: int) -> Dict[str, List[int]]:
    """The new part's codes (time order, the left part's first) per side, from the source outward."""
    count = math.ceil(left_frames / FRAMES_PER_CODE)
    return {"left": codes[:count][::-1], "right": codes[count:]}


def window_codes(codes: Dict[str, List[int]], window: ExtendWindow) -> List[int]:
    """The codes of a window's new frames, in time order."""
    first = window.distance // FRAMES_PER_CODE
    picked = codes[window.side][first: first + math.ceil(window.new_frames / FRAMES_PER_CODE)]
    return picked if window.side == "right" else picked[::-1]


def extend_instruction(params: GenerationParams, has_codes: bool) -> str:
    """The request's own instruction, else the one describing the context (codes: cover's)."""
    if params.instruction and params.instruction != TASK_INSTRUCTIONS["text2music"]:
        return params.instruction
    return TASK_INSTRUCTIONS["cover" if has_codes else "repaint"]


def _fit(rows: torch.Tensor, frames: int, filler: torch.Tensor, at_end: bool = True) -> torch.Tensor:
    """``rows`` cut or padded with ``filler`` rows to ``frames``: at the end, or at the start
    (``at_end=False``: the rows keep their last frames)."""
    if rows.shape[0] >= frames:
        return rows[:frames] if at_end else rows[rows.shape[0] - frames:]
    pad = filler[: frames - rows.shape[0]].to(rows)
    return torch.cat([rows, pad] if at_end else [pad, rows], 0)


def _hints(bundle, kept_latents: torch.Tensor, codes: List[int], window: ExtendWindow,
           silence: torch.Tensor) -> torch.Tensor:
    """[T, C] hints of a window's canvas: the kept audio's codes beside the new part's."""
    kept = codes_to_hints(bundle, latents_to_codes(bundle, kept_latents))
    kept = _fit(kept, kept_latents.shape[0], silence)
    new = codes_to_hints(bundle, codes)
    right = window.side == "right"
    new = _fit(new, window.new_frames, silence, at_end=right)
    return torch.cat([kept, new] if right else [new, kept], 0)


def build_window_item(bundle, params: GenerationParams, seed: int, kept_audio: torch.Tensor,
                      kept_latents: torch.Tensor, window: ExtendWindow, codes: List[int],
                      timbre: torch.Tensor) -> DiTItem:
    """One item's DiT input for one window: ``kept_audio`` [2, K] and its VAE latents, the new
    frames on the window's side. Normalisation and fades wait for the whole song."""
    silence = bundle.silence_latent.to(bundle.dtype)
    kept_frames = math.ceil(kept_audio.shape[-1] / HOP)
    new, right = window.new_frames, window.side == "right"
    frames = kept_frames + new
    blank = silence_frames(silence, frames)
    kept_latents = _fit(kept_latents.to(bundle.dtype), kept_frames, blank)
    canvas = torch.cat([kept_latents, blank[kept_frames:]] if right else [blank[:new], kept_latents], 0)
    # the kept audio's partial last frame (right) belongs to the window: the splice keeps its samples
    repainted = Window(kept_audio.shape[-1] // HOP, frames) if right else Window(0, new)
    src, mask = task_context("repaint", frames, silence, canvas, repainted, params.chunk_mask_mode)
    hints = _hints(bundle, kept_latents, codes, window, blank.to(bundle.device)) if codes else None
    zeros = torch.zeros(2, window.new_samples, dtype=kept_audio.dtype)
    original = torch.cat([kept_audio, zeros] if right else [zeros, kept_audio], -1)
    samples = (kept_audio.shape[-1], original.shape[-1]) if right else (0, window.new_samples)
    config = repaint_config(params.repaint_mode, params.repaint_strength, params.repaint_latent_crossfade_frames,
                            params.repaint_wav_crossfade_sec)
    stems = bool(getattr(bundle.transformer.config, "is_lego_sft", False))
    text = _text(params, extend_instruction(params, hints is not None), original.shape[-1] / SAMPLE_RATE, stems)
    post = dataclasses.replace(post_process(params), normalize=False, fade_in_s=0.0, fade_out_s=0.0)
    return DiTItem(text=text, seed=seed, frames=frames, src_latents=src, chunk_mask=mask, timbre=timbre,
                   hints=hints, repaint=Repaint(repainted, samples, config), source_audio=original, post=post)


def _peak(audio: torch.Tensor) -> torch.Tensor:
    """The largest |sample|, a slice at a time (no copy of a long waveform)."""
    return torch.stack([part.abs().amax() for part in audio.split(1 << 20, dim=-1)]).amax()


def finish_audio(audio: torch.Tensor, post: PostProcess) -> torch.Tensor:
    """``vae.postprocess`` (clip guard, peak normalisation, fades) in place on [2, S] fp32."""
    peak = _peak(audio)
    if peak > 1.0:
        audio.div_(peak)
    if post.normalize:
        peak = _peak(audio)
        if peak >= vae_ops.SILENT_PEAK:
            audio.mul_(10 ** (post.normalization_db / 20) / peak)
    total = audio.shape[-1]
    fade_in = min(vae_ops.fade_samples(post.fade_in_s), total)
    fade_out = min(vae_ops.fade_samples(post.fade_out_s), total)
    if fade_in:  # each fade touches its own slice only (a copy of that slice, not of the song)
        audio[..., :fade_in] = vae_ops.apply_fades(audio[..., :fade_in], fade_in, 0)
    if fade_out:
        audio[..., total - fade_out:] = vae_ops.apply_fades(audio[..., total - fade_out:], 0, fade_out)
    return audio


def _encode(bundle, audio: torch.Tensor, seed: int) -> torch.Tensor:
    """[2, S] → VAE latents [T, C], drawn as ``prepare.encode_source`` draws a source's."""
    generator = torch.Generator(device=bundle.device).manual_seed(int(seed))
    return vae_ops.encode(bundle.vae, audio, generator).to(bundle.dtype)


class ExtendRender:
    """One extend request on the DiT worker: its windows one after another, every item of the
    request in each. ``start()`` returns a Future of the request's ``RenderOutput`` (cancelling it
    drops the window in flight and renders no more)."""

    def __init__(self, submit: Submit, bundle, item_params: List[GenerationParams], seeds: List[int],
                 settings: SamplingSettings, progress: Optional[Progress] = None,
                 config: ExtendConfig = ExtendConfig()):
        self.submit, self.bundle, self.config = submit, bundle, config
        self.item_params, self.seeds, self.settings, self.progress = item_params, seeds, settings, progress
        self.future: Future = Future()
        self.future.add_done_callback(self._cancel_window)
        self.window_future: Optional[Future] = None
        self.windows: List[ExtendWindow] = []
        self.songs: List[torch.Tensor] = []  # per item: the output waveform [2, S] so far
        self.latents: List[torch.Tensor] = []  # per item: [T, C], each window's at the frame it starts in
        self.codes: List[Dict[str, List[int]]] = []
        self.timbre: Optional[torch.Tensor] = None
        self.costs: Dict[str, float] = {}
        self.started = time.perf_counter()

    def start(self) -> Future:
        self._submit(0)
        return self.future

    # -- on the caller's thread, then on the worker's -------------------------------------------
    def _submit(self, index: int) -> None:
        window = self.submit(partial(self._items, index), self.settings, self._progress(index))
        self.window_future = window
        if self.future.cancelled():
            window.cancel()
        window.add_done_callback(partial(self._finished, index))

    def _cancel_window(self, future: Future) -> None:
        if future.cancelled() and self.window_future is not None:
            self.window_future.cancel()

    def _progress(self, index: int) -> Optional[Progress]:
        if self.progress is None:
            return None

        def report(fraction: float, desc: str = "") -> None:
            count = max(len(self.windows), 1)
            self.progress((index + fraction) / count, f"window {index + 1}/{count}: {desc}")
        return report

    def _load(self) -> None:
        """The source into each item's output buffer, the windows, the timbre and each item's codes."""
        params, bundle = self.item_params[0], self.bundle
        source, _ = load_audio(params.src_audio)
        left, right = extension_frames(params.extend_left_s), extension_frames(params.extend_right_s)
        self.windows = plan_windows(source.shape[-1], left, right, self.config)
        total, at = source.shape[-1] + (left + right) * HOP, left * HOP
        channels = bundle.silence_latent.shape[-1]
        for _ in self.item_params:
            song = torch.zeros(2, total)
            song[:, at: at + source.shape[-1]] = source
            self.songs.append(song)
            self.latents.append(torch.zeros(math.ceil(total / HOP), channels))
        self.timbre = reference_timbre(bundle, params.reference_audio, self.seeds[0])
        self.codes = [split_codes(parse_audio_codes(p.audio_codes), left) for p in self.item_params]

    def _items(self, index: int) -> List[DiTItem]:
        """Window ``index``'s items (on the worker's thread, in its encode phase)."""
        if index == 0:
            self._load()
        else:
            # the last window's requests, items and audio sit in reference cycles (tracks and their
            # request) that only the cyclic collector frees: free them before this window's work
            gc.collect()
        window = self.windows[index]
        lo, hi = window.kept
        encoded: Dict[int, torch.Tensor] = {}
        items = []
        for i, (params, seed) in enumerate(zip(self.item_params, self.seeds)):
            kept = self.songs[i][:, lo:hi]
            key = 0 if index == 0 else i  # every item keeps the same source in the first window
            if key not in encoded:
                encoded[key] = _encode(self.bundle, kept, self.seeds[0])
            items.append(build_window_item(self.bundle, params, seed, kept, encoded[key], window,
                                           window_codes(self.codes[i], window), self.timbre))
        return items

    # -- on the worker's thread, as each window finishes ------------------------------------------
    def _finished(self, index: int, window_future: Future) -> None:
        if self.future.done():
            return
        self.window_future = None  # its audio is copied below; nothing else needs it
        try:
            self._place(self.windows[index], window_future.result())
            if index + 1 < len(self.windows):
                self._submit(index + 1)
            else:
                self._settle(result=self._output())
        except BaseException as error:  # noqa: BLE001 - the request's failure, whatever it is
            self._settle(error=error)

    def _settle(self, result: Optional[RenderOutput] = None, error: Optional[BaseException] = None) -> None:
        if self.future.done():  # cancelled meanwhile
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)

    def _place(self, window: ExtendWindow, output: RenderOutput) -> None:
        """A finished window's audio into each song; its latents where its canvas starts."""
        length, first = window.end - window.start, window.start // HOP
        for i, audio in enumerate(output.audios):
            self.songs[i][:, window.start: window.end] = audio[:, :length]
            latents = output.latents[i][: math.ceil(length / HOP)]
            room = self.latents[i].shape[0] - first
            self.latents[i][first: first + latents.shape[0]] = latents[:room].to(self.latents[i])
        for name, value in output.time_costs.items():
            self.costs[name] = self.costs.get(name, 0.0) + float(value)

    def _output(self) -> RenderOutput:
        audios = [finish_audio(song, post_process(params)) for song, params in zip(self.songs, self.item_params)]
        costs = dict(self.costs, total_time_cost=time.perf_counter() - self.started)
        extras = {"extend_windows": [dataclasses.asdict(w) for w in self.windows]}
        output = RenderOutput(audios=audios, latents=torch.stack(self.latents), extras=extras, time_costs=costs)
        self.songs, self.latents = [], []
        return output
