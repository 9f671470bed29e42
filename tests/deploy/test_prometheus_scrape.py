"""A real Prometheus server on loopback scrapes the real service and answers PromQL about it.

The service (fake engine) runs under uvicorn in a thread on a pre-bound 127.0.0.1 socket; Prometheus runs
as a subprocess with a temporary config (1 s scrape and rule evaluation, the repo's alert rules) and a
temporary TSDB on another free loopback port. Every loop is bounded; both are always torn down.
"""

from __future__ import annotations

import functools
import json
import math
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.deploy.conftest import DASHBOARD, RULES, fake_settings, png

pytestmark = pytest.mark.slow

P99 = "histogram_quantile(0.99, sum by (le) (rate(snipserve_request_duration_seconds_bucket[1m])))"


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    """The real app under uvicorn on 127.0.0.1:<random>, in a thread."""
    from service.http.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(fake_settings())  # type: ignore[arg-type]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("the service to be ready", lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200, 30)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def prometheus(prometheus_bin: str, service: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus server on 127.0.0.1:<random> scraping ``service`` every second, with our rules."""
    work: Path = tmp_path_factory.mktemp("prometheus")
    target = service.removeprefix("http://")
    (work / "prometheus.yml").write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [{"job_name": "snipserve", "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    proc, url = start_prometheus(prometheus_bin, work)
    try:
        yield url
    finally:
        stop(proc)


class PrometheusExited(Exception):
    """The server process ended while we waited for it (its log is the message)."""


def start_prometheus(binary: str, work: Path, attempts: int = 3) -> tuple[subprocess.Popen[bytes], str]:
    """Start Prometheus on a free loopback port; retry on a new port if another process took it first."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        log_path = work / f"prometheus-{attempt}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=work,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(f"Prometheus on port {port} to be ready", functools.partial(ready, proc, url, log_path), 30)
            return proc, url
        except PrometheusExited as exc:
            stop(proc)
            if "address already in use" not in str(exc) or attempt == attempts:
                raise AssertionError(f"prometheus exited (exit {proc.returncode}):\n{exc}") from None
        except BaseException:
            stop(proc)
            raise
    raise AssertionError("unreachable")


def ready(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> bool:
    if proc.poll() is not None:
        raise PrometheusExited(log_path.read_text())
    response = httpx.get(f"{url}/-/ready", timeout=1)
    # Check it is *our* Prometheus answering (another process could have taken the port).
    return response.status_code == 200 and "Prometheus" in response.text and proc.poll() is None


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


class NotReady(httpx.HTTPError):
    """Prometheus answered 503 (still starting); polling loops retry."""


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5)
    if response.status_code == 503:
        raise NotReady(f"{response.status_code} {response.text[:200]}")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (promql, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


@pytest.fixture(scope="module")
def scraped(prometheus: str, service: str) -> str:
    """Prometheus after it has scraped the service before, during and after some detection traffic."""
    wait_for("the target to be up", lambda: [v for v in finite_values(query(prometheus, "up")) if v == 1], 20)
    images = [png(seed=s) for s in range(4)]
    with httpx.Client(base_url=service, timeout=10) as client:
        end = time.monotonic() + 2.5  # spans several 1 s scrapes, so rate() sees the counters move
        sent = 0
        while time.monotonic() < end or sent < 10:
            response = client.post("/v1/detect", content=images[sent % 4], headers={"content-type": "image/png"})
            assert response.status_code == 200, response.text
            sent += 1
            time.sleep(0.05)
        assert client.post("/v1/detect", content=b"junk", headers={"content-type": "image/png"}).status_code in (
            400,
            415,
        )
    return prometheus


def test_p99_latency_from_prometheus(scraped: str) -> None:
    values = wait_for("a finite p99", lambda: finite_values(query(scraped, P99)), 20)
    assert len(values) == 1 and 0 < values[0] < 30, values
    print(f"p99 request latency through Prometheus: {values[0]:.4f} s")


def test_counters_and_gauges_arrive(scraped: str) -> None:
    detect = wait_for(
        "detect requests in Prometheus",
        lambda: finite_values(query(scraped, 'sum(snipserve_requests_total{route="/v1/detect", status="200"})')),
        10,
    )
    assert detect[0] >= 10
    assert finite_values(query(scraped, "snipserve_ready")) == [1.0]
    assert finite_values(query(scraped, "snipserve_queue_capacity_chips"))[0] > 0
    info = query(scraped, "snipserve_model_info")
    assert info and info[0]["metric"]["engine"] == "fake"


def test_every_dashboard_query_parses_and_the_core_ones_have_data(scraped: str) -> None:
    board = json.loads(DASHBOARD.read_text())
    empty = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            promql = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            result = query(scraped, promql)  # asserts status == success: the expression parses and runs
            # Without a GPU or any 5xx those panels are legitimately empty; everything else must show data.
            if not result and "gpu" not in promql and '"5.."' not in promql:
                empty.append((panel["title"], promql))
    assert not empty, empty


def test_prometheus_loaded_and_evaluates_our_rules(scraped: str) -> None:
    def rules() -> list[dict[str, Any]]:
        body = httpx.get(f"{scraped}/api/v1/rules", timeout=5).json()
        found = [r for g in body["data"]["groups"] for r in g["rules"]]
        return found if found and all(r.get("lastEvaluation", "").startswith("2") for r in found) else []

    found = wait_for("rule evaluation", rules, 10)
    assert len(found) == 8
    assert all(r["health"] == "ok" for r in found), [(r["name"], r.get("lastError")) for r in found]
    firing = [r["name"] for r in found if r["state"] == "firing"]
    assert not firing, firing
