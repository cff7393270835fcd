"""The official server's dataset routes (``/v1/dataset/*``) in its ``{"data", "code", "error"}``
envelope, on jobs that run outside the ingress (``serve.training``).

A dataset is a named folder in the training directory: its songs with their sidecars (a song's labels:
caption, genre, prompt_override, lyrics, bpm, keyscale, timesignature, language, is_instrumental, as
upstream's samples hold them) and its ``dataset.json`` (upstream's dataset metadata: custom_tag,
tag_position, all_instrumental, genre_ratio). Upstream keeps one dataset in server memory and saves it
to a JSON path; here each key's latest dataset is a name in the task store's settings, every edit is
written at once, ``save`` copies a dataset under another name and ``load`` names one. ``audio_dir``
(scan) must lie inside ``ingress.allowed_audio_dirs``; songs otherwise arrive by upload. Preprocessing
and auto-labels are jobs (``dataset`` and ``label`` tasks); the synchronous routes await them, bounded."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional

from fastapi import Request
from pydantic import Field

from acestep.params import INSTRUMENTAL_LYRICS, MAX_CAPTION_CHARS, MAX_LYRICS_CHARS
from acestep.training.labels import TAG_POSITIONS, SongText, is_instrumental
from serve.compat import release as compat
from serve.edge.errors import APIError, FieldError, error_responses
from serve.http_app import api, json_body, not_found
from serve.training import DatasetMeta, dataset_dirs, is_labeled, read_meta, write_meta
from serve.training_api import JobRoutes, _Body, name_of, parse

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")
SNIFFED_SUFFIX = {"wav": ".wav", "flac": ".flac", "mp3": ".mp3", "ogg": ".ogg"}
TagPosition = Literal["prepend", "append", "replace"]
DATASET_NAME = "Which dataset; unset: the key's latest one (scanned, uploaded to or loaded)."
IGNORED_PATH = "Accepted and ignored (a server path upstream): "


class ScanBody(_Body):
    audio_dir: str = Field(min_length=1, max_length=4096, description="A directory inside ingress.allowed_audio_dirs.")
    dataset_name: str = Field("my_lora_dataset", description="The dataset's name (letters, digits, _ . -).")
    custom_tag: str = Field("", max_length=256, description="An activation tag put into every song's caption.")
    tag_position: TagPosition = Field("replace", description="Where the tag goes: prepend, append or replace.")
    all_instrumental: bool = Field(True, description="Songs without lyrics are instrumental.")


class LoadBody(_Body):
    dataset_path: str = Field(description="A dataset's name ('./name' and 'name.json' spellings accepted).")


class SaveBody(_Body):
    save_path: str = Field(min_length=1, description="The name to save under ('./name', 'name.json' accepted): the "
                                                     "dataset's own name saves it in place, another name copies its "
                                                     "songs and labels there; that dataset becomes the key's latest.")
    dataset_name: Optional[str] = Field(None, description=DATASET_NAME)
    custom_tag: Optional[str] = Field(None, max_length=256, description="Unset: kept.")
    tag_position: Optional[TagPosition] = Field(None, description="Unset: kept.")
    all_instrumental: Optional[bool] = Field(None, description="Unset: kept.")
    genre_ratio: Optional[int] = Field(None, ge=0, le=100, description="Percent of songs trained on their genre "
                                                                       "instead of their caption; unset: kept.")


class SampleBody(_Body):
    sample_idx: Optional[int] = Field(None, ge=0, description="Upstream's copy of the path's index: sent, it must "
                                                              "equal it.")
    caption: str = Field("", max_length=MAX_CAPTION_CHARS)
    genre: str = Field("", max_length=MAX_CAPTION_CHARS)
    prompt_override: Optional[Literal["caption", "genre"]] = Field(
        None, description="Train on the caption or the genre; unset: the dataset's genre_ratio decides.")
    lyrics: str = Field(INSTRUMENTAL_LYRICS, max_length=MAX_LYRICS_CHARS)
    bpm: Optional[int] = Field(None, ge=30, le=300)
    keyscale: str = Field("", max_length=64)
    timesignature: str = Field("", max_length=16)
    language: str = Field("unknown", max_length=32)
    is_instrumental: bool = Field(True, description="True: lyrics '[Instrumental]', language 'unknown'.")


class PreprocessBody(_Body):
    output_dir: Optional[str] = Field(None, description=IGNORED_PATH + "a dataset is prepared into its own folder; "
                                                        "train on it by its name (tensor_dir).")
    dataset_name: Optional[str] = Field(None, description=DATASET_NAME)
    skip_existing: bool = Field(False, description="Accepted; either way a prepared sample is kept while its song's "
                                                   "audio and text are unchanged (preparing it again would write the "
                                                   "same file) and prepared again once they changed.")


class AutoLabelBody(_Body):
    dataset_name: Optional[str] = Field(None, description=DATASET_NAME)
    skip_metas: bool = Field(False, description="Keep the songs' bpm, key and time signature as they are.")
    format_lyrics: bool = Field(False, description="LM-formatted user lyrics: not available here; true is refused.")
    transcribe_lyrics: bool = Field(False, description="The LM's lyrics replace a singing song's own.")
    only_unlabeled: bool = Field(False, description="Only the songs without a caption.")
    lm_model_path: Optional[str] = Field(None, description="A served LM's name (lm.model, lm.extra_models), never "
                                                           "a path; unset: lm.model.")
    save_path: Optional[str] = Field(None, description=IGNORED_PATH + "each song's labels are written into its "
                                                      "sidecar as soon as the LM has labeled it.")
    chunk_size: int = Field(16, ge=1, description="Accepted and ignored: the job encodes one song at a time.")
    batch_size: int = Field(1, ge=1, description="Accepted and ignored: the job encodes one song at a time.")


# -- the dataset on disk ---------------------------------------------------------------------------

def _duration(path: str) -> int:
    import soundfile

    try:
        return int(soundfile.info(path).duration)
    except Exception:  # a file libsndfile cannot read: preprocessing records its error
        return 0


def _sample(index: int, song, meta: DatasetMeta) -> Dict[str, Any]:
    """One song as upstream's ``AudioSample.to_dict`` shows it (its file name where upstream has a path)."""
    from pipelines.prepare_dataset import read_bytes

    values = _values(song)
    text = SongText.from_dict(values)
    instrumental = is_instrumental(values, meta.all_instrumental)
    raw = read_bytes(song.sidecars["lyrics"]).decode().strip() if "lyrics" in song.sidecars else ""
    name = Path(song.source).name
    return {"index": index, "id": song.id, "filename": name, "audio_path": name, "duration": _duration(song.source),
            "caption": text.caption, "genre": str(values.get("genre") or ""),
            "prompt_override": values.get("prompt_override"),
            "lyrics": INSTRUMENTAL_LYRICS if instrumental else text.lyrics or INSTRUMENTAL_LYRICS,
            "raw_lyrics": raw, "formatted_lyrics": "", "bpm": text.bpm, "keyscale": text.keyscale,
            "timesignature": text.timesignature, "language": text.language or "unknown",
            "is_instrumental": instrumental, "custom_tag": meta.custom_tag,
            "labeled": bool(values.get("labeled")) or is_labeled(values)}


