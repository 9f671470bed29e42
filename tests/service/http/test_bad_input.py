"""A corpus of bad and odd requests, every one generated here, each answered with its documented status
and message while the service stays ready.

Documented answers (``service/decode.py``, ``service/api.py``): not an image / empty / truncated -> 400
``bad_image``; a real format we do not take, or a non-image content type -> 415 ``unsupported_media_type``;
over the byte or pixel limit (decompression bombs included) -> 413 ``too_large``; bad options -> 422
``invalid_options``. Odd but valid images (1x1, extreme aspect ratios, 16-bit, CMYK, palette, animated,
EXIF-rotated) are decoded by the documented conversion rules and answered 200.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.http.app import create_app
from service.settings import Settings

MAX_BYTES = 200_000
MAX_PIXELS = 4_000_000
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 255, (64, 64, 3), np.uint8)


def pil_bytes(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def jpeg(array: np.ndarray = RGB) -> bytes:
    return pil_bytes(Image.fromarray(array), "JPEG")


def png(array: np.ndarray = RGB) -> bytes:
    return pil_bytes(Image.fromarray(array), "PNG")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width x height`` RGB pixels, with almost no data (a few hundred bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def jpeg_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A small real JPEG whose SOF0 frame header is patched to declare ``width x height``."""
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_bomb() -> bytes:
    data = bytearray(pil_bytes(Image.fromarray(RGB).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", 65_535, 65_535)  # logical screen size
    data[data.index(b",") + 5 : data.index(b",") + 9] = struct.pack("<HH", 65_535, 65_535)  # image descriptor
    return bytes(data)


def png16() -> bytes:
    ok, data = cv2.imencode(".png", (np.arange(64 * 64 * 3).reshape(64, 64, 3) * 7).astype(np.uint16))
    assert ok
    return data.tobytes()


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(np.full((32, 48, 3), c, np.uint8)) for c in (0, 128, 255)]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    return pil_bytes(frames[0], fmt, save_all=True, append_images=frames[1:])


def exif_rotated() -> bytes:
    """Stored 40 wide x 20 high with EXIF orientation 6 (rotate 90 CW): displayed 20 x 40."""
    image = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    return pil_bytes(image, "JPEG", exif=exif)


# name: (body, content type, status, error code, message fragment)
REFUSED: dict[str, tuple[Callable[[], bytes], str, int, str, str]] = {
    "zero-bytes": (lambda: b"", "image/png", 400, "bad_image", "empty body"),
    "truncated-jpeg": (lambda: jpeg()[: len(jpeg()) // 2], "image/jpeg", 400, "bad_image", "truncated"),
    "truncated-png": (lambda: png()[: len(png()) // 2], "image/png", 400, "bad_image", "truncated"),
    "jpeg-magic-only": (lambda: b"\xff\xd8\xff", "image/jpeg", 400, "bad_image", "truncated"),
    "text-as-image": (lambda: b"hello, this is not an image", "image/png", 400, "bad_image", "looks like text"),
    "random-bytes": (lambda: RNG.integers(0, 255, 4096, np.uint8).tobytes(), "image/png", 400, "bad_image", ""),
    "pdf": (lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "image/png", 415, "unsupported_media_type", "PDF"),
    "wrong-content-type": (png, "text/plain", 415, "unsupported_media_type", "'text/plain'"),
    "json-content-type": (png, "application/json", 415, "unsupported_media_type", "application/json"),
    "no-content-type": (png, "", 415, "unsupported_media_type", "(none)"),
    "png-bomb": (png_bomb, "image/png", 413, "too_large", "SNIPSERVE_MAX_IMAGE_PIXELS"),
    "jpeg-bomb": (jpeg_bomb, "image/jpeg", 413, "too_large", "SNIPSERVE_MAX_IMAGE_PIXELS"),
    "gif-bomb": (gif_bomb, "image/gif", 413, "too_large", "SNIPSERVE_MAX_IMAGE_PIXELS"),
    "body-over-limit": (lambda: b"\0" * (MAX_BYTES + 1), "image/png", 413, "too_large", "SNIPSERVE_MAX_IMAGE_BYTES"),
}

# name: (body, content type, (width, height) the service must report)
ACCEPTED: dict[str, tuple[Callable[[], bytes], str, tuple[int, int]]] = {
    "1x1": (lambda: png(np.zeros((1, 1, 3), np.uint8)), "image/png", (1, 1)),
    "5000x1": (lambda: png(np.zeros((1, 5000, 3), np.uint8)), "image/png", (5000, 1)),
    "2x4000": (lambda: png(np.zeros((4000, 2, 3), np.uint8)), "image/png", (2, 4000)),
    "16-bit-png": (png16, "image/png", (64, 64)),
    "cmyk-jpeg": (lambda: pil_bytes(Image.fromarray(RGB).convert("CMYK"), "JPEG"), "image/jpeg", (64, 64)),
    "palette-png": (lambda: pil_bytes(Image.fromarray(RGB).convert("P"), "PNG"), "image/png", (64, 64)),
    "grayscale-png": (lambda: png(RGB[..., 0]), "image/png", (64, 64)),
    "rgba-png": (lambda: png(np.dstack([RGB, RGB[..., :1]])), "image/png", (64, 64)),
    "animated-gif": (lambda: animated("GIF"), "image/gif", (48, 32)),
    "animated-webp": (lambda: animated("WEBP"), "image/webp", (48, 32)),
    "exif-rotated-jpeg": (exif_rotated, "image/jpeg", (20, 40)),
    "octet-stream": (png, "application/octet-stream", (64, 64)),
}

# query options -> message fragment (all 422 invalid_options)
BAD_OPTIONS: dict[str, tuple[dict[str, str], str]] = {
    "threshold-not-a-number": ({"score_threshold": "abc"}, "score_threshold"),
    "threshold-above-1": ({"score_threshold": "2"}, "score_threshold"),
    "levels-not-json": ({"levels": "[oops"}, "levels must be a JSON list"),
    "levels-negative-scale": ({"levels": '[{"scale": -1}]'}, "levels.0.scale"),
    "levels-wrong-shape": ({"levels": '{"scale": 1}'}, "levels"),
    "unknown-class": ({"classes": "zebra"}, "unknown class 'zebra'"),
    "unknown-merge": ({"merge": "fancy"}, "merge: Input should be"),
    "min-above-max": ({"min_object_size": "50", "max_object_size": "10"}, "must be below"),
    "unknown-preset": ({"preset": "nope"}, "unknown levels preset 'nope'"),
    "unknown-format": ({"format": "gif"}, "format"),
    "negative-timeout": ({"timeout": "-1"}, "timeout"),
    "zero-max-detections": ({"max_detections": "0"}, "max_detections"),
    "bool-not-bool": ({"edge_filter": "perhaps"}, "edge_filter"),
}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    settings = Settings(engine="fake", warmup=False, max_image_bytes=MAX_BYTES, max_image_pixels=MAX_PIXELS)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c
        # after the whole corpus: still ready, and still serving a good image
        assert c.get("/readyz").status_code == 200
        assert c.post("/v1/detect", content=png(), headers={"content-type": "image/png"}).status_code == 200


def post(client: TestClient, body: bytes, ctype: str, params: dict[str, str] | None = None) -> object:
    headers = {"content-type": ctype} if ctype else {}
    return client.post("/v1/detect", content=body, headers=headers, params=params)


@pytest.mark.parametrize("name", REFUSED)
def test_bad_input_is_refused_with_its_documented_answer(client: TestClient, name: str) -> None:
    make, ctype, status, code, fragment = REFUSED[name]
    r = post(client, make(), ctype)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert fragment in error["message"]
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("name", ACCEPTED)
def test_odd_but_valid_images_are_decoded(client: TestClient, name: str) -> None:
    make, ctype, (width, height) = ACCEPTED[name]
    r = post(client, make(), ctype)
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": width, "height": height}


@pytest.mark.parametrize("name", BAD_OPTIONS)
def test_malformed_options_are_422(client: TestClient, name: str) -> None:
    params, fragment = BAD_OPTIONS[name]
    r = post(client, png(), "image/png", params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_options"
    assert fragment in r.json()["error"]["message"]


def test_chunked_body_over_limit_is_413(client: TestClient) -> None:
    def body() -> Iterator[bytes]:
        for _ in range(100):  # 100 x 64 KiB = 6.4 MB, no Content-Length: the limit is enforced while reading
            yield b"\0" * 65536

    r = client.post("/v1/detect", content=body(), headers={"content-type": "image/png"})
    assert r.status_code == 413 and "SNIPSERVE_MAX_IMAGE_BYTES" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({"other": ("a.png", png(), "image/png")}, "no file field named 'file'"),
        ({"file": ("a.png", b"\0" * (MAX_BYTES + 1), "image/png")}, "SNIPSERVE_MAX_IMAGE_BYTES"),
        ({"file": ("a.png", b"", "image/png")}, "empty body"),
    ],
    ids=["no-file-field", "file-over-limit", "empty-file"],
)
def test_bad_multipart_uploads(client: TestClient, files: dict[str, tuple[str, bytes, str]], fragment: str) -> None:
    r = client.post("/v1/detect", files=files)
    assert r.status_code in (400, 413), r.text
    assert fragment in r.json()["error"]["message"]


def test_garbage_multipart_body_is_400(client: TestClient) -> None:
    r = client.post(
        "/v1/detect", content=b"--xx\r\nnot a part", headers={"content-type": "multipart/form-data; boundary=xx"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image"
