"""``upload_url`` without an app: the per-task count rule, what a record may show of a URL, and the
DiT replica's uploader PUTting to presigned URLs of a real S3-compatible server (moto's, whose SigV2
check refuses a request that differs from what was signed) and to a real loopback HTTP server that
answers as told (retries, redirects)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from botocore.config import Config

from acestep.params import GenerationParams
from serve.config import AppConfig, UploadURLSettings
from serve.edge.errors import FieldError
from serve.upload_url import Uploader, audio_count, shown, targets
from tests.serve.s3_server import KEY, REGION, SECRET

SETTINGS = UploadURLSettings(timeout_s=5, attempts=3, backoff_s=0.5, deadline_s=60)
SONG = bytes(range(256)) * 64


class Waits:
    """The uploader's sleep: records each backoff and waits it out for real."""

    def __init__(self):
        self.delays = []

    def __call__(self, seconds):
        import time

        self.delays.append(seconds)
        time.sleep(seconds)


class PutReceiver:
    """A real HTTP server on loopback recording every PUT; answers ``statuses`` in turn, then 200."""

    def __init__(self, statuses=()):
        self.received, self.statuses, self.lock = [], list(statuses), threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.received.append((self.path, dict(self.headers), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if status == 307:
                    self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/put/song.flac?sig=secret-part"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(statuses=()):
        made.append(PutReceiver(statuses))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


# -- the count rule and what records show ------------------------------------------------------------


def test_one_url_per_audio_in_order_else_422_saying_how_many():
    assert targets("http://h/a", 1) == ["http://h/a"] and targets(["http://h/a"], 1) == ["http://h/a"]
    assert targets(["http://h/a", "http://h/b"], 2) == ["http://h/a", "http://h/b"]
    for value, count, words in (("http://h/a", 2, "exactly 2 URLs"), (["http://h/a"], 3, "exactly 3 URLs"),
                                (["http://h/a", "http://h/b"], 1, "one URL"), ([], 1, "one URL"),
                                ("http://h/a", 0, "no audio")):
        with pytest.raises(FieldError) as refused:
            targets(value, count)
        assert refused.value.loc == ["body", "upload_url"] and words in refused.value.message


def test_a_task_makes_one_audio_per_song_and_track():
    assert audio_count(GenerationParams(), [1, 2, 3], {}) == 3
    assert audio_count(GenerationParams(task_type="extract", tracks="vocals+accompaniment"), [1, 2], {}) == 4
    assert audio_count(GenerationParams(task_type="lego", tracks=["drums", "bass", "guitar"]), [7], {}) == 3
    assert audio_count(GenerationParams(), [1], {"analysis": "extract_codes_only"}) == 0


def test_records_show_urls_without_query_fragment_or_user_info():
    assert shown("https://b.s3.amazonaws.com/k/a.flac?X-Amz-Signature=abc&X-Amz-Credential=x#f") == \
        "https://b.s3.amazonaws.com/k/a.flac"
    assert shown("http://user:pw@[::1]:9000/c/d.wav?sig=s") == "http://[::1]:9000/c/d.wav"


def test_the_upload_deadline_stays_inside_the_encode_timeout():
    with pytest.raises(ValueError, match="deadline_s"):
        AppConfig(demo=True, dit={"upload_url": {"deadline_s": 300}})
    AppConfig(demo=True, dit={"upload_url": {"deadline_s": 200}}, ingress={"timeouts": {"encode_s": 400}})


# -- PUTs to a real S3-compatible server -------------------------------------------------------------


def test_presigned_puts_land_byte_equal_and_records_keep_no_query(s3):
    bucket = s3.bucket()
    sigv4 = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                         region_name=REGION, config=Config(signature_version="s3v4"))
    urls = [s3.presigned_put(bucket, "v2.flac"),  # boto3's default here: SigV2, which moto checks
            sigv4.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "v4.flac",
                                                               "ContentType": "audio/flac"})]
    outcomes = Uploader(SETTINGS, allow_private=True).send_all([(url, SONG, "audio/flac") for url in urls])
    assert outcomes == [{"url": url.split("?")[0], "ok": True, "status": 200, "error": None, "attempts": 1}
                        for url in urls]
    assert s3.read(bucket, "v2.flac") == SONG and s3.read(bucket, "v4.flac") == SONG
    # a URL that signed the content type gets the file's media type
    assert s3.client().head_object(Bucket=bucket, Key="v4.flac")["ContentType"] == "audio/flac"


