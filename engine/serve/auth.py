"""The gRPC server's interceptors: the bearer token, every call's end, and the bounds on calls."""

from __future__ import annotations

import asyncio
import hmac
import inspect
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2

from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.serve.config import RETRY_LATER
from engine.serve.metrics import Metrics

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Mimetic"].full_name  # "mimetic.v1.Mimetic"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # "grpc.health.v1.Health"
_STREAMS = ("Embed", "Dream", "Caption")  # the calls max_streams counts


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
    """At most ``limit`` calls at once other than Embed, Dream and Caption streams (bounded by the service) and health
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
                trailing_metadata=(RETRY_LATER,),
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
