"""Live progress of a run: a small JSON object in the output store that `launcher status` reads.

``<output>/<run>/progress/<spec-hash>.json`` (one per Job: the Job's name carries the same hash)::

    {"state": "running", "stage": "train", "step": 120, "total_steps": 400, "epoch": 1,
     "examples_seen": 1920, "tokens_seen": 880000, "loss": 1.23, "val_loss": 1.31,
     "tokens_per_s": 14000.0, "eta_s": 720, "updated_at": 1764590000.0, ...}

The job writes it from a background thread, at most every ``min_interval`` seconds (stage
changes and the end are written at once), so a slow or unreachable store never slows
training, and a failed write is logged once and never fails the run. It outlives the pod:
`launcher status` shows it where logs are gone. This module is the one home of its layout:
the job writes through :class:`ProgressWriter`, the launcher reads through
:func:`read_progress` and words it with :func:`describe`.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from jobs.background import BackgroundSender
from jobs.formatting import count, duration
from jobs.retry import RetryPolicy
from jobs.storage import Store, join

log = logging.getLogger("jobs")

FOLDER = "progress"
MIN_INTERVAL_S = 10.0


def progress_key(run_prefix: str, spec_hash: str) -> str:
    return join(run_prefix, FOLDER, f"{spec_hash}.json")


class ProgressWriter:
    """Keeps the newest progress and writes it to ``store`` at a bounded rate, off the training thread."""

    def __init__(self, store: Store, key: str, *, min_interval: float = MIN_INTERVAL_S, enabled: bool = True):
        self.store, self.key, self.min_interval = store, key, min_interval
        self.enabled = enabled
        self._state: dict[str, Any] = {"state": "running", "started_at": round(time.time(), 1)}
        self._lock = threading.Lock()
        self._sender: BackgroundSender[dict[str, Any]] = BackgroundSender(
            self._write, name="progress-writer", min_interval=min_interval, latest_only=True)
        self._warned = False
        self.writes = 0

    # -- what the job calls
    def update(self, *, urgent: bool = False, **fields: Any) -> None:
        if not self.enabled:
            return
        with self._lock:  # the newest state replaces any not written yet
            self._state.update(fields)
            self._sender.put(dict(self._state), urgent=urgent)

    def stage(self, name: str) -> None:
        self.update(stage=name, urgent=True)

    def close(self, state: str, *, wait_s: float = 15.0, **fields: Any) -> None:
        """The last word: ``state`` (succeeded, failed, preempted), written now (waits up to ``wait_s``)."""
        if not self.enabled:
            return
        self.update(state=state, urgent=True, **fields)
        self._sender.close(wait_s)

    # -- on the writer thread
    def _write(self, snapshots: list[dict[str, Any]]) -> None:
        snapshot = dict(snapshots[-1], updated_at=round(time.time(), 1))
        try:
            self.store.put_bytes(self.key, json.dumps(snapshot, sort_keys=True).encode(), "application/json")
            self.writes += 1
        except Exception as err:  # progress is a courtesy: it never fails the run
            if not self._warned:
                self._warned = True
                log.warning("progress not written to %s/%s (%s); training goes on, later updates are retried",
                            self.store.label, self.key, str(err).splitlines()[0])


def read_progress(store: Store, run_prefix: str, spec_hash: str) -> dict[str, Any] | None:
    """The newest progress object of that Job, or None when there is none (yet)."""
    from jobs.errors import LoraJobError

    try:
        if not store.exists(progress_key(run_prefix, spec_hash)):
            return None
        data = json.loads(store.get_bytes(progress_key(run_prefix, spec_hash)))
    except (LoraJobError, ValueError):  # unreadable, denied or unreachable: no progress to show
        return None
    return data if isinstance(data, dict) else None


#: A status read must answer in seconds, whatever the store does: 2 attempts, short timeouts.
READ_POLICY = RetryPolicy(attempts=2, connect_timeout=2.0, read_timeout=5.0, base_delay=0.2)


def read_run_progress(run_uri: str | None, spec_hash: str | None,
                      endpoint: str | None = None) -> dict[str, Any] | None:
    """Progress of the Job whose run prefix is ``run_uri`` (its ``lora-jobs.io/output`` annotation) and whose
    spec hash is ``spec_hash``, with ``summary`` (:func:`describe`) added; None when there is none to read.
    ``endpoint``: the S3 endpoint where the environment names none (:func:`jobs.storage.make_s3_client`)."""
    if not run_uri or not spec_hash:
        return None
    from jobs.errors import LoraJobError
    from jobs.storage import S3Store, make_s3_client, open_store

    try:
        store, prefix = open_store(run_uri)
        if isinstance(store, S3Store):
            store = S3Store(store.bucket, client=make_s3_client(READ_POLICY, endpoint=endpoint), policy=READ_POLICY)
        p = read_progress(store, prefix, spec_hash)
    except (LoraJobError, ValueError, ImportError):
        return None
    if p is not None:
        p["summary"] = describe(p)
    return p


def read_runs_progress(runs: list[tuple[str | None, str | None]],
                       endpoint: str | None = None) -> list[dict[str, Any] | None]:
    """:func:`read_run_progress` of many runs (``(run_uri, spec_hash)`` each), for `launcher list`: one S3 client
    for all, one request a run, and once the store does not answer or there are no credentials here, no more
    tries (a list of 30 runs must not wait out 30 timeouts). Each progress gets its ``summary``."""
    from jobs.errors import LoraJobError, StorageError, TransientError
    from jobs.storage import S3Store, make_s3_client, open_store

    policy = READ_POLICY
    client = None
    gave_up = False
    out: list[dict[str, Any] | None] = []
    for run_uri, spec_hash in runs:
        p = None
        if run_uri and spec_hash and not (gave_up and run_uri.startswith("s3://")):
            try:
                store, prefix = open_store(run_uri)
                if isinstance(store, S3Store):
                    client = client or make_s3_client(policy, endpoint=endpoint)
                    store = S3Store(store.bucket, client=client, policy=policy)
                data = json.loads(store.get_bytes(progress_key(prefix, spec_hash)))
                p = data if isinstance(data, dict) else None
            except TransientError:
                gave_up = True
            except StorageError as err:  # not there (not written yet), or denied: no progress
                gave_up = gave_up or str(err).startswith("no S3 credentials")
            except (LoraJobError, ValueError, ImportError, OSError):
                pass
        if p is not None:
            p["summary"] = describe(p)
        out.append(p)
    return out


def describe_data(counts: dict[str, Any]) -> str:
    """The data stage's counts in one line: "173 rows kept of 179 lines: 3 malformed, 3 dropped by the rules
    (dedup_exact 1, dedup_near 1, strip_boilerplate 1)" (what `launcher data check` reports, for a run)."""
    lost = [f"{counts[k]} {k.replace('_', ' ')}" for k in ("blank", "malformed", "outside_format") if counts.get(k)]
    rules = {k: v for k, v in (counts.get("dropped_by_rule") or {}).items() if v}
    if rules:
        lost.append(f"{sum(rules.values())} dropped by the rules (" +
                    ", ".join(f"{k} {v}" for k, v in sorted(rules.items())) + ")")
    formats = counts.get("by_format") or {}
    kept_by_format = ", ".join(f"{name} {n.get('kept', 0)}" for name, n in sorted(formats.items()))
    mixed = f"; kept by format: {kept_by_format}" if len(formats) > 1 else ""
    kept, lines = int(counts.get("kept", 0)), int(counts.get("lines", 0))
    noun = "pair" if counts.get("unit") == "pairs" else "row"  # a preference run's data is counted in pairs
    return (f"{kept} {noun}{'' if kept == 1 else 's'} kept of {lines} line{'' if lines == 1 else 's'}" +
            (": " + ", ".join(lost) if lost else "") + mixed)


