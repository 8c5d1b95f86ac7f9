"""engine.models: loading CLIP weights (every route of DESIGN.md "Weights"), encoding, attention backends.

Everything runs on a tiny real CLIP that ``make_tiny_clip`` writes once per session (ViT 64 px, width 64,
2 layers; text tower with CLIP's 49408-token BPE vocabulary), so no weights are ever downloaded.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import types
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.models import ClipModel, WeightsError, load_clip, make_tiny_clip, save_checkpoint
from engine.models.attention import (
    SdpaMultiheadAttention,
    XformersMultiheadAttention,
    _install,
    attention_backend,
    configure_attention,
    restore_attention,
)
from engine.models.tiny import TINY_MODEL_CFG

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TEXTS = ["a photo of a baroque church", "a street in Rome", "a lake in the mountains"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``DIR/clip``, the tiny CLIP in open_clip's local-dir layout, made once."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> ClipModel:
    return load_clip(f"local-dir:{tiny_dir}", device="cpu")


@pytest.fixture(scope="session")
def views(tiny) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, *tiny.image_size, generator=g)


# --- loading ------------------------------------------------------------------------------------------


def test_tiny_loads_through_local_dir(tiny, tiny_dir):
    assert (tiny_dir / "open_clip_config.json").is_file()
    assert (tiny_dir / "open_clip_model.safetensors").is_file()
    assert tiny.name == f"local-dir:{tiny_dir}"
    assert tiny.weights == f"local-dir:{tiny_dir}"
    assert tiny.image_size == (64, 64)
    assert tiny.mean == pytest.approx(OPENAI_MEAN) and tiny.std == pytest.approx(OPENAI_STD)
    assert tiny.embed_dim == TINY_MODEL_CFG["embed_dim"] == 32
    assert tiny.device == torch.device("cpu") and tiny.dtype == torch.float32
    assert tiny.attention == "sdpa" and not tiny.compiled
    assert not tiny.model.training
    # The folder's weights, not a fresh initialisation: every tensor is the one in the checkpoint file.
    saved = load_file(str(tiny_dir / "open_clip_model.safetensors"))
    assert saved.keys() == tiny.model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in tiny.model.state_dict().items())


def test_tiny_model_is_reproducible(tiny_dir, tmp_path):
    again = make_tiny_clip(tmp_path)
    a, b = (
        load_file(str(tiny_dir / "open_clip_model.safetensors")),
        load_file(str(again / "open_clip_model.safetensors")),
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_dir / "open_clip_config.json").read_text() == (again / "open_clip_config.json").read_text()


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "wrapped-pt"])
def test_checkpoint_file_gives_identical_embeddings(tiny, tiny_dir, views, tmp_path, fmt):
    """``load_clip("local-dir:DIR", weights=FILE)``: that architecture, those weights."""
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    if fmt == "safetensors":
        path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    elif fmt == "bin":
        path = tmp_path / "tiny.bin"
        torch.save(state, path)
    else:  # a training checkpoint: {"state_dict": ...} written from DistributedDataParallel ("module.")
        path = tmp_path / "tiny.pt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = load_clip(f"local-dir:{tiny_dir}", weights=str(path), device="cpu")
    assert loaded.weights == str(path)
    assert torch.equal(loaded.encode_images(views), tiny.encode_images(views))
    assert torch.equal(loaded.encode_text(TEXTS), tiny.encode_text(TEXTS))


def test_checkpoint_into_a_named_architecture(tiny, tiny_dir, views, tmp_path, monkeypatch):
    """An architecture open_clip knows by name (the tiny config registered under a test name) + a file."""
    import open_clip.factory

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "mimetic-tiny-test", dict(TINY_MODEL_CFG))
    path = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    loaded = load_clip("mimetic-tiny-test", weights=str(path), device="cpu")
    assert loaded.name == "mimetic-tiny-test" and loaded.weights == str(path)
    assert loaded.mean == pytest.approx(OPENAI_MEAN) and loaded.image_size == (64, 64)
    assert torch.equal(loaded.encode_images(views), tiny.encode_images(views))
    assert torch.equal(loaded.encode_text(TEXTS), tiny.encode_text(TEXTS))


def test_random_weights_is_loud_once_per_load(tiny_dir, caplog):
    """One warning line each time (a log record, not also a RuntimeWarning with a source line)."""
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning would raise here
        model = load_clip(f"local-dir:{tiny_dir}", random_weights=True, device="cpu")
        assert [r.levelno for r in caplog.records if "MEANINGLESS" in r.getMessage()] == [logging.WARNING]
        load_clip(f"local-dir:{tiny_dir}", random_weights=True, device="cpu")  # every time, not once per process
    loud = [r.getMessage() for r in caplog.records if "MEANINGLESS" in r.getMessage()]
    assert len(loud) == 2 and "RANDOM" in loud[0] and "--seed 0" in loud[0]
    assert model.weights == "RANDOM (untrained, seed 0)"


def test_random_weights_are_seeded_and_leave_the_callers_rng_alone(tiny_dir, views):
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    first = load_clip(f"local-dir:{tiny_dir}", random_weights=True, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's next random number is unchanged
    torch.manual_seed(99)  # whatever the process did before
    again = load_clip(f"local-dir:{tiny_dir}", random_weights=True, device="cpu")
    other = load_clip(f"local-dir:{tiny_dir}", random_weights=True, device="cpu", seed=1)
    assert torch.equal(first.encode_images(views), again.encode_images(views))
    assert torch.equal(first.encode_text(TEXTS), again.encode_text(TEXTS))
    assert (first.encode_images(views).float() - other.encode_images(views).float()).abs().max() > 1e-2
    assert other.weights == "RANDOM (untrained, seed 1)"
    with pytest.raises(WeightsError, match="--seed must be an integer >= 0"):
        load_clip(f"local-dir:{tiny_dir}", random_weights=True, device="cpu", seed=-1)


def test_no_weights_says_what_to_pass():
    with pytest.raises(WeightsError) as e:
        load_clip("ViT-B-32", device="cpu")
    message = str(e.value)
    assert "--random-weights" in message and "local-dir:" in message and "make-tiny" in message


def test_uncached_pretrained_tag_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache, whatever this machine holds
    monkeypatch.setenv("HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        load_clip("ViT-B-32", weights="laion2b_s34b_b79k", device="cpu")
    assert time.perf_counter() - start < 10
    message = str(e.value)
    assert "laion2b_s34b_b79k" in message and "not found locally" in message
    assert "--random-weights" in message and "local-dir:" in message and "make-tiny" in message


def test_cached_pretrained_tag_loads_offline(tiny, tiny_dir, views, tmp_path, monkeypatch):
    """A tag whose weights sit in the local Hugging Face cache loads without the network."""
    import huggingface_hub
    import open_clip.factory
    import open_clip.pretrained

    path = save_checkpoint(tiny, tmp_path / "open_clip_model.safetensors")
    asked = []

    def hf_hub_download(repo_id, filename, local_files_only=False, **kwargs):
        asked.append((repo_id, filename, local_files_only))
        if repo_id == "mimetic/tiny-test" and filename == "open_clip_model.safetensors" and local_files_only:
            return str(path)
        raise FileNotFoundError(filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "mimetic-tiny-test", dict(TINY_MODEL_CFG))
    tag = {"hf_hub": "mimetic/tiny-test/", "mean": OPENAI_MEAN, "std": OPENAI_STD}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "mimetic-tiny-test", {"tiny_tag": tag})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_clip("mimetic-tiny-test", weights="tiny-tag", device="cpu")
    assert asked == [("mimetic/tiny-test", "open_clip_model.safetensors", True)]
    assert loaded.weights == f"pretrained:tiny-tag ({path})"
    assert torch.equal(loaded.encode_images(views), tiny.encode_images(views))


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(WeightsError, match=r"known tags: .*laion2b_s34b_b79k"):
        load_clip("ViT-B-32", weights="no_such_tag", device="cpu")


def test_unknown_architecture():
    with pytest.raises(WeightsError, match="--clip-model ViT-Z-99: unknown open_clip architecture"):
        load_clip("ViT-Z-99", random_weights=True, device="cpu")


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu", "--device gpu: not a device"), ("cuda:x", "--device cuda:x: not a device"), ("meta", "--device meta: not supported")],
)
def test_a_device_this_machine_lacks_is_a_value_error_naming_the_flag(tiny_dir, device, message):
    """Not torch's RuntimeError: the CLI reports a ValueError as one line."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load_clip(f"local-dir:{tiny_dir}", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_cuda_without_cuda_is_a_value_error_naming_the_flag(tiny_dir):
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"--device {device}: torch sees no CUDA device"):
            load_clip(f"local-dir:{tiny_dir}", device=device)


