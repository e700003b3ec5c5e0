"""The launcher against the real control plane: kube-apiserver, the Job controller, the scheduler, and kwok
nodes (kwok-gpu-0 with 8 nvidia.com/gpu behind a NoSchedule taint, kwok-cpu-0).

kwok completes a pod about a second after it starts; the pod annotations
``lora-jobs.test/exit-code`` and ``lora-jobs.test/hold`` (set on the pod template
here, never by the launcher) make it fail with a code or stay Running.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from jobs.spec import parse_spec
from launcher import render
from launcher.kube import Kube
from launcher.settings import make_settings
from launcher.submit import PreflightError, create_run, submit

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
HOLD = "lora-jobs.test/hold"
EXIT = "lora-jobs.test/exit-code"


# ------------------------------------------------------------------------------ helpers

@pytest.fixture()
def trainer_sa(kube_api, namespace):
    """The ServiceAccount the Helm chart would install; the pods name it."""
    from kubernetes import client

    client.CoreV1Api(kube_api).create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="lora-jobs-trainer")))
    return "lora-jobs-trainer"


@pytest.fixture()
def kube(stack, namespace, trainer_sa) -> Kube:
    return Kube(kubeconfig=stack.kubeconfig, namespace=namespace)


@pytest.fixture()
def lsettings(stack, namespace, trainer_sa, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    return make_settings(kubeconfig=stack.kubeconfig, namespace=namespace, s3_endpoint=stack.s3_endpoint)


def spec_data(stack, name: str, **resources) -> dict:
    return {"name": name, "base_model": {"uri": f"s3://{stack.bucket}/models/tiny/"},
            "dataset": {"train": f"s3://{stack.bucket}/data/train.jsonl"},
            "output": f"s3://{stack.bucket}/runs", "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi",
                                                                 "scratch": "1Gi", **resources}}


def make_spec(stack, name: str, **resources):
    return parse_spec(spec_data(stack, name, **resources))


def write_spec(tmp_path, stack, name: str, **resources) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(spec_data(stack, name, **resources)))
    return p


def create_with_hooks(kube, spec, settings, **annotations) -> dict:
    """Render like the launcher does, add kwok test-hook annotations to the pod template, create."""
    run = render.render_run(spec, settings)
    run.workload["spec"]["template"]["metadata"]["annotations"] = dict(annotations)
    return create_run(kube, run).job


def cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def wait_until(fn, timeout: float = 60, what: str = "condition", interval: float = 0.3):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def pods_of(kube, job_name):
    return kube.list_pods(f"batch.kubernetes.io/job-name={job_name}")


def condition(job, ctype):
    for c in (job.get("status") or {}).get("conditions") or []:
        if c["type"] == ctype and c["status"] == "True":
            return c
    return None


def status_json(env, run) -> dict:
    r = cli(env, "status", run, "-o", "json")
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout)


# ------------------------------------------------------------------------------ lifecycle

def test_gpus_that_never_fit_fail_preflight_and_pend_with_the_schedulers_reason(launcher_env, tmp_path, stack,
                                                                                 trainer_sa):
    spec = write_spec(tmp_path, stack, "too-big", gpus=9)
    r = cli(launcher_env, "submit", str(spec))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "no node can ever fit 9 nvidia.com/gpu (the most any node has is 8)" in r.stderr
    assert "lower resources.gpus to 8" in r.stderr and "Traceback" not in r.stderr

    r = cli(launcher_env, "submit", str(spec), "--skip-preflight")
    assert r.returncode == 0 and "submitted: job too-big-" in r.stdout, r.stderr

    def pending_for_gpus():
        s = status_json(launcher_env, "too-big")
        return s if s["sentence"].startswith("waiting for GPUs:") else None

    s = wait_until(pending_for_gpus, what="the scheduler's reason")
    assert s["state"] == "Pending"
    # The scheduler counts every node: kwok's two, and the stack's real node when it runs.
    assert "Insufficient nvidia.com/gpu" in s["sentence"] and re.search(r"0/\d+ nodes are available", s["sentence"])


def test_run_goes_pending_running_complete_in_a_restricted_namespace(kube, lsettings, kube_api, namespace,
                                                                     launcher_env, stack):
    from kubernetes import client

    # Pod Security "restricted" enforced: our pods must still be admitted.
    client.CoreV1Api(kube_api).patch_namespace(namespace, {"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}})
    job = create_with_hooks(kube, make_spec(stack, "lifecycle"), lsettings, **{HOLD: "true"})
    name = job["metadata"]["name"]

    s = wait_until(lambda: (lambda s: s if s["state"] == "Running" else None)(status_json(launcher_env, name)),
                   what="Running")
    assert s["sentence"] == "running on kwok-gpu-0"
    pod = s["pods"][-1]["pod"]

    # Release the hold: kwok completes the pod, the Job controller completes the Job.
    client.CoreV1Api(kube_api).patch_namespaced_pod(pod, namespace, {"metadata": {"annotations": {HOLD: None}}})
    r = cli(launcher_env, "wait", "lifecycle", "--timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "succeeded" in r.stdout
    s = status_json(launcher_env, "lifecycle")
    assert s["state"] == "Succeeded" and s["exit_code"] == 0


def test_submit_wait_end_to_end_and_owned_configmap(launcher_env, tmp_path, stack, kube, trainer_sa):
    r = cli(launcher_env, "submit", str(write_spec(tmp_path, stack, "quick")), "--wait", "--timeout", "90")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted: job quick-" in r.stdout and "succeeded" in r.stdout
    job = kube.list_jobs("lora-jobs.io/run=quick")[0]
    cm = kube.get_configmap(job["metadata"]["name"])
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert parse_spec(yaml.safe_load(cm["data"]["spec.yaml"])).name == "quick"


def test_cancel_removes_the_job_its_pods_and_its_configmap(kube, lsettings, launcher_env, stack):
    job = create_with_hooks(kube, make_spec(stack, "to-cancel"), lsettings, **{HOLD: "true"})
    name = job["metadata"]["name"]
    wait_until(lambda: any(p["status"].get("phase") == "Running" for p in pods_of(kube, name)), what="Running")
    r = cli(launcher_env, "cancel", "to-cancel", "--timeout", "90")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"cancelled: job {name}" in r.stdout
    assert kube.get_job(name) is None and pods_of(kube, name) == []
    wait_until(lambda: kube.get_configmap(name) is None, what="ConfigMap deleted")
    r = cli(launcher_env, "status", "to-cancel")
    assert r.returncode == 2 and "no run or Job named to-cancel" in r.stderr


# ------------------------------------------------------------------------------ failure policy

@pytest.mark.parametrize("code,message,sentence", [
    (11, "only 3 valid rows", "the data or base model is unusable (not retried)"),
    (13, "out of GPU memory at step 1 even at 1024 tokens per micro-batch",
     "the run does not fit in GPU memory even at the smallest micro-batch (not retried)"),
    (14, "the training loss became nan at step 3", "the training loss became NaN or infinite (not retried)"),
    (15, "the merged model does not reproduce base + adapter",
     "the merged model does not match base + adapter; nothing was published (not retried)"),
])
def test_deterministic_failures_fail_the_job_without_retry(kube, lsettings, launcher_env, stack, code, message,
                                                           sentence):
    run = f"permanent-{code}"
    spec = make_spec(stack, run, retries=3)
    job = create_with_hooks(kube, spec, lsettings, **{EXIT: str(code), "lora-jobs.test/message": message})
    name = job["metadata"]["name"]
    r = cli(launcher_env, "wait", run, "--timeout", "60")
    assert r.returncode == 1, r.stdout + r.stderr
    final = kube.get_job(name)
    failed = condition(final, "Failed")
    assert failed and failed["reason"] == "PodFailurePolicy"
    assert len(pods_of(kube, name)) == 1 and final["status"].get("failed") == 1
    s = status_json(launcher_env, run)
    assert s["state"] == "Failed" and s["exit_code"] == code
    assert s["sentence"].startswith(f"failed: {sentence}") and message in s["sentence"]


def test_transient_exit_code_is_retried_up_to_the_backoff_limit(kube, lsettings, launcher_env, stack):
    job = create_with_hooks(kube, make_spec(stack, "flaky", retries=1), lsettings, **{EXIT: "75"})
    name = job["metadata"]["name"]
    final = wait_until(lambda: (lambda j: j if condition(j, "Failed") else None)(kube.get_job(name)),
                       timeout=90, what="BackoffLimitExceeded")
    assert condition(final, "Failed")["reason"] == "BackoffLimitExceeded"
    assert len(pods_of(kube, name)) == 2
    s = status_json(launcher_env, "flaky")
    assert s["exit_code"] == 75 and s["sentence"].startswith("failed after 2 attempts")


def test_eviction_does_not_count_against_backoff_limit(kube, lsettings, kube_api, namespace, stack):
    from kubernetes import client

    job = create_with_hooks(kube, make_spec(stack, "evicted", retries=0), lsettings, **{HOLD: "true"})
    name = job["metadata"]["name"]
    first = wait_until(lambda: [p for p in pods_of(kube, name) if p["status"].get("phase") == "Running"],
                       what="Running")[0]["metadata"]["name"]
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod_eviction(first, namespace, client.V1Eviction(
        metadata=client.V1ObjectMeta(name=first, namespace=namespace)))

    def replaced():
        pods = pods_of(kube, name)
        return [p for p in pods if p["metadata"]["name"] != first and p["status"].get("phase") == "Running"]

    # backoffLimit is 0: had the eviction counted, the Job would have failed instead of replacing the pod.
    second = wait_until(replaced, timeout=90, what="a replacement pod")[0]["metadata"]["name"]
    j = kube.get_job(name)
    assert condition(j, "Failed") is None
    assert not (j["status"].get("failed") or 0)
    core.patch_namespaced_pod(second, namespace, {"metadata": {"annotations": {HOLD: None}}})
    done = wait_until(lambda: (lambda j: j if condition(j, "Complete") or condition(j, "Failed") else None)(
        kube.get_job(name)), what="the Job to finish")
    assert condition(done, "Complete")


# ------------------------------------------------------------------------------ idempotence

def test_resubmitting_the_same_spec_is_the_same_run_a_changed_spec_is_new(launcher_env, tmp_path, stack, kube):
    spec = write_spec(tmp_path, stack, "twice")
    first = cli(launcher_env, "submit", str(spec))
    second = cli(launcher_env, "submit", str(spec))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.startswith("submitted: job twice-")
    assert second.stdout.startswith("already submitted: job twice-")
    assert len(kube.list_jobs("lora-jobs.io/run=twice")) == 1
    third = cli(launcher_env, "submit", str(spec), "--set", "training.epochs=2")
    assert third.returncode == 0 and third.stdout.startswith("submitted:"), third.stderr
    assert len(kube.list_jobs("lora-jobs.io/run=twice")) == 2


def test_concurrent_submits_from_two_processes_make_one_job(launcher_env, tmp_path, stack, kube):
    spec = write_spec(tmp_path, stack, "racy")
    procs = [subprocess.Popen([sys.executable, "-m", "launcher", "submit", str(spec)], cwd=REPO, env=launcher_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    said = sorted(o[0].split(":")[0] for o in outs)
    assert said == ["already submitted", "submitted"], outs
    assert len(kube.list_jobs("lora-jobs.io/run=racy")) == 1


def test_concurrent_create_run_from_many_threads_makes_one_job(stack, namespace, lsettings, trainer_sa):
    spec = make_spec(stack, "threads")
    run = render.render_run(spec, lsettings)
    results, errors = [], []
    barrier = threading.Barrier(6)

    def one():
        k = Kube(kubeconfig=stack.kubeconfig, namespace=namespace)
        k.get_job("warm-up-connection")
        barrier.wait()
        try:
            results.append(create_run(k, copy.deepcopy(run)).created)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(results) == [False] * 5 + [True]
    k = Kube(kubeconfig=stack.kubeconfig, namespace=namespace)
    assert len(k.list_jobs("lora-jobs.io/run=threads")) == 1
    name = run.workload["metadata"]["name"]
    owner = k.get_configmap(name)["metadata"]["ownerReferences"]
    assert owner[0]["uid"] == k.get_job(name)["metadata"]["uid"]


# ------------------------------------------------------------------------------ status, list, preflight

def test_status_json_fields_and_list(kube, lsettings, launcher_env, stack):
    job = create_with_hooks(kube, make_spec(stack, "fields"), lsettings, **{HOLD: "true"})
    name = job["metadata"]["name"]
    s = wait_until(lambda: (lambda s: s if s["state"] == "Running" else None)(status_json(launcher_env, "fields")),
                   what="Running")
    assert {"run", "job", "namespace", "spec_hash", "state", "sentence", "exit_code", "blocked", "details",
            "created", "started", "completed", "attempts", "pods", "output"} <= set(s)
    assert s["run"] == "fields" and s["job"] == name and s["namespace"] == lsettings.namespace
    assert s["spec_hash"] == make_spec(stack, "fields").spec_hash()
    assert s["attempts"]["active"] == 1 and s["attempts"]["retries_allowed"] == 3
    assert s["pods"][0]["node"] == "kwok-gpu-0" and s["pods"][0]["phase"] == "Running"
    assert s["output"] == f"s3://{stack.bucket}/runs/fields"
    # The Job name works as RUN too; yaml output parses.
    assert yaml.safe_load(cli(launcher_env, "status", name, "-o", "yaml").stdout)["job"] == name
    rows = json.loads(cli(launcher_env, "list", "-o", "json").stdout)
    assert [r["job"] for r in rows] == [name] and rows[0]["state"] == "Running"
    table = cli(launcher_env, "status", "fields")
    assert table.returncode == 0 and "Running" in table.stdout


def test_preflight_names_each_missing_piece_with_a_fix(kube, lsettings, kube_api, namespace, stack):
    from kubernetes import client

    client.CoreV1Api(kube_api).delete_namespaced_secret("lora-jobs-s3", namespace)
    with pytest.raises(PreflightError) as e:
        submit(kube, make_spec(stack, "nosecret"), lsettings)
    assert "Secret lora-jobs-s3 with the S3 credentials is missing" in str(e.value)
    assert kube.list_jobs("lora-jobs.io/run=nosecret") == []

    elsewhere = make_settings(kubeconfig=stack.kubeconfig, namespace="does-not-exist-zz")
    with pytest.raises(PreflightError, match="namespace does-not-exist-zz does not exist"):
        submit(Kube(kubeconfig=stack.kubeconfig, namespace="does-not-exist-zz"), make_spec(stack, "nons"), elsewhere)

    local = parse_spec({**spec_data(stack, "local-paths"), "dataset": {"train": "./train.jsonl"}})
    with pytest.raises(PreflightError, match="dataset.train is a local path"):
        submit(kube, local, lsettings)


def test_server_dry_run_creates_nothing(launcher_env, tmp_path, stack, kube):
    r = cli(launcher_env, "submit", str(write_spec(tmp_path, stack, "dry")), "--server-dry-run")
    assert r.returncode == 0, r.stderr
    assert "server-side dry-run passed" in r.stdout
    assert kube.list_jobs("lora-jobs.io/run=dry") == [] and kube.get_configmap(
        render.job_name(make_spec(stack, "dry"))) is None


def test_namespace_configmap_settings_reach_the_job(kube, namespace, stack, launcher_env, tmp_path, kube_api):
    from kubernetes import client

    client.CoreV1Api(kube_api).create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="lora-jobs-launcher"),
        data={"settings.yaml": "ttl_seconds_after_finished: 600\npriority_class: null\n"}))
    r = cli(launcher_env, "submit", str(write_spec(tmp_path, stack, "chartcfg")))
    assert r.returncode == 0, r.stderr
    job = kube.list_jobs("lora-jobs.io/run=chartcfg")[0]
    assert job["spec"]["ttlSecondsAfterFinished"] == 600


def test_logs_follow_ends_with_the_runs_outcome(kube, lsettings, launcher_env, stack):
    # kwok has no kubelet to serve logs: the launcher must say so in one line and still follow the run to its end.
    create_with_hooks(kube, make_spec(stack, "logs-f"), lsettings, **{EXIT: "12",
                                                                     "lora-jobs.test/message": "access denied"})
    r = cli(launcher_env, "logs", "logs-f", "-f", timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "object storage refused access" in r.stderr.splitlines()[-1]
    assert "access denied" in r.stderr
