"""Run ``snipserve serve`` as a child process on a free loopback port, ready before use, always stopped.

Used by ``snipserve bench`` (its HTTP phase) and by the end-to-end and shutdown tests. The child's
stdout and stderr go to one log file; when it does not become ready, the error carries the log's tail.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

HOST = "127.0.0.1"
POLL_INTERVAL_S = 0.1
TAIL_CHARS = 4000


class ServerStartError(RuntimeError):
    """The server process exited, or did not answer ``/readyz`` with 200, before the deadline."""


@dataclass(frozen=True)
class ServerProcess:
    """A running server child: ``proc`` (tests may signal and wait on it), base ``url``, and its ``log`` file."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output_tail(self, max_chars: int = TAIL_CHARS) -> str:
        """The last ``max_chars`` characters of the child's combined stdout and stderr."""
        return log_tail(self.log, max_chars)


def free_port(host: str = HOST) -> int:
    """A TCP port free on ``host`` now (another process may still take it before the child binds it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def serve_command(*args: str) -> list[str]:
    """argv for ``snipserve serve *args`` with this interpreter (works without the console script installed)."""
    return [sys.executable, "-m", "service.cli", "serve", *args]


def log_tail(log: Path, max_chars: int = TAIL_CHARS) -> str:
    """The last ``max_chars`` characters of ``log`` (undecodable bytes replaced); empty if it is missing."""
    try:
        data = log.read_bytes()
    except FileNotFoundError:
        return ""
    text = data.decode(errors="replace")
    return text if len(text) <= max_chars else "..." + text[-max_chars:]


@contextlib.contextmanager
def running_server(
    command: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    ready_timeout_s: float = 60.0,
    stop_timeout_s: float = 30.0,
) -> Iterator[ServerProcess]:
    """Start ``command`` (default: ``snipserve serve``) on a free loopback port; yield it once ``/readyz`` is 200.

    The port reaches the child as ``SNIPSERVE_HOST`` / ``SNIPSERVE_PORT`` in its environment (``os.environ``
    updated with ``env``), so any command that builds ``Settings`` from the environment can be run. Output goes
    to ``log``, or to a temporary file that is removed afterwards unless something failed. Raises
    ``ServerStartError`` with the output's tail if the child exits or is not ready within ``ready_timeout_s``.
    On exit, a child still running gets SIGTERM, ``stop_timeout_s`` seconds to exit, then SIGKILL.
    """
    port = free_port()
    child_env = {**os.environ, **(env or {}), "SNIPSERVE_HOST": HOST, "SNIPSERVE_PORT": str(port)}
    own_log = log is None
    if log is None:
        fd, name = tempfile.mkstemp(prefix="snipserve-serve-", suffix=".log")
        os.close(fd)
        log = Path(name)
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(list(command or serve_command()), env=child_env, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(proc=proc, url=f"http://{HOST}:{port}", log=log)
    failed = True
    try:
        _wait_ready(server, ready_timeout_s)
        yield server
        failed = False
    finally:
        _stop(proc, stop_timeout_s)
        if own_log and not failed:
            log.unlink(missing_ok=True)


def _wait_ready(server: ServerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=1.0) as http:
        while True:
            code = server.proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"server exited with status {code} before it was ready (log: {server.log}):\n{server.output_tail()}"
                )
            try:
                if http.get(f"{server.url}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"server was not ready within {timeout_s:.0f} s (log: {server.log}):\n{server.output_tail()}"
                )
            time.sleep(POLL_INTERVAL_S)


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM (a graceful drain), then SIGKILL past ``timeout_s``; always reaps the child."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
