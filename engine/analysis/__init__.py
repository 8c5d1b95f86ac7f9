"""The report: a city as the machine reads it, in one offline HTML page and a JSON of every number.

    target.py       a run folder, a results file or a dream folder -> a Corpus; --metadata joined; columns
    statistics.py   probabilities, expected values, label distributions, Spearman with bootstrap and permutations
    projection.py   UMAP (umap-learn, seeded)
    thumbnails.py   each panorama's views as a strip, from the target or cut by the Engine from its sources
    figures.py      the plotly figures: map, UMAP, label distributions, scatter, trajectories
    page.py         the self-contained HTML page (plotly.js inlined)
    dreams.py       a dream folder: trajectories through CLIP space, view/dream pairs
    report.py       build_report: all of it, top to bottom
    cli.py          ``mimetic report``
"""

__all__ = ["ReportError", "ReportOptions", "build_report"]


def __getattr__(name: str):
    # Lazy: ``mimetic --help`` imports engine.analysis.cli, and must not pay for scipy, pyarrow or torch.
    if name in ("ReportOptions", "build_report"):
        from engine.analysis import report

        return getattr(report, name)
    if name == "ReportError":
        from engine.analysis.target import ReportError

        return ReportError
    raise AttributeError(f"module 'engine.analysis' has no attribute {name!r}")
