"""The ``ingest`` and ``query`` commands of ``mimetic``: ``add_parsers`` adds them, ``run`` runs them.

    mimetic ingest DUMP --out RUN [--metadata FILE ...] [--shard-size N] [--north-up] [--thumbnails SIZE] [--quiet]
                   [--verify] [--hash-inputs] [--engine local|ray] [--address ADDR] [--actors N]
                   [--captions --caption-model DIR [--flavours V,...]] [--verbose] [engine flags]
    mimetic query RUN|RESULTS.parquet "a baroque church" [--top 20] [--views] [--out PREFIX] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli import positive_int
from engine.config import DEFAULT_SHARD_SIZE


def add_parsers(commands) -> None:
    """Add ``ingest`` and ``query`` to the ``mimetic`` command's subparsers."""
    from engine.cli import add_engine_arguments
    from engine.dream.caption_cli import add_captioner_arguments

    ingest = commands.add_parser(
        "ingest",
        help="embed a whole dump of panoramas into a run folder of sharded Parquet; resumable, exactly once",
        description=(
            "Embed every panorama of DUMP (a folder of jpg/jpeg/png/webp, searched recursively; WebDataset .tar "
            "shards; or a listing file of paths) into RUN: RUN/panoramas/part-*.parquet, RUN/views/part-*.parquet, "
            "RUN/quarantine/ (inputs that failed, with the reason), RUN/manifest.json and RUN/summary.json. Running the "
            "same command again resumes: after a crash or kill at any moment, every input ends up exactly once. "
            "Resuming with other settings or another dump is refused, with what differs."
        ),
    )
    ingest.add_argument("dump", type=Path, metavar="DUMP", help="a folder of panoramas, a WebDataset .tar, or a listing file")
    ingest.add_argument("--out", required=True, type=Path, metavar="RUN", help="the run folder (created, or resumed)")
    ingest.add_argument(
        "--metadata", action="append", type=Path, default=[], metavar="FILE",
        help="CSV, JSONL or GeoJSON keyed by id or file name (repeatable); lat/lon, heading (heading, compass_angle, ca, "
             "...) and captured_at are read, every other column is kept",
    )
    ingest.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE,
                        help=f"inputs per Parquet shard, the unit of commit and resume (default {DEFAULT_SHARD_SIZE})")
    ingest.add_argument("--north-up", action="store_true",
                        help="turn each panorama by its heading so a view's yaw is its compass bearing (0 = north); "
                             "inputs without a heading go to the quarantine")
    ingest.add_argument("--thumbnails", type=positive_int, default=None, metavar="SIZE",
                        help="keep a small JPEG of every view, SIZE pixels wide, in the views table's thumbnail column "
                             "(what mimetic report shows; set when the run starts)")
    ingest.add_argument("--quiet", action="store_true", help="plain log lines per shard instead of a progress bar")
    ingest.add_argument("--verify", action="store_true",
                        help="check every committed part against the sha256 recorded at its commit (sizes are always "
                             "checked) and redo the shards that differ")
    ingest.add_argument("--hash-inputs", action="store_true",
                        help="tell a replaced input by its content (sha256, every input read once) instead of its size "
                             "and modification time; set when the run starts")
    ingest.add_argument("--engine", dest="runner", choices=("local", "ray"), default="local",
                        help="local: one Engine in this process (default); ray: an actor pool on Ray Data")
    ingest.add_argument("--address", default=None, help="Ray cluster address for --engine ray (default: start a local one)")
    ingest.add_argument("--actors", type=positive_int, default=None,
                        help="Ray actors, each with its own Engine (default: one per GPU, or one per 4 CPUs)")
    ingest.add_argument("--verbose", action="store_true",
                        help="with --engine ray: all of Ray's own log lines (by default only its warnings and errors)")
    ingest.add_argument("--captions", action="store_true",
                        help="also caption every view (--caption-model) and make its interrogator prompt: the caption, then "
                             "CLIP's top label in each --flavours vocabulary; adds caption and prompt to the views table")
    add_captioner_arguments(ingest)
    add_engine_arguments(ingest)

    query = commands.add_parser(
        "query",
        help="rank a run's (or a results file's) panoramas or views by CLIP similarity to a text; writes CSV and GeoJSON",
        description=(
            "Embed TEXT with the target's own model and score every stored embedding (an exact torch matrix product, on the "
            "GPU when there is one). Prints the top and bottom results and writes PREFIX.csv and PREFIX.geojson "
            "(Points at lat/lon, polarity positive for the top, negative for the bottom)."
        ),
    )
    query.add_argument("run", type=Path, metavar="RUN", help="a run folder written by mimetic ingest, or a results file written by mimetic embed or demo")
    query.add_argument("text", metavar="TEXT")
    query.add_argument("--top", type=positive_int, default=20, help="results at each end of the ranking (default 20)")
    query.add_argument("--views", action="store_true", help="rank single views instead of whole panoramas")
    query.add_argument("--out", type=Path, default=None, metavar="PREFIX",
                       help="output path without extension (default RUN/queries/<text>[-views]; beside a results file, queries/<text>)")
    query.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")


