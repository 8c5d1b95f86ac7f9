"""``mimetic serve`` and ``mimetic call``: the gRPC service's commands.

    mimetic serve [engine flags] [--host 127.0.0.1] [--port 50051] [--metrics-port N] [--max-batch VIEWS]
                  [--max-delay-ms MS] [--max-streams N] [--idle-timeout S] [--grace S]
                  [--token-file PATH] [--tls-cert PEM --tls-key PEM] ...
    mimetic call embed ADDRESS FILE [FILE ...] [--out FILE.parquet] [--views PRESET] [--token-file PATH] [--tls CA.pem]
    mimetic call info ADDRESS

``add_parsers(commands)`` adds them to the ``mimetic`` command's subparsers and ``run(args)`` runs
them (None for another command). ``python -m engine.serve.cli serve ...`` runs them standalone.

The bearer token, for both: ``--token-file PATH`` (its first line, stripped) or ``--token TOKEN``
(not both), else ``$MIMETIC_TOKEN``; none of them: no authentication. ``--token`` is visible to
every user of the machine in ``ps``: prefer the file or the variable. An empty or unreadable token
file is an error, not "no token". The decoded-bytes budget is the engine flag ``--max-decode-mib``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from engine.cli import add_engine_arguments, config_from_args, positive_int

TOKEN_ENV = "MIMETIC_TOKEN"
TOKEN_HELP = (
    f"bearer token on the command line, where `ps` shows it to every user: prefer --token-file or ${TOKEN_ENV} "
    "(default: none, no authentication)"
)
TOKEN_FILE_HELP = f"read the bearer token from the first line of this file (overrides ${TOKEN_ENV}, which is read when neither flag is given)"


def token_from_args(args: argparse.Namespace) -> str | None:
    """The bearer token: --token or the first line of --token-file, else $MIMETIC_TOKEN, else None.

    An unreadable or empty token file is a ValueError naming it (a typo must not turn authentication off).
    """
    if args.token is not None:
        return args.token
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as stream:
                token = stream.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(f"--token-file {args.token_file}: cannot read the token ({reason})") from None
        if not token:
            raise ValueError(f"--token-file {args.token_file}: its first line is empty; write the token there")
        return token
    return os.environ.get(TOKEN_ENV) or None


def _add_token_arguments(parser) -> None:
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--token-file", type=Path, default=None, metavar="PATH", help=TOKEN_FILE_HELP)
    given.add_argument("--token", default=None, help=TOKEN_HELP)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value}")
    return value


def add_parsers(commands) -> None:
    from engine.serve.config import DEFAULT_PORT, DEFAULT_RETRY_BUDGET_S, ServerConfig

    defaults = ServerConfig()
    serve = commands.add_parser(
        "serve",
        help="serve the engine over gRPC: streaming Embed with per-item errors, EmbedText, GetInfo; health, reflection, metrics",
        description=(
            "Load the engine and serve mimetic.v1.Mimetic until SIGTERM or SIGINT, then drain: stop reading, answer what "
            "was read within --grace seconds, stop. Binds 127.0.0.1 unless --host says otherwise."
        ),
    )
    add_engine_arguments(serve)
    group = serve.add_argument_group("server")
    group.add_argument("--host", default=defaults.host, help=f"address to listen on (default {defaults.host}; 0.0.0.0: every interface)")
    group.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"gRPC port (default {DEFAULT_PORT}; 0: any free port)")
    group.add_argument("--metrics-port", type=_port, default=None, help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)")
    group.add_argument("--max-batch", type=positive_int, default=None, help="views per engine call (default: --batch-size)")
    group.add_argument("--max-delay-ms", type=_non_negative_float, default=defaults.max_delay_ms,
                       help=f"the longest a batch's first item waits for others (default {defaults.max_delay_ms:g})")
    group.add_argument("--max-in-flight", type=positive_int, default=defaults.max_in_flight,
                       help=f"requests per stream read ahead of the responses written (default {defaults.max_in_flight})")
    group.add_argument("--max-queue", type=positive_int, default=defaults.max_queue,
                       help=f"items waiting for a batch, over every stream (default {defaults.max_queue})")
    group.add_argument("--max-streams", type=positive_int, default=defaults.max_streams,
                       help=f"Embed, Dream and Caption streams open at once; more are refused (default {defaults.max_streams}; health "
                       "checks and reflection are not counted)")
    group.add_argument("--idle-timeout", type=_positive_float, default=defaults.idle_timeout_s, metavar="S",
                       help=f"end a stream that has nothing in flight and sends nothing for S seconds (default {defaults.idle_timeout_s:g})")
    group.add_argument("--max-message-mb", type=positive_int, default=defaults.max_message_bytes // 2**20,
                       help=f"message size limit both ways, MiB (default {defaults.max_message_bytes // 2**20})")
    group.add_argument("--grace", type=_non_negative_float, default=defaults.grace_s,
                       help=f"seconds to finish in-flight work on SIGTERM; the process exits within one more second "
                       f"(default {defaults.grace_s:g})")
    _add_token_arguments(group)
    group.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    group.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    _add_generation_arguments(serve, defaults)

    call = commands.add_parser("call", help="call a running mimetic server (embed files, print its info)")
    actions = call.add_subparsers(dest="call_command", metavar="ACTION", required=True)
    embed = actions.add_parser(
        "embed",
        help="embed panorama files on a server and print their top labels",
        description="Stream FILEs to the server at ADDRESS; print each one's top labels; with --out, write the results as "
        "`mimetic embed` does. The exit status is 1 if any file failed.",
    )
    embed.add_argument("address", metavar="ADDRESS", help="host:port")
    embed.add_argument("files", nargs="+", metavar="FILE", help="equirectangular panoramas (JPEG, PNG, WebP)")
    embed.add_argument("--out", type=Path, default=None, help="Parquet file to write (a row per view and a pooled row per panorama)")
    embed.add_argument("--views", default=None, help="a view preset (default: the server's views)")
    embed.add_argument("--vocabularies", default=None, help="comma-separated subset of the server's vocabularies")
    embed.add_argument("--top-k", type=positive_int, default=None, help="labels per reading (default: the server's)")
    dream, caption = _add_call_generation_parsers(actions)
    info = actions.add_parser("info", help="print the server's models, views, vocabularies, versions and limits as JSON")
    info.add_argument("address", metavar="ADDRESS", help="host:port")
    for parser in (embed, dream, caption, info):
        _add_token_arguments(parser)
        parser.add_argument("--tls", default=None, metavar="CA.pem|system", help="use TLS, trusting this CA (or the system's roots)")
        parser.add_argument(
            "--retry-budget", type=_non_negative_float, default=DEFAULT_RETRY_BUDGET_S, metavar="SECONDS",
            help="while the server is unavailable (a restart, a drain), retry with backoff for this long, then give up "
            f"(default {DEFAULT_RETRY_BUDGET_S:g}); the requests with no answer are sent again, none twice",
        )


def _add_call_generation_parsers(actions):
    """``mimetic call dream`` and ``mimetic call caption``: the flags of ``mimetic dream`` / ``mimetic caption``
    that a request carries, with the same defaults (``DreamParams``); the models are the server's."""
    from engine.cli import positive_int
    from engine.dream.cli import _add_generation_arguments as add_generation
    from engine.dream.params import DreamParams

    defaults = DreamParams()
    dream = actions.add_parser(
        "dream", help="dream panorama files on a server; write what `mimetic dream` writes",
        description="Stream FILEs to the server's Dream; write DIR/<stem>_<index>_y<yaw>_p<pitch>_view.png and _dream.png (and "
        "_stepNNN.png with --trajectory-every) and DIR/dreams.json, as `mimetic dream` does. The exit status is 1 if any file failed.",
    )
    dream.add_argument("address", metavar="ADDRESS", help="host:port")
    dream.add_argument("files", nargs="+", metavar="FILE", help="equirectangular panoramas (JPEG, PNG, WebP)")
    source = dream.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt for every view")
    source.add_argument("--from-labels", metavar="VOCABS", help="comma-separated server vocabularies whose top labels make each view's prompt; KEY=VOCABULARY names its placeholder")
    dream.add_argument("--template", help='prompt template over the vocabularies (default "a photograph of {styles}, {periods}" for styles,periods)')
    dream.add_argument("--strength", type=float, default=defaults.strength, help=f"img2img strength in (0, 1] (default {defaults.strength:g})")
    dream.add_argument("--steps", type=int, default=defaults.steps, help=f"denoising steps of the full schedule (default {defaults.steps})")
    dream.add_argument("--trajectory-every", type=int, default=defaults.trajectory_every, metavar="K",
                       help="also keep the predicted clean image of every K-th step, with its CLIP drift")
    add_generation(dream, defaults)
    dream.add_argument("--views", default=None, help="a view preset (default: the server's views)")
    dream.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    caption = actions.add_parser(
        "caption", help="caption panorama files on a server; write what `mimetic caption` writes",
        description="Stream FILEs to the server's Caption; write a row per view (id, view, yaw, pitch, caption, prompt, each "
        "flavour's label and probability) to OUT.csv (or .parquet), as `mimetic caption` does. The exit status is 1 if any file failed.",
    )
    caption.add_argument("address", metavar="ADDRESS", help="host:port")
    caption.add_argument("files", nargs="+", metavar="FILE", help="equirectangular panoramas (JPEG, PNG, WebP)")
    caption.add_argument("--out", required=True, type=Path, metavar="FILE", help="FILE.csv or FILE.parquet")
    caption.add_argument("--flavours", default=None, metavar="VOCABS", help="comma-separated server vocabularies, in prompt order (default: all of the server's)")
    caption.add_argument("--caption-beams", type=positive_int, default=None, help="beam search width (default: the server's)")
    caption.add_argument("--caption-max-tokens", type=positive_int, default=None, help="longest caption in tokens (default: the server's)")
    caption.add_argument("--views", default=None, help="a view preset (default: the server's views)")
    return dream, caption


