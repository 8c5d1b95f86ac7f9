"""The report's plotly figures, as plain figure dicts (data + layout) that plotly.js draws in the page.

Every point carries ``customdata`` = its panorama's row in the report, so the page's hover panel can
show that panorama's id, labels, values and thumbnails, stored once for the page (a point is drawn once
per colouring, so its text in every trace would multiply the page's size); the tooltip itself names only
the trace (the label, the column). Each trace has ``meta.group``: the page's controls show
one group at a time (a vocabulary's labels, a numeric column, a query) with ``Plotly.restyle``. Above
``WEBGL_ABOVE`` points a trace is drawn with WebGL (``scattergl``), which keeps 20,000 points
interactive; up to it, as SVG, which every browser draws, and which lets the page inline plotly.js's
cartesian bundle instead of the full one (``page.plotly_bundle``): a page of 10,000 panoramas opens in
about 1.1-1.3 s with it, 1.6-1.9 s with WebGL and the full bundle (headless Chromium, software WebGL).
"""

from __future__ import annotations

import html
import math

import numpy as np

WEBGL_ABOVE = 10_000
# A qualitative palette long enough for the bundled vocabularies (the longest has 24 labels): plotly's
# Dark24, whose neighbours differ in hue and lightness.
PALETTE = [
    "#2E91E5", "#E15F99", "#1CA71C", "#FB0D0D", "#DA16FF", "#222A2A", "#B68100", "#750D86", "#EB663B", "#511CFB",
    "#00A08B", "#FB00D1", "#FC0080", "#B2828D", "#6C7C32", "#778AAE", "#862A16", "#A777F1", "#620042", "#1616A7",
    "#DA60CA", "#6C4516", "#0D2A63", "#AF0038",
]
POSITIVE, NEGATIVE = "#1a9850", "#d73027"


def _kind(points: int) -> str:
    return "scattergl" if points > WEBGL_ABOVE else "scatter"


def _round(values, digits: int = 5) -> list:
    return [None if not math.isfinite(v) else round(float(v), digits) for v in values]


def _template_text(text: str) -> str:
    """Text for a hovertemplate: HTML-escaped, and plotly's own %{...} and braces kept literal."""
    return html.escape(text).replace("%", "%%").replace("{", "&#123;").replace("}", "&#125;")


def _label_traces(x, y, rows: np.ndarray, vocabularies: dict, hover: list[str]) -> list[dict]:
    """One trace per label of each vocabulary (the panoramas whose top label it is), grouped by vocabulary;
    the first vocabulary's are visible."""
    traces = []
    for v, (name, vocab) in enumerate(vocabularies.items()):
        top = vocab["top"][rows]
        for k, label in enumerate(vocab["labels"]):
            members = np.flatnonzero(top == k)
            if not len(members):
                continue
            traces.append({
                "type": _kind(len(rows)), "mode": "markers", "name": label, "legendgroup": name,
                "x": _round(x[members]), "y": _round(y[members]), "customdata": rows[members].tolist(),
                "hovertemplate": f"{_template_text(label)}<extra></extra>",
                "marker": {"size": 7, "color": PALETTE[k % len(PALETTE)], "opacity": 0.85},
                "visible": v == 0, "meta": {"group": f"vocabulary:{name}"},
            })
    return traces


def _numeric_traces(x, y, rows: np.ndarray, numeric: dict, hover: list[str]) -> list[dict]:
    """One trace per numeric colouring (a metadata column, an expected value), hidden at first."""
    traces = []
    for name, values in numeric.items():
        shown = rows[np.isfinite(values[rows])]
        traces.append({
            "type": _kind(len(rows)), "mode": "markers", "name": name, "x": _round(x[shown]), "y": _round(y[shown]),
            "customdata": shown.tolist(), "hovertemplate": f"{_template_text(name)}: %{{marker.color:.4g}}<extra></extra>",
            "showlegend": False, "visible": False,
            "marker": {"size": 7, "color": _round(values[shown]), "colorscale": "Viridis", "showscale": True,
                       "colorbar": {"title": {"text": name}}},
            "meta": {"group": f"numeric:{name}"},
        })
    return traces


