"""Decode stage: request bytes → ``H×W×3 uint8`` RGB array, refusing bad or oversized input early.

Order of checks, cheapest first, so that hostile input costs almost nothing:

1. byte limit (``len(data)``), before anything is parsed;
2. format sniffed from the magic bytes: one of ours, a real format we do not accept (415), or not an
   image at all (400);
3. header only (Pillow's format plugin; ``tifffile`` for TIFF; a RIFF chunk walk for WebP): width,
   height, orientation, bit depth; the pixel limit is checked here, before any pixel buffer is
   allocated (decompression bombs);
4. full decode with OpenCV, the faster decoder on the common path (JPEG, PNG, WebP, BMP); Pillow is
   the fallback decoder and the source of precise error messages when OpenCV refuses the data
   (truncated, corrupt). GIF and most TIFF are decoded by Pillow (see ``decode_image``, ``_decode_tiff``).

Conversion rules (every path ends in RGB ``uint8``, C-contiguous):

- alpha is **dropped**, not composited (OpenCV's ``IMREAD_COLOR`` behaviour; transparent pixels keep
  whatever colour the file stores);
- grayscale is replicated to three channels; palette images are expanded; CMYK JPEG is converted
  by the decoder (Adobe inverted CMYK is handled);
- ``uint16`` is scaled, never clipped: ``round(v / 257)``, so 0 → 0 and 65535 → 255;
- float images whose finite values lie in ``[0, 1]`` are scaled by 255; other float and signed
  or 32-bit integer images are min-max normalised to ``[0, 255]``; NaN and ±inf become 0;
- EXIF orientation (also the TIFF Orientation tag and XMP ``tiff:Orientation``) is applied once,
  by this module; decoders never apply it (OpenCV gets ``IMREAD_IGNORE_ORIENTATION``; libtiff applies
  the TIFF tag regardless, so it is reset to 1 in a copy of the bytes). Only a PNG ``eXIf`` chunk
  before the image data counts (finding a later one costs a full decode);
- animated GIF/WebP: the first frame (GIF is decoded by Pillow, see ``decode_image``).

Bad bytes only ever raise :class:`~service.errors.BadImage` (400),
:class:`~service.errors.UnsupportedMediaType` (415) or :class:`~service.errors.ImageTooLarge` (413).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import tifffile
from numpy.typing import NDArray
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)
from pydantic import BaseModel, ConfigDict, Field

from service.errors import BadImage, ImageTooLarge, SnipserveError, UnsupportedMediaType

ImageFormat = Literal["JPEG", "PNG", "TIFF", "WEBP", "BMP", "GIF"]

# Why OpenCV does the full decode: 4000x3000 RGB (gradients + noise), best of 21, 2 busy cores,
# opencv-python-headless 5.0.0, Pillow 13.0.0 (Pillow = open + convert("RGB") + np.asarray):
#   JPEG q95  6.4 MiB: cv2.imdecode  63-64 ms | Pillow  85-104 ms | decode_image  63-68 ms
#   PNG      26.5 MiB: cv2.imdecode 145-155 ms | Pillow 167-173 ms | decode_image 144-149 ms
# Pillow's header parse is ~20 us for a JPEG, so it stays the prober (OpenCV has no header-only API).
# Reproduce from the repo root (prints cv2, Pillow, decode_image for JPEG then PNG):
#   .venv/bin/python -c "import io,timeit,cv2,numpy as n;from PIL import Image;from service.decode import *
#   y,x=n.mgrid[:3000,:4000];a=n.dstack([x/4000*255,y/3000*255,(n.sin(x/50)*n.cos(y/70)+1)*127])
#   a=n.clip(a+n.random.default_rng(0).normal(0,12,a.shape),0,255).astype(n.uint8);F=cv2.IMREAD_COLOR_RGB
#   t=lambda f:'%.0f ms'%(1e3*min(timeit.repeat(f,number=1,repeat=21)));P=lambda d:Image.open(io.BytesIO(d))
#   for e,p in [('.jpg',[cv2.IMWRITE_JPEG_QUALITY,95]),('.png',[])]:
#    d=cv2.imencode(e,a,p)[1].tobytes();print(e,t(lambda:cv2.imdecode(n.frombuffer(d,n.uint8),F)),
#     t(lambda:n.asarray(P(d).convert('RGB'))),t(lambda:decode_image(d,DecodeConfig())))"
_COLOR_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
_RAW_FLAGS = cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION

_MIB = 1024**2
_TILED_HINT = "for huge orthomosaics use `snipserve detect --tiled` / offline mode"

# Pillow modes that ``Image.convert("RGB")`` turns into 8-bit RGB without loss of meaning.
_PIL_8BIT_MODES = frozenset({"1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
# Pillow modes handed to the array normaliser (16-bit, 32-bit integer, 32-bit float gray).
_PIL_DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


class DecodeConfig(BaseModel):
    """Limits of the decode stage (one per service; settings map the ``SNIPSERVE_MAX_IMAGE_*`` variables)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(
        default=50 * _MIB,
        ge=1,
        le=2**31 - 1,
        description="Refuse inputs larger than this many bytes, before parsing anything.",
    )
    max_pixels: int = Field(
        default=64_000_000,
        ge=1,
        # OpenCV refuses more than 2**30 pixels (CV_IO_MAX_IMAGE_PIXELS) whatever we allow.
        le=2**30,
        description="Refuse images whose header declares more than width*height pixels, before decoding.",
    )
    apply_exif_orientation: bool = Field(
        default=True,
        description="Rotate/flip to the EXIF (or TIFF/XMP) orientation, as image viewers display it.",
    )


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, without decoding pixels.

    ``width``/``height`` are after EXIF orientation (when the config applies it), i.e. the shape
    ``decode_image`` returns is ``(height, width, 3)``.
    """

    format: str
    """One of ``JPEG``, ``PNG``, ``TIFF``, ``WEBP``, ``BMP``, ``GIF``."""
    width: int
    """Pixels, after orientation."""
    height: int
    """Pixels, after orientation."""
    orientation: int
    """EXIF orientation 1..8 as stored (1 = none); invalid values read as 1."""
    bit_depth: int
    """Bits per sample as stored (8 for most images; 16 for 16-bit PNG/TIFF; 32/64 for float TIFF)."""
    n_bytes: int
    """Size of the encoded input."""


@dataclass(frozen=True)
class _Header:
    info: ImageInfo
    stored_size: tuple[int, int]  # (width, height) before orientation
    raw: bool  # decode at native depth/channels and normalise here (TIFF, >8-bit PNG)
    samples: int = 0  # TIFF: samples per pixel (0 = not read)
    orientation_at: tuple[int, str] | None = None  # TIFF: file offset and byte order of the tag value
    tifffile: bool = False  # TIFF: decode with tifffile (planar-separate or float16 pages)


# --------------------------------------------------------------------------------------------------
# public API


def probe_image(data: bytes, config: DecodeConfig) -> ImageInfo:
    """Read format, size and orientation from the header only (no pixel buffer is allocated).

    Raises ``ImageTooLarge`` (byte or pixel limit), ``UnsupportedMediaType`` (a format we do not
    accept) or ``BadImage`` (empty, unrecognised, or a header that does not parse).
    """
    return _probe(data, config).info


def decode_image(data: bytes, config: DecodeConfig) -> NDArray[np.uint8]:
    """Decode an encoded image into a C-contiguous ``uint8`` array of shape ``(H, W, 3)``, RGB order.

    ``H, W`` are after EXIF orientation (see the module docstring for every conversion rule).
    Raises only ``ImageTooLarge``, ``UnsupportedMediaType`` or ``BadImage`` for bad input.
    """
    header = _probe(data, config)
    fmt = header.info.format
    array: NDArray[np.uint8] | None
    if fmt == "TIFF":
        array = _decode_tiff(data, header)
    elif fmt == "GIF":
        # OpenCV paints transparent GIF pixels with the background colour; Pillow keeps the stored
        # palette colour, which is the "alpha dropped" rule every other format follows.
        array = _decode_with_pillow(data, fmt)
    else:
        array = _decode_with_opencv(data, header)  # the faster decoder, see the benchmark above
        if array is None or array.shape[:2] != header.stored_size[::-1]:
            # OpenCV refused the data (truncated, corrupt, or a variant it lacks) or read another frame
            # size than the header declares. Pillow either decodes it or raises an error that says
            # what is wrong, which is what the client should read.
            array = _decode_with_pillow(data, fmt)
    if array.shape[:2] != header.stored_size[::-1]:
        w, h = header.stored_size
        raise BadImage(f"{fmt} header declares {w}x{h} but the decoded pixels are {array.shape[1]}x{array.shape[0]}")
    if config.apply_exif_orientation:
        array = _orient(array, header.info.orientation)
    return np.ascontiguousarray(array)


# --------------------------------------------------------------------------------------------------
# sniffing and header


def _probe(data: bytes, config: DecodeConfig) -> _Header:
    n = len(data)
    if n > config.max_bytes:
        raise ImageTooLarge(
            f"image is {n / _MIB:.1f} MiB ({n} bytes), above the limit of {config.max_bytes / _MIB:.1f} MiB "
            f"({config.max_bytes} bytes, SNIPSERVE_MAX_IMAGE_BYTES)"
        )
    fmt = _sniff(data)
    with _mapped_errors(fmt, "read the header of"):
        if fmt == "TIFF":
            tiff = _tiff_header(data)
            (w, h), orientation, depth = tiff.size, tiff.orientation, tiff.bits
        elif fmt == "WEBP":
            (w, h), orientation, depth = _webp_header(data)
        else:
            (w, h), orientation, depth = _pillow_header(data, fmt)
    if w <= 0 or h <= 0:
        raise BadImage(f"{fmt} header declares an empty image ({w}x{h})")
    pixels = w * h
    if pixels > config.max_pixels:
        raise ImageTooLarge(
            f"image is {w}x{h} = {pixels / 1e6:.1f} MP, above the limit of {config.max_pixels / 1e6:.1f} MP "
            f"(SNIPSERVE_MAX_IMAGE_PIXELS); {_TILED_HINT}"
        )
    if orientation not in range(1, 9):
        orientation = 1
    swap = config.apply_exif_orientation and orientation >= 5
    info = ImageInfo(
        format=fmt,
        width=h if swap else w,
        height=w if swap else h,
        orientation=orientation,
        bit_depth=depth,
        n_bytes=n,
    )
    if fmt == "TIFF":
        _check_tiff_samples(tiff)
        use_tifffile = tiff.planar or (tiff.sample_format == 3 and tiff.bits == 16)
        return _Header(info, (w, h), True, tiff.samples, tiff.orientation_at, tifffile=use_tifffile)
    return _Header(info, (w, h), raw=depth > 8)


def _sniff(data: bytes) -> ImageFormat:
    """Name the format from the magic bytes, or raise 415 (known, not accepted) / 400 (not an image)."""
    if not data:
        raise BadImage("empty body: expected image bytes (JPEG, PNG, TIFF, WebP, BMP or GIF)")
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM":
        return "BMP"
    known = _known_unsupported(head)
    if known is not None:
        raise UnsupportedMediaType(f"{known} is not accepted; send JPEG, PNG, TIFF, WebP, BMP or GIF (first frame)")
    if len(data) < 8 and any(data.startswith(m[: len(data)]) for m in _OUR_MAGICS):
        raise BadImage(f"image is truncated: only {len(data)} bytes ({data!r})")
    sample = data[:32]
    if _looks_like_text(data[:512]):
        raise BadImage(f"not an image: the body looks like text (starts with {sample.decode(errors='replace')!r})")
    raise BadImage(
        f"not an image: unrecognised leading bytes {sample[:16].hex(' ')} (expected JPEG, PNG, TIFF, WebP, BMP or GIF)"
    )


_OUR_MAGICS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"RIFF", b"GIF8", b"BM")


def _known_unsupported(head: bytes) -> str | None:
    """A human name for a real format we recognise but do not decode, else None."""
    if head.startswith(b"%PDF"):
        return "PDF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIC/HEIF"
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return f"ISO media ({brand.decode('latin-1')!r}, e.g. MP4/MOV video)"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    if head.startswith(b"8BPS"):
        return "Photoshop PSD"
    if head.startswith(b"v/1\x01"):
        return "OpenEXR"
    if head.startswith(b"qoif"):
        return "QOI"
    if head.startswith((b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")):
        return "ICO/CUR"
    if head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")):
        return "an archive (zip/gzip/7z/rar)"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in head.lower()):
        return "SVG"
    return None


def _looks_like_text(sample: bytes) -> bool:
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


_PIL_PLUGINS: dict[str, type[ImageFile.ImageFile]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,  # fallback decoder only; WebP headers are parsed here
    "BMP": BmpImagePlugin.BmpImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,  # fallback decoder only; TIFF headers are read by tifffile
}


def _open_pillow(data: bytes, fmt: str) -> ImageFile.ImageFile:
    # The format plugin is called directly rather than through ``Image.open``: Image.open runs Pillow's
    # own decompression-bomb check (a global limit, a warning above 89 MP and an error above 179 MP)
    # before we see the size; ours is per-config and its message names the setting.
    return _PIL_PLUGINS[fmt](io.BytesIO(data))


def _pillow_header(data: bytes, fmt: str) -> tuple[tuple[int, int], int, int]:
    """``((width, height), orientation, bit_depth)`` from a Pillow header parse; no pixel decode."""
    im = _open_pillow(data, fmt)
    with im:
        size = im.size
        depth = 8
        if fmt == "PNG" and len(data) > 24:
            depth = data[24]  # IHDR bit depth: signature (8) + length (4) + "IHDR" (4) + w (4) + h (4)
        elif im.mode in _PIL_DEEP_MODES:
            depth = 16 if im.mode.startswith("I;16") else 32
        # PNG: only an eXIf chunk before IDAT counts; PngImageFile.getexif() would decode the whole
        # image to look for one after it (measured 190 ms on a 12 MP PNG).
        has_exif = fmt != "PNG" or "exif" in im.info
        orientation = _exif_orientation(im) if has_exif else 1
    return size, orientation, depth


def _exif_orientation(im: Image.Image) -> int:
    # Broken EXIF must not make an otherwise good image unreadable: it reads as "no rotation".
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) else 1


@dataclass(frozen=True)
class _TiffHeader:
    size: tuple[int, int]
    orientation: int
    bits: int
    samples: int
    orientation_at: tuple[int, str] | None
    planar: bool = False  # PlanarConfiguration 2: one plane per sample
    sample_format: int = 1  # 1 uint, 2 int, 3 float, 5/6 complex


def _tiff_header(data: bytes) -> _TiffHeader:
    """Size, orientation, bits and samples per pixel of the first TIFF page, from its IFD only."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        tag = page.tags.get(274)
        inline = tag is not None and isinstance(tag.value, int) and tag.count == 1
        return _TiffHeader(
            size=(int(page.imagewidth), int(page.imagelength)),
            orientation=int(tag.value) if inline and tag is not None else 1,
            bits=int(page.bitspersample),
            samples=int(page.samplesperpixel),
            orientation_at=(int(tag.valueoffset), tif.byteorder) if inline and tag is not None else None,
            planar=int(page.planarconfig) == 2,
            sample_format=int(page.sampleformat),
        )


