"""The running batch: DiT items (``Track``s), each at its own sampling step, sharing DiT forwards.

Items join at any step boundary and leave when their schedule ends; one DiT forward per step covers
every running item (padded and masked, ``acestep.dit.batch``). Each item keeps its own schedule,
timestep index, latents (fp32), seeded generator, guidance state (APG momentum) and conditions, so
its latents equal its solo run's to float rounding whoever it shares steps with. Items whose
adapter settings differ run in separate forwards (``acestep.dit.adapters``). Guidance wraps
the velocity per row (``acestep.dit.guidance.combine``) and the sampler steps per row
(``acestep.dit.samplers``, DCW from ``acestep.dit.dcw``), as in a solo run; a Heun item spends two
batch steps on each sampler step (its corrector row is evaluated in the next forward); a flow-edit
item (``acestep.dit.flow_edit``) puts a source and a target row per noise draw in the forward. Waiting
items join in the fair-share order of ``acestep.fairness`` (priority class, then the tenant with the
fewest running rows, then arrival) while the limits allow. A forward
that raises runs again on halves of its items (``acestep.steploop.isolate``): only an item whose
own forward or step raises leaves with its ``error``; its batch-mates go on."""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

from acestep.dit.adapters import AdapterError, AdapterSetting, AdapterSlots, setting_label
from acestep.dit.batch import DiTLimits, bucket_frames, forward_groups, velocity
from acestep.dit.conditioning import encode_conditions
from acestep.dit.dcw import DCWSettings, dcw_correct, resolve_dcw
from acestep.dit.flow_edit import FlowEditState, advance_edit, begin_edit_step, flow_edit_schedule
from acestep.dit.guidance import APG_MOMENTUM, combine, corrector_combine, in_cfg_interval
from acestep.dit.samplers import (corrector_velocity, heun_correct, ode_step, predictor_velocity, retake_noise,
                                  sde_step, uses_corrector)
from acestep.dit.schedules import build_schedule, cover_noise_schedule
from acestep.dit.tasks import crossfade_mask, inject_steps, silence_frames
from acestep.fairness import DEFAULT_PRIORITY, Entry, Turns
from acestep.steploop import isolate

StepHook = Callable[["Track"], None]
Velocities = Tuple[torch.Tensor, Optional[torch.Tensor]]  # (v_cond, v_uncond or None) [R, T, C] of one track's rows
Condition = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # encoder states [S, D], mask [S], context [T, 2C]
RowInput = Tuple[torch.Tensor, float, Condition]  # (latents [T, C], t, condition) of one cond row


@dataclass(eq=False)
class Track:
    """One item's sampling state in the worker (``owner``: whatever the caller attached)."""

    item: Any  # DiTItem
    settings: Any  # SamplingSettings
    timesteps: List[float]
    x: torch.Tensor  # [T, C] fp32
    noise: torch.Tensor  # the initial noise (repaint re-injects it)
    clean: torch.Tensor  # [T, C] fp32 source latents
    generator: torch.Generator
    main: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # encoder states [S, D], mask [S], context [T, 2C]
    fallback: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    switch_at: int = 0  # the step from which the fallback condition applies
    use_cfg: bool = False
    momentum: Optional[MomentumBuffer] = None
    keep: Optional[torch.Tensor] = None  # [T, 1] repaint: 1 inside the window (generated), 0 outside
    inject_steps: int = 0
    dcw: Optional[DCWSettings] = None  # set: DCW corrects every step
    retake_seed: Optional[int] = None  # the seed whose noise was mixed in (retake)
    previous_v: Optional[torch.Tensor] = None  # [1, T, C] the last step's final velocity (EMA)
    v: Optional[torch.Tensor] = None  # [1, T, C] this step's predictor velocity, while its corrector runs
    x_predicted: Optional[torch.Tensor] = None  # [T, C] Heun's predicted point: the corrector's row
    edit: Optional[FlowEditState] = None  # set: a flow-edit item (x is the edit, then the target variable)
    step: int = 0
    owner: Any = None
    tenant: str = ""  # whose item (opaque), for the fair-share admission order
    priority: int = DEFAULT_PRIORITY
    error: Optional[Exception] = None  # set when this item's own forward or step raised
    on_step: Optional[StepHook] = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return len(self.timesteps) - 1

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    @property
    def cond_rows(self) -> int:
        """Condition rows this step: a flow-edit item in its window takes a source and a target row
        per noise draw."""
        return 2 * self.edit.draws if self.edit is not None and self.step < self.edit.stop else 1

    @property
    def rows(self) -> int:
        return self.cond_rows * (2 if self.use_cfg else 1)

    @property
    def entry(self) -> Entry:
        return Entry(self.tenant, self.priority, float(self.rows))

    @property
    def adapters(self) -> AdapterSetting:
        return self.settings.adapters or ()

    @property
    def row_x(self) -> torch.Tensor:
        """The latents of this batch step's row: Heun's predicted point while its corrector runs."""
        return self.x if self.x_predicted is None else self.x_predicted

    @property
    def row_t(self) -> float:
        """The time of this batch step's row: t, or t_next for Heun's corrector."""
        return self.timesteps[self.step + (self.x_predicted is not None)]

    def condition(self) -> Condition:
        return self.fallback if self.fallback is not None and self.step >= self.switch_at else self.main

    def row_inputs(self) -> List[RowInput]:
        """This step's cond rows (a guided track adds a null row for each): one, or inside a
        flow-edit window the source points under the source condition, then the target points."""
        edit = self.edit
        if edit is not None and edit.points is not None:
            t = self.timesteps[self.step]
            z_src, z_tar = edit.points
            return [(z, t, edit.source) for z in z_src] + [(z, t, self.main) for z in z_tar]
        return [(self.row_x, self.row_t, self.condition())]


