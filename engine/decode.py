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
* EXIF orientation is applied (as PIL's ``exif_transpose`` does, on the array), so the array is the image as displayed.
* Several frames (GIF, APNG, MPO, TIFF pages): the first one.

Decompression bombs: the size is read from the header (``Image.open`` is lazy) and checked against
``max_pixels`` before a single pixel is decoded. This per-call limit replaces PIL's process-wide
``Image.MAX_IMAGE_PIXELS``, which this module switches off on import: PIL's would otherwise warn from
89 MP (a 16k x 8k panorama is 134 MP) and refuse anything over 179 MP whatever ``max_pixels`` says.
A pixel limit does not bound memory across many items, though: ``read_header`` and ``decode_cost``
give what a decode will take, so that callers admit it against a shared ``engine.budget.DecodeBudget``
first. Decoding converts a strip of rows at a time, so its peak is PIL's copy plus ours (7 bytes per
pixel), not three whole-image temporaries.

Reduced-size decoding (``min_width``): a JPEG can be decoded at 1/2, 1/4 or 1/8 of its size by
libjpeg's DCT scaling (PIL's ``Image.draft``), which skips most of the inverse DCT and colour work.
``decode_image(path, min_width=required_width(views))`` picks the greatest of those reductions that still
gives at least ``min_width`` columns and ``ceil(min_width / 2)`` rows (an equirectangular panorama's
vertical density must not drop either) and divides both sides exactly, so that a 2:1 panorama stays
exactly 2:1 (libjpeg rounds up: 1000 x 500 at 1/8 would be 125 x 63), and the result is never narrower
than asked for; an EXIF
rotation by 90° is taken into account, so the bound is on the image as displayed. Other formats, and
JPEGs that PIL cannot draft (several tiles), are decoded at full size. The pixel limit is still checked
against the full size in the header, not the reduced one: entropy decoding runs over every DCT block
of the full image whatever the scale, so a bomb costs time even when it would fit in memory reduced.
Measured on this project's 2-core CPU machine (medians, one run, side by side): louvre.jpg (4096x2048,
baseline) takes ~26 ms at 1/4 scale against ~75 ms at full size (2.9x); jordan-pond.jpg (progressive)
gains only ~1.5x, since a progressive file's entropy decoding dominates and is not reduced. simplejpeg
(libjpeg-turbo, the same DCT scaling) was no faster than PIL at 1/4 scale (1.02x on louvre, 1.00x on
jordan-pond), so PIL stays the only decoder. At full size simplejpeg was faster (2.35x on louvre, 1.44x
on jordan-pond): worth revisiting if full-size decoding ever dominates.

``decode_jpeg_batch_cuda`` decodes a batch of JPEGs with nvJPEG on the GPU (torchvision), one bad item
at a time falling back to this module's CPU decoder, and returns errors in place of the bad items.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from engine.config import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    import torch

    from kernels import ViewSpec

Image.MAX_IMAGE_PIXELS = None  # see the module docstring: max_pixels below is the guard

_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height for display


class DecodeError(ValueError):
    """An image could not be decoded. ``item`` names it (a path or the given name); ``reason`` says why."""

    def __init__(self, item: str, reason: str):
        super().__init__(f"{item}: {reason}")
        self.item = item
        self.reason = reason


class ImageTooLargeError(DecodeError):
    """The image has more pixels than ``max_pixels`` allows (checked from the header, before decoding)."""


