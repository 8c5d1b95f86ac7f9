"""One request on its way through the gRPC server: its item, its stream, and the bytes it holds."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from engine.budget import DecodeBudget, Reservation
from engine.pipeline import Engine
from engine.proto.mimetic.v1 import mimetic_pb2 as pb
from engine.serve import wire
from engine.types import Prepared

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
    engine: Engine | None = None  # the Engine, or the Engine with the request's views (Engine.with_views)
    vocabularies: tuple[str, ...] = ()
    top_k: int = 0
    outputs: frozenset = wire.DEFAULT_OUTPUTS
    thumbnail_size: int | None = None  # asked for thumbnails: their width
    prepared: Prepared | None = None  # what the Engine's input stage made of its image (then decoded)
    decode_s: float = 0.0
    queued_at: float = 0.0
    finished: bool = False  # answered, or its stream went away: later stages skip it
    hold: Reservation | None = None  # its bytes in the decode budget, from admission until it leaves (see _Holds)
    in_thread: bool = False  # a decode thread is working on it
    params: object = None  # Dream: its DreamParams; Caption: its CaptionSettings (engine.serve.generate)

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
    """One Embed, Dream or Caption call (``method``): its K slots, its items in flight (by request_id) and its
    responses to write."""

    def __init__(self, max_in_flight: int, method: str = "Embed"):
        self.method = method
        self.slots = asyncio.Semaphore(max_in_flight)
        self.held = 0  # slots taken: requests read whose response has not been written yet
        self.unanswered = 0  # requests read whose response has not been queued yet
        self.items: dict[str, Item] = {}  # by request_id, from the moment it is checked to its answer
        self.responses: asyncio.Queue = asyncio.Queue(max_in_flight + 1)  # + the end marker; never more
        self.reading = True
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
