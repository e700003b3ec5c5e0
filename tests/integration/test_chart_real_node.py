"""The chart on the stack's REAL node (hack/node.sh: kubelet, containerd, CNI bridge, CoreDNS, kube-proxy).

One release, start to end, in a namespace whose pods go to the real node and that enforces the
restricted Pod Security Standard:

* `helm install` with minio.enabled: the dev MinIO (lora-jobs/minio, built by hack/build-images.sh
  from the MinIO and mc the stack builds) runs as a real pod, and the post-install hook — mc in
  that image — creates the bucket, the scoped policy and the training user (install fails if it
  does not complete);
* `helm test`: the launcher image's check reaches the bucket through the Service name, i.e.
  CoreDNS and kube-proxy's ClusterIP, as the training user;
* the base model and a dataset go into that MinIO through its ClusterIP from the node itself
  (`hack/node.sh exec`: a process on the node, as an admin's port-forward would);
* `helm upgrade` with trainingJob (values: a tiny CPU spec on SmolLM2 cut to 4 layers, training only): the chart's
  one-off Job trains on the node and publishes v1, which verifies against its manifest;
* `helm uninstall` removes every object and pod of the release.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from published import cpu_spec, lean, train_jsonl
from tests.integration.test_chart import CHART, REPO, run_helm

pytestmark = [pytest.mark.node, pytest.mark.helm, pytest.mark.train, pytest.mark.s3]

RELEASE = "lj"
FULLNAME = "lj-lora-jobs"
BUCKET = "lora-jobs"


def _minio_version() -> str:
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        if line.startswith("MINIO_VERSION="):
            return line.split("=", 1)[1].strip()
    raise AssertionError("no MINIO_VERSION in hack/versions.env")


def helm(stack, *args: str, values: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_helm(stack.helm, *args, values=values, kubeconfig=stack.kubeconfig, check=False, timeout=timeout)


def on_node(code: str, *args: str, env: dict[str, str], stdin: bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Python code run as a process of the node (`hack/node.sh exec`: its network namespace), where pod IPs
    and Service ClusterIPs answer. Credentials travel in the environment, never in argv."""
    return subprocess.run(["bash", str(REPO / "hack" / "node.sh"), "exec", sys.executable, "-c", code, *args],
                          cwd=REPO, input=stdin, capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), "AWS_REGION": "us-east-1", **env})


UPLOAD = """
import os, sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5}))
model_dir, model_key, data_key = sys.argv[1:4]
for name in sorted(os.listdir(model_dir)):
    if os.path.isfile(os.path.join(model_dir, name)):
        s3.upload_file(os.path.join(model_dir, name), os.environ["BUCKET"], f"{model_key}/{name}")
s3.put_object(Bucket=os.environ["BUCKET"], Key=data_key, Body=sys.stdin.buffer.read())
print("uploaded")
"""

VERIFY = """
import json, sys
from jobs.publish import verify_version
from jobs.storage import open_store
store, prefix = open_store(sys.argv[1])
keys = [o.key[len(prefix) + 1:] for o in store.list(prefix + "/")]
print(json.dumps({"latest": store.get_bytes(prefix + "/latest").decode().strip(),
                  "problems": verify_version(store, prefix, "v1"), "keys": keys}))
"""


def wait_for(what: str, check, timeout: float, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail()}")


def pods_report(core, ns: str) -> str:
    out = []
    for p in core.list_namespaced_pod(ns).items:
        states = [(c.name, c.state.to_dict()) for c in p.status.container_statuses or []]
        out.append(f"{p.metadata.name} on {p.spec.node_name}: {p.status.phase} {states}")
        try:
            out.append(core.read_namespaced_pod_log(p.metadata.name, ns, tail_lines=40))
        except Exception as err:  # noqa: BLE001 - a report, best effort
            out.append(f"(no log: {err})")
    return "\n".join(out)