def _check_tiff_samples(tiff: _TiffHeader) -> None:
    """415 for pages no conversion rule covers: complex samples, or more than 4 samples per pixel."""
    if tiff.sample_format in (5, 6):
        raise UnsupportedMediaType("TIFF images with complex-valued samples are not supported")
    if tiff.samples > 4:
        raise UnsupportedMediaType(
            f"TIFF images with {tiff.samples} samples per pixel are not supported (1 to 4: gray, gray + alpha, "
            "RGB, RGBA); export the bands to show as RGB"
        )


def _webp_header(data: bytes) -> tuple[tuple[int, int], int, int]:
    """``((width, height), orientation, 8)`` from the RIFF chunks of a WebP file.

    Parsed here rather than by Pillow because Pillow's WebP plugin opens the file with libwebp's
    animation decoder, which allocates two ``width*height*4`` canvases before we could check the size.
    """
    size: tuple[int, int] | None = None
    orientation = 1
    pos = 12
    while pos + 8 <= len(data):
        kind = data[pos : pos + 4]
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        payload = data[pos + 8 : pos + 8 + length]
        if kind == b"VP8X" and len(payload) >= 10:
            size = (int.from_bytes(payload[4:7], "little") + 1, int.from_bytes(payload[7:10], "little") + 1)
        elif kind == b"VP8 " and size is None and len(payload) >= 10:
            if payload[3:6] != b"\x9d\x01\x2a":
                raise ValueError("bad VP8 start code")
            size = (
                int.from_bytes(payload[6:8], "little") & 0x3FFF,
                int.from_bytes(payload[8:10], "little") & 0x3FFF,
            )
        elif kind == b"VP8L" and size is None and len(payload) >= 5:
            if payload[0] != 0x2F:
                raise ValueError("bad VP8L signature")
            bits = int.from_bytes(payload[1:5], "little")
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif kind == b"EXIF":
            exif = Image.Exif()
            try:
                exif.load(payload)
                value = exif.get(0x0112, 1)
            except Exception:  # broken EXIF reads as "no rotation", as for the other formats
                value = 1
            orientation = value if isinstance(value, int) else 1
        pos += 8 + length + (length & 1)  # chunks are padded to an even size
    if size is None:
        raise ValueError("no VP8/VP8L/VP8X chunk")
    return size, orientation, 8


