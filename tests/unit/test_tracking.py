"""Tracking without a server: the spec section, the params we send, the pod's env, a dead tracker, the event files."""
from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest
import yaml

from jobs.spec import SpecError, load_spec_text, parse_spec
from jobs.trainer.tracking import (PARAM_VALUE_LIMIT, MlflowClient, MlflowTracker, flatten_params, open_tracker,
                           read_tensorboard)

pytestmark = pytest.mark.unit

BASE = {"name": "support-bot", "base_model": {"uri": "s3://models/m/"},
        "dataset": {"train": "s3://data/train.jsonl"}, "output": "s3://runs/lora"}
TRACKED = {**BASE, "tracking": {"mlflow": {"experiment": "support"}}}


def test_tracking_is_optional_and_does_not_change_the_spec_hash():
    plain, tracked = parse_spec(BASE), parse_spec(TRACKED)
    assert plain.tracking is None
    assert tracked.tracking.mlflow.uri_env == "MLFLOW_TRACKING_URI" and tracked.tracking.mlflow.experiment == "support"
    # the hash keys checkpoints and the Job's name: where a run reports must not restart it
    assert plain.spec_hash() == tracked.spec_hash()


def test_a_tracking_uri_in_the_spec_is_refused_with_the_field_named():
    text = yaml.safe_dump({**BASE, "tracking": {"mlflow": {"experiment": "x", "uri": "http://mlflow:5000"}}})
    with pytest.raises(SpecError) as err:
        load_spec_text(text)
    assert "tracking.mlflow.uri" in str(err.value)
    with pytest.raises(SpecError):
        parse_spec({**BASE, "tracking": {"mlflow": {"experiment": "x", "uri_env": "not a name"}}})


def test_params_are_the_whole_spec_flattened_and_long_values_cut_to_mlflows_limit():
    spec = parse_spec({**TRACKED, "eval": {"prompts": [{"prompt": "p" * 4000}, {"prompt": "q" * 4000}]}})
    params = flatten_params(spec.model_dump(mode="json"))
    assert params["lora.rank"] == "16" and params["training.learning_rate"] == "0.0002"
    assert params["name"] == "support-bot" and params["tracking.mlflow.experiment"] == "support"
    assert params["lora.target_modules"] == "all-linear" and params["labels"] == "{}"
    cut = params["eval.prompts"]
    assert len(cut) == PARAM_VALUE_LIMIT and cut.endswith("characters)") and "truncated" in cut
    assert all(len(v) <= PARAM_VALUE_LIMIT for v in params.values())


def test_no_tracker_without_the_section_off_rank_0_or_without_a_uri_in_the_pod(caplog):
    assert open_tracker(parse_spec(BASE), run_name="r", env={"MLFLOW_TRACKING_URI": "http://x"}) is None
    tracked = parse_spec(TRACKED)
    assert open_tracker(tracked, run_name="r", enabled=False, env={"MLFLOW_TRACKING_URI": "http://x"}) is None
    with caplog.at_level(logging.WARNING, logger="jobs"):
        assert open_tracker(tracked, run_name="r", env={}) is None
    assert "MLFLOW_TRACKING_URI" in caplog.text and "not tracked" in caplog.text
    t = open_tracker(tracked, run_name="r", env={"MLFLOW_TRACKING_URI": "http://x/", "MLFLOW_TRACKING_TOKEN": "s"})
    assert t.client.uri == "http://x" and t.client.token == "s" and t.experiment == "support"


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


def test_a_dead_tracker_is_warned_once_retried_then_skipped_and_never_blocks_the_caller(caplog):
    tracker = MlflowTracker(MlflowClient(f"http://127.0.0.1:{_dead_port()}"), "exp", run_name="r", spec_hash="h")
    with caplog.at_level(logging.WARNING, logger="jobs"):
        t0 = time.perf_counter()
        tracker.start({"lora.rank": "16"}, {})
        for step in range(1, 2001):
            tracker.on_progress(step=step, loss=1.0, lr=1e-4, tokens_per_s=10.0)
        tracker.on_progress(val_loss=0.9)
        assert time.perf_counter() - t0 < 1.0, "every call returns at once"
        t0 = time.perf_counter()
        tracker.finish("FINISHED", metrics={"val_loss_after": 0.9}, tags={"t": "v"})
        assert time.perf_counter() - t0 < 20.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("retrying" in w for w in warnings) == 1, warnings  # one warning, not one per call
    assert any("skipped for the rest of this run" in w for w in warnings), warnings
    assert tracker._run is None and tracker._skipped


