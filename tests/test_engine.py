"""The Engine end to end on the tiny open_clip model: shapes, invariances, readings, per-item errors."""

import io
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, EngineConfig, Panorama
from engine.models.tiny import make_tiny_clip

from .conftest import PANORAMAS


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


@pytest.fixture(scope="session")
def engine(tiny_clip) -> Engine:
    return Engine(EngineConfig(clip_model=tiny_clip, batch_size=16, top_k=3))


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def small_louvre(louvre) -> np.ndarray:
    return np.asarray(Image.fromarray(louvre).resize((512, 256), Image.Resampling.BILINEAR))


def test_embeddings_have_the_right_shape_dtype_and_norm(engine, small_louvre):
    [result] = engine.embed([Panorama(id="louvre", data=jpeg(small_louvre), meta={"city": "Paris"})])
    assert result.error is None
    dim = engine.clip.embed_dim
    assert result.embeddings.shape == (8, dim) and result.embeddings.dtype == torch.float32
    assert result.pooled.shape == (dim,)
    torch.testing.assert_close(result.embeddings.norm(dim=1), torch.ones(8), atol=1e-5, rtol=0)
    assert abs(float(result.pooled.norm()) - 1) < 1e-5
    assert result.meta == {"city": "Paris"} and result.id == "louvre"
    assert [v.yaw for v in result.views] == [45.0 * k for k in range(8)]
    assert all((v.width, v.height) == (engine.clip.image_size[1], engine.clip.image_size[0]) for v in result.views)


def test_embeddings_are_deterministic(engine, small_louvre):
    first = engine.embed([Panorama(id="a", data=jpeg(small_louvre))])[0].embeddings
    second = engine.embed([Panorama(id="a", data=jpeg(small_louvre))])[0].embeddings
    assert torch.equal(first, second)


def test_a_panorama_alone_and_in_a_batch_of_seven_embed_alike(engine, small_louvre):
    panoramas = [Panorama(id=f"p{k}", data=jpeg(np.roll(small_louvre, 37 * k, axis=1))) for k in range(7)]
    batch = engine.embed(panoramas)
    for k in (0, 3, 6):
        alone = engine.embed([panoramas[k]])[0]
        torch.testing.assert_close(batch[k].embeddings, alone.embeddings, atol=1e-5, rtol=0)
    assert [r.id for r in batch] == [f"p{k}" for k in range(7)]


def test_yaw_offset_turns_the_ring(engine, small_louvre):
    """With ring8, a 45 degree offset makes view k see what view k + 1 saw without it."""
    plain, turned = engine.embed(
        [Panorama(id="plain", data=small_louvre), Panorama(id="turned", data=small_louvre, yaw_offset=45.0)]
    )
    torch.testing.assert_close(turned.embeddings[:-1], plain.embeddings[1:], atol=1e-4, rtol=0)


def test_zero_shot_probabilities_sum_to_one(tiny_clip, small_louvre):
    everything = Engine(EngineConfig(clip_model=tiny_clip, vocabularies=("urban", "materials"), top_k=10_000))
    [result] = everything.embed([Panorama(id="louvre", data=small_louvre)])
    for name, reading in result.readings.items():
        assert len(reading["pooled"]) == len(everything.vocabularies[name].labels)
        assert math.isclose(sum(p for _, p in reading["pooled"]), 1.0, abs_tol=1e-4)
        for per_view in reading["views"]:
            assert math.isclose(sum(p for _, p in per_view), 1.0, abs_tol=1e-4)
            assert [p for _, p in per_view] == sorted((p for _, p in per_view), reverse=True)


def test_readings_are_softmax_of_100_times_the_cosine_to_each_prompt(tiny_clip, small_louvre):
    """CLIP's zero-shot rule, recomputed here from the view embeddings and the prompts' text embeddings."""
    engine = Engine(EngineConfig(clip_model=tiny_clip, vocabularies=("materials",), top_k=3))
    [result] = engine.embed([Panorama(id="louvre", data=small_louvre)])
    vocabulary = engine.vocabularies["materials"]
    text = torch.nn.functional.normalize(engine.embed_text(vocabulary.prompts()).float(), dim=1)
    views = result.embeddings.float()
    probabilities = (100 * views @ text.T).softmax(dim=-1)
    for v, reading in enumerate(result.readings["materials"]["views"]):
        top = probabilities[v].topk(3)
        assert [label for label, _ in reading] == [vocabulary.labels[i] for i in top.indices.tolist()]
        assert [p for _, p in reading] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_all_four_shared_panoramas_are_embedded(engine):
    names = ["louvre.jpg", "jordan-pond.jpg", "axes.png", "world-rgba.png"]
    results = engine.embed([Panorama(id=name, data=PANORAMAS / name) for name in names])
    assert [r.error for r in results] == [None] * 4
    assert [r.id for r in results] == names