def _add_generation_arguments(serve, defaults) -> None:
    """Dream (--sd-model) and Caption (--caption-model): the models, their limits and their batching."""
    from engine.config import DEFAULT_CAPTION_BEAMS, DEFAULT_CAPTION_MAX_TOKENS

    dream = serve.add_argument_group("dream (Stable Diffusion)")
    dream.add_argument("--sd-model", default=None, metavar="DIR", help="serve Dream with this local diffusers folder (default: Dream is not served)")
    dream.add_argument("--size", type=positive_int, default=None, help="dream image side in pixels, a multiple of 8 (default: the model's own)")
    dream.add_argument("--max-dream-steps", type=positive_int, default=defaults.max_dream_steps,
                       help=f"most denoising steps a dream may ask for (default {defaults.max_dream_steps})")
    dream.add_argument("--max-dream-views", type=positive_int, default=defaults.max_dream_views,
                       help=f"most views per dream (default {defaults.max_dream_views})")
    dream.add_argument("--max-dream-batch", type=positive_int, default=defaults.max_dream_batch,
                       help=f"images per diffusion call, from every stream (default {defaults.max_dream_batch})")
    dream.add_argument("--max-dream-delay-ms", type=_non_negative_float, default=defaults.max_dream_delay_ms,
                       help=f"the longest a diffusion call's first item waits for others (default {defaults.max_dream_delay_ms:g})")
    caption = serve.add_argument_group("caption")
    caption.add_argument("--caption-model", default=None, metavar="DIR",
                         help="serve Caption with this local transformers captioner folder (default: Caption is not served)")
    caption.add_argument("--caption-beams", type=positive_int, default=DEFAULT_CAPTION_BEAMS,
                         help=f"beam search width, and the most a request may ask for (default {DEFAULT_CAPTION_BEAMS})")
    caption.add_argument("--caption-max-tokens", type=positive_int, default=DEFAULT_CAPTION_MAX_TOKENS,
                         help=f"longest caption in tokens, and the most a request may ask for (default {DEFAULT_CAPTION_MAX_TOKENS})")
    caption.add_argument("--max-caption-batch", type=positive_int, default=defaults.max_caption_batch,
                         help=f"views per captioner call, from every stream (default {defaults.max_caption_batch})")


