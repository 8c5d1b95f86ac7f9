"""Decoding real and generated images: modes, 16-bit scaling, EXIF, the pixel limit and typed errors."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.decode import DecodeError, ImageTooLargeError, decode_image


def png_bytes(array: np.ndarray, *, bit_depth: int = 16, size: tuple[int, int] | None = None) -> bytes:
    """A minimal PNG written by hand, so 16-bit RGB and lying headers can be made without extra packages.

    ``array`` is (H, W) grey or (H, W, 3) RGB; ``size`` = (width, height) overrides the header only.
    """
    height, width = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    if size is not None:
        width, height = size
    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = array.astype(dtype).reshape(array.shape[0], -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def round257(values) -> np.ndarray:
    return np.floor(np.asarray(values, dtype=np.float64) / 257 + 0.5).astype(np.uint8)


LEVELS16 = np.array([0, 1, 128, 129, 257, 385, 386, 32767, 32768, 40000, 65279, 65534, 65535], dtype=np.uint16)


def test_real_jpeg_panorama(panoramas_dir):
    pano = decode_image(panoramas_dir / "louvre.jpg")
    assert pano.shape == (2048, 4096, 3) and pano.dtype == np.uint8
    assert pano.flags.c_contiguous and pano.flags.writeable
    assert 10 < pano.mean() < 245  # a real photograph, not a blank


def test_rgba_png_drops_alpha(panoramas_dir):
    path = panoramas_dir / "world-rgba.png"
    pano = decode_image(path)
    assert pano.shape == (400, 800, 3) and pano.dtype == np.uint8
    with Image.open(path) as im:
        assert im.mode == "RGBA"
        np.testing.assert_array_equal(pano, np.asarray(im)[:, :, :3])


def test_path_str_bytes_and_array_agree(panoramas_dir):
    path = panoramas_dir / "axes.png"
    from_path = decode_image(path)
    assert from_path.shape == (512, 1024, 3)
    np.testing.assert_array_equal(decode_image(str(path)), from_path)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), from_path)
    assert decode_image(from_path) is from_path  # uint8 (H, W, 3) C-contiguous: returned as is


def test_16bit_greyscale_is_scaled_by_1_over_257_not_clipped(tmp_path):
    grey = np.tile(LEVELS16, (3, 1))
    path = tmp_path / "grey16.png"
    Image.fromarray(grey).save(path)  # PIL writes mode I;16 as a 16-bit greyscale PNG
    with Image.open(path) as im:
        assert im.mode == "I;16"
        assert np.asarray(im.convert("L"))[0, -1] == 255 and np.asarray(im.convert("L"))[0, 4] == 255  # PIL clips 257 to 255
    out = decode_image(path)
    assert out.shape == (3, LEVELS16.size, 3)
    expected = round257(LEVELS16)
    assert expected[[0, 4, 9, -1]].tolist() == [0, 1, 156, 255]
    for channel in range(3):
        np.testing.assert_array_equal(out[0, :, channel], expected)


def test_16bit_greyscale_big_endian_png_written_by_hand():
    out = decode_image(png_bytes(np.tile(LEVELS16, (2, 1))), name="grey16be.png")
    np.testing.assert_array_equal(out[1, :, 1], round257(LEVELS16))


def test_16bit_rgb_png_is_within_one_level_of_round_v_over_257():
    rgb = np.stack([LEVELS16, LEVELS16[::-1], np.full_like(LEVELS16, 40000)], axis=-1)[None].repeat(2, axis=0)
    out = decode_image(png_bytes(rgb), name="rgb16.png")
    assert out.shape == (2, LEVELS16.size, 3) and out.dtype == np.uint8
    difference = np.abs(out.astype(int) - round257(rgb).astype(int))
    assert difference.max() <= 1
    assert out[0, -1, 0] == 255 and out[0, 0, 0] == 0


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("L", 200, (200, 200, 200)),
        ("1", 1, (255, 255, 255)),
        ("LA", (90, 0), (90, 90, 90)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),
    ],
)
def test_modes_become_rgb(tmp_path, mode, colour, expected):
    path = tmp_path / f"{mode}.tiff"
    Image.new(mode, (8, 4), colour).save(path)
    out = decode_image(path)
    assert out.shape == (4, 8, 3) and out.dtype == np.uint8
    assert tuple(out[2, 5]) == expected


def test_palette_png_becomes_rgb():
    im = Image.new("P", (6, 3))
    im.putpalette([0, 0, 0, 12, 200, 99] + [0] * 762)
    im.putpixel((4, 1), 1)
    buffer = io.BytesIO()
    im.save(buffer, "PNG")
    out = decode_image(buffer.getvalue())
    assert tuple(out[1, 4]) == (12, 200, 99) and tuple(out[0, 0]) == (0, 0, 0)


def test_exif_orientation_is_applied():
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # red at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 for display
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", exif=exif)
    out = decode_image(buffer.getvalue())
    assert tuple(out[1, 3]) == (255, 0, 0) and tuple(out[0, 0]) == (0, 0, 0)


def test_truncated_jpeg_raises_decode_error_naming_the_item(panoramas_dir, tmp_path):
    data = (panoramas_dir / "louvre.jpg").read_bytes()
    half = data[: len(data) // 2]
    with pytest.raises(DecodeError, match=r"^louvre-half\.jpg: truncated") as info:
        decode_image(half, name="louvre-half.jpg")
    assert info.value.item == "louvre-half.jpg" and "truncated" in info.value.reason
    assert isinstance(info.value, ValueError)

    path = tmp_path / "half.jpg"
    path.write_bytes(half)
    with pytest.raises(DecodeError, match="truncated") as info:
        decode_image(path)
    assert str(path) in str(info.value)


def test_garbage_bytes_raise_decode_error():
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(DecodeError, match=r"^noise\.bin: not a recognised image format"):
        decode_image(garbage, name="noise.bin")
    with pytest.raises(DecodeError, match=r"^<5000 bytes>: "):
        decode_image(garbage)


def test_corrupt_png_data_raises_decode_error():
    good = png_bytes(np.tile(LEVELS16, (4, 1)))
    idat = good.index(b"IDAT") + 4
    broken = good[:idat] + bytes(64) + good[idat + 64 :]  # the compressed stream zeroed
    with pytest.raises(DecodeError, match=r"^broken\.png: "):
        decode_image(broken, name="broken.png")


@pytest.mark.parametrize(("source", "reason"), [(b"", "empty"), ("/nonexistent/pano.jpg", "cannot read the file")])
def test_empty_or_missing_input(source, reason):
    with pytest.raises(DecodeError, match=reason) as info:
        decode_image(source, name="item-7")
    assert info.value.item == "item-7"


def test_pixel_limit_breach_is_a_clear_error(panoramas_dir):
    path = panoramas_dir / "axes.png"
    assert decode_image(path, max_pixels=1024 * 512).shape == (512, 1024, 3)  # exactly at the limit is fine
    with pytest.raises(ImageTooLargeError, match=r"1024x512 is 524,288 pixels, over the limit of 524,287 \(max_pixels") as info:
        decode_image(path, max_pixels=1024 * 512 - 1)
    assert isinstance(info.value, DecodeError) and str(path) in str(info.value)
    with pytest.raises(ImageTooLargeError):
        decode_image(np.zeros((10, 20, 3), np.uint8), max_pixels=199)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    """A 100k x 100k header over a 4x4 image (a decompression bomb's shape) is refused without allocating."""
    bomb = png_bytes(np.zeros((4, 4), np.uint16), size=(100_000, 100_000))
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match=r"^bomb\.png: 100000x100000 is 10,000,000,000 pixels, over the limit of 268,435,456"):
        decode_image(bomb, name="bomb.png")
    assert time.perf_counter() - started < 1.0


def test_arrays():
    grey16 = np.tile(LEVELS16, (2, 1))
    out = decode_image(grey16)
    assert out.shape == (2, LEVELS16.size, 3)
    np.testing.assert_array_equal(out[0, :, 2], round257(LEVELS16))
    rgba = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(decode_image(rgba), rgba[:, :, :3])
    with pytest.raises(DecodeError, match=r"^views\[3\]: array dtype must be uint8 or uint16"):
        decode_image(np.zeros((4, 8, 3), np.float32), name="views[3]")
    with pytest.raises(DecodeError, match="shape"):
        decode_image(np.zeros((4, 8, 2), np.uint8))


def test_bad_max_pixels_and_source_types():
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(b"x", max_pixels=0)
    with pytest.raises(TypeError):
        decode_image(12345)
