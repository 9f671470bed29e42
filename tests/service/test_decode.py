"""Tests for ``service.decode``: every image is generated here with Pillow/OpenCV/NumPy/tifffile."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from PIL import Image, ImageOps
from pydantic import ValidationError

from service.decode import DecodeConfig, ImageInfo, decode_image, probe_image
from service.errors import BadImage, ImageTooLarge, SnipserveError, UnsupportedMediaType

CONFIG = DecodeConfig()
U8 = NDArray[np.uint8]


# ---------------------------------------------------------------------------------------------- factories


def smooth_rgb(h: int = 48, w: int = 64, seed: int = 0) -> U8:
    """``(h, w, 3) uint8``: gradients plus mild noise, so lossy codecs stay close to the source."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    wave = 127 + 100 * np.sin(x / 7) * np.cos(y / 9)
    img = np.stack([x / max(w - 1, 1) * 255, y / max(h - 1, 1) * 255, wave], axis=-1)
    return np.clip(img + rng.normal(0, 1, img.shape), 0, 255).astype(np.uint8)


def random_rgb(h: int = 24, w: int = 32, seed: int = 0) -> U8:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encode(image: Image.Image | U8, fmt: str, **kwargs: Any) -> bytes:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def encode_tiff(array: NDArray[Any], **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    kwargs.setdefault("photometric", "rgb" if array.ndim == 3 else "minisblack")
    tifffile.imwrite(buf, array, **kwargs)
    return buf.getvalue()


def encode_cv2(array: NDArray[Any], ext: str) -> bytes:
    """OpenCV encoder; ``array`` is RGB (converted to OpenCV's BGR here)."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(array))
    assert ok
    return bytes(buf.tobytes())


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def with_orientation(image: U8, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    kwargs: dict[str, Any] = {"quality": 95} if fmt == "JPEG" else {}
    return encode(image, fmt, exif=exif, **kwargs)


def expect_valid(array: U8, h: int, w: int) -> None:
    assert array.shape == (h, w, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous


def mean_abs_diff(a: U8, b: U8) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------------------------------------- config


def test_config_is_frozen_and_constrained() -> None:
    assert CONFIG.max_bytes == 50 * 1024**2
    assert CONFIG.max_pixels == 64_000_000
    with pytest.raises(ValidationError):
        DecodeConfig(max_pixels=0)
    with pytest.raises(ValidationError):
        DecodeConfig(max_bytes=-1)
    with pytest.raises(ValidationError):
        DecodeConfig(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        CONFIG.max_bytes = 1


# ---------------------------------------------------------------------------------------------- formats

LOSSLESS: dict[str, Callable[[U8], bytes]] = {
    "png": lambda a: encode(a, "PNG"),
    "png-opencv": lambda a: encode_cv2(a, ".png"),
    "bmp": lambda a: encode(a, "BMP"),
    "tiff-raw": lambda a: encode(a, "TIFF"),
    "tiff-lzw": lambda a: encode(a, "TIFF", compression="tiff_lzw"),
    "tiff-deflate": lambda a: encode_tiff(a, compression="zlib"),
    "webp-lossless": lambda a: encode(a, "WEBP", lossless=True),
}


@pytest.mark.parametrize("name", list(LOSSLESS))
def test_lossless_formats_round_trip_exactly(name: str) -> None:
    source = random_rgb(23, 37)
    out = decode_image(LOSSLESS[name](source), CONFIG)
    expect_valid(out, 23, 37)
    np.testing.assert_array_equal(out, source)


@pytest.mark.parametrize(
    ("fmt", "kwargs", "tolerance"),
    [("JPEG", {"quality": 95}, 3.0), ("WEBP", {"quality": 90}, 4.0)],
)
def test_lossy_formats_round_trip_approximately(fmt: str, kwargs: dict[str, Any], tolerance: float) -> None:
    source = smooth_rgb(60, 80)
    out = decode_image(encode(source, fmt, **kwargs), CONFIG)
    expect_valid(out, 60, 80)
    assert mean_abs_diff(out, source) < tolerance


def test_gif_palette_round_trips_exactly() -> None:
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 16, (20, 30), dtype=np.uint8)
    palette = rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist()
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette)
    out = decode_image(encode(image, "GIF"), CONFIG)
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_give_the_first_frame(fmt: str) -> None:
    first, second = random_rgb(16, 16, seed=2) // 64 * 64, 255 - random_rgb(16, 16, seed=3) // 64 * 64
    frames = [Image.fromarray(first), Image.fromarray(second)]
    kwargs: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kwargs)
    out = decode_image(data, CONFIG)
    expect_valid(out, 16, 16)
    assert mean_abs_diff(out, first) < mean_abs_diff(out, second)
    if fmt == "WEBP":
        np.testing.assert_array_equal(out, first)


@pytest.mark.parametrize(
    ("fmt", "data_for"),
    [
        ("JPEG", lambda a: encode(a, "JPEG")),
        ("PNG", lambda a: encode(a, "PNG")),
        ("TIFF", lambda a: encode(a, "TIFF")),
        ("WEBP", lambda a: encode(a, "WEBP", lossless=True)),
        ("WEBP", lambda a: encode(a, "WEBP", quality=80)),
        ("BMP", lambda a: encode(a, "BMP")),
        ("GIF", lambda a: encode(a, "GIF")),
    ],
)
def test_probe_reads_the_header(fmt: str, data_for: Callable[[U8], bytes]) -> None:
    data = data_for(random_rgb(21, 34))
    assert probe_image(data, CONFIG) == ImageInfo(
        format=fmt, width=34, height=21, orientation=1, bit_depth=8, n_bytes=len(data)
    )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP", "BMP", "GIF"])
@pytest.mark.parametrize(("h", "w"), [(1, 1), (2, 10000), (10000, 2)])
def test_tiny_and_extreme_aspect_images(fmt: str, h: int, w: int) -> None:
    if fmt == "WEBP" and max(h, w) > 16383:
        pytest.skip("WebP is limited to 16383 px per side")
    source = np.full((h, w, 3), (200, 100, 50), dtype=np.uint8)
    kwargs: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(source, fmt, **kwargs), CONFIG)
    expect_valid(out, h, w)
    assert mean_abs_diff(out, source) < 3


# ---------------------------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(orientation: int) -> None:
    data = with_orientation(random_rgb(5, 7), orientation, "PNG")
    with Image.open(io.BytesIO(data)) as im:
        reference = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    out = decode_image(data, CONFIG)
    np.testing.assert_array_equal(out, reference)
    info = probe_image(data, CONFIG)
    assert (info.height, info.width, info.orientation) == (*reference.shape[:2], orientation)


# Orientation tag → how a viewer shows the stored pixels, written independently of the module.
DISPLAYED: dict[int, Callable[[U8], U8]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180°
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed (main diagonal)
    6: lambda a: np.rot90(a, k=-1),  # stored rotated 90° CCW, shown turned 90° clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transverse (anti-diagonal)
    8: lambda a: np.rot90(a, k=1),  # shown turned 90° counter-clockwise
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientations_give_shape_and_layout(fmt: str, orientation: int) -> None:
    # A 40x60 image whose top-left quadrant is white and the rest black: a lossy-proof marker.
    source = np.zeros((40, 60, 3), dtype=np.uint8)
    source[:20, :30] = 255
    source[30:, 50:] = (255, 0, 0)  # a second, coloured marker: distinguishes all 8 orientations
    if fmt == "TIFF":
        data = encode_tiff(source, extratags=[(274, "H", 1, orientation, True)])
    else:
        data = with_orientation(source, orientation, fmt)
    expected = DISPLAYED[orientation](source)
    out = decode_image(data, CONFIG)
    expect_valid(out, *expected.shape[:2])
    assert mean_abs_diff(out, expected) < 4
    info = probe_image(data, CONFIG)
    assert (info.height, info.width, info.orientation) == (*expected.shape[:2], orientation)


def test_deep_tiff_orientation_is_applied_once() -> None:
    # 16-bit RGB TIFF goes through OpenCV, whose libtiff path would rotate it a second time.
    source = (random_rgb(6, 9).astype(np.uint16) * 257)[:, :, :3]
    data = encode_tiff(source, extratags=[(274, "H", 1, 6, True)])
    np.testing.assert_array_equal(decode_image(data, CONFIG), np.rot90(random_rgb(6, 9), k=-1))


def test_orientation_can_be_ignored() -> None:
    data = with_orientation(random_rgb(5, 7), 6, "PNG")
    config = DecodeConfig(apply_exif_orientation=False)
    np.testing.assert_array_equal(decode_image(data, config), random_rgb(5, 7))
    assert (probe_image(data, config).width, probe_image(data, config).height) == (7, 5)


def test_exif_orientation_out_of_range_reads_as_upright() -> None:
    data = with_orientation(random_rgb(5, 7), 42, "JPEG")
    assert probe_image(data, CONFIG).orientation == 1
    expect_valid(decode_image(data, CONFIG), 5, 7)


# ---------------------------------------------------------------------------------------------- colour modes


def test_grayscale_is_replicated() -> None:
    gray = random_rgb()[:, :, 0]
    for data in (encode(gray, "PNG"), encode(gray, "TIFF"), encode(gray, "BMP")):
        np.testing.assert_array_equal(decode_image(data, CONFIG), np.repeat(gray[:, :, None], 3, axis=2))


def test_gray_alpha_and_rgba_drop_alpha_without_compositing() -> None:
    rgb = random_rgb()
    alpha = np.zeros(rgb.shape[:2], dtype=np.uint8)  # fully transparent: colour must survive untouched
    alpha[::2] = 128
    rgba = np.dstack([rgb, alpha])
    np.testing.assert_array_equal(decode_image(encode(rgba, "PNG"), CONFIG), rgb)
    np.testing.assert_array_equal(decode_image(encode(rgba, "TIFF"), CONFIG), rgb)
    np.testing.assert_array_equal(decode_image(encode(rgba, "WEBP", lossless=True, exact=True), CONFIG), rgb)
    la = Image.fromarray(np.dstack([rgb[:, :, 0], alpha]), mode="LA")
    np.testing.assert_array_equal(decode_image(encode(la, "PNG"), CONFIG), np.repeat(rgb[:, :, :1], 3, axis=2))


@pytest.mark.parametrize("transparency", [None, 0])
def test_palette_images_are_expanded(transparency: int | None) -> None:
    image = Image.fromarray(random_rgb()).quantize(colors=32)
    kwargs: dict[str, Any] = {} if transparency is None else {"transparency": transparency}
    out = decode_image(encode(image, "PNG", **kwargs), CONFIG)
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_transparent_palette_entries_keep_their_stored_colour(fmt: str) -> None:
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 16, (20, 30), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(rng.integers(30, 256, 48, dtype=np.uint8).tolist())
    out = decode_image(encode(image, fmt, transparency=3), CONFIG)
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))


def test_bilevel_image() -> None:
    bits = random_rgb()[:, :, 0] > 127
    out = decode_image(encode(Image.fromarray(bits), "PNG"), CONFIG)
    np.testing.assert_array_equal(out, np.repeat(bits[:, :, None], 3, axis=2).astype(np.uint8) * 255)


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    source = smooth_rgb()
    data = encode(Image.fromarray(source).convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "CMYK"
    out = decode_image(data, CONFIG)
    expect_valid(out, *source.shape[:2])
    assert mean_abs_diff(out, source) < 4


SIXTEEN = np.array([[0, 1, 128, 129, 257, 30000, 65279, 65535]], dtype=np.uint16)
SIXTEEN_AS_8 = np.array([[0, 0, 0, 1, 1, 117, 254, 255]], dtype=np.uint8)  # round(v / 257)


@pytest.mark.parametrize(
    "encoder",
    [lambda a: encode_cv2(a, ".png"), lambda a: encode_tiff(a), lambda a: encode(Image.fromarray(a), "TIFF")],
    ids=["png", "tiff", "tiff-pillow"],
)
def test_16_bit_gray_is_scaled_not_clipped(encoder: Callable[[NDArray[np.uint16]], bytes]) -> None:
    out = decode_image(encoder(SIXTEEN), CONFIG)
    np.testing.assert_array_equal(out, np.repeat(SIXTEEN_AS_8[:, :, None], 3, axis=2))
    assert probe_image(encoder(SIXTEEN), CONFIG).bit_depth == 16


@pytest.mark.parametrize("encoder", [lambda a: encode_cv2(a, ".png"), encode_tiff], ids=["png", "tiff"])
def test_16_bit_rgb_and_rgba_are_scaled_in_rgb_order(encoder: Callable[[NDArray[np.uint16]], bytes]) -> None:
    rgb = np.stack([SIXTEEN, SIXTEEN[:, ::-1], np.full_like(SIXTEEN, 65535)], axis=-1)
    expected = np.stack([SIXTEEN_AS_8, SIXTEEN_AS_8[:, ::-1], np.full_like(SIXTEEN_AS_8, 255)], axis=-1)
    np.testing.assert_array_equal(decode_image(encoder(rgb), CONFIG), expected)
    rgba = np.dstack([rgb, np.zeros_like(SIXTEEN)])
    np.testing.assert_array_equal(decode_image(encoder(rgba), CONFIG), expected)


def test_float_tiff_in_unit_range_is_scaled_by_255() -> None:
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    out = decode_image(encode_tiff(values), CONFIG)
    np.testing.assert_array_equal(out[0, :, 0], [0, 64, 128, 255])
    rgb = np.stack([values, values[:, ::-1], values * 0], axis=-1)
    out = decode_image(encode_tiff(rgb), CONFIG)
    np.testing.assert_array_equal(out[0], [[0, 255, 0], [64, 128, 0], [128, 64, 0], [255, 0, 0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_tiff_outside_unit_range_is_min_max_normalised(dtype: type[np.floating[Any]]) -> None:
    values = np.array([[-10.0, 0.0, 10.0, np.nan, np.inf, 30.0]], dtype=dtype)  # an elevation model
    out = decode_image(encode_tiff(values), CONFIG)
    # finite range [-10, 30]; NaN/inf read as 0 -> 63.75
    np.testing.assert_array_equal(out[0, :, 0], [0, 64, 128, 64, 64, 255])


def test_constant_float_image_is_black_not_an_error() -> None:
    out = decode_image(encode_tiff(np.full((3, 4), 7.5, dtype=np.float32)), CONFIG)
    assert not out.any()


# ---------------------------------------------------------------------------------------------- limits


def png_bomb(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose IHDR declares ``width x height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_bomb() -> bytes:
    data = bytearray(encode(random_rgb(8, 8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 65000, 65000)  # SOF0: length(2) precision(1) height width
    return bytes(data)


def bmp_bomb() -> bytes:
    data = bytearray(encode(random_rgb(8, 8), "BMP"))
    struct.pack_into("<ii", data, 18, 100_000, 100_000)
    return bytes(data)


def gif_bomb() -> bytes:
    data = bytearray(encode(random_rgb(8, 8), "GIF"))
    struct.pack_into("<HH", data, 6, 65535, 65535)  # logical screen size
    return bytes(data)


def webp_bomb() -> bytes:
    data = bytearray(encode(random_rgb(8, 8), "WEBP", lossless=True))
    # VP8L: signature 0x2f, then 14 bits width-1 and 14 bits height-1.
    bits = (16383 - 1) | ((16383 - 1) << 14) | (int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1))
    struct.pack_into("<I", data, 21, bits)
    return bytes(data)


def webp_vp8x_bomb() -> bytes:
    # Extended header declaring a 100000x100000 canvas around a tiny frame.
    frame = encode(random_rgb(8, 8), "WEBP", lossless=True)[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (99_999).to_bytes(3, "little") * 2
    body = b"WEBP" + vp8x + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


BOMBS: dict[str, tuple[Callable[[], bytes], str]] = {
    "png": (lambda: png_bomb(100_000, 100_000), "100000x100000 = 10000.0 MP"),
    "jpeg": (jpeg_bomb, "65000x65000 = 4225.0 MP"),
    "bmp": (bmp_bomb, "100000x100000 = 10000.0 MP"),
    "gif": (gif_bomb, "65535x65535 = 4294.8 MP"),
    "webp-vp8l": (webp_bomb, "16383x16383 = 268.4 MP"),
    "webp-vp8x": (webp_vp8x_bomb, "100000x100000 = 10000.0 MP"),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_decompression_bombs_are_refused_from_the_header(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make, declared = BOMBS[name]
    data = make()
    assert len(data) < 2000

    def no_decode(*args: object) -> None:
        raise AssertionError("the pixel decoder must not run for a bomb")

    monkeypatch.setattr(cv2, "imdecode", no_decode)
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLarge) as excinfo:
            decode_image(data, CONFIG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024**2
    message = excinfo.value.message
    assert declared in message
    assert "above the limit of 64.0 MP (SNIPSERVE_MAX_IMAGE_PIXELS)" in message
    assert "`snipserve detect --tiled` / offline mode" in message
    assert excinfo.value.status == 413


def test_pixel_limit_is_inclusive() -> None:
    data = encode(random_rgb(10, 10), "PNG")
    expect_valid(decode_image(data, DecodeConfig(max_pixels=100)), 10, 10)
    with pytest.raises(ImageTooLarge, match=r"10x10 = 0\.0 MP, above the limit of 0\.0 MP"):
        probe_image(data, DecodeConfig(max_pixels=99))


def test_byte_limit_is_checked_before_anything_else() -> None:
    data = encode(random_rgb(), "PNG")
    config = DecodeConfig(max_bytes=len(data) - 1)
    with pytest.raises(ImageTooLarge) as excinfo:
        decode_image(data, config)
    assert f"({len(data)} bytes)" in excinfo.value.message
    assert f"({len(data) - 1} bytes, SNIPSERVE_MAX_IMAGE_BYTES)" in excinfo.value.message
    with pytest.raises(ImageTooLarge):
        decode_image(b"not an image at all", DecodeConfig(max_bytes=4))
    expect_valid(decode_image(data, DecodeConfig(max_bytes=len(data))), 24, 32)


# ---------------------------------------------------------------------------------------------- bad input


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: int(len(data) * fraction)]


BAD_INPUTS: dict[str, tuple[Callable[[], bytes], type[SnipserveError], str]] = {
    "empty": (lambda: b"", BadImage, "empty body"),
    "jpeg-truncated": (lambda: truncated(encode(smooth_rgb(), "JPEG")), BadImage, "JPEG image"),
    "jpeg-header-only": (lambda: encode(smooth_rgb(), "JPEG")[:120], BadImage, "JPEG image"),
    "jpeg-magic-only": (lambda: b"\xff\xd8", BadImage, "truncated"),
    "png-truncated": (lambda: truncated(encode(random_rgb(), "PNG")), BadImage, "PNG image"),
    "png-signature-only": (lambda: b"\x89PNG\r\n\x1a\n", BadImage, "PNG image"),
    "png-bad-crc": (lambda: png_bomb(4, 4)[:29] + b"\x00\x00\x00\x00" + png_bomb(4, 4)[33:], BadImage, "PNG"),
    "png-zero-width": (lambda: png_bomb(0, 10), BadImage, "PNG"),
    "gif-truncated": (lambda: truncated(encode(random_rgb(), "GIF"), 0.3), BadImage, "GIF image"),
    "webp-truncated": (lambda: truncated(encode(random_rgb(), "WEBP")), BadImage, "WEBP image"),
    "tiff-truncated": (lambda: truncated(encode_tiff(random_rgb()), 0.5), BadImage, "TIFF image"),
    "random": (
        lambda: np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        BadImage,
        "not an image: unrecognised leading bytes",
    ),
    "text": (lambda: b"hello, this is a plain text file\n", BadImage, "looks like text"),
    "json": (lambda: b'{"image": "base64..."}', BadImage, "looks like text"),
    "pdf": (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", UnsupportedMediaType, "PDF is not accepted"),
    "heic": (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", UnsupportedMediaType, "HEIC"),
    "svg": (
        lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
        UnsupportedMediaType,
        "SVG",
    ),
    "zip": (lambda: b"PK\x03\x04" + b"\x00" * 40, UnsupportedMediaType, "archive"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_maps_to_a_client_error_with_a_clear_message(name: str) -> None:
    make, error, fragment = BAD_INPUTS[name]
    data = make()
    with pytest.raises(error) as excinfo:
        decode_image(data, CONFIG)
    assert fragment in excinfo.value.message
    assert excinfo.value.status in (400, 415)


def test_truncated_jpeg_says_truncated() -> None:
    with pytest.raises(BadImage, match="truncated"):
        decode_image(truncated(encode(smooth_rgb(), "JPEG")), CONFIG)


def test_jpeg_with_trailing_bytes_still_decodes() -> None:
    # Phones append data after the JPEG end marker (e.g. motion-photo video); that is a valid image.
    data = encode(smooth_rgb(), "JPEG", quality=95) + b"\x00\x00\x00\x18ftypmp42" + bytes(200)
    out = decode_image(data, CONFIG)
    assert mean_abs_diff(out, smooth_rgb()) < 3


def test_png_chunk_claiming_more_bytes_than_sent_never_reaches_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    # OpenCV allocates a chunk's declared length up front: 137 bytes claiming a 2.6 GB IDAT took ~1 s.
    data = bytearray(encode(random_rgb(), "PNG"))
    idat = data.index(b"IDAT") - 4
    struct.pack_into(">I", data, idat, 0x9B0017A3)

    def no_decode(*args: object) -> None:
        raise AssertionError("OpenCV must not see a PNG with an impossible chunk length")

    monkeypatch.setattr(cv2, "imdecode", no_decode)
    # All pixel data is present, only the length lies: Pillow's streaming reader decodes it.
    np.testing.assert_array_equal(decode_image(bytes(data), CONFIG), random_rgb())
    with pytest.raises(BadImage, match="PNG"):
        decode_image(bytes(data[:-40]), CONFIG)


def test_unsupported_tiff_layout_is_415() -> None:
    data = encode_tiff(np.zeros((4, 4, 6), dtype=np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises((UnsupportedMediaType, BadImage)):
        decode_image(data, CONFIG)


# ---------------------------------------------------------------------------------------------- property

MAGICS = [
    b"",
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x01\x00\x00WEBP",
    b"GIF89a",
    b"BM",
]
VALID_SAMPLES = [
    encode(random_rgb(6, 5), "JPEG"),
    encode(random_rgb(6, 5), "PNG"),
    encode(random_rgb(6, 5), "TIFF"),
    encode(random_rgb(6, 5), "WEBP"),
    encode(random_rgb(6, 5), "BMP"),
    encode(random_rgb(6, 5), "GIF"),
]


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf[: max(1, len(buf) - cut)])


hostile_bytes = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda m, b: m + b, st.sampled_from(MAGICS), st.binary(max_size=512)),
    st.builds(
        mutate,
        st.sampled_from(VALID_SAMPLES),
        st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
        st.integers(0, 300),
    ),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_bytes)
def test_any_bytes_give_an_image_or_a_snipserve_error(data: bytes) -> None:
    config = DecodeConfig(max_pixels=1_000_000)
    try:
        out = decode_image(data, config)
    except SnipserveError as exc:
        assert exc.status in (400, 413, 415)
        assert exc.message
        return
    assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8 and out.flags.c_contiguous
    assert out.shape[0] * out.shape[1] <= config.max_pixels


# ---- TIFF layouts Pillow and OpenCV refuse or misread (issue 12) --------------------------------------

RGB_SMALL = np.random.default_rng(12).integers(0, 256, (20, 30, 3), np.uint8)


@pytest.mark.parametrize("compression", [None, "lzw", "zlib"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_planar_separate_rgb_tiff_decodes_like_contiguous(dtype: str, compression: str | None) -> None:
    scale = {"uint8": 1, "uint16": 257, "float32": 1 / 255}[dtype]
    pixels = (RGB_SMALL.astype(np.float64) * scale).astype(dtype)
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, np.moveaxis(pixels, 2, 0), planarconfig="separate", photometric="rgb", compression=compression
    )
    np.testing.assert_array_equal(decode_image(buf.getvalue(), DecodeConfig()), RGB_SMALL)


@pytest.mark.parametrize("shape", [(20, 30, 3), (20, 30)])
def test_float16_tiff_decodes(shape: tuple[int, ...]) -> None:
    pixels = RGB_SMALL[..., : shape[-1] if len(shape) == 3 else 1].reshape(shape)
    buf = io.BytesIO()
    tifffile.imwrite(buf, (pixels / 255).astype(np.float16), photometric="rgb" if len(shape) == 3 else None)
    out = decode_image(buf.getvalue(), DecodeConfig())
    expected = pixels if len(shape) == 3 else np.repeat(pixels[..., None], 3, axis=2)
    assert out.shape == (20, 30, 3)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1  # float16 keeps ~11 bits: at most 1 level off


@pytest.mark.parametrize(
    ("array", "kwargs", "word"),
    [
        (np.zeros((20, 30, 5), np.uint8), {"planarconfig": "contig", "photometric": "minisblack"}, "5 samples"),
        (np.zeros((5, 20, 30), np.uint8), {"planarconfig": "separate", "photometric": "minisblack"}, "5 samples"),
        (np.zeros((20, 30), np.complex64), {}, "complex"),
    ],
    ids=["5-channel", "5-channel-planar", "complex"],
)
def test_unsupported_tiff_layouts_are_415(array: np.ndarray, kwargs: dict[str, Any], word: str) -> None:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kwargs)
    with pytest.raises(UnsupportedMediaType, match=word):
        decode_image(buf.getvalue(), DecodeConfig())
    with pytest.raises(UnsupportedMediaType, match=word):
        probe_image(buf.getvalue(), DecodeConfig())  # refused from the header, before decoding