def _values(song) -> Dict[str, Any]:
    """The song's sidecar fields; a broken sidecar reads as none (preprocessing records its error)."""
    from pipelines.prepare_dataset import sidecar_values

    try:
        return sidecar_values(song)
    except (OSError, ValueError):
        return {}


def _songs(root: Path, name: str) -> list:
    from pipelines.prepare_dataset import list_songs

    songs = dataset_dirs(root, name)["songs"]
    return list_songs(str(songs)) if songs.is_dir() else []


def _to_label(root: Path, name: str, only_unlabeled: bool) -> int:
    return sum(1 for song in _songs(root, name) if not (only_unlabeled and is_labeled(_values(song))))


def _samples(root: Path, name: str) -> List[Dict[str, Any]]:
    meta = read_meta(root, name)
    return [_sample(index, song, meta) for index, song in enumerate(_songs(root, name))]


def _update_sample(root: Path, name: str, index: int, body: SampleBody) -> Optional[Dict[str, Any]]:
    """Upstream's ``update_sample``: the song's sidecar holds the body's labels; None: no such song."""
    from pipelines.prepare_dataset import write_sidecar

    songs = _songs(root, name)
    if not 0 <= index < len(songs):
        return None
    song = songs[index]
    values = _values(song)  # a broken sidecar is replaced whole
    values.update(caption=body.caption, genre=body.genre, prompt_override=body.prompt_override,
                  lyrics=INSTRUMENTAL_LYRICS if body.is_instrumental else body.lyrics, bpm=body.bpm,
                  keyscale=body.keyscale, timesignature=body.timesignature,
                  language="unknown" if body.is_instrumental else body.language,
                  is_instrumental=body.is_instrumental, labeled=True)
    write_sidecar(song, values)
    return _sample(index, _songs(root, name)[index], read_meta(root, name))