def run(args: argparse.Namespace) -> int | None:
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "call":
        return cmd_call(args)
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.pipeline import Engine
    from engine.serve.config import ServerConfig
    from engine.serve.server import serve

    config = ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port, max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms, max_in_flight=args.max_in_flight, max_queue=args.max_queue,
        max_streams=args.max_streams, idle_timeout_s=args.idle_timeout, max_message_bytes=args.max_message_mb * 2**20,
        grace_s=args.grace, token=token_from_args(args), tls_cert=str(args.tls_cert) if args.tls_cert else None,
        tls_key=str(args.tls_key) if args.tls_key else None, max_dream_steps=args.max_dream_steps,
        max_dream_views=args.max_dream_views, max_dream_batch=args.max_dream_batch, max_dream_delay_ms=args.max_dream_delay_ms,
        max_caption_batch=args.max_caption_batch,
    )
    config.check()  # a bad setting is one line and exit status 2 (the root command's handler)
    engine_config = config_from_args(args)
    dreamer = captioner = None
    if args.sd_model:  # built while the server loads (health NOT_SERVING), as mimetic dream builds it
        from engine.dream.cli import _dreamer

        dreamer = lambda: _dreamer(args, engine_config)  # noqa: E731
    elif args.size is not None:
        raise ValueError("--size is the dream image side: it needs --sd-model")
    if args.caption_model:
        from engine.dream.caption_cli import _captioner

        captioner = _captioner(args, engine_config)  # checks beams and length now; loads in the server
    status = serve(config, lambda: Engine(engine_config), dreamer=dreamer, captioner=captioner)
    # The process ends here, once "stopped" has been reported: the interpreter's own exit would first
    # wait for busy worker threads and collect the models' objects, seconds past the grace period.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _print_readings(result) -> None:
    if result.error:
        print(result.error, file=sys.stderr)  # it names the item: "bad/x.jpg: not a recognised image format ..."
        return
    parts = [f"{name}: " + ", ".join(f"{label} {p:.2f}" for label, p in r["pooled"][:3]) for name, r in result.readings.items()]
    print(f"{result.id}: " + " | ".join(parts))


