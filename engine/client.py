"""The Python client of ``mimetic serve``: remote results are the same EmbedResult objects the Engine gives.

    from engine import Panorama
    from engine.client import MimeticClient
    with MimeticClient("127.0.0.1:50051", token=None, tls=None) as client:
        for result in client.embed(Panorama(id=path, data=path) for path in paths):   # as Engine.embed_iter
            result.embeddings, result.pooled, result.readings, result.error
        client.embed_text(["a baroque church"])   # (T, D), as Engine.embed_text
        client.info()                             # Engine.info(), plus "server": limits, presets, labels

    async with AsyncMimeticClient(address) as client:   # the same API for asyncio
        async for result in client.embed(panoramas): ...

``embed`` streams: it reads the caller's panoramas lazily and keeps at most the server's in-flight
limit (or ``max_in_flight``) of them between sending and handing back their results, so memory
stays flat however long the input is. Results come back in input order, as ``Engine.embed_iter``
gives them (``ordered=False``: as they arrive). A bad item comes back with ``error`` set, the same
message the Engine gives, and the rest go on. Embeddings cross the wire as float16 and are handed
back in the server engine's dtype (float32 from a CPU server, float16 from a CUDA one, as locally).

Retries: a call that fails with UNAVAILABLE (no server yet, a restart, a server that drains) is
tried again with exponential backoff, up to ``retries`` times. For ``embed`` the new stream sends
again exactly the requests that had no answer, so nothing is lost and nothing comes back twice.
Any other status is raised at once, as ``grpc.RpcError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from engine import wire
from engine.decode import DecodeError, decode_image
from engine.pipeline import EmbedResult, Panorama, read_bytes
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.server_config import DEFAULT_MAX_MESSAGE_BYTES
from engine.views import view_set
from kernels import ViewSpec

_END = object()
_DONE = object()


@dataclass
class ThumbnailedResult(EmbedResult):
    """An EmbedResult with ``thumbnails``: a JPEG per view, when ``embed(..., outputs=[..., "thumbnails"])``."""

    thumbnails: list[bytes] = field(default_factory=list)


def _credentials(tls) -> grpc.ChannelCredentials | None:
    """``tls``: None or False (plaintext), True (the system's roots), a PEM path or PEM bytes (a CA to trust)."""
    if tls is None or tls is False:
        return None
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, (str, os.PathLike)):
        with open(tls, "rb") as stream:
            tls = stream.read()
    return grpc.ssl_channel_credentials(root_certificates=bytes(tls))


