"""Checks for client audio uploads that hold up against hostile bytes.

An upload passes three gates, cheapest first:

1. size and format: at most ``max_bytes``, not empty, and magic bytes of WAV, FLAC, MP3 or OGG
   (``sniff``);
2. headers, parsed in-process with ``struct`` before anything is decoded (``probe_header``): WAV
   chunks and FLAC STREAMINFO must declare 1-2 channels, 8-192 kHz, at least one frame and at most
   ``max_duration_s``, and a WAV may not declare more data than it holds; MP3 must start with a
   chain of well-formed frames;
3. a full decode in a long-lived worker process under an address-space and CPU limit and a wall
   clock timeout (``UploadChecker``). The worker counts frames and looks for NaN/inf; it returns no
   samples. A worker that crashes, runs out of memory or overruns is killed and replaced.

Every refusal is a ``serve.edge.errors.FieldError``: 413 ``too_large`` for size, otherwise 422
``invalid_audio``. Messages say what is allowed and never repeat the uploaded bytes. Nothing here
takes a client file name.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import struct
import threading
from dataclasses import dataclass
from typing import Optional

from serve.edge.errors import FieldError

FORMATS = ("wav", "flac", "mp3", "ogg")
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000
MIN_CHANNELS, MAX_CHANNELS = 1, 2
WAV_TRUNCATION_TOLERANCE = 4096  # bytes a WAV's data chunk may declare beyond what it holds
MAX_WAV_CHUNKS = 256  # chunks walked before the data chunk; real files have a handful
DECODE_BLOCK_FRAMES = 65_536
WORKER_START_TIMEOUT_S = 60.0

_UNDECODABLE = "audio could not be decoded; accepted formats are WAV, FLAC, MP3 and OGG"
_UNKNOWN_FORMAT = "not a recognised audio file; accepted formats are WAV, FLAC, MP3 and OGG"


class InvalidAudio(ValueError):
    """An upload is not acceptable audio; the message names what is allowed."""


@dataclass(frozen=True)
class AudioProbe:
    """What an upload holds: format (one of FORMATS), sample rate, channels, frames, seconds."""

    format: str
    sample_rate: int
    channels: int
    frames: int
    duration_s: float


def range_problem(sample_rate: int, channels: int, frames: Optional[int], max_duration_s: float) -> Optional[str]:
    """Why these stream properties are refused, or None. ``frames=None`` skips the length rules."""
    if not MIN_CHANNELS <= channels <= MAX_CHANNELS:
        return f"audio must have {MIN_CHANNELS} or {MAX_CHANNELS} channels"
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        return f"sample rate must be {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz"
    if frames is None:
        return None
    if frames <= 0:
        return "audio holds no samples"
    if frames / sample_rate > max_duration_s:
        return f"audio must be at most {max_duration_s:g} seconds long"
    return None


def _check_ranges(probe: AudioProbe, max_duration_s: float) -> None:
    problem = range_problem(probe.sample_rate, probe.channels, probe.frames, max_duration_s)
    if problem:
        raise InvalidAudio(problem)


# --- magic bytes -------------------------------------------------------------------------------

_MPEG_VERSIONS = {0: 2.5, 2: 2, 3: 1}  # version bits → MPEG version; 1 is reserved
_MPEG_RATES = {1: (44100, 48000, 32000), 2: (22050, 24000, 16000), 2.5: (11025, 12000, 8000)}
_LAYER3_KBPS = {
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}


@dataclass(frozen=True)
class _MpegFrame:
    version: float
    sample_rate: int
    channels: int
    length: int  # bytes, header included


def _mpeg_frame(data: bytes, pos: int) -> Optional[_MpegFrame]:
    """The MPEG layer III frame whose header starts at ``pos``, or None if it is not one."""
    if pos < 0 or pos + 4 > len(data):
        return None
    b0, b1, b2, b3 = data[pos: pos + 4]
    if b0 != 0xFF or b1 & 0xE0 != 0xE0 or (b1 >> 1) & 3 != 1:  # frame sync, layer III
        return None
    version = _MPEG_VERSIONS.get((b1 >> 3) & 3)
    bitrate_index, rate_index = b2 >> 4, (b2 >> 2) & 3
    # free-format (0) and reserved (15) bitrates, reserved rate and emphasis are refused
    if version is None or not 1 <= bitrate_index <= 14 or rate_index == 3 or b3 & 3 == 2:
        return None
    rate = _MPEG_RATES[version][rate_index]
    kbps = _LAYER3_KBPS[1 if version == 1 else 2][bitrate_index]
    samples_per_byte = 144 if version == 1 else 72
    length = samples_per_byte * kbps * 1000 // rate + ((b2 >> 1) & 1)
    return _MpegFrame(version, rate, 1 if b3 >> 6 == 3 else 2, length)


def _id3_end(data: bytes) -> Optional[int]:
    """Offset just past a leading ID3v2 tag (and its NUL padding), or None if there is none."""
    if len(data) < 10 or data[:3] != b"ID3" or data[3] == 0xFF or data[4] == 0xFF:
        return None
    size_bytes = data[6:10]
    if any(b & 0x80 for b in size_bytes):  # sizes are "syncsafe": 7 bits per byte
        return None
    size = 0
    for b in size_bytes:
        size = (size << 7) | b
    end = 10 + size + (10 if data[5] & 0x10 else 0)  # flag 0x10: a footer follows
    while end < len(data) and data[end] == 0:
        end += 1
    return end if end < len(data) else None


def sniff(data: bytes) -> Optional[str]:
    """The upload's format from its magic bytes alone: "wav", "flac", "mp3", "ogg", or None."""
    head = bytes(data[:12])
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    start = _id3_end(data) if head[:3] == b"ID3" else 0
    if start is None:
        return None
    if start and data[start: start + 4] == b"fLaC":
        return "flac"
    return "mp3" if _mpeg_frame(data, start) else None


