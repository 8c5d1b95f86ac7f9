"""Dynamic batching across callers, deadline-aware: items from every stream -> one Engine, in batches.

    batcher = Batcher(loop, max_batch=256, max_delay_s=0.005, max_queue=512, metrics=metrics,
                      on_result=on_result, on_error=on_error, on_drop=on_drop)
    await batcher.put(item)      # on the event loop; waits while max_queue items are queued
    batcher.flush_now()          # draining: no more waiting for company
    batcher.close()              # after the last item: the worker thread ends (not waited for)

A single worker thread owns the Engine. It takes the next batch only when the Engine is free, so
under load a batch fills at once from what queued meanwhile (up to ``max_batch`` views), and when idle
the first item waits at most ``max_delay_s`` for company. That is the whole policy: no reordering,
first come first served across streams.

An item (``engine.serve.stream.Item``) has ``engine`` (the Engine, or the Engine with other views, from
``Engine.with_views``: one engine call per distinct one in a batch), ``prepared`` (its image through the
Engine's input stage, decoded: the Engine checks it no more), ``views`` (its view count), ``deadline``
(time.monotonic(), or None), ``finished`` (its stream went away), ``queued_at``, ``read_at`` and
``item_id``. Items that are finished, or whose deadline has passed, are dropped before the model, the
latter answered through ``on_error(item, DEADLINE_EXCEEDED, message)``, the former handed to
``on_drop(item)`` in the worker thread (so that what the item holds is given back). Results go back one
by one as the Engine yields them, through ``on_result(item, result, stats, done_at)`` on the event loop.
``metrics`` needs ``batch(items, views)``, ``embedded(views)`` and a ``queue_depth`` gauge.

The same batcher serves Dream and Caption with three hooks: ``key(item)``, which items may share a model
call (Embed: the same Engine); ``run(items)``, the model call on one group, yielding a result per item in
order (Embed: ``Engine.embed_iter``), where an ``ItemError`` stands for that item's own failure; and
``on_batch(items, views)`` / ``on_done(item)`` for the metrics (Embed: ``metrics.batch`` / ``embedded``).

The worker thread is a daemon and ``close`` does not wait for it: a batch still in the Engine when the
server stops must not hold the process past its grace period. What it yields after the event loop has
closed is dropped.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

from google.rpc import code_pb2

from engine.serve.stream import ItemError

_STOP = object()
_WAKE = object()  # ends a wait for company at once (draining)


class Batcher:
    """Items from every stream -> engine calls of at most ``max_batch`` views, in one worker thread (see above)."""

    def __init__(self, loop, *, max_batch: int, max_delay_s: float, max_queue: int, metrics, on_result, on_error, on_drop=None,
                 key=None, run=None, on_batch=None, on_done=None, name: str = "mimetic-engine"):
        self.loop = loop
        self._key = key or (lambda item: id(item.engine))
        self._run_group = run or _embed
        self._on_batch = on_batch or metrics.batch
        self._on_done = on_done or (lambda item: metrics.embedded(item.views))
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.capacity = asyncio.Semaphore(max_queue)  # the bound of the queue, awaited on the loop
        self.flush = threading.Event()  # set while draining: nobody waits for company any more
        self._queue: queue.Queue = queue.Queue()  # bounded by ``capacity``
        self._carry = None
        self._stopping = False
        self._metrics = metrics
        self._on_result = on_result
        self._on_error = on_error
        self._on_drop = on_drop
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    async def put(self, item) -> None:
        await self.capacity.acquire()
        item.queued_at = time.monotonic()
        self._metrics.queue_depth.inc()
        self._queue.put(item)

    def flush_now(self) -> None:
        """From now on (draining) batches go as soon as the queue is empty; a batch waiting for company goes now."""
        self.flush.set()
        self._queue.put(_WAKE)

    def close(self, timeout: float = 0.0) -> None:
        """The worker ends after what is queued (finished items are only dropped); wait ``timeout`` s for it at most."""
        self._queue.put(_STOP)
        if timeout:
            self._thread.join(timeout)

    # -- the worker thread --

    def _to_loop(self, callback, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: the server has stopped and nobody waits for this
            pass

    def _next(self, timeout: float | None):
        try:
            item = self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if item is _WAKE:
            return None
        if item is not _STOP:
            self._metrics.queue_depth.dec()
            self._to_loop(self.capacity.release)
        return item

    def _collect(self) -> list:
        batch = []
        views, opened = 0, 0.0
        while views < self.max_batch:
            if self._carry is not None:
                item, self._carry = self._carry, None
            elif self._stopping:
                break
            else:
                wait = None if not batch else 0.0 if self.flush.is_set() else opened + self.max_delay_s - time.monotonic()
                item = self._next(wait)
                if item is None:
                    break
                if item is _STOP:
                    self._stopping = True
                    break
            if not self._live(item):
                continue
            if batch and views + item.views > self.max_batch:
                self._carry = item  # first of the next batch
                break
            if not batch:
                opened = item.queued_at
            batch.append(item)
            views += item.views
        return batch

    def _live(self, item) -> bool:
        """False for an item to drop before the model: its stream went away, or its deadline passed (answered so)."""
        if item.finished:
            if self._on_drop is not None:
                self._on_drop(item)
            return False
        if item.deadline is not None and time.monotonic() > item.deadline:
            self._to_loop(
                self._on_error, item, code_pb2.DEADLINE_EXCEEDED,
                f"{item.item_id}: its deadline passed after {1e3 * (time.monotonic() - item.read_at):.0f} ms "
                "while queued; it was dropped before the model",
            )
            return False
        return True

    def _work(self) -> None:
        while True:
            batch = self._collect()
            if batch:
                self._run(batch)
            elif self._stopping and self._carry is None:
                return

    def _run(self, batch: list) -> None:
        batch = [item for item in batch if self._live(item)]  # again: the batch may have waited for company
        if not batch:
            return
        started = time.monotonic()
        views = sum(item.views for item in batch)
        self._on_batch(len(batch), views)
        stats = {"started": started, "items": len(batch), "views": views}
        groups: dict[object, list] = {}
        for item in batch:  # one model call per group (Embed: per view set); the usual case is one group
            groups.setdefault(self._key(item), []).append(item)
        for items in groups.values():
            done = 0
            try:
                for item, result in zip(items, self._run_group(items), strict=True):
                    done += 1
                    if isinstance(result, ItemError):
                        self._to_loop(self._on_error, item, result.code, str(result))
                        continue
                    if getattr(result, "error", None) is None:
                        self._on_done(item)
                    self._to_loop(self._on_result, item, result, stats, time.monotonic())
            except Exception as exc:  # the engine failed on the batch: its items fail, the server goes on
                for item in items[done:]:
                    self._to_loop(
                        self._on_error, item, code_pb2.INTERNAL,
                        f"{item.item_id}: the engine failed on its batch ({type(exc).__name__}: {exc})",
                    )


def _embed(items: list):
    """Embed's model call: the group's Engine (one view set) on its decoded items."""
    return items[0].engine.embed_iter([item.prepared for item in items])
