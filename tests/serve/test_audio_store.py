"""AudioStore on a local directory, on the memory filesystem and on a real S3-compatible server, and
its HTTP range responses."""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import threading
import time
import uuid
import zipfile
from datetime import datetime, timezone
from typing import Optional

import av
import httpx
import pytest
import torch
from fastapi import FastAPI, Header, Request

from acestep.audio import encode_audio
from serve.store.audio import AudioStore, archive, audio_response, parse_range, valid_key
from serve.edge.errors import APIError

DATA = bytes(range(256)) * 40  # 10,240 bytes, every offset distinguishable within a period


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield AudioStore(str(tmp_path / "audio" / "nested"))
        return
    memory = AudioStore(f"memory://audio-test-{uuid.uuid4().hex}")
    yield memory
    if memory.fs.exists(memory.root):
        memory.fs.rm(memory.root, recursive=True)


def _set_mtime(store: AudioStore, key: str, stamp: float) -> None:
    path = f"{store.root}/{key}"
    if store.is_local:
        os.utime(path, (stamp, stamp))
    else:
        # The memory filesystem lists a file's creation time; set both it and the modification time.
        entry = store.fs.store[path]
        entry.created = entry.modified = datetime.fromtimestamp(stamp, tz=timezone.utc)


def _files(store: AudioStore):
    return sorted(e["name"].rsplit("/", 1)[-1] for e in store.fs.ls(store.root, detail=True))


def test_put_read_size_range(store):
    assert store.size("a.flac") is None and not store.exists("a.flac")
    store.put("a.flac", DATA)
    assert store.exists("a.flac") and store.size("a.flac") == len(DATA)
    assert store.read("a.flac") == DATA
    assert store.read("a.flac", 100, 200) == DATA[100:200]
    assert store.read("a.flac", 10_000) == DATA[10_000:]
    assert store.read("missing.flac") is None
    store.put("a.flac", b"short")
    assert store.read("a.flac") == b"short" and store.size("a.flac") == 5


def test_iter_range_chunks(store):
    store.put("b.wav", DATA)
    chunks = list(store.iter_range("b.wav", 5, 5005, chunk_size=1000))
    assert [len(c) for c in chunks] == [1000] * 5
    assert b"".join(chunks) == DATA[5:5005]
    assert b"".join(store.iter_range("b.wav", 10_000, None, chunk_size=64)) == DATA[10_000:]
    assert b"".join(store.iter_range("b.wav", 0, 10 ** 9)) == DATA
    assert list(store.iter_range("b.wav", 7, 7)) == []
    with pytest.raises(FileNotFoundError):
        next(store.iter_range("nope.wav", 0, 10))
    with pytest.raises(FileNotFoundError):
        next(store.iter_range("../b.wav", 0, 10))


def test_put_leaves_no_temp_files(store):
    for index in range(5):
        store.put(f"t{index}.flac", DATA[: 100 * (index + 1)])
    assert _files(store) == [f"t{index}.flac" for index in range(5)]


def test_failed_local_put_leaves_no_temp_file(tmp_path, monkeypatch):
    store = AudioStore(str(tmp_path / "s"))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.put("x.flac", DATA)
    assert os.listdir(tmp_path / "s") == []


@pytest.mark.parametrize("key", ["../x", "a/b", "", "x" * 201, "..", "a..b", ".hidden", "a\\b",
                                 "a\nb", "x.flac\n", "/abs", None, 5])
def test_bad_keys(store, key):
    assert not valid_key(key)
    with pytest.raises(ValueError):
        store.put(key, b"data")
    assert store.size(key) is None and not store.exists(key)
    assert store.read(key) is None
    assert store.delete(key) is False


def test_long_valid_key_and_outside_file_untouched(tmp_path):
    outside = tmp_path / "x"
    outside.write_bytes(b"secret")
    store = AudioStore(str(tmp_path / "inner"))
    assert store.read("../x") is None and store.size("../x") is None
    key = "k" * 200
    store.put(key, b"ok")
    assert store.read(key) == b"ok"


def test_delete(store):
    store.put("d.mp3", b"123")
    assert store.delete("d.mp3") is True
    assert store.delete("d.mp3") is False and store.size("d.mp3") is None


def test_purge_by_ttl(store):
    store.ttl_s = 3600.0
    now = time.time()
    for key, age in (("old.flac", 7200), ("new.flac", 60), ("older.flac", 90_000)):
        store.put(key, DATA)
        _set_mtime(store, key, now - age)
    assert store.purge(now=now) == 2
    assert _files(store) == ["new.flac"]
    assert store.purge(now=now) == 0


def test_purge_stale_temp_files_only(tmp_path):
    store = AudioStore(str(tmp_path), ttl_s=100.0)
    now = time.time()
    stale, fresh = f".a.flac.{'0' * 32}.tmp", f".b.flac.{'1' * 32}.tmp"
    for name, age in ((stale, 1000), (fresh, 1), ("foreign file.txt", 1000)):
        (tmp_path / name).write_bytes(DATA)
        os.utime(tmp_path / name, (now - age, now - age))
    assert store.purge(now=now) == 1
    assert sorted(os.listdir(tmp_path)) == [fresh, "foreign file.txt"]


