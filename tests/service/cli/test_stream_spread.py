"""``snipserve stream --url A --url B --connections N``: frames spread over two real server processes, one of
which is drained with SIGTERM mid-stream; the output holds every frame exactly once, each with its own result."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.cli import main
from tests.service.live_server import blob_image, png
from tests.snipserve_client.test_spread import replicas


def chips_done(url: str) -> int:
    """``snipserve_chips_total`` of a replica (0 while it cannot be scraped)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0
    match = re.search(r"^snipserve_chips_total (\S+)$", text, flags=re.M)
    return int(float(match.group(1))) if match else 0


FRAMES = 24
CHIPS_PER_FRAME = 5  # 320x128 under the fake card's default levels (its plan)


def frames_dir(root: Path, n: int) -> Path:
    """Frame i: a red blob at x = 10 + 12i, so each result shows which frame it belongs to."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = 10 + 12 * i
        (root / f"f{i:03d}.png").write_bytes(png(blob_image((320, 128), [(x, 30, x + 24, 54, "red")])))
    return root


def test_stream_over_two_replicas_survives_a_drain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = frames_dir(tmp_path / "frames", FRAMES), tmp_path / "out.ndjson"
    frames_at_signal: list[int] = []
    with replicas(tmp_path, 2, delay=0.1) as (drained, other):

        def drain_after_a_few() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # SIGTERM once the replica ran about 4 frames
                if chips_done(drained.url) >= 4 * CHIPS_PER_FRAME:
                    drained.proc.send_signal(signal.SIGTERM)
                    frames_at_signal.append((chips_done(drained.url) + chips_done(other.url)) // CHIPS_PER_FRAME)
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=drain_after_a_few)
        killer.start()
        args = ["stream", str(src), "--url", drained.url, "--url", other.url, "--connections", "2", "--window", "2"]
        code = main([*args, "-o", str(out), "-q"])
        killer.join()
        assert drained.proc.wait(15) == 0 and other.proc.poll() is None  # one drained and exited, one still up
    assert code == 0, capsys.readouterr().err
    assert frames_at_signal and frames_at_signal[0] < FRAMES - 4  # the drain came mid-stream (frames done then)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in records] == [f"f{i:03d}.png" for i in range(FRAMES)]  # each once, in order
    assert [r["result"]["detections"][0]["box"][0] for r in records] == [10.0 + 12 * i for i in range(FRAMES)]


def test_drop_oldest_refuses_several_connections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = frames_dir(tmp_path / "frames", 1)
    args = ["stream", str(src), "--url", "http://127.0.0.1:9", "--connections", "2", "--policy", "drop_oldest"]
    assert main(args) == 2
    assert "drop_oldest streams over one connection" in capsys.readouterr().err
