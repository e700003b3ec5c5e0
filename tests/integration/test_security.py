"""Security, proved on the real stack.

* The S3 secret value appears nowhere: not in anything the launcher prints (every verb,
  error paths included), not in the Job, pod, ConfigMap or events, not in the job
  container's output or termination message, not in any object in the bucket.
* A namespace that enforces Pod Security ``restricted`` admits our rendered Jobs' pods,
  and refuses the same pod with its hardening removed (so the check is live).
* RBAC: the chart's launcher Role, applied as ``helm template`` renders it, lets the
  launcher do its whole job as that ServiceAccount (impersonated); verbs it does not grant
  are refused; the trainer's ServiceAccount can do nothing with the API.
* Names and keys: run names that the spec accepts make names the API server accepts; a
  version whose manifest names ``../`` paths is refused on download, nothing written
  outside the target folder.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}


def report(fault: str, happened: str, lost: str) -> None:
    """One row of docs/reliability.md, to the terminal even when pytest captures output."""
    sys.__stderr__.write(f"\nFAULT| {fault} | {happened} | {lost}\n")


def launcher(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def needles(secret: str) -> list[bytes]:
    """The secret as it could leak: raw, base64 (a Secret's data), URL-safe base64."""
    raw = secret.encode()
    return [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw)]


def find_leaks(secret: str, blobs: dict[str, bytes]) -> list[str]:
    return [where for where, data in blobs.items() for n in needles(secret) if n in data]


def restrict(kube_api, namespace: str) -> None:
    from kubernetes import client
    client.CoreV1Api(kube_api).patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})


def spec_file(tmp_path: Path, stack, name: str, output: str, **resources) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "base_model": {"uri": f"s3://{stack.bucket}/models/tiny/"},
        "dataset": {"train": f"s3://{stack.bucket}/data/train.jsonl"}, "output": output,
        "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi", "scratch": "1Gi", **resources}}))
    return path


