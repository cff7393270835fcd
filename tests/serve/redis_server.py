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
from typing import Iterator, Union


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


@contextmanager
def start_redis(directory: Union[str, Path], timeout_s: float = 10.0) -> Iterator[str]:
    """Start redis-server with its working files in ``directory``; yields ``redis://127.0.0.1:PORT/0``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH; install it (Debian/Ubuntu package: redis-server)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = directory / f"redis-{port}.log"
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(directory), "--logfile", str(log)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_ready(process, port, log, timeout_s)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
