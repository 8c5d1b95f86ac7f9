"""View-set presets: named lists of ``kernels.ViewSpec`` that cut a panorama into perspective views.

    from engine.views import view_set
    views = view_set("ring8")                 # 8 x ViewSpec(yaw=0, 45, ..., 315; pitch 0; fov 90; 224x224)
    views = view_set("cube6", size=512)
    views = view_set([{"yaw": 30, "pitch": 10}, ViewSpec(yaw=-30)])

Angles are degrees and follow py360convert's orientation (see ``DESIGN.md``): yaw 0 looks at the
panorama's centre column, positive yaw turns right, positive pitch looks up. Every preset uses a 90°
horizontal fov (edge to edge) and square views.

The module imports ``kernels`` (and with it torch) only when views are built, so the CLI can list the
presets in ``--help`` without loading torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kernels import ViewSpec

DEFAULT_SIZE = 224
_UP, _DOWN = 90.0, -90.0


def _views(directions: Sequence[tuple[float, float]], size: int, fov: float = 90.0) -> list[ViewSpec]:
    from kernels import ViewSpec

    return [ViewSpec(yaw=yaw, pitch=pitch, fov=fov, width=size, height=size) for yaw, pitch in directions]


def ring8(size: int = DEFAULT_SIZE) -> list[ViewSpec]:
    """Eight horizontal views, yaw 0, 45, ..., 315, pitch 0, fov 90."""
    return _views([(float(yaw), 0.0) for yaw in range(0, 360, 45)], size)


def ring4(size: int = DEFAULT_SIZE) -> list[ViewSpec]:
    """Four horizontal views, yaw 0, 90, 180, 270, pitch 0, fov 90."""
    return _views([(float(yaw), 0.0) for yaw in range(0, 360, 90)], size)


def cube6(size: int = DEFAULT_SIZE) -> list[ViewSpec]:
    """The six faces of a cube map: front, right, back, left (yaw 0, 90, 180, 270), then up and down; fov 90."""
    return _views([(0.0, 0.0), (90.0, 0.0), (180.0, 0.0), (270.0, 0.0), (0.0, _UP), (0.0, _DOWN)], size)


def gsv6(size: int = DEFAULT_SIZE) -> list[ViewSpec]:
    """Street View's pattern: headings 0, 90, 180, 270 at pitch 0, then pitch +90 (up) and -90 (down); fov 90.

    Geometrically the same six views as ``cube6``; the name is there for people who know the layout
    from Street View's heading/pitch requests.
    """
    return _views([(0.0, 0.0), (90.0, 0.0), (180.0, 0.0), (270.0, 0.0), (0.0, _UP), (0.0, _DOWN)], size)


PRESETS: dict[str, Callable[[int], list[ViewSpec]]] = {"ring8": ring8, "ring4": ring4, "cube6": cube6, "gsv6": gsv6}


def describe_presets() -> dict[str, str]:
    """Preset name -> one-line description (the first line of its docstring)."""
    return {name: (fn.__doc__ or "").strip().splitlines()[0].rstrip(".") for name, fn in PRESETS.items()}


def view_set(name_or_list: str | Sequence[ViewSpec | Mapping], size: int = DEFAULT_SIZE, *, fov: float | None = None) -> list[ViewSpec]:
    """A list of ``ViewSpec``: a preset by name, or an explicit list of ``ViewSpec`` and/or dicts.

    ``size`` is the width and height of a preset's views, and the default width/height of a dict that
    gives none; a ``ViewSpec`` in a list is taken as it is. ``fov``, when given, replaces every view's
    fov (degrees, horizontal, edge to edge). Raises ``ValueError`` for an unknown preset (listing the
    presets), an empty list, or a view the ``ViewSpec`` rules reject.
    """
    from kernels import ViewSpec

    if isinstance(name_or_list, str):
        if name_or_list not in PRESETS:
            raise ValueError(f"unknown view set {name_or_list!r}; presets are: {', '.join(PRESETS)}")
        _check_size(size)
        views = PRESETS[name_or_list](size)
    elif isinstance(name_or_list, Sequence):
        views = []
        for index, item in enumerate(name_or_list):
            if isinstance(item, ViewSpec):
                views.append(item)
            elif isinstance(item, Mapping):
                _check_size(size)
                fields = {"width": size, "height": size, **item}
                unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ViewSpec)})
                if unknown:
                    raise ValueError(f"view {index}: unknown field(s) {unknown}; a view has yaw, pitch, roll, fov, width, height")
                try:
                    views.append(ViewSpec(**fields))
                except ValueError as exc:
                    raise ValueError(f"view {index}: {exc}") from exc
            else:
                raise ValueError(f"view {index}: expected a ViewSpec or a dict, got {type(item).__name__}")
        if not views:
            raise ValueError("the view list is empty: give at least one view")
    else:
        raise ValueError(f"expected a preset name ({', '.join(PRESETS)}) or a list of views, got {type(name_or_list).__name__}")
    if fov is not None:
        views = [dataclasses.replace(view, fov=fov) for view in views]  # ViewSpec re-validates fov
    return views


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int of pixels, got {size!r}")


# -- views to files: ``mimetic reproject`` ---------------------------------------------------------

FILE_PATTERN = "<stem>_<index>_y<yaw>_p<pitch>.png"


def write_views(
    paths: Sequence[str],
    out,
    *,
    views: str = "ring8",
    size: int = DEFAULT_SIZE,
    fov: float | None = None,
    antialias: bool = True,
    backend: str = "auto",
    report: Callable[[dict], None] | None = None,
) -> dict:
    """Cut every view of each panorama file in one kernel call; write them as PNGs and ``out/views.json``.

    Files are named ``FILE_PATTERN`` (``louvre_3_y135_p0.png``). The settings are checked once, before
    any panorama is read, so a bad one is one ``ValueError``, not one per panorama. A panorama that
    cannot be decoded or cut is recorded under "failed" with its reason, and the others go on.
    ``report``, when given, is called with each panorama's entry as soon as it is done: ``{"source",
    "stem", "width", "height", "files"}``, or ``{"source", "error"}``. Returns the manifest written.
    """
    import json
    import os
    from pathlib import Path

    import torch
    from PIL import Image

    from engine import __version__
    from engine.decode import DecodeError, decode_image
    from engine.results import file_stems
    from kernels import reproject

    if backend == "torch" and antialias:
        raise ValueError("--backend torch is plain bilinear sampling (grid_sample), without the footprint filter: add --no-antialias")
    specs = view_set(views, size=size, fov=fov)
    # The panoramas go to the GPU when the backend may use it; reproject picks the kernel from their device.
    device = "cuda" if backend in ("auto", "triton") and torch.cuda.is_available() else "cpu"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digits = len(str(len(specs) - 1))
    names = [f"{index:0{digits}d}_y{v.yaw:g}_p{v.pitch:g}" for index, v in enumerate(specs)]

    done, failed = [], []
    for path, stem in zip(paths, file_stems(paths), strict=True):
        try:
            pano = decode_image(path)
            cut = reproject([torch.from_numpy(pano).to(device)], specs, out_dtype=torch.uint8, layout="NHWC", antialias=antialias, backend=backend)
        except (DecodeError, ValueError) as exc:
            entry = {"source": path, "error": exc.reason if isinstance(exc, DecodeError) else str(exc)}
            failed.append(entry)
        else:
            files = []
            for name, view in zip(names, cut[0].cpu().numpy(), strict=True):
                files.append(f"{stem}_{name}.png")
                Image.fromarray(view).save(out / files[-1])
            entry = {"source": path, "stem": stem, "width": pano.shape[1], "height": pano.shape[0], "files": files}
            done.append(entry)
        if report is not None:
            report(entry)

    manifest = {
        "mimetic_version": __version__,
        "view_set": views,
        "antialias": antialias,
        "backend": backend,
        "device": device,
        "views": [
            {"index": index, "yaw": v.yaw, "pitch": v.pitch, "roll": v.roll, "fov": v.fov, "width": v.width, "height": v.height}
            for index, v in enumerate(specs)
        ],
        "file_pattern": FILE_PATTERN,
        "panoramas": done,
        "failed": failed,
    }
    tmp = out / "views.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "views.json")  # readers never see a half-written manifest
    return manifest
