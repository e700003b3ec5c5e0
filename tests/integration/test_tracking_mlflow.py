"""The job's MLflow tracker against the real tracking server of the stack (mlflow, SQLite, artifacts proxied).

The demo-sized training run that tracks end to end is tests/integration/test_train_e2e.py's first test;
these prove the tracker's contract without training: what lands on the server, and that a server that
hangs never slows the caller.
"""
from __future__ import annotations

import logging
import os
import signal
import time
import uuid

import pytest
from published import find_run, mlflow_get

from jobs.trainer.tracking import TAG_LOCATION, TAG_SPEC_HASH, MlflowClient, MlflowTracker

pytestmark = pytest.mark.mlflow


def test_params_metrics_tags_and_the_eval_page_land_on_the_server(mlflow_server, tmp_path):
    experiment = f"t-{uuid.uuid4().hex[:8]}"
    tracker = MlflowTracker(MlflowClient(mlflow_server.uri), experiment, run_name="r-abc", spec_hash="abc")
    tracker.start({"lora.rank": "16", "training.epochs": "2"}, {TAG_SPEC_HASH: "abc"})
    for step in range(1, 6):
        tracker.on_progress(step=step, loss=2.0 / step, lr=1e-4, tokens_per_s=100.0 * step, total_steps=5)
        if step % 2 == 0:
            tracker.on_progress(val_loss=1.0 / step, best_val_loss=1.0 / step)
    page = tmp_path / "eval_report.md"
    page.write_text("# Evaluation\n")
    tracker.finish("FINISHED", metrics={"val_loss_before": 2.0, "val_loss_after": 0.25},
                   tags={TAG_LOCATION: "s3://b/runs/r/v1"}, artifacts=[page, tmp_path / "eval_report.html"])

    run = find_run(mlflow_server.uri, experiment)
    info, data = run["info"], run["data"]
    assert info["status"] == "FINISHED" and info["run_name"] == "r-abc"
    params = {p["key"]: p["value"] for p in data["params"]}
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert params == {"lora.rank": "16", "training.epochs": "2"}
    assert tags[TAG_LOCATION] == "s3://b/runs/r/v1" and tags[TAG_SPEC_HASH] == "abc"
    loss = mlflow_get(mlflow_server.uri, "mlflow/metrics/get-history", run_id=info["run_id"], metric_key="loss")
    assert [(m["step"], m["value"]) for m in loss["metrics"]] == [(s, 2.0 / s) for s in range(1, 6)]
    val = mlflow_get(mlflow_server.uri, "mlflow/metrics/get-history", run_id=info["run_id"], metric_key="val_loss")
    assert [(m["step"], m["value"]) for m in val["metrics"]] == [(2, 0.5), (4, 0.25)]
    latest = {m["key"]: m["value"] for m in data["metrics"]}
    assert latest["val_loss_after"] == 0.25 and latest["tokens_per_s"] == 500.0
    root = info["artifact_uri"].split(":", 1)[1].lstrip("/")
    files = mlflow_get(mlflow_server.uri, "mlflow-artifacts/artifacts", path=root)["files"]
    assert [f["path"] for f in files] == ["eval_report.md"]  # no eval_report.html here: nothing to upload