def _context(item, frames: int, silence: torch.Tensor, use_hints: bool) -> torch.Tensor:
    """[T, 2C]: (hints if cover else source latents) | chunk mask repeated over channels."""
    src = item.hints if use_hints and item.hints is not None else item.src_latents
    src = _fit(src.to(silence.device), frames, silence_frames(silence, frames))
    ones = torch.ones((frames,), device=silence.device, dtype=silence.dtype)
    mask = _fit(item.chunk_mask.to(device=silence.device, dtype=silence.dtype).unsqueeze(-1),
                frames, ones.unsqueeze(-1))
    return torch.cat([src, mask.expand_as(src).to(src)], dim=-1)


def _condition(bundle, item, text, use_hints: bool):
    """Encoder states and mask of one item, encoded alone (so padding never reaches the encoders)."""
    silence = bundle.silence_latent.to(device=bundle.device, dtype=bundle.dtype)
    states, mask = encode_conditions(bundle, [text], item.timbre.unsqueeze(0))
    return states[0], mask[0], _context(item, item.frames, silence, use_hints)


class RunningBatch:
    """Running items plus a queue of waiting ones, admitted while ``limits`` allow."""

    def __init__(self, bundle, limits: DiTLimits = DiTLimits(), adapters: Optional[AdapterSlots] = None):
        self.bundle, self.limits, self.adapters = bundle, limits, adapters
        self.waiting: Deque[Track] = deque()
        self.running: List[Track] = []
        self.turns = Turns()
        self.items_per_forward: Dict[int, int] = {}  # items in one forward -> forwards
        self.rows_per_forward: Dict[int, int] = {}  # rows (CFG items take two while guided) -> forwards
        self.forwards_by_adapters: Dict[str, int] = {}  # adapter setting label -> forwards

    # -- admission -----------------------------------------------------------------------------
    def track(self, item, settings, owner: Any = None, on_step: Optional[StepHook] = None, index: int = 0,
              tenant: str = "", priority: int = DEFAULT_PRIORITY) -> Track:
        """Prepare an item's sampling state (conditions encoded, noise drawn) and queue it;
        ``index``: the item's place in its request (which retake seed it takes); ``tenant`` and
        ``priority``: its place in the admission order."""
        self._check_adapters(settings.adapters or ())
        bundle, device = self.bundle, self.bundle.device
        silence = bundle.silence_latent.to(device)
        generator = torch.Generator(device=device).manual_seed(int(item.seed))
        noise = _noise(generator, item.frames, silence.shape[-1])
        retake_seed = None
        if settings.retake_variance > 0:
            retake_seed = settings.retake_seed(index)
            retake_seed = secrets.randbelow(2**32) if retake_seed is None or retake_seed < 0 else retake_seed
            other = _noise(torch.Generator(device=device).manual_seed(retake_seed), item.frames, silence.shape[-1])
            noise = retake_noise(noise, other, settings.retake_variance)
        clean = _fit(item.src_latents.float().to(device), item.frames, silence_frames(silence, item.frames).float())
        timesteps, x = self._start(settings, noise, clean)
        if len(timesteps) < 2:
            raise ValueError(f"timesteps: {list(settings.timesteps or ())} leave no sampling step")
        track = Track(item, settings, timesteps, x, noise, clean, generator,
                      _condition(bundle, item, item.text, True), owner=owner, on_step=on_step,
                      retake_seed=retake_seed, tenant=tenant, priority=priority)
        track.use_cfg = not bundle.is_turbo and settings.guidance_scale > 1.0
        track.momentum = MomentumBuffer(APG_MOMENTUM) if track.use_cfg else None
        if settings.flow_edit is not None and item.flow_edit is not None:  # no cover switch, DCW or repaint
            self._edit(track, index)
            self.waiting.append(track)
            return track
        if settings.cover_strength < 1.0 and item.cover_fallback is not None:
            track.fallback = _condition(bundle, item, item.cover_fallback, False)
            track.switch_at = int(track.steps * settings.cover_strength)
        if resolve_dcw(settings.dcw_enabled, bundle.is_turbo) and settings.dcw.active:
            track.dcw = settings.dcw
        if item.repaint:
            track.keep = crossfade_mask(item.repaint.window, item.frames, 0, device).unsqueeze(-1)
            track.inject_steps = inject_steps(item.repaint.config, track.steps, bundle.is_turbo)
        self.waiting.append(track)
        return track

    def _start(self, settings, noise: torch.Tensor, clean: torch.Tensor) -> Tuple[List[float], torch.Tensor]:
        """(schedule, starting latents): pure noise, or with cover noise the source re-noised to
        the schedule's t nearest 1 − strength and the schedule from there."""
        bundle = self.bundle
        schedule = dict(is_turbo=bundle.is_turbo, steps=settings.steps, shift=settings.shift,
                        timesteps=settings.timesteps, dtype=bundle.dtype)
        if settings.cover_noise_strength > 0:
            timesteps, t = cover_noise_schedule(strength=settings.cover_noise_strength, **schedule)
            return timesteps, t * noise + (1 - t) * clean
        return build_schedule(**schedule), noise.clone()

    def _edit(self, track: Track, index: int) -> None:
        """Make a track a flow-edit item's: upstream's flow-edit schedule, the source latents as its
        start, the source condition (same context and timbre as the target's), its own noise
        generator and momentum; the steps before the window are skipped."""
        item, settings, device = track.item, track.settings, self.bundle.device
        silence = self.bundle.silence_latent.to(device)
        track.x = _fit(item.flow_edit.latents.float().to(device), item.frames,
                       silence_frames(silence, item.frames).float())
        track.timesteps = flow_edit_schedule(is_turbo=self.bundle.is_turbo, steps=settings.steps,
                                             shift=settings.shift, timesteps=settings.timesteps, dtype=self.bundle.dtype)
        start, stop = settings.flow_edit.steps(track.steps)
        generator = torch.Generator(device=device).manual_seed(settings.edit_seed(index, item.seed))
        track.edit = FlowEditState(_condition(self.bundle, item, item.flow_edit.text, True), track.x.clone(), stop,
                                   settings.flow_edit.draws, generator,
                                   MomentumBuffer(APG_MOMENTUM) if track.use_cfg else None)
        track.step = start

    def _check_adapters(self, setting: AdapterSetting) -> None:
        if setting and self.adapters is None:
            raise AdapterError("lora: this DiT serves no adapters")
        if self.adapters is not None:
            self.adapters.check(setting)

    def in_use(self, name: str) -> bool:
        """Whether a waiting or running item uses adapter ``name``."""
        return any(name == n for t in (*self.waiting, *self.running) for n, _ in t.adapters)

    def _admit(self) -> None:
        """Waiting tracks join in the fair-share order; the next one holds back the rest while it
        does not fit."""
        while self.waiting:
            running = [t.entry for t in self.running]
            track = self.waiting[self.turns.pick([t.entry for t in self.waiting], running)]
            candidate = self.running + [track]
            rows = sum(t.rows for t in candidate)
            if self.running and not self.limits.fits(rows, rows * bucket_frames(max(t.item.frames for t in candidate))):
                return
            self.waiting.remove(track)
            self.running.append(track)
            self.turns.served(track.tenant, [t.entry for t in (*self.waiting, *self.running)])

    def drop(self, track: Track) -> None:
        """Remove a waiting or running track (its owner went away)."""
        if track in self.running:
            self.running.remove(track)
        elif track in self.waiting:
            self.waiting.remove(track)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> List[Track]:
        """Admit, run one DiT forward for every running track's current step; returns the tracks
        that left the batch: finished ones, and failed ones (``error`` set)."""
        self._admit()
        left = []
        for track in list(self.running):  # draw flow-edit noise once per step, before any forward
            if track.edit is not None and not track.done:
                track.error = attempt(partial(_begin_edit_step, track))
            if track.error is not None or track.done:  # done: a flow-edit window that skips every step
                self.running.remove(track)
                left.append(_leave(track))
        tracks = list(self.running)
        for track, result in zip(tracks, self._velocities(tracks) if tracks else []):
            track.error = result if isinstance(result, Exception) else attempt(partial(self._advance, track, *result))
            if track.error is None and track.on_step is not None:
                track.on_step(track)
            if track.error is not None or track.done:
                self.running.remove(track)
                left.append(_leave(track))
        return left

    def _velocities(self, tracks: List[Track]) -> List[Union[Velocities, Exception]]:
        """(v_cond, v_uncond or None) per track, or the exception its own forward raised. Tracks with
        different adapter settings never share a forward; within a setting, one forward per group
        of similar lengths (``forward_groups``), each holding its tracks' cond rows, then the null
        rows of those whose guidance applies now."""
        out: Dict[int, Union[Velocities, Exception]] = {}
        by_setting: Dict[AdapterSetting, List[int]] = {}
        for i, track in enumerate(tracks):
            by_setting.setdefault(track.adapters, []).append(i)
        for setting, indices in by_setting.items():
            activation_error = attempt(partial(self.adapters.activate, setting)) if self.adapters is not None else None
            for group in forward_groups([tracks[i].item.frames for i in indices], self.limits.max_padding):
                members = [tracks[indices[j]] for j in group]
                if activation_error is not None:  # no forward of this setting can run
                    results = [activation_error] * len(members)
                else:
                    results = isolate(self._forward, members)
                for track, result in zip(members, results):
                    out[id(track)] = result
                _count(self.forwards_by_adapters, setting_label(setting))
        return [out[id(t)] for t in tracks]

    def _forward(self, members: List[Track]) -> List[Velocities]:
        guided = [t.use_cfg and in_cfg_interval(t.row_t, *t.settings.cfg_interval) for t in members]
        inputs = [t.row_inputs() for t in members]
        rows = [(*row, False) for track_rows in inputs for row in track_rows]
        rows += [(*row, True) for track_rows, g in zip(inputs, guided) if g for row in track_rows]
        v = velocity(self.bundle.transformer, *self._rows(rows))
        _count(self.items_per_forward, len(members))
        _count(self.rows_per_forward, len(rows))
        out, cond_at, null_at = [], 0, sum(len(r) for r in inputs)
        for track_rows, g in zip(inputs, guided):
            n = len(track_rows)
            v_uncond = torch.stack(v[null_at: null_at + n]) if g else None
            out.append((torch.stack(v[cond_at: cond_at + n]), v_uncond))
            cond_at, null_at = cond_at + n, null_at + (n if g else 0)
        return out

    def _rows(self, rows: List[Tuple[torch.Tensor, float, Condition, bool]]):
        """``velocity``'s inputs for (latents, t, condition, null condition?) rows."""
        null_emb = self.bundle.condition_encoder.null_condition_emb
        hidden, times, states, contexts = [], [], [], []
        for x, t, (cond_states, _, context), null in rows:
            hidden.append(x)
            times.append(t)
            states.append(null_emb.to(cond_states).reshape(1, -1).expand_as(cond_states) if null else cond_states)
            contexts.append(context)
        return hidden, times, states, contexts

    def _advance(self, track: Track, v_cond: torch.Tensor, v_uncond: Optional[torch.Tensor]) -> None:
        """One batch step of a track: the predictor (Euler / SDE, or Heun's first half, which
        leaves the corrector's row for the next batch step), or Heun's corrector."""
        if track.edit is not None:
            return _advance_edit(track, v_cond, v_uncond)
        if track.x_predicted is not None:
            return self._correct(track, v_cond, v_uncond)
        s = track.settings
        t, t_next = track.timesteps[track.step], track.timesteps[track.step + 1]
        x = track.x.unsqueeze(0)
        v = v_cond
        if v_uncond is not None:
            v = combine(x, t, v, v_uncond, s.guidance_scale, s.use_adg, track.momentum)
        v = predictor_velocity(v, x, s.controls, track.previous_v)
        if uses_corrector(s.sampler_mode, s.method, t_next, self.bundle.is_turbo):
            track.v, track.x_predicted = v, (x - v * (t - t_next))[0]
            return None
        velocity_fn = lambda _x, _t: v  # noqa: E731  (this step's guided velocity)
        if s.method == "sde":
            noise_fn = lambda x0: torch.randn(x0.shape, generator=track.generator, device=x0.device)  # noqa: E731
            x_next = sde_step(velocity_fn, x, t, t_next, noise_fn)
        else:
            x_next = ode_step(velocity_fn, x, t, t_next)
        return _finish_step(track, x_next, v, v)

    def _correct(self, track: Track, v_cond: torch.Tensor, v_uncond: Optional[torch.Tensor]) -> None:
        """Heun's corrector at (x_predicted, t_next), then the averaged step."""
        s = track.settings
        t, t_next = track.timesteps[track.step], track.timesteps[track.step + 1]
        x_predicted = track.x_predicted.unsqueeze(0)
        v2 = v_cond
        if v_uncond is not None:
            v2 = corrector_combine(x_predicted, t_next, v2, v_uncond, s.guidance_scale, s.use_adg)
        v2 = corrector_velocity(v2, x_predicted, s.controls, track.v)
        x_next, v_avg = heun_correct(track.x.unsqueeze(0), track.v, v2, t, t_next)
        _finish_step(track, x_next, track.v, v_avg)


