"""The dev MinIO gives training pods a user of their own, limited to the chart's buckets.

kwok runs no containers, so the chart's setup hook cannot run as a pod here. What is proved
instead, against the stack's real MinIO with the real `mc` (hack/build-stack.sh mc):
* the hook's own script and policy, taken from the rendered chart and run with the Job's
  env, create the buckets and the training user, and a second run (helm upgrade) passes;
* that user can list, read, write and delete objects in the chart's buckets, and is refused
  every other bucket, bucket creation and MinIO's admin API;
* the chart wires it: training pods (the launcher's settings) get the scoped user's Secret,
  root credentials reach only MinIO and the hook, as files; a Secret holding root is refused.
"""
from __future__ import annotations

import base64
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.integration.test_chart import REPO, _versions, find, helm, settings_from_chart, template  # noqa: F401

pytestmark = [pytest.mark.helm, pytest.mark.s3]


@pytest.fixture(scope="module")
def mc() -> str:
    proc = subprocess.run(["bash", str(REPO / "hack" / "build-stack.sh"), "mc"], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode:
        pytest.fail(f"hack/build-stack.sh mc failed:\n{proc.stderr}", pytrace=False)
    cache = Path(os.environ.get("STACK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                 / "lora-jobs" / "stack")
    return str(cache / f"mc-{_versions()['MC_VERSION']}" / "bin" / "mc")


def _secret(docs: list[dict], name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in find(docs, "Secret", name)["data"].items()}


class Hook:
    """The chart's setup hook, rendered, run on this machine as its pod would run it."""

    def __init__(self, docs: list[dict], mc: str, stack, tmp: Path):
        self.docs, self.mc, self.stack, self.tmp = docs, mc, stack, tmp
        setup = find(docs, "ConfigMap", "lora-jobs-minio-setup")["data"]
        job = find(docs, "Job", "lora-jobs-minio-buckets")
        self.container = job["spec"]["template"]["spec"]["containers"][0]
        self.env = {e["name"]: e["value"] for e in self.container["env"]}
        for name in ("policy.json", "setup.sh"):
            (tmp / name).write_text(setup[name])
        self.root = tmp / "minio-root"
        self.root.mkdir()
        # The chart's MinIO would start with its root Secret; the stack's MinIO has its own root.
        (self.root / "root-user").write_text(stack.s3_access_key)
        (self.root / "root-password").write_text(stack.s3_secret_key)
        self.user_dir = tmp / "s3"
        self.user_dir.mkdir()
        training = _secret(docs, "lora-jobs-s3")
        self.set_user(training["AWS_ACCESS_KEY_ID"], training["AWS_SECRET_ACCESS_KEY"])

    def set_user(self, key_id: str, secret: str) -> None:
        (self.user_dir / "access-key-id").write_text(key_id)
        (self.user_dir / "secret-access-key").write_text(secret)

    def run(self) -> subprocess.CompletedProcess:
        env = {**self.env, "MINIO_ENDPOINT": self.stack.s3_endpoint, "POLICY_FILE": str(self.tmp / "policy.json"),
               "ROOT_CREDENTIALS_DIR": str(self.root), "S3_CREDENTIALS_DIR": str(self.user_dir),
               "MC_CONFIG_DIR": str(self.tmp / ".mc"), "MINIO_WAIT_ATTEMPTS": "2",
               "PATH": f"{Path(self.mc).parent}:/usr/bin:/bin"}
        assert self.container["command"][:1] == ["/bin/sh"]
        return subprocess.run(["/bin/sh", str(self.tmp / "setup.sh")], env=env, capture_output=True, text=True,
                              timeout=120)

    def admin(self, *args: str) -> subprocess.CompletedProcess:
        env = {"MC_CONFIG_DIR": str(self.tmp / ".mc"), "PATH": "/usr/bin:/bin"}
        return subprocess.run([self.mc, *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture()
def chart(helm, mc, stack, tmp_path):
    tag = uuid.uuid4().hex[:8]
    buckets = [f"policy-{tag}", f"policy-{tag}-models"]
    values = {"minio": {"enabled": True, "extraBuckets": buckets[1:],
                        "trainingUser": {"accessKeyId": f"training-{tag}", "secretAccessKey": f"secret-{tag}-x"}},
              "s3": {"bucket": buckets[0]}}
    docs = template(helm, values=values)
    hook = Hook(docs, mc, stack, tmp_path)
    yield docs, hook, buckets, values
    policy = hook.env["POLICY_NAME"]
    hook.admin("admin", "user", "rm", "lora-jobs-root", values["minio"]["trainingUser"]["accessKeyId"])
    hook.admin("admin", "policy", "rm", "lora-jobs-root", policy)
    for b in buckets:
        hook.admin("rb", "--force", f"lora-jobs-root/{b}")


def _client(stack, key_id: str, secret: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=key_id, aws_secret_access_key=secret,
                        region_name="us-east-1", config=Config(s3={"addressing_style": "path"},
                                                               retries={"max_attempts": 1}))


def _denied(call, **kwargs) -> bool:
    from botocore.exceptions import ClientError

    try:
        call(**kwargs)
    except ClientError as err:
        return err.response["Error"]["Code"] == "AccessDenied"
    return False


def test_the_hook_creates_a_training_user_that_reaches_only_the_charts_buckets(chart, stack, s3_client):
    docs, hook, buckets, values = chart
    first = hook.run()
    assert first.returncode == 0, first.stderr + first.stdout
    user = values["minio"]["trainingUser"]
    assert f"policy {hook.env['POLICY_NAME']} (buckets: {' '.join(buckets)}) is attached to {user['accessKeyId']}" \
        in first.stdout
    assert user["secretAccessKey"] not in first.stdout + first.stderr
    again = hook.run()  # post-upgrade: every step is idempotent
    assert again.returncode == 0, again.stderr + again.stdout

    s3 = _client(stack, user["accessKeyId"], user["secretAccessKey"])
    for bucket in buckets:
        s3.put_object(Bucket=bucket, Key="run/v1/adapter.safetensors", Body=b"weights")
        assert s3.get_object(Bucket=bucket, Key="run/v1/adapter.safetensors")["Body"].read() == b"weights"
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"]] == \
            ["run/v1/adapter.safetensors"]
        s3.head_bucket(Bucket=bucket)
        s3.delete_object(Bucket=bucket, Key="run/v1/adapter.safetensors")
    # the stack's own test bucket exists and is the root's: refused, every way
    s3_client.put_object(Bucket=stack.bucket, Key=f"policy-probe-{buckets[0]}", Body=b"root's")
    try:
        assert _denied(s3.list_objects_v2, Bucket=stack.bucket)
        assert _denied(s3.get_object, Bucket=stack.bucket, Key=f"policy-probe-{buckets[0]}")
        assert _denied(s3.put_object, Bucket=stack.bucket, Key="x", Body=b"x")
    finally:
        s3_client.delete_object(Bucket=stack.bucket, Key=f"policy-probe-{buckets[0]}")
    assert _denied(s3.create_bucket, Bucket=f"{buckets[0]}-new")
    assert _denied(s3.delete_bucket, Bucket=buckets[0])
    assert {b["Name"] for b in s3_client.list_buckets()["Buckets"]} >= set(buckets)
    # the admin API: mc as the training user may not list users
    hook.admin("alias", "set", "training", stack.s3_endpoint, user["accessKeyId"], user["secretAccessKey"])
    refused = hook.admin("admin", "user", "list", "training")
    assert refused.returncode != 0 and "Access Denied" in refused.stdout + refused.stderr


def test_the_hook_refuses_to_hand_training_pods_the_root_user(chart, stack):
    docs, hook, buckets, values = chart
    hook.set_user(stack.s3_access_key, stack.s3_secret_key)
    proc = hook.run()
    assert proc.returncode != 0
    assert "the S3 Secret holds MinIO's root user" in proc.stderr
    assert stack.s3_secret_key not in proc.stdout + proc.stderr


def test_training_pods_get_the_scoped_user_and_root_stays_with_minio_as_files(chart):
    docs, hook, buckets, values = chart
    root = _secret(docs, "lora-jobs-minio-root")
    training = _secret(docs, "lora-jobs-s3")
    assert training == {"AWS_ACCESS_KEY_ID": values["minio"]["trainingUser"]["accessKeyId"],
                        "AWS_SECRET_ACCESS_KEY": values["minio"]["trainingUser"]["secretAccessKey"]}
    assert root["root-user"] not in training.values() and root["root-password"] not in training.values()
    # what the launcher hands training pods (launcher/render.py reads these settings)
    settings = settings_from_chart(docs, "ns-test")
    assert settings.s3_secret_name == "lora-jobs-s3"
    # the root Secret is mounted by MinIO and the hook only, as files; no pod has it in env
    mounted_by = set()
    for d in docs:
        pod = (d.get("spec", {}).get("template", {}).get("spec") if d["kind"] in ("Deployment", "Job")
               else d.get("spec") if d["kind"] == "Pod" else None)
        if not pod:
            continue
        for v in pod.get("volumes", []):
            if v.get("secret", {}).get("secretName") == "lora-jobs-minio-root":
                mounted_by.add(d["metadata"]["name"])
        for c in pod["containers"]:
            refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e}
            assert "lora-jobs-minio-root" not in refs, d["metadata"]["name"]
    assert mounted_by == {"lora-jobs-minio", "lora-jobs-minio-buckets"}
    minio = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in minio["env"]}
    mount = next(m["mountPath"] for m in minio["volumeMounts"] if m["name"] == "minio-root")
    assert env["MINIO_ROOT_USER_FILE"] == f"{mount}/root-user"
    assert env["MINIO_ROOT_PASSWORD_FILE"] == f"{mount}/root-password"
    assert not {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} & set(env)
    # the hook gives the policy to the user of the Secret that training pods read
    hook_pod = find(docs, "Job", "lora-jobs-minio-buckets")["spec"]["template"]["spec"]
    s3_volume = next(v for v in hook_pod["volumes"] if v["name"] == "s3-credentials")
    assert s3_volume["secret"]["secretName"] == settings.s3_secret_name
    assert {i["key"] for i in s3_volume["secret"]["items"]} == {settings.s3_access_key_key, settings.s3_secret_key_key}