def _wait(cond, timeout: float, what: str, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# ------------------------------------------------------------------------------------ the secret

@pytest.mark.kube
@pytest.mark.s3
def test_the_s3_secret_appears_nowhere(stack, kube_api, namespace, launcher_env, s3_env, s3_prefix, s3_client,
                                       tmp_path):
    from kubernetes import client

    from jobs.publish import publish_version
    from jobs.storage import S3Store, join

    secret = stack.s3_secret_key
    assert len(secret) >= 16
    restrict(kube_api, namespace)
    env = {**launcher_env, "LAUNCHER_SERVICE_ACCOUNT": "default", "LAUNCHER_DEBUG": ""}
    spec = spec_file(tmp_path, stack, "leak-check", s3_prefix)
    outputs: dict[str, bytes] = {}

    def run(*args: str, expect: tuple[int, ...] = (0,), env_=None) -> subprocess.CompletedProcess:
        p = launcher(env_ or env, *args)
        outputs[" ".join(args)] = (p.stdout + p.stderr).encode()
        assert p.returncode in expect and "Traceback" not in p.stderr, (args, p.returncode, p.stdout, p.stderr)
        return p

    def together(*calls):
        """Independent CLI calls side by side (each is a cold Python start on a 2-core machine)."""
        with ThreadPoolExecutor(3) as pool:
            for f in [pool.submit(c) for c in calls]:
                f.result()

    # The job container's own error paths (storage denied, object missing) with the secret in its environment,
    # started now: they import torch, which takes a while.
    job_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    job_env.update({**stack.s3_env(), "PYTHONPATH": str(REPO), "LORA_JOBS_S3_ATTEMPTS": "1"})
    jobs_running = {}
    for i, (case, overrides, model) in enumerate((
            ("wrong access key", {"AWS_ACCESS_KEY_ID": "not-a-known-key"}, f"s3://{stack.bucket}/models/tiny/"),
            ("missing model", {}, f"{s3_prefix}/no-model-here/"))):
        tmsg, jspec = tmp_path / f"tmsg-{i}", tmp_path / f"job-{i}.yaml"
        jspec.write_text(yaml.safe_dump({"name": "leak-check", "base_model": {"uri": model},
                                         "dataset": {"train": f"{s3_prefix}/data.jsonl"}, "output": s3_prefix,
                                         "resources": {"gpus": 0}}))
        jobs_running[case] = (tmsg, subprocess.Popen(
            [sys.executable, "-m", "jobs", "run", "--spec", str(jspec), "--workdir", str(tmp_path / f"work-{i}")],
            env={**job_env, **overrides, "TERMINATION_MESSAGE_PATH": str(tmsg)}, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT))

    together(lambda: run("validate", str(spec)), lambda: run("submit", str(spec), "--dry-run"),
             lambda: run("submit", str(spec), "--server-dry-run"))
    run("submit", str(spec), "--wait", "--timeout", "120")  # kwok runs the pod to completion

    # The job's artifacts: publish a version as the job does, then list and download it through the launcher.
    folder = tmp_path / "publish"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(1 << 16))
    (folder / "metadata.json").write_text(json.dumps({"run": "leak-check", "image": os.environ.get("LORA_JOBS_IMAGE"),
                                                      "env_keys": sorted(os.environ)}))
    run_prefix = join(s3_prefix.split("/", 3)[3], "leak-check")
    assert publish_version(S3Store(stack.bucket), run_prefix, folder) == "v1"
    bad = {**env, "AWS_ACCESS_KEY_ID": "not-a-known-key"}  # error paths with the secret in the environment
    together(lambda: run("status", "leak-check", "-o", "json"), lambda: run("status", "leak-check"),
             lambda: run("list", "-o", "yaml"),
             lambda: run("logs", "leak-check", expect=(0, 1, 3)),  # kwok serves no container logs
             lambda: run("artifacts", "leak-check"),
             lambda: run("artifacts", "leak-check", "--download", str(tmp_path / "dl")),
             lambda: run("artifacts", "leak-check", "--output", s3_prefix, expect=(3,), env_=bad),
             lambda: run("artifacts", "no-such-run", "--output", s3_prefix, expect=(0, 3)),
             lambda: run("status", "no-such-run", expect=(2,)))

    for case, (tmsg, p) in jobs_running.items():
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 12, (case, out[-2000:])
        outputs[f"job container ({case})"] = out
        outputs[f"termination message ({case})"] = tmsg.read_bytes()

    # Everything the API server holds about the run, except the Secret itself.
    api = kube_api
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    objects = {
        "jobs": batch.list_namespaced_job(namespace),
        "pods": core.list_namespaced_pod(namespace),
        "configmaps": core.list_namespaced_config_map(namespace),
        "events": core.list_namespaced_event(namespace),
        "serviceaccounts": core.list_namespaced_service_account(namespace),
    }
    blobs = dict(outputs)
    for kind, lst in objects.items():
        blobs[f"API {kind}"] = json.dumps(api.sanitize_for_serialization(lst)).encode()
    assert objects["pods"].items, "the run made no pod"
    for p in objects["pods"].items:
        c = p.spec.containers[0]
        assert all(e.value is None for e in c.env if e.name.startswith("AWS_SECRET")), "secret as a plain value"

    # Every object in the bucket (the artifacts above, and whatever else earlier runs left there).
    scanned, nbytes = 0, 0
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket):
        for o in page.get("Contents", []):
            body = s3_client.get_object(Bucket=stack.bucket, Key=o["Key"])["Body"].read()
            blobs[f"s3://{stack.bucket}/{o['Key']}"] = body
            scanned, nbytes = scanned + 1, nbytes + len(body)
    for f in (tmp_path / "dl").rglob("*"):
        if f.is_file():
            blobs[f"downloaded {f.name}"] = f.read_bytes()

    leaks = find_leaks(secret, blobs)
    assert not leaks, f"the S3 secret leaked into: {leaks}"
    # and the scan would have caught it: the Secret object itself does hold it
    raw_secret = json.dumps(api.sanitize_for_serialization(core.read_namespaced_secret("lora-jobs-s3", namespace)))
    assert find_leaks(secret, {"Secret": raw_secret.encode()})
    report("S3 secret searched for (raw and base64)",
           f"absent from {len(outputs)} launcher/job outputs incl. error paths, Jobs/pods/ConfigMaps/events/SAs "
           f"and {scanned} bucket objects ({nbytes / 2**20:.1f} MiB)", "nothing leaked")


# ------------------------------------------------------------------------------------ Pod Security

