"""Worker threads for the gRPC server that never hold the process's exit."""

from __future__ import annotations

import concurrent.futures
import queue
import threading

# -- worker threads that never hold the process's exit --------------------------------------------


class DaemonPool(concurrent.futures.Executor):
    """A fixed pool of daemon worker threads (``concurrent.futures`` semantics).

    ``ThreadPoolExecutor`` joins its workers when the interpreter exits, whatever ``shutdown`` was told,
    so a decode still running when the server stops would hold the exit past the grace period (seconds
    for a large image). Daemon workers do not: what they were doing is abandoned with the process.
    """

    def __init__(self, workers: int, name: str):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        for k in range(max(1, workers)):
            threading.Thread(target=self._run, name=f"{name}-{k}", daemon=True).start()
        self._workers = max(1, workers)

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("the pool is shut down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._work.put((future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        while (job := self._work.get()) is not None:
            future, fn, args, kwargs = job
            del job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)
            del future, fn, args, kwargs  # hold no decoded image between jobs

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = False) -> None:
        """Stop taking work; never waits for a running job (``wait`` is accepted and ignored)."""
        self._closed = True
        while cancel_futures:
            try:
                job = self._work.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in range(self._workers):
            self._work.put(None)
