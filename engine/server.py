"""The gRPC service (``mimetic serve``): a thin shell around one Engine, on grpc.aio.

    from engine.server import ServerConfig, serve, BackgroundServer
    serve(ServerConfig(port=50051, metrics_port=9100), lambda: Engine(EngineConfig(...)))   # until SIGTERM
    with BackgroundServer(engine, ServerConfig(port=0)) as server:                            # tests, notebooks
        MimeticClient(server.address).embed(...)

One item's way through, top to bottom:

1. **Read.** Each Embed stream has K = ``max_in_flight`` slots. The server takes a slot before it
   reads the next request and gives it back only once that request's response has been written,
   so a stream never has more than K requests read ahead of its responses: a client that sends
   faster than the model works, or reads its responses slowly, is simply not read (HTTP/2 flow
   control then holds it back).
2. **Check and decode**, in a thread pool (``decode_workers`` threads), concurrently with the
   model: parameters, then the image (``engine.decode`` with the Engine's limits and DCT scaling).
   A bad item is answered at once with its own ``google.rpc.Status`` (INVALID_ARGUMENT, or
   RESOURCE_EXHAUSTED over a limit) and the stream goes on. On CUDA, JPEGs are left encoded (only
   their header is read here) so that the Engine decodes them in batches with nvJPEG.
3. **Queue**: one queue for every stream, bounded by ``max_queue`` items; a full queue holds the
   streams' readers back.
4. **Batch** (``engine.batching``): a single worker thread takes items from the queue when the
   Engine is free: up to ``max_batch`` views, waiting at most ``max_delay_ms`` after the first item
   for others, from any stream. Items whose deadline passed while queued, or whose stream went
   away, are dropped here, before the model, with DEADLINE_EXCEEDED (or nothing, for a stream that
   is gone). Items asking for another view set than the server's are embedded by a copy of the
   Engine that shares its model and differs only in ``views``.
5. **Respond**: results come back to the event loop one by one as the Engine yields them; the
   response (fp16 bytes, readings cut to the requested vocabularies and top-k, timings) is written
   to the item's stream, which then frees the slot.

Memory is bounded everywhere: at most ``max_streams`` streams of K items each, of which at most
``max_queue`` wait for a batch.

Health (``grpc.health.v1``) says NOT_SERVING while the models load, SERVING once they have, and
NOT_SERVING again while draining. Draining (SIGTERM): no more requests are read, new calls are
refused with UNAVAILABLE, every request already read is answered within the grace period, and a
stream cut short ends with UNAVAILABLE so that its client sends the rest again. Metrics are served
for Prometheus on ``metrics_port`` (see ``Metrics``). Every call but the health check needs
``authorization: Bearer <token>`` when a token is set; tokens are compared in constant time.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import hmac
import io
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import prometheus_client
import torch
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image

from engine import wire
from engine.batching import Batcher
from engine.decode import DecodeError, ImageTooLargeError, decode_image, required_width
from engine.pipeline import EmbedResult, Engine, Panorama, check_equirectangular
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.server_config import ServerConfig
from engine.views import PRESETS, view_set
from kernels import ViewSpec, reproject

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Mimetic"].full_name  # "mimetic.v1.Mimetic"
DEFAULT_THUMBNAIL_SIZE = 128
MAX_TEXTS = 4096  # per EmbedText call
_VARIANTS_KEPT = 16  # view sets other than the server's, each a shallow copy of the Engine


# -- metrics --------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics, in a registry of the server's own (so that several servers can share a process).

    mimetic_requests_total{method,code}   items (Embed) and calls (others) answered, by status code
    mimetic_batch_views / _batch_items    views and panoramas per engine call (histograms)
    mimetic_queue_seconds                 time an item waited for its batch
    mimetic_stage_seconds{stage}          decode, queue, engine and total per item
    mimetic_views_total                   views embedded (rate() is views/s)
    mimetic_views_per_second              the same over the last 10 s, for a glance
    mimetic_in_flight                     requests read and not yet answered, over every stream
    mimetic_queue_depth, mimetic_streams  items waiting for a batch; open Embed streams
    """

    WINDOW_S = 10.0

    def __init__(self):
        self.registry = registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "mimetic_requests", "Items (Embed) and calls answered, by method and status code", ["method", "code"], registry=registry
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
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        rate = prometheus_client.Gauge("mimetic_views_per_second", "Views embedded per second over the last 10 s", registry=registry)
        rate.set_function(self.views_per_second)

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

    @property
    def views(self) -> int:
        return len(self.engine.views)


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
        self.cut_by_drain = False
        self.answered = 0
        self.tasks: set[asyncio.Task] = set()
        self.failure: BaseException | None = None
        self._ended = False

    def maybe_end(self) -> None:
        """Queue the end marker once nothing more will be read and every request read has its answer queued."""
        if not self.reading and not self.unanswered and not self._ended:
            self._ended = True
            self.responses.put_nowait(None)


