"""A song's text as training sees it, without torch (the server's dataset routes use it too): its
sidecar fields (``SongText``), upstream's activation tag and genre rules (``CaptionTag``,
``training_caption``, ``genre_songs``, as upstream's ``get_full_caption`` / ``get_training_prompt`` /
``select_genre_indices`` write them), and upstream's rules for an auto-label run's labels
(``is_instrumental``, ``apply_labels``)."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Optional, Set

from acestep.params import INSTRUMENTAL_LYRICS

TAG_POSITIONS = ("prepend", "append", "replace")
PROMPT_OVERRIDES = ("caption", "genre")  # a song's own choice of prompt; None: the dataset's genre_ratio
GENRE_SHUFFLE_SEED = 42  # upstream's: which songs train on their genre


@dataclass(frozen=True)
class CaptionTag:
    """A dataset's activation tag (upstream's ``DatasetMetadata`` fields; defaults: its defaults)."""

    custom_tag: str = ""  # put into every song's caption (or genre); "": none
    tag_position: str = "prepend"  # "prepend" | "append" | "replace"
    genre_ratio: int = 0  # percent of songs trained on their genre instead of their caption

    def __post_init__(self):
        if self.tag_position not in TAG_POSITIONS:
            raise ValueError(f"tag_position: {self.tag_position!r} is not one of {', '.join(TAG_POSITIONS)}")
        if not 0 <= int(self.genre_ratio) <= 100:
            raise ValueError(f"genre_ratio: {self.genre_ratio} is not an integer from 0 to 100")

    def tagged(self, text: str) -> str:
        """``text`` with the tag (upstream's ``get_full_caption`` / ``get_full_genre``)."""
        if not self.custom_tag:
            return text
        if self.tag_position == "replace" or not text:
            return self.custom_tag
        if self.tag_position == "prepend":
            return f"{self.custom_tag}, {text}"
        return f"{text}, {self.custom_tag}"


def training_caption(tag: CaptionTag, caption: str, genre: str, prompt_override: Optional[str],
                     use_genre: bool) -> str:
    """The caption a song is trained on (upstream's ``get_training_prompt``): its own
    ``prompt_override`` first, else its genre when the dataset's ratio picked it, else its caption;
    tagged."""
    if prompt_override == "genre" or (prompt_override != "caption" and use_genre):
        return tag.tagged(genre)
    return tag.tagged(caption)


def genre_songs(count: int, genre_ratio: int) -> Set[int]:
    """The positions of the songs (of ``count``, in dataset order) that train on their genre: upstream's
    ``select_genre_indices`` (a seeded shuffle, the first ``count * ratio / 100``)."""
    positions = list(range(count))
    random.Random(GENRE_SHUFFLE_SEED).shuffle(positions)
    return set(positions[: int(count * genre_ratio / 100)])


@dataclass
class SongText:
    """What the text encoder is told about a song (empty / None: not given)."""

    caption: str = ""
    lyrics: str = ""
    bpm: Optional[int] = None
    keyscale: str = ""
    timesignature: str = ""
    language: str = ""

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SongText":
        """Known fields of a sidecar JSON; ``bpm`` as an int (a non-number is dropped)."""
        known = {f.name for f in fields(cls)}
        text = cls(**{k: ("" if v is None else str(v)) for k, v in values.items() if k in known and k != "bpm"})
        try:
            text.bpm = int(float(values["bpm"])) if values.get("bpm") not in (None, "") else None
        except (TypeError, ValueError):
            text.bpm = None
        return text

    def filled_from(self, other: "SongText") -> "SongText":
        """This text with its empty fields taken from ``other``."""
        return replace(self, **{f.name: getattr(other, f.name) for f in fields(self)
                                if getattr(self, f.name) in ("", None) and getattr(other, f.name) not in ("", None)})


def is_instrumental(values: Dict[str, Any], all_instrumental: bool) -> bool:
    """A song's own ``is_instrumental``, else upstream's scan rule: a song with lyrics sings, the others
    follow the dataset's ``all_instrumental``."""
    if isinstance(values.get("is_instrumental"), bool):
        return values["is_instrumental"]
    lyrics = str(values.get("lyrics") or "").strip()
    return all_instrumental if lyrics in ("", INSTRUMENTAL_LYRICS) else False


def apply_labels(values: Dict[str, Any], labels: Dict[str, Any], instrumental: bool, skip_metas: bool = False,
                 transcribe_lyrics: bool = False) -> Dict[str, Any]:
    """A song's text after an auto-label run (upstream's ``label_sample``): the LM's caption and
    language; its bpm and key where the song has none and its time signature, unless ``skip_metas``;
    lyrics: "[Instrumental]" for an instrumental song, else the LM's when ``transcribe_lyrics`` or the
    song has none, else the song's own."""
    out = {**values, "caption": labels.get("caption") or "", "language": labels.get("language") or "unknown"}
    if not skip_metas:
        if values.get("bpm") in (None, ""):
            out["bpm"] = labels.get("bpm")
        if not values.get("keyscale"):
            out["keyscale"] = labels.get("keyscale") or ""
        out["timesignature"] = labels.get("timesignature") or ""
    own = str(values.get("lyrics") or "").strip()
    if instrumental:
        out.update(lyrics=INSTRUMENTAL_LYRICS, language="unknown")
    elif transcribe_lyrics or own in ("", INSTRUMENTAL_LYRICS):
        out["lyrics"] = labels.get("lyrics") or ""
    out["labeled"] = True
    return out
