"""--precision: what auto picks, and that every model and kernel runs in it.

The suite pins auto to fp32 (conftest sets $MIMETIC_PRECISION); the tests here unset it to see
auto's own choice, or ask for bf16 explicitly. The tiny models are the real architectures, small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import Engine, EngineConfig, Panorama
from engine.models import device as device_module
from engine.models.device import PRECISION_ENV, cpu_bf16, resolve_precision
from engine.models.tiny import make_tiny_clip
from kernels import ViewSpec, reproject

CPU = torch.device("cpu")


@pytest.fixture
def unpinned(monkeypatch):
    """auto as a user gets it: $MIMETIC_PRECISION unset."""
    monkeypatch.delenv(PRECISION_ENV, raising=False)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


# -- what auto means ------------------------------------------------------------------------------


@pytest.mark.skipif(not __import__("os").path.exists("/proc/cpuinfo"), reason="reads the kernel's CPU flags (Linux)")
def test_cpu_bf16_agrees_with_the_kernels_cpu_flags():
    """torch's cpuinfo and /proc/cpuinfo must tell the same story about this very CPU."""
    flags = _cpu_flags()
    native, why = cpu_bf16()
    assert native == bool({"amx_bf16", "avx512_bf16"} & flags)
    if "amx_bf16" in flags:
        assert "AMX-BF16" in why
    if "avx512_bf16" in flags:
        assert "AVX512-BF16" in why


def test_auto_on_the_cpu_follows_native_bf16(unpinned, monkeypatch):
    monkeypatch.setattr(device_module, "cpu_bf16", lambda: (True, "this CPU has AMX-BF16"))
    assert resolve_precision("auto", CPU) == ("bf16", "bf16: this CPU has AMX-BF16")
    monkeypatch.setattr(device_module, "cpu_bf16", lambda: (False, "this CPU has neither"))
    precision, why = resolve_precision("auto", CPU)
    assert precision == "fp32" and "neither" in why  # the bench prints this reason


def test_auto_here_is_bf16_exactly_when_this_cpu_has_it(unpinned):
    assert resolve_precision("auto", CPU)[0] == ("bf16" if cpu_bf16()[0] else "fp32")


def test_explicit_and_pinned_precisions(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert resolve_precision("auto", CPU) == ("fp32", f"{PRECISION_ENV}=fp32")
    assert resolve_precision("bf16", CPU)[0] == "bf16"  # an explicit flag beats the pin
    monkeypatch.setenv(PRECISION_ENV, "double")
    with pytest.raises(ValueError, match=PRECISION_ENV):
        resolve_precision("auto", CPU)
    with pytest.raises(ValueError, match="--precision int8"):
        resolve_precision("int8", CPU)


@pytest.mark.cuda
def test_auto_on_cuda_is_fp16(unpinned):
    assert resolve_precision("auto", torch.device("cuda"))[0] == "fp16"


def test_the_flag_refuses_an_unknown_precision(capsys):
    from engine import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["embed", "p.jpg", "--out", "r.parquet", "--precision", "int8"])
    assert exit_info.value.code == 2 and "int8" in capsys.readouterr().err


# -- the kernels write the model's dtype -----------------------------------------------------------

VIEWS = [ViewSpec(yaw=yaw, pitch=pitch, fov=90.0, width=24, height=16) for yaw, pitch in ((0, 0), (170, 30), (-60, -80))]


@pytest.mark.parametrize("antialias", [True, False])
def test_numba_writes_bf16_as_one_cast_of_its_fp32(louvre, antialias):
    pano = torch.from_numpy(louvre[::8, ::8].copy())  # 256 x 512: the tent filter is busy at 24 px views
    fp32 = reproject([pano], VIEWS, out_dtype=torch.float32, normalize="clip", antialias=antialias, backend="numba")
    bf16 = reproject([pano], VIEWS, out_dtype=torch.bfloat16, normalize="clip", antialias=antialias, backend="numba")
    assert bf16.dtype == torch.bfloat16 and bf16.shape == fp32.shape
    assert torch.equal(bf16, fp32.to(torch.bfloat16))


def test_triton_writes_bf16_rounded_from_its_fp32(louvre):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pano = torch.from_numpy(louvre[::16, ::16].copy()).to(device)  # small: the interpreter is slow
    views = VIEWS[:2]
    fp32 = reproject([pano], views, out_dtype=torch.float32, normalize="clip", backend="triton").cpu()
    bf16 = reproject([pano], views, out_dtype=torch.bfloat16, normalize="clip", backend="triton").cpu()
    assert bf16.dtype == torch.bfloat16
    if torch.cuda.is_available():  # Triton rounds to nearest even on the GPU, as torch's cast does
        assert torch.equal(bf16, fp32.to(torch.bfloat16))
    else:  # the interpreter truncates instead: within one bf16 ulp (2^-7 relative) of the kernel's fp32
        torch.testing.assert_close(bf16.float(), fp32, rtol=2**-7, atol=1e-6)
        assert not torch.equal(bf16.float(), fp32)  # really stored as bf16, not fp32 relabelled


