"""The one errors module: exception types and the job container's exit-code contract.

The launcher renders a Job whose ``podFailurePolicy`` maps these codes, and
``launcher status`` turns them back into words, so both sides import them from here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the job container. Never retried: BAD_SPEC, BAD_DATA, STORAGE."""

    SUCCESS = 0
    UNEXPECTED = 1  # a bug or an unclassified crash: counted against backoffLimit
    BAD_SPEC = 10  # the spec failed validation or names something impossible
    BAD_DATA = 11  # too few valid rows, unreadable JSONL, a base model that will not load
    STORAGE = 12  # access denied, bucket or key not found, bad credentials
    OUT_OF_MEMORY = 13  # the GPU ran out of memory at the smallest micro-batch the job can use
    DIVERGED = 14  # the training loss became NaN or infinite
    MERGE_MISMATCH = 15  # the merged model does not reproduce base + adapter
    TRANSIENT = 75  # EX_TEMPFAIL: preemption, a flaky network, S3 5xx: retried


#: Codes after which a retry can only fail the same way (the Job's podFailurePolicy: FailJob).
PERMANENT_EXIT_CODES = (ExitCode.BAD_SPEC, ExitCode.BAD_DATA, ExitCode.STORAGE, ExitCode.OUT_OF_MEMORY,
                        ExitCode.DIVERGED, ExitCode.MERGE_MISMATCH)

EXIT_CODE_MEANING = {
    ExitCode.SUCCESS: "finished",
    ExitCode.UNEXPECTED: "crashed with an unexpected error (a bug; retried)",
    ExitCode.BAD_SPEC: "the spec is invalid (not retried)",
    ExitCode.BAD_DATA: "the data or base model is unusable (not retried)",
    ExitCode.STORAGE: "object storage refused access or the object is missing (not retried)",
    ExitCode.OUT_OF_MEMORY: "the run does not fit in GPU memory even at the smallest micro-batch (not retried)",
    ExitCode.DIVERGED: "the training loss became NaN or infinite (not retried)",
    ExitCode.MERGE_MISMATCH: "the merged model does not match base + adapter; nothing was published (not retried)",
    ExitCode.TRANSIENT: "a transient failure: preemption, network or storage hiccup (retried)",
}


def describe_exit_code(code: int) -> str:
    try:
        return EXIT_CODE_MEANING[ExitCode(code)]
    except ValueError:
        if code >= 128:
            return f"killed by signal {code - 128} (137 is usually out of memory)"
        return f"exited with code {code}"


class LoraJobError(Exception):
    """A failure with a message meant for the user: printed without a traceback."""

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


@dataclass(frozen=True)
class Problem:
    """One problem in a spec or a file: where it is, what is wrong, how to fix it."""

    where: str  # field path ("training.learning_rate") or "line 12"
    message: str
    fix: str | None = None
    line: int | None = None  # line in the source file, when known

    def render(self) -> str:
        loc = self.where + (f" (line {self.line})" if self.line and not self.where.startswith("line") else "")
        text = f"{loc}: {self.message}"
        return text + (f" — {self.fix}" if self.fix else "")


class SpecError(LoraJobError):
    """The spec is invalid; ``problems`` lists every problem found, not just the first."""

    exit_code = ExitCode.BAD_SPEC

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        noun = "problem" if len(problems) == 1 else "problems"
        lines = [f"{head}{len(problems)} {noun} in the spec:"] + [f"  - {p.render()}" for p in problems]
        super().__init__("\n".join(lines))


class DataError(LoraJobError):
    exit_code = ExitCode.BAD_DATA


class StorageError(LoraJobError):
    """Access denied or not found: permanent. Names bucket and key, never a secret."""

    exit_code = ExitCode.STORAGE


class OutOfMemory(LoraJobError):
    """The GPU ran out of memory after the job's own back-off (halving the micro-batch)."""

    exit_code = ExitCode.OUT_OF_MEMORY


def is_gpu_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is the GPU running out of memory: torch's ``OutOfMemoryError``, or another error that
    carries CUDA's message (a kernel library re-raising it). Read from the name and message, so the contract
    needs no torch to tell."""
    return type(err).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(err)


class Diverged(LoraJobError):
    """The loss became NaN or infinite: the same spec and data would diverge again."""

    exit_code = ExitCode.DIVERGED


class MergeMismatch(LoraJobError):
    """The merged weights do not reproduce base + adapter: a merge bug, never published."""

    exit_code = ExitCode.MERGE_MISMATCH


class TransientError(LoraJobError):
    exit_code = ExitCode.TRANSIENT


class Preempted(TransientError):
    """SIGTERM arrived: a checkpoint was written and the pod should be retried."""


class PeerLost(TransientError):
    """Another rank of a multi-process run died or went silent: this rank stops too, so the whole gang
    restarts (an Indexed Job replaces only the pods that failed)."""


def write_termination_message(code: ExitCode | int, reason: str, stage: str | None = None,
                              path: str | None = None) -> None:
    """Write the one-line JSON reason Kubernetes shows in the container's termination state.

    Under torchrun each pod's local rank 0 writes it for its pod (the pod's other ranks' ends are its
    business): rank 0's is the run's, and another node's tells its own pod's end (75 when it lost a peer)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    path = path or os.environ.get("TERMINATION_MESSAGE_PATH", "/dev/termination-log")
    payload = {"exit_code": int(code), "reason": describe_exit_code(int(code)), "message": reason[:3000]}
    if stage:
        payload["stage"] = stage
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(payload))
    except OSError:
        pass  # not in a pod (or read-only): the same line is on stderr anyway
