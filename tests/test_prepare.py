"""The Engine's one input stage (prepare, decode), with_views and thumbnails, in process and over gRPC.

An input is checked once, wherever it comes from: the counts below patch the two checks (the 2:1
shape and the pixel limit) in every module that holds them. An error names its item once, and the
server's message is the in-process Engine's.
"""

import io
import math
import sys

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, EngineConfig, Panorama, Prepared
from engine.decode import check_pixels
from engine.models.tiny import make_tiny_clip
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.serve import wire
from engine.serve.server import BackgroundServer, ServerConfig
from engine.types import check_equirectangular
from kernels import ViewSpec
from kernels.reference import reproject_reference

MAX_PIXELS = 20_000  # 128 x 64 passes, 256 x 128 is over
OK, INVALID, EXHAUSTED = 0, 3, 8  # google.rpc.Code


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


@pytest.fixture(scope="module")
def engine(tiny_model) -> Engine:
    return Engine(EngineConfig(clip_model=tiny_model, batch_size=64, top_k=3, max_pixels=MAX_PIXELS))


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small(louvre) -> np.ndarray:
    return np.asarray(Image.fromarray(louvre).resize((128, 64), Image.Resampling.BILINEAR))


def counting(monkeypatch, name: str, original, counts_when=lambda *args: True) -> list:
    """Replace ``name`` in every engine and kernels module that holds ``original``: a list of the calls."""
    calls = []

    def counted(*args, **kwargs):
        if counts_when(*args, **kwargs):
            calls.append(args[0])
        return original(*args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith(("engine", "kernels")) and getattr(module, name, None) is original:
            monkeypatch.setattr(module, name, counted)
    return calls


def count_checks(monkeypatch) -> tuple[list, list]:
    """(2:1 checks, pixel-limit checks) by item; a pixel check with no limit (None) checks nothing and is not counted."""
    shapes = counting(monkeypatch, "check_equirectangular", check_equirectangular)
    pixels = counting(monkeypatch, "check_pixels", check_pixels,
                      lambda item, width, height, max_pixels: max_pixels is not None)
    return shapes, pixels


def stub(server) -> pb_grpc.MimeticStub:
    return pb_grpc.MimeticStub(grpc.insecure_channel(server.address))


# -- checked once -----------------------------------------------------------------------------------


def test_a_grpc_item_is_checked_once(engine, small, monkeypatch):
    blobs = [jpeg(np.roll(small, 8 * k, axis=1)) for k in range(3)] + [png(small)]
    raw = pb.Image(raw=pb.RawImage(data=small.tobytes(), height=64, width=128, channels=3))
    requests = [pb.EmbedRequest(request_id=f"r{k}", id=f"item-{k}", image=pb.Image(encoded=blob)) for k, blob in enumerate(blobs)]
    requests.append(pb.EmbedRequest(request_id="r4", id="item-4", image=raw))
    requests.append(pb.EmbedRequest(request_id="r5", id="item-5", image=pb.Image(encoded=blobs[0]), view_preset="cube6",
                                    outputs=[pb.OUTPUT_THUMBNAILS], thumbnail_size=32))
    with BackgroundServer(engine, ServerConfig(port=0, max_in_flight=6)) as server:  # loaded (and warmed up) here
        shapes, pixels = count_checks(monkeypatch)
        responses = list(stub(server).Embed(iter(requests)))
    assert [r.status.code for r in responses] == [OK] * 6, [r.status for r in responses]
    ids = [f"item-{k}" for k in range(6)]
    assert sorted(shapes) == ids and sorted(pixels) == ids  # each check once per item: none twice, none left out


def test_an_item_embedded_in_process_is_checked_once_and_a_prepared_one_not_again(engine, small, tmp_path, monkeypatch):
    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg(small))
    shapes, pixels = count_checks(monkeypatch)
    results = engine.embed([Panorama(id="bytes", data=jpeg(small)), Panorama(id="array", data=small)])
    assert [r.error for r in results] == [None, None]
    assert sorted(shapes) == ["array", "bytes"] and sorted(pixels) == ["array", "bytes"]

    prepared = engine.prepare(Panorama(id="prepared", data=jpeg(small)))
    decoded = engine.decode(engine.prepare(Panorama(id="decoded", data=small)))
    assert isinstance(prepared, Prepared) and prepared.pixels is None and isinstance(decoded.pixels, np.ndarray)
    again = engine.embed([prepared, decoded])
    assert [r.error for r in again] == [None, None] and [r.id for r in again] == ["prepared", "decoded"]
    assert shapes.count("prepared") == shapes.count("decoded") == 1  # at prepare, never in embed
    assert pixels.count("prepared") == pixels.count("decoded") == 1
    # The same results as the Panoramas embedded whole.
    torch.testing.assert_close(again[0].embeddings, results[0].embeddings)
    torch.testing.assert_close(again[1].embeddings, results[1].embeddings)

    # A file is held to the pixel limit again when it is decoded: it may have changed since its header was read.
    [from_file] = engine.embed([Panorama(id="file", data=str(path))])
    assert from_file.error is None and shapes.count("file") == 1 and pixels.count("file") == 2


