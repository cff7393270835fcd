"""Presigned uploads: a task's ``upload_url`` receives each encoded file straight from the DiT replica.

A client presigns an HTTP PUT URL on its own bucket (S3, GCS, Azure Blob) and names it in the task:
one URL when the task makes one audio, else a list with one URL per audio, in the order of the
result's ``audios``. Right after a file is written to the audio store, the replica PUTs the same
bytes there (the stored file stays: ``GET /v1/audio/{key}`` keeps working) and the audio item records
the outcome in ``upload``: where it went, or why not. A failed PUT never fails the task.

A presigned URL's query is its credential: records and logs show a URL without its query
(``shown``), error texts never quote a URL. The address rules are the webhooks'
(``serve.webhooks.check_url``), checked at submission and before every attempt, and each attempt
connects to the address just checked (``pinned``); redirects are not followed, proxies from the
environment are ignored. Transient failures (no answer, 408, 425, 429, 5xx) are tried again with
backoff (``serve.config.UploadURLSettings``); within one task, files go up in parallel, no attempt
starts after the task's upload deadline and each attempt's timeout is cut to what is left of it.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, urlsplit

from serve.edge.errors import FieldError
from serve.logs import extra, log
from serve.webhooks import Resolver, WebhookRefused, check_url, pinned, resolve

UPLOAD_FIELD = "upload_url"
MAX_URLS = 128  # above the most audios one task makes (8 songs x 13 tracks)
PARALLEL = 8  # one task's files in flight at once
RETRIED = frozenset({408, 425, 429})  # and every 5xx
_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")  # S3, GCS XML and Azure error bodies


def shown(url: str) -> str:
    """``url`` as records and logs may show it: scheme, host, port and path; no query, fragment or
    user info (a presigned query is a credential)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        netloc = host if parts.port is None else f"{host}:{parts.port}"
    except ValueError:
        return "(not a valid URL)"
    return f"{parts.scheme}://{netloc}{parts.path}"


def audio_count(params, seeds: Sequence[int], extras: Dict[str, Any]) -> int:
    """How many audios the task makes: one per song (seed) and track; none for an analysis task."""
    from acestep.stems import track_names

    if extras.get("analysis"):
        return 0
    return len(seeds) * (len(track_names(params.tracks)) if params.tracks else 1)


def targets(value: Any, count: int) -> List[str]:
    """The request's ``upload_url`` (one URL, or a list) as one URL per audio; FieldError (422) naming
    ``upload_url`` and how many URLs the task needs when the shape does not fit the task."""
    urls = [value] if isinstance(value, str) else list(value)
    if len(urls) == count and (count == 1 or not isinstance(value, str)):
        return urls
    if count == 0:
        need = "this task makes no audio, so upload_url does not apply"
    elif count == 1:
        need = "this task makes 1 audio: send one URL (or a list of one)"
    else:
        need = f"this task makes {count} audios: send a list of exactly {count} URLs, one per audio in order"
    got = "one URL" if isinstance(value, str) else f"{len(urls)} URLs"
    raise FieldError(UPLOAD_FIELD, f"upload_url has {got}; {need}")


async def check_targets(urls: Sequence[str], allow_private: bool, resolver: Resolver = resolve) -> None:
    """FieldError (422) naming ``upload_url`` (and the list position) when a URL breaks the address rules."""
    for index, url in enumerate(urls):
        try:
            await asyncio.to_thread(check_url, url, allow_private, resolver, UPLOAD_FIELD)
        except WebhookRefused as refused:
            where = f" (entry {index})" if len(urls) > 1 else ""
            raise FieldError(UPLOAD_FIELD, f"{refused}{where}") from None


def request_headers(url: str, media_type: str) -> Dict[str, str]:
    """Headers a presigned PUT needs beyond Host. Content-Type only when the URL signed it (SigV4 and
    GCS V4 list it in their signed headers; an older signature that did not sign it would refuse
    any); Azure's Put Blob needs its blob type."""
    query = {name.lower(): values for name, values in parse_qs(urlsplit(url).query).items()}
    signed = ";".join(query.get("x-amz-signedheaders", []) + query.get("x-goog-signedheaders", [])).lower()
    headers = {"Content-Type": media_type} if "content-type" in signed.split(";") else {}
    if "sig" in query and "sv" in query:  # an Azure shared access signature
        headers["x-ms-blob-type"] = "BlockBlob"
    return headers


class Uploader:
    """PUTs a task's files to its upload URLs (``settings``: ``serve.config.UploadURLSettings``);
    ``clock`` and ``sleep`` measure and wait out the deadline and the backoff."""

    def __init__(self, settings, allow_private: bool, resolver: Resolver = resolve,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.settings, self.allow_private, self.resolver = settings, allow_private, resolver
        self.clock, self.sleep = clock, sleep

    def send_all(self, files: Sequence[Tuple[str, bytes, str]], task_id: str = "") -> List[Dict[str, Any]]:
        """Each (url, data, media type) PUT, in parallel; one outcome per file, in order."""
        if not files:
            return []
        deadline = self.clock() + self.settings.deadline_s
        with ThreadPoolExecutor(max_workers=min(PARALLEL, len(files)), thread_name_prefix="upload-url") as pool:
            outcomes = list(pool.map(lambda file: self.send(*file, deadline=deadline), files))
        for outcome in outcomes:
            if not outcome["ok"]:
                log.warning("upload to %s failed: %s", outcome["url"], outcome["error"],
                            extra=extra(task_id=task_id, status=outcome["status"], attempts=outcome["attempts"]))
        return outcomes

    def send(self, url: str, data: bytes, media_type: str, deadline: float) -> Dict[str, Any]:
        """One file: attempts until it arrives, a failure that is not transient, the attempts run
        out or the deadline passes → ``{url (shown), ok, status, error, attempts}``."""
        import httpx

        outcome: Dict[str, Any] = {"url": shown(url), "ok": False, "status": None,
                                   "error": "not sent: the task's upload deadline had passed", "attempts": 0}
        with httpx.Client(follow_redirects=False, trust_env=False) as client:
            for attempt in range(self.settings.attempts):
                if attempt:
                    self.sleep(max(0.0, min(self.settings.backoff_s * 2 ** (attempt - 1), deadline - self.clock())))
                left = deadline - self.clock()
                if left <= 0:
                    break
                outcome["attempts"] = attempt + 1
                status, error, transient = self._put(client, url, data, media_type, min(self.settings.timeout_s, left))
                outcome.update(status=status, error=error, ok=error is None)
                if error is None or not transient:
                    break
        return outcome

    def _put(self, client, url: str, data: bytes, media_type: str, timeout_s: float
             ) -> Tuple[Optional[int], Optional[str], bool]:
        """(HTTP status or None, error or None, whether trying again may help)."""
        import httpx

        try:
            addresses = check_url(url, self.allow_private, self.resolver, UPLOAD_FIELD)
        except WebhookRefused as refused:
            return None, f"refused: {refused}", False
        target, host, extensions = pinned(url, addresses[0])
        headers = {**host, **request_headers(url, media_type)}
        try:
            response = client.put(target, content=data, headers=headers, extensions=extensions, timeout=timeout_s)
        except httpx.TimeoutException:
            return None, f"timed out after {timeout_s:.3g} s", True
        except httpx.HTTPError as error:
            return None, f"request failed: {type(error).__name__}", True
        status = response.status_code
        if 200 <= status < 300:
            return status, None, False
        code = _ERROR_CODE.search(response.content[:4096])
        detail = f" {code.group(1).decode()}" if code else ""
        return status, f"HTTP {status}{detail}", status in RETRIED or status >= 500
