"""Fixtures for the operator checks: the real Prometheus tools, and the live exposition of the real app.

``promtool`` and ``prometheus`` come from Debian's ``prometheus`` package; when they are missing the
session runs ``scripts/install-test-tools.sh`` once (apt-get, as root). Where that cannot install them
the tests that need them skip and say why. The service runs with ``Settings(engine="fake")``: the
deterministic fake engine needs no model file.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "snipserve.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "snipserve.rules.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "snipserve.json"
INSTALL_SCRIPT = ROOT / "scripts" / "install-test-tools.sh"

_install_attempted: list[str] = []


def _ensure_tools() -> str:
    """Run the (idempotent) installer once per session, when some tool is missing; return its last line."""
    if not _install_attempted:
        if os.environ.get("SNIPSERVE_NO_INSTALL"):
            _install_attempted.append("SNIPSERVE_NO_INSTALL is set")
        else:
            try:
                done = subprocess.run(
                    ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600, check=False
                )
                lines = done.stderr.strip().splitlines()
                _install_attempted.append(lines[-1] if lines else "")
            except (OSError, subprocess.TimeoutExpired) as exc:
                _install_attempted.append(f"installer failed: {exc}")
    return _install_attempted[0]


def require_tool(name: str) -> str:
    """Path of ``name`` (installing Debian's prometheus package first if needed), or skip with the reason."""
    path = shutil.which(name)
    if path is None:
        note = _ensure_tools()
        path = shutil.which(name)
        if path is None:
            pytest.skip(
                f"{name} not found and scripts/install-test-tools.sh could not install Debian's "
                f"'prometheus' package ({note or 'see its output'})"
            )
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return require_tool("prometheus")


def png(width: int = 400, height: int = 300, seed: int = 0) -> bytes:
    """A small random RGB image, PNG-encoded."""
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".png", rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def fake_settings() -> object:
    from service.settings import Settings

    return Settings(engine="fake", warmup=False)


@pytest.fixture(scope="module")
def exposition() -> str:
    """``GET /metrics`` of the real app after a little traffic (ok, bad image, 404, probes)."""
    from service.http.app import create_app

    app = create_app(fake_settings())  # type: ignore[arg-type]
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        with TestClient(app) as client:
            assert client.get("/readyz").status_code == 200
            for seed in range(3):
                response = client.post("/v1/detect", content=png(seed=seed), headers={"content-type": "image/png"})
                assert response.status_code == 200, response.text
            client.post("/v1/detect", content=b"not an image", headers={"content-type": "image/png"})
            client.get("/no/such/route")
            text = client.get("/metrics").text
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
    return text
