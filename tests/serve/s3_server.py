"""A real, throwaway S3-compatible server for tests: moto's server mode (the test extra's
``moto[server]``) in a subprocess on a free loopback port, reached with boto3 and s3fs over HTTP
like any S3 endpoint. ``with start_s3(directory) as server: ...``; tests/conftest.py starts one per
session (fixture ``s3``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import httpx

# moto accepts any credentials; botocore and s3fs need some to sign with
KEY, SECRET, REGION = "testing", "testing", "us-east-1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """One moto server process; ``client()`` is a boto3 S3 client on it, ``options`` the fsspec
    storage options that point s3fs at it."""

    def __init__(self, directory: Union[str, Path], port: Optional[int] = None):
        self.directory, self.port = Path(directory), port or _free_port()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process: Optional[subprocess.Popen] = None
        self._client = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> Dict[str, Any]:
        return {"endpoint_url": self.url, "key": KEY, "secret": SECRET, "client_kwargs": {"region_name": REGION}}

    def start(self, timeout_s: float = 30.0) -> "S3Server":
        log = self.directory / f"moto-{self.port}.log"
        with open(log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not answer within {timeout_s} s:\n{log.read_text()}")
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        try:
            return httpx.get(self.url, timeout=1.0).status_code == 200  # ListBuckets
        except httpx.HTTPError:
            return False

    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.url, aws_access_key_id=KEY,
                                        aws_secret_access_key=SECRET, region_name=REGION)
        return self._client

    def bucket(self) -> str:
        """A new, empty bucket of its own."""
        name = f"b-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def presigned_put(self, bucket: str, key: str, **params: Any) -> str:
        """A presigned PUT URL for ``bucket/key`` (``params``: more put_object parameters it signs)."""
        return self.client().generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": key, **params},
                                                    ExpiresIn=3600)

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextmanager
def start_s3(directory: Union[str, Path], timeout_s: float = 30.0) -> Iterator[S3Server]:
    server = S3Server(directory).start(timeout_s)
    try:
        yield server
    finally:
        server.stop()
