"""``build_report``: a target -> ``DIR/index.html`` and ``DIR/report.json``, top to bottom.

    from engine.analysis import ReportOptions, build_report
    document = build_report("runs/rome", "runs/rome/report", ReportOptions(queries=["a baroque church"], against="year_built",
                                                                           metadata=["ages.csv"]))

One pass: read the target -> embed the vocabularies' prompts and the queries with the target's own
model -> probabilities, labels, expected values, queries, the correlation -> UMAP -> thumbnails ->
figures -> the page. Every number the page shows is in ``report.json`` too.

Limits, so that the page stays light (``engine.analysis.page`` says how it draws, and how fast): the map
and the UMAP draw at most ``max_points`` panoramas (a seeded sample above that; every statistic uses all
of them), with WebGL above ``figures.WEBGL_ABOVE`` points; at most ``max_thumbnails`` panoramas carry
thumbnails (those in a contact sheet or a query first, then a seeded sample of the rest).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path

import numpy as np

from engine.analysis import figures, page, statistics, thumbnails
from engine.analysis.projection import project
from engine.analysis.target import ReportError, column_values, load_target, target_kind
from engine.config import DEFAULT_REPORT_MAX_POINTS

REPORT_JSON = "report.json"
INDEX = "index.html"


@dataclasses.dataclass
class ReportOptions:
    queries: list[str] = dataclasses.field(default_factory=list)
    against: str | None = None  # a metadata column to correlate the expected value with
    metadata: list = dataclasses.field(default_factory=list)  # files joined by id, as ingest joins them
    scale: str = "periods"  # a vocabulary with a value per label
    vocabularies: tuple[str, ...] | None = None  # None: the target's own
    tiles: str | None = None  # a {z}/{x}/{y} tile URL for online use; off by default
    device: str = "auto"
    top: int = 10  # panoramas at each end of a query
    sheet: int = 6  # panoramas per label in a contact sheet
    max_points: int = DEFAULT_REPORT_MAX_POINTS
    max_thumbnails: int = 400
    thumbnail_size: int = thumbnails.DEFAULT_SIZE
    umap_views: bool = False  # the views' points in the UMAP too
    seed: int = 0
    permutations: int = statistics.PERMUTATIONS
    quiet: bool = False

    def check(self) -> None:
        for name in ("top", "sheet", "max_points", "max_thumbnails", "thumbnail_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_thumbnails" else 1):
                raise ReportError(f"{name} must be a positive integer, got {value!r}")
        if self.permutations < statistics.PERMUTATIONS:
            raise ReportError(f"permutations must be at least {statistics.PERMUTATIONS}, got {self.permutations}")
        if any(not q.strip() for q in self.queries):
            raise ReportError("a --query is empty")


class _Stages:
    """A tqdm bar over the report's stages (``quiet``: none)."""

    def __init__(self, names: list[str], quiet: bool):
        import time

        self.clock = time.perf_counter
        self.seconds: dict[str, float] = {}  # per stage, in report.json
        self.current, self.began = None, self.clock()
        self.bar = None
        if not quiet:
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=len(names), desc="report", unit="stage", file=sys.stderr, dynamic_ncols=True)

    def start(self, name: str) -> None:
        self.current, self.began = name, self.clock()
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def done(self) -> None:
        self.seconds[self.current] = round(self.clock() - self.began, 3)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def versions() -> dict:
    from engine.models.device import package_versions

    return package_versions(("mimetic", "torch", "open_clip_torch", "numpy", "scipy", "umap-learn", "plotly", "pyarrow"))


def _engine_for(target, device: str):
    from engine.ingest.query import run_engine

    return run_engine(target, device)


def build_report(target: str | os.PathLike, out: str | os.PathLike, options: ReportOptions | None = None, *, engine=None) -> dict:
    """Write ``out/index.html`` and ``out/report.json`` for ``target``; return the report.json document."""
    options = options or ReportOptions()
    options.check()
    if target_kind(target) == "dreams":
        from engine.analysis.dreams import build_dream_report

        return build_dream_report(target, out, options, engine=engine)
    stages = _Stages(["read", "text", "statistics", "UMAP", "thumbnails", "page"], options.quiet)
    try:
        return _build(Path(target), Path(out), options, engine, stages)
    finally:
        stages.close()


