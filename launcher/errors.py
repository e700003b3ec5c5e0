"""Every error the launcher raises, in one hierarchy under :class:`jobs.errors.LoraJobError`.

The job's own errors (``SpecError``, ``DataError``, ``StorageError``, ``TransientError``)
live in :mod:`jobs.errors`, shared with the container; the launcher's are defined here and
re-exported by the modules that raise them (``launcher.kube.ClusterError`` is this
``ClusterError``). Each carries a message and a ``hint`` (what to do next), and
:func:`exit_code_for` gives the CLI's exit code, so an SDK caller and the CLI see the same
failure the same way.
"""
from __future__ import annotations

from jobs.errors import DataError, LoraJobError, SpecError, StorageError, TransientError

#: Exit codes of the CLI (docs/architecture.md); the job container's own codes are jobs.errors.ExitCode.
EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_CLUSTER, EXIT_TIMEOUT = 0, 1, 2, 3, 4

__all__ = [
    "AlreadyExists", "ClusterError", "ClusterUnreachable", "DataError", "Forbidden", "Invalid", "LoraJobError",
    "NotFound", "PreflightError", "RunFailed", "SettingsError", "SpecError", "StorageError", "SubmitConflict",
    "TransientClusterError", "TransientError", "UsageError", "WaitTimeout", "exit_code_for",
]


class UsageError(LoraJobError):
    """The caller asked for something that cannot be: an unknown run, a missing argument, a bad duration."""

    cli_exit_code = EXIT_USAGE


class SettingsError(LoraJobError):
    """A settings file or variable is invalid."""

    cli_exit_code = EXIT_USAGE


class RunFailed(LoraJobError):
    """The run failed, or its Job vanished while we followed it."""

    cli_exit_code = EXIT_RUN_FAILED


class WaitTimeout(LoraJobError):
    """A wait (for a run to finish, or for a cancelled run to be gone) ran out of time."""

    cli_exit_code = EXIT_TIMEOUT


class ClusterError(LoraJobError):
    """The cluster refused or could not be reached."""

    cli_exit_code = EXIT_CLUSTER


class ClusterUnreachable(ClusterError):
    pass


class Forbidden(ClusterError):
    pass


class NotFound(ClusterError):
    pass


class AlreadyExists(ClusterError):
    pass


class Invalid(ClusterError):
    pass


class TransientClusterError(ClusterError):
    """5xx, 429 or a dropped connection: worth retrying."""


class PreflightError(LoraJobError):
    """One or more preflight checks failed; each line says what and how to fix it."""

    cli_exit_code = EXIT_CLUSTER

    def __init__(self, failures: list[str]):
        self.failures = failures
        noun = "check" if len(failures) == 1 else "checks"
        super().__init__(f"{len(failures)} preflight {noun} failed:\n" + "\n".join(f"  - {f}" for f in failures))


class SubmitConflict(LoraJobError):
    """A Job or ConfigMap of that name exists with a different spec, or is still being deleted."""

    cli_exit_code = EXIT_CLUSTER


def exit_code_for(err: BaseException) -> int:
    """The CLI exit code of an error: 2 spec/data/usage/settings, 3 cluster/storage/preflight, 4 timeout,
    1 a failed run (and anything unclassified)."""
    if isinstance(err, (SpecError, DataError)):
        return EXIT_USAGE
    if isinstance(err, (StorageError, TransientError)):
        return EXIT_CLUSTER
    return int(getattr(err, "cli_exit_code", EXIT_RUN_FAILED))