def _finish_step(track: Track, x_next: torch.Tensor, v: torch.Tensor, v_final: torch.Tensor) -> None:
    """DCW against the predictor's data estimate, repaint re-injection, then the next step;
    ``v_final`` (Heun: the averaged velocity) is what the next step's EMA blends in."""
    t, t_next = track.timesteps[track.step], track.timesteps[track.step + 1]
    if track.dcw is not None:
        x_next = dcw_correct(x_next, track.x.unsqueeze(0) - v * t, t, track.dcw)
    x = x_next[0]
    if track.keep is not None and track.step < track.inject_steps:
        x = track.keep * x + (1 - track.keep) * (t_next * track.noise + (1 - t_next) * track.clean)
    track.x, track.previous_v, track.v, track.x_predicted = x, v_final, None, None
    track.step += 1


def _begin_edit_step(track: Track) -> None:
    track.x = begin_edit_step(track.edit, track.x, track.timesteps[track.step], track.step)


def _advance_edit(track: Track, v_cond: torch.Tensor, v_uncond: Optional[torch.Tensor]) -> None:
    s = track.settings
    t, t_next = track.timesteps[track.step], track.timesteps[track.step + 1]
    track.x, track.previous_v = advance_edit(track.edit, track.x, v_cond, v_uncond, t, t_next, s.guidance_scale,
                                             s.controls, track.momentum, track.previous_v)
    track.step += 1