def test_bad_items_get_their_own_errors_and_the_rest_go_on(tiny_clip, small_louvre, panoramas_dir):
    strict = Engine(EngineConfig(clip_model=tiny_clip, max_pixels=1_000_000, batch_size=16))
    good = jpeg(small_louvre)
    truncated = (panoramas_dir / "jordan-pond.jpg").read_bytes()[:50_000]
    items = [
        Panorama(id="good-1", data=good),
        Panorama(id="bomb", data=panoramas_dir / "louvre.jpg"),  # 8.4 MP, over this engine's 1 MP limit
        Panorama(id="good-2", data=good),
        Panorama(id="truncated", data=truncated),
        Panorama(id="empty", data=b""),
        Panorama(id="square", data=jpeg(small_louvre[:, :256])),
        Panorama(id="good-3", data=good),
    ]
    results = strict.embed(items)
    assert [r.id for r in results] == [item.id for item in items]
    errors = {r.id: r.error for r in results if r.error}
    assert set(errors) == {"bomb", "truncated", "empty", "square"}
    for item_id, message in errors.items():
        assert item_id in message
    assert "limit" in errors["bomb"] and "2:1" in errors["square"]
    reference = strict.embed([items[0]])[0].embeddings
    for r in results:
        if r.id.startswith("good"):
            torch.testing.assert_close(r.embeddings, reference, atol=1e-5, rtol=0)


def test_embed_text_is_normalised(engine):
    text = engine.embed_text(["a baroque church", "a quiet residential street"])
    assert text.shape == (2, engine.clip.embed_dim)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least one text"):
        engine.embed_text([])


def test_info_is_complete(engine):
    info = engine.info()
    assert info["clip"]["model"].startswith("local-dir:")
    assert info["clip"]["embed_dim"] == engine.clip.embed_dim
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["attention"] == "sdpa"
    assert info["reprojection"]["backend"] == "numba"
    assert len(info["views"]) == 8 and info["views"][2]["yaw"] == 90.0
    assert set(info["vocabularies"]) == {"styles", "periods", "urban"}
    assert all(info["versions"][p] for p in ("torch", "open_clip_torch", "numba"))
    assert info["batch_size"] == 16


def test_random_weights_are_loud_and_seeded(small_louvre, tiny_clip, caplog):
    with caplog.at_level(logging.WARNING):
        loud = Engine(EngineConfig(clip_model="ViT-B-32", random_weights=True, vocabularies=("urban",)))
    assert any("RANDOM" in record.getMessage() for record in caplog.records)
    assert "RANDOM" in loud.info()["clip"]["weights"] and loud.info()["seed"] == 0
    image = [Panorama(id="p", data=jpeg(small_louvre))]
    again = Engine(EngineConfig(clip_model="ViT-B-32", random_weights=True, vocabularies=("urban",)))
    other = Engine(EngineConfig(clip_model="ViT-B-32", random_weights=True, vocabularies=("urban",), seed=1))
    first, second, third = (e.embed(image)[0].embeddings for e in (loud, again, other))
    assert torch.equal(first, second)  # one seed, one model: a demo run is reproducible
    assert not torch.allclose(first, third, atol=1e-3)


def test_group_decoding_path_keeps_order_and_per_item_errors(tiny_clip, small_louvre, panoramas_dir):
    """The CUDA route (encoded bytes read in workers, decoded a group at a time) run with
    torchvision's CPU decoder standing in for nvJPEG: the same ordering and error rules."""
    grouped = Engine(EngineConfig(clip_model=tiny_clip, max_pixels=1_000_000, batch_size=16))
    grouped.decode_on_device = True
    good = jpeg(small_louvre)
    items = [
        Panorama(id="good-1", data=good),
        Panorama(id="bomb", data=panoramas_dir / "louvre.jpg"),
        Panorama(id="truncated", data=good[: len(good) // 2]),
        Panorama(id="empty", data=b""),
        Panorama(id="square", data=jpeg(small_louvre[:, :256])),
        Panorama(id="png", data=panoramas_dir / "axes.png"),
        Panorama(id="good-2", data=good),
    ]
    results = grouped.embed(items)
    assert [r.id for r in results] == [item.id for item in items]
    errors = {r.id for r in results if r.error}
    assert errors == {"bomb", "truncated", "empty", "square"}
    torch.testing.assert_close(results[0].embeddings, results[-1].embeddings)
