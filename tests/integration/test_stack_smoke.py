"""Each part of the local stack is the real thing and behaves as a cluster would."""
from __future__ import annotations

import hashlib
import os
import subprocess
import time
import urllib.request

import pytest

WAIT = 60


def _wait(predicate, what: str, timeout: float = WAIT):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _job(name: str, gpus: int) -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{"name": "main", "image": "busybox", "command": ["true"],
                                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
            }},
        },
    }


@pytest.mark.kube
def test_apiserver_reports_real_version(kube_api):
    from kubernetes import client

    info = client.VersionApi(kube_api).get_code()
    assert info.git_version.startswith("v1.") and info.major == "1"


@pytest.mark.kube
def test_gpu_job_is_scheduled_on_gpu_node_and_completes(kube_api, namespace):
    from kubernetes import client

    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    batch.create_namespaced_job(namespace, _job("smoke-gpu", 1))

    def pod():
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=smoke-gpu").items
        return pods[0] if pods and pods[0].spec.node_name else None

    p = _wait(pod, "the Job controller's pod to be bound")
    assert p.spec.node_name == "kwok-gpu-0", "the scheduler must bind a GPU pod to the GPU node"
    job = _wait(lambda: (j := batch.read_namespaced_job(name="smoke-gpu", namespace=namespace))
                and any(c.type == "Complete" and c.status == "True" for c in (j.status.conditions or [])) and j,
                "Job Complete")
    assert job.status.succeeded == 1


@pytest.mark.kube
def test_job_asking_for_too_many_gpus_stays_pending_with_scheduler_reason(kube_api, namespace):
    from kubernetes import client

    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    batch.create_namespaced_job(namespace, _job("smoke-9gpu", 9))

    def unschedulable():
        for p in core.list_namespaced_pod(namespace, label_selector="job-name=smoke-9gpu").items:
            for c in p.status.conditions or []:
                if c.type == "PodScheduled" and c.status == "False" and c.message:
                    return p, c
        return None

    pod, cond = _wait(unschedulable, "PodScheduled=False")
    assert pod.status.phase == "Pending"
    assert cond.reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond.message


@pytest.mark.s3
def test_object_round_trips_through_minio_with_matching_checksum(stack, s3_client, s3_prefix):
    data = os.urandom(6 * 1024 * 1024 + 17)  # over the multipart threshold
    key = s3_prefix.split("/", 3)[3] + "/blob.bin"
    import io
    s3_client.upload_fileobj(io.BytesIO(data), stack.bucket, key)
    out = io.BytesIO()
    s3_client.download_fileobj(stack.bucket, key, out)
    assert hashlib.sha256(out.getvalue()).hexdigest() == hashlib.sha256(data).hexdigest()
    server = urllib.request.urlopen(stack.s3_endpoint + "/minio/health/live").headers.get("Server", "")
    assert "MinIO" in server


@pytest.mark.s3
def test_minio_rejects_a_wrong_secret(stack):
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    bad = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.s3_access_key,
                       aws_secret_access_key="not-the-secret", region_name="us-east-1",
                       config=Config(s3={"addressing_style": "path"}))
    with pytest.raises(ClientError) as err:
        bad.list_objects_v2(Bucket=stack.bucket)
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


@pytest.mark.helm
def test_helm_answers_with_its_pinned_version(stack):
    out = subprocess.run([stack.helm, "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("v3."), out


@pytest.mark.docker
def test_base_image_runs_under_docker(stack):
    out = subprocess.run(["/usr/bin/docker", "run", "--rm", "--network", "none", "lora-jobs/debian:bookworm",
                          "cat", "/etc/debian_version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(".")[0] == "12"


@pytest.mark.s3
def test_a_failing_tests_report_does_not_print_the_minio_secret(stack, tmp_path):
    """pytest prints a failing test's fixture arguments (the Stack, the S3 environment): the local MinIO's
    secret key is redacted there, and so never lands in a CI log."""
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "test_fails_with_the_stack.py").write_text(
        "def test_fails(stack, s3_env):\n"
        "    env = stack.env()\n"
        "    assert not (stack and s3_env and env), (stack, s3_env, env)\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "--tb=long", "--showlocals", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(repo), "STACK_RUN": str(repo / ".stack")})
    out = proc.stdout + proc.stderr
    leaked = stack.s3_secret_key in out
    shown = out.replace(stack.s3_secret_key, "<THE SECRET>")[-3000:]  # this report must not leak it either
    assert proc.returncode == 1 and "1 failed" in out, shown
    assert stack.s3_access_key in out, "the report shows the fixtures (the access key is not secret)"
    assert "<redacted>" in out and not leaked, f"the MinIO secret key is printed in a failing test's report:\n{shown}"
