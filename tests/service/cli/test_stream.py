"""``snipserve stream``: a directory and a video over WS /v1/stream against a live server; resume; COCO."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from service.cli import main
from tests.service.live_server import blob_image, fake_app, png, serve_in_thread


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(fake_app()) as url:
        yield url


def frames_dir(root: Path, n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = 10 + 12 * i
        (root / f"f{i:03d}.png").write_bytes(png(blob_image((192, 128), [(x, 30, x + 24, 54, "red")])))
    return root


def test_directory_streams_in_order_and_resumes(
    base_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out, render = frames_dir(tmp_path / "frames", 6), tmp_path / "out.ndjson", tmp_path / "render"
    args = ["stream", str(src), "--url", base_url, "--window", "2", "-o", str(out), "-q"]
    assert main([*args, "--render", str(render)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in recs] == [f"f{i:03d}.png" for i in range(6)]
    assert [r["result"]["detections"][0]["box"][0] for r in recs] == [10.0 + 12 * i for i in range(6)]
    assert len(list(render.iterdir())) == 6
    frames_dir(tmp_path / "frames", 8)  # two new frames
    capsys.readouterr()
    assert main(args) == 0
    assert "2 frames done, 6 already in the output, 0 errors" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 8


def test_video_frames_stream_to_coco(base_url: str, tmp_path: Path) -> None:
    video, coco = tmp_path / "clip.avi", tmp_path / "coco.json"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (192, 128))
    for i in range(5):
        writer.write(
            cv2.cvtColor(blob_image((192, 128), [(20 + 20 * i, 40, 50 + 20 * i, 70, "green")]), cv2.COLOR_RGB2BGR)
        )
    writer.release()
    assert main(["stream", str(video), "--url", base_url, "--format", "coco", "-o", str(coco), "-q"]) == 0
    results = json.loads(coco.read_text())
    assert [r["image_id"] for r in results] == [0, 1, 2, 3, 4]
    assert all(r["category_id"] == 1 for r in results)
    assert [round(r["bbox"][0] / 20) for r in results] == [1, 2, 3, 4, 5]  # JPEG edges: about 20 + 20 i
    journal = [json.loads(line) for line in Path(f"{coco}.frames.ndjson").read_text().splitlines()]
    assert [r["frame"] for r in journal] == [f"frame_{i:06d}" for i in range(5)]


def test_unreachable_server_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = frames_dir(tmp_path / "frames", 1)
    assert main(["stream", str(src), "--url", "http://127.0.0.1:9", "-q"]) == 1
    assert "connection_error" in capsys.readouterr().err
