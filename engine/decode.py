"""Image bytes -> uint8 (H, W, 3) RGB arrays, with a pixel limit and typed errors that name the item.

    from engine.decode import decode_image, DecodeError
    pano = decode_image("../shared/panoramas/louvre.jpg")       # (2048, 4096, 3) uint8
    pano = decode_image(blob, name="rome/000123.jpg")           # bytes; errors name "rome/000123.jpg"

PIL does the decoding. What each input becomes:

* RGB: as stored. Greyscale (1, L), palette (P) and CMYK/YCbCr: PIL's own conversion to RGB. CMYK
  uses PIL's plain formula, no ICC profile (no embedded ICC profile is applied for any mode).
* Alpha (RGBA, LA, PA, palette transparency): dropped. The stored colour is kept as it is, not
  composited onto a background, so a fully transparent pixel shows whatever colour the encoder left.
* 16-bit greyscale (I;16*, and I from PNG): scaled to 8 bits by round(v / 257), so 65535 -> 255.
  PIL's own ``convert`` clips these at 255 instead, which is why they are handled here. 16-bit RGB,
  RGBA and grey+alpha PNGs reach us already reduced to 8 bits by PIL, which keeps the high byte
  (floor(v / 256)); that is within one level of round(v / 257).
* 32-bit integer (I, other than from PNG) and float (F) images: rejected, their range is not known.
* EXIF orientation is applied (PIL's ``exif_transpose``), so the array is the image as displayed.
* Several frames (GIF, APNG, MPO, TIFF pages): the first one.

Decompression bombs: the size is read from the header (``Image.open`` is lazy) and checked against
``max_pixels`` before a single pixel is decoded. This per-call limit replaces PIL's process-wide
``Image.MAX_IMAGE_PIXELS``, which this module switches off on import: PIL's would otherwise warn from
89 MP (a 16k x 8k panorama is 134 MP) and refuse anything over 179 MP whatever ``max_pixels`` says.

A later issue adds nvJPEG and reduced-size DCT decoding behind the same function.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 2**28  # 268 MP: a 23k x 11.5k panorama, 805 MB as uint8 RGB

Image.MAX_IMAGE_PIXELS = None  # see the module docstring: max_pixels below is the guard

_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class DecodeError(ValueError):
    """An image could not be decoded. ``item`` names it (a path or the given name); ``reason`` says why."""

    def __init__(self, item: str, reason: str):
        super().__init__(f"{item}: {reason}")
        self.item = item
        self.reason = reason


class ImageTooLargeError(DecodeError):
    """The image has more pixels than ``max_pixels`` allows (checked from the header, before decoding)."""


def decode_image(source, *, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``source`` (a path, encoded bytes, or an array) into a C-contiguous uint8 (H, W, 3) RGB array.

    ``name`` is what errors call the item (default: the path, or ``<N bytes>`` / ``<array>``).
    ``max_pixels`` bounds width * height (``None``: no bound). An array is accepted as uint8 or
    uint16, shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), and converted by the same rules; a
    uint8 (H, W, 3) C-contiguous array is returned as it is, not copied.

    Raises ``DecodeError`` (a ``ValueError``) naming the item for an unreadable, truncated, corrupt or
    unsupported image, and its subclass ``ImageTooLargeError`` for one over ``max_pixels``.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "<array>", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        item = name or f"<{len(source)} bytes>"
        if len(source) == 0:
            raise DecodeError(item, "empty input (0 bytes)")
        return _from_pil(io.BytesIO(source), item, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        item = name or os.fspath(source)
        try:
            stream = open(source, "rb")  # closed by the with below
        except OSError as exc:
            raise DecodeError(item, f"cannot read the file ({exc.strerror or exc})") from exc
        with stream:
            if os.fstat(stream.fileno()).st_size == 0:
                raise DecodeError(item, "empty file (0 bytes)")
            return _from_pil(stream, item, max_pixels)
    raise TypeError(f"decode_image takes a path, bytes or a numpy array, got {type(source).__name__}")


def _check_pixels(item: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            item,
            f"{width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(max_pixels; raise it to accept this image)",
        )


def _from_pil(stream, item: str, max_pixels: int | None) -> np.ndarray:
    # PIL signals bad data with many exception types (OSError for truncation and unknown formats,
    # SyntaxError, ValueError, EOFError, struct.error, zlib.error, ...), so everything but memory
    # exhaustion becomes a DecodeError naming the item; the original stays chained as __cause__.
    try:
        with Image.open(stream) as im:
            _check_pixels(item, im.width, im.height, max_pixels)  # header only: nothing decoded yet
            im.load()
            return _to_rgb8(im, item)
    except (DecodeError, MemoryError):
        raise
    except Exception as exc:
        raise DecodeError(item, _reason(exc)) from exc


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated or incomplete image data ({text or type(exc).__name__})"
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format (corrupt, or not an image)"
    return f"corrupt or unsupported image ({type(exc).__name__}: {text})" if text else f"corrupt or unsupported image ({type(exc).__name__})"


def _to_rgb8(im: Image.Image, item: str) -> np.ndarray:
    stored_format = im.format  # exif_transpose returns a new image without it
    orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation; 1 is "as stored"
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        rgb = np.asarray(im)
    elif im.mode in _GREY16_MODES or (im.mode == "I" and stored_format == "PNG"):
        # Older PIL opens 16-bit greyscale PNGs as mode I (int32 holding 0..65535).
        rgb = np.repeat(_scale16(np.asarray(im))[:, :, None], 3, axis=2)
    elif im.mode in ("I", "F"):
        raise DecodeError(item, f"unsupported pixel mode {im.mode} (32-bit {'float' if im.mode == 'F' else 'integer'}): its range is unknown")
    else:
        try:
            rgb = np.asarray(im.convert("RGB"))  # 1, L, P, LA, PA, RGBA, RGBX, CMYK, YCbCr, ...; alpha dropped
        except ValueError as exc:
            raise DecodeError(item, f"cannot convert pixel mode {im.mode} to RGB ({exc})") from exc
    return _own(rgb)


def _scale16(values: np.ndarray) -> np.ndarray:
    """uint16 (or int holding 0..65535) -> uint8 by round(v / 257): exact for v = 257 * k."""
    wide = values.astype(np.uint32)
    return ((wide + 128) // 257).astype(np.uint8)


def _own(array: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable array (np.asarray of a PIL image can be read-only)."""
    if not array.flags.c_contiguous or not array.flags.writeable:
        array = np.array(array, order="C")
    return array


def _from_array(array: np.ndarray, item: str, max_pixels: int | None) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise DecodeError(item, f"array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.dtype not in (np.uint8, np.uint16):
        raise DecodeError(item, f"array dtype must be uint8 or uint16, got {array.dtype}")
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise DecodeError(item, f"array is empty, shape {array.shape}")
    _check_pixels(item, width, height, max_pixels)
    if array.dtype == np.uint16:
        array = _scale16(array)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]  # alpha dropped, as for decoded images
    return np.ascontiguousarray(array)
