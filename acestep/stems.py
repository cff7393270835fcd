"""Stems: one extract or lego request for several tracks (``GenerationParams.tracks``, an extension
of the official API, whose requests name one track each in ``instruction``).

- ``tracks``: distinct names from ``TRACK_CHOICES`` (a list, or a string of names separated by commas),
  or a preset: "all" (the twelve tracks, ``ALL_TRACKS`` order) or "vocals+accompaniment".
- Every track of a song is its own DiT item with that track's official instruction; the items share
  one request, so the source is read and VAE-encoded once and the items run in the worker's shared
  forwards. Item (track, song i) takes seed i: each stem equals its solo run with that seed.
- ``batch_size`` counts songs per track: ``len(tracks) × batch_size`` audios, track by track (every
  song of the first track, then the next track's), each labelled with its ``track``.
- "accompaniment" (extract only; the model has no such track): everything but the lead vocal. The
  eleven other tracks are extracted raw (no normalisation, no fades), summed, and the sum is
  post-processed as one audio (clip guard, normalisation, fades).

Plain data and bookkeeping; ``acestep.inference`` expands a request with ``plan_stems`` and labels
its outputs with ``StemPlan.combine``. Imports no torch at module level (validation imports it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

from acestep.dit.tasks import default_instruction, task_instruction
from acestep.params import DEFAULT_DIT_INSTRUCTION, GenerationParams

ACCOMPANIMENT = "accompaniment"
# The twelve tracks, lead vocal first (the order "all" renders them in)
ALL_TRACKS = ("vocals", "backing_vocals", "drums", "bass", "guitar", "keyboard", "percussion", "strings", "synth",
              "fx", "brass", "woodwinds")
MIXES = {ACCOMPANIMENT: tuple(name for name in ALL_TRACKS if name != "vocals")}  # a mix: the tracks it sums
TRACK_PRESETS = {"all": ALL_TRACKS, "vocals+accompaniment": ("vocals", ACCOMPANIMENT)}
TRACK_CHOICES = ALL_TRACKS + tuple(MIXES)
MIX_TASKS = ("extract",)  # a sum of independently generated lego tracks would be no accompaniment
TRACKS_ALLOWED = ("'all', 'vocals+accompaniment', or distinct names (a list, or a string separated by commas) "
                  "from: " + ", ".join(TRACK_CHOICES))


def track_names(value: Any) -> Tuple[str, ...]:
    """``tracks`` as names, in order (case and spaces ignored); raises ValueError saying which
    entry is wrong, never echoing it."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRACK_PRESETS:
            return TRACK_PRESETS[text]
        entries: Sequence[Any] = text.split(",")
    elif isinstance(value, (list, tuple)):
        entries = value
    else:
        raise ValueError("expected a string or a list of strings")
    if not 1 <= len(entries) <= len(TRACK_CHOICES):
        raise ValueError(f"expected 1 to {len(TRACK_CHOICES)} names")
    names: List[str] = []
    for position, entry in enumerate(entries):
        name = entry.strip().lower() if isinstance(entry, str) else None
        if name not in TRACK_CHOICES:
            raise ValueError(f"entry {position} is not one of the names")
        if name in names:
            raise ValueError(f"entry {position} repeats {name!r}")
        names.append(name)
    return tuple(names)


def default_instructions(task_type: str) -> Tuple[str, ...]:
    """Instructions that name no track: with ``tracks`` each item gets its track's own."""
    return ("", DEFAULT_DIT_INSTRUCTION, default_instruction(task_type))


@dataclass(frozen=True)
class Stem:
    """One labelled output: its track, the song (index into the request's seeds) and the rendered
    items it is made of (one; a mix's parts, summed)."""

    track: str
    song: int
    items: Tuple[int, ...]


@dataclass
class StemPlan:
    """A tracks request as DiT items (params and seed each) and the outputs made from them."""

    items: List[GenerationParams]
    seeds: List[int]
    songs: List[int]  # each item's song
    stems: List[Stem]
    outputs: List[GenerationParams]  # each stem's params as its audio reports them

    def retake_seeds(self, per_song: Optional[tuple]) -> Optional[tuple]:
        """The request's retake seeds (one per song) as one per item, so each item gets its song's."""
        if not per_song:
            return per_song
        return tuple(per_song[song if song < len(per_song) else 0] for song in self.songs)

    def combine(self, audios: List[Any]) -> List[Any]:
        """The rendered items' audio ([2, S] each, in ``items`` order) → one audio per stem; a mix
        is the sum of its raw parts, post-processed with the request's settings."""
        from acestep.dit import vae as vae_ops
        from acestep.dit.prepare import post_process

        out = []
        for stem, params in zip(self.stems, self.outputs):
            if len(stem.items) == 1:
                out.append(audios[stem.items[0]])
            else:
                total = sum(audios[k] for k in stem.items[1:])
                out.append(vae_ops.postprocess(audios[stem.items[0]] + total, post_process(params)))
        return out


def _item(params: GenerationParams, track: str, raw: bool) -> GenerationParams:
    """One track's item: the official single-track request; ``raw``: a mix part, left unnormalised
    and unfaded until the parts are summed."""
    item = dataclasses.replace(params, tracks=None, instruction=task_instruction(params.task_type, [track]))
    if raw:
        item = dataclasses.replace(item, enable_normalization=False, fade_in_duration=0.0, fade_out_duration=0.0)
    return item


def plan_stems(item_params: List[GenerationParams], seeds: List[int]) -> StemPlan:
    """Expand a tracks request (one params per song, ``tracks`` set) into its DiT items."""
    names = track_names(item_params[0].tracks)
    plan = StemPlan([], [], [], [], [])
    for track in names:
        for song, (params, seed) in enumerate(zip(item_params, seeds)):
            parts = MIXES.get(track, (track,))
            start = len(plan.items)
            for part in parts:
                plan.items.append(_item(params, part, raw=track in MIXES))
                plan.seeds.append(seed)
                plan.songs.append(song)
            plan.stems.append(Stem(track, song, tuple(range(start, len(plan.items)))))
            plan.outputs.append(plan.items[start] if track not in MIXES else dataclasses.replace(
                params, tracks=None, instruction=default_instruction(params.task_type)))
    return plan