def test_a_preference_runs_metrics_land_under_their_names_each_once(mlflow_server):
    experiment = f"t-{uuid.uuid4().hex[:8]}"
    tracker = MlflowTracker(MlflowClient(mlflow_server.uri), experiment, run_name="dpo", spec_hash="dpo")
    tracker.start({"training.method": "dpo"}, {TAG_SPEC_HASH: "dpo"})
    for step in range(1, 5):  # a DPO step's progress event, its objective's metrics with it
        tracker.on_progress(step=step, total_steps=4, loss=0.7 - step / 20, lr=1e-5, examples_seen=8 * step,
                            tokens_seen=900 * step, epoch=1, tokens_per_s=50.0, eta_s=10 * (4 - step),
                            reward_accuracy=step / 4, reward_margin=step / 10)
        if step == 2:  # a validation's event carries its loss; the rest is in the run's evaluations
            tracker.on_progress(val_loss=0.6, best_val_loss=0.6, best_step=2)
    # TrainState.evals at the end: step 2's loss is sent already; step 4 is the final validation
    evals = [{"step": 2, "val_loss": 0.6, "preference_accuracy": 0.625, "reward_accuracy": 0.5, "reward_margin": 0.25},
             {"step": 4, "val_loss": 0.5, "preference_accuracy": 0.75, "reward_accuracy": 0.875, "reward_margin": 0.5}]
    tracker.evaluations(evals)
    tracker.finish("FINISHED")

    run = find_run(mlflow_server.uri, experiment)

    def history(key: str) -> list[tuple[int, float]]:
        got = mlflow_get(mlflow_server.uri, "mlflow/metrics/get-history", run_id=run["info"]["run_id"], metric_key=key)
        return sorted((m["step"], m["value"]) for m in got.get("metrics", []))

    assert {m["key"] for m in run["data"]["metrics"]} == {
        "loss", "lr", "tokens_per_s", "reward_accuracy", "reward_margin",  # no counter (epoch, eta_s, ...)
        "val_loss", "val_preference_accuracy", "val_reward_accuracy", "val_reward_margin"}
    assert history("reward_accuracy") == [(s, s / 4) for s in range(1, 5)]
    assert history("reward_margin") == [(s, pytest.approx(s / 10)) for s in range(1, 5)]
    assert history("val_loss") == [(2, 0.6), (4, 0.5)]  # each validation once
    assert history("val_preference_accuracy") == [(2, 0.625), (4, 0.75)]
    assert history("val_reward_accuracy") == [(2, 0.5), (4, 0.875)]
    assert history("val_reward_margin") == [(2, 0.25), (4, 0.5)]


def test_a_retried_pod_carries_on_with_the_unfinished_run_of_its_spec(mlflow_server):
    experiment = f"t-{uuid.uuid4().hex[:8]}"
    first = MlflowTracker(MlflowClient(mlflow_server.uri), experiment, run_name="r", spec_hash="h1")
    first.start({"lora.rank": "16"}, {TAG_SPEC_HASH: "h1"})
    first.on_progress(step=1, loss=2.0, lr=1e-4, tokens_per_s=1.0)
    first.finish("KILLED")  # preempted
    second = MlflowTracker(MlflowClient(mlflow_server.uri), experiment, run_name="r", spec_hash="h1")
    second.start({"lora.rank": "16"}, {TAG_SPEC_HASH: "h1"})
    second.on_progress(step=2, loss=1.5, lr=1e-4, tokens_per_s=1.0)
    second.finish("FINISHED")
    run = find_run(mlflow_server.uri, experiment)  # one run, not two
    assert run["info"]["status"] == "FINISHED"
    loss = mlflow_get(mlflow_server.uri, "mlflow/metrics/get-history", run_id=run["info"]["run_id"], metric_key="loss")
    assert [m["step"] for m in loss["metrics"]] == [1, 2]


def test_a_hung_server_never_slows_the_caller_and_the_run_goes_on_untracked(mlflow_server, caplog):
    pgid = int(open(mlflow_server.pid_file).read().strip())
    tracker = MlflowTracker(MlflowClient(mlflow_server.uri), f"t-{uuid.uuid4().hex[:8]}", run_name="r",
                            spec_hash="h")
    os.killpg(pgid, signal.SIGSTOP)  # accepts connections (the kernel does), answers nothing
    try:
        with caplog.at_level(logging.WARNING, logger="jobs"):
            t0 = time.perf_counter()
            tracker.start({"lora.rank": "16"}, {})
            slowest = time.perf_counter() - t0
            for step in range(1, 20_001):  # more than the queue holds: the surplus is dropped, not waited for
                t0 = time.perf_counter()
                tracker.on_progress(step=step, loss=1.0, lr=1e-4, tokens_per_s=1.0)
                slowest = max(slowest, time.perf_counter() - t0)
            # Each call, not the 20,000 together (their total is the machine's speed): one that waited on the hung
            # server would take its request timeout (5 s); the bound is a fifth of that.
            assert slowest < tracker.client.timeout / 5, f"the training thread was held up {slowest:.3f} s"
            t0 = time.perf_counter()
            tracker.finish("FINISHED", metrics={"val_loss_after": 1.0}, wait_s=10.0)
            assert time.perf_counter() - t0 < 12.0, "the end of the run waits a bounded time"
    finally:
        os.killpg(pgid, signal.SIGCONT)
    assert tracker.dropped > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("MLflow" in w for w in warnings) and len(warnings) <= 2, warnings
    mlflow_get(mlflow_server.uri, "mlflow/experiments/search", max_results=1)  # the server is fine again