def test_prepare_reads_the_cost_from_the_header_and_refuses_before_decoding(engine, small):
    prepared = engine.prepare(Panorama(id="p", data=jpeg(small), yaw_offset=540.0))
    assert (prepared.header.width, prepared.header.height) == (128, 64) and prepared.pixels is None
    assert prepared.yaw_offset == -180.0  # 540 degrees, reduced exactly
    assert prepared.cost >= 3 * 128 * 64  # at least the RGB array it becomes
    assert engine.prepare(Panorama(id="a", data=small)).cost == 3 * 128 * 64  # an array: its RGB copy exactly
    with pytest.raises(ValueError, match=r"^square: equirectangular panoramas are 2:1, got 64x64$"):
        engine.prepare(Panorama(id="square", data=jpeg(small[:, :64])))
    with pytest.raises(ValueError, match=r"^big: 256x128 is 32,768 pixels, over the limit of 20,000"):
        engine.prepare(Panorama(id="big", data=np.zeros((128, 256, 3), np.uint8)))
    with pytest.raises(ValueError, match=r"^p: yaw_offset must be a finite number of degrees, got inf$"):
        engine.prepare(Panorama(id="p", data=small, yaw_offset=math.inf))
    with pytest.raises(TypeError, match="expected a Panorama, got str"):
        engine.prepare("p.jpg")


# -- errors name their item once, and are the Engine's own -------------------------------------------


