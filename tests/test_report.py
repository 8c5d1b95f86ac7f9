"""``mimetic report``: the statistics against scipy, the report of a real (tiny-model) run, and bad input.

The runs are ingested from re-encodes of the shared panoramas with the tiny CLIP (tests/test_ingest.py's
dump: a Mapillary-style CSV with lat/lon), and a second metadata table of building years is joined at
report time, as a city's building ages usually come from another table.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from engine import Panorama, cli
from engine.analysis import ReportError, ReportOptions, build_report
from engine.analysis.statistics import correlate, expected_values, label_distribution, probabilities
from engine.ingest.job import ingest
from engine.ingest.query import query
from engine.models.tiny import make_tiny_clip
from engine.results import write_parquet
from engine.vocab import Vocabulary, load_vocabulary

from .test_ingest import build_dump, small, tiny_engine

COUNT = 12


# -- the statistics, against scipy ------------------------------------------------------------------


def test_a_planted_monotone_relation_gives_rho_one_and_p_below_a_thousandth_at_n_50():
    rng = np.random.default_rng(3)
    x = rng.uniform(1000, 2000, 50)
    result = correlate(x, np.exp(x / 400), seed=1)  # monotone, far from linear
    assert result["n"] == 50 and result["spearman"] == pytest.approx(1.0)
    assert result["spearman"] == pytest.approx(stats.spearmanr(x, np.exp(x / 400)).statistic)
    assert result["p_value"] < 0.001 and result["permutations"] >= 10_000
    assert result["ci95"][0] > 0.99 and result["ci95"][0] <= 1.0 <= result["ci95"][1] + 1e-12


def test_a_shuffled_relation_gives_an_interval_that_contains_zero():
    rng = np.random.default_rng(4)
    x = rng.normal(size=200)
    result = correlate(x, rng.permutation(x), seed=2)
    assert result["ci95"][0] < 0 < result["ci95"][1]
    assert result["p_value"] > 0.05


def test_the_p_value_and_interval_agree_with_exact_enumeration_and_scipys_bootstrap():
    """At n = 7 there are 5,040 pairings: the exact two-sided p is counted here by enumerating them with
    spearmanr; 10,000 seeded permutations must land within 0.01 of it. At n = 40 the interval must be the one
    scipy's bootstrap gives for spearmanr itself (other draws: within Monte Carlo error)."""
    import itertools

    x = np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.6])
    y = np.array([2.0, 7.0, 1.0, 8.0, 2.8, 1.8, 2.9])
    result = correlate(x, y, seed=5)
    observed = stats.spearmanr(x, y).statistic
    null = np.array([stats.spearmanr(x, y[list(order)]).statistic for order in itertools.permutations(range(7))])
    exact = np.mean(np.abs(null) >= abs(observed) - 1e-12)
    assert result["spearman"] == pytest.approx(observed)
    assert result["p_value"] == pytest.approx(exact, abs=0.01)
    assert correlate(x, y, seed=5)["p_value"] == result["p_value"]  # seeded: the same draws
    rng = np.random.default_rng(6)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    result = correlate(x, y, seed=5)
    boot = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True, vectorized=False,
                           n_resamples=9_999, method="BCa", rng=np.random.default_rng(11))
    assert result["ci95"] == pytest.approx(list(boot.confidence_interval), abs=0.02)


def test_pairs_with_a_missing_side_are_left_out_and_counted():
    x = np.arange(10, dtype=float)
    y = x.copy()
    y[[2, 5]] = np.nan
    result = correlate(x, y, seed=0)
    assert result["n"] == 8 and result["left_out"] == 2


@pytest.mark.parametrize("pairs", [0, 1, 2])
def test_fewer_than_three_pairs_give_no_statistic_and_say_why(pairs):
    result = correlate(np.arange(pairs, dtype=float), np.arange(pairs, dtype=float))
    assert result["spearman"] is None and result["p_value"] is None and result["ci95"] is None
    assert "at least 3" in result["reason"]


def test_a_constant_column_gives_no_statistic():
    result = correlate(np.arange(5, dtype=float), np.full(5, 1850.0))
    assert result["spearman"] is None and "the same" in result["reason"]


def test_label_shares_have_scipys_wilson_interval():
    probs = np.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    rows = label_distribution(probs, ["a", "b"])
    assert [r["count"] for r in rows] == [3, 1]
    wilson = stats.binomtest(3, 4).proportion_ci(0.95, method="wilson")
    assert rows[0]["ci95"] == pytest.approx([wilson.low, wilson.high]) and rows[0]["share"] == 0.75


