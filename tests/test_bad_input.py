"""Bad input raises a ValueError that names the problem and the offending shape or value."""

import math

import pytest
import torch

from kernels import ViewSpec, reproject

GOOD = torch.zeros(1, 32, 64, 3, dtype=torch.uint8)
VIEW = [ViewSpec(width=8, height=8)]


@pytest.mark.parametrize(
    ("panos", "message"),
    [
        (GOOD.float(), r"dtype must be uint8, got torch.float32"),
        (torch.zeros(1, 32, 64, 3, dtype=torch.int16), r"dtype must be uint8"),
        (torch.zeros(1, 32, 64, 4, dtype=torch.uint8), r"shape must be \(H, W, 3\), got \(32, 64, 4\)"),
        (torch.zeros(1, 32, 64, dtype=torch.uint8), r"\(M, H, W, 3\).*got shape \(1, 32, 64\)"),
        (torch.zeros(1, 32, 60, 3, dtype=torch.uint8), r"must be 2:1.*got 60x32"),
        (torch.zeros(0, 32, 64, 3, dtype=torch.uint8), r"panos is empty"),
        ([], r"panos is empty"),
        ([GOOD[0], torch.zeros(16, 40, 3, dtype=torch.uint8)], r"panorama 1: .*2:1.*got 40x16"),
        ([GOOD[0], GOOD[0].numpy()], r"panorama 1: expected a torch.Tensor"),
        ("pano.jpg", r"got str"),
    ],
)
def test_bad_panoramas(panos, message):
    with pytest.raises(ValueError, match=message):
        reproject(panos, VIEW)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fov": 0.0}, r"fov must be in \(0, 180\).*0.0"),
        ({"fov": -10.0}, r"fov must be in \(0, 180\)"),
        ({"fov": 180.0}, r"fov must be in \(0, 180\).*180.0"),
        ({"fov": 200.0}, r"fov must be in \(0, 180\)"),
        ({"yaw": math.nan}, r"yaw must be a finite number.*nan"),
        ({"pitch": math.inf}, r"pitch must be a finite number.*inf"),
        ({"roll": -math.inf}, r"roll must be a finite number"),
        ({"fov": math.nan}, r"fov must be a finite number"),
        ({"width": 0}, r"width must be a positive int.*0"),
        ({"height": -3}, r"height must be a positive int.*-3"),
        ({"width": 12.5}, r"width must be a positive int.*12.5"),
        ({"yaw": "north"}, r"yaw must be a finite number.*'north'"),
    ],
)
def test_bad_views(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViewSpec(**kwargs)


def test_no_views_and_mixed_sizes():
    with pytest.raises(ValueError, match="views is empty"):
        reproject(GOOD, [])
    with pytest.raises(ValueError, match=r"share a size.*\(8, 8\).*\(8, 16\)"):
        reproject(GOOD, [ViewSpec(width=8, height=8), ViewSpec(width=16, height=8)])
    with pytest.raises(ValueError, match="view 0: expected a ViewSpec, got dict"):
        reproject(GOOD, [{"yaw": 0}])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"yaw_offsets": torch.tensor([1.0, 2.0])}, r"yaw_offsets must have shape \(1,\).*\(2,\)"),
        ({"yaw_offsets": torch.tensor([math.nan])}, r"yaw_offsets must be finite.*panorama 0 has nan"),
        ({"out_dtype": torch.float64}, r"out_dtype must be one of"),
        ({"layout": "CHW"}, r"layout must be one of.*'CHW'"),
        ({"normalize": "imagenet"}, r"normalize must be None, 'clip', 'sd' or \(mean, std\), got 'imagenet'"),
        ({"normalize": ((0.5,) * 3, (0.0, 1.0, 1.0))}, r"std positive"),
        ({"normalize": "clip", "out_dtype": torch.uint8}, r"needs a float out_dtype"),
        ({"backend": "cuda"}, r"backend must be one of.*'cuda'"),
        ({"backend": "torch"}, r"no footprint filter\); pass antialias=False"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reproject(GOOD, VIEW, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_triton_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
        reproject(GOOD, VIEW, backend="triton")
