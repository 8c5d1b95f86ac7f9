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
   model: parameters, then the image's header (pixel limit, 2:1 shape, and what decoding it costs),
   then the item waits its turn in the Engine's decoded-bytes budget (``engine.budget``: one for the
   whole server, ``--max-decode-mib``, first come first served), then the image is decoded
   (``engine.decode`` with the Engine's limits and DCT scaling) and its hold shrinks to the array's
   size, which it keeps until it is answered or dropped. A bad item, or one that could never fit the
   budget, is answered at once with its own ``google.rpc.Status`` (INVALID_ARGUMENT, or
   RESOURCE_EXHAUSTED over a limit) and the stream goes on. On CUDA, JPEGs are left encoded (only
   their header is read here) so that the Engine decodes them in batches with nvJPEG; they are
   admitted here all the same, and the Engine the batches go to admits nothing itself, so that its
   thread never waits for bytes held by the items queued behind it.
3. **Queue**: one queue for every stream, bounded by ``max_queue`` items; a full queue holds the
   streams' readers back.
4. **Batch** (``engine.serve.batching``): a single worker thread takes items from the queue when the
   Engine is free: up to ``max_batch`` views, waiting at most ``max_delay_ms`` after the first item
   for others, from any stream. Items whose deadline passed while queued, or whose stream went
   away, are dropped here, before the model, with DEADLINE_EXCEEDED (or nothing, for a stream that
   is gone). Items asking for another view set than the server's are embedded by a copy of the
   Engine that shares its model and differs only in ``views``.
5. **Respond**: results come back to the event loop one by one as the Engine yields them; the
   response (fp16 bytes, readings cut to the requested vocabularies and top-k, timings) is written
   to the item's stream, which then frees the slot and the item's bytes in the budget.

Memory is bounded everywhere: at most ``max_streams`` streams of K items each, of which at most
``max_queue`` wait for a batch, and at most ``max_decode_mib`` of decoded images over all of them.

Who may hold what. ``max_streams`` counts Embed and Dream streams only, in the service, after the
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
import collections
import concurrent.futures
import contextlib
import copy
import hmac
import inspect
import io
import math
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import prometheus_client
import torch
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image

from engine.budget import DecodeBudget, Reservation, give_freed_images_back_to_the_os
from engine.decode import (
    DecodeError,
    ImageTooLargeError,
    check_pixels,
    decode_cost,
    decode_image,
    read_header,
    required_width,
)
from engine.pipeline import EmbedResult, Engine, Panorama, check_equirectangular
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.serve import wire
from engine.serve.batching import Batcher
from engine.serve.config import ServerConfig
from engine.views import PRESETS, view_set
from kernels import ViewSpec, reproject
from kernels.geometry import wrap_degrees

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Mimetic"].full_name  # "mimetic.v1.Mimetic"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # "grpc.health.v1.Health"
DEFAULT_THUMBNAIL_SIZE = 128
MAX_TEXTS = 4096  # per EmbedText call
MAX_WATCHES = 64  # health Watch streams at once: they need no token, so they get their own bound
MAX_OTHER_CALLS = 256  # GetInfo, EmbedText and reflection calls at once (health checks are never limited)
CUT_WRITE_S = 0.5  # once the grace period is over: how long cut streams get to write their own status
_VARIANTS_KEPT = 16  # view sets other than the server's, each a shallow copy of the Engine
_STREAMS = ("Embed", "Dream")  # the calls max_streams counts


# -- metrics --------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics, in a registry of the server's own (so that several servers can share a process).

    mimetic_requests_total{method,code}   items (Embed) and calls (others) answered, by status code; also
                                          every refusal: a stream over max_streams, a Watch over
                                          MAX_WATCHES, a call over MAX_OTHER_CALLS, a missing token, a
                                          stream ended idle (DEADLINE_EXCEEDED), items cut by the end of
                                          the grace period (UNAVAILABLE), and calls that grpc itself
                                          ended before the server answered (see ``CallOutcomes``)
    mimetic_batch_views / _batch_items    views and panoramas per engine call (histograms)
    mimetic_queue_seconds                 time an item waited for its batch
    mimetic_stage_seconds{stage}          decode (with its wait for the budget), queue, engine and total per item
    mimetic_views_total                   views embedded (rate() is views/s)
    mimetic_views_per_second              the same over the last 10 s, for a glance
    mimetic_in_flight                     requests read and not yet answered, over every stream
    mimetic_queue_depth, mimetic_streams  items waiting for a batch; open Embed streams
    mimetic_decode_bytes                  decoded image bytes held in the budget; mimetic_decode_limit_bytes, the budget
    """

    WINDOW_S = 10.0

    def __init__(self):
        self.registry = registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "mimetic_requests", "Items (Embed) and calls answered or refused, by method and status code", ["method", "code"],
            registry=registry,
        )
        self.batch_views = prometheus_client.Histogram(
            "mimetic_batch_views", "Views per engine call", registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
        )
        self.batch_items = prometheus_client.Histogram(
            "mimetic_batch_items", "Panoramas per engine call (from every stream)", registry=registry,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512),
        )
        self.queue_seconds = prometheus_client.Histogram("mimetic_queue_seconds", "Time an item waited for its batch", registry=registry)
        self.stage_seconds = prometheus_client.Histogram(
            "mimetic_stage_seconds", "Seconds per item in each stage", ["stage"], registry=registry
        )
        self.views = prometheus_client.Counter("mimetic_views", "Views embedded", registry=registry)
        self.in_flight = prometheus_client.Gauge("mimetic_in_flight", "Requests read and not yet answered", registry=registry)
        self.queue_depth = prometheus_client.Gauge("mimetic_queue_depth", "Items waiting for a batch", registry=registry)
        self.streams = prometheus_client.Gauge("mimetic_streams", "Open Embed streams", registry=registry)
        self.decode_bytes = prometheus_client.Gauge("mimetic_decode_bytes", "Decoded image bytes held in the budget", registry=registry)
        self.decode_limit = prometheus_client.Gauge("mimetic_decode_limit_bytes", "The decoded-bytes budget", registry=registry)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        rate = prometheus_client.Gauge("mimetic_views_per_second", "Views embedded per second over the last 10 s", registry=registry)
        rate.set_function(self.views_per_second)

    def watch_budget(self, budget: DecodeBudget) -> None:
        self.decode_bytes.set_function(lambda: budget.in_use)
        self.decode_limit.set(budget.limit)

    def batch(self, items: int, views: int) -> None:
        self.batch_items.observe(items)
        self.batch_views.observe(views)

    def embedded(self, views: int) -> None:
        self.views.inc(views)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, views))

    def views_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.WINDOW_S:
                self._recent.popleft()
            return sum(views for _, views in self._recent) / self.WINDOW_S


# -- worker threads that never hold the process's exit --------------------------------------------


class DaemonPool(concurrent.futures.Executor):
    """A fixed pool of daemon worker threads (``concurrent.futures`` semantics).

    ``ThreadPoolExecutor`` joins its workers when the interpreter exits, whatever ``shutdown`` was told,
    so a decode still running when the server stops would hold the exit past the grace period (seconds
    for a large image). Daemon workers do not: what they were doing is abandoned with the process.
    """

    def __init__(self, workers: int, name: str):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        for k in range(max(1, workers)):
            threading.Thread(target=self._run, name=f"{name}-{k}", daemon=True).start()
        self._workers = max(1, workers)

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("the pool is shut down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._work.put((future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        while (job := self._work.get()) is not None:
            future, fn, args, kwargs = job
            del job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
            del future, fn, args, kwargs  # hold no decoded image between jobs

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = False) -> None:
        """Stop taking work; never waits for a running job (``wait`` is accepted and ignored)."""
        self._closed = True
        while cancel_futures:
            try:
                job = self._work.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in range(self._workers):
            self._work.put(None)


# -- one request on its way -----------------------------------------------------------------------


_DRAINING = object()  # what a read gives back once the server drains


class ItemError(Exception):
    """An item's own failure: its status code and a message that names it."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class Item:
    stream: Stream
    request: pb.EmbedRequest
    request_id: str
    item_id: str
    read_at: float  # time.monotonic()
    deadline: float | None = None
    engine: Engine | None = None  # the Engine, or a copy of it with the request's views
    vocabularies: tuple[str, ...] = ()
    top_k: int = 0
    outputs: frozenset = wire.DEFAULT_OUTPUTS
    panorama: Panorama | None = None
    thumbnails: list[bytes] = field(default_factory=list)
    decode_s: float = 0.0
    queued_at: float = 0.0
    finished: bool = False  # answered, or its stream went away: later stages skip it
    hold: Reservation | None = None  # its bytes in the decode budget, from admission until it leaves (see _Holds)
    in_thread: bool = False  # a decode thread is working on it

    @property
    def views(self) -> int:
        return len(self.engine.views)


class _Holds:
    """Each item's bytes in the decode budget, given back exactly once, from whichever thread lets it go
    (the event loop when it is answered, the batch worker when it drops it, a decode thread that ends
    after its stream went away); and every hold still out when the server closes."""

    def __init__(self, budget: DecodeBudget):
        self.budget = budget
        self._lock = threading.Lock()
        self._out: set[Item] = set()

    async def take(self, item: Item, cost: int, deadline: float | None) -> None:
        """Wait for ``cost`` bytes, in line; BudgetExceededError if they can never fit, TimeoutError past the deadline.

        Cancelled (its stream went away) or past its deadline, the item keeps its place in line and gives
        the bytes back the moment they are granted: cancelling the wait itself could lose bytes granted
        just before the cancellation arrived.
        """
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        acquiring = asyncio.ensure_future(self.budget.acquire_async(cost, item=item.item_id))
        try:
            reservation = await asyncio.wait_for(asyncio.shield(acquiring), timeout)
        except BaseException:
            acquiring.add_done_callback(_give_back_if_granted)
            raise
        with self._lock:
            item.hold = reservation
            self._out.add(item)

    def shrink(self, item: Item, nbytes: int) -> None:
        with self._lock:
            if item.hold is not None:
                item.hold.shrink(nbytes)

    def release(self, item: Item) -> None:
        with self._lock:
            hold, item.hold = item.hold, None
            self._out.discard(item)
        if hold is not None:
            hold.release()

    def release_all(self) -> None:
        with self._lock:
            items, self._out = list(self._out), set()
        for item in items:
            self.release(item)


def _give_back_if_granted(acquiring: asyncio.Future) -> None:
    if not acquiring.cancelled() and acquiring.exception() is None:
        acquiring.result().release()


class Stream:
    """One Embed call: its K slots, its items in flight (by request_id) and its responses to write."""

    def __init__(self, max_in_flight: int):
        self.slots = asyncio.Semaphore(max_in_flight)
        self.held = 0  # slots taken: requests read whose response has not been written yet
        self.unanswered = 0  # requests read whose response has not been queued yet
        self.items: dict[str, Item] = {}  # by request_id, from the moment it is checked to its answer
        self.responses: asyncio.Queue = asyncio.Queue(max_in_flight + 1)  # + the end marker; never more
        self.reading = True
        self.half_closed = False  # the client said it had sent everything
        self.cut_by_drain = False  # no more was read because the server drains
        self.ended_by: str | None = None  # "idle" or "grace": the server ended it before its client did
        self.answered = 0
        self.tasks: set[asyncio.Task] = set()
        self.reader: asyncio.Task | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.failure: BaseException | None = None
        self._ended = False

    def maybe_end(self) -> None:
        """Queue the end marker once nothing more will be read and every request read has its answer queued."""
        if not self.reading and not self.unanswered:
            self.end_now()

    def end_now(self) -> None:
        """Queue the end marker now, whatever is still on its way (those items are abandoned)."""
        if not self._ended:
            self._ended = True
            self.responses.put_nowait(None)

    @property
    def ended(self) -> bool:
        return self._ended


# -- the service ----------------------------------------------------------------------------------


def _status(code: int, message: str = "") -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message)