# -- vocabulary values --------------------------------------------------------------------------------


def test_periods_give_each_label_its_representative_year_in_order():
    periods = load_vocabulary("periods")
    assert len(periods.values) == len(periods.labels)
    assert list(periods.values) == sorted(periods.values)  # the labels are chronological
    assert dict(zip(periods.labels, periods.values, strict=True))["17th century"] == 1650


def test_values_load_from_json_and_csv_and_bad_ones_are_refused(tmp_path):
    (tmp_path / "ages.json").write_text(json.dumps({"labels": ["old", "new"], "values": [1500, 2000]}))
    assert load_vocabulary(tmp_path / "ages.json").values == (1500.0, 2000.0)
    (tmp_path / "ages.csv").write_text("label,value\nold,1500\nnew,2000\n")
    assert load_vocabulary(tmp_path / "ages.csv").values == (1500.0, 2000.0)
    (tmp_path / "short.json").write_text(json.dumps({"labels": ["old", "new"], "values": [1500]}))
    with pytest.raises(ValueError, match="1 values for 2 labels"):
        load_vocabulary(tmp_path / "short.json")
    (tmp_path / "text.csv").write_text("label,value\nold,ancient\n")
    with pytest.raises(ValueError, match=r"line 2.*not a number"):
        load_vocabulary(tmp_path / "text.csv")
    with pytest.raises(ValueError, match="not a finite number"):
        Vocabulary("v", "{label}", ("a",), values=(float("nan"),))


# -- a real run ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return f"local-dir:{make_tiny_clip(tmp_path_factory.mktemp('models'))}"


@pytest.fixture(scope="module")
def engine(models):
    return tiny_engine(models)


@pytest.fixture(scope="module")
def city(tmp_path_factory, louvre, jordan_pond, engine):
    """A run of 12 panoramas with coordinates and thumbnails, and a table of building years for 10 of them
    (one of which says "unknown")."""
    root = tmp_path_factory.mktemp("report")
    dump, metadata, expected = build_dump(root, [small(louvre), small(jordan_pond)], count=COUNT)
    run = root / "run"
    ingest(dump, run, engine=engine, metadata=[metadata], shard_size=5, quiet=True, thumbnails=32)
    ages = root / "ages.csv"
    keys = sorted(row["key"] for row in expected.values())
    lines = ["image_id,year_built"] + [f"{key},{1600 + 25 * k}" for k, key in enumerate(keys[:9])] + [f"{keys[9]},unknown"]
    ages.write_text("\n".join(lines) + "\n")
    return {"run": run, "ages": ages, "dump": dump, "root": root}


@pytest.fixture(scope="module")
def report(city, engine):
    out = city["root"] / "report"
    options = ReportOptions(queries=["a baroque church"], against="year_built", metadata=[city["ages"]], top=3, quiet=True)
    document = build_report(city["run"], out, options, engine=engine)
    return out, document


def test_the_report_writes_the_page_and_every_number_in_report_json(report):
    out, _ = report
    assert (out / "index.html").stat().st_size > 1_000_000  # plotly.js is inlined
    stored = json.loads((out / "report.json").read_text())
    assert stored["panoramas"]["n"] == COUNT and stored["panoramas"]["failed"] == 3  # the dump's corrupt files
    assert stored["panoramas"]["with_coordinates"] == COUNT and stored["panoramas"]["thumbnails_from"] == "target"
    assert set(stored["vocabularies"]) == {"styles", "periods", "urban"}
    for vocab in stored["vocabularies"].values():
        assert sum(row["count"] for row in vocab["distribution"]) == COUNT
    c = stored["correlation"]
    assert {"column", "scale", "template", "labels", "values", "n", "spearman", "ci95", "p_value", "pairs"} <= set(c)
    assert c["n"] == 9 and c["left_out"] == {"missing": 2, "not_numeric": 1, "total": 3}  # 2 without a row, 1 "unknown"
    assert c["spearman"] == pytest.approx(stats.spearmanr([p["expected"] for p in c["pairs"]], [p["value"] for p in c["pairs"]]).statistic)
    assert stored["versions"]["scipy"] and stored["versions"]["umap-learn"] and stored["umap"]["method"] == "UMAP"


