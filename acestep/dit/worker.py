"""``DiTWorker``: the DiT side's stepper -- requests in, decoded audio out -- over a
``RunningBatch`` (``acestep.dit.running``) of DiT items, each at its own sampling step.

``DiTWorker.add`` queues one request (its items, or a function that prepares them); its ``step``
prepares queued requests, runs one batch step, decodes the items that finished in it together
with the VAE and returns an ``Outcome`` (a ``RenderOutput``, or the error) for every request
whose last item finished or whose own work failed. A request may also take its songs' audio as the
VAE decodes it, window by window (``stream``: ``acestep.dit.stream``); its output is the same. It is
single-threaded tensor work, driven by one ``acestep.steploop.StepLoop`` thread
(``acestep.handler.AceStepHandler``)."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Deque, Dict, List, Optional, Union

import torch

from acestep.devices import release_cached_memory
from acestep.dit import vae as vae_ops
from acestep.dit.adapters import AdapterSlots
from acestep.dit.batch import DiTLimits, pad_rows
from acestep.dit.items import DiTItem, Progress, RenderOutput, SamplingSettings
from acestep.dit.prepare import EncodeCounts
from acestep.dit.running import RunningBatch, Track, attempt
from acestep.dit.stream import SongStream
from acestep.dit.tasks import splice_waveform
from acestep.fairness import DEFAULT_PRIORITY
from acestep.offload import RESIDENT
from acestep.steploop import Outcome, isolate

logger = logging.getLogger(__name__)
Items = Union[List[DiTItem], Callable[[], List[DiTItem]]]
# A request's songs while they decode: (song index, first sample, post-processed audio [2, n] on the
# CPU, the song's length in samples), called on the worker's thread in each song's order.
SongSink = Callable[[int, int, torch.Tensor, int], None]


@dataclass(eq=False)
class Render:
    """One request in the worker: its items (prepared on the worker's thread), their tracks, the
    audio of those decoded so far and the request's timings."""

    items: Items
    settings: SamplingSettings
    progress: Optional[Progress] = None
    tracks: List[Track] = field(default_factory=list)
    audios: Dict[int, torch.Tensor] = field(default_factory=dict)  # track index -> audio
    costs: Dict[str, float] = field(default_factory=dict)
    failed: bool = False
    tenant: str = ""  # whose request (opaque) and its priority class: the batch's admission order
    priority: int = DEFAULT_PRIORITY
    stream: Optional[SongSink] = None
    songs: Dict[int, SongStream] = field(default_factory=dict)  # track index -> its stream (with ``stream``)

    def report(self, _track: Track) -> None:
        if self.progress is None:
            return
        done, total = sum(t.step for t in self.tracks), sum(t.steps for t in self.tracks)
        step, steps = min(t.step for t in self.tracks), max(t.steps for t in self.tracks)
        try:
            self.progress(done / max(total, 1), f"diffusion step {step}/{steps}")
        except Exception:  # a progress sink must never stop the batch
            logger.exception("DiT progress callback failed")

    def song(self, track: Track) -> Optional[SongStream]:
        """The stream of ``track``'s song (None without ``stream``)."""
        if self.stream is None:
            return None
        index = self.tracks.index(track)
        if index not in self.songs:
            self.songs[index] = SongStream.of(track.item, track.x.shape[0], partial(self.stream, index))
        return self.songs[index]


class DiTWorker:
    """Requests → ``RenderOutput``s on one ``RunningBatch`` (the stepper a ``StepLoop`` drives)."""

    def __init__(self, bundle, limits: DiTLimits = DiTLimits(), adapters: Optional[AdapterSlots] = None,
                 offload: Any = RESIDENT):
        self.bundle = bundle
        self.batch = RunningBatch(bundle, limits, adapters)
        self.offload = offload  # brings each phase's offloaded modules to the device (acestep.offload)
        self.pending: Deque[Render] = deque()  # added, items not prepared yet
        self.requests = 0
        self.encodes = EncodeCounts()  # audio inputs VAE-encoded on this worker's thread

    def add(self, items: Items, settings: SamplingSettings, progress: Optional[Progress] = None,
            tenant: str = "", priority: int = DEFAULT_PRIORITY, stream: Optional[SongSink] = None) -> Render:
        """Queue one request: its items, or a function that prepares them at the next step (what it
        raises fails this request only); ``tenant`` and ``priority`` place its items in the running
        batch's admission order (``acestep.fairness``); ``stream`` takes its songs as they decode."""
        render = Render(items, settings, progress, tenant=tenant, priority=priority, stream=stream)
        self.pending.append(render)
        self.requests += 1
        return render

    def abort(self, render: Render) -> None:
        """Drop a request's waiting and running items (its caller went away)."""
        if render in self.pending:
            self.pending.remove(render)
        for track in render.tracks:
            self.batch.drop(track)

    @property
    def has_work(self) -> bool:
        return bool(self.pending) or self.batch.has_work

    def in_use(self, name: str) -> bool:
        """Whether a queued, waiting or running request uses adapter ``name``."""
        return self.batch.in_use(name) or any(name == n for r in self.pending for n, _ in r.settings.adapters or ())

    def stats(self) -> Dict[str, Any]:
        """Requests, queue and batch sizes (``items_per_forward``, ``rows_per_forward``), VAE encodes
        of audio inputs (``vae_encodes``: source, reference)."""
        # the counters are only written by the stepping thread; copies taken in one C call are consistent
        batch = self.batch
        items, rows = dict(batch.items_per_forward), dict(batch.rows_per_forward)
        stats = {"requests": self.requests, "waiting": len(self.pending) + len(batch.waiting),
                 "running": len(batch.running), "steps": sum(items.values()),
                 "items_per_forward": dict(sorted(items.items())), "rows_per_forward": dict(sorted(rows.items())),
                 "forwards_by_adapters": dict(sorted(dict(batch.forwards_by_adapters).items())),
                 "vae_encodes": {"source": self.encodes.source, "reference": self.encodes.reference}}
        if batch.adapters is not None:
            stats["adapters"] = batch.adapters.stats()
        return stats

    @torch.no_grad()
    def step(self) -> List[Outcome]:
        """Prepare queued requests, run one batch step, decode the items that finished in it; an
        ``Outcome`` for every request that completed or failed."""
        outcomes = self._prepare_pending()
        finished = []
        for track in self._sample():
            render = track.owner
            if render.failed:  # another of its items failed earlier in this step
                continue
            if track.error is not None:
                outcomes.append(self._fail(render, track.error))
            elif not torch.isfinite(track.x).all():
                outcomes.append(self._fail(render, RuntimeError("the DiT produced NaN/Inf latents")))
            else:
                finished.append(track)
        if finished:
            with self.offload.phase("decode"):
                outcomes += self._decode(finished)
        if not self.has_work:
            self.offload.release()
            release_cached_memory(self.bundle.device)  # once per idle spell: it costs a device sync
        return [o for o in outcomes if o is not None]

    def in_phase(self, phase: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` with ``phase``'s modules on the device (a call the worker's thread runs between steps)."""
        try:
            with self.offload.phase(phase):
                return fn()
        finally:
            if not self.has_work:
                self.offload.release()

    def _sample(self) -> List[Track]:
        if not self.batch.has_work:
            return []
        with self.offload.phase("sample"):
            return self.batch.step()

    def _take_pending(self) -> List[Render]:
        pending, self.pending = list(self.pending), deque()
        return pending

    def _prepare_pending(self) -> List[Outcome]:
        """Prepare every queued request: all their items first (audio read and encoded), then all
        their tracks (conditions encoded), so each phase's modules come to the device once."""
        renders, outcomes = self._take_pending(), []
        for render in renders:
            render.costs["started"] = time.perf_counter()
        if any(callable(r.items) for r in renders):
            with self.offload.phase("encode"):
                outcomes += [self._guard(r, partial(_build, r)) for r in renders]
        if renders:
            with self.offload.phase("text"):
                outcomes += [self._guard(r, partial(self._track, r)) for r in renders if not r.failed]
        return [o for o in outcomes if o is not None]

    def _guard(self, render: Render, fn: Callable[[], None]) -> Optional[Outcome]:
        """What ``fn`` raises (unreadable audio, bad codes...) fails this request only."""
        error = attempt(fn)
        return None if error is None else self._fail(render, error)

    def _track(self, render: Render) -> None:
        for index, item in enumerate(render.items):
            render.tracks.append(self.batch.track(item, render.settings, owner=render, on_step=render.report,
                                                  index=index, tenant=render.tenant, priority=render.priority))
        render.costs["encoded"] = time.perf_counter()

    def _fail(self, render: Render, error: Exception) -> Outcome:
        logger.error("DiT request failed: %r", error)
        render.failed = True
        self.abort(render)
        return Outcome(render, error=error)

    def _decode(self, tracks: List[Track]) -> List[Outcome]:
        """Decode the tracks that finished this step together (an item whose own decode raises
        fails its request alone); an ``Outcome`` for each request now complete or failed."""
        sampled = time.perf_counter()
        audios = isolate(lambda ts: decode_items(self.bundle, [t.item for t in ts], [t.x for t in ts],
                                                 on_piece=_song_pieces(ts)), tracks)
        decoded = time.perf_counter()
        outcomes, renders = [], {}
        for track, audio in zip(tracks, audios):
            render = track.owner
            if render.failed:
                continue
            if isinstance(audio, Exception):
                outcomes.append(self._fail(render, audio))
                continue
            render.audios[render.tracks.index(track)] = audio
            renders[id(render)] = render
        for render in renders.values():
            if render.failed:
                continue
            render.costs["vae"] = render.costs.get("vae", 0.0) + decoded - sampled
            if len(render.audios) == len(render.tracks):
                render.costs["sampled"] = sampled
                outcomes.append(Outcome(render, result=_output(render, decoded)))
        return outcomes


def _output(render: Render, decoded: float) -> RenderOutput:
    c = render.costs
    steps = max(t.steps for t in render.tracks)
    diffusion = c["sampled"] - c["encoded"]
    return collect(render.tracks, [render.audios[i] for i in range(len(render.tracks))], {
        "encoder_time_cost": c["encoded"] - c["started"], "diffusion_time_cost": diffusion,
        "diffusion_per_step_time_cost": diffusion / max(steps, 1), "vae_decode_time_cost": c["vae"],
        "total_time_cost": decoded - c["started"]})


def collect(tracks: List[Track], audios: List[torch.Tensor], time_costs: Dict[str, float]) -> RenderOutput:
    """One request's ``RenderOutput`` from its finished tracks and decoded audio."""
    main = [t.main for t in tracks]
    return RenderOutput(
        audios=audios, latents=pad_rows([t.x for t in tracks]).cpu(),
        extras={"encoder_hidden_states": pad_rows([m[0] for m in main]).cpu(),
                "encoder_attention_mask": pad_rows([m[1] for m in main]).cpu(),
                "context_latents": pad_rows([m[2] for m in main]).cpu(),
                "src_latents": pad_rows([t.clean for t in tracks]).cpu(),
                "chunk_masks": pad_rows([m[2][..., -1] for m in main]).cpu()},
        time_costs=time_costs)


def _song_pieces(tracks: List[Track]) -> Optional[vae_ops.OnPiece]:
    """The decode's window callback for ``tracks``: each window to its song's stream, if it has one."""
    songs = [track.owner.song(track) for track in tracks]
    if not any(songs):
        return None

    def on_piece(index: int, start: int, audio: torch.Tensor) -> None:
        if songs[index] is not None:
            songs[index].piece(start, audio)

    return on_piece


def decode_items(bundle, items: List[DiTItem], latents: List[torch.Tensor], window: Optional[int] = None,
                 on_piece: Optional[vae_ops.OnPiece] = None) -> List[torch.Tensor]:
    """Latents [T_i, C] per item → post-processed audio [2, T_i·1920] (CPU), decoded together
    (``vae.decode_batch``) after each item's latent shift/rescale; repaint items get the source
    waveform spliced back outside the window; then each item's normalisation and fades.
    ``on_piece`` gets each window's raw audio as it is decoded."""
    shaped = [vae_ops.transform_latents(x, item.post).to(bundle.dtype) for item, x in zip(items, latents)]
    decoded = vae_ops.decode_batch(bundle.vae, shaped, window, on_piece=on_piece)
    audios = []
    for item, wav in zip(items, decoded):
        repaint = item.repaint
        if repaint is not None and repaint.config.splice and item.source_audio is not None:
            wav = splice_waveform(wav, item.source_audio, repaint.samples, repaint.config.wav_crossfade_s)
        audios.append(vae_ops.postprocess(wav, item.post).cpu())
    return audios


def _build(render: Render) -> None:
    if callable(render.items):
        render.items = render.items()