# -- the engine ------------------------------------------------------------------------------------


def test_engine_in_bf16_agrees_with_fp32(tiny_clip, louvre):
    """Same weights at fp32 and bf16: info says which ran, embeddings come back unit-norm fp16, close to fp32."""
    panos = [Panorama(id=f"p{k}", data=np.roll(louvre, k * 512, axis=1)) for k in range(3)]
    fp32 = Engine(EngineConfig(clip_model=tiny_clip, device="cpu", precision="fp32"))
    bf16 = Engine(EngineConfig(clip_model=tiny_clip, device="cpu", precision="bf16"))
    info = bf16.info()
    assert (info["precision"], info["dtype"], info["embedding_dtype"]) == ("bf16", "bfloat16", "float16")
    assert fp32.info()["precision"] == "fp32" and fp32.info()["embedding_dtype"] == "float32"
    assert bf16.clip.model.visual.conv1.weight.dtype == torch.bfloat16  # the matrix products run bf16
    want, got = fp32.embed(panos), bf16.embed(panos)
    for a, b in zip(want, got, strict=True):
        assert b.error is None and b.embeddings.dtype == torch.float16 and b.pooled.dtype == torch.float16
        torch.testing.assert_close(b.embeddings.float().norm(dim=1), torch.ones(len(bf16.views)), atol=2e-3, rtol=0)
        cosine = torch.nn.functional.cosine_similarity(a.embeddings.float(), b.embeddings.float(), dim=1)
        assert cosine.min() > 0.99, cosine  # bf16 keeps 8 bits of mantissa: ~0.999 on this tiny tower
    text = bf16.embed_text(["a baroque church"])
    assert text.dtype == torch.float16
    assert torch.nn.functional.cosine_similarity(text.float(), fp32.embed_text(["a baroque church"]).float()).item() > 0.99


def test_engine_auto_follows_this_cpu(tiny_clip, unpinned):
    engine = Engine(EngineConfig(clip_model=tiny_clip, device="cpu", vocabularies=()))
    assert engine.info()["precision"] == resolve_precision("auto", CPU)[0]
    assert engine.info()["precision_reason"]


def test_ingest_fingerprint_holds_the_precision(tiny_clip):
    from engine.ingest.run import config_fingerprint, config_hash

    prints = [config_fingerprint(EngineConfig(clip_model=tiny_clip, precision=p), north_up=False, shard_size=10) for p in ("fp32", "bf16")]
    assert [p["precision"] for p in prints] == ["fp32", "bf16"]
    assert config_hash(prints[0]) != config_hash(prints[1])  # a run is not resumed in another precision


# -- the Dreamer and the Captioner follow the same rule --------------------------------------------


def test_captioner_precision(tmp_path, unpinned, monkeypatch):
    from engine.models.caption import Captioner
    from engine.models.tiny_caption import make_tiny_caption

    folder = make_tiny_caption(tmp_path)
    monkeypatch.setattr(device_module, "cpu_bf16", lambda: (True, "this CPU has AMX-BF16"))
    auto = Captioner(folder, device="cpu")
    assert auto.dtype == torch.bfloat16 and auto.info()["precision"] == "bf16"
    assert next(auto.model.parameters()).dtype == torch.bfloat16
    assert Captioner(folder, device="cpu", precision="fp32").dtype == torch.float32
    old = Captioner(folder, device="cpu", dtype=torch.float32)  # the keyword it had before precision
    assert old.dtype == torch.float32 and old.info()["precision"] == "fp32"
    views = auto.render([np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)], [ViewSpec()])
    assert views.dtype == torch.bfloat16  # the kernel cuts the views in the model's dtype
    captions = auto.caption(views[0])  # beam search runs in bf16 end to end
    assert len(captions) == 1 and isinstance(captions[0], str)


def test_dreamer_precision(tmp_path, unpinned, monkeypatch):
    from engine.models.diffusion import Dreamer
    from engine.models.tiny_sd import make_tiny_sd

    folder = make_tiny_sd(tmp_path)
    monkeypatch.setattr(device_module, "cpu_bf16", lambda: (False, "this CPU has neither"))
    auto = Dreamer(folder, device="cpu")
    assert auto.dtype == torch.float32 and auto.info()["precision"] == "fp32"
    bf16 = Dreamer(folder, device="cpu", precision="bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.info()["precision"] == "bf16"
    assert bf16.unet.dtype == torch.bfloat16 and bf16.vae.dtype == torch.bfloat16