def test_the_chart_installs_tests_trains_and_uninstalls_on_the_real_node(stack, kube_api, node, node_image,
                                                                          trainer_ref, make_node_namespace,
                                                                          short_model_dir):
    from kubernetes import client

    from images import LAUNCHER, VERSION
    from jobs.spec import TrainingRunSpec

    clock, took = [time.monotonic()], {}

    def phase(name: str) -> None:  # seconds per step, printed at the end (pytest -s)
        took[name] = round(time.monotonic() - clock[0])
        clock[0] = time.monotonic()

    minio_ref = node_image("minio", f"lora-jobs/minio:{_minio_version()}")
    launcher_ref = node_image("launcher", LAUNCHER)
    ns = make_node_namespace("chart", s3_secret=False)  # the chart makes the S3 Secret itself
    core, batch = client.CoreV1Api(kube_api), client.BatchV1Api(kube_api)
    registry = node["STACK_REGISTRY"]
    # Fresh dev credentials per run; nothing here prints them.
    train_key, train_secret = "lora-training", secrets.token_hex(16)
    values = {
        "images": {"trainer": {"repository": trainer_ref.rsplit(":", 1)[0], "tag": VERSION, "pullPolicy": "Always"},
                   "launcher": {"repository": launcher_ref.rsplit(":", 1)[0], "tag": VERSION,
                                "pullPolicy": "Always"}},
        "minio": {"enabled": True, "dataSizeLimit": "4Gi",
                  "image": {"repository": minio_ref.rsplit(":", 1)[0], "tag": minio_ref.rsplit(":", 1)[1]},
                  "rootUser": "dev-root", "rootPassword": secrets.token_hex(16),
                  "trainingUser": {"accessKeyId": train_key, "secretAccessKey": train_secret}},
    }
    assert all(ref.startswith(registry + "/") for ref in (minio_ref, launcher_ref, trainer_ref))
    phase("images built and pushed")

    # -- install: MinIO as a pod on the node, then the bucket hook (helm waits for it; install fails without it)
    r = helm(stack, "install", RELEASE, str(CHART), "-n", ns, "--wait", "--timeout", "8m", values=values)
    assert r.returncode == 0, f"helm install failed:\n{r.stdout}\n{r.stderr}\n{pods_report(core, ns)}"
    minio_pods = core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/component=minio").items
    assert len(minio_pods) == 1, [p.metadata.name for p in minio_pods]
    minio_pod = minio_pods[0]
    assert minio_pod.spec.node_name == node["STACK_NODE_NAME"], minio_pod.spec.node_name
    assert minio_pod.status.container_statuses[0].ready and minio_pod.spec.containers[0].image == minio_ref
    assert minio_pod.spec.security_context.run_as_non_root and minio_pod.spec.security_context.run_as_user == 10001
    hook_events = [e for e in core.list_namespaced_event(ns).items
                   if e.involved_object.kind == "Job" and e.involved_object.name == f"{FULLNAME}-minio-buckets"]
    assert any(e.reason == "Completed" for e in hook_events), [(e.reason, e.message) for e in hook_events]
    phase("helm install (MinIO pod, bucket hook)")

    # -- helm test: the launcher image reaches the bucket by the Service's name (CoreDNS, kube-proxy) as the
    # training user the hook made
    # (no --logs: helm v3.19 deletes a hook-succeeded test pod before it reads its log, and then fails)
    r = helm(stack, "test", RELEASE, "-n", ns, "--timeout", "5m")
    assert r.returncode == 0, f"helm test failed:\n{r.stdout}\n{r.stderr}\n{pods_report(core, ns)}"
    assert f"TEST SUITE:     {FULLNAME}-test-s3" in r.stdout and "Phase:          Succeeded" in r.stdout, r.stdout
    assert f"S3 endpoint http://{FULLNAME}-minio.{ns}.svc:9000" in r.stdout, r.stdout
    phase("helm test")

    # -- the base model and the data, through the Service's ClusterIP from the node
    svc = core.read_namespaced_service(f"{FULLNAME}-minio", ns)
    s3_on_node = {"AWS_ENDPOINT_URL": f"http://{svc.spec.cluster_ip}:9000", "AWS_ACCESS_KEY_ID": train_key,
                  "AWS_SECRET_ACCESS_KEY": train_secret, "BUCKET": BUCKET}
    up = on_node(UPLOAD, str(short_model_dir), "models/base", "data/train.jsonl",
                 env=s3_on_node, stdin=train_jsonl())
    assert up.returncode == 0 and b"uploaded" in up.stdout, up.stderr.decode()[-3000:]
    phase("model and data uploaded")

    # -- the chart's one-off training Job, declared in values (GitOps), trains on the node
    spec = lean(cpu_spec("chart-run", f"s3://{BUCKET}/models/base/", f"s3://{BUCKET}/data/train.jsonl",
                         f"s3://{BUCKET}/runs", memory="4Gi", cpu="1800m"))
    spec_hash = TrainingRunSpec.model_validate(spec).spec_hash()
    r = helm(stack, "upgrade", RELEASE, str(CHART), "-n", ns, "--reuse-values", "--wait", "--timeout", "5m",
             values={"trainingJob": {"enabled": True, "specHash": spec_hash, "spec": spec}})
    assert r.returncode == 0, f"helm upgrade failed:\n{r.stdout}\n{r.stderr}\n{pods_report(core, ns)}"
    job_name = f"chart-run-{spec_hash[:8]}"

    def job_done():
        job = batch.read_namespaced_job(job_name, ns)
        ended = {c.type for c in job.status.conditions or [] if c.status == "True"} & {"Complete", "Failed"}
        return job if ended else None

    job = wait_for(f"Job {job_name} to end", job_done, 900, lambda: pods_report(core, ns))
    conditions = {c.type: (c.reason, c.message) for c in job.status.conditions or [] if c.status == "True"}
    assert "Complete" in conditions, f"{conditions}\n{pods_report(core, ns)}"
    pods = core.list_namespaced_pod(ns, label_selector=f"job-name={job_name}").items
    assert pods and {p.spec.node_name for p in pods} == {node["STACK_NODE_NAME"]}, [p.spec.node_name for p in pods]
    assert all(p.spec.containers[0].image == trainer_ref for p in pods)
    log = core.read_namespaced_pod_log(pods[-1].metadata.name, ns)
    assert "published" in log[-2000:], log[-3000:]
    assert train_secret not in log and values["minio"]["rootPassword"] not in log
    phase("helm upgrade with trainingJob, trained and published")

    # -- the published version, read back through the ClusterIP and checked against its manifest
    r = on_node(VERIFY, f"s3://{BUCKET}/runs/chart-run", env=s3_on_node, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    published = json.loads(r.stdout.decode().strip().splitlines()[-1])
    assert published["latest"] == "v1" and published["problems"] == [], published
    keys = set(published["keys"])
    assert {"v1/adapter/adapter_model.safetensors", "v1/manifest.json", "v1/_COMPLETE"} <= keys, sorted(keys)
    assert not any(k.startswith("v2/") for k in keys), sorted(keys)

    # -- uninstall: every object of the release goes, and its pods leave the node
    r = helm(stack, "uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "3m")
    assert r.returncode == 0, f"helm uninstall failed:\n{r.stdout}\n{r.stderr}"
    selector = f"app.kubernetes.io/instance={RELEASE}"
    apps = client.AppsV1Api(kube_api)
    left = {
        "deployments": [d.metadata.name for d in apps.list_namespaced_deployment(ns, label_selector=selector).items],
        "services": [s.metadata.name for s in core.list_namespaced_service(ns, label_selector=selector).items],
        "secrets": [s.metadata.name for s in core.list_namespaced_secret(ns, label_selector=selector).items],
        "jobs": [j.metadata.name for j in batch.list_namespaced_job(ns).items],
    }
    assert not any(left.values()), left
    wait_for("the release's pods to leave the node", lambda: not core.list_namespaced_pod(ns).items, 180,
             lambda: pods_report(core, ns))
    phase("helm uninstall")
    print(f"\nchart on the real node, seconds per step: {took}")
