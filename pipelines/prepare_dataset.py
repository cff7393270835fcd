"""``python -m pipelines.prepare_dataset``: audio files → prepared training samples, with Ray Data.

    python -m pipelines.prepare_dataset --input songs/ --output prepared/ --checkpoints ./checkpoints --labels
    python -m pipelines.prepare_dataset --input s3://bucket/songs/ --output prepared/ --demo

The driver lists the audio files (``--input``: a folder or a filesystem URI) and their sidecars,
upstream's conventions: ``<stem>.caption.txt`` (caption), ``<stem>.lyrics.txt``, ``<stem>.lyrics`` or
``<stem>.txt`` (lyrics), ``<stem>.json`` (caption, lyrics, bpm, keyscale, timesignature, language,
and upstream's genre and prompt_override; it wins over the text files). A pool of ``PrepareStage``
actors (each holding the VAE, text encoder and condition encoder, and with ``--labels`` the 5 Hz LM)
writes one ``{id}.safetensors`` per song
(``acestep.training.samples``); with ``--labels`` the LM's ``understand_music`` on the audio's codes
fills what the sidecars leave out (a song without any text gets the LM's caption; without the LM,
its file name). ``--custom-tag`` / ``--tag-position`` / ``--genre-ratio``: upstream's activation tag
in every caption (``acestep.training.labels.training_caption``; a sidecar's ``genre`` and
``prompt_override`` count). The driver journals each song's record and writes ``manifest.jsonl`` +
``manifest.json``. A rerun skips the songs already prepared whose text (sidecars, tag) and audio size
are unchanged (each record keeps a fingerprint of them); a file that fails (unreadable audio, say) is
recorded with its error, the others go on, and the next run tries it again.

``label_songs``: the LM's labels of each song, without preparing it (the server's auto-label job
writes them into the songs' sidecars, ``write_sidecar``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from acestep.lm.constants import DEFAULT_LM_MODEL
from acestep.training.labels import CaptionTag
from acestep.training.samples import DatasetManifest, SampleRecord

logger = logging.getLogger(__name__)
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")
CAPTION_SIDECARS = (".caption.txt",)
LYRIC_SIDECARS = (".lyrics.txt", ".lyrics", ".txt")
JSON_SIDECAR = ".json"
MAX_SECONDS = 240.0  # upstream's preprocessing cap: longer songs are cut


@dataclass
class PrepareOptions:
    """Everything the job needs; ``main`` fills it from the command line."""

    input: str  # a folder of audio files (and sidecars), local or a filesystem URI
    output: str  # the prepared folder (sample files + manifest); shared storage on a cluster
    checkpoints: Optional[str] = None  # checkpoints root
    demo: bool = False  # tiny demo checkpoints, written under {output}/.demo-checkpoints
    dit_config: str = "acestep-v15-turbo"  # the DiT whose encoders prepare the samples
    labels: bool = False  # auto-labels with the 5 Hz LM
    lm: str = DEFAULT_LM_MODEL  # the LM folder for --labels
    device: str = "auto"
    actors: int = 1  # PrepareStage actors
    cpus: float = 1.0  # CPUs per actor
    gpus: float = 0.0  # GPUs per actor
    seed: int = 0  # VAE posterior sampling and labels: each song's seed derives from it and its id
    max_seconds: float = MAX_SECONDS
    custom_tag: str = CaptionTag.custom_tag  # upstream's activation tag (see CaptionTag)
    tag_position: str = CaptionTag.tag_position
    genre_ratio: int = CaptionTag.genre_ratio

    def caption_tag(self) -> CaptionTag:
        return CaptionTag(self.custom_tag, self.tag_position, self.genre_ratio)


@dataclass
class SongFile:
    """One audio file as the driver found it (paths as fsspec URLs or local paths)."""

    id: str
    source: str
    sidecars: Dict[str, str] = field(default_factory=dict)  # "caption" | "lyrics" | "json" → path
    size: int = 0  # the audio file's bytes
    values: Optional[Dict[str, Any]] = None  # its sidecars' fields, read by the driver (None: unreadable)
    use_genre: bool = False  # trains on its genre (the dataset's genre_ratio picked it)
    fingerprint: str = ""  # of what its sample is made from: text, tag, audio size


@dataclass
class PrepareSummary:
    total: int
    skipped: int  # prepared by an earlier run
    done: int
    failed: int
    seconds: float
    records: List[SampleRecord] = field(default_factory=list, repr=False)

    def line(self) -> str:
        return (f"prepare-dataset: {self.done} prepared, {self.failed} failed, {self.skipped} skipped "
                f"(of {self.total}) in {self.seconds:.1f}s")


def song_id(relative: str) -> str:
    """A file name for the song: its path without the suffix, made safe, plus a short hash of the
    path (``a/b.wav`` and ``a_b.wav`` stay apart)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", relative.rsplit(".", 1)[0]).strip("_")[:80] or "song"
    return f"{stem}-{hashlib.blake2b(relative.encode(), digest_size=4).hexdigest()}"


