"""A real, throwaway ``redis-server`` for tests: ``with start_redis(directory) as url: ...``.

It listens on a free loopback port, keeps nothing on disk (no RDB snapshots, no AOF) and is
terminated on exit. The Debian package ``redis-server`` provides the binary.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _log_text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no log written)"


def _wait_ready(process: subprocess.Popen, port: int, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _answers_ping(port):
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}:\n{_log_text(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer PING within {timeout_s} s:\n{_log_text(log)}")
        time.sleep(0.02)


class RedisServer:
    """One redis-server process on a fixed port; ``durable`` keeps an append-only file synced on
    every write, so a kill -9 and a restart on the same directory lose nothing acknowledged."""

    def __init__(self, directory: Union[str, Path], port: Optional[int] = None, durable: bool = False):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not on PATH; install it (Debian/Ubuntu package: redis-server)")
        self.directory, self.port, self.durable = Path(directory), port or _free_port(), durable
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        log = self.directory / f"redis-{self.port}.log"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
                   "--dir", str(self.directory), "--logfile", str(log)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_ready(self.process, self.port, log, timeout_s)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save, as a crash would leave it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def start_redis(directory: Union[str, Path], timeout_s: float = 10.0) -> Iterator[str]:
    """Start redis-server with its working files in ``directory``; yields ``redis://127.0.0.1:PORT/0``."""
    server = RedisServer(directory).start(timeout_s)
    try:
        yield server.url
    finally:
        server.stop()