def cmd_call(args: argparse.Namespace) -> int:
    import grpc

    from engine.pipeline import Panorama
    from engine.serve.client import MimeticClient, ServerUnavailableError

    tls = True if args.tls == "system" else args.tls
    token = token_from_args(args)
    results, config = [], None
    try:
        with MimeticClient(args.address, token=token, tls=tls, retry_budget_s=args.retry_budget) as client:
            if args.call_command == "info":
                print(json.dumps(client.info(), indent=2))
                return 0
            if args.call_command in ("dream", "caption"):
                return (_call_dream if args.call_command == "dream" else _call_caption)(client, args, results)
            vocabularies = [v.strip() for v in args.vocabularies.split(",") if v.strip()] if args.vocabularies else None
            panoramas = (Panorama(id=path, data=path) for path in args.files)
            # The call checks its settings first (a typo is one line, before any connection), then the server's info.
            stream = client.embed(panoramas, views=args.views, vocabularies=vocabularies, top_k=args.top_k)
            config = _served_config(client.info(), views=args.views, vocabularies=vocabularies, top_k=args.top_k)
            for result in stream:
                _print_readings(result)
                results.append(result)
    except grpc.RpcError as exc:
        if results and args.out is not None and args.call_command == "embed":  # what did come back is kept
            _write(results, args.out, config)
            print(f"{len(results)} results before the error -> {args.out}", file=sys.stderr)
        detail = str(exc) if isinstance(exc, ServerUnavailableError) else f"{args.address}: {exc.code().name}: {exc.details()}"
        print(f"mimetic call: error: {detail}", file=sys.stderr)
        return 1
    if args.out is not None:
        _write(results, args.out, config)
    failed = sum(1 for r in results if r.error)
    print(f"{len(results) - failed} of {len(results)} panoramas embedded" + (f" -> {args.out}" if args.out else ""))
    return 1 if failed else 0


