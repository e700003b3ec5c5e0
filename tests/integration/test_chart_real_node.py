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
* `helm upgrade` with `runs` holding an invalid spec: the submit hook (the launcher image, as the hook's own
  ServiceAccount, finding the cluster and namespace from the pod) fails the upgrade, and its log holds the
  launcher's message naming the field; nothing is submitted;
* `helm upgrade` with `runs` holding a tiny CPU spec on SmolLM2 cut to 4 layers (training only): the hook's
  `launcher submit` creates the Job the launcher names (no hash typed anywhere), which trains on the node and
  publishes v1, which verifies against its manifest; upgrading again resubmits nothing (the same Job);
* `helm uninstall` removes every object and pod of the release; the run, which `launcher submit` made, is not
  one of them.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
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


@pytest.fixture()
def pods_reach_the_api_server(kube_api, node):
    """In-cluster clients (the submit hook's launcher) reach the API server as on any cluster: Service
    default/kubernetes (10.96.0.1:443, whose IP the server's certificate names). The stack's API server listens on
    loopback with --endpoint-reconciler-type none, so that Service has no endpoints; until hack/ gives it one,
    this puts a relay on the pods' gateway in the node's namespace (to the node's own bridge to the API server)
    and an EndpointSlice pointing there, and removes both afterwards. Nothing to do where the Service has
    endpoints already."""
    from kubernetes import client

    discovery = client.DiscoveryV1Api(kube_api)
    if discovery.list_namespaced_endpoint_slice("default", label_selector="kubernetes.io/service-name=kubernetes").items:
        yield
        return
    port = int(client.CoreV1Api(kube_api).read_namespaced_service("kubernetes", "default").spec.ports[0].target_port)
    gateway = "10.251.0.1"  # hack/node.sh POD_GW: where pods already find S3 and DNS
    relay = subprocess.Popen(["bash", str(REPO / "hack" / "node.sh"), "exec", "socat",
                              f"TCP-LISTEN:{port},bind={gateway},fork,reuseaddr", f"TCP:127.0.0.1:{port}"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    name = "kubernetes-test-relay"
    discovery.create_namespaced_endpoint_slice("default", {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "kubernetes",
                                              "endpointslice.kubernetes.io/managed-by": "lora-jobs-tests"}},
        "addressType": "IPv4", "endpoints": [{"addresses": [gateway], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}]})
    try:
        time.sleep(2)
        assert relay.poll() is None, f"the API relay did not start: {relay.stderr.read().decode()}"
        yield
    finally:
        discovery.delete_namespaced_endpoint_slice(name, "default")
        os.killpg(relay.pid, signal.SIGTERM)
        relay.wait(timeout=30)


def test_the_chart_installs_tests_trains_and_uninstalls_on_the_real_node(stack, kube_api, node, node_image,
                                                                          trainer_ref, make_node_namespace,
                                                                          tiny_model_dir, pods_reach_the_api_server):
    from kubernetes import client

    from images import LAUNCHER, VERSION
    from jobs.spec import TrainingRunSpec
    from launcher.render import job_name as job_name_of

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
    up = on_node(UPLOAD, str(tiny_model_dir), "models/base", "data/train.jsonl",
                 env=s3_on_node, stdin=train_jsonl())
    assert up.returncode == 0 and b"uploaded" in up.stdout, up.stderr.decode()[-3000:]
    phase("model and data uploaded")

    # -- an invalid spec in `runs`: the hook's launcher refuses it, the upgrade fails, its log says why
    spec = lean(cpu_spec("chart-run", f"s3://{BUCKET}/models/base/", f"s3://{BUCKET}/data/train.jsonl",
                         f"s3://{BUCKET}/runs", memory="4Gi", cpu="1800m"))
    bad = {**spec, "name": "bad-run", "training": {**spec.get("training", {}), "epochs": 0}}
    r = helm(stack, "upgrade", RELEASE, str(CHART), "-n", ns, "--wait", "--timeout", "5m",
             values={**values, "runs": {"bad-run": bad}})
    assert r.returncode != 0, f"helm upgrade with an invalid spec passed:\n{r.stdout}"
    assert f"{FULLNAME}-submit" in r.stderr, r.stderr
    hook_pods = core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/component=submit").items
    assert len(hook_pods) == 1 and hook_pods[0].spec.node_name == node["STACK_NODE_NAME"], hook_pods
    hook_log = core.read_namespaced_pod_log(hook_pods[0].metadata.name, ns)  # what `kubectl logs` shows
    assert "/etc/lora-jobs/runs/bad-run.yaml" in hook_log and "training.epochs" in hook_log, hook_log
    assert "Traceback" not in hook_log, hook_log
    assert not batch.list_namespaced_job(ns, label_selector="lora-jobs.io/run=bad-run").items
    phase("helm upgrade with an invalid run: refused by the launcher in the hook")

    # -- a valid run in `runs`: the hook submits it, in the cluster, with the chart's defaults
    r = helm(stack, "upgrade", RELEASE, str(CHART), "-n", ns, "--wait", "--timeout", "5m",
             values={**values, "runs": {"chart-run": spec}})
    assert r.returncode == 0, f"helm upgrade failed:\n{r.stdout}\n{r.stderr}\n{pods_report(core, ns)}"
    job_name = job_name_of(TrainingRunSpec.model_validate(spec))
    runs = batch.list_namespaced_job(ns, label_selector="lora-jobs.io/run=chart-run").items
    assert [j.metadata.name for j in runs] == [job_name], [j.metadata.name for j in runs]
    first_uid = runs[0].metadata.uid
    # the namespace from the pod's ServiceAccount, the image from the chart's lora-jobs-launcher ConfigMap
    assert runs[0].metadata.namespace == ns and runs[0].spec.template.spec.containers[0].image == trainer_ref
    # the hook succeeded and is gone (hook-succeeded), the failed one before it too (before-hook-creation)
    assert not batch.list_namespaced_job(ns, label_selector="app.kubernetes.io/component=submit").items
    phase("helm upgrade with runs: submitted by the hook")

    # -- the same values again, while the run trains: the hook runs again and resubmits nothing
    r = helm(stack, "upgrade", RELEASE, str(CHART), "-n", ns, "--wait", "--timeout", "5m",
             values={**values, "runs": {"chart-run": spec}})
    assert r.returncode == 0, f"helm upgrade failed:\n{r.stdout}\n{r.stderr}\n{pods_report(core, ns)}"
    runs = batch.list_namespaced_job(ns, label_selector="lora-jobs.io/run=chart-run").items
    assert [(j.metadata.name, j.metadata.uid) for j in runs] == [(job_name, first_uid)]
    phase("helm upgrade, same runs: nothing resubmitted")

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
    phase("the run from values trained and published")

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
        "jobs": [j.metadata.name for j in batch.list_namespaced_job(ns).items if j.metadata.name != job_name],
    }
    assert not any(left.values()), left
    # The run is the launcher's, not the release's: it stays (launcher cancel, or its TTL, removes it).
    assert batch.read_namespaced_job(job_name, ns).metadata.labels["lora-jobs.io/run"] == "chart-run"
    batch.delete_namespaced_job(job_name, ns, propagation_policy="Background")
    wait_for("the release's pods to leave the node", lambda: not core.list_namespaced_pod(ns).items, 180,
             lambda: pods_report(core, ns))
    phase("helm uninstall")
    print(f"\nchart on the real node, seconds per step: {took}")
