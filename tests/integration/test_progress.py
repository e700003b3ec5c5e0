"""jobs.progress against the real MinIO: bounded write rate, stage changes at once, the last word always
written, and a store that hangs or is gone never slows or fails the training loop."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from jobs.progress import ProgressWriter, describe, progress_key, read_progress
from jobs.retry import RetryPolicy
from jobs.storage import S3Store, make_s3_client

pytestmark = pytest.mark.s3


def _store(s3_prefix: str) -> tuple[S3Store, str]:
    bucket, _, prefix = s3_prefix[5:].partition("/")
    return S3Store(bucket), f"{prefix}/run"


def test_updates_are_written_at_a_bounded_rate_and_the_end_at_once(s3_env, s3_prefix):
    store, run_prefix = _store(s3_prefix)
    w = ProgressWriter(store, progress_key(run_prefix, "abc123"), min_interval=1.0)
    w.stage("train")
    t0 = time.monotonic()
    # A fast training loop: 500 updates, at least 5 ms apart (so at least 2.5 s, on any machine). The count is
    # fixed and the bound is computed from the time it took, so the verdict never depends on the machine's speed.
    for step in range(1, 501):
        w.update(step=step, total_steps=10_000, loss=2.0 - step * 1e-4, tokens_per_s=14_000.0, eta_s=600.0)
        time.sleep(0.005)
    elapsed = time.monotonic() - t0
    mid = read_progress(store, run_prefix, "abc123")
    w.close("succeeded", version="v3")
    # the stage (at once) + at most one per elapsed interval (+1 for the timing edge) + the close (at once)
    assert 2 <= w.writes <= 3 + int(elapsed / 1.0), (w.writes, elapsed)
    assert mid["stage"] == "train" and mid["state"] == "running" and 0 < mid["step"] <= step
    final = read_progress(store, run_prefix, "abc123")
    assert final["state"] == "succeeded" and final["version"] == "v3" and final["step"] == step
    assert describe(final).startswith("succeeded, published v3, loss ")
    assert describe(mid).startswith(f"training step {mid['step']}/10000, loss ") and "14.0k tok/s, ETA 10m00s" in describe(mid)


def test_a_hung_store_never_blocks_training_and_a_dead_one_never_fails_it(stack, s3_env, s3_prefix, monkeypatch,
                                                                        caplog):
    store, run_prefix = _store(s3_prefix)
    quick = RetryPolicy(attempts=2, connect_timeout=1, read_timeout=1, base_delay=0.1)
    hung = S3Store(store.bucket, client=make_s3_client(quick), policy=quick)
    w = ProgressWriter(hung, progress_key(run_prefix, "hung"), min_interval=0.0)
    pid = int(Path(stack.env()["STACK_MINIO_PID_FILE"]).read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        slowest = 0.0
        for step in range(200):
            t = time.monotonic()
            w.update(step=step)
            slowest = max(slowest, time.monotonic() - t)
    finally:
        os.kill(pid, signal.SIGCONT)
    # An update that waited on the hung store would take at least its read timeout (1 s). The bound is half of
    # that, not a few milliseconds: far above what a slow or busy machine adds to a call that does not wait.
    assert slowest < quick.read_timeout / 2, f"an update took {slowest:.3f} s while the store hung"
    w.close("succeeded", wait_s=20)
    assert read_progress(store, run_prefix, "hung")["state"] == "succeeded", "written once the store answered"

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    dead = S3Store(store.bucket, client=make_s3_client(quick), policy=quick)
    w = ProgressWriter(dead, progress_key(run_prefix, "dead"), min_interval=0.0)
    with caplog.at_level("WARNING", logger="jobs"):
        w.update(step=1)
        w.close("failed", error="x", wait_s=20)
    assert w.writes == 0
    warnings = [r.getMessage() for r in caplog.records if "progress not written" in r.getMessage()]
    assert len(warnings) == 1 and "training goes on" in warnings[0], warnings
    assert stack.s3_secret_key not in warnings[0]


def test_describe_words_each_stage_and_failure():
    now = 1_000_000.0
    assert describe({"stage": "fetch", "state": "running", "updated_at": now - 3}, now) == \
        "fetching data and base model (updated 3s ago)"
    assert describe({"stage": "train", "state": "failed", "step": 7, "total_steps": 9, "loss": 1.5,
                     "error": "out of GPU memory"}, now) == "failed in train, loss 1.5000"
    assert describe({"stage": "train", "state": "running", "step": 1, "total_steps": 9, "eta_s": None}) == \
        "training step 1/9"