def test_tensorboard_event_files_hold_every_step_scalar(tmp_path):
    from jobs.trainer.tracking import write_tensorboard

    history = [{"step": s, "loss": 2.0 / s, "lr": 1e-4 * s, "tokens": 100, "examples": 4} for s in range(1, 6)]
    evals = [{"step": 0, "val_loss": 2.5}, {"step": 2, "val_loss": 1.5}, {"step": 5, "val_loss": 1.2}]
    folder = write_tensorboard(tmp_path / "tensorboard", history, evals, {s: 50.0 * s for s in range(1, 6)})
    scalars = read_tensorboard(folder)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5]
    assert scalars["loss"][1][1] == pytest.approx(1.0) and scalars["lr"][4][1] == pytest.approx(5e-4)
    assert scalars["tokens_per_s"][2] == (3, pytest.approx(150.0))
    assert scalars["val_loss"] == [(0, pytest.approx(2.5)), (2, pytest.approx(1.5)), (5, pytest.approx(1.2))]


def _preference_run(method: str) -> tuple[list[dict], list[dict]]:
    """The history and evaluations of a DPO or ORPO run, as jobs.trainer.loop records them: each step's entry
    holds what ``Objective.summary`` reads its statistics as, each evaluation what ``Objective.validation_metrics``
    makes of the held-out pairs (the real objective's, so a metric it gains reaches the test)."""
    import torch

    from jobs.trainer.preference import Objective, PairMetrics

    objective = Objective(method, 0.1)
    history = []
    for step in range(1, 5):
        # the step's summed statistics (micro_loss's layout) over 8 pairs (ORPO: and 200 chosen target tokens)
        stats = torch.tensor([4.0 / step, 5.0 + step / 4, 0.5 * step, 1.5 * step])
        summary = objective.summary(stats, [8.0] if method == "dpo" else [200.0, 8.0])
        loss = summary.pop("loss")
        history.append({"step": step, "loss": round(loss, 5), "lr": 1e-5 * step, "tokens": 900, "examples": 8,
                        **{k: round(v, 5) for k, v in summary.items()}})
    evals = []
    for step in (0, 2, 4):
        measured = PairMetrics(mean=0.7 - step / 10, mine=[], preference_accuracy=0.5 + step / 10,
                               reward_accuracy=step / 5 if method == "dpo" else None,
                               reward_margin=step / 20 if method == "dpo" else None, log_probs=[])
        extra = objective.validation_metrics(measured)
        evals.append({"step": step, "val_loss": round(measured.mean, 5), **{k: round(v, 5) for k, v in extra.items()}})
    return history, evals


@pytest.mark.parametrize("method, step_names, val_names", [
    ("dpo", {"reward_accuracy", "reward_margin"}, {"val_preference_accuracy", "val_reward_accuracy", "val_reward_margin"}),
    ("orpo", {"nll", "odds_ratio_loss", "preference_accuracy", "log_odds"}, {"val_preference_accuracy"}),
])
def test_tensorboard_holds_every_metric_of_a_preference_run(tmp_path, method, step_names, val_names):
    from jobs.trainer.tracking import write_tensorboard

    history, evals = _preference_run(method)
    scalars = read_tensorboard(write_tensorboard(tmp_path / "tb", history, evals, {s: 10.0 * s for s in range(1, 5)}))
    assert set(scalars) == {"loss", "lr", "tokens_per_s", "val_loss"} | step_names | val_names
    for name in step_names | {"loss", "lr"}:  # named as the history names them, at every step
        assert scalars[name] == [(h["step"], pytest.approx(h[name])) for h in history], name
    for name in val_names | {"val_loss"}:  # prefixed as the validation loss is
        assert scalars[name] == [(e["step"], pytest.approx(e[name.removeprefix("val_")] if name != "val_loss"
                                                           else e["val_loss"])) for e in evals], name


