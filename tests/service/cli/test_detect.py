"""``snipserve detect``: in-process and against a live server, NDJSON/COCO output, render, resume, --tiled."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest
import tifffile

from service.cli import main
from tests.service.live_server import blob_image, fake_app, png, serve_in_thread
from tests.service.test_tiled import OBJECTS, SIZE, write_geotiff

IMAGES = {
    "a.png": [(20, 20, 50, 50, "red")],
    "b.png": [(20, 20, 50, 50, "green"), (100, 100, 130, 130, "blue")],
    "sub/c.png": [(60, 60, 90, 90, "blue")],
}


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for name, boxes in IMAGES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png(blob_image((200, 160), boxes)))
    return root


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(fake_app()) as url:
        yield url


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def labels(record: dict[str, Any]) -> list[str]:
    return sorted(d["label"] for d in record["result"]["detections"])


def test_in_process_directory_to_ndjson_with_render(image_dir: Path, tmp_path: Path) -> None:
    out, render = tmp_path / "out.ndjson", tmp_path / "render"
    code = main(["detect", str(image_dir), "--engine", "fake", "-o", str(out), "--render", str(render), "-q"])
    assert code == 0
    recs = records(out)
    assert [r["frame"] for r in recs] == ["a.png", "b.png", "sub/c.png"]  # sorted, relative to the directory
    assert [r["image_id"] for r in recs] == [0, 1, 2]
    assert [labels(r) for r in recs] == [["red"], ["blue", "green"], ["blue"]]
    assert recs[1]["result"]["detections"][0]["box"] in ([20.0, 20.0, 50.0, 50.0], [100.0, 100.0, 130.0, 130.0])
    drawn = cv2.imread(str(render / "b.png.jpg"))
    assert drawn is not None and drawn.shape == (160, 200, 3)
    assert sorted(p.name for p in render.iterdir()) == ["a.png.jpg", "b.png.jpg", "sub__c.png.jpg"]


def test_rerun_resumes_skipping_frames_in_the_output(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.ndjson"
    (image_dir / "sub/c.png").rename(tmp_path / "c.png")
    assert main(["detect", str(image_dir), "--engine", "fake", "-o", str(out), "-q"]) == 0
    with out.open("a") as f:
        f.write('{"frame": "sub/c.png", "image_id": 2, "res')  # a crash mid-write
    (tmp_path / "c.png").rename(image_dir / "sub/c.png")
    capsys.readouterr()
    assert main(["detect", str(image_dir), "--engine", "fake", "-o", str(out), "-q"]) == 0
    assert "1 images done, 2 already in the output, 0 errors" in capsys.readouterr().err
    assert [r["frame"] for r in records(out)] == ["a.png", "b.png", "sub/c.png"]


def test_against_a_server_matches_in_process_and_writes_coco(base_url: str, image_dir: Path, tmp_path: Path) -> None:
    local, remote, coco = tmp_path / "local.ndjson", tmp_path / "remote.ndjson", tmp_path / "coco.json"
    assert main(["detect", str(image_dir), "--engine", "fake", "-o", str(local), "-q", "--score-threshold", "0.5"]) == 0
    assert main(["detect", str(image_dir), "--url", base_url, "-o", str(remote), "-q", "--score-threshold", "0.5"]) == 0
    for a, b in zip(records(local), records(remote), strict=True):
        assert a["frame"] == b["frame"] and a["result"]["detections"] == b["result"]["detections"]
    assert main(["detect", str(image_dir), "--url", base_url, "--format", "coco", "-o", str(coco), "-q"]) == 0
    results = json.loads(coco.read_text())
    assert sorted((r["image_id"], r["category_id"]) for r in results) == [(0, 0), (1, 1), (1, 2), (2, 2)]
    assert {"image_id": 0, "category_id": 0, "bbox": [20.0, 20.0, 30.0, 30.0], "score": 0.9} in results


def test_bad_inputs_are_error_records_or_usage_errors(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (image_dir / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out.ndjson"
    assert main(["detect", str(image_dir), "--engine", "fake", "-o", str(out), "-q"]) == 1
    broken = next(r for r in records(out) if r["frame"] == "broken.png")
    assert broken["error"]["code"] == "bad_image"
    assert main(["detect", str(tmp_path / "missing.png"), "--engine", "fake", "-q"]) == 2
    assert main(["detect", str(image_dir), "--engine", "fake", "--preset", "nope", "-q"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_tiled_geotiff_reports_pixel_and_map_coordinates(tmp_path: Path) -> None:
    ortho, out = tmp_path / "ortho.tif", tmp_path / "ortho.ndjson"
    write_geotiff(ortho, blob_image(SIZE, OBJECTS), tile=(256, 256), compression="zlib")
    args = ["detect", str(ortho), "--tiled", "--window", "1024", "--overlap", "128", "--engine", "fake"]
    assert main([*args, "-o", str(out), "-q"]) == 0
    (record,) = records(out)
    result = record["result"]
    assert result["windows"] == 6 and result["geo"]["crs"] == "EPSG:32633"
    assert sorted(d["label"] for d in result["detections"]) == ["blue", "green", "red"]
    assert all(len(d["geo_box"]) == 4 for d in result["detections"])


def test_huge_image_without_tiled_names_the_offline_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNIPSERVE_MAX_IMAGE_PIXELS", "10000")
    big, out = tmp_path / "big.tif", tmp_path / "out.ndjson"
    tifffile.imwrite(big, blob_image((200, 200)))
    assert main(["detect", str(big), "--engine", "fake", "-o", str(out), "-q"]) == 1
    (record,) = records(out)
    assert record["error"]["code"] == "too_large" and "snipserve detect --tiled" in record["error"]["message"]
