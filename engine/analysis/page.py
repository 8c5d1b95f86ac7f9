"""The report page: one self-contained HTML file, offline and from ``file://``.

plotly.js is inlined (``plotly.offline.get_plotlyjs``), and so are the style, the figures, the
thumbnails (JPEG data: URIs) and the page's own script: the page asks nothing of any server. Figures
are plotly figure dicts (``engine.analysis.figures``) drawn by ``Plotly.newPlot``. A panorama's
thumbnail strip is stored once, keyed by its row, and placed wherever it is shown (the hover panel,
the contact sheets, the queries).

How it draws, so that it opens quickly (the first screen is what counts: there a reader can look, hover
and switch colours while the rest is drawn):

- Each figure, the hover texts, the thumbnails and the reasons for missing ones are separate JSON
  elements, parsed when first needed. The page's first figure (the map, where there is one) and the
  small ones (under ``EARLY_BYTES``: the label distributions) come before the page's script, the rest
  after it (the UMAP, the scatter, the hover texts, the thumbnails: 5 MB at 10,000 panoramas), so the
  browser draws the first screen before it has read them; a figure on the first screen whose data comes
  after the script is drawn once the page is read.
- The figures on the first screen are drawn at once. Those below the fold are drawn when they come
  within one screen of the viewport (an ``IntersectionObserver``) or, one per idle period, once the first
  screen is shown (``requestIdleCallback``), whichever comes first; a control (colour, query circles,
  views) draws its figure first if it is not yet. The contact sheets get their thumbnails in the first
  idle period; a hover before the page is fully read is answered once it is.
- A drawn figure's div says when (``data-drawn``: ms since navigation) and why (``data-drawn-by``:
  screen, near, idle or control); the body says when the frame after the first-screen figures were
  drawn was produced (``data-first-screen``) and which they were (``data-first-screen-figures``).
  ``engine.analysis.browser.open_page`` and ``bench/report.py`` read them.

Limits (``engine.analysis.report``): the map and the UMAP draw at most ``--max-points`` panoramas
(default 20,000; a seeded sample above), as SVG up to ``figures.WEBGL_ABOVE`` = 10,000 points in a
figure and as WebGL (``scattergl``) above; at most ``--max-thumbnails`` panoramas (default 400) carry
thumbnails. A page whose traces are all SVG inlines plotly.js's cartesian bundle (1.5 MB,
``plotly_bundle``; vendor/README.md), one with WebGL or ``--tiles`` maps the full one (4.7 MB).
Evaluating plotly.js is most of the first screen's cost: 0.6 s for the cartesian bundle against 1.2 s
for the full one here, and WebGL adds its contexts (plotly makes two per WebGL figure; 0.3-0.6 s on
SwiftShader). Measured by ``python -m bench.report`` on 2 CPU cores (headless Chromium, software WebGL,
medians of 3 opens): at 10,000 panoramas (an 11 MiB page, SVG, the cartesian bundle) the first screen,
the map, in 1.2 s [1.17-1.32] and every figure in 2.6 s, where WebGL and the full bundle took 2.1 s and
3.2 s the same morning; at 20,000 (WebGL, the full bundle) 1.8 s and 2.8 s. Drawn all at once, with
WebGL above 2,000 points, the 10,000-panorama page drew its first figure at 2.3-3.7 s.

Everything that comes from the data (ids, labels, metadata, query texts) is escaped: as HTML text
with ``html.escape``, and inside the JSON data blocks with ``</`` written ``<\\/`` so that no value
can close the script element.
"""

from __future__ import annotations

import gzip
import html
import json
import os
from pathlib import Path