def test_purge_by_max_bytes(store):
    store.ttl_s, store.max_bytes = None, 2500
    now = time.time()
    for index in range(5):  # 1000 bytes each, k0 oldest
        store.put(f"k{index}.flac", DATA[:1000])
        _set_mtime(store, f"k{index}.flac", now - 100 + index)
    assert store.purge(now=now) == 3
    assert _files(store) == ["k3.flac", "k4.flac"]


def test_purge_skips_files_that_vanish(store, monkeypatch):
    store.ttl_s = 10.0
    store.put("gone.flac", DATA)
    _set_mtime(store, "gone.flac", time.time() - 100)
    listing = store._listing(time.time())
    store.delete("gone.flac")
    monkeypatch.setattr(store, "_listing", lambda now: listing)
    assert store.purge() == 0


def test_purge_missing_root():
    store = AudioStore(f"memory://never-written-{uuid.uuid4().hex}")
    assert store.purge() == 0


def test_pickle_round_trip(store):
    store.put("p.ogg", DATA)
    _ = store.fs
    clone = pickle.loads(pickle.dumps(store))
    assert clone._fs is None
    assert (clone.url, clone.ttl_s, clone.max_bytes) == (store.url, store.ttl_s, store.max_bytes)
    assert clone.read("p.ogg") == DATA


def test_local_dir_created_and_file_url(tmp_path):
    target = tmp_path / "a" / "b"
    store = AudioStore(f"file://{target}")
    store.put("f.wav", b"x")
    assert (target / "f.wav").read_bytes() == b"x"


@pytest.mark.parametrize("key, media", [("a.flac", "audio/flac"), ("a.WAV", "audio/wav"), ("a.mp3", "audio/mpeg"),
                                        ("a.ogg", "audio/ogg"), ("a.wav32", "audio/wav"), ("a.opus", "audio/ogg"),
                                        ("a.aac", "audio/aac"), ("a.bin", "application/octet-stream"),
                                        ("noext", "application/octet-stream")])
def test_media_type(key, media):
    assert AudioStore("memory://m").media_type(key) == media


@pytest.mark.parametrize("header, expected", [
    (None, None), ("", None), ("bytes=0-99", (0, 100)), ("bytes=100-", (100, 1000)), ("bytes=-50", (950, 1000)),
    ("bytes=-5000", (0, 1000)), ("bytes=990-5000", (990, 1000)), ("BYTES=1-1", (1, 2)), ("bytes=0-1,5-6", None),
    ("bytes=5-1", None), ("bytes=-", None), ("items=0-1", None), ("bytes=a-b", None), ("bytes 0-1", None),
])
def test_parse_range(header, expected):
    assert parse_range(header, 1000) == expected


# --- HTTP ---------------------------------------------------------------------------------------


def _app(store: AudioStore) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error.response()

    @app.get("/audio/{key}")
    def get_audio(key: str, range: Optional[str] = Header(None)):
        return audio_response(store, key, range)

    return app


def _get(store: AudioStore, key: str, range_header: Optional[str] = None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=_app(store))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"Range": range_header} if range_header is not None else {}
            return await client.get(f"/audio/{key}", headers=headers)

    return asyncio.run(go())


def test_http_full(store):
    store.put("song.flac", DATA)
    response = _get(store, "song.flac")
    assert response.status_code == 200 and response.content == DATA
    assert response.headers["content-length"] == str(len(DATA))
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-type"] == "audio/flac"
    assert response.headers["content-disposition"] == 'inline; filename="song.flac"'
    assert "content-range" not in response.headers


@pytest.mark.parametrize("header, start, end", [("bytes=0-99", 0, 100), ("bytes=100-", 100, len(DATA)),
                                                ("bytes=-50", len(DATA) - 50, len(DATA))])
def test_http_partial(store, header, start, end):
    store.put("song.wav", DATA)
    response = _get(store, "song.wav", header)
    assert response.status_code == 206
    assert response.content == DATA[start:end]
    assert response.headers["content-range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert response.headers["content-length"] == str(end - start)
    assert response.headers["content-type"] == "audio/wav"


@pytest.mark.parametrize("audio_format, media", [("opus", "audio/ogg"), ("aac", "audio/aac"), ("wav32", "audio/wav")])
def test_http_serves_each_new_format(store, audio_format, media):
    """Files as the DiT deployment stores them (``{key}.{format}``) come back typed and decodable."""
    tone = torch.sin(torch.arange(2 * 48000) / 20.0).repeat(2, 1) * 0.5
    data = encode_audio(tone, audio_format)
    store.put(f"song.{audio_format}", data)
    response = _get(store, f"song.{audio_format}")
    assert response.status_code == 200 and response.content == data
    assert response.headers["content-type"] == media
    with av.open(io.BytesIO(response.content)) as container:
        decoded = sum(frame.samples for frame in container.decode(audio=0))
    assert abs(decoded - tone.shape[-1]) <= 2 * 1024  # an AAC stream adds its priming and padding


def test_http_unsatisfiable(store):
    store.put("song.mp3", DATA)
    response = _get(store, "song.mp3", "bytes=99999999-")
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(DATA)}"
    assert response.json()["detail"][0]["loc"] == ["header", "range"]