class MimeticService(pb_grpc.MimeticServicer):
    """The four RPCs over one Engine. Runs on one event loop; the Engine runs in the Batcher's thread."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics, draining: asyncio.Event, dream_handler=None):
        # The one budget of decoded bytes for the whole server (every stream, every view set) is the
        # Engine's. The server admits every item against it before the item reaches a batch; the
        # Engine copy that embeds the batches admits nothing again, so that the engine thread never
        # waits for bytes held by items queued behind it (a deadlock), nor counts an item twice.
        self.holds = _Holds(engine.decode_budget)
        metrics.watch_budget(engine.decode_budget)
        self.engine = copy.copy(engine)
        self.engine.decode_budget = DecodeBudget(sys.maxsize)
        self.config = config
        self.metrics = metrics
        self.dream_handler = dream_handler
        self.draining = draining
        self.cut = asyncio.Event()  # the grace period is over: every stream still open ends now
        self.max_batch = config.max_batch or engine.config.batch_size
        self.in_flight = 0  # requests read and not yet answered, over every stream
        self.streams: set[Stream] = set()
        self.open_streams = 0  # Embed and Dream calls between their admission and their very end
        self.idle = asyncio.Event()  # no open Embed or Dream call
        self.idle.set()
        self.loop = asyncio.get_running_loop()
        # Decoding runs in threads next to the model (PIL and the kernels release the GIL).
        self.decode_pool = DaemonPool(engine.config.decode_workers, "mimetic-decode")
        self.text_pool = DaemonPool(1, "mimetic-text")
        # On CUDA the Engine decodes JPEG groups with nvJPEG: leave them encoded, read only their header.
        self.decode_here = not getattr(engine, "decode_on_device", False)
        self.batcher = Batcher(
            self.loop, max_batch=self.max_batch, max_delay_s=config.max_delay_ms / 1e3, max_queue=config.max_queue,
            metrics=metrics, on_result=self._on_result, on_error=self._on_error, on_drop=self.holds.release,
        )
        self._variants: collections.OrderedDict[tuple, Engine] = collections.OrderedDict()
        self._default_key = self._views_key(engine.views)
        self._labels = {name: list(v.labels) for name, v in engine.vocabularies.items()}

    def close(self) -> None:
        """Stop the workers without waiting for them, and give back every byte still held in the budget."""
        self.batcher.close()
        self.decode_pool.shutdown(cancel_futures=True)
        self.text_pool.shutdown(cancel_futures=True)
        self.holds.release_all()

    # -- GetInfo / EmbedText ------------------------------------------------------------------

    def limits(self) -> pb.Limits:
        c = self.config
        return pb.Limits(
            max_in_flight=c.max_in_flight, max_queue=c.max_queue, max_batch_views=self.max_batch,
            max_delay_ms=c.max_delay_ms, max_message_bytes=c.max_message_bytes, max_pixels=self.engine.config.max_pixels,
            max_views=c.max_views, max_thumbnail_size=c.max_thumbnail_size, max_streams=c.max_streams,
            max_decode_bytes=self.holds.budget.limit, idle_timeout_s=c.idle_timeout_s,
        )

    async def GetInfo(self, request, context):
        self.metrics.requests.labels("GetInfo", "OK").inc()
        return wire.info_to_proto(
            self.engine.info(), limits=self.limits(), dream=self.dream_handler is not None,
            view_presets=PRESETS, vocabulary_labels=self._labels,
        )

    async def EmbedText(self, request, context):
        texts = list(request.texts)
        if not texts or len(texts) > MAX_TEXTS:
            code = grpc.StatusCode.INVALID_ARGUMENT if not texts else grpc.StatusCode.RESOURCE_EXHAUSTED
            self.metrics.requests.labels("EmbedText", code.name).inc()
            await context.abort(code, f"EmbedText takes 1 to {MAX_TEXTS} texts, got {len(texts)}")
        embeddings = await self.loop.run_in_executor(self.text_pool, self.engine.embed_text, texts)
        self.metrics.requests.labels("EmbedText", "OK").inc()
        return pb.EmbedTextResponse(embeddings=wire.tensor_to_proto(embeddings))

    # -- the stream limit, idleness and the end of the grace period ------------------------------

    @contextlib.asynccontextmanager
    async def _stream_slot(self, method: str, context):
        """Admit an Embed or Dream stream (the token was checked before: a refused call never gets here)."""
        if self.draining.is_set():
            self.metrics.requests.labels(method, "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining: send this stream elsewhere or later")
        if self.open_streams >= self.config.max_streams:
            self.metrics.requests.labels(method, "RESOURCE_EXHAUSTED").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server has {self.open_streams} Embed and Dream streams open, its limit (--max-streams "
                f"{self.config.max_streams}): finish one, or retry later or elsewhere",
            )
        self.open_streams += 1
        self.idle.clear()
        try:
            yield
        finally:  # after the call's own status was sent (abort sends it before it raises)
            self.open_streams -= 1
            if not self.open_streams:
                self.idle.set()

    def _idle_message(self) -> str:
        return (
            f"the stream was idle for {self.config.idle_timeout_s:g} s (nothing in flight, nothing sent): the server "
            "ended it (--idle-timeout); open a new stream when there is more to send"
        )

    def _arm_idle(self, stream: Stream) -> None:
        """Nothing is in flight on the stream: it may stay silent for idle_timeout_s, no longer."""
        if stream.idle_timer is None and not stream.held and not stream.ended:
            stream.idle_timer = self.loop.call_later(self.config.idle_timeout_s, self._end_idle, stream)

    def _disarm_idle(self, stream: Stream) -> None:
        if stream.idle_timer is not None:
            stream.idle_timer.cancel()
            stream.idle_timer = None

    def _end_idle(self, stream: Stream) -> None:
        stream.idle_timer = None
        if stream.held or stream.ended:
            return
        stream.ended_by = "idle"
        stream.reader.cancel()  # its finally ends the stream: nothing is unanswered

    def cut_all(self) -> None:
        """The grace period is over: every stream still open ends now with the server's own UNAVAILABLE."""
        self.cut.set()
        for stream in list(self.streams):
            if not stream.ended:
                stream.ended_by = "grace"
                self.metrics.requests.labels("Embed", "UNAVAILABLE").inc(stream.unanswered)  # read, never answered
                self._abandon(stream)
                stream.end_now()

    async def _unless(self, event: asyncio.Event, awaitable):
        """The awaitable's result, or ``_DRAINING`` when ``event`` is set first (the awaitable is then cancelled)."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            return _DRAINING
        finally:  # also when the caller itself is cancelled: leave nothing waiting behind
            stop.cancel()
            task.cancel()

    # -- Dream: the extension point for the diffusion engine -----------------------------------

    async def Dream(self, request_iterator, context):
        """``dream_handler.dream(DreamRequest) -> DreamResponse``, one request at a time in a worker thread.

        Without a handler (the diffusion engine arrives with its own issue), the call is UNIMPLEMENTED.
        A ValueError from the handler is the item's INVALID_ARGUMENT, anything else its INTERNAL; the
        stream goes on either way. Like Embed, a Dream stream counts against max_streams, is ended when
        idle, reads nothing more once the server drains and is cut at the end of the grace period.
        """
        if self.dream_handler is None:
            self.metrics.requests.labels("Dream", "UNIMPLEMENTED").inc()
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "Dream needs a diffusion engine and this server has none (MimeticServer(..., dream_handler=...)); Embed, "
                "EmbedText and GetInfo are served",
            )
        async with self._stream_slot("Dream", context):
            iterator, answered = aiter(request_iterator), 0
            while True:
                try:
                    request = await self._unless(self.draining, asyncio.wait_for(anext(iterator, None), self.config.idle_timeout_s))
                except asyncio.TimeoutError:
                    self.metrics.requests.labels("Dream", "DEADLINE_EXCEEDED").inc()
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, self._idle_message())
                if request is None:
                    return
                if request is _DRAINING:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the server is draining: the {answered} requests it read were answered and no more are read; "
                        "send the others again, elsewhere or later",
                    )
                try:
                    work = self.loop.run_in_executor(self.text_pool, self.dream_handler.dream, request)
                    response = await self._unless(self.cut, work)
                    if response is _DRAINING:
                        self.metrics.requests.labels("Dream", "UNAVAILABLE").inc()
                        await context.abort(grpc.StatusCode.UNAVAILABLE, self._cut_message(answered))
                    response.request_id = request.request_id
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    code = code_pb2.INVALID_ARGUMENT if isinstance(exc, ValueError) else code_pb2.INTERNAL
                    response = pb.DreamResponse(request_id=request.request_id, id=request.id, status=_status(code, str(exc)))
                self.metrics.requests.labels("Dream", code_pb2.Code.Name(response.status.code)).inc()
                await context.write(response)
                answered += 1

    def _cut_message(self, answered: int) -> str:
        return (
            f"the server is draining and its grace period of {self.config.grace_s:g} s is over: this stream was cut after "
            f"{answered} answers; send the unanswered requests again, elsewhere or later"
        )

    # -- Embed ---------------------------------------------------------------------------------

    async def Embed(self, request_iterator, context):
        async with self._stream_slot("Embed", context):
            await self._embed(request_iterator, context)

    async def _embed(self, request_iterator, context) -> None:
        stream = Stream(self.config.max_in_flight)
        self.streams.add(stream)
        self.metrics.streams.inc()
        remaining = context.time_remaining()
        call_deadline = time.monotonic() + remaining if remaining is not None else None
        stream.reader = asyncio.create_task(self._read(request_iterator, stream, call_deadline))
        self._arm_idle(stream)
        try:
            while (response := await stream.responses.get()) is not None:
                await context.write(response)
                stream.answered += 1
                self._release(stream)
        finally:
            stream.reader.cancel()
            self._abandon(stream)
        if stream.failure is not None:
            await context.abort(grpc.StatusCode.INTERNAL, f"the server failed reading the stream: {stream.failure!r}")
        if stream.ended_by == "idle":
            self.metrics.requests.labels("Embed", "DEADLINE_EXCEEDED").inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, self._idle_message())
        if stream.ended_by == "grace":
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._cut_message(stream.answered))
        if stream.cut_by_drain:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the server is draining: the {stream.answered} requests it read were answered and no more are read; "
                "send the others again, elsewhere or later",
            )

    def _release(self, stream: Stream) -> None:
        stream.held -= 1
        self.in_flight -= 1
        self.metrics.in_flight.dec()
        stream.slots.release()
        self._arm_idle(stream)

    def _abandon(self, stream: Stream) -> None:
        """The call ended (done, cancelled, cut or failed): free its slots; items still on their way are skipped.

        An item still being admitted gives its bytes back when its task ends (after its decode thread,
        if one is running); one already queued, when the batch worker drops it or its result arrives.
        """
        self._disarm_idle(stream)
        for item in stream.items.values():
            item.finished = True
        stream.items.clear()
        for task in stream.tasks:
            task.cancel()
        self.in_flight -= stream.held
        self.metrics.in_flight.dec(stream.held)
        stream.held = 0
        if stream in self.streams:
            self.streams.discard(stream)
            self.metrics.streams.dec()

    async def _read(self, requests, stream: Stream, call_deadline: float | None) -> None:
        """Read a request only while a slot is free; start its check-and-decode task; stop when draining."""
        iterator = aiter(requests)

        async def next_request():
            try:
                return await anext(iterator)
            except StopAsyncIteration:
                return None

        try:
            while True:
                if await self._unless(self.draining, stream.slots.acquire()) is _DRAINING:
                    stream.cut_by_drain = True
                    return
                request = await self._unless(self.draining, next_request())
                if request is _DRAINING or request is None:
                    stream.slots.release()
                    stream.cut_by_drain = request is _DRAINING
                    stream.half_closed = request is None
                    return
                self._disarm_idle(stream)
                stream.held += 1
                stream.unanswered += 1
                self.in_flight += 1
                self.metrics.in_flight.inc()
                task = asyncio.create_task(self._admit(stream, request, call_deadline))
                stream.tasks.add(task)
                task.add_done_callback(stream.tasks.discard)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken stream: end it with INTERNAL once what was read is answered
            stream.failure = exc
        finally:
            stream.reading = False
            stream.maybe_end()

    async def _admit(self, stream: Stream, request: pb.EmbedRequest, call_deadline: float | None) -> None:
        read_at = time.monotonic()
        request_id = request.request_id
        item_id = request.id or request_id
        if not request_id or request_id in stream.items:
            problem = "is empty" if not request_id else "is already in flight on this stream"
            self._answer(
                stream, request, item_id, read_at, code_pb2.INVALID_ARGUMENT,
                f"{item_id or '<no id>'}: request_id {problem}; each request needs one, unique among those in flight",
            )
            return
        item = Item(stream, request, request_id, item_id, read_at)
        stream.items[request_id] = item  # before any await: a repeated request_id is seen at once
        try:
            self._parse(item, call_deadline)
            cost = await self._in_decode_pool(item, self._measure)
            await self._take(item, cost)
            item.panorama = await self._in_decode_pool(item, self._prepare)
            item.decode_s = time.monotonic() - read_at  # the header, the wait for the budget, the decode
            if not item.finished:
                await self.batcher.put(item)  # from here on the batch worker or the answer lets it go
                return
        except ItemError as exc:
            self._on_error(item, exc.code, str(exc))
            return
        except ImageTooLargeError as exc:  # BudgetExceededError: its cost alone is over the whole budget
            self._on_error(item, code_pb2.RESOURCE_EXHAUSTED, str(exc))
            return
        except asyncio.CancelledError:  # its stream went away
            if not item.in_thread:  # else the decode thread lets go when it ends
                self.holds.release(item)
            raise
        except Exception as exc:  # not the input's fault: this item fails, the stream goes on
            self._on_error(item, code_pb2.INTERNAL, f"{item_id}: the server failed on it ({type(exc).__name__}: {exc})")
            return
        self.holds.release(item)  # its stream went away while it was admitted

    async def _in_decode_pool(self, item: Item, work: Callable[[Item], object]):
        """``work(item)`` in a decode thread. Cancelled, the thread cannot be stopped: what it decodes stays
        held in the budget until it ends, and is given back then."""
        future = self.decode_pool.submit(work, item)
        item.in_thread = True
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda _: self.holds.release(item))
            raise
        finally:
            item.in_thread = False

    async def _take(self, item: Item, cost: int) -> None:
        """Wait for the item's turn in the decode budget (first come, first served, over every stream)."""
        try:
            await self.holds.take(item, cost, item.deadline)
        except asyncio.TimeoutError:
            raise ItemError(
                code_pb2.DEADLINE_EXCEEDED,
                f"{item.item_id}: its deadline passed after {1e3 * (time.monotonic() - item.read_at):.0f} ms while it waited "
                "for room in the decode budget; it was dropped before decoding",
            ) from None

    def _parse(self, item: Item, call_deadline: float | None) -> None:
        """Check the request's parameters against the Engine and the limits; fill in the item."""
        request, name = item.request, item.item_id
        item.engine = self._engine_for(request, name)
        if item.views > self.config.max_views:
            raise ItemError(code_pb2.RESOURCE_EXHAUSTED, f"{name}: {item.views} views, over the limit of {self.config.max_views} per item")
        known = self.engine.vocabularies
        unknown = [v for v in request.vocabularies if v not in known]
        if unknown:
            raise ItemError(
                code_pb2.INVALID_ARGUMENT,
                f"{name}: unknown vocabularies {unknown}; this server reads {sorted(known) or 'none'}",
            )
        item.vocabularies = tuple(request.vocabularies) or tuple(known)
        server_k = self.engine.config.top_k
        if request.top_k > server_k:
            raise ItemError(code_pb2.INVALID_ARGUMENT, f"{name}: top_k {request.top_k} is over the server's top_k of {server_k}")
        item.top_k = request.top_k or server_k
        outputs = frozenset(request.outputs) - {pb.OUTPUT_UNSPECIFIED}
        if any(o not in pb.Output.values() for o in outputs):
            raise ItemError(code_pb2.INVALID_ARGUMENT, f"{name}: unknown output in {sorted(request.outputs)}")
        item.outputs = outputs or wire.DEFAULT_OUTPUTS
        size = request.thumbnail_size or DEFAULT_THUMBNAIL_SIZE
        if pb.OUTPUT_THUMBNAILS in item.outputs and size > self.config.max_thumbnail_size:
            raise ItemError(
                code_pb2.RESOURCE_EXHAUSTED, f"{name}: thumbnail_size {size} is over the limit of {self.config.max_thumbnail_size}"
            )
        if not math.isfinite(request.yaw_offset):
            raise ItemError(code_pb2.INVALID_ARGUMENT, f"{name}: yaw_offset must be finite, got {request.yaw_offset}")
        deadlines = [d for d in (call_deadline, item.read_at + request.timeout_ms / 1e3 if request.timeout_ms else None) if d]
        item.deadline = min(deadlines) if deadlines else None

    @staticmethod
    def _views_key(views: list[ViewSpec]) -> tuple:
        return tuple((v.yaw, v.pitch, v.roll, v.fov) for v in views)

    def _engine_for(self, request: pb.EmbedRequest, name: str) -> Engine:
        """The Engine itself, or a shallow copy of it with the request's views (sharing its model)."""
        selection = request.WhichOneof("view_selection")
        if selection is None:
            return self.engine
        height, width = self.engine.clip.image_size
        try:
            if selection == "view_preset":
                views = [ViewSpec(v.yaw, v.pitch, v.roll, v.fov, width, height) for v in view_set(request.view_preset, size=width)]
            else:
                count = len(request.views.views)
                if count > self.config.max_views:
                    raise ItemError(code_pb2.RESOURCE_EXHAUSTED, f"{name}: {count} views, over the limit of {self.config.max_views} per item")
                if not count:
                    raise ValueError("an empty view list")
                for v in request.views.views:
                    if (v.width, v.height) not in ((0, 0), (width, height)):
                        raise ValueError(f"views are cut at the model's input size {width}x{height}; leave width and height 0")
                views = [ViewSpec(v.yaw, v.pitch, v.roll, v.fov or 90.0, width, height) for v in request.views.views]
        except (ValueError, KeyError) as exc:
            raise ItemError(code_pb2.INVALID_ARGUMENT, f"{name}: bad views: {exc}") from None
        key = self._views_key(views)
        if key == self._default_key:
            return self.engine
        variant = self._variants.get(key)
        if variant is None:
            variant = copy.copy(self.engine)
            variant.views = views
            variant.min_decode_width = required_width(views)
            self._variants[key] = variant
            if len(self._variants) > _VARIANTS_KEPT:
                self._variants.popitem(last=False)
        self._variants.move_to_end(key)
        return variant

    def _decodes_here(self, item: Item) -> bool:
        return self.decode_here or pb.OUTPUT_THUMBNAILS in item.outputs

    def _measure(self, item: Item) -> int:
        """In a decode thread: the image's header alone -> the pixel limit, the 2:1 shape (of the file's own
        size, before any reduced decoding) and the bytes decoding it takes, to admit it against the budget."""
        request, name, engine = item.request, item.item_id, item.engine
        max_pixels = engine.config.max_pixels
        try:
            kind = request.image.WhichOneof("data")
            if kind == "raw":
                raw = request.image.raw
                height, width, channels = raw.height, raw.width, raw.channels
                if channels not in (1, 3, 4) or not height or not width:
                    raise DecodeError(name, f"raw image must be (H, W, C) with H, W > 0 and C in 1, 3, 4, got {height}x{width}x{channels}")
                check_pixels(name, width, height, max_pixels)
                if len(raw.data) != height * width * channels:
                    raise DecodeError(name, f"raw image of {height}x{width}x{channels} needs {height * width * channels} bytes, got {len(raw.data)}")
                check_equirectangular(name, (height, width))
                return 3 * width * height  # the RGB array it becomes: already uncompressed, it costs its size
            if kind != "encoded":
                raise DecodeError(name, "no image in the request (set image.encoded or image.raw)")
            header = read_header(request.image.encoded, name=name)
            check_pixels(name, header.width, header.height, max_pixels)
            check_equirectangular(name, (header.height, header.width))
            # Decoded here, a JPEG is reduced by DCT scaling; on CUDA the Engine decodes it at full size.
            return decode_cost(header, min_width=engine.min_decode_width if self._decodes_here(item) else None)
        except ImageTooLargeError as exc:
            raise ItemError(code_pb2.RESOURCE_EXHAUSTED, str(exc)) from None
        except DecodeError as exc:
            raise ItemError(code_pb2.INVALID_ARGUMENT, str(exc)) from None

    def _prepare(self, item: Item) -> Panorama:
        """In a decode thread, once admitted: the request's image -> a checked Panorama for the Engine (and
        thumbnails); the item's hold in the budget shrinks to the array it keeps."""
        request, name, engine = item.request, item.item_id, item.engine
        max_pixels = engine.config.max_pixels
        try:
            if request.image.WhichOneof("data") == "raw":
                data = self._raw(request.image.raw, name, max_pixels)
            elif self._decodes_here(item):
                data = decode_image(request.image.encoded, name=name, max_pixels=max_pixels, min_width=engine.min_decode_width)
            else:
                data = request.image.encoded  # the Engine decodes it with nvJPEG, in its batch
            if isinstance(data, np.ndarray):
                check_equirectangular(name, data.shape)
                self.holds.shrink(item, data.nbytes)  # the decoder's scratch is gone
                if pb.OUTPUT_THUMBNAILS in item.outputs:
                    item.thumbnails = self._thumbnails(data, engine.views, request)
        except ImageTooLargeError as exc:
            raise ItemError(code_pb2.RESOURCE_EXHAUSTED, str(exc)) from None
        except DecodeError as exc:
            raise ItemError(code_pb2.INVALID_ARGUMENT, str(exc)) from None
        return Panorama(id=name, data=data, meta={}, yaw_offset=request.yaw_offset)

    @staticmethod
    def _raw(raw: pb.RawImage, name: str, max_pixels: int) -> np.ndarray:
        """A raw image (checked by ``_measure``) -> uint8 (H, W, 3); three channels are read in place."""
        array = np.frombuffer(raw.data, dtype=np.uint8).reshape(raw.height, raw.width, raw.channels)
        return decode_image(array[..., 0] if raw.channels == 1 else array, name=name, max_pixels=max_pixels)

    @staticmethod
    def _thumbnails(pano: np.ndarray, views: list[ViewSpec], request: pb.EmbedRequest) -> list[bytes]:
        size = request.thumbnail_size or DEFAULT_THUMBNAIL_SIZE
        small = [ViewSpec(v.yaw, v.pitch, v.roll, v.fov, size, max(1, round(size * v.height / v.width))) for v in views]
        with warnings.catch_warnings():  # the kernel only reads the (possibly read-only) array
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(pano)
        out = reproject([tensor], small, out_dtype=torch.uint8, layout="NHWC",
                        yaw_offsets=torch.tensor([wrap_degrees(request.yaw_offset)], dtype=torch.float64))
        thumbnails = []
        for view in out[0].numpy():
            buffer = io.BytesIO()
            Image.fromarray(view).save(buffer, format="JPEG", quality=85)
            thumbnails.append(buffer.getvalue())
        return thumbnails

    # -- answers (on the event loop) -------------------------------------------------------------

    def _answer(self, stream, request, item_id, read_at, code, message, item: Item | None = None) -> None:
        response = pb.EmbedResponse(request_id=request.request_id, id=item_id, status=_status(code, message))
        response.meta.CopyFrom(request.meta)
        response.timings.total_ms = 1e3 * (time.monotonic() - read_at)
        self._send(stream, response, item)

    def _send(self, stream: Stream, response: pb.EmbedResponse, item: Item | None) -> None:
        if item is not None:
            self.holds.release(item)  # answered (or its stream is gone): its image is no longer needed
            if item.finished:
                return
            item.finished = True
            item.panorama = None
            stream.items.pop(item.request_id, None)
        if stream.ended:  # cut: nobody will write this any more
            return
        self.metrics.requests.labels("Embed", code_pb2.Code.Name(response.status.code)).inc()
        self.metrics.stage_seconds.labels("total").observe(response.timings.total_ms / 1e3)
        stream.unanswered -= 1
        stream.responses.put_nowait(response)
        stream.maybe_end()

    def _on_error(self, item: Item, code: int, message: str) -> None:
        self._answer(item.stream, item.request, item.item_id, item.read_at, code, message, item)

    def _on_result(self, item: Item, result: EmbedResult, stats: dict, done_at: float) -> None:
        if item.finished:
            self.holds.release(item)
            return
        try:
            self._respond(item, result, stats, done_at)
        except Exception as exc:  # every item read gets an answer, whatever happens here
            self._on_error(item, code_pb2.INTERNAL, f"{item.item_id}: the server failed on its result ({type(exc).__name__}: {exc})")

    def _respond(self, item: Item, result: EmbedResult, stats: dict, done_at: float) -> None:
        if result.error is not None:  # the Engine's per-item failures are the input's (e.g. an nvJPEG decode)
            self._on_error(item, code_pb2.INVALID_ARGUMENT, result.error)
            return
        request = item.request
        response = pb.EmbedResponse(request_id=item.request_id, id=item.item_id, status=_status(code_pb2.OK))
        response.views.extend(wire.view_to_proto(v) for v in result.views)
        if pb.OUTPUT_VIEW_EMBEDDINGS in item.outputs:
            response.embeddings.CopyFrom(wire.tensor_to_proto(result.embeddings))
        if pb.OUTPUT_POOLED in item.outputs:
            response.pooled.CopyFrom(wire.tensor_to_proto(result.pooled))
        if pb.OUTPUT_READINGS in item.outputs:
            response.readings.extend(wire.readings_to_proto(result.readings, item.vocabularies, item.top_k))
        response.thumbnails.extend(item.thumbnails)
        response.meta.CopyFrom(request.meta)
        queue_s, engine_s = stats["started"] - item.queued_at, done_at - stats["started"]
        timings = response.timings
        timings.decode_ms, timings.queue_ms, timings.engine_ms = 1e3 * item.decode_s, 1e3 * queue_s, 1e3 * engine_s
        timings.total_ms = 1e3 * (time.monotonic() - item.read_at)
        timings.batch_items, timings.batch_views = stats["items"], stats["views"]
        for stage, seconds in (("decode", item.decode_s), ("queue", queue_s), ("engine", engine_s)):
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.queue_seconds.observe(queue_s)
        if response.ByteSize() > self.config.max_message_bytes:
            self._on_error(
                item, code_pb2.RESOURCE_EXHAUSTED,
                f"{item.item_id}: the response is {response.ByteSize():,} bytes, over the message limit of "
                f"{self.config.max_message_bytes:,}; ask for fewer outputs or smaller thumbnails",
            )
            return
        self._send(item.stream, response, item)