def _leave(track: Track) -> Track:
    """A track leaving the batch: failed as it is, finished with its repaint edges blended."""
    return track if track.error is not None else _finish_repaint(track)


def _noise(generator: torch.Generator, frames: int, channels: int) -> torch.Tensor:
    """[T, C] standard normal noise from ``generator`` (drawn as a batch of one, as upstream)."""
    return torch.randn((1, frames, channels), generator=generator, device=generator.device)[0]


def attempt(fn: Callable[[], Any]) -> Optional[Exception]:
    """None when ``fn()`` returns, else what it raised (one item's failure, kept on its track)."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - fails that item only
        return error
    return None


def _count(counter: Dict[Any, int], size: Any) -> None:
    counter[size] = counter.get(size, 0) + 1


def _fit(rows: torch.Tensor, frames: int, filler: torch.Tensor) -> torch.Tensor:
    if rows.shape[0] >= frames:
        return rows[:frames]
    return torch.cat([rows, filler[: frames - rows.shape[0]].to(rows)], 0)


def _finish_repaint(track: Track) -> Track:
    """Blend the source back outside the repaint window (soft edges; none at width 0, as upstream)."""
    repaint = track.item.repaint
    if repaint and repaint.config.crossfade_frames > 0:
        soft = crossfade_mask(repaint.window, track.item.frames, repaint.config.crossfade_frames,
                              track.x.device).unsqueeze(-1)
        track.x = soft * track.x + (1 - soft) * track.clean
    return track
