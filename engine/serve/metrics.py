"""The gRPC server's Prometheus metrics."""

from __future__ import annotations

import collections
import threading
import time

import prometheus_client

from engine.budget import DecodeBudget

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
    mimetic_queue_depth, mimetic_streams  items waiting for a batch; open Embed, Dream and Caption streams
    mimetic_decode_bytes                  decoded image bytes held in the budget; mimetic_decode_limit_bytes, the budget
    mimetic_dream_batch_views             images per diffusion call (histogram); mimetic_caption_batch_views, per captioner call
    mimetic_dream_step_seconds            seconds per denoising step of a diffusion call (the first: from the call's start)

    Dream and Caption items are counted in mimetic_requests_total under their method, by status code.
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
        self.streams = prometheus_client.Gauge("mimetic_streams", "Open Embed, Dream and Caption streams", registry=registry)
        self.decode_bytes = prometheus_client.Gauge("mimetic_decode_bytes", "Decoded image bytes held in the budget", registry=registry)
        self.decode_limit = prometheus_client.Gauge("mimetic_decode_limit_bytes", "The decoded-bytes budget", registry=registry)
        self.dream_batch_views = prometheus_client.Histogram(
            "mimetic_dream_batch_views", "Images per diffusion call (from every stream)", registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.caption_batch_views = prometheus_client.Histogram(
            "mimetic_caption_batch_views", "Views per captioner call (from every stream)", registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.dream_step_seconds = prometheus_client.Histogram(
            "mimetic_dream_step_seconds", "Seconds per denoising step of a diffusion call", registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
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
