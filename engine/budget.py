"""A budget of decoded-image bytes in flight, shared by everything that decodes for one Engine.

    budget = DecodeBudget(2 * 2**30)                       # the Engine's (EngineConfig.max_decode_mib)
    with budget.acquire(cost, item="rome/1.jpg") as held:  # blocks, first come first served
        pano = decode_image(...)
        held.shrink(pano.nbytes)                           # the decoder's scratch is gone
        ...                                                # released on exit (or held.release())
    held = await budget.acquire_async(cost, item=...)      # the same, from an event loop

Why: a compressed file says little about its decoded size. A 0.8 MB PNG of 23168 x 11584 is under
``max_pixels`` yet decodes to 768 MiB, so a per-item pixel limit cannot bound a server's memory:
six such items in one stream grew it by 9 GB. Every decode is admitted against this budget first,
with the cost read from the image's header (``engine.decode.decode_cost``), before a byte is
decoded; what it holds is given back once the decoded panorama has left the pipeline.

An item that can never fit (its cost alone is over the limit) is refused at once with
``BudgetExceededError``, an ``ImageTooLargeError`` (RESOURCE_EXHAUSTED on the wire). The others wait
their turn, in arrival order: a large item is not starved by a stream of small ones behind it.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections import deque

from engine.decode import ImageTooLargeError


class BudgetExceededError(ImageTooLargeError):
    """An item needs more decoded bytes than the whole budget."""


class Reservation:
    """Bytes held against a budget; ``shrink`` gives part back, ``release`` (or leaving a ``with``) the rest."""

    def __init__(self, budget: DecodeBudget, nbytes: int):
        self._budget = budget
        self.nbytes = nbytes

    def shrink(self, nbytes: int) -> None:
        """Hold only ``nbytes`` from now on (never more than already held)."""
        nbytes = max(0, int(nbytes))
        if nbytes < self.nbytes:
            freed, self.nbytes = self.nbytes - nbytes, nbytes
            self._budget._give_back(freed)

    def release(self) -> None:
        """Give everything back; calling it again does nothing."""
        self.shrink(0)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Waiter:
    """One item in line: how many bytes it needs and how to hand it its reservation."""

    def __init__(self, nbytes: int, granted):
        self.nbytes = nbytes
        self.granted = granted  # called with the Reservation, under the budget's lock


class DecodeBudget:
    """At most ``limit`` bytes of decoded images in flight; FIFO admission. Thread-safe, and awaitable
    from an event loop without tying up a thread per waiting item."""

    def __init__(self, limit: int):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise ValueError(f"the decode budget must be a positive number of bytes, got {limit!r}")
        self.limit = limit
        self.in_use = 0
        self.peak = 0  # the most held at once, for tests and metrics
        self._lock = threading.Lock()
        self._line: deque[_Waiter] = deque()  # in arrival order: only the first may take bytes

    @property
    def waiting(self) -> int:
        return len(self._line)

    def _check(self, nbytes: int, item: str) -> int:
        nbytes = max(0, int(nbytes))
        if nbytes > self.limit:
            raise BudgetExceededError(
                item,
                f"decoding it needs {nbytes / 2**20:,.0f} MiB, over the decode budget of {self.limit / 2**20:,.0f} MiB "
                "(max_decode_mib, --max-decode-mib); it can never fit",
            )
        return nbytes

    def _take(self, nbytes: int) -> Reservation:
        self.in_use += nbytes
        self.peak = max(self.peak, self.in_use)
        return Reservation(self, nbytes)

    def _serve_line(self) -> None:
        """Under the lock: admit waiters from the head of the line while they fit."""
        while self._line and self.in_use + self._line[0].nbytes <= self.limit:
            waiter = self._line.popleft()
            reservation = self._take(waiter.nbytes)
            try:
                waiter.granted(reservation)
            except RuntimeError:  # its event loop is closed: nobody will use or release these bytes
                self.in_use -= reservation.nbytes
                reservation.nbytes = 0

    def try_acquire(self, nbytes: int, *, item: str) -> Reservation | None:
        """Take ``nbytes`` now if they are free and nobody is waiting ahead; else None."""
        nbytes = self._check(nbytes, item)
        with self._lock:
            if not self._line and self.in_use + nbytes <= self.limit:
                return self._take(nbytes)
        return None

    def acquire(self, nbytes: int, *, item: str, timeout: float | None = None) -> Reservation:
        """Wait (first come, first served) until ``nbytes`` are free and take them.

        Raises ``BudgetExceededError`` at once if ``nbytes`` is over the whole limit, and
        ``TimeoutError`` if ``timeout`` seconds pass first.
        """
        nbytes = self._check(nbytes, item)
        granted: list[Reservation] = []
        ready = threading.Event()
        waiter = _Waiter(nbytes, lambda reservation: (granted.append(reservation), ready.set()))
        with self._lock:
            self._line.append(waiter)
            self._serve_line()
        if not ready.wait(timeout):
            with self._lock:
                if not granted:
                    self._line.remove(waiter)
                    self._serve_line()  # those behind it may fit now
                    raise TimeoutError(f"{item}: no room in the decode budget within {timeout} s")
        return granted[0]

    async def acquire_async(self, nbytes: int, *, item: str) -> Reservation:
        """``acquire`` for an event loop. A cancelled wait leaves the line, or gives back what it was granted."""
        nbytes = self._check(nbytes, item)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def deliver(reservation: Reservation) -> None:  # on the loop
            if future.cancelled():
                reservation.release()
            else:
                future.set_result(reservation)

        waiter = _Waiter(nbytes, lambda reservation: loop.call_soon_threadsafe(deliver, reservation))
        with self._lock:
            self._line.append(waiter)
            self._serve_line()
        try:
            return await future
        except asyncio.CancelledError:
            with self._lock:
                if waiter in self._line:
                    self._line.remove(waiter)
                    self._serve_line()
            if future.done() and not future.cancelled():  # granted just before the cancellation landed
                future.result().release()
            raise

    def _give_back(self, nbytes: int) -> None:
        with self._lock:
            self.in_use -= nbytes
            self._serve_line()


def give_freed_images_back_to_the_os(threshold: int = 4 * 2**20) -> bool:
    """Make glibc put every allocation of ``threshold`` bytes or more in a mapping of its own, returned to
    the OS when it is freed. Process-wide, for a process that decodes many images (``mimetic serve`` and ``mimetic ingest`` call it).

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB) and serves
    smaller blocks from the allocating thread's own heap, which keeps them once freed: a decode's scratch
    (PIL's 16 MiB blocks, 8 MiB strips) then stays resident in each decode thread's heap after its item is
    gone, ~150 MiB per thread for a 32 MP panorama, so peak memory grew with the number of decode threads
    rather than with what the decode budget admits (measured: 547 MiB for a 300 MiB budget, 4 threads).
    Returns False where there is no glibc (nothing to tune).
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