import numpy as np

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:18px 28px 8px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px} h3{font-size:15px;margin:18px 0 6px}
nav a{margin-right:14px;color:#2a5db0;text-decoration:none} main{padding:0 28px 60px 28px;margin-right:340px}
.warning{background:#b00020;color:#fff;padding:12px 28px;margin-right:340px;font-weight:600;font-size:15px}
header{margin-right:340px}
.note{color:#555;max-width:70em} .missing{color:#a33;font-size:12px;padding:4px}
.controls{margin:6px 0} .controls label{margin-right:16px} select{font:inherit}
.sheet{display:flex;flex-wrap:wrap;gap:10px;margin:4px 0 12px}
.card{background:#fff;border:1px solid #ddd;padding:4px;max-width:420px}
.card img{display:block;max-width:410px;height:auto} .card .cap{font-size:12px;color:#333;word-break:break-all}
table.stats td,table.stats th{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}
#panel{position:fixed;right:0;top:0;bottom:0;width:320px;background:#fff;border-left:1px solid #ddd;padding:14px;overflow:auto;font-size:13px}
#panel img{max-width:100%;display:block;margin-top:6px} .figure{background:#fff;border:1px solid #ddd}
"""

SCRIPT = """
(function(){
  // Each data block is its own JSON element, parsed when first needed: the first screen parses its own
  // figures only, not the hover texts and thumbnails of every panorama nor the figures below the fold.
  // Those blocks come after this script, so the browser draws the first screen before it even reads them
  // (megabytes of HTML); what needs them waits for the document to be loaded.
  const loaded = new Promise(done => document.readyState === 'loading' ? document.addEventListener('DOMContentLoaded', done) : done());
  const blocks = {};
  function block(name){
    if (!(name in blocks)) {
      const el = document.getElementById('mimetic-' + name);
      if (!el) return document.readyState === 'loading' ? null : {};  // null: not read yet
      blocks[name] = JSON.parse(el.textContent);
    }
    return blocks[name];
  }
  const whenRead = (name) => block(name) ? Promise.resolve(block(name)) : loaded.then(() => block(name));
  const config = {responsive: true, displaylogo: false};
  const thumb = (row) => block('thumbs')[row];
  const noThumb = (row) => block('missing')[row] || 'no thumbnail kept for this panorama (--max-thumbnails)';
  function fill(el){
    const row = el.dataset.row, uri = thumb(row);
    if (uri) { const img = document.createElement('img'); img.src = uri; img.alt = 'views of ' + el.dataset.id; el.prepend(img); }
    else { const d = document.createElement('div'); d.className = 'missing'; d.textContent = noThumb(row); el.prepend(d); }
  }
  const panel = document.getElementById('panel-body');
  function show(ev){
    if (document.readyState === 'loading') { loaded.then(() => show(ev)); return; }
    const p = ev.points && ev.points[0]; if (!p || p.customdata === undefined) return;
    const row = Array.isArray(p.customdata) ? p.customdata[0] : p.customdata, hover = block('hover');
    panel.innerHTML = '';
    // The panel's text is the page's own (escaped when written), kept once per panorama in the hover block.
    const t = document.createElement('div'); t.innerHTML = hover[row] || ''; panel.appendChild(t);
    if (p.text && !hover[row]) t.textContent = p.text;
    else if (p.text) { const extra = document.createElement('div'); extra.innerHTML = p.text; panel.appendChild(extra); }
    const uri = thumb(row);
    if (uri) { const img = document.createElement('img'); img.src = uri; panel.appendChild(img); }
    else { const d = document.createElement('div'); d.className = 'missing'; d.textContent = noThumb(row); panel.appendChild(d); }
  }
  // A figure is drawn once, when first wanted: on the first screen at once, below the fold when it nears
  // the viewport or in idle time after the first screen, whichever comes first; a control draws its own.
  const divs = [...document.querySelectorAll('.figure')], drawing = {};
  function draw(div, why){
    if (!drawing[div.id]) {
      drawing[div.id] = whenRead('figure-' + div.id.slice(4)).then(fig => fig.data && Plotly.newPlot(div, fig.data, fig.layout, config).then(() => {
        div.on('plotly_hover', show);  // div.on exists once the plot does
        div.on('plotly_click', show);
        div.dataset.drawnBy = why;  // 'screen', 'near', 'idle' or 'control'
        div.dataset.drawn = Math.round(performance.now());  // ms since navigation: the bench reads it
      }));
    }
    return drawing[div.id];
  }
  const onScreen = (div) => { const r = div.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; };
  const first = divs.filter(onScreen);
  Promise.all(first.map(div => draw(div, 'screen'))).then(() => requestAnimationFrame(() => setTimeout(() => {
    // The frame that shows the first screen has been produced: the page is usable.
    document.body.dataset.firstScreen = Math.round(performance.now());
    document.body.dataset.firstScreenFigures = first.map(div => div.id).join(' ');
    const near = new IntersectionObserver(entries => entries.forEach(e => e.isIntersecting && draw(e.target, 'near')),
                                          {rootMargin: '100% 0px'});
    divs.forEach(div => near.observe(div));
    const idle = window.requestIdleCallback || ((f) => setTimeout(f, 50));
    const rest = [() => loaded.then(() => document.querySelectorAll('.thumb').forEach(fill)),
                  ...divs.map(div => () => draw(div, 'idle'))];
    // One piece per idle period, so that a reader's scroll or hover is never kept waiting for long.
    const next = () => { const piece = rest.shift(); if (piece) { Promise.resolve(piece()).then(() => idle(next, {timeout: 1000})); } };
    idle(next, {timeout: 1000});
  })));
  function showGroups(div, wanted){
    const vis = div.data.map(t => { const g = t.meta && t.meta.group; return !g || wanted.includes(g); });
    Plotly.restyle(div, {visible: vis});
  }
  function wire(name){
    const div = document.getElementById('fig-' + name); if (!div) return;
    const colour = document.getElementById(name + '-colour'), query = document.getElementById(name + '-query'),
          views = document.getElementById(name + '-views');
    const update = () => {
      const wanted = [colour ? colour.value : ''];
      if (query && query.value) wanted.push(query.value);
      if (views && views.checked) wanted.push('views');
      draw(div, 'control').then(() => showGroups(div, wanted));
    };
    [colour, query, views].forEach(el => el && el.addEventListener('change', update));
  }
  wire('map'); wire('umap');
})();
"""


def _json(value) -> str:
    """JSON safe inside a <script> element: no value can write "</script>"."""
    return json.dumps(value, separators=(",", ":"), default=_default).replace("</", "<\\/")


def _default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def esc(value) -> str:
    return html.escape(str(value))


def card(row: int, item_id: str, caption: str) -> str:
    """A contact-sheet card: the panorama's thumbnail strip (filled in by the page's script) and a caption."""
    return (f'<div class="card thumb" data-row="{row}" data-id="{esc(item_id)}"><div class="cap"><b>{esc(item_id)}</b> '
            f"{esc(caption)}</div></div>")


def controls(name: str, options: list[tuple[str, str]], queries: list[tuple[str, str]] = (), views: bool = False) -> str:
    parts = [f'<div class="controls"><label>colour by <select id="{name}-colour">']
    parts += [f'<option value="{esc(value)}">{esc(text)}</option>' for value, text in options]
    parts.append("</select></label>")
    if queries:
        parts.append(f'<label>query circles <select id="{name}-query"><option value="">none</option>')
        parts += [f'<option value="{esc(value)}">{esc(text)}</option>' for value, text in queries]
        parts.append("</select></label>")
    if views:
        parts.append(f'<label><input type="checkbox" id="{name}-views"> views too</label>')
    parts.append("</div>")
    return "".join(parts)


def figure_div(name: str, height: int = 0) -> str:
    style = f' style="min-height:{height}px"' if height else ""
    return f'<div class="figure" id="fig-{esc(name)}"{style}></div>'


# plotly.js's cartesian partial bundle (vendor/README.md): the SVG traces without WebGL and maps, 1.5 MB
# against the full bundle's 4.7 MB, which Chromium evaluates in about half the time (0.6 s against 1.2 s
# here: most of the first screen's cost).
CARTESIAN_BUNDLE = Path(__file__).with_name("vendor") / "plotly-cartesian.min.js.gz"  # gzip: a third of the size
CARTESIAN_TRACES = frozenset({"bar", "box", "contour", "heatmap", "histogram", "histogram2d", "histogram2dcontour", "image",
                              "pie", "scatter", "scatterternary", "violin"})


def plotly_bundle(figures: dict) -> tuple[str, str]:
    """(plotly.js to inline, which: "cartesian 4.1.1" or "full 4.1.1"). The cartesian bundle where it is
    plotly.py's own plotly.js version (the figure dicts are written for it) and has every trace type of
    ``figures``; the full one otherwise (WebGL above ``figures.WEBGL_ABOVE`` points, ``--tiles`` maps)."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    version = get_plotlyjs_version()
    kinds = {trace.get("type", "scatter") for fig in figures.values() if fig for trace in fig.get("data", ())}
    if kinds <= CARTESIAN_TRACES and CARTESIAN_BUNDLE.is_file():
        bundle = gzip.decompress(CARTESIAN_BUNDLE.read_bytes()).decode("utf-8")
        if f"plotly.js (cartesian - minified) v{version}\n" in bundle[:200]:
            return bundle, f"cartesian {version}"
    return get_plotlyjs(), f"full {version}"


def document_html(title: str, header: str, sections: list[tuple[str, str, str]], data: dict, warning: str | None = None) -> str:
    """The whole page: ``sections`` are (anchor, title, inner HTML); ``data`` goes to the script as JSON."""
    plotly_js = plotly_bundle(data.get("figures", {}))[0].replace("</script", "<\\/script")
    nav = " ".join(f'<a href="#{esc(anchor)}">{esc(heading)}</a>' for anchor, heading, _ in sections)
    body = "".join(f'<section id="{esc(anchor)}"><h2>{esc(heading)}</h2>{inner}</section>' for anchor, heading, inner in sections)
    banner = f'<div class="warning" id="warning">{esc(warning)}</div>' if warning else ""
    early, late = _blocks(data)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{STYLE}</style><script>{plotly_js}</script></head><body>{banner}"
        f"<header><h1>{esc(title)}</h1>{header}<nav>{nav}</nav></header>"
        f'<aside id="panel"><b>Hover a point</b><div id="panel-body" class="note">its id, labels and views appear here</div></aside>'
        f"<main>{body}</main>{early}<script>{SCRIPT}</script>{late}</body></html>\n"
    )


EARLY_BYTES = 64_000


def _blocks(data: dict) -> tuple[str, str]:
    """Each figure and each other entry of ``data`` as its own JSON element, which the page parses when it
    needs it: the first figure (the one on the first screen) and the small ones before the page's script,
    everything else (the other figures, hover texts, thumbnails) after it."""
    early, late = [], []
    named = [(f"figure-{name}", fig) for name, fig in data.get("figures", {}).items() if fig is not None]
    named += [(key, value) for key, value in data.items() if key != "figures"]
    for k, (key, value) in enumerate(named):
        text = f'<script type="application/json" id="mimetic-{esc(key)}">{_json(value)}</script>'
        (early if (k == 0 and key.startswith("figure-")) or len(text) < EARLY_BYTES else late).append(text)
    return "".join(early), "".join(late)


RANDOM_WARNING = ("This report was made with RANDOM, UNTRAINED weights (--random-weights): every label, score, UMAP and "
                  "correlation on this page is meaningless. Only the machinery is real.")


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def correlation_html(c: dict | None, against: str | None) -> str:
    if c is None:
        return ('<p class="note">No column to compare with: pass <code>--against COLUMN</code> (a metadata column, joined at '
                "report time with <code>--metadata FILE</code>), e.g. a building's year of construction.</p>")
    values = ", ".join(f"{esc(label)} = {value:g}" for label, value in zip(c["labels"], c["values"], strict=True))
    left = c["left_out"]
    explain = (f'<p class="note">Each panorama\'s <b>expected value</b> on <b>{esc(c["scale"])}</b> is Σ p(label) · value(label), '
               f"with p the softmax(100 · cos) of its pooled embedding over the prompts “{esc(c['template'])}”; values: {values}. "
               f"It is compared with <b>{esc(c['column'])}</b> by Spearman's ρ.</p>")
    rows = [("column", esc(c["column"])), ("scale", esc(c["scale"])), ("n (pairs)", c["n"]),
            ("left out", f"{left['total']} ({left['missing']} without a value, {left['not_numeric']} not a number)")]
    if c["spearman"] is None:
        return explain + _table(rows) + f'<p class="missing" id="no-statistic">No statistic: {esc(c["reason"])}.</p>'
    ci = c["ci95"]
    rows += [("Spearman ρ", f"{c['spearman']:.3f}"),
             ("95% CI", f"[{ci[0]:.3f}, {ci[1]:.3f}] (bootstrap, {c['bootstrap']['method']}, {c['bootstrap']['resamples']} resamples, paired)"
              if ci else esc(c["reason"])),
             ("p (two-sided)", f"{c['p_value']:.2g} ({c['permutations']} seeded permutations, seed {c['seed']})")]
    return explain + _table(rows) + figure_div("scatter", 480)


def _table(rows) -> str:
    return '<table class="stats">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def write(path: Path, document: dict, figs: dict, *, corpus, hover, strips: dict, missing: dict, sheets: dict, queries: list) -> Path:
    """The panorama report (map, labels, UMAP, correlation, queries) as ``path``."""
    n = document["panoramas"]["n"]
    vocabs = document["vocabularies"]
    colour = [(f"vocabulary:{name}", f"top label: {name}") for name in vocabs]
    colour += [(f"numeric:{name}", name) for name in ([document["parameters"]["against"]] if document["correlation"] else [])]
    colour += [(f"numeric:expected {document['scale']['vocabulary']} value", f"expected {document['scale']['vocabulary']} value")]
    query_options = [(f"query:{k}", q["text"]) for k, q in enumerate(document["queries"])]
    sections = []
    p = document["panoramas"]
    if not n:
        sections.append(("empty", "Nothing to show", f'<p class="missing" id="empty">The target holds no embedded panorama '
                                                    f"({p['failed']} failed). Nothing to map, read or correlate.</p>"))
    else:
        if figs["map"] is None:
            inner = ('<p class="missing" id="no-map">No panorama has coordinates (lat/lon), so there is no map. Give them '
                     "with --metadata FILE (lat/lon columns or a GeoJSON point, matched by id).</p>")
        else:
            inner = (controls("map", colour, query_options) + figure_div("map", 560)
                     + f'<p class="note">{p["with_coordinates"]} of {n} panoramas have coordinates'
                     + ("" if document["parameters"]["tiles"] else "; offline, no basemap (--tiles URL adds one)") + ". "
                     "Query circles: green the top, red the bottom of the ranking.</p>")
        sections.append(("map", "Map", inner))
        label_html = []
        for name, vocab in vocabs.items():
            label_html.append(f"<h3>{esc(name)}</h3>" + figure_div(f"labels-{name}"))
            for entry in vocab["top"]:
                members = sheets[name][vocab["labels"].index(entry["label"])]
                cards = "".join(card(r, corpus.ids[r], f"p = {e['probability']:.3f}") for r, e in zip(members, entry["panoramas"], strict=True))
                label_html.append(f"<details><summary>{esc(entry['label'])}: the {len(members)} highest-scoring panoramas</summary>"
                                  f'<div class="sheet">{cards}</div></details>')
        sections.append(("labels", "Labels", "".join(label_html)))
        u = document["umap"]
        sections.append(("umap", "UMAP", controls("umap", colour, views="views" in u) + figure_div("umap", 560)
                         + f'<p class="note">{esc(u["method"])} of {u["n"]} pooled embeddings (cosine; seed {u.get("seed", "–")}'
                         f'{"; the views included" if "views" in u else ""}).</p>'))
        sections.append(("correlation", "Correlation with history", correlation_html(document["correlation"], document["parameters"]["against"])))
        query_html = []
        for q, query in zip(document["queries"], queries, strict=True):
            for side, rows in (("top", query["positive"]), ("bottom", query["negative"])):
                entries = q[side]
                cards = "".join(card(r, e["id"], f"#{e['rank']} score {e['score']:+.4f}") for r, e in zip(rows, entries, strict=True))
                query_html.append(f"<h3>“{esc(q['text'])}”: {side} {len(entries)}</h3><div class=\"sheet\">{cards}</div>")
        sections.append(("queries", "Queries", "".join(query_html) or '<p class="note">No --query given.</p>'))
    header = (f'<p class="note">{esc(document["target"])}: {n} panoramas ({p["failed"]} failed), '
              f'{esc(document["engine_config"].get("clip_model"))}, views {esc(document["engine_config"].get("views"))}; '
              f"every number here is in report.json. mimetic {esc(document['mimetic_version'])}, {esc(document['created'])}.</p>")
    if p["drawn"] < n:
        header += (f'<p class="note" id="sampled">The map and the UMAP draw a seeded sample of {p["drawn"]} of the {n} panoramas '
                   f"(--max-points {p['drawn']}), so the page opens quickly; every statistic, label distribution and query uses "
                   f"all {n}.</p>")
    figures_data = {"map": figs["map"], **{f"labels-{name}": fig for name, fig in figs["labels"].items()},  # in page order
                    "umap": figs["umap"], "scatter": figs["scatter"]}
    data = {"figures": figures_data, "hover": {str(r): text for r, text in hover.items()},
            "thumbs": {str(r): uri for r, uri in strips.items()},
            "missing": {str(r): reason for r, reason in missing.items()}}
    warning = RANDOM_WARNING if document["random_weights"] else None
    page_html = document_html(f"mimetic report: {Path(document['target']).name}", header, sections, data, warning)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page_html, encoding="utf-8")
    os.replace(tmp, path)
    return path
