"""House style as tests: ruff over the tree and mypy --strict over service/ and snipserve_client/ (STYLE.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool if (BIN / tool).exists() else shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not installed (the dev extra)")
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_clean() -> None:
    r = run("ruff", "check", "service", "snipserve_client", "models", "exporters", "loadtest", "tests", "benchmarks",
            "scripts")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_service() -> None:
    r = run("mypy", "service", "snipserve_client")
    assert r.returncode == 0, r.stdout + r.stderr