@pytest.mark.kube
def test_restricted_namespace_admits_our_pods_and_refuses_them_unhardened(stack, kube_api, namespace):
    from kubernetes import client

    from jobs.spec import parse_spec
    from launcher import render
    from launcher.kube import Kube
    from launcher.settings import make_settings
    from launcher.submit import create_run

    restrict(kube_api, namespace)
    settings = make_settings(kubeconfig=stack.kubeconfig, namespace=namespace, service_account="default",
                             image="lora-jobs/trainer:0.1.0")
    kube = Kube(kubeconfig=stack.kubeconfig, namespace=namespace)
    core = client.CoreV1Api(kube_api)

    def spec(name):
        return parse_spec({"name": name, "base_model": {"uri": f"s3://{stack.bucket}/m/"},
                           "dataset": {"train": f"s3://{stack.bucket}/d.jsonl"}, "output": f"s3://{stack.bucket}/o",
                           "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi", "scratch": "1Gi"}})

    ours = create_run(kube, render.render_run(spec("psa-ours"), settings)).job_name
    weak = render.render_run(spec("psa-weakened"), settings)
    pod = weak.workload["spec"]["template"]["spec"]
    pod.pop("securityContext")
    pod["containers"][0]["securityContext"] = {"allowPrivilegeEscalation": True}
    weakened = create_run(kube, weak).job_name

    def pods_of(job_name):
        return core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}").items

    def failed_create(job_name):
        return [e for e in core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={job_name}").items
                if e.reason == "FailedCreate"]

    admitted = _wait(lambda: pods_of(ours), 60, "our pod to be admitted")
    refused = _wait(lambda: failed_create(weakened), 60, "the weakened pod to be refused")
    assert not failed_create(ours)
    assert not pods_of(weakened)
    assert "violates PodSecurity" in refused[0].message and "restricted" in refused[0].message, refused[0].message
    sc = admitted[0].spec.containers[0].security_context
    assert sc.run_as_non_root and sc.allow_privilege_escalation is False and sc.read_only_root_filesystem
    assert sc.capabilities.drop == ["ALL"] and sc.seccomp_profile.type == "RuntimeDefault"
    report("namespace enforcing Pod Security `restricted`",
           "our Job's pod admitted; the same pod without its securityContext refused (FailedCreate: "
           "violates PodSecurity)", "nothing")


# ------------------------------------------------------------------------------------ RBAC

def _impersonating(kube_api, user: str):
    from kubernetes import client

    api = client.ApiClient(kube_api.configuration)
    api.set_default_header("Impersonate-User", user)
    return api


@pytest.mark.kube
@pytest.mark.helm
def test_launcher_role_is_enough_to_run_and_refuses_the_rest(stack, kube_api, namespace, tmp_path):
    from kubernetes import client, utils
    from kubernetes.client.exceptions import ApiException

    from jobs.spec import parse_spec
    from launcher.kube import Forbidden, Kube
    from launcher.settings import make_settings
    from launcher.submit import submit

    chart = REPO / "charts" / "lora-jobs"
    if not (chart / "Chart.yaml").is_file():
        pytest.skip("charts/lora-jobs is not in this checkout")
    rendered = subprocess.run([stack.helm, "template", "lora-jobs", str(chart), "--namespace", namespace,
                               "--set", "s3.existingSecret=lora-jobs-s3"], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    wanted = [d for d in docs if d["kind"] in ("ServiceAccount", "Role", "RoleBinding")]
    for d in wanted:
        d["metadata"]["namespace"] = namespace
        utils.create_from_dict(kube_api, d, namespace=namespace)
    binding = next(d for d in wanted if d["kind"] == "RoleBinding")
    sa = next(s["name"] for s in binding["subjects"] if s["kind"] == "ServiceAccount")
    trainer = next(d["metadata"]["name"] for d in wanted if d["kind"] == "ServiceAccount" and d["metadata"]["name"] != sa)

    as_launcher = _impersonating(kube_api, f"system:serviceaccount:{namespace}:{sa}")
    kube = Kube(namespace=namespace, api_client=as_launcher)
    settings = make_settings(kubeconfig=stack.kubeconfig, namespace=namespace, service_account=trainer)
    spec = parse_spec({"name": "rbac", "base_model": {"uri": f"s3://{stack.bucket}/m/"},
                       "dataset": {"train": f"s3://{stack.bucket}/d.jsonl"}, "output": f"s3://{stack.bucket}/o",
                       "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi", "scratch": "1Gi"}})
    # Granted: the launcher's whole path (preflight, server-side dry-run, create, own, status, list, cancel).
    result = submit(kube, spec, settings)
    assert result.created, result
    assert any("nodes" in w for w in result.warnings)  # cluster-scoped checks skipped, with a warning
    assert submit(kube, spec, settings).created is False
    assert kube.get_job(result.job_name) and kube.list_jobs("lora-jobs.io/run=rbac")
    kube.list_pods(f"batch.kubernetes.io/job-name={result.job_name}")
    kube.list_events(f"involvedObject.name={result.job_name}")
    assert kube.get_configmap(result.job_name)["metadata"]["ownerReferences"][0]["name"] == result.job_name

    core, batch, rbac = client.CoreV1Api(as_launcher), client.BatchV1Api(as_launcher), \
        client.RbacAuthorizationV1Api(as_launcher)
    refused = {
        "delete secrets": lambda: core.delete_namespaced_secret("lora-jobs-s3", namespace),
        "list secrets": lambda: core.list_namespaced_secret(namespace),
        "create pods directly": lambda: core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "direct"},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}),
        "pods/exec": lambda: core.connect_get_namespaced_pod_exec("any", namespace, command=["sh"], stdout=True),
        "watch jobs": lambda: batch.list_namespaced_job(namespace, watch=True, timeout_seconds=1,
                                                        _preload_content=False),
        "patch jobs": lambda: batch.patch_namespaced_job(result.job_name, namespace, {"spec": {"suspend": True}}),
        "bind itself a role": lambda: rbac.create_namespaced_role_binding(namespace, {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "escalate"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]}),
        "read another namespace": lambda: batch.list_namespaced_job("default"),
    }
    for what, call in refused.items():
        with pytest.raises(ApiException) as err:
            call()
        assert err.value.status == 403, f"{what}: {err.value.status}"
    assert kube.delete_job(result.job_name, propagation="Background")  # cancel is granted

    as_trainer = _impersonating(kube_api, f"system:serviceaccount:{namespace}:{trainer}")
    tk = Kube(namespace=namespace, api_client=as_trainer)
    for what, call in {"list pods": lambda: tk.list_pods(), "get the S3 Secret": lambda: tk.get_secret("lora-jobs-s3"),
                       "list jobs": lambda: tk.list_jobs()}.items():
        with pytest.raises(Forbidden):
            call()
    report("RBAC: the chart's launcher Role (impersonated ServiceAccount)",
           "submit/resubmit/status/list/cancel work; delete or list Secrets, create pods, exec, watch, patch Jobs, "
           "self-binding and other namespaces refused (403); the trainer account is refused everything tried",
           "nothing")


