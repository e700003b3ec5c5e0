"""The trainer IMAGE end to end on CPU: `docker run` of lora-jobs/trainer against the real MinIO.

test_train_e2e.py proves the code (`python -m jobs` from the tree); this proves the image the
cluster pulls: built by hack/build-images.sh, run with the hardening the Kubernetes Job applies
(read-only root filesystem, uid/gid 10001, every capability dropped, no-new-privileges, only
/scratch and /tmp writable, HF_HOME=/scratch/hf), credentials only from the environment, the
spec mounted read-only where the ConfigMap goes and the termination message written to
/dev/termination-log. A model of SmolLM2's architecture and vocabulary (conftest's tiny_model_dir, randomly
initialised: the subject is the image, not what is learned; test_train_e2e.py trains the real SmolLM2-135M)
trains, evaluates, merges and publishes a version that verifies against its manifest; a missing dataset exits 12
with a message that names the bucket and key and leaks no secret.
"""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.docker, pytest.mark.train, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"
from images import DOCKER, TRAINER  # noqa: E402
from published import assert_complete_v1, small_cpu_spec  # noqa: E402

UID = 10001


@pytest.fixture(scope="module")
def trainer_image(request) -> str:
    """The trainer image, built (or found up to date in the layer cache) by the project's script."""
    if subprocess.run([DOCKER, "info"], capture_output=True).returncode != 0:
        request.getfixturevalue("stack")  # hack/stack.sh up starts dockerd
        if subprocess.run([DOCKER, "info"], capture_output=True).returncode != 0:
            pytest.fail("the Docker engine is not reachable, even after hack/stack.sh up", pytrace=False)
    proc = subprocess.run(["bash", str(REPO / "hack" / "build-images.sh"), "trainer"], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"hack/build-images.sh trainer failed:\n{proc.stderr[-4000:]}", pytrace=False)
    return TRAINER


def _key(s3_prefix: str, rel: str) -> str:
    return s3_prefix.split("/", 3)[3] + "/" + rel


def _upload_data(s3_client, stack, s3_prefix: str, rows: int = 16) -> str:
    lines = (DEMO / "train.jsonl").read_text().splitlines()[:rows]
    s3_client.put_object(Bucket=stack.bucket, Key=_key(s3_prefix, "data/train.jsonl"),
                         Body=("\n".join(lines) + "\n").encode())
    return f"{s3_prefix}/data/train.jsonl"


def _spec(folder: Path, name: str, model_uri: str, train_uri: str, output: str) -> Path:
    """The small CPU settings of test_train_e2e.py."""
    spec = small_cpu_spec(name, model_uri, train_uri, output)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    path.chmod(0o644)  # mounted read-only, read by uid 10001
    return path


def _docker_run(image: str, spec: Path, tmp_path: Path, stack, timeout: int = 600):
    """`docker run` as the Job runs the container: returns (process, termination message path)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.chown(scratch, UID, UID)  # the Job's emptyDir, writable by runAsUser
    tmsg = tmp_path / "termination-log"
    tmsg.touch()
    os.chown(tmsg, UID, UID)
    # Only these variables reach the container (the Job sets exactly these, keys via secretKeyRef);
    # `-e NAME` takes the value from the docker client's environment, so no secret is on the command line.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **stack.s3_env()}
    proc = subprocess.run(
        [DOCKER, "run", "--rm", "--network", "host",
         "--read-only", "--tmpfs", "/tmp", "--user", f"{UID}:{UID}", "--cap-drop", "ALL",
         "--security-opt", "no-new-privileges",
         "-v", f"{spec}:/etc/lora-jobs/spec.yaml:ro", "-v", f"{scratch}:/scratch", "-v", f"{tmsg}:/dev/termination-log",
         "-e", "AWS_ENDPOINT_URL", "-e", "AWS_ACCESS_KEY_ID", "-e", "AWS_SECRET_ACCESS_KEY", "-e", "AWS_REGION",
         "-e", "LORA_JOBS_WORKDIR=/scratch", "-e", "HF_HOME=/scratch/hf", "-e", f"LORA_JOBS_RUN_ID=img-{uuid.uuid4().hex[:8]}",
         "-e", f"LORA_JOBS_IMAGE={image}",
         image, "run", "--spec", "/etc/lora-jobs/spec.yaml"],
        env=env, capture_output=True, text=True, timeout=timeout)
    return proc, tmsg


def test_trainer_image_trains_merges_and_publishes_a_verified_version(
        tmp_path, trainer_image, stack, s3_client, s3_prefix, tiny_model_in_minio, s3_env):
    from jobs.storage import open_store

    model_uri = tiny_model_in_minio
    train_uri = _upload_data(s3_client, stack, s3_prefix)
    spec = _spec(tmp_path, "image-e2e", model_uri, train_uri, s3_prefix + "/out")

    proc, tmsg = _docker_run(trainer_image, spec, tmp_path, stack)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-5000:]
    message = json.loads(tmsg.read_text())
    assert message["exit_code"] == 0 and message["stage"] == "done", message
    assert f"published {s3_prefix}/out/image-e2e/v1" in message["message"], message
    assert "tok/s" in logs and "ETA" in logs, "progress lines are logged"

    store, prefix = open_store(s3_prefix + "/out")
    run_prefix = f"{prefix}/image-e2e"
    keys = assert_complete_v1(store, run_prefix)
    assert any(k.startswith("merged/") and k.endswith(".safetensors") for k in keys), sorted(keys)

    meta = json.loads(store.get_bytes(f"{run_prefix}/v1/metadata.json"))
    assert meta["image"] == trainer_image, "the image the run came from is recorded"
    assert meta["lora"]["rank"] == 16 and meta["lora"]["alpha"] == 32
    assert len(meta["base_model"]["sha256"]) == 64 and len(meta["dataset"]["sha256"]) == 64
    assert meta["training"]["steps"] == meta["training"]["planned_steps"] >= 4
    report = json.loads(store.get_bytes(f"{run_prefix}/v1/eval_report.json"))
    assert report["merge"]["ok"], report["merge"]
    assert len(report["generations"]) == 2
    # The run worked in the mounted /scratch (the Job's emptyDir), the only writable disk it has.
    assert (tmp_path / "scratch" / "base-model" / "config.json").is_file()


def test_trainer_image_missing_dataset_exits_12_naming_bucket_and_key_without_the_secret(
        tmp_path, trainer_image, stack, s3_client, s3_prefix):
    # A one-file "model": fetch lists and downloads it, then fails on the dataset before loading anything.
    s3_client.put_object(Bucket=stack.bucket, Key=_key(s3_prefix, "model/config.json"), Body=b"{}")
    missing_key = _key(s3_prefix, "data/does-not-exist.jsonl")
    spec = _spec(tmp_path, "image-missing", f"{s3_prefix}/model/", f"s3://{stack.bucket}/{missing_key}",
                 s3_prefix + "/out")

    proc, tmsg = _docker_run(trainer_image, spec, tmp_path, stack, timeout=300)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 12, logs[-3000:]
    message = json.loads(tmsg.read_text())
    assert message["exit_code"] == 12 and message["stage"] == "fetch", message
    assert stack.bucket in message["message"] and missing_key in message["message"], message
    for text in (message["message"], logs):
        assert stack.s3_secret_key not in text, "the secret key leaked"
    assert "Traceback" not in logs, "a user's mistake is one message, not a traceback"
