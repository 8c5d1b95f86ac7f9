"""The ``report`` command of ``mimetic``: ``add_parsers`` adds it, ``run`` runs it.

    mimetic report TARGET --out DIR [--query TEXT ...] [--against COLUMN] [--metadata FILE ...] [--scale VOCAB]
                   [--vocabularies a,b] [--tiles URL] [--device auto] [--top N] [--sheet N] [--max-points N]
                   [--max-thumbnails N] [--thumbnail-size PX] [--umap-views] [--seed N] [--permutations N] [--quiet]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli import nonnegative_int, positive_int
from engine.config import DEFAULT_REPORT_MAX_POINTS


def add_parsers(commands) -> None:
    report = commands.add_parser(
        "report",
        help="one offline HTML page of what the engine read: map, labels, UMAP, queries, correlation with history; and report.json",
        description=(
            "Read TARGET (an ingest run folder, a results file of mimetic embed or demo, or a mimetic dream folder) and write "
            "DIR/index.html (self-contained: works offline, from file://) and DIR/report.json (every number on the page). "
            "Text is embedded with the target's own model."
        ),
    )
    report.add_argument("target", type=Path, metavar="TARGET", help="a run folder, a results .parquet, or a dream folder")
    report.add_argument("--out", required=True, type=Path, metavar="DIR", help="the folder for index.html and report.json")
    report.add_argument("--query", dest="queries", action="append", default=[], metavar="TEXT",
                        help="a text query: its top and bottom panoramas on the map and as contact sheets (repeatable)")
    report.add_argument("--against", default=None, metavar="COLUMN",
                        help="a numeric metadata column (e.g. year_built) to correlate each panorama's expected value with")
    report.add_argument("--metadata", action="append", type=Path, default=[], metavar="FILE",
                        help="CSV, JSONL or GeoJSON joined by id or file name, as ingest joins it (repeatable)")
    report.add_argument("--scale", default="periods", metavar="VOCAB",
                        help="the vocabulary whose label values make the expected value (default periods: each label's representative year)")
    report.add_argument("--vocabularies", default=None, metavar="A,B",
                        help="vocabularies to read the panoramas with (default: the target's own)")
    report.add_argument("--tiles", default=None, metavar="URL",
                        help="a {z}/{x}/{y} web tile URL drawn under the map, for online use (default: none, offline)")
    report.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N, for the text model (default auto)")
    report.add_argument("--top", type=positive_int, default=10, help="panoramas at each end of a query (default 10)")
    report.add_argument("--sheet", type=positive_int, default=6, help="panoramas per label in the contact sheets (default 6)")
    report.add_argument("--max-points", type=positive_int, default=DEFAULT_REPORT_MAX_POINTS,
                        help="panoramas drawn on the map and the UMAP; a seeded sample above it, which the page states; "
                             f"every statistic uses all of them (default {DEFAULT_REPORT_MAX_POINTS})")
    report.add_argument("--max-thumbnails", type=nonnegative_int, default=400,
                        help="panoramas that carry a thumbnail strip in the page (default 400)")
    report.add_argument("--thumbnail-size", type=positive_int, default=96,
                        help="pixels per view of a thumbnail cut from the sources (default 96)")
    report.add_argument("--umap-views", action="store_true", help="fit the UMAP on the views too, and offer to show them")
    report.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the UMAP, the samples, the bootstrap and the permutations")
    report.add_argument("--permutations", type=positive_int, default=10_000, help="permutations of the p-value (at least 10000)")
    report.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int | None:
    if args.command != "report":
        return None
    from engine.analysis.report import INDEX, REPORT_JSON, ReportOptions, build_report

    vocabularies = None if args.vocabularies is None else tuple(v.strip() for v in args.vocabularies.split(",") if v.strip())
    options = ReportOptions(queries=args.queries, against=args.against, metadata=args.metadata, scale=args.scale,
                            vocabularies=vocabularies, tiles=args.tiles, device=args.device, top=args.top, sheet=args.sheet,
                            max_points=args.max_points, max_thumbnails=args.max_thumbnails,
                            thumbnail_size=args.thumbnail_size, umap_views=args.umap_views, seed=args.seed,
                            permutations=args.permutations, quiet=args.quiet)
    document = build_report(args.target, args.out, options)  # a ReportError is a ValueError: main() prints one line
    c = document.get("correlation")
    if c and c.get("spearman") is not None:
        print(f"{c['column']} vs expected {c['scale']}: Spearman rho {c['spearman']:+.3f}, 95% CI "
              f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}], p {c['p_value']:.2g}, n {c['n']}" if c["ci95"] else
              f"{c['column']} vs expected {c['scale']}: Spearman rho {c['spearman']:+.3f}, p {c['p_value']:.2g}, n {c['n']}")
    elif c:
        print(f"{c['column']}: no statistic ({c['reason']})")
    panoramas = document["panoramas"]["n"] if isinstance(document["panoramas"], dict) else len(document["panoramas"])
    print(f"{panoramas} panoramas -> {args.out / INDEX} and {args.out / REPORT_JSON}")
    return 0
