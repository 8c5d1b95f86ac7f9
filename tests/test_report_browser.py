"""The report in a real browser: headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it) loads the
page from ``file://`` with no console error and no network request, draws the map on the first screen and
the UMAP and the scatter after it (in idle time, or when scrolled near), shows a panorama's thumbnails on
hover, and takes a screenshot.

Without Chromium the tests are skipped on a developer's machine, and fail under CI (``CI`` set), where a
skipped browser test would hide a broken page.
"""

from __future__ import annotations

import os

import pytest

from engine.analysis import ReportOptions, build_report
from engine.analysis.browser import find_browser, open_page
from engine.ingest.job import ingest
from engine.models.tiny import make_tiny_clip

from .test_ingest import build_dump, small, tiny_engine

if find_browser() is None:
    if os.environ.get("CI"):
        pytest.fail("no Chromium: .ci/run installs it with apt-get install -y chromium", pytrace=False)
    pytest.skip("no Chromium here (apt-get install chromium)", allow_module_level=True)

# A real mouse move over the first point of the map, on plotly's drag layer, where a person's mouse lands;
# the panel is read a moment later (plotly throttles hover events).
HOVER = """new Promise(done => {
  const div = document.getElementById('fig-map');
  div.scrollIntoView();
  const trace = div.data[0], layout = div._fullLayout, drag = div.querySelector('.nsewdrag');
  const box = drag.getBoundingClientRect();
  drag.dispatchEvent(new MouseEvent('mousemove', {clientX: box.left + layout.xaxis.l2p(trace.x[0]),
                                                  clientY: box.top + layout.yaxis.l2p(trace.y[0]), bubbles: true}));
  setTimeout(() => {
    const panel = document.getElementById('panel-body');
    done(JSON.stringify({images: panel.querySelectorAll('img').length, text: panel.innerText}));
  }, 300);
})"""

# No idle time and no scrolling: what is below the fold is drawn only when something asks for it.
STILL = "window.requestIdleCallback = () => 0; window.IntersectionObserver = class { observe() {} };"
# Colour the UMAP, not drawn yet, by its second option once the page is read; say what it then shows.
COLOUR = """new Promise(done => {
  const go = () => {
    if (document.readyState !== 'complete') return setTimeout(go, 50);
    const select = document.getElementById('umap-colour'), div = document.getElementById('fig-umap'), before = div.dataset.drawn || null;
    select.value = select.options[1].value; select.dispatchEvent(new Event('change'));
    const shown = () => [...new Set(div.data.filter(t => t.visible === true).map(t => t.meta.group))];
    const wait = () => div.dataset.drawn ? setTimeout(() => done(JSON.stringify({before, by: div.dataset.drawnBy, wanted: select.value,
                                                                                  shown: shown()})), 200) : setTimeout(wait, 50);
    wait();
  };
  go();
})"""


@pytest.fixture(scope="module")
def report(tmp_path_factory, louvre, jordan_pond):
    root = tmp_path_factory.mktemp("browser")
    engine = tiny_engine(f"local-dir:{make_tiny_clip(root / 'models')}")
    dump, metadata, expected = build_dump(root, [small(louvre), small(jordan_pond)], count=8)
    ingest(dump, root / "run", engine=engine, metadata=[metadata], shard_size=4, quiet=True, thumbnails=32)
    ages = root / "ages.csv"
    ages.write_text("key,year_built\n" + "".join(f"{row['key']},{1500 + 40 * k}\n" for k, row in enumerate(expected.values())))
    options = ReportOptions(queries=["a baroque church"], against="year_built", metadata=[ages], top=2, quiet=True)
    build_report(root / "run", root / "report", options, engine=engine)
    return root


@pytest.fixture(scope="module")
def page(report):
    return open_page(report / "report" / "index.html", screenshot=report / "report.png", evaluate=[HOVER])


def test_the_page_loads_from_file_with_no_console_error_and_no_request(page):
    assert page.url.startswith("file://")
    assert page.errors == []
    assert page.requests == []


def test_the_map_the_umap_and_the_scatter_are_drawn(page):
    assert {"fig-map", "fig-umap", "fig-scatter"} <= set(page.drawn)
    assert set(page.drawn) == set(page.figures)  # every figure on the page, the label distributions too
    assert "Spearman ρ" in page.text and "RANDOM" not in page.text  # the tiny model's weights are its file's


def test_the_first_screen_is_drawn_first_and_the_figures_below_the_fold_after_it(page):
    assert "fig-map" in page.first_figures and page.drawn_by["fig-map"] == "screen"
    assert "fig-umap" not in page.first_figures and "fig-scatter" not in page.first_figures  # below the fold
    assert page.drawn_by["fig-scatter"] in ("near", "idle") and 0 < page.first_screen < page.seconds


def test_a_figure_below_the_fold_is_drawn_when_scrolled_near(report):
    # No idle time to draw in: only a reader's scrolling draws what is below the fold.
    seen = open_page(report / "report" / "index.html", scroll=True, before="window.requestIdleCallback = () => 0;")
    assert seen.errors == [] and seen.requests == []
    assert set(seen.drawn) == set(seen.figures)
    assert seen.drawn_by["fig-map"] == "screen" and seen.drawn_by["fig-scatter"] == "near"


def test_a_control_draws_its_figure_when_it_is_not_drawn_yet(report):
    import json

    seen = open_page(report / "report" / "index.html", before=STILL, timeout=3, evaluate=[COLOUR])
    assert seen.errors == [] and "fig-umap" not in seen.drawn  # nothing drew it in 3 s
    shown = json.loads(seen.values[0])
    assert shown["before"] is None and shown["by"] == "control" and shown["shown"] == [shown["wanted"]]


def test_hovering_a_point_shows_its_id_and_its_thumbnails(page):
    import json

    shown = json.loads(page.values[0])
    assert shown["images"] == 1 and "seq-" in shown["text"]


def test_a_screenshot_is_taken(page):
    data = page.screenshot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000


def test_a_page_of_svg_figures_inlines_the_cartesian_bundle_and_a_webgl_page_the_full_one(report, monkeypatch):
    """Up to figures.WEBGL_ABOVE points the page carries plotly.js's 1.5 MB cartesian bundle; above it (here
    forced to 3 points) its traces are WebGL and the page the full bundle, and both draw, hover and ask nothing."""
    import json

    from plotly.offline import get_plotlyjs_version

    from engine.analysis import figures

    version = get_plotlyjs_version()
    svg = (report / "report" / "index.html").read_text()
    assert f"plotly.js (cartesian - minified) v{version}" in svg and '"scattergl"' not in svg.split("</head>")[1]
    monkeypatch.setattr(figures, "WEBGL_ABOVE", 3)
    options = ReportOptions(queries=["a baroque church"], against="year_built", metadata=[report / "ages.csv"], top=2, quiet=True)
    build_report(report / "run", report / "webgl", options)  # the run's own model, loaded as the command loads it
    webgl = (report / "webgl" / "index.html").read_text()
    assert "plotly.js (cartesian" not in webgl and '"scattergl"' in webgl.split("</head>")[1]
    seen = open_page(report / "webgl" / "index.html", evaluate=[HOVER])
    assert seen.errors == [] and seen.requests == [] and set(seen.drawn) == set(seen.figures)
    assert json.loads(seen.values[0])["images"] == 1
