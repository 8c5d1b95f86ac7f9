"""The Python client of ``mimetic serve``: remote results are the same EmbedResult objects the Engine gives.

    from engine import Panorama
    from engine.serve.client import MimeticClient
    with MimeticClient("127.0.0.1:50051", token=None, tls=None) as client:
        for result in client.embed(Panorama(id=path, data=path) for path in paths):   # as Engine.embed_iter
            result.embeddings, result.pooled, result.readings, result.error
        client.embed_text(["a baroque church"])   # (T, D), as Engine.embed_text
        client.info()                             # Engine.info(), plus "server": limits, presets, labels

        client.dream(panoramas, DreamParams(prompt="a street"))   # DreamResult, as engine.dream.dream.dream_iter
        client.caption(panoramas, flavours=["styles"])             # Captioned, as engine.dream.interrogate.interrogate

    async with AsyncMimeticClient(address) as client:   # the same API for asyncio
        async for result in client.embed(panoramas): ...

``embed`` streams: it reads the caller's panoramas lazily and keeps at most the server's in-flight
limit (or ``max_in_flight``) of them between sending and handing back their results, so memory
stays flat however long the input is. Results come back in input order, as ``Engine.embed_iter``
gives them (``ordered=False``: as they arrive). A bad item comes back with ``error`` set, the same
message the Engine gives, and the rest go on. Embeddings cross the wire as float16 and are handed
back in the server engine's dtype (float32 from a CPU server, float16 from a CUDA one, as locally).

Settings are checked when ``embed`` is called, before any request goes out: a view preset typo
(``views="rign8"``), an unknown output, a negative ``top_k`` or a bad view is a ``ValueError`` naming
the value; the blocking client also checks vocabularies, ``top_k`` and the view count against the
server's info there. A setting error is one error, not one failure per panorama.

Retries: a call that fails with UNAVAILABLE (no server yet, a restart, a server that drains), or with a
RESOURCE_EXHAUSTED the server marks as passing (its ``--max-streams`` are all open), is tried again after an exponential backoff with jitter (``backoff_s``, doubling, each wait capped at
``max_backoff_s`` and drawn from its upper half so that clients spread out) for as long as the server
has been silent for less than ``retry_budget_s`` (default 60 s; ``retries`` may cap the number of
retries too). The budget counts from the first failure and starts afresh with each answer, so a long
stream survives any number of restarts, each shorter than the budget. For ``embed`` the new stream
sends again exactly the requests that had no answer, in input order: an answer that reached the
client is never asked for again and no request is dropped, so every input gets one result.

When the budget runs out the call raises ``ServerUnavailableError``, a ``grpc.RpcError`` with code
UNAVAILABLE, with one line saying how long it waited. For ``embed`` it is raised where the caller
iterates, after every result that had come back: in input order these are exactly the first
``error.delivered`` inputs, and ``error.unanswered`` lists the ids of the items read from the input
that have no result. One exception, rather than an error result per item: the items not yet read
from the input cannot have a result either, and a stream that ended with per-item errors would look
like a batch that went on. Any other status is raised at once, as ``grpc.RpcError`` (a message over the
size limit, say, whose RESOURCE_EXHAUSTED is grpc core's and carries no such mark).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import grpc
import torch

from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.proto.mimetic.v1 import mimetic_pb2_grpc as pb_grpc
from engine.serve import wire
from engine.serve.config import DEFAULT_MAX_MESSAGE_BYTES
from engine.serve.remote import caption_template, check_dream, check_views, dream_template, failed_caption, failed_dream
from engine.serve.streaming import _END, RequestStream, ServerUnavailableError, _Outage, _retryable
from engine.types import EmbedResult, Panorama, error_message, item_meta

if TYPE_CHECKING:
    from engine.dream.dream import DreamResult
    from engine.dream.interrogate import Captioned
    from engine.dream.params import DreamParams
from engine.views import DEFAULT_SIZE, view_set
from kernels import ViewSpec

# Thumbnails (a JPEG per view, with ``embed(..., outputs=[..., "thumbnails"])``) are an EmbedResult field,
# as the Engine gives them; the name stays for callers that used it.
ThumbnailedResult = EmbedResult


def _check_seconds(name: str, value, *, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be a finite number of seconds {'>= 0' if zero else '> 0'}, got {value!r}")


def _check_settings(views, outputs, top_k, item_timeout_s) -> None:
    """The request settings that need no server, checked when ``embed`` is called: one clear ValueError."""
    if views is not None:
        # A preset by name (the error lists them), or a list of views under the ViewSpec rules; a dict's
        # size is the server's model input, so only its angles are checked here.
        view_set(views if isinstance(views, str) else [
            {**v, "width": DEFAULT_SIZE, "height": DEFAULT_SIZE} if isinstance(v, Mapping) else v for v in views
        ])
    unknown = [name for name in outputs or () if name not in wire.OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output {unknown[0]!r}; choose from {', '.join(wire.OUTPUTS)}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
    if item_timeout_s is not None:
        _check_seconds("item_timeout_s", item_timeout_s)


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
    """asyncio client of one server. ``token``: a bearer token; ``tls``: see ``_credentials``.

    ``retry_budget_s``: how long the server may stay silent before a call gives up; ``backoff_s`` and
    ``max_backoff_s``: the first wait between tries and the cap on each; ``retries``: an optional cap on
    the number of retries after one outage (None: the budget alone). See the module's "Retries".
    """

    def __init__(
        self, address: str, token: str | None = None, tls=None, *, retry_budget_s: float = 60.0, retries: int | None = None,
        backoff_s: float = 0.1, max_backoff_s: float = 5.0, max_in_flight: int | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, timeout_s: float | None = None,
    ):
        _check_seconds("retry_budget_s", retry_budget_s, zero=True)
        _check_seconds("backoff_s", backoff_s)
        _check_seconds("max_backoff_s", max_backoff_s)
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
            raise ValueError(f"retries must be a whole number >= 0 or None, got {retries!r}")
        self.address = address
        self.retry_budget_s = float(retry_budget_s)
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_in_flight = max_in_flight
        self.max_message_bytes = max_message_bytes
        self.timeout_s = timeout_s  # for the unary calls
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes),
            # grpc's own reconnection follows the same schedule: its default grows to 120 s between
            # attempts, which would leave a server that came back unseen for most of the budget.
            ("grpc.initial_reconnect_backoff_ms", max(1, round(backoff_s * 1e3))),
            ("grpc.max_reconnect_backoff_ms", max(1, round(max_backoff_s * 1e3))),
        ]
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
        outage = None
        while True:
            try:
                return await method(request, metadata=self.metadata, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                failure = exc
            outage = outage or _Outage()
            await self._retry_or_raise(outage, failure)

    async def _retry_or_raise(self, outage: _Outage, failure: grpc.RpcError) -> None:
        """After a failed try: wait for the next, or raise (another status, or the budget is spent)."""
        if not _retryable(failure):
            raise failure
        if self.retries is not None and outage.attempt >= self.retries:
            raise ServerUnavailableError(self.address, outage.waited(), f"{self.retries} retries", failure)
        budget = f"the retry budget of {self.retry_budget_s:g} s is spent"
        left = self.retry_budget_s - outage.waited()
        if left <= 0:
            raise ServerUnavailableError(self.address, outage.waited(), budget, failure)
        await asyncio.sleep(min(self.backoff(outage.attempt), left))
        outage.attempt += 1
        # Connect within what is left of the budget: a call started before the connection is up waits
        # for it (a host that drops packets: 20 s and more), and the budget would not be a bound.
        if self._channel.get_state(try_to_connect=True) != grpc.ChannelConnectivity.READY:
            try:
                await asyncio.wait_for(self._channel.channel_ready(), max(0.0, self.retry_budget_s - outage.waited()))
            except asyncio.TimeoutError:
                raise ServerUnavailableError(self.address, outage.waited(), budget, failure) from None

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
        return wire.tensor_from_proto(response.embeddings, getattr(torch, info.embedding_dtype or info.dtype))

    def embed(
        self, panoramas: Iterable[Panorama] | AsyncIterable[Panorama], *, ordered: bool = True, views=None,
        vocabularies: list[str] | None = None, top_k: int | None = None, outputs: list[str] | None = None,
        thumbnail_size: int | None = None, item_timeout_s: float | None = None,
    ) -> AsyncIterator[EmbedResult]:
        """Stream ``panoramas`` to the server; yield an EmbedResult for each (input order unless ``ordered=False``).

        ``views``: a preset name or a list of ViewSpec/dicts (default: the server's); ``vocabularies``:
        a subset of the server's; ``top_k``: at most the server's; ``outputs``: some of "view_embeddings",
        "pooled", "readings", "thumbnails" (default the first three); ``item_timeout_s``: drop an item
        (DEADLINE_EXCEEDED) that has not reached the model this long after the server read it.
        Settings that need no server are checked here, at the call (ValueError); the rest against the
        server's info before the stream opens.
        """
        settings = dict(views=views, vocabularies=vocabularies, top_k=top_k, outputs=outputs, thumbnail_size=thumbnail_size,
                        item_timeout_s=item_timeout_s)
        _check_settings(views, outputs, top_k, item_timeout_s)
        return self._embed(panoramas, ordered, settings)

    async def _embed(self, panoramas, ordered: bool, settings: dict) -> AsyncIterator[EmbedResult]:
        stream = await self._stream(panoramas, **settings)
        async for result in stream.results(ordered):
            yield result

    async def _stream(
        self, panoramas, *, views=None, vocabularies=None, top_k=None, outputs=None, thumbnail_size=None, item_timeout_s=None,
    ) -> RequestStream:
        """An ``embed`` call's stream, not yet open: the request template, checked against the server's info."""
        _check_settings(views, outputs, top_k, item_timeout_s)
        info = await self._server_info()
        known = [v.name for v in info.vocabularies]
        unknown = [name for name in vocabularies or () if name not in known]
        if unknown:
            raise ValueError(f"unknown vocabularies {unknown}; this server reads {', '.join(known) or 'none'}")
        if top_k and top_k > info.top_k:
            raise ValueError(f"top_k {top_k} is over the server's top_k of {info.top_k}")
        template = pb.EmbedRequest(vocabularies=vocabularies or [], top_k=top_k or 0, thumbnail_size=thumbnail_size or 0)
        if item_timeout_s is not None:
            template.timeout_ms = max(1, round(item_timeout_s * 1e3))
        template.outputs.extend(wire.OUTPUTS[name] for name in outputs or ())
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
        if info.limits.max_views and len(failure_views) > info.limits.max_views:
            raise ValueError(f"{len(failure_views)} views, over the server's limit of {info.limits.max_views} per panorama")
        if pb.OUTPUT_THUMBNAILS in template.outputs and info.limits.max_thumbnail_size and (thumbnail_size or 0) > info.limits.max_thumbnail_size:
            raise ValueError(f"thumbnail_size {thumbnail_size} is over the server's limit of {info.limits.max_thumbnail_size}")
        dtype = getattr(torch, info.embedding_dtype or info.dtype)

        def failed(panorama, exc: Exception) -> EmbedResult:  # as the Engine answers an item that fails its checks
            return EmbedResult(id=str(getattr(panorama, "id", None)), views=failure_views, meta=item_meta(panorama),
                               error=error_message(panorama, exc))

        return self._request_stream(panoramas, template, info, self._stub.Embed, failed,
                                    lambda response: wire.result_from_response(response, dtype=dtype, views=failure_views))

    def _request_stream(self, panoramas, template, info: pb.Info, method, failed, convert) -> RequestStream:
        return RequestStream(self, panoramas, template, window=self.max_in_flight or info.limits.max_in_flight,
                             max_bytes=min(self.max_message_bytes, info.limits.max_message_bytes), method=method,
                             convert=convert, failed=failed)

    # -- Dream and Caption --------------------------------------------------------------------

    def dream(self, panoramas: Iterable[Panorama] | AsyncIterable[Panorama], params: DreamParams, *, views=None,
              ordered: bool = True, item_timeout_s: float | None = None) -> AsyncIterator[DreamResult]:
        """Dream every view of every panorama on the server: a ``DreamResult`` for each, as
        ``engine.dream.dream.dream_iter`` gives them (input order unless ``ordered=False``), with the same
        streaming, per-item errors and retries as ``embed``.

        ``params`` is the ``DreamParams`` of ``mimetic dream``; its ``from_labels`` name the server's
        vocabularies and its ``batch_size`` is the server's to choose. ``views``: a preset name or a list of
        views (default: the server's). The parameters are checked here, at the call (ValueError).
        """
        check_dream(params)
        check_views(views)
        if item_timeout_s is not None:
            _check_seconds("item_timeout_s", item_timeout_s)
        return self._results(self._dream_stream(panoramas, params, views, item_timeout_s), ordered)

    async def _dream_stream(self, panoramas, params, views, item_timeout_s) -> RequestStream:
        info = await self._server_info()
        template = dream_template(info, params, views, item_timeout_s)
        return self._request_stream(panoramas, template, info, self._stub.Dream, failed_dream, wire.dream_result_from_response)

    def caption(self, panoramas: Iterable[Panorama] | AsyncIterable[Panorama], *, flavours: list[str] | None = None, views=None,
                beams: int | None = None, max_tokens: int | None = None, ordered: bool = True,
                item_timeout_s: float | None = None) -> AsyncIterator[Captioned]:
        """Caption every view of every panorama on the server: a ``Captioned`` for each, as
        ``engine.dream.interrogate.interrogate`` gives them, with ``embed``'s streaming, errors and retries.

        ``flavours``: some of the server's vocabularies, in prompt order (default: all of them); ``beams``
        and ``max_tokens``: at most the server's (default: the server's). Checked here, at the call.
        """
        check_views(views)
        if item_timeout_s is not None:
            _check_seconds("item_timeout_s", item_timeout_s)
        return self._results(self._caption_stream(panoramas, flavours, views, beams, max_tokens, item_timeout_s), ordered)

    async def _caption_stream(self, panoramas, flavours, views, beams, max_tokens, item_timeout_s) -> RequestStream:
        info = await self._server_info()
        template = caption_template(info, flavours, beams, max_tokens, views, item_timeout_s)
        dtype = getattr(torch, info.embedding_dtype or info.dtype)
        return self._request_stream(panoramas, template, info, self._stub.Caption, failed_caption,
                                    lambda response: wire.captioned_from_response(response, dtype))

    async def _results(self, opening, ordered: bool) -> AsyncIterator:
        stream = await opening
        async for result in stream.results(ordered):
            yield result


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

    def embed(self, panoramas: Iterable[Panorama], *, ordered: bool = True, **settings) -> Iterator[EmbedResult]:
        """As ``AsyncMimeticClient.embed``; every setting is checked here, at the call, against the server's
        info too (a ValueError before any panorama is read). Stopping the iteration early cancels the stream."""
        stream = self._run(self._client._stream(panoramas, **settings))
        return self._iterate(stream.results(ordered))

    def dream(self, panoramas: Iterable[Panorama], params: DreamParams, *, views=None, ordered: bool = True,
              item_timeout_s: float | None = None) -> Iterator[DreamResult]:
        """As ``AsyncMimeticClient.dream``; checked here, at the call, against the server's info too."""
        check_dream(params)
        check_views(views)
        stream = self._run(self._client._dream_stream(panoramas, params, views, item_timeout_s))
        return self._iterate(stream.results(ordered))

    def caption(self, panoramas: Iterable[Panorama], *, flavours: list[str] | None = None, views=None, beams: int | None = None,
                max_tokens: int | None = None, ordered: bool = True, item_timeout_s: float | None = None) -> Iterator[Captioned]:
        """As ``AsyncMimeticClient.caption``; checked here, at the call, against the server's info too."""
        check_views(views)
        stream = self._run(self._client._caption_stream(panoramas, flavours, views, beams, max_tokens, item_timeout_s))
        return self._iterate(stream.results(ordered))

    def _iterate(self, results) -> Iterator[EmbedResult]:
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