@pytest.mark.parametrize("header", ["bytes=0-1,4-5", "bytes=zz", "pages=1-2", "bytes=9-3"])
def test_http_malformed_range_is_ignored(store, header):
    store.put("song.ogg", DATA)
    response = _get(store, "song.ogg", header)
    assert response.status_code == 200 and response.content == DATA


def test_http_unknown_key(store):
    for key in ("missing.flac", "..bad", "a..b", "x" * 201):
        response = _get(store, key)
        assert response.status_code == 404
        assert response.json() == {"detail": [{"loc": ["path", "key"], "msg": "unknown audio key",
                                               "type": "not_found"}]}


def test_http_streams_in_chunks_off_the_event_loop(tmp_path, monkeypatch):
    store = AudioStore(str(tmp_path))
    big = os.urandom(1_200_000)
    store.put("big.flac", big)
    threads, sizes = set(), []
    real = store._chunks

    def tracking(*args):
        for chunk in real(*args):
            threads.add(threading.get_ident())
            sizes.append(len(chunk))
            yield chunk

    def no_whole_read(*args, **kwargs):
        raise AssertionError("the response must stream, not read the whole file")

    monkeypatch.setattr(store, "_chunks", tracking)
    monkeypatch.setattr(store, "read", no_whole_read)
    response = _get(store, "big.flac")
    assert response.content == big
    assert len(sizes) == 5 and max(sizes) == 256 * 1024
    assert threading.main_thread().ident not in threads


def test_filename_is_sanitized(tmp_path):
    store = AudioStore(str(tmp_path))
    store.put("x.flac", b"abc")
    response = audio_response(store, "x.flac", None, filename='my "song"\r\n.flac')
    assert response.headers["content-disposition"] == 'inline; filename="my _song___.flac"'
    with pytest.raises(APIError) as error:
        audio_response(store, "y.flac", None)
    assert error.value.status_code == 404 and "y.flac" not in error.value.message


# --- on a real S3-compatible server (moto's, tests/serve/s3_server.py) ----------------------------


@pytest.fixture
def s3_store(s3):
    bucket = s3.bucket()
    return AudioStore(f"s3://{bucket}/audio", options=s3.options), bucket


def test_s3_store_put_read_range_list_delete_byte_equal(s3, s3_store):
    store, bucket = s3_store
    song = encode_audio(torch.sin(torch.arange(48000) / 9.0).repeat(2, 1) * 0.5, "flac")
    store.put("song.flac", song)
    store.put("other.wav", DATA)
    assert s3.read(bucket, "audio/song.flac") == song  # the object itself, as any S3 client reads it
    assert store.read("song.flac") == song and store.size("song.flac") == len(song)
    assert store.read("other.wav", 100, 200) == DATA[100:200]
    assert b"".join(store.iter_range("other.wav", 5, 5005, chunk_size=1000)) == DATA[5:5005]
    assert _files(store) == ["other.wav", "song.flac"]
    assert store.read("missing.flac") is None and store.size("missing.flac") is None
    assert store.delete("other.wav") is True
    assert store.delete("other.wav") is False  # S3 deletes a missing key without complaint; the store says so
    assert store.read("other.wav") is None and _files(store) == ["song.flac"]
    assert store.media_type("song.flac") == "audio/flac"


def test_s3_store_archive_and_http_ranges(s3_store):
    store, _ = s3_store
    store.put("a.flac", DATA)
    store.put("b.flac", DATA[::-1])
    items = [{"key": "a.flac", "format": "flac"}, {"key": "b.flac", "format": "flac", "track": "drums"}]
    with zipfile.ZipFile(io.BytesIO(archive(store, items))) as bundle:
        assert bundle.namelist() == ["01-a.flac", "02-drums.flac"]
        assert bundle.read("01-a.flac") == DATA and bundle.read("02-drums.flac") == DATA[::-1]
    whole, part = _get(store, "a.flac"), _get(store, "a.flac", "bytes=100-")
    assert whole.status_code == 200 and whole.content == DATA
    assert part.status_code == 206 and part.content == DATA[100:]


def test_s3_store_purges_by_listed_age_and_pickles_its_options(s3_store):
    store, _ = s3_store
    store.ttl_s = 3600.0
    store.put("k.flac", DATA)
    assert store.purge() == 0  # just written: S3's LastModified is now
    clone = pickle.loads(pickle.dumps(store))  # as Ray hands it to a replica: the endpoint goes along
    assert clone.options == store.options and clone.read("k.flac") == DATA
    assert clone.purge(now=time.time() + 7200) == 1
    assert store.read("k.flac") is None


def test_app_config_opens_its_audio_store_on_s3(s3):
    from serve.config import AppConfig

    bucket = s3.bucket()
    config = AppConfig(demo=True, store={"audio_url": f"s3://{bucket}/a", "audio_options": s3.options})
    config.audio_store().put("x.mp3", DATA)
    assert s3.read(bucket, "a/x.mp3") == DATA