def test_a_missing_bucket_is_recorded_not_retried(s3):
    waits = Waits()
    [outcome] = Uploader(SETTINGS, allow_private=True, sleep=waits).send_all(
        [(s3.presigned_put(f"gone-{s3.port}", "a.flac"), SONG, "audio/flac")])
    assert outcome == {"url": f"{s3.url}/gone-{s3.port}/a.flac", "ok": False, "status": 404,
                       "error": "HTTP 404 NoSuchBucket", "attempts": 1}
    assert waits.delays == []


def test_a_closed_port_is_retried_with_backoff_then_recorded():
    waits = Waits()
    url = f"http://127.0.0.1:{_closed_port()}/b/a.flac?X-Amz-Signature=secret"
    [outcome] = Uploader(SETTINGS, allow_private=True, sleep=waits).send_all([(url, SONG, "audio/flac")])
    assert outcome["ok"] is False and outcome["status"] is None and outcome["attempts"] == 3
    assert outcome["error"] == "request failed: ConnectError" and "secret" not in str(outcome)
    assert waits.delays == [0.5, 1.0]


# -- PUTs to a loopback server answering as told -----------------------------------------------------


def test_transient_answers_are_retried_until_the_file_arrives(receiver):
    server = receiver([503, 429])
    waits = Waits()
    [outcome] = Uploader(SETTINGS, allow_private=True, sleep=waits).send_all([(server.url, SONG, "audio/flac")])
    assert outcome == {"url": server.url.split("?")[0], "ok": True, "status": 200, "error": None, "attempts": 3}
    assert [body for _, _, body in server.received] == [SONG] * 3 and waits.delays == [0.5, 1.0]
    path, headers, _ = server.received[0]
    assert path == "/put/song.flac?sig=secret-part"  # the presigned query goes out as it was signed
    assert headers["Host"] == f"127.0.0.1:{server.server.server_port}"


def test_redirects_are_not_followed_and_a_refused_address_is_never_called(receiver):
    server = receiver([307])
    [redirected] = Uploader(SETTINGS, allow_private=True).send_all([(server.url, SONG, "audio/flac")])
    assert (redirected["ok"], redirected["status"], redirected["error"]) == (False, 307, "HTTP 307")
    assert [path for path, _, _ in server.received] == ["/put/song.flac?sig=secret-part"]
    [refused] = Uploader(SETTINGS, allow_private=False).send_all([(server.url, SONG, "audio/flac")])
    assert refused["ok"] is False and refused["attempts"] == 1 and refused["status"] is None
    assert "loopback" in refused["error"] and "upload_url" in refused["error"]
    assert len(server.received) == 1


def test_no_attempt_starts_after_the_task_deadline(receiver):
    server = receiver([503, 503, 503])
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    uploader = Uploader(UploadURLSettings(timeout_s=5, attempts=5, backoff_s=4, deadline_s=5), allow_private=True,
                        clock=lambda: now[0], sleep=sleep)
    [outcome] = uploader.send_all([(server.url, SONG, "audio/flac")])
    # 503 at t=0, wait 4 s, 503 at t=4, then the 8 s backoff reaches the 5 s deadline: nothing more
    assert (outcome["attempts"], outcome["status"], outcome["error"]) == (2, 503, "HTTP 503")
    assert len(server.received) == 2