# --- headers -----------------------------------------------------------------------------------

_WAV_BITS = {1: (8, 16, 24, 32), 3: (32, 64), 6: (8,), 7: (8,)}  # PCM, float, A-law, mu-law


def _wav_format(data: bytes, body: int, size: int):
    """(channels, sample rate, block align) of a ``fmt `` chunk."""
    if size < 16 or body + 16 > len(data):
        raise InvalidAudio("WAV format chunk is malformed")
    tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", data, body)
    if tag == 0xFFFE and size >= 40 and body + 26 <= len(data):  # WAVE_FORMAT_EXTENSIBLE
        tag = struct.unpack_from("<H", data, body + 24)[0]
    problem = range_problem(rate, channels, None, math.inf)
    if problem:
        raise InvalidAudio(problem)
    if bits not in _WAV_BITS.get(tag, ()):
        raise InvalidAudio("WAV audio must be 8-32 bit PCM, 32/64 bit float, A-law or mu-law")
    if align != channels * bits // 8:
        raise InvalidAudio("WAV format chunk is malformed")
    return channels, rate, align


def _wav_header(data: bytes) -> AudioProbe:
    """Walk the RIFF chunks up to ``data``; its declared size must be present (within a tolerance)."""
    rf64 = data[:4] == b"RF64"
    fmt, rf64_size, pos = None, None, 12
    for _ in range(MAX_WAV_CHUNKS):
        if pos + 8 > len(data):
            break
        chunk, size = struct.unpack_from("<4sI", data, pos)
        body = pos + 8
        if chunk == b"data":
            if rf64 and size == 0xFFFFFFFF:
                if rf64_size is None:
                    raise InvalidAudio("RF64 file lacks its ds64 chunk")
                size = rf64_size
            return _wav_probe(fmt, size, len(data) - body)
        if body + size > len(data):
            raise InvalidAudio("WAV file is truncated")
        if chunk == b"fmt ":
            fmt = _wav_format(data, body, size)
        elif chunk == b"ds64" and rf64 and size >= 16:
            rf64_size = struct.unpack_from("<Q", data, body + 8)[0]
        pos = body + size + (size & 1)  # chunks are padded to even sizes
    raise InvalidAudio("WAV file has no data chunk")


def _wav_probe(fmt, declared: int, present: int) -> AudioProbe:
    if fmt is None:
        raise InvalidAudio("WAV file has no format chunk before its data")
    if declared > present + WAV_TRUNCATION_TOLERANCE:
        raise InvalidAudio("WAV file is truncated: it holds less audio data than its header declares")
    channels, rate, align = fmt
    frames = min(declared, present) // align
    return AudioProbe("wav", rate, channels, frames, frames / rate)