# -- the service ----------------------------------------------------------------------------------


def _status(code: int, message: str = "") -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message)


class MimeticService(pb_grpc.MimeticServicer):
    """The four RPCs over one Engine. Runs on one event loop; the Engine runs in the Batcher's thread."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics, draining: asyncio.Event, dream_handler=None):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.dream_handler = dream_handler
        self.draining = draining
        self.max_batch = config.max_batch or engine.config.batch_size
        self.in_flight = 0  # requests read and not yet answered, over every stream
        self.streams: set[Stream] = set()
        self.idle = asyncio.Event()  # no open Embed stream
        self.idle.set()
        self.loop = asyncio.get_running_loop()
        # Decoding runs in threads next to the model (PIL and the kernels release the GIL).
        self.decode_pool = ThreadPoolExecutor(max(1, engine.config.decode_workers), thread_name_prefix="mimetic-decode")
        self.text_pool = ThreadPoolExecutor(1, thread_name_prefix="mimetic-text")
        # On CUDA the Engine decodes JPEG groups with nvJPEG: leave them encoded, read only their header.
        self.decode_here = not getattr(engine, "decode_on_device", False)
        self.batcher = Batcher(
            self.loop, max_batch=self.max_batch, max_delay_s=config.max_delay_ms / 1e3, max_queue=config.max_queue,
            metrics=metrics, on_result=self._on_result, on_error=self._on_error,
        )
        self._variants: collections.OrderedDict[tuple, Engine] = collections.OrderedDict()
        self._default_key = self._views_key(engine.views)
        self._labels = {name: list(v.labels) for name, v in engine.vocabularies.items()}

    def close(self) -> None:
        self.batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.text_pool.shutdown(wait=False, cancel_futures=True)

    # -- GetInfo / EmbedText ------------------------------------------------------------------

    def limits(self) -> pb.Limits:
        c = self.config
        return pb.Limits(
            max_in_flight=c.max_in_flight, max_queue=c.max_queue, max_batch_views=self.max_batch,
            max_delay_ms=c.max_delay_ms, max_message_bytes=c.max_message_bytes, max_pixels=self.engine.config.max_pixels,
            max_views=c.max_views, max_thumbnail_size=c.max_thumbnail_size, max_streams=c.max_streams,
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

    # -- Dream: the extension point for the diffusion engine -----------------------------------

    async def Dream(self, request_iterator, context):
        """``dream_handler.dream(DreamRequest) -> DreamResponse``, one request at a time in a worker thread.

        Without a handler (the diffusion engine arrives with its own issue), the call is UNIMPLEMENTED.
        A ValueError from the handler is the item's INVALID_ARGUMENT, anything else its INTERNAL; the
        stream goes on either way.
        """
        if self.dream_handler is None:
            self.metrics.requests.labels("Dream", "UNIMPLEMENTED").inc()
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "Dream needs a diffusion engine and this server has none (MimeticServer(..., dream_handler=...)); Embed, "
                "EmbedText and GetInfo are served",
            )
        async for request in request_iterator:
            try:
                response = await self.loop.run_in_executor(self.text_pool, self.dream_handler.dream, request)
                response.request_id = request.request_id
            except Exception as exc:
                code = code_pb2.INVALID_ARGUMENT if isinstance(exc, ValueError) else code_pb2.INTERNAL
                response = pb.DreamResponse(request_id=request.request_id, id=request.id, status=_status(code, str(exc)))
            self.metrics.requests.labels("Dream", code_pb2.Code.Name(response.status.code)).inc()
            await context.write(response)

    # -- Embed ---------------------------------------------------------------------------------

    async def Embed(self, request_iterator, context):
        if self.draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining: send this stream elsewhere or later")
        stream = Stream(self.config.max_in_flight)
        self.streams.add(stream)
        self.idle.clear()
        self.metrics.streams.inc()
        remaining = context.time_remaining()
        call_deadline = time.monotonic() + remaining if remaining is not None else None
        reader = asyncio.create_task(self._read(request_iterator, stream, call_deadline))
        try:
            while (response := await stream.responses.get()) is not None:
                await context.write(response)
                stream.answered += 1
                self._release(stream)
        finally:
            reader.cancel()
            self._abandon(stream)
        if stream.failure is not None:
            await context.abort(grpc.StatusCode.INTERNAL, f"the server failed reading the stream: {stream.failure!r}")
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

    def _abandon(self, stream: Stream) -> None:
        """The call ended (done, cancelled, or failed): free its slots; items still on their way are skipped."""
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
        if not self.streams:
            self.idle.set()

    async def _unless_draining(self, awaitable):
        """The awaitable's result, or ``_DRAINING`` when draining starts first (the awaitable is then cancelled)."""
        task = asyncio.ensure_future(awaitable)
        drain = asyncio.ensure_future(self.draining.wait())
        try:
            await asyncio.wait({task, drain}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            return _DRAINING
        finally:  # also when the reader itself is cancelled: leave nothing waiting behind
            drain.cancel()
            task.cancel()

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
                if await self._unless_draining(stream.slots.acquire()) is _DRAINING:
                    stream.cut_by_drain = True
                    return
                request = await self._unless_draining(next_request())
                if request is _DRAINING or request is None:
                    stream.slots.release()
                    stream.cut_by_drain = request is _DRAINING
                    stream.half_closed = request is None
                    return
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
            item.panorama = await self.loop.run_in_executor(self.decode_pool, self._prepare, item)
        except ItemError as exc:
            self._on_error(item, exc.code, str(exc))
            return
        except Exception as exc:  # not the input's fault: this item fails, the stream goes on
            self._on_error(item, code_pb2.INTERNAL, f"{item_id}: the server failed on it ({exc!r})")
            return
        if not item.finished:
            await self.batcher.put(item)

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

    def _prepare(self, item: Item) -> Panorama:
        """In a decode thread: the request's image -> a checked Panorama for the Engine (and thumbnails)."""
        started = time.perf_counter()
        request, name, engine = item.request, item.item_id, item.engine
        max_pixels = engine.config.max_pixels
        try:
            kind = request.image.WhichOneof("data")
            if kind == "raw":
                data = self._raw(request.image.raw, name, max_pixels)
            elif kind == "encoded" and (self.decode_here or pb.OUTPUT_THUMBNAILS in item.outputs):
                data = decode_image(request.image.encoded, name=name, max_pixels=max_pixels, min_width=engine.min_decode_width)
            elif kind == "encoded":
                data = self._check_header(request.image.encoded, name, max_pixels)
            else:
                raise DecodeError(name, "no image in the request (set image.encoded or image.raw)")
            if isinstance(data, np.ndarray):
                check_equirectangular(name, data.shape)
                if pb.OUTPUT_THUMBNAILS in item.outputs:
                    item.thumbnails = self._thumbnails(data, engine.views, request)
        except ImageTooLargeError as exc:
            raise ItemError(code_pb2.RESOURCE_EXHAUSTED, str(exc)) from None
        except DecodeError as exc:
            raise ItemError(code_pb2.INVALID_ARGUMENT, str(exc)) from None
        item.decode_s = time.perf_counter() - started
        return Panorama(id=name, data=data, meta={}, yaw_offset=request.yaw_offset)

    @staticmethod
    def _raw(raw: pb.RawImage, name: str, max_pixels: int) -> np.ndarray:
        height, width, channels = raw.height, raw.width, raw.channels
        if channels not in (1, 3, 4) or not height or not width:
            raise DecodeError(name, f"raw image must be (H, W, C) with H, W > 0 and C in 1, 3, 4, got {height}x{width}x{channels}")
        if max_pixels is not None and height * width > max_pixels:
            raise ImageTooLargeError(name, f"{width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,} (max_pixels)")
        if len(raw.data) != height * width * channels:
            raise DecodeError(name, f"raw image of {height}x{width}x{channels} needs {height * width * channels} bytes, got {len(raw.data)}")
        array = np.frombuffer(raw.data, dtype=np.uint8).reshape(height, width, channels)
        return decode_image(array[..., 0] if channels == 1 else array, name=name, max_pixels=max_pixels)

    @staticmethod
    def _check_header(blob: bytes, name: str, max_pixels: int) -> bytes:
        """For the Engine's nvJPEG path: the pixel limit and the 2:1 shape from the header alone."""
        try:
            with Image.open(io.BytesIO(blob)) as im:
                width, height = im.size
        except Exception:
            return blob  # not readable: the Engine's decoder gives the proper error, in place
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(name, f"{width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,} (max_pixels)")
        check_equirectangular(name, (height, width))
        return blob

    @staticmethod
    def _thumbnails(pano: np.ndarray, views: list[ViewSpec], request: pb.EmbedRequest) -> list[bytes]:
        size = request.thumbnail_size or DEFAULT_THUMBNAIL_SIZE
        small = [ViewSpec(v.yaw, v.pitch, v.roll, v.fov, size, max(1, round(size * v.height / v.width))) for v in views]
        with warnings.catch_warnings():  # the kernel only reads the (possibly read-only) array
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(pano)
        out = reproject([tensor], small, out_dtype=torch.uint8, layout="NHWC",
                        yaw_offsets=torch.tensor([request.yaw_offset], dtype=torch.float64))
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
            if item.finished:
                return
            item.finished = True
            stream.items.pop(item.request_id, None)
        self.metrics.requests.labels("Embed", code_pb2.Code.Name(response.status.code)).inc()
        self.metrics.stage_seconds.labels("total").observe(response.timings.total_ms / 1e3)
        stream.unanswered -= 1
        stream.responses.put_nowait(response)
        stream.maybe_end()

    def _on_error(self, item: Item, code: int, message: str) -> None:
        self._answer(item.stream, item.request, item.item_id, item.read_at, code, message, item)

    def _on_result(self, item: Item, result: EmbedResult, stats: dict, done_at: float) -> None:
        if item.finished:
            return
        try:
            self._respond(item, result, stats, done_at)
        except Exception as exc:  # every item read gets an answer, whatever happens here
            self._on_error(item, code_pb2.INTERNAL, f"{item.item_id}: the server failed on its result ({exc!r})")

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

    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


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
        self.health = health.aio.HealthServicer()
        self.service: MimeticService | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._draining: asyncio.Event | None = None
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
        interceptors = [BearerTokenInterceptor(c.token, self.metrics)] if c.token else []
        self._server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=c.max_streams,
            options=[
                ("grpc.max_receive_message_length", c.max_message_bytes),
                ("grpc.max_send_message_length", c.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a port already taken is an error, not a second listener
            ],
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        pb_grpc.add_MimeticServicer_to_server(_Deferred(self), self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self._server
        )
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
        """Build the Engine (in a thread: the loop keeps answering health checks), then serve."""
        engine = self._engine_or_factory
        if not isinstance(engine, Engine):
            engine = await asyncio.get_running_loop().run_in_executor(None, engine)
        self.service = MimeticService(engine, self.config, self.metrics, self._draining, dream_handler=self.dream_handler)
        if not self._draining.is_set():
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace_s: float | None = None) -> bool:
        """Stop reading, answer everything already read within ``grace_s``, then stop. True if nothing was cut."""
        if self._stopped:
            return True
        grace_s = self.config.grace_s if grace_s is None else grace_s
        started = time.monotonic()
        self._draining.set()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        clean = True
        if self.service is not None:
            self.service.batcher.flush_now()  # no more waiting for company
            try:
                await asyncio.wait_for(self.service.idle.wait(), grace_s)
            except asyncio.TimeoutError:
                clean = False
        # What is still open now (health watches, a stream past the grace period) is cancelled.
        await self._server.stop(max(0.0, min(1.0, grace_s - (time.monotonic() - started))))
        self.close_resources()
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
        await self._server.stop(0)
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
    await asyncio.wait({loading, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        print(f"mimetic serve: error: the engine did not load: {loading.exception()}", file=sys.stderr, flush=True)
        await server.drain(0)
        return 1
    if loading.done():
        print(f"mimetic serve: serving {SERVICE_NAME} on {server.address} (pid {os.getpid()})", file=sys.stderr, flush=True)
    await stop.wait()
    print(f"mimetic serve: draining ({config.grace_s:g} s grace)", file=sys.stderr, flush=True)
    clean = await server.drain()
    if not loading.done():
        loading.cancel()
    print(f"mimetic serve: stopped{'' if clean else ' (grace period over: unfinished work was cut)'}", file=sys.stderr, flush=True)
    return 0


def serve(config: ServerConfig, engine: Engine | Callable[[], Engine], *, dream_handler=None) -> int:
    return asyncio.run(serve_async(config, engine, dream_handler=dream_handler))


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