def _call_dream(client, args, results: list) -> int:
    """``mimetic call dream``: what ``mimetic dream`` prints and writes, with the server's models."""
    import time

    from engine.dream.dream import save_dreams
    from engine.dream.params import DreamParams
    from engine.pipeline import Panorama
    from engine.serve.remote import server_vocabularies, stand_ins

    labels = tuple(part.strip() for part in (args.from_labels or "").split(",") if part.strip())
    params = DreamParams(
        prompt=args.prompt, from_labels=labels, template=args.template, negative_prompt=args.negative_prompt,
        strength=args.strength, steps=args.steps, guidance=args.guidance, seed=args.seed, trajectory_every=args.trajectory_every,
    )
    info = client.info()
    start = time.perf_counter()
    panoramas = (Panorama(id=path, data=path) for path in args.files)
    info["server"]["address"] = args.address
    engine, dreamer = stand_ins(info)
    params.batch_size = info["server"]["limits"]["max_dream_batch"]  # the server's, recorded as it ran
    try:
        for result in client.dream(panoramas, params, views=args.views):
            if result.error:
                print(result.error, file=sys.stderr)  # the error names its panorama
            else:
                mean = sum(d.scores["view_dream"] for d in result.dreams) / len(result.dreams)
                print(f"{result.id}: {len(result.dreams)} dreams, mean view<->dream cosine {mean:.3f}; first prompt: {result.dreams[0].prompt!r}")
            results.append(result)
    finally:  # what did come back is kept, also when the server went away
        record = save_dreams(results, args.out, engine=engine, dreamer=dreamer, params=params, seconds=time.perf_counter() - start,
                             vocabularies=server_vocabularies(info, params.from_labels))
    failed = [r for r in results if r.error]
    print(f"{len(results) - len(failed)} of {len(results)} panoramas dreamt -> {record}")
    return 1 if failed else 0


def _call_caption(client, args, results: list) -> int:
    """``mimetic call caption``: what ``mimetic caption`` prints and writes, with the server's captioner."""
    from engine.dream.interrogate import write_captions
    from engine.pipeline import Panorama

    if args.out.suffix.lower() not in (".csv", ".parquet"):
        raise ValueError(f"--out {args.out}: the captions file must end in .csv or .parquet")
    flavours = [part.strip() for part in args.flavours.split(",") if part.strip()] if args.flavours else None
    info = client.info()
    if flavours is None:
        flavours = list(info["vocabularies"])  # the server's, in its order: what it answers with
    panoramas = (Panorama(id=str(path), data=path) for path in args.files)
    try:
        results.extend(client.caption(panoramas, flavours=flavours, views=args.views, beams=args.caption_beams,
                                      max_tokens=args.caption_max_tokens))
    finally:  # what did come back is kept, also when the server went away
        write_captions(results, args.out, flavours, _served_config(info))
    failed = [c for c in results if c.error]
    for item in failed:
        print(item.error, file=sys.stderr)
    views = sum(len(c.captions) for c in results)
    print(f"{views} captions of {len(results) - len(failed)} of {len(results)} images -> {args.out}")
    return 1 if failed else 0


def _served_config(info: dict, **changed) -> dict | None:
    """The server engine's EngineConfig (as JSON), with what this call changed (views, vocabularies, top_k): what
    its results file records, so that `mimetic query` and `mimetic report` rebuild the model that made them."""
    if not info.get("config"):
        return None
    return {**info["config"], **{name: value for name, value in changed.items() if value}}


def _write(results, path: Path, config: dict | None) -> None:
    from engine.results import write_parquet

    write_parquet(results, path, config)


def main(argv: list[str] | None = None) -> int:
    """Standalone ``serve`` and ``call``: the same as ``mimetic serve`` / ``mimetic call``, under the same error handler."""
    from engine.cli import main as mimetic

    return mimetic(argv)


if __name__ == "__main__":
    sys.exit(main())