def _flac_header(data: bytes, start: int) -> AudioProbe:
    """STREAMINFO, the first metadata block: rate (20 bits), channels-1 (3), bits-1 (5), samples (36)."""
    pos = start + 4
    if len(data) < pos + 4 + 34:
        raise InvalidAudio("FLAC file is truncated")
    block_type, length = data[pos] & 0x7F, int.from_bytes(data[pos + 1: pos + 4], "big")
    if block_type != 0 or length < 34:
        raise InvalidAudio("FLAC file lacks its STREAMINFO block")
    packed = int.from_bytes(data[pos + 4 + 10: pos + 4 + 18], "big")
    rate, channels = packed >> 44, ((packed >> 41) & 0x7) + 1
    frames = packed & ((1 << 36) - 1)  # 0 means "unknown", which is refused as no samples
    return AudioProbe("flac", rate, channels, frames, frames / rate if rate else 0.0)


def _mp3_chain(data: bytes, start: int, frames: int = 3) -> None:
    """The first ``frames`` MPEG frames must follow one another with consistent headers: a lone
    frame sync in front of anything else is refused."""
    first, pos = _mpeg_frame(data, start), start
    for _ in range(frames):
        if pos >= len(data) or data[pos: pos + 3] == b"TAG":  # end, or a trailing ID3v1 tag
            return
        frame = _mpeg_frame(data, pos)
        if frame is None or first is None or (frame.version, frame.sample_rate) != (first.version, first.sample_rate):
            raise InvalidAudio("MP3 frames are malformed")
        pos += frame.length


def probe_header(data: bytes) -> Optional[AudioProbe]:
    """WAV / FLAC stream properties from their headers (InvalidAudio when malformed or truncated),
    None for MP3 and OGG, whose lengths only a decode can tell. MP3 frame structure is checked."""
    data = bytes(data)
    kind = sniff(data)
    if kind is None:
        raise InvalidAudio(_UNKNOWN_FORMAT)
    if kind == "wav":
        return _wav_header(data)
    start = _id3_end(data) if data[:3] == b"ID3" else 0
    if kind == "flac":
        return _flac_header(data, start or 0)
    if kind == "mp3":
        _mp3_chain(data, start or 0)
    return None


# --- decode worker -----------------------------------------------------------------------------


def _address_space() -> int:
    """This process's current virtual memory size in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _set_limit(kind: int, soft: int) -> None:
    import resource

    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(kind, (soft, hard))


def _worker_setup(memory_bytes: int) -> None:
    """Quiet, single-threaded decoding libraries, then the memory cap on top of their footprint."""
    import resource

    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    import importlib

    for module in ("numpy", "soundfile"):  # loaded before the cap, so that only decoding counts against it
        importlib.import_module(module)

    # decoders print resync notes for hostile streams; they would only flood the server log
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _set_limit(resource.RLIMIT_AS, _address_space() + memory_bytes)


def _cpu_budget(cpu_s: int) -> None:
    """RLIMIT_CPU counts the process's whole life, so each request moves the soft limit on."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    _set_limit(resource.RLIMIT_CPU, int(usage.ru_utime + usage.ru_stime) + cpu_s)


def _decode(data: bytes, max_duration_s: float) -> tuple:
    """("ok", rate, channels, frames) or ("bad", message): every frame decoded in blocks."""
    import numpy as np
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as audio:
            rate, channels = audio.samplerate, audio.channels
            problem = range_problem(rate, channels, None, max_duration_s)
            limit = max_duration_s * rate
            if problem or audio.frames > limit:  # the library would allocate the declared length
                return "bad", problem or f"audio must be at most {max_duration_s:g} seconds long"
            frames = 0
            while True:
                block = audio.read(DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)
                if not len(block):
                    return "ok", rate, channels, frames
                if not np.isfinite(block).all():
                    return "bad", "audio holds NaN or infinite samples"
                frames += len(block)
                if frames > limit:
                    return "bad", f"audio must be at most {max_duration_s:g} seconds long"
    except MemoryError:
        return "fatal", "audio needs more memory to decode than allowed"
    except Exception:  # any decoder failure means the upload is not usable audio
        return "bad", _UNDECODABLE


def _worker_main(conn, memory_bytes: int, cpu_s: int) -> None:
    """Answer ("ok" | "bad" | "fatal", ...) for each (max_duration_s, bytes) until the pipe closes."""
    _worker_setup(memory_bytes)
    conn.send(("ready",))
    while True:
        try:
            max_duration_s = conn.recv()
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        _cpu_budget(cpu_s)
        reply = _decode(data, max_duration_s)
        del data
        conn.send(reply)
        if reply[0] == "fatal":  # a failed allocation may leave the decoder in a bad state
            return


