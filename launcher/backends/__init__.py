"""Where runs run. :class:`launcher.client.Client` holds the verbs; a :class:`Backend` carries out the ones that
touch a run: ``kubernetes`` (:mod:`launcher.backends.kubernetes`, a Job or JobSet in a namespace) or ``local``
(:mod:`launcher.backends.local`, the job as a process group on this machine). The CLI never knows which.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Protocol

from launcher.results import Cancelled, LogStream, RunStatus, RunSummary

#: The backends, by the name the ``backend`` setting and ``--backend`` take.
NAMES = ("kubernetes", "local")


class Submitted(Protocol):
    """What ``submit`` returns: ``launcher.submit.SubmitResult`` or ``launcher.backends.local.LocalSubmitResult``."""

    job_name: str
    created: bool  # False: the same spec was already submitted (and is still there)
    warnings: list[str]
    kind: str

    @property
    def message(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class Backend(Protocol):
    """The verbs that touch a run. Arguments are checked by the client before they get here."""

    name: str

    @property
    def where(self) -> str:
        """Where its runs are, for messages: "namespace ml", or the local state folder."""

    @property
    def settings(self) -> Any:
        """The launcher settings it runs with (a cluster's ConfigMap included once connected)."""

    def submit(self, spec: Any, *, base_dir: Path, server_dry_run: bool = False, skip_preflight: bool = False,
               workdir: Path | None = None) -> Submitted:
        """Start the run of a validated spec whose relative paths are ``base_dir``'s; a backend refuses, with a
        ``UsageError``, an option that means nothing to it."""

    def status(self, run: str) -> RunStatus: ...

    def list(self) -> list[RunSummary]: ...

    def wait(self, run: str, *, timeout: float | None = None, interval: float = 2.0,
             on_change: Callable[[RunStatus], None] | None = None) -> RunStatus: ...

    def logs(self, run: str, *, follow: bool = False, tail: int | None = None, poll: float = 1.0,
             rank: int | None = None) -> LogStream: ...

    def cancel(self, run: str, *, wait: bool = True, timeout: float = 120) -> Cancelled: ...

    def output_of(self, run: str) -> tuple[str, str]:
        """(run name, the spec's output prefix) of a run, to find its published versions."""


def poll_until_finished(read: Callable[[], RunStatus], *, deadline: float | None, interval: float,
                        on_change: Callable[[RunStatus], None] | None,
                        timed_out: Callable[[RunStatus], Exception]) -> RunStatus:
    """Every backend's ``wait``: ``read`` the run's status every ``interval`` seconds, hand each new sentence to
    ``on_change``, return the status once it is finished; past ``deadline`` (``time.monotonic()``; None: no
    limit) raise ``timed_out(last status)``."""
    last = None
    while True:
        st = read()
        if st.sentence != last:
            if on_change:
                on_change(st)
            last = st.sentence
        if st.finished:
            return st
        if deadline is not None and time.monotonic() >= deadline:
            raise timed_out(st)
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