def describe(p: dict[str, Any], now: float | None = None) -> str:
    """One line: "training step 120/400, loss 1.2300, val loss 1.3100, 14.0k tok/s, ETA 12m00s (updated 8s ago)"."""
    stage = p.get("stage") or "starting"
    state = p.get("state") or "running"
    parts = []
    if state != "running":
        parts.append(f"{state} in {stage}" if state in ("failed", "preempted", "cancelled") else state)
        if p.get("version"):
            parts.append(f"published {p['version']}")
    elif stage == "train" and p.get("total_steps"):
        parts.append(f"training step {p.get('step', 0)}/{p['total_steps']}")
    else:
        parts.append({"fetch": "fetching data and base model", "prepare": "preparing data",
                      "load": "loading the model", "evaluate": "evaluating", "merge": "merging",
                      "publish": "publishing"}.get(stage, stage))
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("val_loss") is not None:
        parts.append(f"val loss {p['val_loss']:.4f}")
    if state == "running" and p.get("tokens_per_s"):
        parts.append(f"{count(p['tokens_per_s'])} tok/s")
    if state == "running" and p.get("eta_s") is not None and stage == "train":
        parts.append(f"ETA {duration(p['eta_s'])}")
    line = ", ".join(parts)
    if p.get("updated_at"):
        age = max(0.0, (now or time.time()) - float(p["updated_at"]))
        line += f" (updated {duration(age)} ago)"
    return line