def list_songs(root: str) -> List[SongFile]:
    """The audio files under ``root`` (recursive, sorted) with their sidecars."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    infos = fs.find(base, detail=True)
    files = sorted(infos)
    present = set(files)
    protocol = "" if root.startswith("/") or "://" not in root else root.split("://", 1)[0] + "://"
    songs = []
    for path in files:
        if not path.lower().endswith(AUDIO_SUFFIXES):
            continue
        stem = path.rsplit(".", 1)[0]
        sidecars = {}
        for kind, suffixes in (("caption", CAPTION_SIDECARS), ("lyrics", LYRIC_SIDECARS), ("json", (JSON_SIDECAR,))):
            found = next((stem + s for s in suffixes if stem + s in present), None)
            if found:
                sidecars[kind] = protocol + found
        songs.append(SongFile(song_id(path[len(base) + 1:]), protocol + path, sidecars,
                              int(infos[path].get("size") or 0)))
    return songs


def read_bytes(path: str) -> bytes:
    import fsspec

    with fsspec.open(path, "rb") as handle:
        return handle.read()


def sidecar_values(song: SongFile) -> Dict[str, Any]:
    """The song's own fields from its sidecars: the JSON's, with caption and lyrics from the text
    files where the JSON leaves them empty."""
    values: Dict[str, Any] = {}
    for kind in ("caption", "lyrics"):
        if kind in song.sidecars:
            values[kind] = read_bytes(song.sidecars[kind]).decode().strip()
    if "json" in song.sidecars:
        own = json.loads(read_bytes(song.sidecars["json"]))
        if not isinstance(own, dict):
            raise ValueError(f"{song.sidecars['json']}: a sidecar JSON holds an object")
        values.update({key: value for key, value in own.items() if value not in ("", None)})
    return values


def sidecar_path(song: SongFile) -> str:
    """Where the song's JSON sidecar is (or would be)."""
    return song.sidecars.get("json") or song.source.rsplit(".", 1)[0] + JSON_SIDECAR