def test_the_expected_value_is_recomputed_from_the_stored_embedding(report, city, engine):
    """Σ p(label) · year, p = softmax(100 · cos) of the panorama's stored pooled embedding over the periods prompts,
    recomputed here with torch from the Parquet file and the text tower."""
    _, document = report
    table = pq.read_table(next((city["run"] / "panoramas").glob("part-*.parquet")), columns=["id", "embedding"])
    periods = load_vocabulary("periods")
    text = engine.embed_text(periods.prompts()).float()
    pairs = {p["id"]: p["expected"] for p in document["correlation"]["pairs"]}
    checked = 0
    for item, embedding in zip(table.column("id").to_pylist(), table.column("embedding").to_pylist(), strict=True):
        if item in pairs:
            p = torch.softmax(100.0 * torch.tensor(embedding, dtype=torch.float32) @ text.T, dim=0)
            assert pairs[item] == pytest.approx(float(p @ torch.tensor(periods.values)), rel=1e-5)
            checked += 1
    assert checked >= 2


def test_the_query_section_agrees_with_mimetic_query(report, city, engine):
    _, document = report
    ranked = query(city["run"], "a baroque church", top=3, engine=engine)
    assert [r["id"] for r in document["queries"][0]["top"]] == [r["id"] for r in ranked.positive]
    assert [r["id"] for r in document["queries"][0]["bottom"]] == [r["id"] for r in ranked.negative]
    assert document["queries"][0]["top"][0]["score"] == pytest.approx(ranked.positive[0]["score"], abs=1e-3)


def test_the_label_contact_sheets_hold_the_highest_scoring_panoramas(report, city, engine):
    _, document = report
    parts = sorted((city["run"] / "panoramas").glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(part, columns=["id", "embedding"]) for part in parts])
    urban = load_vocabulary("urban")
    embeddings = torch.tensor(table.column("embedding").to_pylist(), dtype=torch.float32)
    probs = torch.softmax(100.0 * embeddings @ engine.embed_text(urban.prompts()).float().T, dim=1).numpy()
    assert probabilities(embeddings.numpy(), engine.embed_text(urban.prompts()).float().numpy()) == pytest.approx(probs, abs=1e-5)
    ids = table.column("id").to_pylist()
    for k in range(3):
        best = [ids[i] for i in np.argsort(-probs[:, k], kind="stable")[:6]]
        assert [p["id"] for p in document["vocabularies"]["urban"]["top"][k]["panoramas"]] == best
    assert expected_values(probs, np.arange(len(urban))).shape == (COUNT,)


def test_thumbnails_are_cut_from_the_sources_when_the_target_has_none(city, engine, tmp_path):
    """A results file without thumbnails: they are cut by the Engine from each id's file; a missing file is said."""
    sources = sorted(city["dump"].rglob("img*.jpg"))[:3]
    results = engine.embed([Panorama(id=str(p), data=str(p)) for p in sources])
    path = write_parquet(results, tmp_path / "results.parquet", engine.config)
    sources[2].unlink()
    document = build_report(path, tmp_path / "report", ReportOptions(quiet=True, sheet=1), engine=engine)
    assert document["panoramas"]["with_thumbnails"] == 2 and document["panoramas"]["thumbnails_from"] == "sources"
    assert f"source missing: {sources[2]}" in (tmp_path / "report" / "index.html").read_text()
    assert document["correlation"] is None and "no map" not in document


# -- bad input -----------------------------------------------------------------------------------------


def test_a_run_without_coordinates_says_so_and_the_rest_works(city, engine, tmp_path):
    sources = sorted(city["dump"].rglob("img*.jpg"))[:6]
    results = engine.embed([Panorama(id=str(p), data=str(p)) for p in sources])
    path = write_parquet(results, tmp_path / "results.parquet", engine.config)
    document = build_report(path, tmp_path / "report", ReportOptions(quiet=True, queries=["a tree"]), engine=engine)
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'id="no-map"' in page and 'id="fig-map"' not in page and 'id="fig-umap"' in page
    assert document["panoramas"]["with_coordinates"] == 0 and len(document["queries"][0]["top"]) == 6


