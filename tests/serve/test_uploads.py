"""serve.edge.uploads: hostile uploads get a 413/422 FieldError (never another exception), real audio
round-trips with the right probe values, and the decode worker survives being killed or stuck."""

from __future__ import annotations

import io
import os
import signal
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from serve.edge.errors import FieldError
from serve.edge.uploads import AudioProbe, InvalidAudio, UploadChecker, probe_header, range_problem, sniff

MAX_DURATION_S = 60.0
MAX_BYTES = 8 * 2**20


def tone(seconds: float, rate: int = 48000, channels: int = 2) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * 440 * t)
    return np.stack([mono] * channels, axis=1).astype(np.float32)


def encode(seconds: float, fmt: str, rate: int = 48000, channels: int = 2, subtype=None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds, rate, channels), rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def wav_header(channels: int = 2, rate: int = 48000, bits: int = 16, data_size: int = 0, tag: int = 1) -> bytes:
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    return (b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", data_size))


def declared_wav(declared_s: float, held_s: float, rate: int = 44100) -> bytes:
    """A 16-bit mono WAV whose data chunk declares ``declared_s`` seconds and holds ``held_s``."""
    declared = int(declared_s * rate) * 2
    held = (tone(held_s, rate, channels=1) * 32767).astype("<i2").tobytes()
    return wav_header(channels=1, rate=rate, data_size=declared) + held


def flac_declaring(seconds: float) -> bytes:
    """A real 1 s FLAC with STREAMINFO's total-samples field patched to ``seconds`` at 48 kHz."""
    data = bytearray(encode(1.0, "FLAC"))
    packed_at = 4 + 4 + 10  # "fLaC", the block header, then 10 bytes of block/frame sizes
    packed = int.from_bytes(data[packed_at: packed_at + 8], "big")
    packed = (packed & ~((1 << 36) - 1)) | int(seconds * 48000)
    data[packed_at: packed_at + 8] = packed.to_bytes(8, "big")
    return bytes(data)


def id3_tag(body: bytes = b"\0" * 16) -> bytes:
    size = len(body)
    syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x03\x00\x00" + syncsafe + body


def nan_wav() -> bytes:
    samples = tone(1.0)
    samples[1000, 0] = np.nan
    buffer = io.BytesIO()
    sf.write(buffer, samples, 48000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


RANDOM = np.random.default_rng(7).bytes(20_000)
MP3_SYNC = b"\xff\xfb\x90\x64"  # MPEG-1 layer III, 128 kbps, 44.1 kHz

HOSTILE = {
    "plain text": (b"hello, this is not audio at all\n" * 20, 422, "invalid_audio"),
    "png header": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + RANDOM[:500], 422, "invalid_audio"),
    "elf header": (b"\x7fELF\x02\x01\x01\x00" + bytes(56) + RANDOM[:500], 422, "invalid_audio"),
    "empty": (b"", 422, "invalid_audio"),
    "header-only wav": (wav_header(), 422, "invalid_audio"),
    "truncated wav": (declared_wav(10.0, 1.0), 422, "invalid_audio"),
    "10-hour wav": (declared_wav(36_000.0, 0.05), 422, "invalid_audio"),
    "10-hour flac": (flac_declaring(36_000.0), 422, "invalid_audio"),
    "0 Hz wav": (wav_header(rate=0, data_size=4000) + bytes(4000), 422, "invalid_audio"),
    "65535-channel wav": (wav_header(channels=65535, bits=8, data_size=4000) + bytes(4000), 422, "invalid_audio"),
    "adpcm wav": (wav_header(tag=0x11, bits=4, data_size=4000) + bytes(4000), 422, "invalid_audio"),
    "nan float wav": (nan_wav(), 422, "invalid_audio"),
    "garbage after mp3 sync": (MP3_SYNC + RANDOM, 422, "invalid_audio"),
    "garbage after id3": (id3_tag() + RANDOM, 422, "invalid_audio"),
    "garbage after id3 + sync": (id3_tag() + MP3_SYNC + RANDOM, 422, "invalid_audio"),
    "garbage after OggS": (b"OggS" + RANDOM, 422, "invalid_audio"),
    "garbage after fLaC": (b"fLaC" + RANDOM, 422, "invalid_audio"),
    "random bytes": (RANDOM, 422, "invalid_audio"),
    "oversized": (b"RIFF" + bytes(MAX_BYTES), 413, "too_large"),
}


@pytest.fixture(scope="module")
def checker():
    with UploadChecker(MAX_DURATION_S) as instance:
        yield instance


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_uploads_are_refused(checker, name):
    data, status, code = HOSTILE[name]
    with pytest.raises(FieldError) as info:
        checker.check("src_audio", data, MAX_BYTES)
    error = info.value
    assert (error.status_code, error.code, error.loc) == (status, code, ["body", "src_audio"])
    assert len(error.message) < 200 and "\\x" not in error.message


@pytest.mark.parametrize("name", ["truncated wav", "10-hour wav", "10-hour flac", "0 Hz wav", "65535-channel wav"])
def test_lying_headers_are_refused_without_decoding(name):
    data = HOSTILE[name][0]
    fresh = UploadChecker(MAX_DURATION_S)
    with pytest.raises(FieldError):
        fresh.check("reference_audio", data, MAX_BYTES)
    assert fresh.pid is None  # no worker was ever started
    try:
        header = probe_header(data)
    except InvalidAudio:
        return
    assert range_problem(header.sample_rate, header.channels, header.frames, MAX_DURATION_S)


def test_too_long_wav_is_refused_from_its_header():
    fresh = UploadChecker(MAX_DURATION_S)
    samples = (tone(MAX_DURATION_S + 1, rate=8000, channels=1) * 32767).astype("<i2").tobytes()
    with pytest.raises(FieldError) as info:
        fresh.check("src_audio", wav_header(channels=1, rate=8000, data_size=len(samples)) + samples, MAX_BYTES)
    assert "at most 60 seconds" in info.value.message and fresh.pid is None


def test_oversized_is_refused_before_anything_else():
    fresh = UploadChecker(MAX_DURATION_S)
    with pytest.raises(FieldError) as info:
        fresh.check("src_audio", b"x" * 101, max_bytes=100)
    assert info.value.status_code == 413 and "100 bytes" in info.value.message and fresh.pid is None


def test_sniff():
    assert sniff(encode(0.1, "WAV")) == "wav"
    assert sniff(encode(0.1, "RF64")) == "wav"
    assert sniff(encode(0.1, "FLAC")) == "flac"
    assert sniff(id3_tag() + encode(0.1, "FLAC")) == "flac"
    assert sniff(encode(0.1, "OGG", subtype="VORBIS")) == "ogg"
    assert sniff(MP3_SYNC + bytes(100)) == "mp3"
    assert sniff(id3_tag() + MP3_SYNC) == "mp3"
    assert sniff(b"\xff\xfd\x90\x64") is None  # layer II
    assert sniff(b"\xff\xfb\xf0\x64") is None  # reserved bitrate
    for data in (b"", b"RIFF", b"RIFF\0\0\0\0AVI ", b"ID3", id3_tag(), RANDOM[:3]):
        assert sniff(data) is None


GOOD = [(fmt, subtype, rate, channels) for fmt, subtype in [("WAV", None), ("FLAC", None), ("OGG", "VORBIS")]
        for rate in (44100, 48000) for channels in (1, 2)]


@pytest.mark.parametrize("fmt,subtype,rate,channels", GOOD)
def test_real_audio_round_trips(checker, fmt, subtype, rate, channels):
    probe = checker.check("src_audio", encode(3.0, fmt, rate, channels, subtype), MAX_BYTES)
    assert probe == AudioProbe(fmt.lower(), rate, channels, 3 * rate, 3.0)


@pytest.mark.parametrize("rate,channels", [(44100, 1), (48000, 2)])
def test_mp3_round_trips(checker, rate, channels):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3")
    probe = checker.check("src_audio", encode(3.0, "MP3", rate, channels, "MPEG_LAYER_III"), MAX_BYTES)
    assert (probe.format, probe.sample_rate, probe.channels) == ("mp3", rate, channels)
    assert abs(probe.duration_s - 3.0) < 0.1


def test_rf64_and_id3_flac_round_trip(checker):
    assert checker.check("src_audio", encode(2.0, "RF64"), MAX_BYTES).frames == 96000
    probe = checker.check("src_audio", id3_tag() + encode(2.0, "FLAC"), MAX_BYTES)
    assert (probe.format, probe.frames) == ("flac", 96000)


def test_decoded_length_is_checked_for_formats_without_a_length_header():
    short = UploadChecker(max_duration_s=2.0)
    try:
        with pytest.raises(FieldError) as info:
            short.check("src_audio", encode(3.0, "OGG", subtype="VORBIS"), MAX_BYTES)
        assert info.value.code == "invalid_audio" and "2 seconds" in info.value.message
    finally:
        short.close()


def test_concurrent_checks_from_threads(checker):
    uploads = [encode(1.0 + i / 2, "FLAC") for i in range(6)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        probes = list(pool.map(lambda data: checker.check("src_audio", data, MAX_BYTES), uploads))
    assert [p.frames for p in probes] == [int((1.0 + i / 2) * 48000) for i in range(6)]


def _wait_dead(pid: int) -> None:
    """Until ``pid`` has exited (a zombie waiting for its parent counts as exited)."""
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.02)


def test_killed_worker_is_replaced(checker):
    wav = encode(1.0, "WAV")
    checker.check("src_audio", wav, MAX_BYTES)
    pid = checker.pid
    os.kill(pid, signal.SIGKILL)
    _wait_dead(pid)
    assert checker.check("src_audio", wav, MAX_BYTES).frames == 48000
    assert checker.pid not in (None, pid)


def test_decode_over_the_time_limit_is_refused_and_the_checker_recovers(checker, monkeypatch):
    long_ogg = encode(40.0, "OGG", subtype="VORBIS")
    checker.check("src_audio", encode(1.0, "WAV"), MAX_BYTES)  # a warm worker: only decoding is timed
    pid = checker.pid
    monkeypatch.setattr(checker, "timeout_s", 0.001)
    with pytest.raises(FieldError) as info:
        checker.check("src_audio", long_ogg, MAX_BYTES)
    assert (info.value.status_code, info.value.code) == (422, "invalid_audio")
    assert "0.001 seconds" in info.value.message
    _wait_dead(pid)
    monkeypatch.undo()
    assert checker.check("src_audio", long_ogg, MAX_BYTES).frames == 40 * 48000


def test_memory_limit_kills_only_the_request():
    tight = UploadChecker(MAX_DURATION_S, memory_mb=4)
    try:
        big = encode(40.0, "WAV", subtype="PCM_16")  # 7.7 MB, copied more than once on receipt
        with pytest.raises(FieldError) as info:
            tight.check("src_audio", big, MAX_BYTES)
        assert info.value.code == "invalid_audio"
        assert tight.check("src_audio", encode(0.5, "WAV"), MAX_BYTES).frames == 24000
    finally:
        tight.close()


def test_close_stops_the_worker():
    instance = UploadChecker(MAX_DURATION_S)
    instance.check("src_audio", encode(0.5, "FLAC"), MAX_BYTES)
    pid = instance.pid
    instance.close()
    assert instance.pid is None
    _wait_dead(pid)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
