"""``running_server``: a server child that is ready before use, diagnosable when it is not, always stopped."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

from service.cli.serve_process import ServerStartError, running_server, serve_command

FAKE = {"SNIPSERVE_ENGINE": "fake", "SNIPSERVE_WARMUP": "false"}


def test_ready_server_answers_and_is_stopped_on_exit(tmp_path: Path) -> None:
    with running_server(env=FAKE, log=tmp_path / "server.log") as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
        proc = server.proc
    assert proc.returncode == 0  # SIGTERM drained and exited cleanly, not killed
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=1)


def test_server_that_exits_early_raises_with_its_output(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.onnx"
    env = {"SNIPSERVE_MODELS_DIR": str(tmp_path)}
    with (
        pytest.raises(ServerStartError, match=r"exited with status [1-9]") as caught,
        running_server(serve_command("--model", str(missing)), env=env, log=tmp_path / "server.log"),
    ):
        pytest.fail("the server should not have become ready")
    message = str(caught.value)
    assert "no-such-model.onnx" in message  # the server's own complaint, from its captured output
    assert str(tmp_path / "server.log") in message


def test_server_never_ready_times_out_with_its_output_and_is_stopped(tmp_path: Path) -> None:
    # Prints, then sleeps without listening: the helper must give up, say why, and end the child.
    script = "import os, time; print('still loading', os.getpid(), flush=True); time.sleep(60)"
    command = [sys.executable, "-c", script]
    with (
        pytest.raises(ServerStartError, match=r"not ready within 1 s") as caught,
        running_server(command, log=tmp_path / "server.log", ready_timeout_s=1.0, stop_timeout_s=5.0),
    ):
        pytest.fail("the child should not have become ready")
    pid = int(str(caught.value).split("still loading ", 1)[1].split()[0])
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(pid, 0)


def test_own_temporary_log_is_kept_when_start_fails(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    with pytest.raises(ServerStartError, match="status 3") as caught, running_server(command):
        pytest.fail("the child should not have become ready")
    log = Path(str(caught.value).split("(log: ", 1)[1].split(")", 1)[0])
    try:
        assert "boom" in log.read_text()
    finally:
        log.unlink()
