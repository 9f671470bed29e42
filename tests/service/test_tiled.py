"""Offline orthomosaic mode: windowed TIFF reading, window grid, GeoTIFF transforms, detection end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from service.decode import DecodeConfig, decode_image
from service.engines.fake import FakeEngine
from service.errors import ImageTooLarge, InvalidOptions
from service.options import DetectOptions
from service.pipeline import Pipeline
from service.tiled import (
    GeoTransform,
    TiffWindowReader,
    TileConfig,
    detect_tiled,
    geo_transform,
    plan_windows,
    to_rgb8,
)
from tests.service.live_server import blob_image

# Objects (x1, y1, x2, y2, colour); the second one straddles the first vertical window border (x = 1024).
OBJECTS = [(100, 100, 130, 130, "red"), (1010, 400, 1040, 430, "green"), (2000, 1500, 2030, 1530, "blue")]
SIZE = (2500, 1800)
ORIGIN = (500_000.0, 4_000_000.0)  # map X, Y of the top-left corner (UTM 33N metres)
GSD = 0.1  # metres per pixel


def geokeys(epsg: int, raster_type: int = 1) -> tuple[int, ...]:
    # header (version 1, revision 1.0, 3 keys), then (key, location 0 = inline, count 1, value)
    return (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, raster_type, 3072, 0, 1, epsg)


def write_geotiff(path: Path, image: np.ndarray, raster_type: int = 1, **kwargs: object) -> None:
    extratags = [
        (33550, "d", 3, (GSD, GSD, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, ORIGIN[0], ORIGIN[1], 0.0), True),
        (34735, "H", 16, geokeys(32633, raster_type), True),
    ]
    tifffile.imwrite(path, image, photometric="rgb", extratags=extratags, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def ortho(tmp_path: Path) -> Path:
    path = tmp_path / "ortho.tif"
    write_geotiff(path, blob_image(SIZE, OBJECTS), tile=(256, 256), compression="zlib")
    return path


def test_geotiff_tiepoint_and_scale_give_an_affine_transform_and_crs(ortho: Path) -> None:
    with tifffile.TiffFile(ortho) as tif:
        geo = geo_transform(tif.pages[0])
    assert geo == GeoTransform(GSD, 0.0, ORIGIN[0], 0.0, -GSD, ORIGIN[1], "EPSG:32633")
    boxes = np.array([[10, 20, 30, 50]], np.float32)
    np.testing.assert_allclose(geo.apply(boxes), [[ORIGIN[0] + 1, ORIGIN[1] - 5, ORIGIN[0] + 3, ORIGIN[1] - 2]])


def test_pixel_is_point_shifts_by_half_a_pixel(tmp_path: Path) -> None:
    path = tmp_path / "point.tif"
    write_geotiff(path, blob_image((64, 64)), raster_type=2)
    with tifffile.TiffFile(path) as tif:
        geo = geo_transform(tif.pages[0])
    assert geo is not None
    assert geo.c == pytest.approx(ORIGIN[0] - GSD / 2) and geo.f == pytest.approx(ORIGIN[1] + GSD / 2)


def test_plain_tiff_has_no_transform(tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, blob_image((64, 64)))
    with tifffile.TiffFile(path) as tif:
        assert geo_transform(tif.pages[0]) is None


@pytest.mark.parametrize(
    ("layout", "kwargs"),
    [
        ("tiled zlib", {"tile": (128, 128), "compression": "zlib"}),
        ("strips zlib", {"rowsperstrip": 37, "compression": "zlib"}),
        ("planar tiled", {"tile": (128, 128), "planarconfig": "separate"}),
        ("contiguous (memory-mapped)", {}),
    ],
)
def test_windows_read_the_same_pixels_as_a_full_read(tmp_path: Path, layout: str, kwargs: dict[str, object]) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (700, 900, 3), dtype=np.uint8)
    path = tmp_path / "img.tif"
    data = np.moveaxis(image, -1, 0) if kwargs.get("planarconfig") == "separate" else image
    tifffile.imwrite(path, data, photometric="rgb", **kwargs)  # type: ignore[arg-type]
    with TiffWindowReader(path) as reader:
        assert reader.memory_mapped == (not kwargs)
        for x0, y0, w, h in [(0, 0, 900, 700), (130, 250, 300, 200), (899, 699, 1, 1), (600, 500, 300, 200)]:
            np.testing.assert_array_equal(reader.read(x0, y0, w, h), image[y0 : y0 + h, x0 : x0 + w], err_msg=layout)


def test_samples_convert_like_the_decode_stage() -> None:
    gray16 = np.array([[0, 65535, 257]], np.uint16)
    np.testing.assert_array_equal(to_rgb8(gray16)[0, :, 0], [0, 255, 1])
    rgba = np.zeros((1, 1, 4), np.uint8)
    assert to_rgb8(rgba).shape == (1, 1, 3)
    np.testing.assert_array_equal(to_rgb8(np.array([[0.5]], np.float32))[0, 0], [128, 128, 128])


@pytest.mark.parametrize(("width", "height"), [(2500, 1800), (1024, 1024), (300, 5000), (100, 100)])
def test_windows_cover_the_image_with_the_overlap(width: int, height: int) -> None:
    config = TileConfig(window=1024, overlap=128)
    windows = plan_windows(width, height, config)
    covered = np.zeros((height, width), bool)
    for x0, y0, w, h in windows:
        assert w == min(1024, width) and h == min(1024, height)
        assert x0 >= 0 and x0 + w <= width and y0 >= 0 and y0 + h <= height
        covered[y0 : y0 + h, x0 : x0 + w] = True
    assert covered.all()
    xs = sorted({x for x, *_ in windows})
    assert all(b - a <= 1024 - 128 for a, b in zip(xs, xs[1:], strict=False))
    with pytest.raises(InvalidOptions, match="overlap"):
        plan_windows(width, height, TileConfig(window=128, overlap=128))


def test_detects_every_object_once_with_map_coordinates_reading_window_by_window(
    ortho: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[int, int]] = []
    original = TiffWindowReader.read

    def spy(self: TiffWindowReader, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        reads.append((w, h))
        return original(self, x0, y0, w, h)

    monkeypatch.setattr(TiffWindowReader, "read", spy)
    progress: list[tuple[int, int]] = []
    body = detect_tiled(
        ortho,
        Pipeline(FakeEngine()),
        DetectOptions(),
        TileConfig(window=1024, overlap=128),
        lambda *p: progress.append(p),
    )
    assert body["image"] == {"width": 2500, "height": 1800} and body["windows"] == 6
    assert all(w * h <= 1024 * 1024 for w, h in reads) and len(reads) == 6
    assert progress[-1] == (6, 6)
    found = sorted((d["label"], d["box"]) for d in body["detections"])
    expected = sorted((c, [float(x1), float(y1), float(x2), float(y2)]) for x1, y1, x2, y2, c in OBJECTS)
    assert found == expected
    assert body["geo"]["crs"] == "EPSG:32633"
    green = next(d for d in body["detections"] if d["label"] == "green")
    x1, y1, x2, y2 = 1010, 400, 1040, 430
    expected_geo = [ORIGIN[0] + x1 * GSD, ORIGIN[1] - y2 * GSD, ORIGIN[0] + x2 * GSD, ORIGIN[1] - y1 * GSD]
    np.testing.assert_allclose(green["geo_box"], expected_geo)
    np.testing.assert_allclose(green["geo_center"], [ORIGIN[0] + 1025 * GSD, ORIGIN[1] - 415 * GSD])


def test_the_service_refuses_it_and_names_the_offline_command(ortho: Path) -> None:
    with pytest.raises(ImageTooLarge) as info:
        decode_image(ortho.read_bytes(), DecodeConfig(max_pixels=1_000_000))
    assert "1.0 MP" in info.value.message and "snipserve detect --tiled" in info.value.message
