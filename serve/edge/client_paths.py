"""Audio a client names by path on the server (upstream's ``*_audio_path`` fields).

By default the server opens no path a client names. A deployment whose clients share a disk with
it may list directories in ``ingress.allowed_audio_dirs``: an absolute path whose real path (links
resolved) lies inside one of them, naming a regular file no larger than the upload limit, is read
and then checked and decoded exactly like an upload. URLs of any scheme (``file://`` included) are
never fetched. Files this server returned itself are handled before this, by their store key.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Optional, Sequence

from serve.edge.errors import FieldError


@dataclass(frozen=True)
class LocalAudio:
    """An allow-listed file to read (its real path); read later, off the event loop."""

    path: str


def allowed_path(value: str, allowed_dirs: Sequence[str]) -> Optional[str]:
    """The real path of ``value`` when it is inside one of ``allowed_dirs``; None otherwise."""
    if not allowed_dirs or "\x00" in value or "://" in value or not os.path.isabs(value):
        return None
    real = os.path.realpath(value)
    for directory in allowed_dirs:
        root = os.path.realpath(directory)
        if os.path.commonpath([root, real]) == root and real != root:
            return real
    return None


def read_allowed(field: str, path: str, max_bytes: int) -> bytes:
    """The file's bytes: a regular file (no link swapped in since, no FIFO or device) of at most
    ``max_bytes``; 400/413 naming ``field`` otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise FieldError(field, "no readable file at that path in the allowed directories", 400) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise FieldError(field, "not a regular file", 400)
        if info.st_size > max_bytes:
            raise FieldError(field, f"file larger than {max_bytes} bytes", 413, code="too_large")
        return handle.read(max_bytes + 1)