def _build(target: Path, out: Path, options: ReportOptions, engine, stages: _Stages) -> dict:
    from engine.vocab import load_vocabulary

    stages.start("read")
    corpus = load_target(target, options.metadata)
    n = len(corpus)
    against = column_values(corpus, options.against) if options.against else None
    scale = load_vocabulary(options.scale)
    if scale.values is None:
        raise ReportError(f"--scale {options.scale}: vocabulary {scale.name!r} gives its labels no values "
                          "(a 'values' list in its .json, a 'value' column in its .csv)")
    names = options.vocabularies if options.vocabularies is not None else tuple(corpus.config.get("vocabularies") or ())
    vocabularies = [load_vocabulary(name) for name in names]
    stages.done()

    stages.start("text")
    engine = engine or _engine_for(target, options.device)
    random_weights = bool(corpus.config.get("random_weights"))

    def text(prompts):
        return engine.embed_text(list(prompts)).float().numpy()

    vocab_data = {}
    for vocab in vocabularies:
        probs = statistics.probabilities(corpus.pooled, text(vocab.prompts())) if n else np.zeros((0, len(vocab)))
        vocab_data[vocab.name] = {"vocabulary": vocab, "labels": list(vocab.labels), "probs": probs,
                                  "top": probs.argmax(axis=1) if n else np.zeros(0, int)}
    scale_probs = statistics.probabilities(corpus.pooled, text(scale.prompts())) if n else np.zeros((0, len(scale)))
    expected = statistics.expected_values(scale_probs, scale.values)
    queries = []
    for query in options.queries:
        scores = corpus.pooled.astype(np.float64) @ text([query])[0].astype(np.float64) if n else np.zeros(0)
        order = np.argsort(-scores, kind="stable")
        top = order[: options.top]
        bottom = [int(i) for i in order[::-1] if i not in set(top.tolist())][: options.top]
        queries.append({"text": query, "scores": scores, "positive": top.tolist(), "negative": bottom})
    stages.done()

    stages.start("statistics")
    distributions = {name: statistics.label_distribution(d["probs"], d["labels"]) for name, d in vocab_data.items()}
    correlation = None
    if against is not None:
        values, left_out = against
        result = statistics.correlate(expected, values, seed=options.seed, permutations=options.permutations)
        keep = np.flatnonzero(np.isfinite(values) & np.isfinite(expected))
        correlation = {
            "column": options.against, "scale": scale.name, "template": scale.template, "labels": list(scale.labels),
            "values": list(scale.values), **result, "left_out": {**left_out, "total": int(n - len(keep))},
            "pairs": [{"id": corpus.ids[i], "expected": float(expected[i]), "value": float(values[i])} for i in keep],
            "rows": keep.tolist(),
        }
    stages.done()

    stages.start("UMAP")
    rng = np.random.default_rng(options.seed)
    rows = np.arange(n) if n <= options.max_points else np.sort(rng.choice(n, options.max_points, replace=False))
    layout2d, umap_info = project(corpus.pooled[rows], seed=options.seed) if n else (np.zeros((0, 2)), {"method": "none", "n": 0})
    views_layout = None
    if options.umap_views and n:
        from engine.analysis.target import view_embeddings

        view_rows, view_index, view_points = view_embeddings(corpus, rows)
        both, umap_info = project(np.concatenate([corpus.pooled[rows], view_points]), seed=options.seed)
        layout2d = both[: len(rows)]
        views_layout = {"xy": both[len(rows):], "rows": view_rows, "view": view_index}
        umap_info["views"] = len(view_rows)
    stages.done()

    stages.start("thumbnails")
    hover = [_hover(corpus.ids[i], {k: (d["labels"], d["probs"][i]) for k, d in vocab_data.items()}) for i in range(n)]
    for i in range(n):  # the numbers a point can be coloured by, in its hover panel too
        hover[i] += f"<br>expected {scale.name} value: {expected[i]:.4g}"
        if against is not None and np.isfinite(against[0][i]):
            hover[i] += f"<br>{_escape(options.against)}: {against[0][i]:.4g}"
    sheets = {name: _sheet(d["probs"], options.sheet) for name, d in vocab_data.items()}
    wanted = [i for s in sheets.values() for members in s for i in members]
    wanted += [i for q in queries for i in q["positive"] + q["negative"]]
    wanted = list(dict.fromkeys(wanted))[: options.max_thumbnails]
    rest = [int(i) for i in rng.permutation(rows) if int(i) not in set(wanted)]
    wanted += rest[: max(0, options.max_thumbnails - len(wanted))]
    strips, missing, thumb_source = _thumbnails(engine, corpus, wanted, options)
    stages.done()

    stages.start("page")
    numeric = {f"expected {scale.name} value": expected}
    if against is not None:
        numeric = {options.against: against[0], **numeric}
    document = {
        "mimetic_version": versions().get("mimetic"), "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "target": os.fspath(target), "kind": corpus.kind, "random_weights": random_weights,
        "parameters": {k: v for k, v in dataclasses.asdict(options).items() if k not in ("quiet",)},
        "engine_config": corpus.config, "versions": versions(),
        "panoramas": {"n": n, "failed": corpus.failed, "with_coordinates": int(np.isfinite(corpus.lat).sum()), "drawn": len(rows),
                      "with_thumbnails": len(strips), "thumbnails_from": thumb_source,
                      "metadata": {"files": corpus.metadata_files, "matched": corpus.metadata_matched}},
        "vocabularies": {name: {"template": d["vocabulary"].template, "labels": d["labels"], "distribution": distributions[name],
                                "top": [{"label": d["labels"][k], "panoramas": [{"id": corpus.ids[i], "probability": float(d["probs"][i, k])}
                                                                                 for i in members]}
                                        for k, members in enumerate(sheets[name])]}
                         for name, d in vocab_data.items()},
        "scale": {"vocabulary": scale.name, "template": scale.template, "labels": list(scale.labels), "values": list(scale.values)},
        "queries": [{"text": q["text"], "n": n,
                     "top": [_query_row(corpus, q, i, rank) for rank, i in enumerate(q["positive"], 1)],
                     "bottom": [_query_row(corpus, q, i, rank) for rank, i in enumerate(q["negative"], 1)]} for q in queries],
        "umap": umap_info,
        "correlation": {k: v for k, v in correlation.items() if k != "rows"} if correlation else None,
        "trajectories": [],
        "limits": {"max_points": options.max_points, "webgl_above": figures.WEBGL_ABOVE, "max_thumbnails": options.max_thumbnails},
    }
    figs = {
        "map": figures.map_figure(corpus, rows, vocab_data, numeric, queries, hover, options.tiles),
        "umap": figures.umap_figure(layout2d, rows, vocab_data, numeric, hover, views_layout) if n else None,
        "labels": {name: figures.distribution_figure(name, distributions[name]) for name in vocab_data},
        "scatter": figures.scatter_figure(document["correlation"]["pairs"], correlation["rows"], scale.name, options.against)
        if correlation and correlation["pairs"] else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    page.write(out / INDEX, document, figs, corpus=corpus, hover={int(i): hover[i] for i in set(rows.tolist()) | set(wanted)}, strips=strips, missing=missing, sheets=sheets,
               queries=queries)
    stages.done()
    document["seconds"] = stages.seconds
    _write_json(out / REPORT_JSON, document)
    return document


def _escape(text: str) -> str:
    import html

    return html.escape(text)


def _hover(item_id: str, readings: dict) -> str:
    """A panorama's hover text: its id and its top label (with p) in each vocabulary, HTML-escaped."""
    import html

    lines = [f"<b>{html.escape(item_id)}</b>"]
    for name, (labels, probs) in readings.items():
        k = int(np.argmax(probs))
        lines.append(f"{html.escape(name)}: {html.escape(labels[k])} ({probs[k]:.2f})")
    return "<br>".join(lines)


def _sheet(probs: np.ndarray, count: int) -> list[list[int]]:
    """Per label, the rows of the ``count`` panoramas that score highest on it, best first."""
    if not len(probs):
        return [[] for _ in range(probs.shape[1])]
    order = np.argsort(-probs, axis=0, kind="stable")[:count]
    return [order[:, k].tolist() for k in range(probs.shape[1])]


def _query_row(corpus, query: dict, row: int, rank: int) -> dict:
    lat, lon = corpus.lat[row], corpus.lon[row]
    return {"rank": rank, "id": corpus.ids[row], "score": float(query["scores"][row]),
            "lat": float(lat) if np.isfinite(lat) else None, "lon": float(lon) if np.isfinite(lon) else None}


def _thumbnails(engine, corpus, rows: list[int], options: ReportOptions) -> tuple[dict, dict, str]:
    """{row: strip data URI}, {row: why it has none}, and where they came from."""
    if not rows:
        return {}, {}, "none"
    have = thumbnails.stored(corpus, rows)
    source = "target" if have else "sources"
    need = [r for r in rows if r not in have]
    missing = {}
    if need:
        bar = None
        if not options.quiet:
            import sys

            from tqdm import tqdm

            bar = tqdm(total=len(need), desc="thumbnails", unit="pano", file=sys.stderr, dynamic_ncols=True, leave=False)
        try:
            made, missing = thumbnails.from_sources(engine, corpus, need, options.thumbnail_size, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        have.update(made)
        if made and source == "target":
            source = "target and sources"
    return {r: thumbnails.strip(jpegs) for r, jpegs in have.items() if jpegs}, missing, source


def _write_json(path: Path, document: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