def _has_songs(directory: Path) -> bool:
    """Whether ``_copy_songs`` would copy an audio file from ``directory``."""
    return any(path.is_file() and not path.is_symlink() and path.suffix.lower() in AUDIO_SUFFIXES
               for path in directory.iterdir())


def _copy_songs(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.is_symlink():
            shutil.copyfile(path, target / path.name)


def _save_as(root: Path, source: str, target: str, meta: DatasetMeta) -> None:
    """``target`` holds ``source``'s songs and labels (replacing its own) and ``meta``."""
    if target != source:
        songs = dataset_dirs(root, target)["songs"]
        shutil.rmtree(songs, ignore_errors=True)
        _copy_songs(dataset_dirs(root, source)["songs"], songs)
    write_meta(root, target, meta)


def _job_payload(record) -> Dict[str, Any]:
    """A dataset or label job's status as upstream's preprocess / auto-label status shows it (a finished
    job's counts come from its result: its last progress event is behind it)."""
    detail = (record.detail or {}).get("training") or {}
    result = record.result or {}
    status = {"done": "completed", "failed": "failed"}.get(record.phase, "running")
    payload = {"task_id": record.task_id, "status": status, "progress": result.get("message", record.message),
               "current": detail.get("current", 0), "total": result.get("total", detail.get("total", 0))}
    if (record.request or {}).get("kind") == "label":
        payload.update(save_path=record.request["job"]["dataset"],
                       last_updated_index=result.get("last_updated_index", detail.get("last_updated_index")),
                       last_updated_sample=result.get("last_updated_sample", detail.get("last_updated_sample")))
    if status == "completed":
        payload.update(current=result.get("num_tensors", payload["total"]), result=result)
    elif status == "failed":
        payload["error"] = record.error
    return payload


class DatasetRoutes(JobRoutes):
    """Route group inherited by ``serve.api.Ingress`` (uses its ``config``, ``state``, ``served``)."""

    async def _dataset(self, request: Request, given: Optional[str], field: str = "dataset_name") -> str:
        """The dataset a body names, else the key's latest; 400 when there is none."""
        if given:
            return name_of(field, given)
        name = await self._setting(f"dataset-latest:{self._key(request)}")
        if not name:
            raise FieldError(field, "no dataset yet: scan a directory, upload songs or load a dataset first", 400)
        return name

    async def _dataset_reply(self, name: str, message: str) -> Dict[str, Any]:
        samples = await asyncio.to_thread(_samples, self._root(), name)
        return compat.envelope({"message": message, "dataset_name": name, "num_samples": len(samples),
                                "labeled_count": sum(s["labeled"] for s in samples), "samples": samples})

    @api.post("/v1/dataset/scan", openapi_extra=json_body(ScanBody), responses=error_responses(400, 422))
    async def dataset_scan(self, request: Request):
        """A dataset from a server directory's audio files and sidecars (inside ingress.allowed_audio_dirs)."""
        body = await parse(request, ScanBody)
        name = name_of("dataset_name", body.dataset_name)
        directory = _allowed_dir(body.audio_dir, self.config.ingress.allowed_audio_dirs)
        if not await asyncio.to_thread(_has_songs, directory):  # refused before anything is written
            raise FieldError("audio_dir", f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in that directory", 400)
        root = self._root()
        await asyncio.to_thread(_copy_songs, directory, dataset_dirs(root, name)["songs"])
        meta = replace(await asyncio.to_thread(read_meta, root, name), custom_tag=body.custom_tag,
                       tag_position=body.tag_position, all_instrumental=body.all_instrumental)
        await asyncio.to_thread(write_meta, root, name, meta)
        await self._put(f"dataset-latest:{self._key(request)}", name)
        return await self._dataset_reply(name, f"scanned {body.audio_dir}")

    @api.post("/v1/dataset/upload", responses=error_responses(400, 413, 415, 422))
    async def dataset_upload(self, request: Request):
        """One song into a dataset: multipart ``file`` (audio, checked like every upload), ``dataset_name``,
        optional ``caption`` / ``lyrics`` (kept as the song's sidecar) and the dataset's ``custom_tag``,
        ``tag_position``, ``all_instrumental``, ``genre_ratio`` (sent: they change the dataset's)."""
        form, data = await _read_song_form(request, self.state.max_upload)
        name = name_of("dataset_name", str(form.get("dataset_name") or "my_lora_dataset"))
        root = self._root()
        meta = _form_meta(form, await asyncio.to_thread(read_meta, root, name))
        probe = await asyncio.to_thread(self.state.uploads.check, "file", data, self.state.max_upload)
        count = len(await asyncio.to_thread(_songs, root, name))
        if count >= self.config.training.max_songs:
            raise FieldError("file", f"a dataset holds at most {self.config.training.max_songs} songs "
                                     "(training.max_songs)", 422)
        stem = _song_stem(form.get("file"), count)
        await asyncio.to_thread(_write_song, dataset_dirs(root, name)["songs"], stem, data, probe.format, form)
        await asyncio.to_thread(write_meta, root, name, meta)
        await self._put(f"dataset-latest:{self._key(request)}", name)
        return await self._dataset_reply(name, f"uploaded {stem}")

    @api.get("/v1/dataset/samples")
    async def dataset_samples(self, request: Request):
        """The key's latest dataset: its songs and their labels."""
        name = await self._setting(f"dataset-latest:{self._key(request)}")
        if not name:
            return compat.envelope(None, 400, "No dataset loaded. Scan a directory or upload songs first.")
        return await self._dataset_reply(name, "ok")

    @api.get("/v1/dataset/sample/{sample_idx}", responses=error_responses(400, 404))
    async def dataset_sample(self, sample_idx: int, request: Request):
        """One song of the key's latest dataset, as upstream's sample."""
        name = await self._dataset(request, None)
        samples = await asyncio.to_thread(_samples, self._root(), name)
        if not 0 <= sample_idx < len(samples):
            raise _no_sample(sample_idx, len(samples))
        return compat.envelope(samples[sample_idx])

    @api.put("/v1/dataset/sample/{sample_idx}", openapi_extra=json_body(SampleBody),
             responses=error_responses(400, 404, 422))
    async def dataset_sample_update(self, sample_idx: int, request: Request):
        """A song's labels (written into its sidecar; the next preprocess prepares it again)."""
        body = await parse(request, SampleBody)
        if body.sample_idx is not None and body.sample_idx != sample_idx:
            raise FieldError("sample_idx", f"{body.sample_idx} is not the path's index {sample_idx}", 422)
        name = await self._dataset(request, None)
        sample = await asyncio.to_thread(_update_sample, self._root(), name, sample_idx, body)
        if sample is None:
            raise _no_sample(sample_idx, len(await asyncio.to_thread(_songs, self._root(), name)))
        return compat.envelope({"message": f"Updated: {sample['filename']}", "sample": sample})

    @api.post("/v1/dataset/load", openapi_extra=json_body(LoadBody), responses=error_responses(400, 422))
    async def dataset_load(self, request: Request):
        """Make a dataset (by name) the key's latest, and show it."""
        body = await parse(request, LoadBody)
        name = name_of("dataset_path", body.dataset_path, ".json")
        if not await asyncio.to_thread(_songs, self._root(), name):
            raise FieldError("dataset_path", f"no dataset named {name} (or it has no songs)", 400)
        await self._put(f"dataset-latest:{self._key(request)}", name)
        return await self._dataset_reply(name, f"Loaded dataset {name}")

    @api.post("/v1/dataset/save", openapi_extra=json_body(SaveBody), responses=error_responses(400, 422))
    async def dataset_save(self, request: Request):
        """The dataset's settings (the body's, where set) and its songs' labels under ``save_path``."""
        body = await parse(request, SaveBody)
        target = name_of("save_path", body.save_path, ".json")
        source = await self._dataset(request, body.dataset_name)
        root = self._root()
        if not await asyncio.to_thread(_songs, root, source):
            raise FieldError("dataset_name", f"dataset {source} has no songs to save", 400)
        changes = {k: v for k, v in body.model_dump(include={"custom_tag", "tag_position", "all_instrumental",
                                                             "genre_ratio"}).items() if v is not None}
        meta = replace(await asyncio.to_thread(read_meta, root, source), **changes)
        await asyncio.to_thread(_save_as, root, source, target, meta)
        await self._put(f"dataset-latest:{self._key(request)}", target)
        return compat.envelope({"message": f"Dataset saved as {target}", "save_path": target, "dataset_name": target,
                                **asdict(meta)})

    # -- jobs ------------------------------------------------------------------------------------

    async def _preprocess(self, request: Request) -> Dict[str, Any]:
        body = await parse(request, PreprocessBody)
        name = await self._dataset(request, body.dataset_name)
        total = len(await asyncio.to_thread(_songs, self._root(), name))
        if not total:
            raise FieldError("dataset_name", f"dataset {name} has no songs", 400)
        task_id = await self._submit_job(self._spec("dataset", name), self._key(request))
        await self._put(f"preprocess-latest:{self._key(request)}", task_id)
        return {"task_id": task_id, "message": "Preprocessing task started", "total": total, "output_dir": name}

    @api.post("/v1/dataset/preprocess_async", openapi_extra=json_body(PreprocessBody),
              responses=error_responses(400, 422, 429))
    async def dataset_preprocess_async(self, request: Request):
        """Prepare the dataset's songs into training samples (a Ray Data job); poll preprocess_status."""
        return compat.envelope(await self._preprocess(request))

    @api.post("/v1/dataset/preprocess", openapi_extra=json_body(PreprocessBody),
              responses=error_responses(400, 408, 422, 429))
    async def dataset_preprocess(self, request: Request):
        """The same job, awaited (training.sync_timeout_s): its result (message, output_dir, num_tensors)."""
        with self.state.admission.sync_slot():  # a waiting request holds a connection: bounded like songs'
            started = await self._preprocess(request)
            record = await self._await_job(started["task_id"], "/v1/dataset/preprocess_status")
        return compat.envelope({**record.result, "task_id": started["task_id"]})

    async def _job_status(self, task_id: Optional[str], kind: str, latest: bool = False):
        """A ``kind`` job's status; for an unknown id 404 (``latest``: upstream's idle status)."""
        record = await asyncio.to_thread(self.state.store.get, task_id) if task_id else None
        if record is None or (record.request or {}).get("kind") != kind:
            if latest:
                return compat.envelope({"task_id": None, "status": "idle", "progress": "", "current": 0, "total": 0})
            raise not_found("task id")
        payload = _job_payload(record)
        if kind == "label" and payload["status"] == "completed":  # upstream's result: the dataset as labeled
            samples = await asyncio.to_thread(_samples, self._root(), record.request["job"]["dataset"])
            payload["result"] = {**payload["result"], "labeled_count": sum(s["labeled"] for s in samples),
                                 "samples": samples}
        return compat.envelope(payload)

    @api.get("/v1/dataset/preprocess_status/{task_id}", responses=error_responses(404))
    async def preprocess_status(self, task_id: str):
        return await self._job_status(task_id, "dataset")

    @api.get("/v1/dataset/preprocess_status")
    async def preprocess_status_latest(self, request: Request):
        task_id = await self._setting(f"preprocess-latest:{self._key(request)}")
        return await self._job_status(task_id, "dataset", latest=True)

    async def _auto_label(self, request: Request) -> Dict[str, Any]:
        body = await parse(request, AutoLabelBody)
        if body.format_lyrics:
            raise FieldError("format_lyrics", "LM-formatted lyrics are not available here; leave it false "
                                              "(transcribe_lyrics takes the LM's lyrics)", 422)
        lm = self.served.lm_name(body.lm_model_path, field="lm_model_path")
        name = await self._dataset(request, body.dataset_name)
        total = await asyncio.to_thread(_to_label, self._root(), name, body.only_unlabeled)
        if not total:
            message = "All samples already labeled" if body.only_unlabeled else "No samples to label"
            return {"task_id": None, "message": message, "total": 0, "dataset_name": name}
        rules = body.model_dump(include={"only_unlabeled", "skip_metas", "transcribe_lyrics"})
        task_id = await self._submit_job(self._spec("label", name, lm=lm, label=rules), self._key(request))
        await self._put(f"label-latest:{self._key(request)}", task_id)
        return {"task_id": task_id, "message": "Auto-labeling task started", "total": total, "dataset_name": name}

    @api.post("/v1/dataset/auto_label_async", openapi_extra=json_body(AutoLabelBody),
              responses=error_responses(400, 422, 429))
    async def dataset_auto_label_async(self, request: Request):
        """The LM's labels for the dataset's songs (a job), written into their sidecars; poll
        auto_label_status."""
        return compat.envelope(await self._auto_label(request))

    @api.post("/v1/dataset/auto_label", openapi_extra=json_body(AutoLabelBody),
              responses=error_responses(400, 408, 422, 429))
    async def dataset_auto_label(self, request: Request):
        """The same job, awaited (training.sync_timeout_s): the message, labeled_count and samples."""
        with self.state.admission.sync_slot():
            started = await self._auto_label(request)
            message = started["message"]
            if started["task_id"]:
                record = await self._await_job(started["task_id"], "/v1/dataset/auto_label_status")
                message = record.result["message"]
        reply = (await self._dataset_reply(started["dataset_name"], message))["data"]
        return compat.envelope({k: reply[k] for k in ("message", "labeled_count", "samples")})

    @api.get("/v1/dataset/auto_label_status/{task_id}", responses=error_responses(404))
    async def auto_label_status(self, task_id: str):
        return await self._job_status(task_id, "label")

    @api.get("/v1/dataset/auto_label_status")
    async def auto_label_status_latest(self, request: Request):
        task_id = await self._setting(f"label-latest:{self._key(request)}")
        return await self._job_status(task_id, "label", latest=True)


def _no_sample(index: int, count: int) -> APIError:
    return APIError(404, f"Sample index {index} out of range (the dataset has {count} songs: 0 to {count - 1})",
                    loc=("path", "sample_idx"), code="not_found")


def _allowed_dir(value: str, allowed) -> Path:
    """The real path of an allow-listed directory (itself or inside one), else 400 naming ``audio_dir``."""
    real = os.path.realpath(value) if os.path.isabs(value) and "\x00" not in value else ""
    for directory in allowed or []:
        root = os.path.realpath(directory)
        if real and os.path.commonpath([root, real]) == root and os.path.isdir(real):
            return Path(real)
    raise FieldError("audio_dir", "not a directory inside the server's allowed audio directories "
                                  "(ingress.allowed_audio_dirs); upload songs with /v1/dataset/upload instead", 400)


def _form_meta(form, meta: DatasetMeta) -> DatasetMeta:
    """The dataset's settings with those an upload's form sends (each checked, 422 naming it)."""
    changes: Dict[str, Any] = {}
    if form.get("custom_tag") is not None:
        changes["custom_tag"] = str(form.get("custom_tag")).strip()
    if form.get("tag_position") is not None:
        position = str(form.get("tag_position")).strip()
        if position not in TAG_POSITIONS:
            raise FieldError("tag_position", f"one of {', '.join(TAG_POSITIONS)}", 422)
        changes["tag_position"] = position
    if form.get("all_instrumental") is not None:
        flag = str(form.get("all_instrumental")).strip().lower()
        if flag not in ("true", "false", "1", "0"):
            raise FieldError("all_instrumental", "true or false", 422)
        changes["all_instrumental"] = flag in ("true", "1")
    if form.get("genre_ratio") is not None:
        ratio = str(form.get("genre_ratio")).strip()
        if not ratio.isdigit() or int(ratio) > 100:
            raise FieldError("genre_ratio", "an integer from 0 to 100", 422)
        changes["genre_ratio"] = int(ratio)
    return replace(meta, **changes)


async def _read_song_form(request: Request, max_upload: int):
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise APIError(415, "content type must be multipart/form-data", loc=("header", "content-type"),
                       code="unsupported_media_type")
    try:
        form = await request.form(max_part_size=max_upload + 1)
    except Exception:  # malformed multipart: starlette raises several types
        raise FieldError("body", "malformed multipart body", 400) from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise FieldError("file", "a song file is required (multipart field 'file')", 422)
    for text, limit in (("caption", MAX_CAPTION_CHARS), ("lyrics", MAX_LYRICS_CHARS), ("dataset_name", 64),
                        ("custom_tag", 256)):
        if len(str(form.get(text) or "")) > limit:
            raise FieldError(text, f"at most {limit} characters", 422)
    return form, await upload.read(max_upload + 1)


def _song_stem(upload, index: int) -> str:
    stem = Path(getattr(upload, "filename", "") or "").stem
    stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in stem)[:60].strip("_")
    return f"{index:04d}-{stem or 'song'}"


def _write_song(songs: Path, stem: str, data: bytes, kind: str, form) -> None:
    songs.mkdir(parents=True, exist_ok=True)
    (songs / f"{stem}{SNIFFED_SUFFIX.get(kind, '.' + kind)}").write_bytes(data)
    text = {name: str(form.get(name)) for name in ("caption", "lyrics") if form.get(name)}
    if text:
        (songs / f"{stem}.json").write_text(json.dumps(text, ensure_ascii=False))
