"""The trainer as a REAL pod: the stack's real node (hack/node.sh: kubelet + containerd + runc + a CNI
bridge, in a network namespace of its own) pulls the trainer image by name from the stack's registry and
runs it, hardened, in a namespace that enforces the "restricted" Pod Security Standard.

Nothing here is injected: image pull errors come from the registry, a missing Secret key from the
kubelet, OOMKilled from the kernel's memory cgroup, an eviction from the Eviction API, logs from the
container's own log file through the API server and the kubelet. Each run is `launcher submit` of a
CPU spec of a few steps. The subject is the pod, not what it learns: the model is conftest's tiny_model_dir
(SmolLM2's architecture and vocabulary, randomly initialised), from MinIO. The OOM test keeps SmolLM2-135M's first
4 layers (short_model_dir), the model its 350Mi limit was chosen against.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from published import assert_complete_v1, cpu_spec, lean, train_jsonl

pytestmark = [pytest.mark.node, pytest.mark.train, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture()
def real_ns(kube_api, make_node_namespace):
    """A namespace whose pods go to the real node (as a dedicated node pool: PodNodeSelector and
    PodTolerationRestriction annotations), enforcing the restricted Pod Security Standard, with the
    S3 Secret and the trainer's ServiceAccount that the chart would install."""
    from kubernetes import client

    name = make_node_namespace()
    client.CoreV1Api(kube_api).create_namespaced_service_account(name, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="lora-jobs-trainer")))
    return name


