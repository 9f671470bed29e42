"""``snipserve``'s entry point: every usage, configuration and startup error is one line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["serve", "--engine", "fake"], {"SNIPSERVE_MAX_DELAY_MS": "-1"}, "SNIPSERVE_MAX_DELAY_MS"),
        (["serve", "--engine", "fake"], {"SNIPSERVE_API_KEY": ""}, "SNIPSERVE_API_KEY is set but empty"),
        (["serve", "--model", "models/missing.onnx"], {}, "model file not found"),
        (["serve", "--model", "/etc/passwd"], {}, "outside the models directory"),
    ],
    ids=["bad-setting", "empty-api-key", "missing-model", "model-outside"],
)
def test_serve_startup_errors_are_one_line_and_status_2(args: list[str], env: dict[str, str], words: str) -> None:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SNIPSERVE_")} | env
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_eval_on_a_missing_dataset_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--data", str(tmp_path / "nowhere"), "--mode", "pyramid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("snipserve eval: error:") and "nowhere" in err[0]


def test_error_line_names_settings_variables() -> None:
    from pydantic import ValidationError

    from service.cli import error_line
    from service.settings import Settings

    with pytest.raises(ValidationError) as info:
        Settings(max_batch=0, header_timeout_s=-1)
    line = error_line(info.value)
    assert "SNIPSERVE_MAX_BATCH" in line and "SNIPSERVE_HEADER_TIMEOUT_S" in line and "\n" not in line


def test_port_in_use_is_one_line_and_status_2() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNIPSERVE_")} | {"SNIPSERVE_WARMUP": "false"}
        r = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--engine", "fake", "--port", str(port)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"snipserve serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