def test_a_step_and_a_validation_send_every_numeric_metric_they_carry_and_no_counter():
    from jobs.trainer.tracking import step_metrics, validation_metrics

    # a progress event of a DPO step, as jobs.trainer.loop.ProgressLog sends it, with the objective's metrics
    event = {"step": 3, "total_steps": 10, "loss": 0.61, "lr": 1e-5, "examples_seen": 24, "tokens_seen": 2700,
             "epoch": 1, "tokens_per_s": 55.5, "eta_s": 40, "reward_accuracy": 0.75, "reward_margin": 0.2}
    assert step_metrics(event) == {"loss": 0.61, "lr": 1e-5, "tokens_per_s": 55.5, "reward_accuracy": 0.75,
                                   "reward_margin": 0.2}
    assert step_metrics({"step": 1, "loss": 1, "lr": None, "note": "x", "flag": True, "x": float("nan")}) == \
        {"loss": 1.0}  # a None, a text, a bool or a NaN is no metric (a NaN would cost MLflow's whole batch)
    assert validation_metrics({"val_loss": 0.5, "best_val_loss": 0.4, "best_step": 2, "preference_accuracy": 0.9}) \
        == {"val_loss": 0.5, "val_preference_accuracy": 0.9}
    assert validation_metrics({"step": 4, "val_loss": 0.5, "reward_margin": 0.3}) == {"val_loss": 0.5,
                                                                                     "val_reward_margin": 0.3}


def test_without_tensorboardx_the_event_files_are_skipped_with_one_warning_not_an_error(tmp_path, monkeypatch,
                                                                                         caplog):
    import sys

    from jobs.trainer.tracking import write_tensorboard

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` now raises ImportError
    history = [{"step": 1, "loss": 2.0, "lr": 1e-4}]
    with caplog.at_level(logging.WARNING, logger="jobs"):
        assert write_tensorboard(tmp_path / "publish" / "tensorboard", history, [{"step": 1, "val_loss": 1.5}]) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tensorboardX" in warnings[0] and "published without" in warnings[0]
    assert not (tmp_path / "publish" / "tensorboard").exists()  # nothing half-written goes into the version


def test_a_failing_event_writer_leaves_no_folder_and_does_not_raise(tmp_path, monkeypatch, caplog):
    import tensorboardX

    from jobs.trainer.tracking import write_tensorboard

    class Broken:
        def __init__(self, logdir, **kw):
            (Path(logdir) / "events.out.tfevents.partial").write_bytes(b"x")

        def add_scalar(self, *a):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr(tensorboardX, "SummaryWriter", Broken)
    with caplog.at_level(logging.WARNING, logger="jobs"):
        assert write_tensorboard(tmp_path / "tb", [{"step": 1, "loss": 1.0}], []) is None
    assert "No space left" in caplog.text and not (tmp_path / "tb").exists()


def test_the_pod_gets_the_tracking_uri_in_the_named_variable_and_the_token_only_from_a_secret():
    from launcher import render
    from launcher.settings import make_settings

    s = make_settings(namespace="ml", mlflow_tracking_uri="http://mlflow.ml:5000", mlflow_token_secret="mlflow-auth")
    spec = parse_spec({**BASE, "tracking": {"mlflow": {"experiment": "e", "uri_env": "TRACKING_URL"}}})
    env = {e["name"]: e for e in render.render_job(spec, s)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TRACKING_URL"]["value"] == "http://mlflow.ml:5000"
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "mlflow-auth",
                                                                          "key": "MLFLOW_TRACKING_TOKEN"}}
    untracked = render.render_job(parse_spec(BASE), s)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not {"MLFLOW_TRACKING_URI", "TRACKING_URL", "MLFLOW_TRACKING_TOKEN"} & {e["name"] for e in untracked}
