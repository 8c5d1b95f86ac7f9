"""The gRPC service: the RPCs over one Engine, and a Dreamer and a Captioner when loaded (see ``engine.serve.server``)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
from google.rpc import code_pb2

from engine.decode import DecodeError, ImageTooLargeError
from engine.pipeline import Engine
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.serve import generate, wire
from engine.serve.answers import Answers
from engine.serve.batching import Batcher
from engine.serve.config import RETRY_LATER, ServerConfig
from engine.serve.metrics import Metrics
from engine.serve.pool import DaemonPool
from engine.serve.stream import _DRAINING, Item, ItemError, Stream, _Holds
from engine.types import Panorama, Prepared
from engine.views import PRESETS

DEFAULT_THUMBNAIL_SIZE = 128
MAX_TEXTS = 4096  # per EmbedText call
_VARIANTS_KEPT = 16  # view sets other than the server's (Engine.with_views: each shares the Engine's model)


# -- the service ----------------------------------------------------------------------------------


@dataclass
class Kind:
    """What differs between the streaming RPCs; the rest (slots, admission, budget, deadlines, draining) is shared."""

    method: str  # "Embed", "Dream" or "Caption"
    response: type  # its response message
    parse: Callable[[Item], None]  # the request's own parameters -> the item's (ItemError for a bad one)
    measure: Callable[[Item], Prepared]  # its image through the Engine's input stage (in a decode thread)
    respond: Callable  # (item, result, stats, done_at) -> its response, or None once answered with its error
    batcher: Batcher
    smaller: str  # what to ask for when a response is over the message limit


class MimeticService(Answers, pb_grpc.MimeticServicer):
    """The RPCs over one Engine (and a Dreamer, a Captioner). Runs on one event loop; each model runs in its
    Batcher's thread."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics, draining: asyncio.Event, *, dreamer=None,
                 captioner=None, models: list[dict] | None = None):
        # The one budget of decoded bytes for the whole server (every stream, every view set) is the
        # Engine's. The server admits every item against it before the item reaches a batch and hands
        # the Engine decoded items, for which it holds nothing again: so the engine thread never waits
        # for bytes held by items queued behind it (a deadlock), nor counts an item twice.
        self.holds = _Holds(engine.decode_budget)
        metrics.watch_budget(engine.decode_budget)
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.draining = draining
        self.cut = asyncio.Event()  # the grace period is over: every stream still open ends now
        self.max_batch = config.max_batch or engine.config.batch_size
        self.in_flight = 0  # requests read and not yet answered, over every stream
        self.streams: set[Stream] = set()
        self.open_streams = 0  # Embed, Dream and Caption calls between their admission and their very end
        self.idle = asyncio.Event()  # no open Embed, Dream or Caption call
        self.idle.set()
        self.loop = asyncio.get_running_loop()
        # Decoding runs in threads next to the model (PIL and the kernels release the GIL).
        self.decode_pool = DaemonPool(engine.config.decode_workers, "mimetic-decode")
        self.text_pool = DaemonPool(1, "mimetic-text")
        self.batcher = Batcher(
            self.loop, max_batch=self.max_batch, max_delay_s=config.max_delay_ms / 1e3, max_queue=config.max_queue,
            metrics=metrics, on_result=self._on_result, on_error=self._on_error, on_drop=self.holds.release,
        )
        self._variants: collections.OrderedDict[tuple, Engine] = collections.OrderedDict()
        self._labels = {name: list(v.labels) for name, v in engine.vocabularies.items()}
        self.models = models or []
        self.kinds = {"Embed": Kind("Embed", pb.EmbedResponse, self._parse, self._measure, self._embed_response, self.batcher,
                                    "ask for fewer outputs or smaller thumbnails")}
        self.dreamer, self.captioner = dreamer, captioner
        if dreamer is not None:
            self.kinds["Dream"] = generate.dream_kind(self, dreamer)
        if captioner is not None:
            self.kinds["Caption"] = generate.caption_kind(self, captioner)

    def batchers(self) -> list[Batcher]:
        return [kind.batcher for kind in self.kinds.values()]

    def close(self) -> None:
        """Stop the workers without waiting for them, and give back every byte still held in the budget."""
        for batcher in self.batchers():
            batcher.close()
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
            max_dream_steps=c.max_dream_steps, max_dream_views=c.max_dream_views, max_dream_batch=c.max_dream_batch,
            max_dream_delay_ms=c.max_dream_delay_ms, max_caption_batch=c.max_caption_batch,
        )

    async def GetInfo(self, request, context):
        self.metrics.requests.labels("GetInfo", "OK").inc()
        info = wire.info_to_proto(
            self.engine.info(), limits=self.limits(), dream=self.dreamer is not None,
            view_presets=PRESETS, vocabulary_labels=self._labels,
        )
        generate.add_info(info, self.dreamer, self.captioner, self.models)
        return info

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
        """Admit an Embed, Dream or Caption stream (the token was checked before: a refused call never gets here)."""
        if self.draining.is_set():
            self.metrics.requests.labels(method, "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining: send this stream elsewhere or later")
        if self.open_streams >= self.config.max_streams:
            self.metrics.requests.labels(method, "RESOURCE_EXHAUSTED").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server has {self.open_streams} Embed, Dream and Caption streams open, its limit (--max-streams "
                f"{self.config.max_streams}): finish one, or retry later or elsewhere",
                trailing_metadata=(RETRY_LATER,),
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
                self.metrics.requests.labels(stream.method, "UNAVAILABLE").inc(stream.unanswered)  # read, never answered
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

    # -- Dream and Caption: the same stream as Embed, over the Dreamer and the Captioner ----------

    async def Dream(self, request_iterator, context):
        """Stable Diffusion over the request's views (``engine.serve.generate``); UNIMPLEMENTED without ``--sd-model``."""
        await self._generate("Dream", "a diffusion engine (mimetic serve --sd-model DIR)", request_iterator, context)

    async def Caption(self, request_iterator, context):
        """Captions and interrogator prompts of the request's views; UNIMPLEMENTED without ``--caption-model``."""
        await self._generate("Caption", "a captioner (mimetic serve --caption-model DIR)", request_iterator, context)

    async def _generate(self, method: str, needs: str, request_iterator, context) -> None:
        if method not in self.kinds:
            self.metrics.requests.labels(method, "UNIMPLEMENTED").inc()
            served = ", ".join(name for name in ("Embed", "Dream", "Caption") if name in self.kinds)
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"{method} needs {needs} and this server has none; {served}, EmbedText and GetInfo are served",
            )
        async with self._stream_slot(method, context):
            await self._serve_stream(method, request_iterator, context)

    def _cut_message(self, answered: int) -> str:
        return (
            f"the server is draining and its grace period of {self.config.grace_s:g} s is over: this stream was cut after "
            f"{answered} answers; send the unanswered requests again, elsewhere or later"
        )

    # -- Embed ---------------------------------------------------------------------------------

    async def Embed(self, request_iterator, context):
        async with self._stream_slot("Embed", context):
            await self._serve_stream("Embed", request_iterator, context)

    async def _serve_stream(self, method: str, request_iterator, context) -> None:
        stream = Stream(self.config.max_in_flight, method)
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
            self.metrics.requests.labels(method, "DEADLINE_EXCEEDED").inc()
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
        kind = self.kinds[stream.method]
        try:
            kind.parse(item)
            deadlines = [d for d in (call_deadline, read_at + request.timeout_ms / 1e3 if request.timeout_ms else None) if d]
            item.deadline = min(deadlines) if deadlines else None
            item.prepared = await self._in_decode_pool(item, kind.measure)
            await self._take(item, item.prepared.cost)
            await self._in_decode_pool(item, self._decode)
            item.decode_s = time.monotonic() - read_at  # the header, the wait for the budget, the decode
            if not item.finished:
                await kind.batcher.put(item)  # from here on the batch worker or the answer lets it go
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

    def _parse(self, item: Item) -> None:
        """An Embed request's own parameters (the views, what to answer), checked against the server's Engine
        and limits; its image and yaw_offset are the Engine's to check (``_measure``)."""
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
        if pb.OUTPUT_THUMBNAILS in item.outputs:
            size = request.thumbnail_size or DEFAULT_THUMBNAIL_SIZE
            if size > self.config.max_thumbnail_size:
                raise ItemError(
                    code_pb2.RESOURCE_EXHAUSTED, f"{name}: thumbnail_size {size} is over the limit of {self.config.max_thumbnail_size}"
                )
            item.thumbnail_size = size

    def _engine_for(self, request, name: str) -> Engine:
        """The Engine itself, or the Engine with the request's views (``Engine.with_views``), the last few kept."""
        selection = request.WhichOneof("view_selection")
        if selection is None:
            return self.engine
        if selection == "view_preset":
            views, key = request.view_preset, request.view_preset
        else:
            count = len(request.views.views)
            if count > self.config.max_views:
                raise ItemError(code_pb2.RESOURCE_EXHAUSTED, f"{name}: {count} views, over the limit of {self.config.max_views} per item")
            if not count:
                raise ItemError(code_pb2.INVALID_ARGUMENT, f"{name}: bad views: an empty view list")
            views = wire.views_from_proto(request.views)
            key = tuple(tuple(sorted(view.items())) for view in views)
        variant = self._variants.get(key)
        if variant is None:
            try:
                variant = self.engine.with_views(views)
            except ValueError as exc:
                raise ItemError(code_pb2.INVALID_ARGUMENT, f"{name}: bad views: {exc}") from None
            # The same views asked for another way (a preset, or its list) batch together.
            variant = next((kept for kept in self._variants.values() if kept.views == variant.views), variant)
            self._variants[key] = variant
            if len(self._variants) > _VARIANTS_KEPT:
                self._variants.popitem(last=False)
        self._variants.move_to_end(key)
        return variant

    def _measure(self, item: Item, **options) -> Prepared:
        """In a decode thread: the Engine's input stage (``Engine.prepare``) on the request's image, from its
        header alone: the item's checks, and the bytes decoding it takes, to admit it against the budget.
        ``options`` go to ``prepare`` (Dream and Caption: the width their model's views need, host pixels)."""
        request, name = item.request, item.item_id
        try:
            panorama = Panorama(id=name, data=wire.image_from_proto(request.image, name), yaw_offset=request.yaw_offset)
            return item.engine.prepare(panorama, **(options or {"thumbnails": item.thumbnail_size}))
        except ImageTooLargeError as exc:
            raise ItemError(code_pb2.RESOURCE_EXHAUSTED, str(exc)) from None
        except DecodeError as exc:
            raise ItemError(code_pb2.INVALID_ARGUMENT, str(exc)) from None

    def _decode(self, item: Item) -> None:
        """In a decode thread, once admitted: ``Engine.decode``; the item's hold in the budget shrinks to the
        array it keeps (the Engine leaves a JPEG it decodes with nvJPEG encoded, holding its full cost)."""
        try:
            pixels = item.engine.decode(item.prepared).pixels
        except DecodeError as exc:
            raise ItemError(code_pb2.INVALID_ARGUMENT, str(exc)) from None
        if isinstance(pixels, torch.Tensor):
            self.holds.shrink(item, pixels.numel() * pixels.element_size())  # the decoder's scratch is gone
        elif not isinstance(pixels, bytes):
            self.holds.shrink(item, pixels.nbytes)