@contextmanager
def _mapped_errors(fmt: str, action: str) -> Iterator[None]:
    """Turn any library exception raised while parsing untrusted bytes into a 4xx ``SnipserveError``."""
    try:
        yield
    except SnipserveError:
        raise
    except MemoryError:
        raise  # the server is out of memory: a 5xx, not the client's fault
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{fmt} image refused by the decoder's size guard: {exc}; {_TILED_HINT}") from exc
    except Exception as exc:  # Pillow/libtiff/OpenCV raise a zoo of types on hostile input
        detail = str(exc) or type(exc).__name__
        raise BadImage(f"cannot {action} {fmt} image (corrupt or truncated data): {detail}") from exc


# --------------------------------------------------------------------------------------------------
# pixels


def _decode_with_opencv(data: bytes, header: _Header) -> NDArray[np.uint8] | None:
    """``(H, W, 3) uint8`` RGB from OpenCV, or None where OpenCV refuses the data."""
    if header.info.format == "PNG" and not _png_chunks_complete(data):
        # OpenCV 5.0 allocates what a chunk's length field claims before noticing the data is
        # missing: a 137-byte PNG claiming a 2.6 GB IDAT took ~1 s and GBs of memory (found by fuzzing).
        return None
    with _mapped_errors(header.info.format, "decode"):
        flags = _RAW_FLAGS if header.raw else _COLOR_FLAGS
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
        if decoded is None:
            return None
        if header.raw:
            return _normalise(decoded, bgr=True)
        return decoded.astype(np.uint8, copy=False)  # already (H, W, 3) uint8 RGB


