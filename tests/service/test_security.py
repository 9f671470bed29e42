"""API key (header, constant time, open health/metrics), CORS allow-list, model-path confinement."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from service import security
from service.http.app import create_app
from service.security import ModelPathError, presented_key, resolve_model_path
from service.settings import Settings

KEY = "s3cret-key-for-tests"


def png() -> bytes:
    ok, data = cv2.imencode(".png", np.zeros((64, 64, 3), np.uint8))
    assert ok
    return data.tobytes()


def client(**overrides: object) -> TestClient:
    settings = Settings(**({"engine": "fake", "warmup": False} | overrides))
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture
def keyed() -> Iterator[TestClient]:
    with client(api_key=KEY) as c:
        yield c


def detect(c: TestClient, headers: dict[str, str] | None = None) -> object:
    return c.post("/v1/detect", content=png(), headers={"content-type": "image/png", **(headers or {})})


# ---- API key ------------------------------------------------------------------------------------------
def test_without_a_configured_key_everything_is_open() -> None:
    with client() as c:
        assert detect(c).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}],
    ids=["none", "wrong-header", "wrong-bearer", "not-bearer"],
)
def test_missing_or_wrong_key_is_401_json(keyed: TestClient, headers: dict[str, str]) -> None:
    r = detect(keyed, headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert "X-API-Key" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "headers", [{"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}], ids=["x-api-key", "bearer"]
)
def test_right_key_passes(keyed: TestClient, headers: dict[str, str]) -> None:
    assert detect(keyed, headers).status_code == 200
    assert keyed.get("/v1/models", headers=headers).status_code == 200


@pytest.mark.parametrize("path", ["/v1/models", "/openapi.json", "/no-such-route"])
def test_every_other_route_needs_the_key(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 401


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_health_and_metrics_stay_open(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_unauthorized_is_counted(keyed: TestClient) -> None:
    detect(keyed)
    lines = keyed.get("/metrics").text.splitlines()
    line = next(x for x in lines if x.startswith('snipserve_rejections_total{reason="unauthorized"}'))
    assert float(line.split()[-1]) >= 1


def test_keys_are_compared_in_constant_time(keyed: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    assert detect(keyed, {"X-API-Key": "guess"}).status_code == 401
    assert seen == [(b"guess", KEY.encode())]


def test_websocket_handshake_without_key_is_refused(keyed: TestClient) -> None:
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as info, keyed.websocket_connect("/v1/stream"):
        pass
    assert info.value.code == 1008


def test_presented_key_prefers_x_api_key() -> None:
    assert presented_key([(b"authorization", b"Bearer b"), (b"x-api-key", b"a")]) == "a"
    assert presented_key([(b"authorization", b"bearer  tok ")]) == "tok"
    assert presented_key([(b"authorization", b"Bearer ")]) is None


def test_api_key_is_a_secret_in_settings() -> None:
    s = Settings(engine="fake", api_key=KEY)
    assert isinstance(s.api_key, SecretStr) and KEY not in repr(s)


# ---- CORS ---------------------------------------------------------------------------------------------
def test_cors_is_off_by_default() -> None:
    with client() as c:
        r = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_cors_allows_only_listed_origins() -> None:
    with client(cors_origins="https://ops.example, https://demo.example", api_key=KEY) as c:
        ok = c.get("/healthz", headers={"Origin": "https://demo.example"})
        assert ok.headers["access-control-allow-origin"] == "https://demo.example"
        other = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        # a browser preflight carries no key; it is answered by CORS, not refused with 401
        pre = c.options(
            "/v1/detect",
            headers={
                "Origin": "https://ops.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "X-API-Key",
            },
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://ops.example"


# ---- model paths --------------------------------------------------------------------------------------
def test_model_path_inside_models_dir_resolves(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert resolve_model_path(Path("m.onnx"), tmp_path) == (tmp_path / "m.onnx").resolve()
    assert resolve_model_path(tmp_path / "sub" / ".." / "m.onnx", tmp_path) == (tmp_path / "m.onnx").resolve()


@pytest.mark.parametrize("escape", ["../outside.onnx", "/etc/passwd", "sub/../../outside.onnx"])
def test_dotdot_and_absolute_escapes_are_refused(tmp_path: Path, escape: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    with pytest.raises(ModelPathError, match="outside the models directory"):
        resolve_model_path(models / escape if not escape.startswith("/") else Path(escape), models)


def test_symlink_escape_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "secret.onnx").write_bytes(b"x")
    os.symlink(tmp_path / "secret.onnx", models / "innocent.onnx")
    with pytest.raises(ModelPathError):
        resolve_model_path(Path("innocent.onnx"), models)


def test_settings_refuse_a_model_outside_models_dir(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="outside the models directory"):
        Settings(models_dir=tmp_path, model_path=tmp_path / ".." / "x.onnx")
    inside = Settings(models_dir=tmp_path, model_path="x.onnx")
    assert inside.model_path == tmp_path.resolve() / "x.onnx"