def run(args: argparse.Namespace) -> int | None:
    """Run ``ingest`` or ``query``; None for any other command."""
    if args.command == "ingest":
        return _ingest(args)
    if args.command == "query":
        return _query(args)
    return None


def _ingest(args: argparse.Namespace) -> int:
    from engine.budget import give_freed_images_back_to_the_os
    from engine.cli import config_from_args
    from engine.ingest.inputs import InputError, RunMismatchError, RunWriteError
    from engine.ingest.job import ingest

    give_freed_images_back_to_the_os()  # peak memory follows the decode budget, not the decode threads

    options = {"metadata": args.metadata, "shard_size": args.shard_size, "north_up": args.north_up, "quiet": args.quiet,
               "verify": args.verify, "hash_inputs": args.hash_inputs, "captions": _captions(args),
               "thumbnails": args.thumbnails}
    try:
        config = config_from_args(args)
        if args.runner == "ray":
            try:
                import ray.data  # noqa: F401
            except ImportError:
                print("mimetic ingest: error: --engine ray needs Ray Data: pip install 'ray[data]'", file=sys.stderr)
                return 2
            from engine.ingest.ray import ingest_ray

            summary = ingest_ray(args.dump, args.out, config=config, address=args.address, actors=args.actors,
                                 verbose=args.verbose, **options)
        else:
            summary = ingest(args.dump, args.out, config=config, **options)
    except (RunMismatchError, InputError, RunWriteError) as exc:  # the run folder's own errors; others reach main()
        print(f"mimetic ingest: error: {exc}", file=sys.stderr)
        return 2
    now = summary["this_invocation"]
    print(
        f"{summary['panoramas']} panoramas, {summary['views']} views, {summary['quarantined']} quarantined "
        f"({summary['shards_done']}/{summary['shards']} shards) -> {args.out}; this run: {now['panoramas']} panoramas "
        f"in {now['wall_s']:.1f} s; embedding: {now['embedding_panoramas_per_s']:.2f} panoramas/s, "
        f"{now['embedding_views_per_s']:.1f} views/s; wall, including model loading: {now['panoramas_per_s']:.2f} "
        f"panoramas/s, {now['views_per_s']:.1f} views/s"
    )
    if summary["quarantined"]:
        print(f"quarantined inputs and reasons: {args.out}/quarantine/part-*.parquet")
    return 0 if summary["complete"] else 1


def _captions(args: argparse.Namespace):
    """--captions and the captioner's flags -> CaptionSettings (checked before any model loads), or None."""
    from engine.config import CaptionSettings
    from engine.dream.caption_cli import flavours_of
    from engine.models.caption import CaptionModelError, check_folder, check_generation
    from engine.vocab import load_vocabulary

    if not args.captions:
        if args.caption_model:
            raise ValueError("--caption-model is used with --captions")
        return None
    if not args.caption_model:
        raise CaptionModelError("--captions needs --caption-model DIR (a local transformers folder; "
                                "`mimetic models make-tiny DIR` writes a tiny one to DIR/caption)")
    check_generation(args.caption_beams, args.caption_max_tokens)
    check_folder(args.caption_model)
    flavours = flavours_of(args)
    for entry in flavours:
        load_vocabulary(entry)  # an unknown one fails here, before any model loads
    return CaptionSettings(str(args.caption_model), args.caption_beams, args.caption_max_tokens, flavours)


def _query(args: argparse.Namespace) -> int:
    from engine.ingest.inputs import InputError
    from engine.ingest.query import format_results, query, slug, write_results

    try:
        result = query(args.run, args.text, top=args.top, views=args.views, device=args.device)
    except InputError as exc:
        print(f"mimetic query: error: {exc}", file=sys.stderr)
        return 2
    folder = args.run.parent / "queries" if args.run.is_file() else args.run / "queries"
    prefix = args.out or folder / (slug(args.text) + ("-views" if args.views else ""))
    csv_path, geojson_path = write_results(result, prefix)
    print(format_results(result))
    print(f"wrote {csv_path} and {geojson_path}")
    return 0