class _Worker:
    """One decode process and the parent's end of its pipe."""

    def __init__(self, context, memory_bytes: int, cpu_s: int):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, memory_bytes, cpu_s),
                                       name="upload-decoder", daemon=True)
        self.process.start()
        child.close()
        try:
            ready = self.conn.poll(WORKER_START_TIMEOUT_S) and self.conn.recv() == ("ready",)
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.stop()
            raise RuntimeError("the audio decode worker did not start")

    def alive(self) -> bool:
        return self.process.is_alive()

    def stop(self) -> None:
        self.conn.close()
        self.process.join(1.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)


class UploadChecker:
    """Size, format, header and full-decode checks for uploads (see the module docstring).

    One long-lived worker process (started on first use with the "spawn" method, so it is safe
    from threaded callers such as Ray actors) decodes one upload at a time; concurrent ``check``
    calls wait their turn. ``memory_mb`` is the address space decoding may add on top of the
    worker's start-up footprint; ``timeout_s`` bounds each decode's wall time, and twice that
    (at least one second) its CPU time."""

    def __init__(self, max_duration_s: float, timeout_s: float = 15.0, memory_mb: int = 1024):
        if max_duration_s <= 0 or timeout_s <= 0 or memory_mb <= 0:
            raise ValueError("max_duration_s, timeout_s and memory_mb must be positive")
        self.max_duration_s, self.timeout_s, self.memory_mb = float(max_duration_s), float(timeout_s), int(memory_mb)
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._worker: Optional[_Worker] = None

    @property
    def pid(self) -> Optional[int]:
        """The decode worker's process id, None before first use or after a failure."""
        worker = self._worker
        return worker.process.pid if worker else None

    def check(self, field: str, data: bytes, max_bytes: int) -> AudioProbe:
        """The upload's probe, or FieldError(field): 413 too_large, 422 invalid_audio."""
        size = memoryview(data).nbytes
        if size > max_bytes:
            raise FieldError(field, f"audio upload must be at most {max_bytes} bytes ({max_bytes / 2**20:.1f} MiB)",
                             status_code=413, code="too_large")
        if size == 0:
            raise FieldError(field, "audio upload is empty", code="invalid_audio")
        data = bytes(data)
        try:
            kind = sniff(data)
            header = probe_header(data)
            if header is not None:
                _check_ranges(header, self.max_duration_s)
            probe = self._decode_in_worker(kind, data)
            _check_ranges(probe, self.max_duration_s)
        except InvalidAudio as error:
            raise FieldError(field, str(error), code="invalid_audio") from None
        return probe

    def _decode_in_worker(self, kind: str, data: bytes) -> AudioProbe:
        with self._lock:
            reply = self._ask(data)
        if reply[0] != "ok":
            raise InvalidAudio(reply[1])
        _, rate, channels, frames = reply
        return AudioProbe(kind, rate, channels, frames, frames / rate)

    def _ask(self, data: bytes) -> tuple:
        """One round trip to the worker (lock held); a dead, stuck or failed worker is discarded."""
        worker = self._ready_worker()
        try:
            worker.conn.send(self.max_duration_s)
            worker.conn.send_bytes(data)
        except OSError:  # it died receiving the upload (its memory limit, most likely)
            self._discard()
            raise InvalidAudio(_UNDECODABLE) from None
        if not worker.conn.poll(self.timeout_s):
            self._discard()
            raise InvalidAudio(f"audio must decode within {self.timeout_s:g} seconds")
        try:
            reply = worker.conn.recv()
        except (EOFError, OSError):  # crashed, or killed by its memory or CPU limit
            self._discard()
            raise InvalidAudio(_UNDECODABLE) from None
        if reply[0] == "fatal":
            self._discard()
        return reply

    def _ready_worker(self) -> _Worker:
        if self._worker is not None and not self._worker.alive():
            self._discard()
        if self._worker is None:
            cpu_s = max(1, math.ceil(2 * self.timeout_s))
            self._worker = _Worker(self._context, self.memory_mb * 2**20, cpu_s)
        return self._worker

    def _discard(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.process.kill()
            worker.stop()

    def close(self) -> None:
        """Stop the worker; a later ``check`` starts a fresh one."""
        with self._lock:
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.stop()

    def __enter__(self) -> "UploadChecker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
