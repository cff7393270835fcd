"""Encoded audio kept out of actor memory: a flat key → bytes store on any fsspec filesystem.

Finished renders are written once under a validated key (a local directory, ``file://``, ``memory://``,
``s3://bucket/prefix``, ``gs://...``) and served from there with HTTP range support, so neither the
task store nor the ingress has to hold whole files in memory. Old files are purged by age and by a
total size budget.

``AudioStore`` pickles to its URL and settings only; the filesystem is opened lazily in each process,
so one instance can be handed to Ray actors. ``options`` are the filesystem's fsspec storage options
(an S3-compatible server's ``endpoint_url``, say).
"""

from __future__ import annotations

import io
import os
import re
import time
import uuid
import zipfile
from datetime import datetime
from typing import Any, Dict, Iterator, List, Optional, Tuple

import fsspec
from fsspec.implementations.local import LocalFileSystem
from starlette.concurrency import iterate_in_threadpool
from starlette.responses import Response, StreamingResponse

from serve.edge.errors import APIError

CHUNK_SIZE = 256 * 1024
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# Temp files start with a dot, so they can never be mistaken for a key.
_TEMP = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9._-]{0,199}\.[0-9a-f]{32}\.tmp")
# Keys end in the output format's name (``acestep.audio.ENCODINGS``): wav32 is a float WAV, opus an
# Ogg Opus file (RFC 7845 registers audio/ogg for it), aac an ADTS stream.
_MEDIA_TYPES = {
    "flac": "audio/flac",
    "wav": "audio/wav",
    "wav32": "audio/wav",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
}
# Listing fields that carry a modification time, by backend (local, s3, gcs, others, memory).
_MTIME_FIELDS = ("mtime", "LastModified", "updated", "last_modified", "created")


def valid_key(key: Any) -> bool:
    """Whether ``key`` names a file directly inside the store (no separators, no ``..``)."""
    return isinstance(key, str) and _KEY.fullmatch(key) is not None and ".." not in key