class AsyncMimeticClient:
    """asyncio client of one server. ``token``: a bearer token; ``tls``: see ``_credentials``."""

    def __init__(
        self, address: str, token: str | None = None, tls=None, *, retries: int = 5, backoff_s: float = 0.1,
        max_backoff_s: float = 5.0, max_in_flight: int | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        timeout_s: float | None = None,
    ):
        self.address = address
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_in_flight = max_in_flight
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s  # for the unary calls
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]
        credentials = _credentials(tls)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.MimeticStub(self._channel)
        self._info: pb.Info | None = None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncMimeticClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def backoff(self, attempt: int) -> float:
        """Seconds before try ``attempt + 1``: exponential, capped, with jitter so that clients spread out."""
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    async def _unary(self, method, request):
        attempt = 0
        while True:
            try:
                return await method(request, metadata=self.metadata, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
                    raise
            await asyncio.sleep(self.backoff(attempt))
            attempt += 1

    async def _server_info(self) -> pb.Info:
        if self._info is None:
            self._info = await self._unary(self._stub.GetInfo, pb.GetInfoRequest())
        return self._info

    async def info(self) -> dict:
        """``Engine.info()`` of the server's engine, plus ``"server"``: limits, view presets, labels, dream."""
        self._info = None  # always fresh: the caller asked
        return wire.info_from_proto(await self._server_info())

    async def embed_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) L2-normalised text embeddings, in the server engine's dtype, as ``Engine.embed_text``."""
        if not texts:
            raise ValueError("embed_text needs at least one text")
        info = await self._server_info()
        response = await self._unary(self._stub.EmbedText, pb.EmbedTextRequest(texts=list(texts)))
        return wire.tensor_from_proto(response.embeddings, getattr(torch, info.dtype))

    async def embed(
        self, panoramas: Iterable[Panorama] | AsyncIterable[Panorama], *, ordered: bool = True, views=None,
        vocabularies: list[str] | None = None, top_k: int | None = None, outputs: list[str] | None = None,
        thumbnail_size: int | None = None, item_timeout_s: float | None = None,
    ) -> AsyncIterator[EmbedResult]:
        """Stream ``panoramas`` to the server; yield an EmbedResult for each (input order unless ``ordered=False``).

        ``views``: a preset name or a list of ViewSpec/dicts (default: the server's); ``vocabularies``:
        a subset of the server's; ``top_k``: at most the server's; ``outputs``: some of "view_embeddings",
        "pooled", "readings", "thumbnails" (default the first three); ``item_timeout_s``: drop an item
        (DEADLINE_EXCEEDED) that has not reached the model this long after the server read it.
        """
        info = await self._server_info()
        template = pb.EmbedRequest(vocabularies=vocabularies or [], top_k=top_k or 0, thumbnail_size=thumbnail_size or 0)
        if item_timeout_s is not None:
            template.timeout_ms = max(1, round(item_timeout_s * 1e3))
        try:
            template.outputs.extend(wire.OUTPUTS[name] for name in outputs or ())
        except KeyError as exc:
            raise ValueError(f"unknown output {exc}; choose from {sorted(wire.OUTPUTS)}") from None
        height, width = info.clip.image_size
        if views is None:
            failure_views = [wire.view_from_proto(v) for v in info.views]
        elif isinstance(views, str):
            template.view_preset = views
            failure_views = [ViewSpec(v.yaw, v.pitch, v.roll, v.fov, width, height) for v in view_set(views, size=width)]
        else:
            specs = [v if isinstance(v, ViewSpec) else ViewSpec(**{**v, "width": width, "height": height}) for v in views]
            template.views.views.extend(pb.View(yaw=v.yaw, pitch=v.pitch, roll=v.roll, fov=v.fov) for v in specs)
            failure_views = [ViewSpec(v.yaw, v.pitch, v.roll, v.fov, width, height) for v in specs]
        stream = _EmbedStream(
            self, panoramas, template, window=self.max_in_flight or info.limits.max_in_flight,
            max_bytes=min(self.max_message_bytes, info.limits.max_message_bytes), dtype=getattr(torch, info.dtype),
            failure_views=failure_views, thumbnails=pb.OUTPUT_THUMBNAILS in template.outputs,
        )
        async for result in stream.results(ordered):
            yield result