def map_figure(corpus, rows: np.ndarray, vocabularies: dict, numeric: dict, queries: list[dict], hover: list[str],
               tiles: str | None = None) -> dict | None:
    """Each panorama at its lat/lon, coloured by its top label; each query's top and bottom as circles.
    None when no panorama has coordinates. Offline there is no basemap: lon/lat axes at the true aspect
    of the city's mean latitude. With ``tiles`` (a {z}/{x}/{y} URL) a web map under the points instead."""
    rows = rows[np.isfinite(corpus.lat[rows]) & np.isfinite(corpus.lon[rows])]
    if not len(rows):
        return None
    lon, lat = corpus.lon, corpus.lat
    traces = _label_traces(lon, lat, rows, vocabularies, hover) + _numeric_traces(lon, lat, rows, numeric, hover)
    for q, query in enumerate(queries):
        for polarity, colour, symbol in (("positive", POSITIVE, "circle-open"), ("negative", NEGATIVE, "circle-open")):
            members = np.asarray([i for i in query[polarity] if np.isfinite(lat[i]) and np.isfinite(lon[i])], int)
            traces.append({
                "type": "scatter", "mode": "markers", "name": f"{query['text']}: {'top' if polarity == 'positive' else 'bottom'}",
                "x": _round(lon[members]), "y": _round(lat[members]), "customdata": members.tolist(),
                "text": [f"{html.escape(query['text'])}: score {query['scores'][i]:+.4f}" for i in members],
                "hovertemplate": "%{text}<extra></extra>", "visible": False, "meta": {"group": f"query:{q}"},
                "marker": {"size": 16, "symbol": symbol, "color": colour, "line": {"width": 3, "color": colour}},
            })
    layout = {"margin": {"l": 50, "r": 10, "t": 10, "b": 40}, "height": 560, "hovermode": "closest",
              "legend": {"itemsizing": "constant"}, "uirevision": "map"}
    if tiles:
        for trace in traces:
            trace["type"] = "scattermap"
            trace["lon"], trace["lat"] = trace.pop("x"), trace.pop("y")
        layout["map"] = {"style": "white-bg", "center": {"lat": float(np.nanmean(lat[rows])), "lon": float(np.nanmean(lon[rows]))},
                         "zoom": 12, "layers": [{"sourcetype": "raster", "source": [tiles], "below": "traces"}]}
    else:
        aspect = 1.0 / max(math.cos(math.radians(float(np.nanmean(lat[rows])))), 0.05)
        layout["xaxis"] = {"title": {"text": "longitude (°)"}, "zeroline": False}
        layout["yaxis"] = {"title": {"text": "latitude (°)"}, "zeroline": False, "scaleanchor": "x", "scaleratio": aspect}
    return {"data": traces, "layout": layout}


def umap_figure(layout2d: np.ndarray, rows: np.ndarray, vocabularies: dict, numeric: dict, hover: list[str],
                views: dict | None = None) -> dict:
    """The UMAP of the pooled embeddings (``layout2d`` row k is ``rows[k]``), coloured like the map; with
    ``views`` ({xy, rows, view}), the views' points too, hidden until asked for."""
    x = np.full(int(rows.max()) + 1 if len(rows) else 0, np.nan)
    y = x.copy()
    x[rows], y[rows] = layout2d[:, 0], layout2d[:, 1]
    traces = _label_traces(x, y, rows, vocabularies, hover) + _numeric_traces(x, y, rows, numeric, hover)
    if views is not None:
        traces.append({
            "type": _kind(len(views["rows"])), "mode": "markers", "name": "views", "x": _round(views["xy"][:, 0]),
            "y": _round(views["xy"][:, 1]), "customdata": views["rows"].tolist(),
            "text": [f"view {v}" for v in views["view"]],
            "hovertemplate": "%{text}<extra></extra>", "visible": False, "meta": {"group": "views"},
            "marker": {"size": 4, "color": "#888", "opacity": 0.5},
        })
    layout = {"margin": {"l": 40, "r": 10, "t": 10, "b": 30}, "height": 560, "hovermode": "closest",
              "xaxis": {"showticklabels": False, "zeroline": False, "title": {"text": "UMAP 1"}},
              "yaxis": {"showticklabels": False, "zeroline": False, "title": {"text": "UMAP 2"}},
              "legend": {"itemsizing": "constant"}, "uirevision": "umap"}
    return {"data": traces, "layout": layout}