# ------------------------------------------------------------------------------------ names and keys

@pytest.mark.kube
def test_extreme_but_valid_run_names_make_names_the_api_server_accepts(stack, namespace):
    from jobs.spec import parse_spec
    from launcher import render
    from launcher.kube import Kube
    from launcher.settings import make_settings

    kube = Kube(kubeconfig=stack.kubeconfig, namespace=namespace)
    settings = make_settings(kubeconfig=stack.kubeconfig, namespace=namespace, service_account="default")
    for name in ("a" * 40, "0", "9-9", "a" + "-" * 38 + "z", "x"):
        spec = parse_spec({"name": name, "base_model": {"uri": f"s3://{stack.bucket}/m/"},
                           "dataset": {"train": f"s3://{stack.bucket}/d.jsonl"}, "output": f"s3://{stack.bucket}/o",
                           "labels": {"team": "a" * 63}})
        run = render.render_run(spec, settings)
        kube.create_configmap(run.configmap, dry_run=True)
        kube.create_job(run.workload, dry_run=True)  # raises Invalid with the server's reason otherwise


@pytest.mark.s3
def test_a_manifest_with_traversal_paths_is_refused_on_download(stack, s3_env, s3_prefix, s3_client, tmp_path):
    """A tampered (or hostile) version whose manifest names ../ paths: `launcher artifacts --download` refuses it
    and writes nothing outside the target folder."""
    key = s3_prefix.split("/", 3)[3] + "/evil/v1"
    evil = b"owned\n"
    manifest = json.dumps({"files": {"../../../escaped.txt": {"sha256": hashlib.sha256(evil).hexdigest(),
                                                              "size": len(evil)}}}).encode()
    # (MinIO itself refuses keys with '..' segments, so only the manifest can carry them)
    s3_client.put_object(Bucket=stack.bucket, Key=f"{key}/manifest.json", Body=manifest)
    s3_client.put_object(Bucket=stack.bucket, Key=f"{key}/_COMPLETE", Body=hashlib.sha256(manifest).hexdigest().encode())
    dest = tmp_path / "a" / "b" / "c" / "dl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCHER_", "AWS_"))}
    env.update({**stack.s3_env(), "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})
    p = launcher(env, "artifacts", "evil", "--output", s3_prefix, "--download", str(dest))
    assert p.returncode == 3 and "unsafe path" in p.stderr and "Traceback" not in p.stderr, (p.stdout, p.stderr)
    assert not list(tmp_path.rglob("escaped.txt"))
    report("a version whose manifest names ../ paths", "download refused (exit 3, 'unsafe path')",
           "nothing written outside the target folder")
