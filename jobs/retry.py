"""The one retry policy: how many times a failing call is tried and how long to wait between tries.

Every retry of lora-jobs goes by a :class:`RetryPolicy`: the S3 requests (installed into botocore's own
retry hook by :func:`jobs.storage.make_s3_client`, docs/reliability.md "Retries"), the launcher's quick
status reads (:data:`jobs.progress.READ_POLICY`) and the MLflow tracker's sends (:meth:`RetryPolicy.call`).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from jobs.errors import StorageError

T = TypeVar("T")

#: Overrides the attempts of :meth:`RetryPolicy.from_env` (the S3 requests of the job and the launcher).
ATTEMPTS_ENV = "LORA_JOBS_S3_ATTEMPTS"


@dataclass(frozen=True)
class RetryPolicy:
    """A call is made at most ``attempts`` times. After the n-th failure it waits
    ``d * (0.5 + 0.5 * rand)`` with ``d = min(max_delay, base_delay * 2**(n-1))``: exponential with half
    jitter, so the waits are never all short (a restarting endpoint is ridden out) and never all equal
    (clients retrying together spread out). A network call waits at most ``connect_timeout`` to connect
    and ``read_timeout`` for each read. A download stream that breaks after bytes arrived is resumed from
    the byte reached at most ``resumes`` times (:func:`jobs.storage.download_file_ranged`), each only
    after progress, so a stall without progress is never longer than :meth:`worst_case_stall`.
    """

    attempts: int = 7
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    base_delay: float = 1.0
    max_delay: float = 32.0
    resumes: int = 5

    @classmethod
    def from_env(cls, **overrides: Any) -> RetryPolicy:
        """The S3 policy: the defaults, ``attempts`` from ``LORA_JOBS_S3_ATTEMPTS`` when set."""
        raw = os.environ.get(ATTEMPTS_ENV)
        if raw and "attempts" not in overrides:
            try:
                overrides["attempts"] = max(1, int(raw))
            except ValueError:
                raise StorageError(f"{ATTEMPTS_ENV}={raw!r} is not a whole number",
                                   hint="set it to the number of times an S3 request may be sent, e.g. 7") from None
        return cls(**overrides)

    def _cap(self, n: int) -> float:
        return float(min(self.max_delay, self.base_delay * 2 ** (n - 1)))

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure."""
        return self._cap(attempts) * (0.5 + 0.5 * random.random())

    def worst_case_stall(self) -> float:
        """Longest a network call can go without progress before it raises: every attempt timing out on
        connect and read, every wait at its longest."""
        return (self.attempts * (self.connect_timeout + self.read_timeout)
                + sum(self._cap(n) for n in range(1, self.attempts)))

    def shortest_outage_ridden(self) -> float:
        """An endpoint down for less than this is always waited out (every wait at its shortest)."""
        return sum(0.5 * self._cap(n) for n in range(1, self.attempts))

    def call(self, fn: Callable[[], T], *, retryable: Callable[[Exception], bool],
             on_retry: Callable[[Exception, int], None] | None = None) -> T:
        """``fn()``'s result, calling it again after each failure ``retryable`` accepts, up to ``attempts``
        times in all. A failure it refuses, or the last one, is raised. ``on_retry(err, n)`` hears of the
        n-th failure before its wait."""
        for n in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as err:
                if n >= self.attempts or not retryable(err):
                    raise
                if on_retry is not None:
                    on_retry(err, n)
                time.sleep(self.delay(n))
        raise ValueError(f"RetryPolicy.attempts is {self.attempts}: a call needs at least one attempt")
