"""The one background writer: what the job reports (progress, MLflow) is sent from a daemon thread.

A store or tracker that is slow, hung or down must never slow or fail training: :meth:`BackgroundSender.put`
returns at once, a bounded queue holds what waits, and :meth:`BackgroundSender.close` waits a bounded time.
:class:`jobs.progress.ProgressWriter` and :class:`jobs.trainer.tracking.MlflowTracker` send through it.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Generic, TypeVar

log = logging.getLogger("jobs")
T = TypeVar("T")


class BackgroundSender(Generic[T]):
    """Hands what :meth:`put` gets to ``send(items)`` on a daemon thread started at the first put.

    Each round takes everything queued, in order (with ``latest_only``, just the newest item: a state that
    replaces the one before). Rounds start at most every ``min_interval`` seconds, unless an urgent item
    or :meth:`close` is waiting. ``send`` deals with its own failures; an exception it lets out ends the
    round and the thread goes on. Beyond ``max_queue`` waiting items a put is dropped and counted."""

    def __init__(self, send: Callable[[list[T]], None], *, name: str, min_interval: float = 0.0,
                 latest_only: bool = False, max_queue: int = 10_000):
        self.send, self.name, self.min_interval = send, name, min_interval
        self.latest_only, self.max_queue = latest_only, max_queue
        self.dropped = 0
        self._pending: collections.deque[T] = collections.deque()
        self._urgent = self._closed = False
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, item: T, *, urgent: bool = False) -> bool:
        """Queue ``item``; False when it was dropped (the queue is full, or the sender is closed)."""
        with self._cv:
            if self._closed:
                return False
            if self.latest_only:
                self._pending.clear()
            elif len(self._pending) >= self.max_queue:
                self.dropped += 1
                return False
            self._pending.append(item)
            self._urgent = self._urgent or urgent
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cv.notify()
        return True

    def close(self, wait_s: float) -> bool:
        """Send what is queued, then stop; waits at most ``wait_s``. False when the thread is still sending."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is None:
            return True
        self._thread.join(wait_s)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        last = float("-inf")
        while True:
            with self._cv:
                while not (self._pending and (self._urgent or self._closed
                                              or time.monotonic() >= last + self.min_interval)):
                    if self._closed and not self._pending:
                        return
                    self._cv.wait(None if not self._pending else
                                  max(0.01, last + self.min_interval - time.monotonic()))
                items = list(self._pending)
                self._pending.clear()
                self._urgent = False
            try:
                self.send(items)
            except Exception as err:  # noqa: BLE001 - a report must never end the thread, nor the run
                log.warning("%s: %s: %s (training goes on)", self.name, type(err).__name__, err)
            last = time.monotonic()