class AudioStore:
    """Flat file store at ``url``; ``ttl_s`` and ``max_bytes`` bound what ``purge`` keeps.

    ``ttl_s=None`` disables expiry by age, ``max_bytes=None`` the size budget; ``options``: fsspec
    storage options for the URL's filesystem.
    """

    def __init__(self, url: str, *, ttl_s: Optional[float] = 86400.0, max_bytes: Optional[int] = None,
                 options: Optional[Dict[str, Any]] = None):
        if ttl_s is not None and ttl_s < 0:
            raise ValueError("ttl_s must be >= 0")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.url, self.ttl_s, self.max_bytes = str(url), ttl_s, max_bytes
        self.options = dict(options or {})
        self._fs: Optional[fsspec.AbstractFileSystem] = None
        self._root = ""

    # Pickle the settings only: open filesystems hold sockets, locks and caches.
    def __getstate__(self) -> Dict[str, Any]:
        return {"url": self.url, "ttl_s": self.ttl_s, "max_bytes": self.max_bytes, "options": self.options}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.url, self.ttl_s, self.max_bytes = state["url"], state["ttl_s"], state["max_bytes"]
        self.options = dict(state.get("options") or {})
        self._fs, self._root = None, ""

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, opened on first use (a local directory is created then)."""
        if self._fs is None:
            fs, root = fsspec.core.url_to_fs(self.url, **self.options)
            root = root.rstrip("/") or "/"
            if isinstance(fs, LocalFileSystem):
                fs.makedirs(root, exist_ok=True)
            self._root, self._fs = root, fs
        return self._fs

    @property
    def root(self) -> str:
        """The store's directory or prefix inside its filesystem."""
        if self._fs is None:
            _ = self.fs
        return self._root

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def _path(self, key: str) -> Optional[str]:
        if not valid_key(key):
            return None
        return f"{self.root.rstrip('/')}/{key}"

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (replacing it); readers see the old or the new file, never half."""
        path = self._path(key)
        if path is None:
            raise ValueError("invalid audio key: 1-200 characters of A-Z a-z 0-9 . _ -, starting "
                             "with a letter or digit, without '..'")
        if self.is_local:
            self._put_local(key, path, bytes(data))
        else:
            # Object stores and the memory filesystem publish an object only once it is complete.
            self.fs.pipe_file(path, bytes(data))

    def _put_local(self, key: str, path: str, data: bytes) -> None:
        temp = f"{self.root.rstrip('/')}/.{key}.{uuid.uuid4().hex}.tmp"
        try:
            with self.fs.open(temp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            # A rename within one directory is atomic; fsspec's mv does not promise that.
            os.replace(temp, path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise

    def size(self, key: str) -> Optional[int]:
        """The file's size in bytes, or None when there is no such key."""
        path = self._path(key)
        if path is None:
            return None
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return int(info.get("size") or 0)

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def read(self, key: str, start: int = 0, end: Optional[int] = None) -> Optional[bytes]:
        """Bytes ``[start, end)`` of the file (``end=None``: to its end), or None when not found."""
        path = self._path(key)
        if path is None:
            return None
        try:
            return self.fs.cat_file(path, start=start, end=end)
        except FileNotFoundError:
            return None

    def iter_range(self, key: str, start: int = 0, end: Optional[int] = None,
                   chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Bytes ``[start, end)`` in chunks of at most ``chunk_size``, read as they are consumed.

        The file is opened on the first ``next()``; an unknown key raises FileNotFoundError then.
        """
        if start < 0 or chunk_size <= 0:
            raise ValueError("start must be >= 0 and chunk_size > 0")
        return self._chunks(key, start, end, chunk_size)

    def _chunks(self, key: str, start: int, end: Optional[int], chunk_size: int) -> Iterator[bytes]:
        path = self._path(key)
        if path is None:
            raise FileNotFoundError("unknown audio key")
        remaining = None if end is None else max(0, end - start)
        # One open handle for the whole range: on POSIX a purge meanwhile does not cut the stream.
        with self.fs.open(path, "rb") as file:
            file.seek(start)
            while remaining is None or remaining > 0:
                chunk = file.read(chunk_size if remaining is None else min(chunk_size, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def delete(self, key: str) -> bool:
        """Remove ``key``; False when it was not there (or is not a valid key)."""
        path = self._path(key)
        return path is not None and self._remove(path)

    def _remove(self, path: str) -> bool:
        if not self.is_local:
            # object stores delete a missing key without an error: ask first (fresh, not a cached listing)
            self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                return False
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        return True

    def media_type(self, key: str) -> str:
        """The Content-Type for ``key``, from its extension."""
        extension = key.rsplit(".", 1)[-1].lower() if "." in key else ""
        return _MEDIA_TYPES.get(extension, "application/octet-stream")

    def purge(self, now: Optional[float] = None) -> int:
        """Delete files older than ``ttl_s``, then the oldest beyond ``max_bytes``; returns how many.

        Only keys and this store's temp files are touched, so a shared prefix keeps foreign files.
        Temp files count for age only (a fresh one is a write in progress). Files that vanish
        meanwhile (another purger, a delete) are skipped.
        """
        now = time.time() if now is None else now
        deleted, kept = 0, []
        for name, base, size, mtime in self._listing(now):
            if self.ttl_s is not None and now - mtime > self.ttl_s:
                deleted += self._remove(name)
            elif valid_key(base):
                kept.append((mtime, size, name))
        if self.max_bytes is None:
            return deleted
        total = sum(size for _, size, _ in kept)
        for _, size, name in sorted(kept):
            if total <= self.max_bytes:
                break
            deleted += self._remove(name)
            total -= size
        return deleted

    def _listing(self, now: float) -> List[Tuple[str, str, int, float]]:
        """(path, base name, size, mtime) of this store's own files; unknown mtimes read as ``now``."""
        fs = self.fs
        fs.invalidate_cache(self.root)
        try:
            entries = fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        listing = []
        for entry in entries:
            name = entry.get("name", "")
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") != "file" or not (valid_key(base) or _TEMP.fullmatch(base)):
                continue
            mtime = self._mtime(name, entry)
            listing.append((name, base, int(entry.get("size") or 0), now if mtime is None else mtime))
        return listing

    def _mtime(self, name: str, entry: Dict[str, Any]) -> Optional[float]:
        for field in _MTIME_FIELDS:
            stamp = _timestamp(entry.get(field))
            if stamp is not None:
                return stamp
        try:
            return _timestamp(self.fs.modified(name))
        except (NotImplementedError, OSError, AttributeError):
            return None


def _timestamp(value: Any) -> Optional[float]:
    """Seconds since the epoch from a float, a datetime or an ISO 8601 string."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, datetime):
        return value.timestamp()
    return None


class _Unsatisfiable(Exception):
    pass


_RANGE = re.compile(r"bytes\s*=\s*(\d*)\s*-\s*(\d*)", re.IGNORECASE)


def _position(digits: str) -> int:
    # Absurdly long numbers are simply past any file (and int() refuses very long strings).
    return int(digits) if len(digits) <= 30 else 10 ** 30


def parse_range(header: Optional[str], total: int) -> Optional[Tuple[int, int]]:
    """``[start, end)`` for one ``bytes=`` range of a ``total``-byte file, or None to send it whole.

    Malformed, multi-range and reversed specs are ignored (RFC 9110 lets a server answer 200);
    an empty file is always sent whole. Raises ``_Unsatisfiable`` for a start past the end or an
    empty suffix.
    """
    if not header or total <= 0:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = _position(last)
        if suffix == 0:
            raise _Unsatisfiable()
        return max(0, total - suffix), total
    start = _position(first)
    if last and _position(last) < start:
        return None
    if start >= total:
        raise _Unsatisfiable()
    return start, total if not last else min(_position(last) + 1, total)


def _disposition(filename: str) -> str:
    # Header-safe: anything outside a plain file name alphabet becomes "_".
    safe = re.sub(r"[^A-Za-z0-9._ -]", "_", filename)[:200] or "audio"
    return f'inline; filename="{safe}"'


def audio_response(store: AudioStore, key: str, range_header: Optional[str], *,
                   filename: Optional[str] = None) -> Response:
    """The file under ``key`` as a 200 (whole) or 206 (one byte range) streaming response.

    Raises ``APIError`` 404 for an unknown key and 416 for an unsatisfiable range. The body is read
    from the store chunk by chunk in a worker thread; the size lookup here is one blocking call, so
    call this from a sync route or a thread.
    """
    total = store.size(key)
    if total is None:
        raise APIError(404, "unknown audio key", loc=("path", "key"), code="not_found")
    try:
        span = parse_range(range_header, total)
    except _Unsatisfiable:
        raise APIError(416, f"range not satisfiable: the file has {total} bytes", loc=("header", "range"),
                       code="range_not_satisfiable",
                       headers={"Content-Range": f"bytes */{total}", "Accept-Ranges": "bytes"}) from None
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": _disposition(filename or key)}
    status, (start, end) = (200, (0, total)) if span is None else (206, span)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
    headers["Content-Length"] = str(end - start)
    body = iterate_in_threadpool(store.iter_range(key, start, end))
    return StreamingResponse(body, status_code=status, headers=headers, media_type=store.media_type(key))


def archive_name(index: int, item: Dict[str, Any]) -> str:
    """A task's file in its zip: '<NN>-<track>.<format>' (stems), else '<NN>-<key>' (songs)."""
    track = item.get("track") or (item.get("params") or {}).get("track")
    return f"{index + 1:02d}-{track}.{item['format']}" if track else f"{index + 1:02d}-{item['key']}"


def archive(store: AudioStore, items: List[Dict[str, Any]]) -> bytes:
    """The files of ``items`` (a result's audios, in order) as one zip; stored, not deflated: the
    audio formats compress themselves, and WAV barely deflates. 404 when one is no longer stored."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as bundle:
        for index, item in enumerate(items):
            data = store.read(item["key"])
            if data is None:
                raise APIError(404, f"audio {item['key']} is no longer stored", loc=("path", "task_id"),
                               code="not_found")
            bundle.writestr(archive_name(index, item), data)
    return buffer.getvalue()