def _png_chunks_complete(data: bytes) -> bool:
    """True if every PNG chunk fits inside ``data`` and IEND is reached (chunk headers only, no CRC)."""
    pos, end = 8, len(data)
    while pos + 12 <= end:
        length = int.from_bytes(data[pos : pos + 4], "big")
        if length > end - pos - 12:
            return False
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos += 12 + length
    return False


def _decode_tiff(data: bytes, header: _Header) -> NDArray[np.uint8]:
    """``(H, W, 3) uint8`` RGB of the first TIFF page, as stored (orientation not applied).

    Both libtiff-based decoders apply the Orientation tag themselves (and ignore OpenCV's
    ``IMREAD_IGNORE_ORIENTATION``), so it is reset to 1 in a copy of the bytes and applied once,
    by ``_orient``, like for every other format. Pillow decodes 8-bit and single-channel pages (it keeps
    unassociated alpha as stored; OpenCV's libtiff RGBA path premultiplies it); OpenCV decodes
    multi-channel pages deeper than 8 bits, which Pillow truncates (16-bit RGB) or cannot open (float RGB).
    """
    if header.tifffile:
        return _decode_with_tifffile(data)
    if header.orientation_at is not None and header.info.orientation != 1:
        offset, byteorder = header.orientation_at
        upright = bytearray(data)
        upright[offset : offset + 2] = (1).to_bytes(2, "little" if byteorder == "<" else "big")
        data = bytes(upright)
    if header.info.bit_depth <= 8 or header.samples == 1:
        try:
            return _decode_with_pillow(data, "TIFF")
        except SnipserveError:
            array = _decode_with_opencv(data, header)
            if array is None:
                raise
            return array
    array = _decode_with_opencv(data, header)
    return array if array is not None else _decode_with_pillow(data, "TIFF")


