"""One streaming call of the client (Embed, Dream or Caption), resumed after UNAVAILABLE: see ``engine.serve.client``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterable, AsyncIterator

import grpc
import numpy as np
import torch
from google.protobuf.message import Message

from engine.decode import DecodeError, decode_image
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.serve import wire
from engine.serve.config import RETRY_LATER
from engine.types import Panorama, check_panorama, read_bytes

_END = object()
_DONE = object()
_WRITE_RACE = "Internal error from Core"  # grpc.aio's details for a write that failed in core (set_internal_error)


class ServerUnavailableError(grpc.RpcError):
    """The server gave no answer within the retry budget (or ``retries``): raised instead of the last UNAVAILABLE.

    For ``embed``: ``delivered``, how many results were handed back first (in input order, the first
    ``delivered`` inputs); ``unanswered``, the ids, in input order, of the items read from the input
    that have no result.
    """

    def __init__(self, address: str, waited_s: float, limit: str, last: grpc.RpcError):
        super().__init__()
        self.address, self.waited_s, self.limit, self.last = address, waited_s, limit, last
        self.delivered = 0
        self.unanswered: list[str] = []

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        text = f"no answer for {self.waited_s:.1f} s, giving up ({self.limit})"
        if self.unanswered:
            count = len(self.unanswered)
            text += f"; no result for {count} item{'s' if count != 1 else ''} read from the input, the first {self.unanswered[0]!r}"
        last = " ".join(str(self.last.details() or self.last.code().name).split())  # grpc's text may span lines
        return f"{text}; last status: {last}"

    def __str__(self) -> str:
        return f"{self.address}: {self.details()}"


class _Outage:
    """The server's silence, from the first failed try since its last answer: the retry budget's clock."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.attempt = 0

    def waited(self) -> float:
        return time.monotonic() - self.started


def _retryable(error: grpc.RpcError) -> bool:
    """UNAVAILABLE; a RESOURCE_EXHAUSTED the server marks as passing (``RETRY_LATER``: its stream limit
    is full, and a stream will end); or the INTERNAL that grpc's asyncio client makes up when a write
    fails as the stream ends (grpc/grpc#36066): it replaces the status the server sent, which a server
    going away (the case here: a write in flight as its connection closes) sends as UNAVAILABLE. A
    status the server really meant comes back on the next try."""
    code = error.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return RETRY_LATER in tuple(error.trailing_metadata() or ())
    return code == grpc.StatusCode.UNAVAILABLE or (code == grpc.StatusCode.INTERNAL and error.details() == _WRITE_RACE)