def test_a_grpc_item_s_error_names_it_once_and_is_the_engine_s_message(engine, small):
    name = "pano-7"
    good = jpeg(small)
    cases = {
        "yaw": (dict(image=pb.Image(encoded=good), yaw_offset=math.nan), INVALID, Panorama(name, good, yaw_offset=math.nan)),
        "square": (dict(image=pb.Image(encoded=jpeg(small[:, :64]))), INVALID, Panorama(name, jpeg(small[:, :64]))),
        "big": (dict(image=pb.Image(encoded=jpeg(np.zeros((128, 256, 3), np.uint8)))), EXHAUSTED,
                Panorama(name, jpeg(np.zeros((128, 256, 3), np.uint8)))),
        "truncated": (dict(image=pb.Image(encoded=good[: len(good) // 2])), INVALID, Panorama(name, good[: len(good) // 2])),
        "garbage": (dict(image=pb.Image(encoded=b"not an image")), INVALID, Panorama(name, b"not an image")),
        "raw-square": (dict(image=pb.Image(raw=pb.RawImage(data=bytes(300), height=10, width=10, channels=3))), INVALID,
                       Panorama(name, np.zeros((10, 10, 3), np.uint8))),
        "raw-short": (dict(image=pb.Image(raw=pb.RawImage(data=bytes(10), height=64, width=128, channels=3))), INVALID, None),
        "views": (dict(image=pb.Image(encoded=good), views=pb.ViewList(views=[pb.View(fov=200.0)])), INVALID, None),
        "view-size": (dict(image=pb.Image(encoded=good), views=pb.ViewList(views=[pb.View(width=7, height=7)])), INVALID, None),
        "preset": (dict(image=pb.Image(encoded=good), view_preset="ring5"), INVALID, None),
        "no-image": (dict(), INVALID, None),
    }
    requests = [pb.EmbedRequest(request_id=key, id=name, **fields) for key, (fields, _, _) in cases.items()]
    with BackgroundServer(engine, ServerConfig(port=0, max_in_flight=len(requests))) as server:
        responses = {r.request_id: r.status for r in stub(server).Embed(iter(requests))}
    for key, (_, code, local) in cases.items():
        status = responses[key]
        assert status.code == code, (key, status)
        assert status.message.startswith(f"{name}: ") and status.message.count(name) == 1, (key, status.message)
        if local is not None:  # the in-process Engine says the same of the same input
            [expected] = engine.embed([local])
            assert status.message == expected.error, key
    assert "yaw_offset must be a finite number of degrees, got nan" in responses["yaw"].message
    assert "model's input size" in responses["view-size"].message and "ring5" in responses["preset"].message


# -- with_views ---------------------------------------------------------------------------------------


def test_with_views_shares_the_model_and_embeds_as_an_engine_built_with_those_views(engine, tiny_model, small):
    ring4 = engine.with_views("ring4")
    assert ring4 is not engine and engine.with_views(engine.views) is engine
    assert ring4.clip is engine.clip and ring4.decode_budget is engine.decode_budget
    assert ring4.vocabularies is engine.vocabularies and len(engine.views) == 8  # the original keeps its own
    built = Engine(EngineConfig(clip_model=tiny_model, views="ring4", top_k=3, max_pixels=MAX_PIXELS))
    assert ring4.views == built.views and ring4.min_decode_width == built.min_decode_width
    [mine], [theirs] = ring4.embed([Panorama(id="p", data=jpeg(small))]), built.embed([Panorama(id="p", data=jpeg(small))])
    torch.testing.assert_close(mine.embeddings, theirs.embeddings)

    height, width = engine.clip.image_size
    listed = engine.with_views([{"yaw": 30.0, "pitch": 10.0}, ViewSpec(yaw=-30.0, fov=60.0, width=width, height=height)])
    assert listed.views == [ViewSpec(30.0, 10.0, 0.0, 90.0, width, height), ViewSpec(-30.0, 0.0, 0.0, 60.0, width, height)]
    with pytest.raises(ValueError, match="model's input size"):
        engine.with_views([ViewSpec(yaw=0.0, width=width + 1, height=height)])
    with pytest.raises(ValueError, match="ring5"):
        engine.with_views("ring5")


# -- thumbnails -----------------------------------------------------------------------------------------


def _decoded(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as image:
        assert image.format == "JPEG"
        return np.asarray(image.convert("RGB"))


def test_thumbnails_are_the_views_at_their_size_and_turn_with_the_yaw_offset(engine, small):
    blob = jpeg(small, quality=95)
    plain, turned = engine.with_views("ring4").embed(
        [Panorama(id="plain", data=blob), Panorama(id="turned", data=blob, yaw_offset=90.0)], thumbnails=40
    )
    assert len(plain.thumbnails) == len(turned.thumbnails) == 4
    pano = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    for view, thumbnail in zip(engine.with_views("ring4").views, plain.thumbnails, strict=True):
        got = _decoded(thumbnail)
        assert got.shape == (40, 40, 3)
        small_view = ViewSpec(view.yaw, view.pitch, view.roll, view.fov, 40, 40)
        expected = reproject_reference(pano, [small_view])[0].transpose(1, 2, 0)  # float64, the kernels' reference
        assert np.abs(got - expected).mean() < 4.0  # JPEG's error only
    # yaw_offset 90 turns view k to where view k + 1 (yaw + 90) looks.
    for k in range(3):
        assert np.abs(_decoded(turned.thumbnails[k]).astype(float) - _decoded(plain.thumbnails[k + 1])).mean() < 4.0
    [none] = engine.embed([Panorama(id="p", data=blob)])
    assert none.thumbnails == []
    with pytest.raises(ValueError, match="thumbnails must be"):
        engine.embed([Panorama(id="p", data=blob)], thumbnails=0)


def test_the_server_s_thumbnails_are_the_engine_s(engine, small):
    blob = jpeg(small)
    request = pb.EmbedRequest(request_id="r", id="p", image=pb.Image(encoded=blob), view_preset="cube6",
                              outputs=[pb.OUTPUT_THUMBNAILS], thumbnail_size=32, yaw_offset=30.0)
    with BackgroundServer(engine, ServerConfig(port=0)) as server:
        [response] = list(stub(server).Embed(iter([request])))
    assert response.status.code == OK
    [local] = engine.with_views("cube6").embed([Panorama(id="p", data=blob, yaw_offset=30.0)], thumbnails=32)
    assert list(response.thumbnails) == local.thumbnails and len(local.thumbnails) == 6
    assert wire.result_from_response(response, dtype=torch.float32, views=[]).thumbnails == local.thumbnails
