"""Real server processes for tests: start one on a free loopback port, wait until it answers,
drive it with concurrent clients, stop it with a signal."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """A server started by :func:`serve`; ``stderr`` is what it printed, once it ended."""

    process: subprocess.Popen[bytes]
    url: str
    stderr: str = field(default="")

    def wait_ready(self, workers: int = 1, path: str = "/ready", timeout: float = 60) -> None:
        """Wait until ``path`` was answered by ``workers`` different processes (the JSON
        answer's ``"worker"``)."""
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        with httpx2.Client(base_url=self.url, timeout=5) as http:
            while len(seen) < workers:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{self.url} did not start ({len(seen)} worker(s) up)")
                try:
                    # A new connection each time, so the requests spread over the workers.
                    response = http.get(path, headers={"Connection": "close"})
                    if response.status_code == 200:
                        seen.add(response.json()["worker"])
                except httpx2.TransportError:
                    time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and wait for the process to end; its exit code."""
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]


@contextmanager
def serve(command: Sequence[str], port: int, env: dict[str, str]) -> Iterator[ServerProcess]:
    """Run ``command`` from the repository root, with ``env`` added to the environment; it
    is killed (with its children) at the end if still running."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        server = ServerProcess(process, f"http://127.0.0.1:{port}")
        try:
            yield server
        finally:
            # Whatever is left of it: the server, or a worker that outlived it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
            log.seek(0)
            server.stderr = log.read().decode(errors="replace")


def load_then_signal(
    server: ServerProcess,
    path: Callable[[int], str],
    answered_before_signal: int = 100,
    clients: int = 8,
    sig: int = signal.SIGTERM,
) -> tuple[set[str], int]:
    """``clients`` threads call ``path(n)`` for n = 0, 1, 2... until ``sig`` has stopped the
    server (sent once ``answered_before_signal`` calls were answered). Returns the markers
    (``"n"`` of the JSON answer) of every answered request, and the server's exit code."""
    answered: set[str] = set()
    lock = threading.Lock()
    counter = iter(range(1_000_000))
    stop = threading.Event()

    def client() -> None:
        with httpx2.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.get(path(next(counter)))
                except httpx2.TransportError:
                    if server.process.poll() is not None:
                        return  # the server is gone
                    continue  # a worker going away closed this connection
                if response.status_code == 200:
                    with lock:
                        answered.add(response.json()["n"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(answered) < answered_before_signal:
            if time.monotonic() > deadline or server.process.poll() is not None:
                raise AssertionError(f"only {len(answered)} calls answered")
            time.sleep(0.01)
        code = server.stop(sig)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    return answered, code