class RequestStream:
    """One ``embed``, ``dream`` or ``caption`` call: a writer that sends while a slot is free, a reader that
    matches answers by request_id, and a supervisor that opens a new stream after UNAVAILABLE and sends
    the unanswered again.

    A slot is taken before a panorama is pulled from the caller's iterable and given back when its
    result has been handed to the caller, so at most ``window`` panoramas are held here at any time.
    ``method`` is the stub's streaming method; each request is a copy of ``template`` (an EmbedRequest,
    DreamRequest or CaptionRequest: they share the fields set here) with the panorama's own; ``convert``
    turns a response into the in-process result, and ``failed(panorama, exc)`` makes the result of an item
    that fails before it is sent.
    """

    def __init__(self, client, source, template, *, window, max_bytes, method, convert, failed):
        self.client = client
        self.source = source
        self.template = template
        self.max_bytes = max_bytes
        self.method = method
        self.convert = convert
        self.failed = failed
        self.slots = asyncio.Semaphore(window)
        self.pending: dict[str, tuple[int, Panorama, pb.EmbedRequest]] = {}  # sent, not answered: by request_id
        self.arrivals: asyncio.Queue = asyncio.Queue()  # (seq, result), an exception, or _DONE; each result holds a slot
        self.next_seq = 0
        self.exhausted = False
        self._iterator = None
        self._pulling: asyncio.Future | None = None

    async def results(self, ordered: bool) -> AsyncIterator:
        supervisor = asyncio.create_task(self._supervise())
        waiting: dict[int, object] = {}  # arrived ahead of an earlier one (ordered)
        next_out = delivered = 0
        try:
            while (entry := await self.arrivals.get()) is not _DONE:
                if isinstance(entry, BaseException):
                    if isinstance(entry, ServerUnavailableError):
                        entry.delivered, entry.unanswered = delivered, self._unanswered(waiting)
                    raise entry
                seq, result = entry
                if not ordered:
                    delivered += 1
                    yield result
                    self.slots.release()
                    continue
                waiting[seq] = result
                while next_out in waiting:
                    delivered += 1
                    yield waiting.pop(next_out)
                    next_out += 1
                    self.slots.release()
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor

    def _unanswered(self, waiting: dict[int, object]) -> list[str]:
        """The ids, in input order, of the items read from the input whose result the caller has not had."""
        held = [(seq, panorama.id) for seq, panorama, _ in self.pending.values()]
        held += [(seq, result.id) for seq, result in waiting.items()]  # answered, but behind one that was not
        pulling = self._pulling  # read from the input, not yet sent
        if pulling is not None and pulling.done() and not pulling.cancelled() and pulling.exception() is None:
            produced = pulling.result()
            if produced is not _END:
                held.append((produced[0], str(getattr(produced[1], "id", None))))
        return [item_id for _, item_id in sorted(held)]

    async def _next(self):
        """The next (seq, panorama, request or failed result), or _END. Shielded: a pull cut short by a
        retry is not lost, the next writer awaits the same one, since the caller's iterator cannot take
        an item back. Only a pull whose item was handed over is forgotten: a writer cancelled just as its
        pull finished (the item there, the writer never resumed with it) leaves the item to the next."""
        if self._pulling is None:
            self._pulling = asyncio.ensure_future(self._produce())
        try:
            produced = await asyncio.shield(self._pulling)
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._pulling = None  # the caller's iterable failed: raised once, where it iterates
            raise
        self._pulling = None
        return produced

    async def _produce(self):
        panorama = await self._pull()
        if panorama is _END:
            return _END
        seq = self.next_seq
        self.next_seq += 1
        try:
            if isinstance(getattr(panorama, "data", None), (str, os.PathLike)):
                return seq, panorama, await asyncio.to_thread(self._request, panorama, seq)  # a file read: off the loop
            return seq, panorama, self._request(panorama, seq)
        except (DecodeError, TypeError, ValueError) as exc:  # this item fails here; the others go on
            return seq, panorama, self.failed(panorama, exc)

    async def _pull(self):
        if self._iterator is None:
            source = self.source
            self._iterator = aiter(source) if isinstance(source, AsyncIterable) else iter(source)
        if isinstance(self._iterator, AsyncIterator):
            return await anext(self._iterator, _END)
        if isinstance(self.source, (list, tuple)):
            return next(self._iterator, _END)
        return await asyncio.to_thread(next, self._iterator, _END)  # a generator may read files: off the loop

    async def _supervise(self) -> None:
        outage = None  # since the last answer, if the server has gone silent
        try:
            while True:
                call = self.method(metadata=self.client.metadata)
                writer = asyncio.create_task(self._write(call))
                try:
                    async for response in call:
                        outage = None  # an answer: the budget starts afresh at the next failure
                        self._arrived(response)
                    if self.pending or not self.exhausted:
                        raise RuntimeError(f"the server ended the stream early ({len(self.pending)} requests unanswered)")
                    break
                except grpc.aio.AioRpcError as exc:
                    if _retryable(exc) and self.exhausted and not self.pending:
                        break  # everything was answered before the server went away
                    failure = exc
                finally:
                    writer.cancel()
                    call.cancel()
                    await asyncio.wait([writer])  # gone before a new writer resends what is pending
                outage = outage or _Outage()
                await self.client._retry_or_raise(outage, failure)
            self.arrivals.put_nowait(_DONE)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the caller, raised where it iterates
            self.arrivals.put_nowait(exc)

    async def _write(self, call) -> None:
        try:
            for _, _, request in sorted(self.pending.values(), key=lambda entry: entry[0]):
                await call.write(request)  # a new stream: send again what the last one left unanswered
            while not self.exhausted:
                await self.slots.acquire()
                try:
                    produced = await self._next()
                except asyncio.CancelledError:
                    self.slots.release()  # the next writer takes a slot again for the same item
                    raise
                except Exception as exc:  # the caller's iterable failed: raise it there
                    self.arrivals.put_nowait(exc)
                    return
                if produced is _END:
                    self.exhausted = True
                    self.slots.release()
                    break
                seq, panorama, request = produced
                if not isinstance(request, Message):  # failed before it could be sent
                    self.arrivals.put_nowait((seq, request))
                    continue
                self.pending[request.request_id] = (seq, panorama, request)
                await call.write(request)
            await call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            return  # the call ended; the reader has its status
        except Exception as exc:  # not to be left hanging: the caller sees it
            self.arrivals.put_nowait(exc)

    def _request(self, panorama: Panorama, seq: int) -> Message:
        check_panorama(panorama)  # the Engine's own rules for the fields; the image is the server's Engine's to check
        request = type(self.template)()
        request.CopyFrom(self.template)
        request.request_id = str(seq)
        request.id = panorama.id
        request.yaw_offset = panorama.yaw_offset
        request.meta.CopyFrom(wire.meta_to_struct(panorama.meta))
        data = panorama.data
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().numpy()
        if isinstance(data, np.ndarray):
            # The Engine's own array rules (grey, RGBA, 16-bit), applied here; the pixel limit is the server's.
            pixels = decode_image(data, name=panorama.id, max_pixels=None)
            height, width, channels = pixels.shape
            request.image.raw.CopyFrom(pb.RawImage(data=pixels.tobytes(), height=height, width=width, channels=channels))
        else:
            request.image.encoded = read_bytes(data, panorama.id)
        size = request.ByteSize()
        if size > self.max_bytes:
            raise ValueError(f"the request is {size:,} bytes, over the message limit of {self.max_bytes:,} bytes")
        return request

    def _arrived(self, response) -> None:
        entry = self.pending.pop(response.request_id, None)
        if entry is None:
            raise RuntimeError(f"the server answered request_id {response.request_id!r}, which was not in flight")
        seq, panorama, _ = entry
        result = self.convert(response)
        result.id, result.meta = panorama.id, panorama.meta  # the caller's own objects, as the Engine gives them back
        self.arrivals.put_nowait((seq, result))
