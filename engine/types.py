"""The Engine's plain data: its input (``Panorama``), what its input stage makes of one (``Prepared``),
its output (``EmbedResult``), and the input rules that need no model.

Light on purpose: numpy and the decoder's errors, no torch, no model, so that the client and the
other shells can check an input the way the Engine does without loading one.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from engine.decode import DecodeError, ImageHeader

if TYPE_CHECKING:
    import torch

    from engine.budget import Reservation
    from kernels import ViewSpec


@dataclass
class Panorama:
    """One input: an id, the image (encoded bytes, a path, or a uint8 array), and metadata echoed back.

    ``yaw_offset`` (degrees) is added to every view's yaw, e.g. to point views at compass bearings.
    """

    id: str
    data: bytes | str | os.PathLike | np.ndarray | torch.Tensor
    meta: dict = field(default_factory=dict)
    yaw_offset: float = 0.0


@dataclass
class EmbedResult:
    """What the engine saw in one panorama; ``error`` names the item and the reason when it failed."""

    id: str
    views: list[ViewSpec]
    embeddings: torch.Tensor | None = None  # (N, D), L2-normalised; fp16 on CUDA, fp32 on CPU
    pooled: torch.Tensor | None = None  # (D,), the normalised mean of the view embeddings
    readings: dict = field(default_factory=dict)  # vocabulary -> {"pooled": [(label, p)], "views": [[(label, p)]]}
    meta: dict = field(default_factory=dict)
    error: str | None = None
    thumbnails: list[bytes] = field(default_factory=list)  # a JPEG per view, when asked for (``thumbnails=size``)
    captions: list[str] | None = None  # a caption per view, when a captioner was given (``captioner=``)


@dataclass(eq=False)
class Prepared:
    """A Panorama that passed ``Engine.prepare``: checked once, its size and decode cost read from its header.

    ``Engine.decode`` fills in ``pixels``; ``Engine.embed_iter`` takes a Prepared as it takes a Panorama,
    and checks nothing again. One that is already decoded is the caller's memory: the Engine holds no
    decode budget for it (a caller that admitted it against a budget keeps that hold until its result).
    """

    panorama: Panorama
    yaw_offset: float  # reduced to [-180, 180) exactly (kernels.geometry.wrap_degrees)
    header: ImageHeader  # the full size as displayed; ``format`` None for an array
    cost: int  # peak bytes decoding it takes (engine.decode.decode_cost), what a DecodeBudget admits it for
    min_width: int | None  # decode a JPEG at the smallest DCT scale that keeps this many columns (None: full size)
    on_device: bool = False  # left encoded by ``decode``: the Engine decodes it with its group, with nvJPEG
    host: bool = False  # decoded into a NumPy array on the CPU whatever the device (for callers that use the pixels)
    thumbnail_size: int | None = None  # width of a JPEG thumbnail per view in the result, when asked for
    pixels: object = None  # once decoded: uint8 (H, W, 3) (an array, or a tensor), or the bytes nvJPEG decodes
    reservation: Reservation | None = None  # the Engine's own hold in its decode budget, while it embeds it

    @property
    def id(self) -> str:
        return self.panorama.id

    @property
    def meta(self) -> dict:
        return self.panorama.meta

    @property
    def encoded(self) -> bool:
        return self.header.format is not None

    def release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None


class InvalidPanoramaError(DecodeError):
    """A Panorama whose fields (not its image) are wrong: an empty id, a yaw_offset that is not a finite number."""


_ENCODED = (bytes, bytearray, memoryview, str, os.PathLike)


def check_panorama(item) -> None:
    """The rules for a Panorama's own fields (its image is the decoder's): TypeError for anything but a
    Panorama, InvalidPanoramaError for an empty id, a yaw_offset that is not a finite number, or data
    that is not a path, bytes or an array."""
    if not isinstance(item, Panorama):
        raise TypeError(f"expected a Panorama, got {type(item).__name__}")
    if not isinstance(item.id, str) or not item.id:
        raise InvalidPanoramaError(repr(item.id), "panorama id must be a non-empty string")
    offset = item.yaw_offset
    if isinstance(offset, bool) or not isinstance(offset, (int, float, np.integer, np.floating)) or not math.isfinite(offset):
        raise InvalidPanoramaError(item.id, f"yaw_offset must be a finite number of degrees, got {offset!r}")
    if not isinstance(item.data, _ENCODED) and not _is_array(item.data):
        raise InvalidPanoramaError(item.id, f"data must be a path, bytes or a uint8 array, got {type(item.data).__name__}")


def _is_array(data) -> bool:
    if isinstance(data, np.ndarray):
        return True
    torch = sys.modules.get("torch")  # a tensor exists only where torch is loaded: no import for the check
    return torch is not None and isinstance(data, torch.Tensor)


def array_header(data) -> ImageHeader:
    """An array's (or a tensor's) size, as ``read_header`` gives an encoded image's: nothing is copied."""
    shape = tuple(data.shape)
    height, width = shape[:2] if len(shape) >= 2 else (0, 0)
    return ImageHeader(width, height, None, (width, height))


class NotEquirectangularError(DecodeError):
    """The image is not 2:1: a plain image, for the callers that take those too (caption, translate)."""


def check_equirectangular(item_id: str, shape: tuple) -> None:
    """A 2:1 (height, width, ...) shape, or a NotEquirectangularError naming the item and the size it has."""
    height, width = shape[:2]
    if width != 2 * height:
        raise NotEquirectangularError(item_id, f"equirectangular panoramas are 2:1, got {width}x{height}")


def read_bytes(data, item_id: str) -> bytes:
    """Encoded bytes of a path or bytes input; an unreadable or empty file is a DecodeError naming the item."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        blob = bytes(data)
    else:
        try:
            with open(data, "rb") as stream:
                blob = stream.read()
        except OSError as exc:
            raise DecodeError(item_id, f"cannot read the file ({exc.strerror or exc})") from exc
    if not blob:
        raise DecodeError(item_id, "empty input (0 bytes)")
    return blob


def error_message(item, exc: Exception) -> str:
    """The error text of an item that failed: it names the item once (a DecodeError's text already does)."""
    if isinstance(exc, DecodeError):
        return str(exc)
    return f"{getattr(item, 'id', None)}: {exc}"


def item_meta(item) -> dict:
    """The metadata a failed item's result echoes back: its own dict, or an empty one for a malformed input."""
    meta = getattr(item, "meta", None)
    return meta if isinstance(meta, dict) else {}