def write_sidecar(song: SongFile, values: Dict[str, Any]) -> None:
    """The song's JSON sidecar (whole: it wins over the text files); a local one through a rename."""
    import fsspec

    from acestep.jsonl import replace_atomically

    path, text = sidecar_path(song), json.dumps(values, ensure_ascii=False, indent=1)
    if "://" not in path:
        replace_atomically(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return
    with fsspec.open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def describe(songs: List[SongFile], tag: CaptionTag) -> None:
    """Read each song's sidecars, pick the songs that train on their genre and fingerprint each song's
    inputs; a song whose sidecars cannot be read keeps ``values`` None (its stage records the error)."""
    from acestep.training.labels import genre_songs

    genre = genre_songs(len(songs), tag.genre_ratio)
    for position, song in enumerate(songs):
        try:
            song.values = sidecar_values(song)
        except (OSError, ValueError):
            song.values = None
        song.use_genre = position in genre
        inputs = {"values": song.values, "tag": [tag.custom_tag, tag.tag_position], "genre": song.use_genre,
                  "size": song.size}
        digest = hashlib.blake2b(json.dumps(inputs, sort_keys=True, default=str).encode(), digest_size=8)
        song.fingerprint = digest.hexdigest() if song.values is not None else ""


class PrepareStage:
    """Prepares songs (rows: ``song`` JSON) → ``record`` JSON; writes the sample files itself."""

    def __init__(self, checkpoints: str, dit_config: str, output: str, labels: bool, lm: str, device: str,
                 seed: int, max_seconds: float, tag: Optional[Dict[str, Any]] = None):
        from acestep.checkpoints.bundle import load_dit_bundle
        from acestep.checkpoints.layout import resolve_dit_checkpoint
        from acestep.devices import resolve_device

        self.device = resolve_device(device)
        self.bundle = load_dit_bundle(resolve_dit_checkpoint(checkpoints, dit_config), device=self.device)
        self.output, self.seed, self.max_seconds = Path(output), seed, max_seconds
        self.tag = CaptionTag(**(tag or {}))
        self.llm = None
        if labels:
            from acestep.llm_inference import LLMHandler

            self.llm = LLMHandler()
            self.llm.initialize(checkpoints, lm_model_path=lm, backend="pt", device=str(self.device))

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[str]]:
        records = []
        for text in batch["song"]:
            song = SongFile(**json.loads(text))
            try:
                record = self.prepare(song)
                record.fingerprint = song.fingerprint
            except Exception as error:  # one bad file is recorded, the others go on
                logger.warning("%s: %s", song.source, error)
                record = SampleRecord(id=song.id, source=song.source,
                                      error=f"{song.source.rsplit('/', 1)[-1]}: {type(error).__name__}: {error}")
            record.finished_at = time.time()
            records.append(json.dumps(record.__dict__, ensure_ascii=False))
        return {"record": records}

    def seed_of(self, song: SongFile) -> int:
        from acestep.training.loop import derived_seed

        return derived_seed(self.seed, int(song.id.rsplit("-", 1)[1], 16)) % (2 ** 31)

    def prepare(self, song: SongFile) -> SampleRecord:
        from acestep.training.labels import SongText, training_caption
        from acestep.training.prepare import auto_labels, encode_audio, prepare_sample
        from acestep.training.samples import write_sample

        seed = self.seed_of(song)
        values = song.values if song.values is not None else sidecar_values(song)  # raises for a broken sidecar
        text = SongText.from_dict(values)
        latents = encode_audio(self.bundle, read_bytes(song.source), seed, self.max_seconds)
        labels = auto_labels(self.bundle, self.llm, latents, seed) if self.llm is not None else None
        if labels is not None:
            text = text.filled_from(SongText.from_dict(labels))
        text.caption = training_caption(self.tag, text.caption, str(values.get("genre") or ""),
                                        values.get("prompt_override"), song.use_genre)
        if not text.caption:
            text.caption = Path(song.source).stem.replace("_", " ")
        sample = prepare_sample(self.bundle, latents, text, {"id": song.id, "source": song.source, "labels": labels})
        name = f"{song.id}.safetensors"
        write_sample(sample, self.output / name)
        return SampleRecord(id=song.id, source=song.source, file=name, frames=sample.frames, labels=labels,
                            **text.__dict__)


class LabelStage(PrepareStage):
    """The LM's labels of each song (rows: ``song`` JSON → ``record`` JSON: id and labels or error);
    writes nothing."""

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[str]]:
        from acestep.training.prepare import auto_labels, encode_audio

        records = []
        for text in batch["song"]:
            song = SongFile(**json.loads(text))
            try:
                seed = self.seed_of(song)
                latents = encode_audio(self.bundle, read_bytes(song.source), seed, self.max_seconds)
                record = {"id": song.id, "labels": auto_labels(self.bundle, self.llm, latents, seed)}
            except Exception as error:  # one bad file is recorded, the others go on
                logger.warning("%s: %s", song.source, error)
                record = {"id": song.id, "error": f"{song.source.rsplit('/', 1)[-1]}: {type(error).__name__}: {error}"}
            records.append(json.dumps(record, ensure_ascii=False))
        return {"record": records}


def _resolve_checkpoints(options: PrepareOptions) -> None:
    from acestep.checkpoints.layout import resolve_dit_checkpoint, resolve_lm_dir

    if options.demo:
        from acestep.checkpoints.demo import write_demo_checkpoints

        root = Path(options.output) / ".demo-checkpoints"
        if not (root / options.dit_config).is_dir():
            write_demo_checkpoints(root)
        options.checkpoints = str(root)
    options.checkpoints = str(Path(options.checkpoints).resolve())
    resolve_dit_checkpoint(options.checkpoints, options.dit_config)
    if options.labels:
        resolve_lm_dir(options.checkpoints, options.lm)