def _decode_with_tifffile(data: bytes) -> NDArray[np.uint8]:
    """The first page with tifffile (planar-separate and float16 pages, which Pillow and OpenCV refuse or misread):
    samples moved last, then the usual conversion rules. tifffile never applies the Orientation tag."""
    with _mapped_errors("TIFF", "decode"), tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages.first
        array, axes = page.asarray(), page.axes
    if array.ndim == 3 and axes.startswith("S"):
        array = np.moveaxis(array, 0, -1)  # [S, H, W] -> [H, W, S]
    return _normalise(array, bgr=False)


def _decode_with_pillow(data: bytes, fmt: str) -> NDArray[np.uint8]:
    """Fallback full decode with Pillow (first frame), normalised to ``(H, W, 3) uint8`` RGB."""
    with _mapped_errors(fmt, "decode"), _open_pillow(data, fmt) as im:
        im.load()
        if im.mode in _PIL_8BIT_MODES:
            return np.asarray(im.convert("RGB"))
        if im.mode in _PIL_DEEP_MODES:
            return _normalise(np.asarray(im), bgr=False)
        mode = im.mode
    raise UnsupportedMediaType(f"{fmt} images with pixel mode {mode!r} are not supported")


def samples_to_rgb8(array: NDArray[np.generic], *, fixed_range: bool = False) -> NDArray[np.uint8]:
    """``(H, W)`` or ``(H, W, C)`` samples (C in 1..4, RGB order) -> ``(H, W, 3) uint8`` RGB by this module's rules.

    ``fixed_range``: the samples are one window of a larger image (the offline mode), so nothing may depend on
    the window's own values: floats are clipped to ``[0, 1]`` and scaled by 255, and sample types without a fixed
    range (signed or 32-bit integers) are refused (415) instead of min-max normalised."""
    if fixed_range and array.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            array = np.clip(np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    elif fixed_range and array.dtype not in (np.uint8, np.uint16, np.bool_):
        raise UnsupportedMediaType(
            f"TIFF sample type {array.dtype} is not supported in offline mode (uint8, uint16, float)"
        )
    return _normalise(array, bgr=False)


def _normalise(array: NDArray[np.generic], *, bgr: bool) -> NDArray[np.uint8]:
    """Any decoder output ``(H, W)`` or ``(H, W, C)``, C in 1..4, any dtype → ``(H, W, 3) uint8`` RGB.

    ``bgr``: three/four-channel input is in OpenCV's BGR(A) order. Alpha is dropped.
    """
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or not 1 <= array.shape[2] <= 4:
        raise UnsupportedMediaType(f"images with pixel array shape {array.shape} are not supported")
    channels = array.shape[2]
    color = array[:, :, :1] if channels <= 2 else array[:, :, :3]  # drop alpha
    color8 = np.ascontiguousarray(_to_uint8(color))
    if color8.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(color8, 3, axis=2))
    if bgr:
        return np.asarray(cv2.cvtColor(color8, cv2.COLOR_BGR2RGB), dtype=np.uint8)
    return color8


