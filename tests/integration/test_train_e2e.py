"""The training job end to end on CPU: real SmolLM2-135M, real MinIO, the real container entrypoint (the
preemption test: the model cut to 4 layers, conftest's short_model_dir)."""
from __future__ import annotations

import html
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from published import assert_complete_v1, find_run, mlflow_get, small_cpu_spec

pytestmark = [pytest.mark.train, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"


def _upload_data(s3_client, stack, s3_prefix: str, rows: int = 16) -> str:
    lines = (DEMO / "train.jsonl").read_text().splitlines()[:rows]
    key = s3_prefix.split("/", 3)[3] + "/data/train.jsonl"
    s3_client.put_object(Bucket=stack.bucket, Key=key, Body=("\n".join(lines) + "\n").encode())
    return f"s3://{stack.bucket}/{key}"


def _spec(tmp_path: Path, name: str, model_uri: str, train_uri: str, output: str, **training) -> Path:
    spec = small_cpu_spec(name, model_uri, train_uri, output, **training)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _job_env(stack) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(stack.s3_env())
    env.update({"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"})
    return env


def _run_job(spec: Path, workdir: Path, env: dict, tmsg: Path, timeout: int = 600):
    env = {**env, "TERMINATION_MESSAGE_PATH": str(tmsg)}
    return subprocess.run([sys.executable, "-m", "jobs", "run", "--spec", str(spec), "--workdir", str(workdir)],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.mlflow
def test_job_trains_evaluates_merges_and_publishes_a_complete_version(
        tmp_path, stack, s3_client, s3_prefix, model_in_minio, small_model_dir, s3_env, mlflow_server):
    from jobs.storage import open_store

    train_uri = _upload_data(s3_client, stack, s3_prefix)
    spec = _spec(tmp_path, "e2e-cpu", model_in_minio, train_uri, s3_prefix + "/out")
    experiment = f"e2e-{uuid.uuid4().hex[:8]}"  # the run is tracked, as a spec with tracking.mlflow asks
    spec.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), "export": {"gguf": ["q8_0"]},
                                    "tracking": {"mlflow": {"experiment": experiment}}}))
    tmsg = tmp_path / "termination-log"
    proc = _run_job(spec, tmp_path / "work", {**_job_env(stack), "MLFLOW_TRACKING_URI": mlflow_server.uri}, tmsg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(tmsg.read_text())["exit_code"] == 0
    assert "tok/s" in proc.stderr and "ETA" in proc.stderr, "progress lines are logged"

    store, prefix = open_store(s3_prefix + "/out")
    run_prefix = f"{prefix}/e2e-cpu"
    assert_complete_v1(store, run_prefix)

    meta = json.loads(store.get_bytes(f"{run_prefix}/v1/metadata.json"))
    assert meta["lora"]["rank"] == 16 and meta["lora"]["alpha"] == 32 and meta["lora"]["dropout"] == 0.05
    assert len(meta["base_model"]["sha256"]) == 64 and len(meta["dataset"]["sha256"]) == 64
    t = meta["training"]
    assert t["steps"] == t["planned_steps"] >= 4 and t["learning_rate"] == 2e-4
    m = meta["metrics"]
    assert m["val_loss_after"] < m["val_loss_before"], m

    report = json.loads(store.get_bytes(f"{run_prefix}/v1/eval_report.json"))
    data_report = json.loads(store.get_bytes(f"{run_prefix}/v1/data_report.json"))
    assert data_report["train"]["total_lines"] >= data_report["train"]["kept_rows"] > 0
    assert report["merge"]["ok"] and report["merge"]["max_relative_logit_diff"] <= report["merge"]["tolerance"]
    # export.gguf: the merged model in q8_0 and the adapter, each read back and checked, listed in the manifest
    manifest = json.loads(store.get_bytes(f"{run_prefix}/v1/manifest.json"))
    gguf = {g["file"]: g for g in meta["gguf"]}
    assert set(gguf) == {"gguf/e2e-cpu-q8_0.gguf", "gguf/e2e-cpu-adapter-f16.gguf"}, gguf
    for name, g in gguf.items():
        assert manifest["files"][name]["sha256"] == g["sha256"] and g["bytes"] > 0, name
    assert len(report["generations"]) == 2 and all("after" in g for g in report["generations"])
    faith = report["checklist"]["faithfulness"]  # no eval prompts given: the held-out rows' outputs are the references
    assert faith["of"] == 2 and faith["after"]["rouge_l"] is not None and faith["before"]["rouge_l"] is not None
    page = store.get_bytes(f"{run_prefix}/v1/eval_report.html").decode()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page  # the loss curve, inline
    assert html.escape(report["generations"][0]["prompt"]) in page
    history = report["training"]["history"]
    per_epoch = t["planned_steps"] // 2
    first_epoch = sum(h["loss"] * h["tokens"] for h in history[:per_epoch]) / sum(h["tokens"] for h in history[:per_epoch])
    second_epoch = sum(h["loss"] * h["tokens"] for h in history[per_epoch:]) / sum(h["tokens"] for h in history[per_epoch:])
    assert second_epoch < first_epoch, f"training loss should fall: epoch 1 {first_epoch:.4f}, epoch 2 {second_epoch:.4f}"

    # Live progress, as `launcher status` reads it: the last word of the run, in the store.
    from jobs.progress import describe, read_progress
    from jobs.spec import load_spec_text

    progress = read_progress(store, run_prefix, load_spec_text(spec.read_text()).spec_hash())
    assert progress is not None, "no progress object"
    assert progress["state"] == "succeeded" and progress["version"] == "v1", progress
    assert progress["step"] == progress["total_steps"] == t["steps"], progress
    assert progress["examples_seen"] >= t["steps"] and progress["tokens_seen"] > 0 and progress["loss"] > 0
    assert progress["val_loss"] is not None and progress["updated_at"] >= progress["started_at"]
    assert describe(progress).startswith("succeeded, published v1, loss "), describe(progress)

    from jobs.storage import download_prefix

    # The MLflow run: the whole spec as params, loss per step, val_loss per evaluation, where v1 is, the eval page.
    run = find_run(mlflow_server.uri, experiment)
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["lora.rank"] == "16" and params["training.epochs"] == "2" and params["name"] == "e2e-cpu"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["lora-jobs.version_location"] == f"{s3_prefix}/out/e2e-cpu/v1", tags
    run_id = run["info"]["run_id"]
    loss = mlflow_get(mlflow_server.uri, "mlflow/metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    assert sorted(m["step"] for m in loss) == [h["step"] for h in history], "one loss per step"
    val = mlflow_get(mlflow_server.uri, "mlflow/metrics/get-history", run_id=run_id, metric_key="val_loss")["metrics"]
    assert sorted(v["step"] for v in val) == [e["step"] for e in report["training"]["evals"]], "one per evaluation"
    latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert latest["val_loss_after"] == pytest.approx(m["val_loss_after"]) and latest["tokens_per_s"] > 0
    # The TensorBoard event file of the version holds the same steps.
    from jobs.trainer.tracking import read_tensorboard
    tb = tmp_path / "tb"
    download_prefix(store, f"{run_prefix}/v1/tensorboard/", tb)
    scalars = read_tensorboard(tb)
    assert [s for s, _ in scalars["loss"]] == [h["step"] for h in history] and len(scalars["val_loss"]) == len(val) > 0
    root = run["info"]["artifact_uri"].split(":", 1)[1].lstrip("/")
    assert "eval_report.md" in {f["path"] for f in mlflow_get(mlflow_server.uri, "mlflow-artifacts/artifacts",
                                                                 path=root)["files"]}

    # The published adapter, reloaded on the base, gives the published merged model's logits.
    dl = tmp_path / "download"
    download_prefix(store, f"{run_prefix}/v1/", dl)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dl / "tokenizer")
    ids = tok("How do I reset the Acme Router X2?", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, dl / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(dl / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = with_adapter(**ids).logits, merged(**ids).logits
    assert float((a - b).abs().max()) / max(1.0, float(a.abs().max())) < 1e-3


def test_preempted_run_resumes_from_its_checkpoint_not_step_zero(
        tmp_path, stack, s3_client, s3_prefix, short_model_in_minio, s3_env):
    from jobs.storage import open_store

    train_uri = _upload_data(s3_client, stack, s3_prefix)
    spec = _spec(tmp_path, "e2e-resume", short_model_in_minio, train_uri, s3_prefix + "/out",
                 epochs=3, max_steps=6, checkpoint_interval_steps=2, per_device_batch_size=2)
    # no merge and no generations: this test is about the training loop
    data = yaml.safe_load(spec.read_text())
    data["merge"]["enabled"] = False
    data["eval"]["enabled"] = False
    spec.write_text(yaml.safe_dump(data))
    env = {**_job_env(stack), "TERMINATION_MESSAGE_PATH": str(tmp_path / "tmsg1")}
    workdir = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "run", "--spec", str(spec), "--workdir", str(workdir)],
                            env=env, stderr=subprocess.PIPE, text=True, cwd=REPO)
    log = []
    deadline = time.time() + 400
    for line in proc.stderr:  # wait for step 3, then preempt as the kubelet would
        log.append(line)
        if "step 3/6" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(log[-20:])
    rest = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert code == 75, "".join(log[-20:]) + rest[-3000:]
    tmsg = json.loads((tmp_path / "tmsg1").read_text())
    assert tmsg["exit_code"] == 75 and tmsg["stage"] == "train"
    # The signal lands during step 3 or 4: the run finishes that step, checkpoints it, exits.
    import re
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)/6", tmsg["message"]).group(1))
    assert stopped_at in (3, 4), tmsg
    store, prefix = open_store(s3_prefix + "/out")
    assert not store.list(f"{prefix}/e2e-resume/v1/"), "a preempted run publishes nothing"
    from jobs.progress import read_progress
    from jobs.spec import load_spec_text

    progress = read_progress(store, f"{prefix}/e2e-resume", load_spec_text(spec.read_text()).spec_hash())
    assert progress["state"] == "preempted" and progress["stage"] == "train" and progress["exit_code"] == 75, progress
    assert progress["step"] == stopped_at and "stopped by SIGTERM" in progress["error"], progress

    # The retry: a fresh workdir (a new pod), same spec.
    proc2 = _run_job(spec, tmp_path / "work2", _job_env(stack), tmp_path / "tmsg2")
    assert proc2.returncode == 0, proc2.stderr[-4000:]
    assert f"resumed from checkpoint at step {stopped_at} of 6" in proc2.stderr
    assert f"step {stopped_at}/6 " not in proc2.stderr and f"step {stopped_at + 1}/6 " in proc2.stderr
    assert "step 1/6 " not in proc2.stderr
    meta = json.loads(store.get_bytes(f"{prefix}/e2e-resume/v1/metadata.json"))
    assert meta["training"]["steps"] == 6 and meta["training"]["resumed_from_step"] == stopped_at
    report = json.loads(store.get_bytes(f"{prefix}/e2e-resume/v1/eval_report.json"))
    assert [h["step"] for h in report["training"]["history"]] == [1, 2, 3, 4, 5, 6], \
        "history has each of the 6 steps exactly once"