def distribution_figure(name: str, distribution: list[dict]) -> dict:
    """Panoramas per top label, with the Wilson 95% interval of each count, most frequent at the top. Labels
    that top no panorama are left off the chart (report.json lists them, with their intervals)."""
    n = distribution[0]["n"] if distribution else 0
    rows = sorted((r for r in distribution if r["count"]), key=lambda r: r["count"])
    trace = {
        "type": "bar", "orientation": "h", "y": [r["label"] for r in rows], "x": [r["count"] for r in rows],
        "marker": {"color": "#4c78a8"}, "name": name,
        "error_x": {"type": "data", "symmetric": False,
                    "array": [round(r["ci95"][1] * n - r["count"], 3) if r["ci95"] else 0 for r in rows],
                    "arrayminus": [round(r["count"] - r["ci95"][0] * n, 3) if r["ci95"] else 0 for r in rows]},
        "hovertemplate": "%{y}: %{x} panoramas<extra></extra>",
    }
    return {"data": [trace], "layout": {"margin": {"l": 260, "r": 20, "t": 10, "b": 40}, "height": 60 + 22 * len(rows),
                                        "xaxis": {"title": {"text": f"panoramas whose top label it is (of {n}; whiskers: Wilson 95% CI; "
                                                                    f"{len(distribution) - len(rows)} labels top none)"}}}}


def scatter_figure(pairs: list[dict], rows: list[int], scale: str, column: str) -> dict:
    """Each panorama's expected value on the scale against its value in the column."""
    trace = {
        "type": _kind(len(pairs)), "mode": "markers", "x": [p["value"] for p in pairs], "y": [round(p["expected"], 3) for p in pairs],
        "customdata": rows, "text": [html.escape(p["id"]) for p in pairs], "marker": {"size": 7, "color": "#4c78a8", "opacity": 0.8},
        "hovertemplate": "%{text}<br>" + _template_text(column) + ": %{x}<br>expected: %{y}<extra></extra>", "name": "panoramas",
    }
    return {"data": [trace], "layout": {"margin": {"l": 60, "r": 10, "t": 10, "b": 50}, "height": 480, "hovermode": "closest",
                                        "xaxis": {"title": {"text": column}},
                                        "yaxis": {"title": {"text": f"expected value on {scale}"}}}}


def trajectory_figure(trajectories: list[dict]) -> dict:
    """Each view's path through CLIP space, from the view (circle) through its denoising steps to its dream (star)."""
    traces = []
    for k, t in enumerate(trajectories):
        colour = PALETTE[k % len(PALETTE)]
        xs, ys = [p[0] for p in t["points"]], [p[1] for p in t["points"]]
        symbols = ["circle"] + ["circle-open"] * (len(xs) - 2) + ["star"]
        traces.append({
            "type": "scatter", "mode": "lines+markers", "name": f"{t['id']} view {t['view']}", "x": xs, "y": ys,
            "text": t["labels"], "hovertemplate": "%{text}<extra>" + _template_text(f"{t['id']} view {t['view']}") + "</extra>",
            "line": {"color": colour, "width": 1.5}, "marker": {"color": colour, "size": [11] + [6] * (len(xs) - 2) + [14],
                                                                 "symbol": symbols},
        })
    return {"data": traces, "layout": {"margin": {"l": 40, "r": 10, "t": 10, "b": 30}, "height": 520, "hovermode": "closest",
                                       "xaxis": {"showticklabels": False, "title": {"text": "UMAP 1"}},
                                       "yaxis": {"showticklabels": False, "title": {"text": "UMAP 2"}}}}