# -- authentication -------------------------------------------------------------------------------


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """``authorization: Bearer <token>`` on every call but the health check, compared in constant time."""

    OPEN = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str, metrics: Metrics | None = None):
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.OPEN):
            return handler
        given = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, str) else value.decode("latin-1")
        if hmac.compare_digest(given.encode("utf-8", "replace"), self._expected):
            return handler
        reason = "no bearer token (send 'authorization: Bearer <token>')" if not given else "wrong bearer token"
        if self._metrics is not None:
            self._metrics.requests.labels(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()
        return _refusal(handler, reason)


def _refusal(handler, reason: str):
    """A handler of the same shape as ``handler`` that ends the call with UNAUTHENTICATED."""

    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    return _shaped(handler, refuse)


def _shaped(handler, behaviour, *, request_streaming: bool | None = None):
    """A method handler that runs ``behaviour``, with ``handler``'s serializers and shape (or another request side)."""
    streaming = handler.request_streaming if request_streaming is None else request_streaming
    make = {
        (True, True): grpc.stream_stream_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler, (False, False): grpc.unary_unary_rpc_method_handler,
    }[(streaming, handler.response_streaming)]
    return make(behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def _behaviour(handler):
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


# -- every call's end, and the bound on the calls that are not streams ------------------------------


class CallOutcomes(grpc.aio.ServerInterceptor):
    """Counts in ``mimetic_requests_total`` the calls that grpc itself ends before the server answers them.

    grpc core refuses a message over the size limit (RESOURCE_EXHAUSTED "Received message larger than
    max") before the method sees it, and ends the call of a client that cancelled or whose deadline
    passed: a running method is cancelled under the server, and a unary method is never called at
    all. So every method runs inside a wrapper here, and a unary request is read by the wrapper,
    through a request-streaming handler of the same method (the same on the wire). Then:

    * a unary call whose request never came, and that is already closed, was refused by grpc:
      RESOURCE_EXHAUSTED (in practice a message over the limit);
    * a call cancelled under the server with its deadline passed: DEADLINE_EXCEEDED;
    * one cancelled while the server stops: UNAVAILABLE;
    * any other cancelled call: CANCELLED. A server is told only that a call was cancelled, not why,
      so a stream refused for a message over the limit is counted with those its client cancelled.

    Outermost, so that it sees the calls the token check refuses too.
    """

    def __init__(self, metrics: Metrics, stopping: Callable[[], bool]):
        self._metrics = metrics
        self._stopping = stopping

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        behaviour = _behaviour(handler)
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler  # a sync handler runs in grpc's own thread pool: none here
        method = details.method.rsplit("/", 1)[-1]
        unary_request, streams_out = not handler.request_streaming, handler.response_streaming
        generator = inspect.isasyncgenfunction(behaviour)

        async def observed(request_or_requests, context):
            try:
                request = request_or_requests
                if unary_request:
                    request = await self._one_request(method, request_or_requests, context)
                if streams_out and generator:  # written here, so that a cancelled write is seen here too
                    async for response in behaviour(request, context):
                        await context.write(response)
                    return None
                return await behaviour(request, context)
            except asyncio.CancelledError as exc:
                if isinstance(exc, _Refused):  # counted already
                    raise
                remaining = context.time_remaining()
                code = ("UNAVAILABLE" if self._stopping() else "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0
                        else "CANCELLED")
                self._metrics.requests.labels(method, code).inc()
                raise

        return _shaped(handler, observed, request_streaming=True)

    async def _one_request(self, method: str, requests, context):
        async for request in requests:
            return request
        try:  # no request: a client that sent none, or a call grpc closed before it came
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} takes one request message and the call carried none")
        except grpc.aio.AbortError:
            self._metrics.requests.labels(method, "INVALID_ARGUMENT").inc()
            raise
        except asyncio.CancelledError:
            raise
        except Exception:  # the call is closed already: grpc refused its request
            self._metrics.requests.labels(method, "RESOURCE_EXHAUSTED").inc()
        raise _Refused()


class _Refused(asyncio.CancelledError):
    """Ends a call that grpc already closed (and that was counted), quietly: grpc logs a cancellation at debug level."""


class CallLimit(grpc.aio.ServerInterceptor):
    """At most ``limit`` calls at once other than Embed and Dream streams (bounded by the service) and health
    (checks are never limited, watches by the health service): GetInfo, EmbedText, reflection. A bound
    against a flood of authenticated calls, so that memory stays bounded; innermost, so that a call the
    token check refuses never takes a place."""

    EXEMPT = (*(f"/{SERVICE_NAME}/{m}" for m in _STREAMS), f"/{HEALTH_SERVICE}/")

    def __init__(self, metrics: Metrics, limit: int):
        self._metrics = metrics
        self._limit = limit
        self.open = 0

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.EXEMPT):
            return handler
        behaviour = _behaviour(handler)
        if not inspect.iscoroutinefunction(behaviour) and not inspect.isasyncgenfunction(behaviour):
            return handler
        method = details.method.rsplit("/", 1)[-1]

        async def refuse(context):
            self._metrics.requests.labels(method, "RESOURCE_EXHAUSTED").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.open} calls of this kind are open, the most this server takes at once; retry later",
            )

        if inspect.isasyncgenfunction(behaviour):
            async def bounded(request_or_requests, context):
                if self.open >= self._limit:
                    await refuse(context)
                self.open += 1
                try:
                    async for response in behaviour(request_or_requests, context):
                        yield response
                finally:
                    self.open -= 1
        else:
            async def bounded(request_or_requests, context):
                if self.open >= self._limit:
                    await refuse(context)
                self.open += 1
                try:
                    return await behaviour(request_or_requests, context)
                finally:
                    self.open -= 1

        return _shaped(handler, bounded)


