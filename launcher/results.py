"""What the launcher's verbs return, whichever backend ran them: plain dataclasses whose ``to_dict()`` is what
``-o json`` prints. Fields are only ever appended."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass
class Validation:
    """A valid spec: what it will be called on the cluster, and the advice (values outside the guide's ranges)."""

    spec: Any  # jobs.spec.TrainingRunSpec
    job_name: str
    spec_hash: str
    advice: list[Any] = field(default_factory=list)  # jobs.errors.Problem, each with .render()


@dataclass
class Attempts:
    """A Job's pods (failed: those counted against retries), or for a JobSet run its current attempt's pods with
    ``failed`` the whole-run restarts counted against ``retries_allowed`` and ``restarts`` all of them (a
    disruption's are not counted)."""

    active: int
    succeeded: int
    failed: int
    retries_allowed: int | None
    restarts: int | None = None


@dataclass
class RunStatus:
    """Where a run is and why: ``state`` is Queued, Pending, Running, Succeeded, Failed or Deleting, and
    ``sentence`` says why. ``pods`` are the attempts, oldest first. ``to_dict()`` is ``launcher status -o
    json``; new fields (e.g. a ``progress`` read from the run's storage) are appended, never reordered."""

    run: str | None
    job: str
    namespace: str
    spec_hash: str | None
    state: str
    sentence: str
    exit_code: int | None
    blocked: bool
    details: list[str]
    created: str | None
    started: str | None
    completed: str | None
    attempts: Attempts
    output: str | None
    pods: list[Any]  # launcher.diagnose.Attempt
    # The job's live progress object (jobs.progress), read from the run's storage, with a one-line "summary";
    # None when it cannot be read (no credentials here, not written yet, a run from before progress existed).
    progress: dict | None = None
    kind: str = "Job"  # or "JobSet": what the run is on the cluster (settings.multinode_workload)
    # What the run cost so far, or in the end (jobs.cost.run_cost: GPU-hours over every pod, queue wait, tokens,
    # tokens/s/GPU, MFU, the price from setting gpu_prices, wall seconds per stage) with a one-line "summary";
    # None before any pod started.
    cost: dict | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("Succeeded", "Failed")

    @property
    def succeeded(self) -> bool:
        return self.state == "Succeeded"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunSummary:
    """One row of :meth:`Client.list`."""

    run: str | None
    job: str
    state: str
    sentence: str
    created: str | None
    progress: str | None = None  # jobs.progress.describe() of a running run's progress object
    cost: str | None = None  # jobs.cost.describe_cost() of what the run cost so far (RunStatus.cost's summary)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Cancelled:
    job: str
    waited: bool  # True: the run is gone (its Job and pods deleted, its local process ended); False: asked to stop
    kind: str = "job"  # or "jobset" (its Jobs and headless Service went with it), or "local run"
    exit_code: int | None = None  # a local run's, once it stopped

    @property
    def message(self) -> str:
        if self.kind == "local run":
            if not self.waited:
                return f"cancelling: local run {self.job} (SIGTERM sent; it checkpoints and stops)"
            code = "" if self.exit_code is None else f", exit code {self.exit_code}"
            return f"cancelled: local run {self.job} (stopped{code})"
        return f"cancelled: {self.kind} {self.job}" + (f" ({self.kind} and pods deleted)" if self.waited
                                                       else " (deleting)")


@dataclass
class Downloaded:
    run: str
    version: str
    path: Path

    @property
    def message(self) -> str:
        return f"downloaded {self.run} {self.version} to {self.path} (all files match the manifest)"


@dataclass
class PruneReport:
    run: str
    applied: bool  # False: a dry run, nothing was deleted
    orphans: list[Any]  # launcher.artifacts.Orphan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LogStream:
    """The trainer's log lines (``for line in client.logs(run)``); after the loop, ``outcome`` is the run's
    final :class:`RunStatus` when following, else None."""

    def __init__(self, lines: Iterator[str] | Any):
        self._lines = lines
        self.outcome: RunStatus | None = None

    def __iter__(self) -> Iterator[str]:
        self.outcome = yield from self._lines


def cost_of(progress: dict | None, pods: list[dict], created: str | None, settings: Any) -> dict | None:
    """What a run cost so far (:func:`jobs.cost.run_cost`, priced by setting ``gpu_prices``), with its one-line
    "summary"; ``created``: when the run was created (the queue wait starts there)."""
    from jobs.cost import describe_cost, run_cost

    cost = run_cost(progress, pods, created, prices=settings.gpu_prices, gpu_resource=settings.gpu_resource)
    if cost is not None:
        cost["summary"] = describe_cost(cost)
    return cost
