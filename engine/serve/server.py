"""The gRPC service (``mimetic serve``): a thin shell around one Engine, on grpc.aio.

    from engine.serve.server import ServerConfig, serve, BackgroundServer
    serve(ServerConfig(port=50051, metrics_port=9100), lambda: Engine(EngineConfig(...)))   # until SIGTERM
    with BackgroundServer(engine, ServerConfig(port=0)) as server:                            # tests, notebooks
        MimeticClient(server.address).embed(...)

One item's way through, top to bottom:

1. **Read.** Each Embed stream has K = ``max_in_flight`` slots. The server takes a slot before it
   reads the next request and gives it back only once that request's response has been written,
   so a stream never has more than K requests read ahead of its responses: a client that sends
   faster than the model works, or reads its responses slowly, is simply not read (HTTP/2 flow
   control then holds it back).
2. **Check, admit and decode**, in a thread pool (``decode_workers`` threads), concurrently with the
   model: the request's own parameters, then the Engine's input stage on its image (``Engine.prepare``:
   its header gives the pixel limit, the 2:1 shape and what decoding it costs; nothing is checked
   twice), then the item waits its turn in the Engine's decoded-bytes budget (``engine.budget``: one
   for the whole server, ``--max-decode-mib``, first come first served), then ``Engine.decode`` (the
   Engine's limits and DCT scaling) and its hold shrinks to the array's size, which it keeps until it
   is answered or dropped. A bad item, or one that could never fit the budget, is answered at once
   with its own ``google.rpc.Status`` (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED over a limit) and the
   stream goes on. Where the Engine decodes JPEGs in batches with nvJPEG (CUDA), its ``decode`` leaves
   them encoded; they are admitted here all the same, and the Engine holds nothing for the decoded
   items it is handed, so that its thread never waits for bytes held by the items queued behind it.
3. **Queue**: one queue for every stream, bounded by ``max_queue`` items; a full queue holds the
   streams' readers back.
4. **Batch** (``engine.serve.batching``): a single worker thread takes items from the queue when the
   Engine is free: up to ``max_batch`` views, waiting at most ``max_delay_ms`` after the first item
   for others, from any stream. Items whose deadline passed while queued, or whose stream went
   away, are dropped here, before the model, with DEADLINE_EXCEEDED (or nothing, for a stream that
   is gone). Items asking for another view set than the server's are embedded by
   ``Engine.with_views``, which shares the model and differs only in its views.
5. **Respond**: results come back to the event loop one by one as the Engine yields them; the
   response (fp16 bytes, readings cut to the requested vocabularies and top-k, the Engine's thumbnails,
   timings) is written to the item's stream, which then frees the slot and the item's bytes in the budget.

Memory is bounded everywhere: at most ``max_streams`` streams of K items each, of which at most
``max_queue`` wait for a batch, and at most ``max_decode_mib`` of decoded images over all of them.

Dream and Caption streams (``--sd-model``, ``--caption-model``) go the same way, each with its own batch
worker thread and model (``engine.serve.generate``): a dream of seconds does not hold Embed's batches.

Who may hold what. ``max_streams`` counts Embed, Dream and Caption streams only, in the service, after the
token check: an unauthenticated call never holds a slot, and the stream over the limit is refused
with RESOURCE_EXHAUSTED. A stream with nothing in flight that sends nothing for ``idle_timeout_s``
(``--idle-timeout``) is ended with DEADLINE_EXCEEDED, so silent streams cannot keep the slots. Health
checks are never limited; health Watch streams, which need no token, are at most ``MAX_WATCHES``;
every other call (GetInfo, EmbedText, reflection) at most ``MAX_OTHER_CALLS`` at once. grpc core's
own ``maximum_concurrent_rpcs`` is not used: it counts every call, health checks included, so a
flood of any kind would starve them, and its refusals never reach the metrics.

Health (``grpc.health.v1``) says NOT_SERVING while the models load, SERVING once they have, and
NOT_SERVING again while draining. Draining (SIGTERM): no more requests are read, new calls are
refused with UNAVAILABLE, every request already read is answered within the grace period, and a
stream cut short (still open when the grace period is over) ends with the server's own UNAVAILABLE,
so that its client sends the rest again. Nothing waits for a decode or an engine call still running
then: ``mimetic serve`` exits within ``grace_s`` + 1 s. Metrics are served for Prometheus on
``metrics_port`` (see ``Metrics``). Every call but the health check needs ``authorization: Bearer
<token>`` when a token is set; tokens are compared in constant time. ``mimetic serve`` takes the
token from ``--token-file`` (its first line) or ``$MIMETIC_TOKEN``, so that it stays out of ``ps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable

import grpc
import numpy as np
import prometheus_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.budget import give_freed_images_back_to_the_os
from engine.pipeline import Engine, Panorama
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.serve.auth import (
    HEALTH_SERVICE,
    SERVICE_NAME,
    BearerTokenInterceptor,
    CallLimit,
    CallOutcomes,
    HealthService,
)
from engine.serve.config import ServerConfig
from engine.serve.generate import model_infos
from engine.serve.metrics import Metrics
from engine.serve.service import MimeticService

MAX_WATCHES = 64  # health Watch streams at once: they need no token, so they get their own bound
MAX_OTHER_CALLS = 256  # GetInfo, EmbedText and reflection calls at once (health checks are never limited)
CUT_WRITE_S = 0.5  # once the grace period is over: how long cut streams get to write their own status


# -- the server -----------------------------------------------------------------------------------


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MimeticServer:
    """The gRPC server around one Engine: listens at once, serves once the Engine has loaded.

        server = MimeticServer(lambda: Engine(config), ServerConfig(port=0))
        await server.start()      # bound: health NOT_SERVING
        await server.load()       # the Engine is built in a thread: health SERVING
        ...
        await server.drain()      # health NOT_SERVING; in-flight work finished; stopped

    ``engine`` is an Engine or a function that builds one. ``dreamer`` (an ``engine.models.diffusion.Dreamer``)
    serves Dream and ``captioner`` (an ``engine.models.caption.Captioner``) serves Caption; each may also
    be a function that builds one. Every model is built in ``load``, while health says NOT_SERVING.
    """

    def __init__(self, engine: Engine | Callable[[], Engine], config: ServerConfig | None = None, *, dreamer=None, captioner=None):
        self.config = config = config or ServerConfig()
        config.check()
        self._engine_or_factory = engine
        self._dreamer, self._captioner = dreamer, captioner
        self.metrics = Metrics()
        self.health = HealthService(self.metrics, MAX_WATCHES)
        self.service: MimeticService | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._draining: asyncio.Event | None = None
        self.call_limit: CallLimit | None = None
        self._stopping = False  # calls grpc cancels from now on were cut by the server, not their clients
        self._stopped = False

    @property
    def address(self) -> str:
        return _host_port(self.config.host, self.port)

    @property
    def in_flight(self) -> int:
        return self.service.in_flight if self.service else 0

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        c = self.config
        self._draining = asyncio.Event()
        # Outermost first: every call's end is counted; the token is checked before any bound is taken.
        interceptors = [CallOutcomes(self.metrics, lambda: self._stopping)]
        if c.token:
            interceptors.append(BearerTokenInterceptor(c.token, self.metrics))
        self.call_limit = CallLimit(self.metrics, MAX_OTHER_CALLS)
        interceptors.append(self.call_limit)
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", c.max_message_bytes),
                ("grpc.max_send_message_length", c.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a port already taken is an error, not a second listener
            ],
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        pb_grpc.add_MimeticServicer_to_server(_Deferred(self), self._server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), self._server)
        address = _host_port(c.host, c.port)
        try:
            if c.tls_cert:
                try:
                    with open(c.tls_cert, "rb") as cert, open(c.tls_key, "rb") as key:
                        credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
                except OSError as exc:
                    raise OSError(f"cannot read the TLS certificate or key ({exc})") from exc
                self.port = self._server.add_secure_port(address, credentials)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from exc
        if not self.port:
            raise OSError(f"cannot listen on {address} (in use, or not an address of this machine)")
        if c.token and not c.tls_cert and c.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"mimetic serve: warning: the bearer token travels in clear text on {c.host}: use --tls-cert/--tls-key", file=sys.stderr)
        await self._server.start()
        if c.metrics_port is not None:
            self._metrics_http, _ = prometheus_client.start_http_server(c.metrics_port, addr=c.host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port

    async def load(self) -> None:
        """Build the Engine and run it once, and build the Dreamer and the Captioner (in a daemon thread: the
        loop keeps answering health checks, and a stop while the models load does not wait for them), then serve."""
        def build():
            engine = self._engine_or_factory
            engine = engine if isinstance(engine, Engine) else engine()
            dreamer, captioner = (model() if callable(model) else model for model in (self._dreamer, self._captioner))
            warm_up(engine, dreamer, captioner)
            return engine, dreamer, captioner, model_infos(engine, dreamer, captioner)

        engine, dreamer, captioner, models = await _in_daemon_thread(build, "mimetic-load")
        self.service = MimeticService(engine, self.config, self.metrics, self._draining, dreamer=dreamer, captioner=captioner,
                                      models=models)
        if not self._draining.is_set():
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace_s: float | None = None) -> bool:
        """Stop reading, answer everything already read within ``grace_s``, then stop. True if nothing was cut.

        Returns within ``grace_s`` + ``CUT_WRITE_S`` and a moment: a stream still open when the grace period
        is over ends with the server's own UNAVAILABLE (what it had answered is final), and nothing waits
        for a decode or an engine call still running.
        """
        if self._stopped:
            return True
        grace_s = self.config.grace_s if grace_s is None else grace_s
        self._draining.set()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        clean = True
        if self.service is not None:
            for batcher in self.service.batchers():
                batcher.flush_now()  # no more waiting for company
            try:
                await asyncio.wait_for(self.service.idle.wait(), grace_s)
            except asyncio.TimeoutError:
                clean = False
                self.service.cut_all()
                with contextlib.suppress(asyncio.TimeoutError):  # the cut streams write their status
                    await asyncio.wait_for(self.service.idle.wait(), CUT_WRITE_S)
        await self._close_calls()
        return clean

    async def stop(self) -> None:
        """Stop at once, without draining: calls still open end with UNAVAILABLE (what a crash looks like to clients)."""
        if self._stopped:
            return
        self._draining.set()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.service is not None:
            for stream in list(self.service.streams):  # before the worker could take their items
                self.service._abandon(stream)
        self._stopping = True
        await self._server.stop(0)
        self.close_resources()

    async def _close_calls(self) -> None:
        """End what is still open (health watches: with UNAVAILABLE, by themselves), stop grpc, free the rest."""
        self.health.close_watches()
        await asyncio.sleep(0)  # the watches see it and write their status
        self._stopping = True
        await self._server.stop(0.1)
        self.close_resources()

    def close_resources(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.service is not None:
            self.service.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


def warm_up(engine: Engine, dreamer=None, captioner=None) -> None:
    """Run each model once on a blank input, so that the first request of each kind does not pay for the
    kernels' compilation and the model's first call (seconds on a CPU; cuDNN's and Triton's set-up on a
    GPU): SERVING means ready. The Dreamer runs one denoising step of one view, unguided."""
    blank = np.zeros((64, 128, 3), np.uint8)
    engine.embed([Panorama(id="warm-up", data=blank)])
    if dreamer is not None:
        from kernels import ViewSpec

        view = dreamer.render([blank], [ViewSpec()])[0]
        dreamer.img2img(view, prompts=[""], strength=1.0, steps=1, guidance=1.0, seeds=[0])
    if captioner is not None:
        captioner.caption(captioner.pixels_of([np.zeros((*captioner.image_size, 3), np.uint8)]))


async def _in_daemon_thread(work: Callable[[], object], name: str):
    """``work()`` in a daemon thread of its own, awaited (the loop's default executor would hold the exit)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run():
        try:
            result = work()
        except BaseException as exc:
            outcome = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(lambda: None if future.done() else outcome[0](outcome[1]))

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


class _Deferred(pb_grpc.MimeticServicer):
    """Registered before the Engine exists: answers UNAVAILABLE until it has loaded."""

    def __init__(self, server: MimeticServer):
        self._server = server

    def _service(self):
        return self._server.service

    async def _loading(self, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the models are still loading; retry when health says SERVING")

    async def Embed(self, request_iterator, context):
        if self._service() is None:
            await self._loading(context)
        return await self._service().Embed(request_iterator, context)

    async def Dream(self, request_iterator, context):
        if self._service() is None:
            await self._loading(context)
        return await self._service().Dream(request_iterator, context)

    async def Caption(self, request_iterator, context):
        if self._service() is None:
            await self._loading(context)
        return await self._service().Caption(request_iterator, context)

    async def EmbedText(self, request, context):
        if self._service() is None:
            await self._loading(context)
        return await self._service().EmbedText(request, context)

    async def GetInfo(self, request, context):
        if self._service() is None:
            await self._loading(context)
        return await self._service().GetInfo(request, context)


# -- running it -----------------------------------------------------------------------------------


async def serve_async(config: ServerConfig, engine: Engine | Callable[[], Engine], *, dreamer=None, captioner=None,
                      stop: asyncio.Event | None = None) -> int:
    """Listen, load, serve until SIGTERM or SIGINT (or ``stop``), then drain. Returns an exit status."""
    import signal

    server = MimeticServer(engine, config, dreamer=dreamer, captioner=captioner)
    await server.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not POSIX
            pass
    metrics = f", metrics on http://{_host_port(config.host, server.metrics_port)}/metrics" if server.metrics_port else ""
    print(f"mimetic serve: listening on {server.address}{metrics}; loading the models", file=sys.stderr, flush=True)
    loading = asyncio.create_task(server.load())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        stopped.cancel()
        print(f"mimetic serve: error: the engine did not load: {loading.exception()}", file=sys.stderr, flush=True)
        await server.drain(0)
        return 1
    if loading.done():
        print(f"mimetic serve: serving {SERVICE_NAME} on {server.address} (pid {os.getpid()})", file=sys.stderr, flush=True)
    await stopped
    print(f"mimetic serve: draining ({config.grace_s:g} s grace)", file=sys.stderr, flush=True)
    if not loading.done():
        loading.cancel()  # the models are left to load in their daemon thread: nothing waits for them
    clean = await server.drain()
    print(f"mimetic serve: stopped{'' if clean else ' (grace period over: unfinished work was cut)'}", file=sys.stderr, flush=True)
    return 0


def serve(config: ServerConfig, engine: Engine | Callable[[], Engine], *, dreamer=None, captioner=None) -> int:
    """``serve_async`` on an event loop of its own. Returns once drained, without waiting for a worker
    thread still busy (a decode, an engine call; they are daemons): the grace period bounds the exit.
    (``asyncio.run`` would also wait for the loop's default executor.)"""
    give_freed_images_back_to_the_os()
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(serve_async(config, engine, dreamer=dreamer, captioner=captioner))
    finally:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=0.5))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class BackgroundServer:
    """A MimeticServer on an event loop of its own, in a daemon thread: for tests, notebooks and benches.

        with BackgroundServer(engine, ServerConfig(port=0, metrics_port=0)) as server:
            server.address, server.metrics_port, server.in_flight
    """

    def __init__(self, engine: Engine | Callable[[], Engine], config: ServerConfig | None = None, *, dreamer=None, captioner=None,
                 wait_loaded: bool = True):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mimetic-server-loop", daemon=True)
        self._thread.start()
        self.server = MimeticServer(engine, config or ServerConfig(port=0), dreamer=dreamer, captioner=captioner)
        try:
            self.call(self.server.start())
        except BaseException:
            self._stop_loop()
            raise
        self.loaded = asyncio.run_coroutine_threadsafe(self.server.load(), self.loop)
        if wait_loaded:
            self.loaded.result()

    def call(self, coroutine, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    @property
    def in_flight(self) -> int:
        return self.server.in_flight

    def drain(self, grace_s: float | None = None) -> bool:
        return self.call(self.server.drain(grace_s))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        if not self.loaded.done():
            self.loaded.cancel()
        self.drain(0)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