class HealthService(health.aio.HealthServicer):
    """grpc's health service, with Watch bounded (it needs no token, so it gets its own ``MAX_WATCHES``)
    and ended by the server itself when it stops, with UNAVAILABLE rather than a cancellation."""

    def __init__(self, metrics: Metrics, max_watches: int):
        super().__init__()
        self._metrics = metrics
        self._max_watches = max_watches
        self._watches = 0
        self._closing = asyncio.Event()

    async def Watch(self, request, context):
        if self._watches >= self._max_watches:
            self._metrics.requests.labels("Watch", "RESOURCE_EXHAUSTED").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._watches} health watches are open, the most this server keeps; use Check, or watch again later",
            )
        self._watches += 1
        try:
            watching = asyncio.ensure_future(super().Watch(request, context))
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                await asyncio.wait({watching, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
                watching.cancel()
            if watching.done() and not watching.cancelled():
                return watching.result()
            await asyncio.gather(watching, return_exceptions=True)  # let it leave its lock
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is stopping: watch another one")
        finally:
            self._watches -= 1

    def close_watches(self) -> None:
        self._closing.set()


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

    ``engine`` is an Engine or a function that builds one. ``dream_handler``, if given, serves Dream: an
    object with ``dream(DreamRequest) -> DreamResponse`` (the extension point for the diffusion engine).
    """

    def __init__(self, engine: Engine | Callable[[], Engine], config: ServerConfig | None = None, *, dream_handler=None):
        self.config = config = config or ServerConfig()
        config.check()
        self._engine_or_factory = engine
        self.dream_handler = dream_handler
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
        """Build the Engine and run it once (in a daemon thread: the loop keeps answering health checks, and a
        stop while the models load does not wait for them), then serve."""
        engine = self._engine_or_factory
        engine = await _in_daemon_thread(lambda: _warmed_up(engine if isinstance(engine, Engine) else engine()), "mimetic-load")
        self.service = MimeticService(engine, self.config, self.metrics, self._draining, dream_handler=self.dream_handler)
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
            self.service.batcher.flush_now()  # no more waiting for company
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


def _warmed_up(engine: Engine) -> Engine:
    """Run the Engine once on a blank panorama, so that the first request does not pay for the kernels'
    compilation and the model's first call (seconds on a CPU): SERVING means ready."""
    engine.embed([Panorama(id="warm-up", data=np.zeros((64, 128, 3), np.uint8))])
    return engine


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

    async def EmbedText(self, request, context):
        if self._service() is None:
            await self._loading(context)
        return await self._service().EmbedText(request, context)

    async def GetInfo(self, request, context):
        if self._service() is None:
            await self._loading(context)
        return await self._service().GetInfo(request, context)


# -- running it -----------------------------------------------------------------------------------


async def serve_async(config: ServerConfig, engine: Engine | Callable[[], Engine], *, dream_handler=None, stop: asyncio.Event | None = None) -> int:
    """Listen, load, serve until SIGTERM or SIGINT (or ``stop``), then drain. Returns an exit status."""
    import signal

    server = MimeticServer(engine, config, dream_handler=dream_handler)
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


def serve(config: ServerConfig, engine: Engine | Callable[[], Engine], *, dream_handler=None) -> int:
    """``serve_async`` on an event loop of its own. Returns once drained, without waiting for a worker
    thread still busy (a decode, an engine call; they are daemons): the grace period bounds the exit.
    (``asyncio.run`` would also wait for the loop's default executor.)"""
    give_freed_images_back_to_the_os()
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(serve_async(config, engine, dream_handler=dream_handler))
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

    def __init__(self, engine: Engine | Callable[[], Engine], config: ServerConfig | None = None, *, dream_handler=None, wait_loaded: bool = True):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mimetic-server-loop", daemon=True)
        self._thread.start()
        self.server = MimeticServer(engine, config or ServerConfig(port=0), dream_handler=dream_handler)
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
