"""The report of a ``mimetic dream`` folder: each view's trajectory through CLIP space, and the view/dream pairs.

For each view the folder holds its view, the predicted clean image of every K-th denoising step (with
``--trajectory-every K``) and its dream, as PNGs named in ``dreams.json``. All of them are embedded with the
folder's own CLIP (``ClipModel.embed_pixels``, as ``dream`` scored them), one UMAP is fitted on all the
points, and each view's path view -> steps -> dream is drawn in it. The pairs are shown with their mimesis
scores (CLIP cosines view-dream, dream-prompt, view-prompt, from ``dreams.json``), and the mean of each
score comes with its n and a bootstrap 95% interval (``scipy.stats.bootstrap``).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from engine.analysis import figures, page
from engine.analysis.projection import project
from engine.analysis.target import DREAMS_RECORD, ReportError

SCORES = ("view_dream", "dream_prompt", "view_prompt")
PAIR_SIZE = 128  # pixels of a view or a dream in the pairs' contact sheet


def engine_for(record: dict, device: str):
    """An Engine with the CLIP that scored the dreams (its model and weights, as dreams.json names them)."""
    from engine.config import EngineConfig
    from engine.pipeline import Engine

    clip = record.get("clip") or {}
    name, weights = clip.get("model"), clip.get("weights") or ""
    if not name:
        raise ReportError("dreams.json names no CLIP model (a folder written by an older mimetic dream?)")
    random = re.match(r"RANDOM \(untrained, seed (\d+)\)", weights)
    if random:
        config = EngineConfig(clip_model=name, random_weights=True, seed=int(random.group(1)), vocabularies=(), device=device)
    elif name.startswith("local-dir:") or weights == name:
        config = EngineConfig(clip_model=name, vocabularies=(), device=device)
    else:
        tag = re.match(r"pretrained:(\S+)", weights)
        config = EngineConfig(clip_model=name, clip_weights=tag.group(1) if tag else weights, vocabularies=(), device=device)
    return Engine(config)


def _image(path: Path):
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot read the image dreams.json names ({exc})") from None


def _uri(image: np.ndarray, size: int = PAIR_SIZE) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS).save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _mean_ci(values: list[float], seed: int) -> dict:
    from scipy import stats

    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    out = {"n": len(values), "mean": float(values.mean()) if len(values) else None, "ci95": None}
    if len(values) >= 3 and np.ptp(values) > 0:
        boot = stats.bootstrap((values,), np.mean, n_resamples=9_999, confidence_level=0.95, method="BCa",
                               rng=np.random.default_rng(seed))
        out["ci95"] = [float(v) for v in boot.confidence_interval]
    return out


def build_dream_report(folder, out, options, *, engine=None) -> dict:
    """``out/index.html`` and ``out/report.json`` for a dream folder; returns the report.json document."""
    from tqdm import tqdm

    from engine.analysis.report import INDEX, REPORT_JSON, _write_json, versions

    folder, out = Path(folder), Path(out)
    try:
        record = json.loads((folder / DREAMS_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{folder / DREAMS_RECORD}: not a readable dreams record ({exc})") from None
    engine = engine or engine_for(record, options.device)
    paths, pairs = [], []  # every image to embed; one entry per view with where its points are
    for entry in record.get("panoramas", []):
        for d in entry.get("dreams", []):
            steps = (d.get("trajectory") or {}).get("files", [])
            first = len(paths)
            paths += [d["files"]["view"], *steps, d["files"]["dream"]]
            pairs.append({"id": entry["id"], "view": d["view"], "prompt": d["prompt"], "scores": d["scores"],
                          "steps": (d.get("trajectory") or {}).get("steps", []), "points": range(first, len(paths))})
    failed = sum(1 for entry in record.get("panoramas", []) if entry.get("error"))
    import torch

    embeddings, images = [], {}
    for start in tqdm(range(0, len(paths), 64), desc="dreams", unit="batch", disable=options.quiet, leave=False):
        batch = [_image(folder / p) for p in paths[start : start + 64]]
        for k, image in enumerate(batch):
            if paths[start + k].endswith(("_view.png", "_dream.png")):
                images[start + k] = _uri(image)
        size = max(i.shape[0] for i in batch)
        tensor = torch.stack([torch.nn.functional.interpolate(torch.from_numpy(i).permute(2, 0, 1)[None].float() / 255, size=(size, size),
                                                              mode="bilinear", align_corners=False)[0] for i in batch])
        embeddings.append(engine.clip.embed_pixels(tensor).numpy())
    points = np.concatenate(embeddings) if embeddings else np.zeros((0, 1), np.float32)
    layout, umap_info = project(points, seed=options.seed) if len(points) else (np.zeros((0, 2)), {"method": "none", "n": 0})

    trajectories = []
    for pair in pairs:
        rows = list(pair["points"])
        names = ["view"] + [f"step {s}" for s in pair["steps"]] + ["dream"]
        trajectories.append({"id": pair["id"], "view": pair["view"], "steps": pair["steps"],
                             "points": [[round(float(layout[r, 0]), 4), round(float(layout[r, 1]), 4)] for r in rows],
                             "labels": names})
    summary = {name: _mean_ci([p["scores"].get(name) for p in pairs], options.seed) for name in SCORES}
    clip = record.get("clip") or {}
    random_weights = str(clip.get("weights", "")).startswith("RANDOM")
    document = {
        "mimetic_version": versions().get("mimetic"), "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "target": str(folder), "kind": "dreams", "random_weights": random_weights,
        "parameters": {k: v for k, v in dataclasses.asdict(options).items() if k != "quiet"},
        "dreams": {"parameters": record.get("parameters"), "clip": clip, "diffusion": record.get("diffusion")},
        "versions": versions(), "panoramas": {"n": len({p["id"] for p in pairs}), "failed": failed, "views": len(pairs)},
        "umap": umap_info, "scores": summary,
        "pairs": [{"id": p["id"], "view": p["view"], "prompt": p["prompt"], "scores": p["scores"]} for p in pairs],
        "trajectories": [{k: t[k] for k in ("id", "view", "steps", "points")} for t in trajectories],
        "vocabularies": {}, "queries": [], "correlation": None,
    }
    cards = "".join(
        f'<div class="card"><div style="display:flex;gap:2px"><img src="{images[p["points"][0]]}" alt="view">'
        f'<img src="{images[p["points"][-1]]}" alt="dream"></div><div class="cap"><b>{page.esc(p["id"])}</b> view {p["view"]}: '
        f'“{page.esc(p["prompt"])}”<br>' + ", ".join(f"{n.replace('_', '–')} {p['scores'].get(n, float('nan')):.3f}" for n in SCORES)
        + "</div></div>" for p in pairs)
    table = "".join(f"<tr><th>{n.replace('_', '–')}</th><td>{s['mean']:.3f}</td><td>{s['n']}</td><td>"
                    + (f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if s["ci95"] else "–") + "</td></tr>"
                    for n, s in summary.items() if s["mean"] is not None)
    steps_note = ("" if any(p["steps"] for p in pairs) else
                  " This folder kept no denoising steps (mimetic dream --trajectory-every K keeps them): each path is view -> dream.")
    sections = [
        ("trajectories", "Trajectories", page.figure_div("trajectories", 520) + f'<p class="note">{len(pairs)} views: each from '
         f"its view (circle) through its denoising steps to its dream (star), in one {page.esc(umap_info['method'])} of all "
         f"{umap_info['n']} CLIP embeddings.{steps_note}</p>"),
        ("pairs", "Views and their dreams", '<table class="stats"><tr><th>score (CLIP cosine)</th><th>mean</th><th>n</th>'
         f'<th>95% CI (bootstrap, BCa)</th></tr>{table}</table><div class="sheet">{cards}</div>'),
    ]
    header = (f'<p class="note">{page.esc(folder)}: {len(pairs)} dreamt views of {document["panoramas"]["n"]} panoramas '
              f"({failed} failed); every number here is in report.json.</p>")
    data = {"figures": {"trajectories": figures.trajectory_figure(trajectories) if trajectories else None}, "thumbs": {}, "missing": {}}
    if not trajectories:
        sections[0] = ("trajectories", "Trajectories", '<p class="missing" id="empty">The folder holds no dream.</p>')
    html_text = page.document_html(f"mimetic report: {folder.name}", header, sections, data,
                                   page.RANDOM_WARNING if random_weights else None)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).write_text(html_text, encoding="utf-8")
    _write_json(out / REPORT_JSON, document)
    return document