def decode_image(
    source, *, name: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_width: int | None = None
) -> np.ndarray:
    """Decode ``source`` (a path, encoded bytes, or an array) into a C-contiguous uint8 (H, W, 3) RGB array.

    ``name`` is what errors call the item (default: the path, or ``<N bytes>`` / ``<array>``).
    ``max_pixels`` bounds width * height of the full image, read from the header (``None``: no bound).
    ``min_width``: for a JPEG, decode at the smallest DCT scale (1, 1/2, 1/4, 1/8) that keeps at least
    ``min_width`` columns and ``ceil(min_width / 2)`` rows as displayed (see the module docstring);
    ``None`` (the default) decodes at full size, and other formats and arrays ignore it. An array is accepted as uint8 or
    uint16, shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), and converted by the same rules; a
    uint8 (H, W, 3) C-contiguous array is returned as it is, not copied.

    Raises ``DecodeError`` (a ``ValueError``) naming the item for an unreadable, truncated, corrupt or
    unsupported image, and its subclass ``ImageTooLargeError`` for one over ``max_pixels``.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    if min_width is not None and (isinstance(min_width, bool) or not isinstance(min_width, int) or min_width <= 0):
        raise ValueError(f"min_width must be a positive int or None, got {min_width!r}")
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "<array>", max_pixels)
    with _encoded(source, name, "decode_image") as (stream, item):
        return _from_pil(stream, item, max_pixels, min_width)


@contextlib.contextmanager
def _encoded(source, name: str | None, caller: str):
    """(a binary stream, the item's name) for encoded bytes or a path; empty or unreadable input is a DecodeError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        item = name or f"<{len(source)} bytes>"
        if len(source) == 0:
            raise DecodeError(item, "empty input (0 bytes)")
        yield io.BytesIO(source), item
        return
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{caller} takes a path, bytes or a numpy array, got {type(source).__name__}")
    item = name or os.fspath(source)
    try:
        stream = open(source, "rb")  # closed by the with below
    except OSError as exc:
        raise DecodeError(item, f"cannot read the file ({exc.strerror or exc})") from exc
    with stream:
        if os.fstat(stream.fileno()).st_size == 0:
            raise DecodeError(item, "empty file (0 bytes)")
        yield stream, item


def check_pixels(item: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            item,
            f"{width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(max_pixels; raise it to accept this image)",
        )


def _from_pil(stream, item: str, max_pixels: int | None, min_width: int | None = None) -> np.ndarray:
    # PIL signals bad data with many exception types (OSError for truncation and unknown formats,
    # SyntaxError, ValueError, EOFError, struct.error, zlib.error, ...), so everything but memory
    # exhaustion becomes a DecodeError naming the item; the original stays chained as __cause__.
    try:
        with Image.open(stream) as im:
            check_pixels(item, im.width, im.height, max_pixels)  # header only (full size): nothing decoded yet
            if min_width is not None and isinstance(im, JpegImagePlugin.JpegImageFile):
                _draft(im, min_width)
            im.load()
            orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation; 1 is "as stored"
            rgb = _to_rgb8(im, item)
        # The PIL image is freed by now: turning the array costs its own size once, not PIL's on top.
        return _oriented(rgb, orientation)
    except (DecodeError, MemoryError):
        raise
    except Exception as exc:
        raise DecodeError(item, _reason(exc)) from exc


def _draft(im: JpegImagePlugin.JpegImageFile, min_width: int) -> None:
    """Ask libjpeg for the scale ``dct_scale`` picks: at least ``min_width`` columns and half as many rows.

    PIL's ``draft`` takes the largest scale s in (8, 4, 2, 1) with s <= min(W // w, H // h); asking for
    exactly (W / s, H / s) makes it take ours. The request is on the stored image, so the bound holds
    for the image as displayed (and as returned) after an EXIF turn by 90°.
    """
    scale = dct_scale(im.size, min_width, turned=im.getexif().get(0x0112, 1) in _TRANSPOSING_ORIENTATIONS)
    if scale > 1:
        im.draft("RGB", (im.width // scale, im.height // scale))  # "RGB" changes nothing but the scale: L stays L


def dct_scale(stored: tuple[int, int], min_width: int, *, turned: bool = False) -> int:
    """The greatest JPEG DCT reduction (8, 4, 2 or 1) that keeps >= min_width columns and >= ceil(min_width / 2) rows
    as displayed, and divides both sides exactly: so a 2:1 panorama stays exactly 2:1 (1000 x 500 at 1/8 would
    give 125 x 63)."""
    width, height = stored
    columns, rows = min_width, -(-min_width // 2)
    if turned:
        columns, rows = rows, columns
    for scale in (8, 4, 2):
        if width % scale == 0 and height % scale == 0 and width // scale >= columns and height // scale >= rows:
            return scale
    return 1


def required_width(views: Sequence[ViewSpec], *, densest: bool = False) -> int:
    """The panorama width (pixels, rounded up) at which one view pixel spans about one panorama pixel.

    A pinhole view of width ``w`` and horizontal fov ``fov`` has a focal length of
    f = w / (2 tan(fov / 2)) pixels, so its centre pixel spans 1 / f radians. An equirectangular
    panorama of width W spans 2 pi / W radians per pixel vertically everywhere, and as much or less
    horizontally (its rows crowd together towards the poles), so W = 2 pi f matches a view's centre
    whatever its pitch and roll. Returns the maximum over ``views``: ring8 at 224 px (fov 90) gives
    2 pi * 112 = 703.7 -> 704. Use it as ``decode_image(..., min_width=required_width(views))``.

    The centre is the *least* dense pixel of a pinhole view: a pixel at distance r from the centre
    spans f / (f^2 + r^2) radians radially, so at a corner of a square view (r^2 = w^2 / 2) the density
    is (f^2 + r^2) / f, 3x the centre's at fov 90. The default sizes for the centre, and so
    magnifies the panorama towards the view's edges (2x at the edge midpoints and 3x in the corners at
    fov 90). ``densest=True`` sizes for the corners instead (ring8 at 224 px: 2112), so that no view
    pixel magnifies the panorama, at the price of decoding more.
    """
    views = list(views)
    if not views:
        raise ValueError("required_width needs at least one view")
    widest = 0.0
    for view in views:
        focal = view.width / (2.0 * math.tan(math.radians(view.fov) / 2.0))
        density = focal  # view pixels per radian at the centre
        if densest:
            corner_squared = (view.width / 2.0) ** 2 + (view.height / 2.0) ** 2
            density = (focal * focal + corner_squared) / focal
        widest = max(widest, 2.0 * math.pi * density)
    return math.ceil(round(widest, 6))  # round first: a width that is an integer up to float noise stays it


# Peak bytes per decoded pixel: PIL's own storage (at most 4: RGB is kept as RGBX) plus the (H, W, 3)
# array it is converted into, a strip at a time (``_to_rgb8``); an EXIF turn afterwards costs 3 + 3.
# A strip's temporaries (PIL's crop, its array) come on top, a constant. Measured on a 12000 x 6000
# PNG and JPEG: 7.3 bytes per pixel at the peak, 3.0 held after (10 at the peak before the strips).
DECODE_PEAK_BYTES_PER_PIXEL = 7


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, before any pixel is decoded. ``width`` and ``height`` are as displayed
    (after an EXIF turn by 90°); ``stored`` is (width, height) as stored."""

    width: int
    height: int
    format: str | None
    stored: tuple[int, int]
    orientation: int = 1


def read_header(source, *, name: str | None = None) -> ImageHeader:
    """The size and format of ``source`` (a path, encoded bytes or an array) from its header alone.

    Cheap: PIL reads a few kilobytes. Raises ``DecodeError`` naming the item for an empty, unreadable or
    unrecognised input; a header that reads but whose data is corrupt fails later, in ``decode_image``.
    """
    if isinstance(source, np.ndarray):
        height, width = source.shape[:2] if source.ndim >= 2 else (0, 0)
        return ImageHeader(width, height, None, (width, height))
    with _encoded(source, name, "read_header") as (stream, item):
        return _header(stream, item)


def _header(stream, item: str) -> ImageHeader:
    try:
        with Image.open(stream) as im:
            width, height = im.size
            image_format = im.format
            if image_format == "PNG":
                # PIL's getexif() on a PNG reads on to the end of the file for a late eXIf chunk,
                # which decodes every pixel: take only an eXIf chunk that comes before the data.
                exif = Image.Exif()
                if im.info.get("exif"):
                    exif.load(im.info["exif"])
            else:
                exif = im.getexif()
            orientation = exif.get(0x0112, 1)
    except Exception as exc:
        raise DecodeError(item, _reason(exc)) from exc
    shown = (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)
    return ImageHeader(shown[0], shown[1], image_format, (width, height), orientation)


def decoded_size(header: ImageHeader, *, min_width: int | None = None) -> tuple[int, int]:
    """(width, height) as stored that ``decode_image(..., min_width=min_width)`` decodes to (``dct_scale`` for a JPEG)."""
    width, height = header.stored
    if min_width is None or header.format != "JPEG":
        return width, height
    scale = dct_scale(header.stored, min_width, turned=header.orientation in _TRANSPOSING_ORIENTATIONS)
    return width // scale, height // scale


def decode_cost(header: ImageHeader, *, min_width: int | None = None) -> int:
    """Peak bytes that decoding this image takes (``DECODE_PEAK_BYTES_PER_PIXEL`` per decoded pixel):
    what a decode is admitted for against an ``engine.budget.DecodeBudget``. An array costs its copy."""
    if header.format is None:
        return 3 * header.width * header.height
    width, height = decoded_size(header, min_width=min_width)
    return DECODE_PEAK_BYTES_PER_PIXEL * width * height + min(3 * _STRIP_BYTES, 4 * width * height)


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated or incomplete image data ({text or type(exc).__name__})"
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format (corrupt, or not an image)"
    return f"corrupt or unsupported image ({type(exc).__name__}: {text})" if text else f"corrupt or unsupported image ({type(exc).__name__})"


# Rows converted per step: PIL's own copy of the image plus ours is the peak, not two or three
# whole-image temporaries (np.asarray of a PIL image goes through tobytes, and convert() makes one
# more image). See ``decode_cost``.
_STRIP_BYTES = 8 * 2**20

# EXIF orientation -> the array as displayed (the same result as PIL's exif_transpose, checked by a test).
_ORIENT = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1),
}


def _to_rgb8(im: Image.Image, item: str) -> np.ndarray:
    """The loaded image as stored, as a C-contiguous uint8 (H, W, 3) array, converted a strip of rows at a time."""
    if im.mode in ("I", "F") and not (im.mode == "I" and im.format == "PNG"):
        raise DecodeError(item, f"unsupported pixel mode {im.mode} (32-bit {'float' if im.mode == 'F' else 'integer'}): its range is unknown")
    width, height = im.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, _STRIP_BYTES // max(1, 4 * width))
    for top in range(0, height, rows):
        strip = im.crop((0, top, width, min(height, top + rows))) if rows < height else im
        out[top : top + rows] = _strip_rgb8(strip, item)
    return out


def _strip_rgb8(im: Image.Image, item: str) -> np.ndarray:
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode in _GREY16_MODES or im.mode == "I":
        # 16-bit greyscale (older PIL opens 16-bit greyscale PNGs as mode I, int32 holding 0..65535).
        return _scale16(np.asarray(im))[:, :, None]
    try:
        return np.asarray(im.convert("RGB"))  # 1, L, P, LA, PA, RGBA, RGBX, CMYK, YCbCr, ...; alpha dropped
    except ValueError as exc:
        raise DecodeError(item, f"cannot convert pixel mode {im.mode} to RGB ({exc})") from exc


def _oriented(rgb: np.ndarray, orientation: int) -> np.ndarray:
    turn = _ORIENT.get(orientation)
    return rgb if turn is None else np.ascontiguousarray(turn(rgb))


def _scale16(values: np.ndarray) -> np.ndarray:
    """uint16 (or int holding 0..65535) -> uint8 by round(v / 257): exact for v = 257 * k."""
    wide = values.astype(np.uint32)
    return ((wide + 128) // 257).astype(np.uint8)


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
    check_pixels(item, width, height, max_pixels)
    if array.dtype == np.uint16:
        array = _scale16(array)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]  # alpha dropped, as for decoded images
    return np.ascontiguousarray(array)


# --- nvJPEG (GPU) batch decoding -------------------------------------------------------------------

_TORCHVISION_DEPRECATION = r"The image decoding and encoding capabilities of TorchVision are deprecated"


def decode_jpeg_batch_cuda(
    blobs: Sequence[bytes],
    names: Sequence[str] | None = None,
    *,
    device: str | torch.device = "cuda",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[torch.Tensor | DecodeError]:
    """Decode encoded images on the GPU with nvJPEG (batched), into uint8 (H, W, 3) RGB tensors on ``device``.

    Returns one entry per blob, in order: a C-contiguous (H, W, 3) uint8 CUDA tensor, or the
    ``DecodeError`` (not raised) for an item that cannot be decoded, so one bad image does not fail the
    batch. ``names[i]`` is what the error for blob ``i`` calls it (default ``<item i, N bytes>``).

    What goes to the GPU: baseline or progressive 3-channel JPEGs without an EXIF rotation, whose data
    ends with an end-of-image marker, under ``max_pixels`` (checked from the header first, as in
    ``decode_image``). Everything else (PNG and other formats, greyscale and CMYK JPEGs, EXIF-rotated
    ones, a JPEG that looks truncated, which nvJPEG might decode into grey without an error) is decoded
    by ``decode_image`` on the CPU, by the same rules, and copied to ``device``; so is any item when the
    batched nvJPEG call fails and the item then fails alone on the GPU too. Pixels can differ from the
    CPU decoder's by a level or two (a different IDCT and chroma upsampling). There is no reduced-size
    decoding here (nvJPEG has no DCT scaling). Needs torchvision built with CUDA image ops.

    ``device`` is where the tensors go; a CPU device runs the same code with torchvision's CPU
    (libjpeg) decoder instead of nvJPEG, which is no faster than ``decode_image`` and is there so the
    routing and fallbacks can be tested without a GPU.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.filterwarnings("ignore", message=_TORCHVISION_DEPRECATION, category=DeprecationWarning)
    blobs = list(blobs)
    names = list(names) if names is not None else [f"<item {index}, {len(blob)} bytes>" for index, blob in enumerate(blobs)]
    if len(names) != len(blobs):
        raise ValueError(f"got {len(blobs)} blobs but {len(names)} names")
    device = torch.device(device)
    results: list[torch.Tensor | DecodeError | None] = [None] * len(blobs)
    on_gpu: list[int] = []
    for index, (blob, item) in enumerate(zip(blobs, names, strict=True)):
        try:
            if _nvjpeg_can_take(blob, item, max_pixels):
                on_gpu.append(index)
            else:
                results[index] = _decode_on_cpu(blob, item, max_pixels, device)
        except DecodeError as error:
            results[index] = error

    if on_gpu:
        encoded = [torch.frombuffer(bytearray(blobs[index]), dtype=torch.uint8) for index in on_gpu]
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # nvJPEG returns nothing for the batch if one item fails: try them one by one
            decoded = [None] * len(on_gpu)
        for index, data, image in zip(on_gpu, encoded, decoded, strict=True):
            if image is None:
                try:
                    image = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    try:
                        results[index] = _decode_on_cpu(blobs[index], names[index], max_pixels, device)
                    except DecodeError as error:
                        results[index] = error
                    continue
            results[index] = image.permute(1, 2, 0).contiguous()  # (3, H, W) -> (H, W, 3), as the CPU decoder gives
    return results  # type: ignore[return-value]  # every slot is filled above


def _nvjpeg_can_take(blob: bytes, item: str, max_pixels: int | None) -> bool:
    """Whether nvJPEG should decode ``blob``: a complete, unrotated 3-channel JPEG under the limit.

    Reads only the header (PIL's lazy open). Raises ``DecodeError`` for an empty blob and
    ``ImageTooLargeError`` over ``max_pixels``; anything PIL cannot parse goes to the CPU path, which
    gives the proper error.
    """
    if len(blob) == 0:
        raise DecodeError(item, "empty input (0 bytes)")
    try:
        with Image.open(io.BytesIO(blob)) as im:
            check_pixels(item, im.width, im.height, max_pixels)
            if im.format != "JPEG" or im.mode != "RGB" or im.getexif().get(0x0112, 1) != 1:
                return False
    except DecodeError:
        raise
    except Exception:
        return False
    return blob.rfind(b"\xff\xd9", max(0, len(blob) - 4096)) != -1  # EOI near the end: not obviously truncated


def _decode_on_cpu(blob: bytes, item: str, max_pixels: int | None, device) -> torch.Tensor:
    import torch

    return torch.from_numpy(decode_image(blob, name=item, max_pixels=max_pixels)).to(device)