def build_dataset(options: PrepareOptions, pending: List[SongFile], stage=PrepareStage):
    import ray

    tag = options.caption_tag()
    ds = ray.data.from_items([{"song": json.dumps(song.__dict__)} for song in pending])
    return ds.map_batches(
        stage, batch_size=1,
        fn_constructor_kwargs={"checkpoints": options.checkpoints, "dit_config": options.dit_config,
                               "output": str(Path(options.output).resolve()), "labels": options.labels,
                               "lm": options.lm, "device": options.device, "seed": options.seed,
                               "max_seconds": options.max_seconds,
                               "tag": {"custom_tag": tag.custom_tag, "tag_position": tag.tag_position}},
        compute=ray.data.ActorPoolStrategy(size=options.actors), num_cpus=options.cpus, num_gpus=options.gpus)


def run(options: PrepareOptions) -> PrepareSummary:
    """List, skip what is prepared, prepare the rest, write the manifest."""
    import ray

    started = time.perf_counter()
    songs = list_songs(options.input)
    if not songs:
        raise FileNotFoundError(f"--input {options.input}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    describe(songs, options.caption_tag())
    _resolve_checkpoints(options)
    Path(options.output).mkdir(parents=True, exist_ok=True)
    manifest = DatasetManifest(options.output)
    previous = manifest.load()
    pending = [song for song in songs if not _unchanged(manifest, previous.get(song.id), song)]
    done = failed = 0
    if pending:
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS (set in a RayJob) or a new local Ray
        for row in build_dataset(options, pending).iter_rows():
            record = SampleRecord.from_dict(json.loads(row["record"]))
            manifest.append(record)
            failed += record.error is not None
            done += record.error is None
    records = manifest.finalize([song.id for song in songs])
    return PrepareSummary(len(songs), len(songs) - len(pending), done, failed, time.perf_counter() - started, records)


def _unchanged(manifest: DatasetManifest, record: Optional[SampleRecord], song: SongFile) -> bool:
    """Prepared, and from the same text, tag and audio (a song whose labels changed is prepared again)."""
    return manifest.is_complete(record) and bool(song.fingerprint) and record.fingerprint == song.fingerprint


Labeled = Tuple[SongFile, Optional[Dict[str, Any]], Optional[str]]  # the song, its labels or the error


def label_songs(options: PrepareOptions, songs: List[SongFile]) -> Iterator[Labeled]:
    """Each song with the LM's labels (or the error that stopped them), as the stage finishes it."""
    import ray

    options = replace(options, labels=True)
    _resolve_checkpoints(options)
    if not ray.is_initialized():
        ray.init()
    by_id = {song.id: song for song in songs}
    for row in build_dataset(options, songs, LabelStage).iter_rows():
        record = json.loads(row["record"])
        yield by_id[record["id"]], record.get("labels"), record.get("error")


def build_parser() -> argparse.ArgumentParser:
    defaults = PrepareOptions("", "")
    p = argparse.ArgumentParser(prog="python -m pipelines.prepare_dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="a folder of audio files and sidecars, or a filesystem URI")
    p.add_argument("--output", required=True, help="the prepared folder (sample files + manifest)")
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--checkpoints", help="checkpoints root")
    models.add_argument("--demo", action="store_true", help="tiny demo checkpoints (written under --output)")
    p.add_argument("--dit-config", default=defaults.dit_config)
    p.add_argument("--labels", action="store_true", help="auto-labels from the 5 Hz LM (understand_music)")
    p.add_argument("--lm", default=defaults.lm, help=f"LM folder for --labels (default {defaults.lm})")
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--actors", type=int, default=defaults.actors)
    p.add_argument("--cpus", type=float, default=defaults.cpus, help="CPUs per actor")
    p.add_argument("--gpus", type=float, default=defaults.gpus, help="GPUs per actor")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--max-seconds", type=float, default=defaults.max_seconds, help="longer songs are cut here")
    p.add_argument("--custom-tag", default=defaults.custom_tag, help="an activation tag put into every caption")
    p.add_argument("--tag-position", default=defaults.tag_position, choices=("prepend", "append", "replace"))
    p.add_argument("--genre-ratio", type=int, default=defaults.genre_ratio,
                   help="percent of songs trained on their sidecar's genre instead of their caption")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """0 when every song is prepared, 1 when some failed, 2 when the input or a model is missing."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        summary = run(PrepareOptions(**vars(args)))
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.line())
    print(f"manifest: {Path(args.output) / 'manifest.jsonl'} (+ manifest.json)")
    return 0 if all(r.error is None for r in summary.records) else 1


if __name__ == "__main__":
    sys.exit(main())