class _EmbedStream:
    """One ``embed`` call: a writer that sends while a slot is free, a reader that matches answers by
    request_id, and a supervisor that opens a new stream after UNAVAILABLE and sends the unanswered again.

    A slot is taken before a panorama is pulled from the caller's iterable and given back when its
    result has been handed to the caller, so at most ``window`` panoramas are held here at any time.
    """

    def __init__(self, client: AsyncMimeticClient, source, template, *, window, max_bytes, dtype, failure_views, thumbnails):
        self.client = client
        self.source = source
        self.template = template
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.failure_views = failure_views
        self.thumbnails = thumbnails
        self.slots = asyncio.Semaphore(window)
        self.pending: dict[str, tuple[int, Panorama, pb.EmbedRequest]] = {}  # sent, not answered: by request_id
        self.arrivals: asyncio.Queue = asyncio.Queue()  # (seq, result), an exception, or _DONE; each result holds a slot
        self.next_seq = 0
        self.exhausted = False
        self._iterator = None
        self._pulling: asyncio.Future | None = None

    async def results(self, ordered: bool) -> AsyncIterator[EmbedResult]:
        supervisor = asyncio.create_task(self._supervise())
        waiting: dict[int, EmbedResult] = {}
        next_out = 0
        try:
            while (entry := await self.arrivals.get()) is not _DONE:
                if isinstance(entry, BaseException):
                    raise entry
                seq, result = entry
                if not ordered:
                    yield result
                    self.slots.release()
                    continue
                waiting[seq] = result
                while next_out in waiting:
                    yield waiting.pop(next_out)
                    next_out += 1
                    self.slots.release()
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor

    async def _next(self):
        """The next (seq, panorama, request or failed result), or _END. Shielded: a pull cut short by a
        retry is not lost, the next writer awaits the same one, since the caller's iterator cannot take
        an item back."""
        if self._pulling is None:
            self._pulling = asyncio.ensure_future(self._produce())
        pulling = self._pulling
        try:
            return await asyncio.shield(pulling)
        finally:
            if pulling.done():
                self._pulling = None

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
            return seq, panorama, self._failed(panorama, exc)

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
        attempt = 0
        try:
            while True:
                call = self.client._stub.Embed(metadata=self.client.metadata)
                writer = asyncio.create_task(self._write(call))
                try:
                    async for response in call:
                        attempt = 0
                        self._arrived(response)
                    if self.pending or not self.exhausted:
                        raise RuntimeError(f"the server ended the stream early ({len(self.pending)} requests unanswered)")
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    if self.exhausted and not self.pending:
                        break  # everything was answered before the server went away
                    if attempt >= self.client.retries:
                        raise
                finally:
                    writer.cancel()
                    call.cancel()
                await asyncio.sleep(self.client.backoff(attempt))
                attempt += 1
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
                if isinstance(request, EmbedResult):  # failed before it could be sent
                    self.arrivals.put_nowait((seq, request))
                    continue
                self.pending[request.request_id] = (seq, panorama, request)
                await call.write(request)
            await call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            return  # the call ended; the reader has its status
        except Exception as exc:  # not to be left hanging: the caller sees it
            self.arrivals.put_nowait(exc)

    def _request(self, panorama: Panorama, seq: int) -> pb.EmbedRequest:
        if not isinstance(panorama, Panorama):
            raise TypeError(f"expected a Panorama, got {type(panorama).__name__}")
        if not isinstance(panorama.id, str) or not panorama.id:
            raise ValueError(f"panorama id must be a non-empty string, got {panorama.id!r}")
        request = pb.EmbedRequest()
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

    def _failed(self, panorama, exc: Exception) -> EmbedResult:
        item_id = getattr(panorama, "id", None)
        message = str(exc) if isinstance(exc, DecodeError) else f"{item_id}: {exc}"
        meta = getattr(panorama, "meta", None)
        return EmbedResult(id=str(item_id), views=self.failure_views, meta=meta if isinstance(meta, dict) else {}, error=message)

    def _arrived(self, response: pb.EmbedResponse) -> None:
        entry = self.pending.pop(response.request_id, None)
        if entry is None:
            raise RuntimeError(f"the server answered request_id {response.request_id!r}, which was not in flight")
        seq, panorama, _ = entry
        result = wire.result_from_response(response, dtype=self.dtype, views=self.failure_views)
        result.id, result.meta = panorama.id, panorama.meta  # the caller's own objects, as the Engine gives them back
        if self.thumbnails and result.error is None:
            result = ThumbnailedResult(**vars(result), thumbnails=list(response.thumbnails))
        self.arrivals.put_nowait((seq, result))


class MimeticClient:
    """The blocking client: ``AsyncMimeticClient`` on a private event loop in a daemon thread."""

    def __init__(self, address: str, token: str | None = None, tls=None, **options):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mimetic-client", daemon=True)
        self._thread.start()

        async def make():  # the aio channel belongs to the loop it is made on
            return AsyncMimeticClient(address, token, tls, **options)

        self._client = self._run(make())
        self.address = address

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def info(self) -> dict:
        return self._run(self._client.info())

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return self._run(self._client.embed_text(texts))

    def embed(self, panoramas: Iterable[Panorama], **options) -> Iterator[EmbedResult]:
        """As ``AsyncMimeticClient.embed``; stopping the iteration early cancels the stream."""
        results = self._client.embed(panoramas, **options)

        async def next_result():
            return await anext(results, _END)

        try:
            while (result := self._run(next_result())) is not _END:
                yield result
        finally:
            self._run(results.aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> MimeticClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
