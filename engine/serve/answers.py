"""The gRPC service's answers to Embed, Dream and Caption items (see ``engine.serve.service``)."""

from __future__ import annotations

import time

from google.rpc import code_pb2, status_pb2

from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.serve import wire
from engine.serve.stream import Item, Stream
from engine.types import EmbedResult


def _status(code: int, message: str = "") -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message)


class Answers:
    """``MimeticService``'s answers to Embed, Dream and Caption items, on the event loop (a mixin: it uses the
    service's ``holds``, ``metrics``, ``config`` and ``kinds``)."""

    # -- answers (on the event loop) -------------------------------------------------------------

    def _answer(self, stream, request, item_id, read_at, code, message, item: Item | None = None) -> None:
        total_s = time.monotonic() - read_at
        response = self.kinds[stream.method].response(request_id=request.request_id, id=item_id, status=_status(code, message))
        response.meta.CopyFrom(request.meta)
        if isinstance(response, pb.EmbedResponse):
            response.timings.total_ms = 1e3 * total_s
        else:
            response.timings_ms["total"] = 1e3 * total_s
        self._send(stream, response, item, total_s)

    def _send(self, stream: Stream, response, item: Item | None, total_s: float) -> None:
        if item is not None:
            self.holds.release(item)  # answered (or its stream is gone): its image is no longer needed
            if item.finished:
                return
            item.finished = True
            item.prepared = None  # its image: gone with its answer
            stream.items.pop(item.request_id, None)
        if stream.ended:  # cut: nobody will write this any more
            return
        self.metrics.requests.labels(stream.method, code_pb2.Code.Name(response.status.code)).inc()
        self.metrics.stage_seconds.labels("total").observe(total_s)
        stream.unanswered -= 1
        stream.responses.put_nowait(response)
        stream.maybe_end()

    def _on_error(self, item: Item, code: int, message: str) -> None:
        self._answer(item.stream, item.request, item.item_id, item.read_at, code, message, item)

    def _on_result(self, item: Item, result, stats: dict, done_at: float) -> None:
        if item.finished:
            self.holds.release(item)
            return
        try:
            response = self.kinds[item.stream.method].respond(item, result, stats, done_at)
            if response is None:  # the model's own per-item failure: answered already
                return
            self._observe(item, stats, done_at)
            if response.ByteSize() > self.config.max_message_bytes:
                self._on_error(
                    item, code_pb2.RESOURCE_EXHAUSTED,
                    f"{item.item_id}: the response is {response.ByteSize():,} bytes, over the message limit of "
                    f"{self.config.max_message_bytes:,}; {self.kinds[item.stream.method].smaller}",
                )
                return
            self._send(item.stream, response, item, time.monotonic() - item.read_at)
        except Exception as exc:  # every item read gets an answer, whatever happens here
            self._on_error(item, code_pb2.INTERNAL, f"{item.item_id}: the server failed on its result ({type(exc).__name__}: {exc})")

    def _observe(self, item: Item, stats: dict, done_at: float) -> None:
        queue_s, engine_s = stats["started"] - item.queued_at, done_at - stats["started"]
        for stage, seconds in (("decode", item.decode_s), ("queue", queue_s), ("engine", engine_s)):
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.queue_seconds.observe(queue_s)

    def _embed_response(self, item: Item, result: EmbedResult, stats: dict, done_at: float) -> pb.EmbedResponse | None:
        if result.error is not None:  # the Engine's per-item failures are the input's (e.g. an nvJPEG decode)
            self._on_error(item, code_pb2.INVALID_ARGUMENT, result.error)
            return None
        request = item.request
        response = pb.EmbedResponse(request_id=item.request_id, id=item.item_id, status=_status(code_pb2.OK))
        response.views.extend(wire.view_to_proto(v) for v in result.views)
        if pb.OUTPUT_VIEW_EMBEDDINGS in item.outputs:
            response.embeddings.CopyFrom(wire.tensor_to_proto(result.embeddings))
        if pb.OUTPUT_POOLED in item.outputs:
            response.pooled.CopyFrom(wire.tensor_to_proto(result.pooled))
        if pb.OUTPUT_READINGS in item.outputs:
            response.readings.extend(wire.readings_to_proto(result.readings, item.vocabularies, item.top_k))
        response.thumbnails.extend(result.thumbnails)
        response.meta.CopyFrom(request.meta)
        queue_s, engine_s = stats["started"] - item.queued_at, done_at - stats["started"]
        timings = response.timings
        timings.decode_ms, timings.queue_ms, timings.engine_ms = 1e3 * item.decode_s, 1e3 * queue_s, 1e3 * engine_s
        timings.total_ms = 1e3 * (time.monotonic() - item.read_at)
        timings.batch_items, timings.batch_views = stats["items"], stats["views"]
        return response


def timings_ms(item: Item, stats: dict, done_at: float) -> dict[str, float]:
    """Dream's and Caption's ``timings_ms``: milliseconds per stage, and the model call's size."""
    return {
        "decode": 1e3 * item.decode_s, "queue": 1e3 * (stats["started"] - item.queued_at), "model": 1e3 * (done_at - stats["started"]),
        "total": 1e3 * (time.monotonic() - item.read_at), "batch_items": stats["items"], "batch_views": stats["views"],
    }
