"""A DPO run end to end on CPU, as a user starts one: `launcher submit spec.yaml --local` with
examples/preference's pairs (the style preference: polite over rude, the same fact on both sides), a folder as the
object store. It trains on the packed path, publishes a complete version, and on held-out pairs (facts it never saw)
the adapter prefers the chosen answer where the base did not: the eval report's preference section says so, and the
page shows it. It is tracked (the stack's MLflow server, through the launcher's setting): the MLflow run and the
version's TensorBoard event files hold the objective's own metrics (reward accuracy and margin, preference accuracy)
beside the loss. SmolLM2-135M cut to 4 layers (conftest's short_model_dir) and short sequences keep it short."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from published import find_run, mlflow_get

pytestmark = [pytest.mark.train, pytest.mark.mlflow]

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "examples" / "preference"


def test_a_local_dpo_run_publishes_an_adapter_that_prefers_the_chosen_answers(tmp_path, short_model_dir,
                                                                              mlflow_server):
    from jobs.publish import verify_version
    from jobs.storage import join, open_store

    experiment = f"dpo-{uuid.uuid4().hex[:8]}"
    train = tmp_path / "pairs.jsonl"
    train.write_text("\n".join((PAIRS / "pairs.jsonl").read_text().splitlines()[:32]) + "\n")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join((PAIRS / "heldout.jsonl").read_text().splitlines()[:12]) + "\n")
    spec = {"name": "pref-e2e", "base_model": {"uri": str(short_model_dir)},
            "dataset": {"train": str(train), "validation": str(heldout)}, "output": str(tmp_path / "store"),
            "lora": {"rank": 8, "alpha": 16},
            "training": {"method": "dpo", "epochs": 3, "max_seq_length": 64, "per_device_batch_size": 8,
                         "gradient_accumulation_steps": 1, "learning_rate": 2e-3, "eval_interval_steps": 4,
                         "checkpoint_interval_steps": 4, "early_stopping_patience": None},
            "data": {"min_rows": 8, "balance": False},
            "eval": {"num_prompts": 1, "max_new_tokens": 8}, "merge": {"enabled": False}, "resources": {"gpus": 0},
            "tracking": {"mlflow": {"experiment": experiment}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "LAUNCHER_LOCAL_STATE_DIR":
           str(tmp_path / "state"), "LAUNCHER_MLFLOW_TRACKING_URI": mlflow_server.uri}
    proc = subprocess.run([sys.executable, "-m", "launcher", "submit", str(path), "--local"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "DPO pairs" in out and "reward accuracy" in out and "tok/s" in out, out[-4000:]

    store, prefix = open_store(str(tmp_path / "store"))
    run = join(prefix, "pref-e2e")
    assert verify_version(store, run, "v1") == []
    report = json.loads(store.get_bytes(join(run, "v1", "eval_report.json")))
    pref = report["preference"]
    assert pref["method"] == "dpo" and pref["beta"] == 0.1 and pref["pairs"] == 12, pref
    assert pref["preference_accuracy_after"] >= 0.9, pref
    assert pref["preference_accuracy_after"] > pref["preference_accuracy_before"], pref
    assert pref["reward_accuracy_after"] >= 0.9 and pref["reward_margin_after"] > 0, pref
    v = report["validation"]
    assert v["loss_before"] == pytest.approx(0.6931, abs=1e-3) and v["loss_after"] < v["loss_before"], v
    assert v["perplexity_before"] is None, "a DPO loss has no perplexity"
    assert len(v["losses_after"]) == 12, "one held-out loss per pair (the promotion gate pairs them)"
    page = store.get_bytes(join(run, "v1", "eval_report.md")).decode()
    assert "preference (dpo, beta 0.1)" in page, page[:3000]

    # Tracking: each step's DPO metrics and each validation's, under the names the history and the evaluations
    # give them (a validation's prefixed as its loss is), in the version's TensorBoard files and the MLflow run.
    from jobs.storage import download_prefix
    from jobs.trainer.tracking import read_tensorboard

    history, evals = report["training"]["history"], report["training"]["evals"]
    assert {"reward_accuracy", "reward_margin"} <= set(history[0]), history[0]
    assert {"preference_accuracy", "reward_accuracy", "reward_margin"} <= set(evals[0]), evals[0]
    download_prefix(store, join(run, "v1", "tensorboard") + "/", tmp_path / "tb")
    scalars = read_tensorboard(tmp_path / "tb")
    for name in ("loss", "reward_accuracy", "reward_margin"):
        assert scalars[name] == [(h["step"], pytest.approx(h[name], abs=1e-5)) for h in history], name
    for name in ("val_loss", "val_preference_accuracy", "val_reward_accuracy", "val_reward_margin"):
        key = name if name == "val_loss" else name.removeprefix("val_")
        assert scalars[name] == [(e["step"], pytest.approx(e[key], abs=1e-5)) for e in evals], name
    mlflow_run = find_run(mlflow_server.uri, experiment)
    assert mlflow_run["info"]["status"] == "FINISHED"

    def mlflow_history(key: str) -> list[tuple[int, float]]:
        got = mlflow_get(mlflow_server.uri, "mlflow/metrics/get-history", run_id=mlflow_run["info"]["run_id"],
                         metric_key=key)
        return sorted((m["step"], m["value"]) for m in got.get("metrics", []))

    for name in ("val_loss", "val_preference_accuracy", "val_reward_accuracy", "val_reward_margin"):
        key = name if name == "val_loss" else name.removeprefix("val_")
        assert mlflow_history(name) == [(e["step"], pytest.approx(e[key], abs=1e-5)) for e in evals], name
    for name in ("loss", "reward_accuracy", "reward_margin"):  # with jobs/trainer/loop.py passing them on
        assert mlflow_history(name) == [(h["step"], pytest.approx(h[name], abs=1e-5)) for h in history], name