def _to_uint8(array: NDArray[np.generic]) -> NDArray[np.uint8]:
    """Scale (never clip) samples of any dtype to ``uint8``; see the module docstring for the rules."""
    with np.errstate(all="ignore"):  # huge float ranges overflow to inf -> a flat image, not an error
        return _scale_to_uint8(array)


def _scale_to_uint8(array: NDArray[np.generic]) -> NDArray[np.uint8]:
    if array.dtype == np.uint8:
        return array.astype(np.uint8, copy=False)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16, either byte order
        # round(v / 257) in integers: 0 -> 0, 65535 -> 255, monotone, no overflow in uint32.
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    if np.issubdtype(array.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(values)
    return np.rint(scaled).clip(0, 255).astype(np.uint8)


def _orient(array: NDArray[np.uint8], orientation: int) -> NDArray[np.uint8]:
    """Apply EXIF orientation 1..8 to ``(H, W, 3) uint8`` (same result as ``PIL.ImageOps.exif_transpose``)."""
    if orientation == 2:
        out = cv2.flip(array, 1)
    elif orientation == 3:
        out = cv2.rotate(array, cv2.ROTATE_180)
    elif orientation == 4:
        out = cv2.flip(array, 0)
    elif orientation == 5:
        out = cv2.transpose(array)
    elif orientation == 6:
        out = cv2.rotate(array, cv2.ROTATE_90_CLOCKWISE)
    elif orientation == 7:
        out = cv2.flip(cv2.transpose(array), -1)
    elif orientation == 8:
        out = cv2.rotate(array, cv2.ROTATE_90_COUNTERCLOCKWISE)
    else:
        return array
    return np.asarray(out, dtype=np.uint8)
