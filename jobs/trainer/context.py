"""The run context: what one run of the recipe shares between its stages, made per run and passed explicitly.

``jobs.trainer.main`` makes it before the spec is read, so whatever fails, it can say in which stage.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("jobs")


def peak_gpu_gib() -> float | None:
    """The peak GPU memory allocated since the last reset, in GiB (None without a GPU)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


class StopFlag:
    """Set by SIGTERM; the training loop reads it once a step (``stop_requested``)."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


@dataclass
class RunContext:
    """The stage now running (for logs and the termination message) and what each stage cost; the run's
    progress object and MLflow run (rank 0's; None elsewhere and before setup); the SIGTERM flag."""

    stage: str = "setup"
    timings: dict[str, dict] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)  # wall clock, for metadata.json
    progress: object | None = None  # jobs.progress.ProgressWriter
    tracker: object | None = None  # jobs.trainer.tracking.MlflowTracker, when the spec asks for tracking
    stop: StopFlag = field(default_factory=StopFlag)
    _stage_started: float | None = None

    def enter(self, name: str | None) -> None:
        """Close the running stage (wall seconds, peak GPU memory) and start ``name`` (None: just close)."""
        now = time.perf_counter()
        if self._stage_started is not None:
            self.timings[self.stage] = {"seconds": round(now - self._stage_started, 1), "peak_gpu_gib": peak_gpu_gib()}
        if name is None:
            self._stage_started = None
            return
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except ImportError:
            pass
        self.stage, self._stage_started = name, now
        if self.progress is not None:
            self.progress.update(stages=dict(self.timings))  # wall seconds of each stage so far (jobs/cost.py)
            self.progress.stage(name)
        log.info("── %s", name)
