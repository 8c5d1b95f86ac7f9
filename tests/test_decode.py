"""Decoding real and generated images: modes, 16-bit scaling, EXIF, the pixel limit and typed errors."""

import io
import math
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.decode import DecodeError, ImageTooLargeError, decode_image, decode_jpeg_batch_cuda, required_width
from engine.views import view_set


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


# --- reduced-size JPEG decoding (min_width), required_width, and the shared panoramas ---------------


def jpeg_bytes(array: np.ndarray, **save_options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90, **save_options)
    return buffer.getvalue()


@pytest.mark.parametrize(("min_width", "shape"), [(1000, (512, 1024, 3)), (1024, (512, 1024, 3)), (2000, (1024, 2048, 3)), (3000, (2048, 4096, 3))])
def test_min_width_decodes_a_jpeg_at_the_greatest_dct_reduction_that_is_wide_enough(panoramas_dir, min_width, shape):
    path = panoramas_dir / "louvre.jpg"
    pano = decode_image(path, min_width=min_width)
    assert pano.shape == shape and pano.dtype == np.uint8
    assert pano.flags.c_contiguous and pano.flags.writeable
    np.testing.assert_array_equal(decode_image(path.read_bytes(), min_width=min_width), pano)


def test_min_width_is_never_undershot_and_the_result_is_the_full_image_reduced(panoramas_dir):
    path = panoramas_dir / "louvre.jpg"
    for min_width in (1, 7, 500, 512, 513, 704, 1025, 2047, 2048, 2049, 4096, 5000):
        height, width = decode_image(path, min_width=min_width).shape[:2]
        assert width >= min(min_width, 4096) and height >= min(math.ceil(min_width / 2), 2048)
        scale = 4096 // width
        assert scale in (1, 2, 4, 8) and (scale == 8 or 4096 // (2 * scale) < min_width)  # the next reduction would undershoot
    full = decode_image(path).astype(np.float64)
    quarter = decode_image(path, min_width=1000).astype(np.float64)
    box = full.reshape(512, 4, 1024, 4, 3).mean(axis=(1, 3))
    assert np.abs(box - quarter).mean() < 1.0  # libjpeg's 1/4 IDCT is close to a 4x4 box filter of the full image


def test_min_width_counts_columns_as_displayed_after_an_exif_rotation():
    """Stored 800x400 with orientation 6 (rotate 90° for display): displayed 400 wide, 800 high."""
    stored = np.random.default_rng(1).integers(0, 256, (400, 800, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    blob = jpeg_bytes(stored, exif=exif)
    assert decode_image(blob).shape == (800, 400, 3)
    # 200 columns as displayed need 200 stored rows: 1/2 scale. Asking on the stored width would pick 1/4 (100 columns).
    assert decode_image(blob, min_width=200).shape == (400, 200, 3)
    assert decode_image(blob, min_width=100).shape == (200, 100, 3)


def test_min_width_is_ignored_by_other_formats_and_arrays(panoramas_dir):
    assert decode_image(panoramas_dir / "axes.png", min_width=100).shape == (512, 1024, 3)
    assert decode_image(panoramas_dir / "world-rgba.png", min_width=50).shape == (400, 800, 3)
    array = np.zeros((64, 128, 3), np.uint8)
    assert decode_image(array, min_width=16) is array


def test_min_width_greyscale_and_cmyk_jpegs_are_reduced_and_become_rgb():
    grey = np.tile(np.arange(256, dtype=np.uint8), (512, 4))  # 512 x 1024
    out = decode_image(jpeg_bytes(grey), min_width=256)
    assert out.shape == (128, 256, 3) and (out[..., 0] == out[..., 2]).all()
    strip = jpeg_bytes(grey[:128])  # 1024 x 128, wider than 2:1: the rows bound (>= 128) allows no reduction
    assert decode_image(strip, min_width=256).shape == (128, 1024, 3)
    buffer = io.BytesIO()
    Image.new("CMYK", (512, 256), (0, 255, 255, 0)).save(buffer, "JPEG")
    out = decode_image(buffer.getvalue(), min_width=128)
    assert out.shape == (64, 128, 3)
    assert np.abs(out[32, 64].astype(int) - (255, 0, 0)).max() <= 8


def test_min_width_still_refuses_a_bomb_from_the_full_header_size():
    """A JPEG whose header says 60000x60000 is refused before decoding, even though 1/8 of it would fit."""
    blob = bytearray(jpeg_bytes(np.zeros((16, 16, 3), np.uint8)))
    sof = blob.index(b"\xff\xc0")  # baseline start-of-frame: length (2), precision (1), height (2), width (2)
    blob[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match=r"^bomb\.jpg: 60000x60000 is 3,600,000,000 pixels"):
        decode_image(bytes(blob), name="bomb.jpg", min_width=8)
    with pytest.raises(ImageTooLargeError):
        decode_image(bytes(blob), name="bomb.jpg", min_width=8, max_pixels=7500 * 7500)  # the 1/8 size would be exactly at it
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("min_width", [0, -5, 1.5, True, "1000"])
def test_bad_min_width(min_width):
    with pytest.raises(ValueError, match="min_width"):
        decode_image(b"x", min_width=min_width)


def test_required_width():
    assert required_width(view_set("ring8")) == 704  # 2 pi * 112 = 703.7: ring8 at 224 px, fov 90
    assert required_width(view_set("ring8"), densest=True) == 2112  # the corner: 3x the centre's density at fov 90
    assert required_width(view_set("cube6", size=512)) == math.ceil(2 * math.pi * 256)
    assert required_width(view_set("ring8", fov=60)) == math.ceil(2 * math.pi * 112 / math.tan(math.radians(30)))
    views = view_set([{"yaw": 0, "pitch": 80, "width": 100, "height": 50}, {"fov": 30, "width": 64, "height": 64}])
    assert required_width(views) == math.ceil(2 * math.pi * 32 / math.tan(math.radians(15)))  # the max over views
    with pytest.raises(ValueError, match="at least one view"):
        required_width([])


def test_required_width_with_min_width_picks_quarter_scale_for_ring8(panoramas_dir):
    pano = decode_image(panoramas_dir / "louvre.jpg", min_width=required_width(view_set("ring8")))
    assert pano.shape == (512, 1024, 3)  # 704 columns needed: 1/4 scale gives 1024, 1/8 would give 512


@pytest.mark.parametrize("name", ["louvre.jpg", "jordan-pond.jpg", "axes.png", "world-rgba.png"])
def test_all_shared_panoramas_decode_to_2_to_1_rgb(panoramas_dir, name):
    for min_width in (None, 400):
        pano = decode_image(panoramas_dir / name, min_width=min_width)
        height, width, channels = pano.shape
        assert channels == 3 and pano.dtype == np.uint8 and width == 2 * height
        assert pano.flags.c_contiguous


def test_zero_byte_inputs_name_the_item(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DecodeError, match=r"empty file \(0 bytes\)") as info:
        decode_image(empty, min_width=100)
    assert info.value.item == str(empty)
    with pytest.raises(DecodeError, match=r"^rome/000123\.jpg: empty input \(0 bytes\)") as info:
        decode_image(b"", name="rome/000123.jpg", min_width=100)
    assert info.value.item == "rome/000123.jpg"


def bogus_huffman_jpeg(blob: bytes) -> bytes:
    """``blob`` with its first Huffman table's code counts set to 255: PIL parses the header, libjpeg refuses to decode."""
    data = bytearray(blob)
    dht = data.index(b"\xff\xc4")  # define-Huffman-table: length (2), class/id (1), 16 code counts
    data[dht + 5 : dht + 21] = b"\xff" * 16
    return bytes(data)


def test_jpeg_batch_routing_and_fallbacks_run_on_cpu_too(panoramas_dir):
    """The batch function's logic with torchvision's CPU decoder: one bad JPEG fails the batched call, so each item is retried."""
    import torch

    louvre = (panoramas_dir / "louvre.jpg").read_bytes()
    small = jpeg_bytes(np.random.default_rng(2).integers(0, 256, (32, 64, 3), dtype=np.uint8))
    blobs = [small, bogus_huffman_jpeg(small), b"", (panoramas_dir / "axes.png").read_bytes(), louvre[: len(louvre) // 2], b"garbage!"]
    out = decode_jpeg_batch_cuda(blobs, ["small", "bogus", "empty", "axes", "half", "garbage"], device="cpu")
    assert [type(entry).__name__ for entry in out] == ["Tensor", "DecodeError", "DecodeError", "Tensor", "DecodeError", "DecodeError"]
    assert out[0].shape == (32, 64, 3) and out[0].dtype == torch.uint8 and out[0].is_contiguous()
    assert np.abs(out[0].numpy().astype(int) - decode_image(small).astype(int)).max() <= 2
    np.testing.assert_array_equal(out[3].numpy(), decode_image(blobs[3]))
    assert out[1].item == "bogus" and "corrupt" in out[1].reason
    assert out[2].item == "empty" and "empty" in out[2].reason
    assert out[4].item == "half" and "truncated" in out[4].reason
    assert out[5].item == "garbage" and "not a recognised image format" in out[5].reason
    unnamed = decode_jpeg_batch_cuda([b""], device="cpu")
    assert isinstance(unnamed[0], DecodeError) and unnamed[0].item == "<item 0, 0 bytes>"
    too_large = decode_jpeg_batch_cuda([small], ["small"], device="cpu", max_pixels=100)
    assert isinstance(too_large[0], ImageTooLargeError)
    assert decode_jpeg_batch_cuda([], device="cpu") == []
    with pytest.raises(ValueError, match="2 blobs but 1 names"):
        decode_jpeg_batch_cuda([small, small], ["one"], device="cpu")


@pytest.mark.cuda
def test_nvjpeg_batch_matches_the_cpu_decoder_and_isolates_bad_items(panoramas_dir):
    import torch

    louvre = (panoramas_dir / "louvre.jpg").read_bytes()
    blobs = [
        louvre,
        (panoramas_dir / "jordan-pond.jpg").read_bytes(),  # progressive
        louvre[: len(louvre) // 2],  # truncated: goes to the CPU decoder, which refuses it
        b"",
        (panoramas_dir / "axes.png").read_bytes(),  # not a JPEG: decoded on the CPU, returned on the GPU
        b"not an image at all",
        louvre,
        bogus_huffman_jpeg(louvre),  # passes the header checks, fails nvJPEG: the batched call fails, items retried alone
    ]
    names = ["louvre", "jordan", "half", "empty", "axes", "garbage", "louvre-again", "bogus"]
    out = decode_jpeg_batch_cuda(blobs, names)
    assert len(out) == len(blobs)
    for index in (0, 1, 4, 6):
        image = out[index]
        assert isinstance(image, torch.Tensor) and image.is_cuda and image.dtype == torch.uint8 and image.is_contiguous()
        expected = decode_image(blobs[index])
        assert tuple(image.shape) == expected.shape
        difference = np.abs(image.cpu().numpy().astype(int) - expected.astype(int))
        assert difference.mean() < 2.5  # nvJPEG's IDCT and chroma upsampling differ from libjpeg's by a level or two
    for index, reason in ((2, "truncated"), (3, "empty"), (5, "not a recognised image format"), (7, "corrupt")):
        assert isinstance(out[index], DecodeError) and out[index].item == names[index] and reason in out[index].reason
    too_large = decode_jpeg_batch_cuda([louvre], ["big"], max_pixels=4096 * 2048 - 1)
    assert isinstance(too_large[0], ImageTooLargeError) and too_large[0].item == "big"