def test_a_sampled_map_says_so_and_the_statistics_use_every_panorama(city, engine, tmp_path, report):
    _, full = report
    options = ReportOptions(queries=["a baroque church"], against="year_built", metadata=[city["ages"]], top=3, quiet=True,
                            max_points=5)
    document = build_report(city["run"], tmp_path / "report", options, engine=engine)
    assert document["panoramas"]["drawn"] == 5 and document["umap"]["n"] == 5
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'id="sampled"' in page and f"5 of the {COUNT} panoramas" in page
    assert 'id="sampled"' not in (report[0] / "index.html").read_text()  # all drawn: nothing to say
    for key in ("n", "spearman", "ci95", "p_value"):
        assert document["correlation"][key] == full["correlation"][key]
    assert document["queries"] == full["queries"]


def test_fewer_than_three_pairs_say_why_on_the_page(city, engine, tmp_path):
    ages = tmp_path / "two.csv"
    ages.write_text("image_id,year_built\nimg000,1700\nimg001,1800\n")
    document = build_report(city["run"], tmp_path / "report", ReportOptions(against="year_built", metadata=[ages], quiet=True),
                            engine=engine)
    assert document["correlation"]["n"] == 2 and document["correlation"]["spearman"] is None
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'id="no-statistic"' in page and "a correlation needs at least 3" in page


def test_a_missing_or_non_numeric_column_is_one_line_and_exit_2(city, models, capsys, tmp_path):
    words = tmp_path / "words.csv"
    words.write_text("image_id,style\nimg000,baroque\nimg001,gothic\n")
    for column, extra, message in (("year_built", [], "no panorama has a column 'year_built'"),
                                   ("style", ["--metadata", str(words)], "the column is not numeric")):
        status = cli.main(["report", str(city["run"]), "--out", str(tmp_path / "r"), "--against", column, "--quiet", *extra])
        err = capsys.readouterr().err
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_target_that_is_not_one_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert cli.main(["report", str(tmp_path / "folder"), "--out", str(tmp_path / "r")]) == 2
    assert "not an ingest run folder" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_a_scale_without_values_is_refused(city, engine, tmp_path):
    with pytest.raises(ReportError, match="gives its labels no values"):
        build_report(city["run"], tmp_path / "r", ReportOptions(scale="styles", quiet=True), engine=engine)


def test_an_empty_run_says_so(city, engine, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "broken.jpg").write_bytes(b"not a jpeg")
    ingest(dump, tmp_path / "run", engine=engine, quiet=True)
    document = build_report(tmp_path / "run", tmp_path / "report", ReportOptions(quiet=True, queries=["a tree"]), engine=engine)
    assert document["panoramas"]["n"] == 0 and document["panoramas"]["failed"] == 1
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'id="empty"' in page and "holds no embedded panorama" in page


def test_the_thumbnail_column_holds_a_jpeg_per_view(city):
    views = pq.read_table(next((city["run"] / "views").glob("part-*.parquet")), columns=["view", "thumbnail"])
    assert pc.all(pc.is_valid(views.column("thumbnail"))).as_py()
    from io import BytesIO

    from PIL import Image

    image = Image.open(BytesIO(views.column("thumbnail")[0].as_py()))
    assert image.format == "JPEG" and image.width == 32


def test_the_cartesian_bundle_is_used_only_for_its_traces_and_plotly_py_s_own_version(monkeypatch):
    import plotly.offline

    from engine.analysis.page import plotly_bundle

    version = plotly.offline.get_plotlyjs_version()
    svg = {"map": {"data": [{"type": "scatter"}, {"type": "bar"}]}, "umap": None}
    assert plotly_bundle(svg)[1] == f"cartesian {version}" and len(plotly_bundle(svg)[0]) < 2_500_000
    for kind in ("scattergl", "scattermap"):  # WebGL above WEBGL_ABOVE points; --tiles
        script, which = plotly_bundle({"map": {"data": [{"type": "scatter"}, {"type": kind}]}})
        assert which == f"full {version}" and script == plotly.offline.get_plotlyjs()
    # The vendored file is npm's, byte for byte (vendor/README.md records its sha256 before gzip).
    import gzip
    import hashlib

    from engine.analysis.page import CARTESIAN_BUNDLE

    recorded = (CARTESIAN_BUNDLE.parent / "README.md").read_text()
    assert hashlib.sha256(gzip.decompress(CARTESIAN_BUNDLE.read_bytes())).hexdigest() in recorded
    monkeypatch.setattr(plotly.offline, "get_plotlyjs_version", lambda: "9.9.9")  # plotly.py upgraded past the vendored file
    assert plotly_bundle(svg)[1] == "full 9.9.9"