def env_for(stack, node, namespace: str, image: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCHER_", "AWS_"))}
    env.update(stack.s3_env())
    env.update({
        "LAUNCHER_KUBECONFIG": stack.kubeconfig,
        "LAUNCHER_NAMESPACE": namespace,
        # The pods reach MinIO through the node's bridge; the launcher (here) through loopback.
        "LAUNCHER_S3_ENDPOINT": node["STACK_POD_S3_ENDPOINT"],
        "LAUNCHER_IMAGE": image,
        "LAUNCHER_IMAGE_PULL_POLICY": "Always",  # one tag, rebuilt: the registry decides what runs
        "PYTHONPATH": str(REPO),
        "HOME": str(tmp_path),
    })
    return env


def cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def status(env: dict, run: str) -> dict:
    """What `launcher status RUN -o json` prints (the CLI prints ``Client.status(run).to_dict()``), asked in
    this process with the same LAUNCHER_* settings. A CLI process per poll costs ~1 s of CPU, and the run
    it polls trains on the same 2 cores: polling every half second through the CLI took ~2/3 of a core from
    the pod. Each test still reads the CLI's own status output where that output is its subject."""
    client = _client(frozenset((k, v) for k, v in env.items() if k.startswith("LAUNCHER_")))
    return json.loads(json.dumps(client.status(run).to_dict(), default=str))


@functools.lru_cache(maxsize=None)
def _client(launcher_env: frozenset):
    """One Client (one kubeconfig load, one API connection) per test's LAUNCHER_* settings."""
    from launcher.client import Client
    from launcher.settings import make_settings

    return Client(settings=make_settings(**{k[len("LAUNCHER_"):].lower(): v for k, v in launcher_env}))


def wait_status(env: dict, run: str, pred, timeout: float, what: str, seen: list | None = None) -> dict:
    deadline = time.monotonic() + timeout
    s: dict = {}
    while time.monotonic() < deadline:
        s = status(env, run)
        if seen is not None and (not seen or seen[-1] != s["state"]):
            seen.append(s["state"])
        if pred(s):
            return s
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last status: {s}")


def assert_one_verified_version(store, run_prefix: str) -> None:
    from jobs.publish import verify_version

    assert store.get_bytes(f"{run_prefix}/latest").decode().strip() == "v1"
    assert verify_version(store, run_prefix, "v1") == [], "every file matches manifest.json and the marker"
    versions = {o.key.split("/")[-2] for o in store.list(f"{run_prefix}/") if o.key.endswith("/_COMPLETE")}
    assert {v for v in versions if v.startswith("v")} == {"v1"}, versions


def write_spec(tmp_path: Path, spec: dict) -> Path:
    p = tmp_path / f"{spec['name']}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.fixture()
def train_data(s3_prefix, s3_client, stack) -> str:
    key = s3_prefix.split("/", 3)[3] + "/train.jsonl"
    s3_client.put_object(Bucket=stack.bucket, Key=key, Body=train_jsonl())
    return f"s3://{stack.bucket}/{key}"


# ------------------------------------------------------------------------------ the trainer pod

def test_trainer_runs_as_a_real_pod_and_publishes(s3_env, kube_api, stack, node, trainer_ref, real_ns,
                                                  tiny_model_in_minio, train_data, s3_prefix, tmp_path):
    from kubernetes import client

    from jobs.storage import open_store

    env = env_for(stack, node, real_ns, trainer_ref, tmp_path)
    spec = cpu_spec("real-pod", tiny_model_in_minio, train_data, f"{s3_prefix}/runs")
    # As on a node that has never pulled the trainer (an earlier test may have).
    subprocess.run(["bash", str(REPO / "hack" / "node.sh"), "rmi", trainer_ref], cwd=REPO, check=True,
                   capture_output=True)
    # The node is cordoned until status has seen the run Pending: a pull can be quicker than the launcher's
    # start on a loaded machine, and the first status then already read Running (seen once in CI).
    core, node_name = client.CoreV1Api(kube_api), node["STACK_NODE_NAME"]
    seen: list[str] = []
    core.patch_node(node_name, {"spec": {"unschedulable": True}})
    try:
        r = cli(env, "submit", str(write_spec(tmp_path, spec)))
        assert r.returncode == 0, r.stdout + r.stderr
        wait_status(env, "real-pod", lambda s: s["state"] == "Pending", 120, "the run to be Pending", seen)
    finally:
        core.patch_node(node_name, {"spec": {"unschedulable": False}})
    wait_status(env, "real-pod", lambda s: s["state"] == "Running", 300, "the pod to run", seen)
    # `logs -f` follows the real container log through the API server and the kubelet, to its end.
    follow = subprocess.Popen([sys.executable, "-m", "launcher", "logs", "real-pod", "-f"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = [], []
    t = threading.Thread(target=lambda: (out.append(follow.stdout.read()), err.append(follow.stderr.read())))
    t.start()
    final = wait_status(env, "real-pod", lambda s: s["state"] in ("Succeeded", "Failed"), 900, "the run to end", seen)
    t.join(timeout=120)
    # The job's progress, read back from object storage by `status`. Not sampled while it runs (whether a poll
    # lands inside the training stage depends on the machine's speed): the last training step's fields stay in
    # the object and reach the store with the next stage change, whatever the speed.
    progress = final["progress"]
    assert progress["state"] == "succeeded" and progress["version"] == "v1", progress
    assert progress["step"] == progress["total_steps"] > 0 and progress["tokens_per_s"] > 0, progress
    assert progress["summary"].startswith("succeeded, published v1, loss "), progress
    assert follow.wait(timeout=10) == 0, err
    assert final["state"] == "Succeeded", final
    assert seen[0] == "Pending" and seen[-2:] == ["Running", "Succeeded"], seen
    assert final["pods"][0]["node"] == node["STACK_NODE_NAME"], final["pods"]

    log_text = out[0]
    for stage in ("fetch", "train", "evaluate", "merge", "publish"):
        assert stage in log_text, f"stage {stage} missing from the followed log:\n{log_text[-3000:]}"
    assert "published" in log_text.splitlines()[-1] or "published" in log_text[-2000:], log_text[-2000:]

    store, prefix = open_store(f"{s3_prefix}/runs")
    run_prefix = f"{prefix}/real-pod"
    keys = assert_complete_v1(store, run_prefix)
    secret = stack.s3_secret_key
    assert secret not in log_text and secret not in json.dumps(final)
    for key in keys:
        if key.endswith((".json", ".md", ".html", ".txt", ".yaml", "latest", "_COMPLETE")):
            assert secret not in store.get_bytes(f"{run_prefix}/v1/{key}").decode(errors="replace"), key


# ------------------------------------------------------------------------------ faults, for real

def test_a_missing_image_fails_to_pull_and_status_says_so(stack, node, trainer_ref, real_ns, tiny_model_in_minio,
                                                          train_data, s3_prefix, tmp_path):
    missing = trainer_ref.rsplit(":", 1)[0] + ":no-such-tag"
    env = env_for(stack, node, real_ns, missing, tmp_path)
    r = cli(env, "submit", str(write_spec(tmp_path, cpu_spec("bad-tag", tiny_model_in_minio, train_data,
                                                             f"{s3_prefix}/runs"))))
    assert r.returncode == 0, r.stdout + r.stderr
    s = wait_status(env, "bad-tag", lambda s: s["blocked"], 120, "the pull to fail")
    assert s["state"] == "Pending" and s["pods"][-1]["reason"] in ("ErrImagePull", "ImagePullBackOff"), s
    assert f"cannot pull the trainer image {missing}" in s["sentence"] and "not found" in s["sentence"], s
    r = cli(env, "status", "bad-tag")
    assert "cannot pull the trainer image" in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_a_missing_secret_key_is_diagnosed(kube_api, stack, node, trainer_ref, real_ns, tiny_model_in_minio, train_data,
                                           s3_prefix, tmp_path):
    from kubernetes import client

    client.CoreV1Api(kube_api).patch_namespaced_secret(
        "lora-jobs-s3", real_ns, {"data": {"AWS_SECRET_ACCESS_KEY": None}})
    env = env_for(stack, node, real_ns, trainer_ref, tmp_path)
    spec = str(write_spec(tmp_path, cpu_spec("no-key", tiny_model_in_minio, train_data, f"{s3_prefix}/runs")))
    r = cli(env, "submit", spec)
    assert r.returncode == 3 and "Secret lora-jobs-s3 has no key AWS_SECRET_ACCESS_KEY" in r.stderr, r.stderr
    # Past the launcher's check (a Secret edited after submit looks the same): the kubelet refuses.
    r = cli(env, "submit", spec, "--skip-preflight")
    assert r.returncode == 0, r.stdout + r.stderr
    s = wait_status(env, "no-key", lambda s: s["blocked"], 180, "the kubelet to refuse the container")
    assert s["pods"][-1]["reason"] == "CreateContainerConfigError", s
    assert "AWS_SECRET_ACCESS_KEY" in s["sentence"] and "lora-jobs-s3" in s["sentence"], s
    assert "create the S3 credentials Secret" in s["sentence"], s


def test_a_memory_limit_too_low_is_oomkilled_diagnosed_and_not_retried(stack, node, trainer_ref, real_ns,
                                                                       short_model_in_minio, train_data, s3_prefix,
                                                                       tmp_path):
    # the 4-layer model (~170 MB of fp32 weights), not the tiny one (~13 MB): the limit was chosen against it
    env = env_for(stack, node, real_ns, trainer_ref, tmp_path)
    spec = cpu_spec("too-small", short_model_in_minio, train_data, f"{s3_prefix}/runs", memory="350Mi")
    r = cli(env, "submit", str(write_spec(tmp_path, spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    s = wait_status(env, "too-small", lambda s: s["state"] in ("Succeeded", "Failed"), 600, "the run to end")
    assert s["state"] == "Failed" and s["exit_code"] == 137, s
    assert len(s["pods"]) == 1, f"an OOM kill is not retried with the same limit: {s['pods']}"
    assert s["pods"][0]["reason"] == "OOMKilled", s["pods"]
    assert "more memory than its limit of 350Mi" in s["sentence"] and "raise resources.memory" in s["sentence"], s


def test_an_eviction_mid_training_resumes_from_the_checkpoint_and_publishes_once(s3_env, kube_api, stack, node,
                                                                                 trainer_ref, real_ns, tiny_model_in_minio,
                                                                                 train_data, s3_prefix, tmp_path):
    from kubernetes import client
    from jobs.storage import open_store

    env = env_for(stack, node, real_ns, trainer_ref, tmp_path)
    spec = lean(cpu_spec("evicted", tiny_model_in_minio, train_data, f"{s3_prefix}/runs", epochs=16,
                         checkpoint_interval_steps=1))  # 64 quick steps: the eviction lands mid-training
    r = cli(env, "submit", str(write_spec(tmp_path, spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    store, prefix = open_store(f"{s3_prefix}/runs")
    newest = [0]

    def checkpointed(s):  # training, with a checkpoint in storage that a retry can resume from
        # The checkpoints themselves, not the progress object's step: that is written at most every 10 s, and a
        # fast machine can train past step 2 before it is (the stage is written at once, on every change).
        if s["state"] in ("Succeeded", "Failed"):
            return True  # ended before it was seen mid-training: said below, not after a 600 s wait
        if s["state"] != "Running" or (s.get("progress") or {}).get("stage") != "train":
            return False
        newest[0] = max((int(k.split("/")[-2][5:]) for k in (o.key for o in store.list(f"{prefix}/evicted/"))
                         if k.endswith("/_COMPLETE") and k.split("/")[-2].startswith("step-")), default=0)
        return newest[0] >= 2

    s = wait_status(env, "evicted", checkpointed, 600, "a checkpoint mid-training")
    assert s["state"] == "Running", f"the run ended before a checkpoint was seen mid-training: {s}"
    pod = s["pods"][-1]["pod"]
    step_at_eviction = newest[0]
    core = client.CoreV1Api(kube_api)
    # The evicted pod is deleted once it ends (the Job controller counts it, then drops its finalizer),
    # so its end is read from a watch, as it happens; the eviction waits until the watch has seen the pod.
    ends: list[dict] = []
    watching = threading.Event()

    def watch_pod():
        from kubernetes import watch

        for ev in watch.Watch().stream(core.list_namespaced_pod, real_ns, field_selector=f"metadata.name={pod}",
                                       timeout_seconds=300):
            watching.set()
            obj = ev["object"]
            for cs in obj.status.container_statuses or []:
                if cs.state.terminated:
                    ends.append({"exit_code": cs.state.terminated.exit_code,
                                 "conditions": {c.type: c.status for c in obj.status.conditions or []},
                                 "reason": next((c.reason for c in obj.status.conditions or []
                                                 if c.type == "DisruptionTarget"), None)})
            if ev["type"] == "DELETED":
                return

    watcher = threading.Thread(target=watch_pod, daemon=True)
    watcher.start()
    assert watching.wait(60), "the watch on the pod did not start"
    core.create_namespaced_pod_eviction(pod, real_ns, client.V1Eviction(
        metadata=client.V1ObjectMeta(name=pod, namespace=real_ns)))

    final = wait_status(env, "evicted", lambda s: s["state"] in ("Succeeded", "Failed"), 900, "the run to end")
    watcher.join(timeout=60)
    assert final["state"] == "Succeeded", final
    assert ends, "the evicted pod's end was seen"
    assert ends[-1]["exit_code"] == 75, f"the evicted pod checkpointed and exited with the transient code: {ends}"
    assert ends[-1]["conditions"].get("DisruptionTarget") == "True", ends[-1]
    assert ends[-1]["reason"] == "EvictionByEvictionAPI", ends[-1]
    assert [p["pod"] for p in final["pods"]] != [pod] and final["pods"][-1]["exit_code"] == 0, final["pods"]
    assert final["attempts"]["failed"] == 0, f"an eviction is not counted against retries: {final['attempts']}"

    r = cli(env, "logs", "evicted")
    assert r.returncode == 0, r.stderr
    resumed = [line for line in r.stdout.splitlines() if "resum" in line.lower()]
    assert resumed, f"the retry says where it resumed:\n{r.stdout[-3000:]}"
    import re

    at, total = map(int, re.search(r"step (\d+) of (\d+)", resumed[0]).groups())
    # SIGTERM checkpoints the step it is on: no earlier than the newest checkpoint seen, before the end
    assert step_at_eviction <= at < total, (step_at_eviction, resumed)
    assert_one_verified_version(store, f"{prefix}/evicted")


def test_a_node_whose_kubelet_stops_is_named_and_the_run_recovers_when_it_returns(s3_env, stack, node, trainer_ref,
                                                                                  real_ns, tiny_model_in_minio,
                                                                                  train_data, s3_prefix, tmp_path):
    from jobs.storage import open_store

    env = env_for(stack, node, real_ns, trainer_ref, tmp_path)
    spec = lean(cpu_spec("node-away", tiny_model_in_minio, train_data, f"{s3_prefix}/runs"))
    r = cli(env, "submit", str(write_spec(tmp_path, spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    # From fetch on (each stage is written at once): the earliest sign of a working run, so the kubelet stops
    # with the most of the run still ahead, whatever the machine's speed.
    s = wait_status(env, "node-away", lambda s: s["state"] == "Running" and (s.get("progress") or {}).get("stage")
                    in ("fetch", "prepare", "train"), 600, "the run to start working")
    pod = s["pods"][-1]["pod"]
    node_sh = ["bash", str(REPO / "hack" / "node.sh")]
    subprocess.run([*node_sh, "stop-kubelet"], cwd=REPO, check=True, capture_output=True)
    try:
        # The node lifecycle controller marks the node Unknown after its grace period (the stack sets 15 s, hack/stack.sh).
        lost = wait_status(env, "node-away", lambda s: "is not Ready" in s["sentence"], 150,
                           "status to name the node that stopped reporting")
        assert f"node {node['STACK_NODE_NAME']} is not Ready: Kubelet stopped posting node status" \
            in lost["sentence"], lost["sentence"]
        r = cli(env, "status", "node-away")
        assert "is not Ready" in r.stdout and "Traceback" not in r.stdout + r.stderr
    finally:
        subprocess.run([*node_sh, "start-kubelet"], cwd=REPO, check=True, capture_output=True)
    # The containers ran on without their kubelet; back, it reports them again and the run finishes.
    final = wait_status(env, "node-away", lambda s: s["state"] in ("Succeeded", "Failed"), 900, "the run to end")
    assert final["state"] == "Succeeded", final
    assert [p["pod"] for p in final["pods"]] == [pod], "the same pod finished: nothing was retried"
    store, prefix = open_store(f"{s3_prefix}/runs")
    assert_one_verified_version(store, f"{prefix}/node-away")


# ------------------------------------------------------------------------------ two real pods, one run

def test_two_real_pods_rendezvous_over_the_pod_network_and_publish_one_version(s3_env, stack, node, trainer_ref,
                                                                               real_ns, tiny_model_in_minio, train_data,
                                                                               s3_prefix, tmp_path):
    """resources.nodes: 2 on CPU: the Indexed Job's pods find pod 0 by its hostname under the headless
    Service (the node's cluster DNS), meet at torchrun's rendezvous over the bridge, train with gloo
    and publish one version."""
    from jobs.storage import open_store

    env = env_for(stack, node, real_ns, trainer_ref, tmp_path)
    spec = lean(cpu_spec("two-pods", tiny_model_in_minio, train_data, f"{s3_prefix}/runs", memory="4Gi"))
    spec["resources"].update({"nodes": 2, "cpu": "1"})
    r = cli(env, "submit", str(write_spec(tmp_path, spec)))
    assert r.returncode == 0, r.stdout + r.stderr
    # Both pods running, or already done: a short run can end between two polls on a fast machine. (The sentence
    # of a 2-pod run is the kwok tests' subject; here, that both pods ran on the real node and met.)
    running = wait_status(env, "two-pods", lambda s: s["sentence"].startswith("running: 2 pods")
                          or s["state"] in ("Succeeded", "Failed"), 600, "both pods to run")
    assert {p["node"] for p in running["pods"]} == {node["STACK_NODE_NAME"]}, running["pods"]
    final = wait_status(env, "two-pods", lambda s: s["state"] in ("Succeeded", "Failed"), 900, "the run to end")
    assert final["state"] == "Succeeded", final
    assert len(final["pods"]) >= 2 and {p["node"] for p in final["pods"]} == {node["STACK_NODE_NAME"]}, final["pods"]

    logs0 = cli(env, "logs", "two-pods").stdout
    logs1 = cli(env, "logs", "two-pods", "--rank", "1").stdout
    assert "node 0 of 2" in logs0 and "rank 0 of 2" in logs0, logs0[-3000:]
    assert "node 1 of 2" in logs1 and "rank 1 of 2" in logs1, logs1[-3000:]
    assert "rank 1: training done; rank 0 publishes" in logs1, logs1[-3000:]
    store, prefix = open_store(f"{s3_prefix}/runs")
    assert_one_verified_version(store, f"{prefix}/two-pods")