@pytest.mark.parametrize("name", ["broken.safetensors", "broken.bin"])
def test_corrupt_checkpoint_names_the_file(tiny_dir, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00not a checkpoint" * 64)
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        load_clip(f"local-dir:{tiny_dir}", weights=str(path), device="cpu")


def test_corrupt_checkpoint_in_local_dir(tiny_dir, tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((tiny_dir / "open_clip_config.json").read_text())
    (folder / "open_clip_model.safetensors").write_bytes(b"garbage" * 100)
    with pytest.raises(WeightsError, match=r"open_clip_model\.safetensors"):
        load_clip(f"local-dir:{folder}", device="cpu")


def test_checkpoint_of_another_architecture(tiny, tiny_dir, tmp_path):
    state = {k: v for k, v in tiny.model.state_dict().items() if not k.startswith("visual.")}
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "other.bin"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing: visual\..*unexpected: extra\.weight"):
        load_clip(f"local-dir:{tiny_dir}", weights=str(path), device="cpu")


def test_local_dir_problems(tmp_path, tiny_dir):
    with pytest.raises(WeightsError, match="no such directory"):
        load_clip(f"local-dir:{tmp_path / 'nowhere'}", device="cpu")
    with pytest.raises(WeightsError, match=r"no open_clip_config\.json"):
        load_clip(f"local-dir:{tmp_path}", device="cpu")
    (tmp_path / "open_clip_config.json").write_text((tiny_dir / "open_clip_config.json").read_text())
    with pytest.raises(WeightsError, match="no checkpoint"):
        load_clip(f"local-dir:{tmp_path}", device="cpu")
    with pytest.raises(WeightsError, match="checkpoint file not found"):
        load_clip(f"local-dir:{tiny_dir}", weights=str(tmp_path / "missing.safetensors"), device="cpu")
    with pytest.raises(WeightsError, match="one or the other"):
        load_clip(f"local-dir:{tiny_dir}", weights="x.safetensors", random_weights=True, device="cpu")


# --- encoding -----------------------------------------------------------------------------------------


def test_encode_images(tiny, views):
    emb = tiny.encode_images(views)
    assert emb.shape == (5, 32) and emb.dtype == torch.float32 and emb.device == tiny.device
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.equal(emb, tiny.encode_images(views))  # deterministic
    assert torch.equal(emb, tiny.encode_images(views.double()))  # any float dtype in
    assert not torch.allclose(emb[0], emb[1])
    with pytest.raises(ValueError, match="expects"):
        tiny.encode_images(torch.zeros(1, 3, 32, 32))


def test_encode_text(tiny):
    emb = tiny.encode_text(TEXTS)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(emb, tiny.encode_text(TEXTS))
    assert torch.allclose(emb, tiny.encode_text(TEXTS, batch_size=2), atol=1e-6)  # batching changes nothing
    assert not torch.allclose(emb[0], emb[1])
    assert tiny.encode_text([]).shape == (0, 32)


def as_open_clip_prepares(clip: ClipModel, images: list[np.ndarray]) -> torch.Tensor:
    """Reference embeddings of uint8 images through open_clip's own eval transform (PIL bicubic resize,
    centre crop, ToTensor, Normalize) and the raw model, none of this project's code on the way."""
    import open_clip
    from PIL import Image

    transform = open_clip.image_transform(clip.image_size, is_train=False, mean=clip.mean, std=clip.std)
    batch = torch.stack([transform(Image.fromarray(np.ascontiguousarray(image))) for image in images])
    with torch.no_grad():
        return torch.nn.functional.normalize(clip.model.encode_image(batch).float(), dim=-1)


def unit_floats(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def test_embed_pixels_is_open_clips_own_preprocessing(tiny, louvre):
    """Images of any size in [0, 1] (dreams, loop frames): resized and normalised as open_clip itself does it."""
    at_size = [louvre[100:164, 500:564], louvre[900:964, 2000:2064], louvre[1500:1564, 3000:3064]]  # 64 px: no resize
    emb = tiny.embed_pixels(unit_floats(at_size))
    assert emb.shape == (3, 32) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    torch.testing.assert_close(emb, as_open_clip_prepares(tiny, at_size), atol=1e-5, rtol=0)
    # 128 px, halved on the way in: torch's antialiased bicubic against PIL's, a resampling difference only.
    larger = [louvre[200:328, 300:428], louvre[400:528, 1000:1128]]
    torch.testing.assert_close(tiny.embed_pixels(unit_floats(larger)), as_open_clip_prepares(tiny, larger), atol=2e-3, rtol=0)
    torch.testing.assert_close(tiny.embed_pixels(unit_floats(at_size), batch_size=2), emb, atol=1e-6, rtol=0)
    assert tiny.embed_pixels(torch.zeros(0, 3, 64, 64)).shape == (0, 32)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.embed_pixels(torch.zeros(3, 64, 64))


def test_compiled_image_tower_matches(tiny_dir, tiny, views):
    """``compile=True``: torch.compile on the image tower (one CPU smoke test; ~15 s cold)."""
    compiled = load_clip(f"local-dir:{tiny_dir}", device="cpu", compile=True)
    assert compiled.compiled
    assert torch.allclose(compiled.encode_images(views), tiny.encode_images(views), atol=1e-5)


# --- attention ----------------------------------------------------------------------------------------


def _attention_ops(clip: ClipModel, views) -> set[str]:
    from torch.profiler import profile

    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        clip.encode_images(views)
        clip.encode_text(TEXTS[:1])
    return {e.name for e in prof.events() if "attention" in e.name or "softmax" in e.name}


def test_attention_is_sdpa_on_cpu(tiny_dir, views, caplog):
    clip = load_clip(f"local-dir:{tiny_dir}", device="cpu")
    assert clip.attention == "sdpa" == attention_backend(clip.model)
    ops = _attention_ops(clip, views)
    assert "aten::scaled_dot_product_attention" in ops
    assert "aten::_native_multi_head_attention" not in ops  # MHA's fast path (no SDPA on CPU) is not taken
    with caplog.at_level(logging.WARNING):
        assert configure_attention(clip.model, "xformers") == "sdpa"  # no CUDA here: falls back, says why
    assert "xformers" in caplog.text and "SDPA" in caplog.text
    with pytest.raises(ValueError, match="attention backend"):
        configure_attention(clip.model, "flash3")


def test_sdpa_matches_pytorch_own_attention(tiny_dir, views):
    clip = load_clip(f"local-dir:{tiny_dir}", device="cpu")
    image, text = clip.encode_images(views), clip.encode_text(TEXTS)
    restore_attention(clip.model)
    assert attention_backend(clip.model) is None
    assert torch.allclose(clip.encode_images(views), image, atol=1e-5)
    assert torch.allclose(clip.encode_text(TEXTS), text, atol=1e-5)
    state = clip.model.state_dict()
    configure_attention(clip.model, "sdpa")
    assert state.keys() == clip.model.state_dict().keys()  # the swap leaves parameters and keys alone


def _fake_xformers(monkeypatch) -> list:
    """A stand-in ``xformers.ops`` with reference maths in xformers' (B, L, H, Dh) layout; records biases."""
    calls = []

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):
        calls.append(type(attn_bias).__name__ if attn_bias is not None else None)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if isinstance(attn_bias, LowerTriangularMask):
            n = scores.shape[-1]
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        elif attn_bias is not None:
            scores = scores + attn_bias
        return (scores.softmax(-1) @ v).transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.LowerTriangularMask = LowerTriangularMask
    ops.memory_efficient_attention = memory_efficient_attention
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    return calls


def test_xformers_route_maths_on_cpu(tiny_dir, views, monkeypatch):
    """The xformers route's projections, layout and masks, checked on CPU against a reference kernel."""
    calls = _fake_xformers(monkeypatch)
    clip = load_clip(f"local-dir:{tiny_dir}", device="cpu")
    image, text = clip.encode_images(views), clip.encode_text(TEXTS)
    _install(clip.model, XformersMultiheadAttention)  # what configure_attention does where CUDA is
    assert torch.allclose(clip.encode_images(views), image, atol=1e-5)
    assert torch.allclose(clip.encode_text(TEXTS), text, atol=1e-5)
    assert calls.count(None) == 2 and calls.count("LowerTriangularMask") == 2  # 2 image + 2 text layers
    # A mask that is not the text tower's causal one goes in as a dense, 8-aligned bias: same maths.
    block = clip.model.visual.transformer.resblocks[0]
    x = torch.randn(2, 5, 64)
    mask = torch.randn(5, 5)
    want = SdpaMultiheadAttention._attend(block.attn, *_qkv(block.attn, x), mask, 0.0)
    got = block.attn._attend(*_qkv(block.attn, x), mask, 0.0)
    assert calls[-1] == "Tensor"
    assert torch.allclose(got, want, atol=1e-5)


def _qkv(mha, x):
    b, n, e = x.shape
    q, k, v = torch.nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    return (t.view(b, n, mha.num_heads, e // mha.num_heads) for t in (q, k, v))


@pytest.mark.cuda
def test_cuda_fp16_with_fp32_layernorm(tiny_dir):
    clip = load_clip(f"local-dir:{tiny_dir}", device="cuda", attention="sdpa")
    assert clip.dtype == torch.float16 and clip.device.type == "cuda"
    assert clip.model.visual.conv1.weight.dtype == torch.float16
    assert clip.model.visual.ln_pre.weight.dtype == torch.float32  # LayerNormFp32, as open_clip's fp16
    ref = load_clip(f"local-dir:{tiny_dir}", device="cpu")
    views = torch.randn(8, 3, *clip.image_size)
    got = clip.encode_images(views.cuda())
    assert got.dtype == torch.float16
    assert torch.allclose(got.float().cpu(), ref.encode_images(views), atol=5e-3)
    assert torch.allclose(clip.encode_text(TEXTS).float().cpu(), ref.encode_text(TEXTS), atol=5e-3)


@pytest.mark.cuda
def test_xformers_matches_sdpa_on_cuda(tiny_dir):
    pytest.importorskip("xformers.ops")
    sdpa = load_clip(f"local-dir:{tiny_dir}", device="cuda", attention="sdpa")
    xf = load_clip(f"local-dir:{tiny_dir}", device="cuda", attention="xformers")
    assert sdpa.attention == "sdpa" and xf.attention == "xformers"
    views = torch.randn(16, 3, *sdpa.image_size, device="cuda", dtype=torch.float16)
    assert torch.allclose(xf.encode_images(views).float(), sdpa.encode_images(views).float(), atol=2e-3)
    assert torch.allclose(xf.encode_text(TEXTS).float(), sdpa.encode_text(TEXTS).float(), atol=2e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = load_clip(f"local-dir:{tiny_dir}", device="cuda")
    assert auto.attention == "xformers"
