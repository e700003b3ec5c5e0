"""The Helm chart against the real helm binary and the real kube-apiserver of the local stack.

What is proved here:
* `helm lint --strict` passes, and invalid values fail on the schema naming the value;
* the chart renders with default and with full values, and the API server accepts every
  object (server-side dry-run) in a namespace that enforces Pod Security `restricted`,
  including a Pod made from each workload's template (PSA only warns on workloads);
* the chart renders no training object: `runs` become spec files (read back, each is the
  same spec, same hash) and a post-install/post-upgrade hook Job that runs `launcher submit`
  on each in the launcher image, as its own ServiceAccount;
* that account's Role, installed on the real API server, allows exactly what `launcher
  submit` calls (SubjectAccessReview), and the launcher, authenticated as it, submits a
  spec file the chart made and resubmits nothing (tests/integration/test_chart_real_node.py
  runs the hook itself, in the launcher image, on the real node);
* after `helm install`, the launcher — running as the chart's launcher ServiceAccount,
  so with exactly the Role's permissions — submits with the chart's defaults and the Job
  completes on the fake GPU node; verbs the Role does not grant are refused;
* the `helm test` check, run in the launcher image, tells a reachable bucket from a missing one;
* kind-config.yaml parses against kind's v1alpha4 API and hack/kind-up.sh stops with a
  clear message before cluster creation when kind or its node image is missing (the kind
  workflow installs this chart; kind clusters cannot start on this machine).
"""
from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lora-jobs"
EXAMPLE_SPEC = REPO / "examples" / "spec.yaml"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}


# ----------------------------------------------------------------------------- helpers

def _versions() -> dict[str, str]:
    out = {}
    for line in (REPO / "hack" / "versions.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def helm(request) -> str:
    """The pinned helm: $HELM, the stack's build cache, or (building it) the stack itself."""
    if os.environ.get("HELM") and Path(os.environ["HELM"]).is_file():
        return os.environ["HELM"]
    cache = Path(os.environ.get("STACK_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                 / "lora-jobs" / "stack")
    cached = cache / f"helm-{_versions()['HELM_VERSION']}" / "bin" / "helm"
    if cached.is_file():
        return str(cached)
    return request.getfixturevalue("stack").helm


def run_helm(helm: str, *args: str, values: dict | None = None, kubeconfig: str | None = None,
             check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        extra: list[str] = []
        if values is not None:
            yaml.safe_dump(values, f)
            f.flush()
            extra = ["-f", f.name]
        proc = subprocess.run([helm, *args, *extra], capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}", pytrace=False)
    return proc


def template(helm: str, values: dict | None = None, namespace: str = "ns-test",
             release: str = "lora-jobs") -> list[dict[str, Any]]:
    out = run_helm(helm, "template", release, str(CHART), "--namespace", namespace, values=values).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def example_spec() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE_SPEC.read_text())


def full_values(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every optional part on."""
    spec = spec or example_spec()
    return {
        "commonLabels": {"team": "ml-platform"},
        "imagePullSecrets": [{"name": "regcred"}],
        "images": {"trainer": {"repository": "registry.example/lora-jobs/trainer", "tag": "0.1.0-cuda",
                               "pullPolicy": "Always"}},
        "launcher": {"rbac": {"clusterPreflight": True, "extraSubjects": [
            {"kind": "Group", "name": "ml-engineers", "apiGroup": "rbac.authorization.k8s.io"}]},
            "serviceAccount": {"annotations": {"example.com/purpose": "ci"}}},
        "trainer": {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}}},
        "settings": {"nodeSelector": {"nvidia.com/gpu.present": "true"}, "queue": "team-a",
                     "ttlSecondsAfterFinished": 3600},
        "s3": {"bucket": "lora-jobs", "credentials": {"accessKeyId": "dev-access-key",
                                                      "secretAccessKey": "dev-secret-key-placeholder"}},
        "minio": {"enabled": True, "extraBuckets": ["models", "datasets", "runs"]},
        "priorityClass": {"create": True, "name": f"lora-jobs-test-{uuid.uuid4().hex[:6]}"},
        "resourceQuota": {"enabled": True},
        "runs": {spec["name"]: spec},
    }


def settings_from_chart(docs: list[dict], namespace: str):
    from launcher.settings import cluster_values_from_configmap, make_settings

    cm = find(docs, "ConfigMap", "lora-jobs-launcher")
    return make_settings(cluster_values_from_configmap(cm), namespace=namespace)


# ------------------------------------------------------------------------ lint and schema

def test_lint_strict_passes_with_default_and_full_values(helm):
    run_helm(helm, "lint", "--strict", str(CHART))
    run_helm(helm, "lint", "--strict", str(CHART), values=full_values())


@pytest.mark.parametrize("values, named", [
    ({"s3": {"regoin": "eu-west-1"}}, "/s3"),  # a typo is not silently ignored
    ({"settings": {"ttlSecondsAfterFinished": -5}}, "/settings/ttlSecondsAfterFinished"),
    ({"images": {"trainer": {"pullPolicy": "Sometimes"}}}, "/images/trainer/pullPolicy"),
    ({"minio": {"port": "nine-thousand"}}, "/minio/port"),
    ({"s3": {"credentials": {"accessKeyId": "only-half"}}}, "/s3/credentials/secretAccessKey"),
    ({"runs": {"support-bot": "name: support-bot"}}, "/runs/support-bot"),  # a spec is a mapping, not text
    ({"runs": {"Support_Bot": {"name": "support-bot"}}}, "/runs"),  # the key names a ConfigMap file
    ({"trainingJob": {"enabled": True}}, ""),  # the old hand-hashed one-off Job is gone, not ignored
    ({"settings": {"mlflowTrackingUri": "mlflow server"}}, "/settings/mlflowTrackingUri"),
    ({"settings": {"mlflowTokenSecret": "Not_A_Secret_Name"}}, "/settings/mlflowTokenSecret"),
    ({"settings": {"multinodeWorkload": "jobsets"}}, "/settings/multinodeWorkload"),
])
def test_invalid_values_fail_on_the_schema_naming_the_value(helm, values, named):
    proc = run_helm(helm, "template", "lora-jobs", str(CHART), values=values, check=False)
    assert proc.returncode != 0
    assert "don't meet the specifications of the schema" in proc.stderr
    assert f"at '{named}'" in proc.stderr, proc.stderr


def test_default_values_render_the_namespace_kit_and_no_optional_parts(helm):
    docs = template(helm)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == sorted([
        ("ServiceAccount", "lora-jobs-launcher"), ("ServiceAccount", "lora-jobs-trainer"),
        ("Role", "lora-jobs-launcher"), ("RoleBinding", "lora-jobs-launcher"),
        ("ConfigMap", "lora-jobs-launcher"), ("Pod", "lora-jobs-test-s3"),
        ("NetworkPolicy", "lora-jobs-training"), ("NetworkPolicy", "lora-jobs-test"),
    ])
    trainer_sa = find(docs, "ServiceAccount", "lora-jobs-trainer")
    assert trainer_sa["automountServiceAccountToken"] is False
    # Nothing binds the trainer's account: only the launcher has a Role.
    binding = find(docs, "RoleBinding")
    assert [s["name"] for s in binding["subjects"]] == ["lora-jobs-launcher"]
    settings = settings_from_chart(docs, "ns-test")
    assert settings.s3_secret_name == "lora-jobs-s3" and settings.service_account == "lora-jobs-trainer"
    assert settings.image == "lora-jobs/trainer:0.1.0"


def test_the_mlflow_settings_reach_the_launcher_through_its_configmap(helm):
    unset = settings_from_chart(template(helm), "ns-test")
    assert unset.mlflow_tracking_uri is None and unset.mlflow_token_secret is None
    docs = template(helm, values={"settings": {"mlflowTrackingUri": "http://mlflow.mlflow.svc:5000",
                                               "mlflowTokenSecret": "mlflow-token"}})
    settings = settings_from_chart(docs, "ns-test")
    assert settings.mlflow_tracking_uri == "http://mlflow.mlflow.svc:5000"
    assert settings.mlflow_token_secret == "mlflow-token"


def test_the_multinode_workload_setting_reaches_the_launcher_through_its_configmap(helm):
    assert settings_from_chart(template(helm), "ns-test").multinode_workload == "indexed-job"
    docs = template(helm, values={"settings": {"multinodeWorkload": "auto"}})
    assert settings_from_chart(docs, "ns-test").multinode_workload == "auto"


def test_every_launcher_setting_of_the_chart_is_documented_in_the_chart_readme():
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [k for k in values["settings"] if f"`settings.{k}`" not in readme]
    assert not missing, f"charts/lora-jobs/README.md does not document {missing}"


def test_names_stay_within_63_characters(helm):
    long_release = "r" * 53  # helm's own limit on release names
    docs = template(helm, values=full_values(), release=long_release)
    for d in docs:
        assert len(d["metadata"]["name"]) <= 63, d["metadata"]["name"]
        for k, v in (d["metadata"].get("labels") or {}).items():
            assert len(str(v)) <= 63, (d["metadata"]["name"], k, v)


def test_launcher_role_grants_each_verb_it_needs_and_no_more(helm):
    role = find(template(helm), "Role")
    granted = {(r["apiGroups"][0], res, tuple(r.get("resourceNames", ())), verb)
               for r in role["rules"] for res in r["resources"] for verb in r["verbs"]}
    assert granted == {
        ("batch", "jobs", (), "create"), ("batch", "jobs", (), "get"), ("batch", "jobs", (), "list"),
        ("batch", "jobs", (), "delete"),
        ("jobset.x-k8s.io", "jobsets", (), "create"), ("jobset.x-k8s.io", "jobsets", (), "get"),
        ("jobset.x-k8s.io", "jobsets", (), "list"), ("jobset.x-k8s.io", "jobsets", (), "delete"),
        ("", "configmaps", (), "create"), ("", "configmaps", (), "get"), ("", "configmaps", (), "patch"),
        ("", "configmaps", (), "delete"),
        ("", "services", (), "create"),
        ("", "pods", (), "list"), ("", "pods/log", (), "get"), ("", "events", (), "list"),
        ("", "secrets", ("lora-jobs-s3",), "get"),
        ("", "serviceaccounts", ("lora-jobs-trainer",), "get"),
    }
    text = (CHART / "templates" / "launcher-rbac.yaml").read_text()
    # Every rule carries its justification: a comment line right above it.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("- apiGroups:"):
            assert lines[i - 1].strip().startswith("#"), f"rule at line {i + 1} has no comment saying why"


# ------------------------------------------------------------------- runs from values

MINIMAL_SPEC = {"name": "tiny", "base_model": {"uri": "s3://models/m/"},
                "dataset": {"train": "s3://datasets/d/train.jsonl"}, "output": "s3://runs/out/"}
CPU_SPEC = {**MINIMAL_SPEC, "name": "cpu-run",
            "resources": {"gpus": 0, "cpu": "500m", "memory": "2Gi", "scratch": "5Gi", "timeout_hours": 0.5,
                          "retries": 0, "priority_class": "batch-low"},
            "labels": {"team": "support", "schedule": "nightly"},
            "training": {"learning_rate": 2e-4, "epochs": 1}}
#: Every verb the submit hook's Role grants: what launcher/submit.py calls through launcher/kube.py.
SUBMIT_GRANTS = {
    ("batch", "jobs", "create"), ("batch", "jobs", "get"),
    ("", "configmaps", "create"), ("", "configmaps", "get"), ("", "configmaps", "patch"),
    ("", "configmaps", "delete"),
    ("", "services", "create"),
}
JOBSET_GRANTS = {("jobset.x-k8s.io", "jobsets", "create"), ("jobset.x-k8s.io", "jobsets", "get")}


def _grants(role: dict) -> set[tuple[str, str, str]]:
    assert all(not r.get("resourceNames") for r in role["rules"])
    return {(group, res, verb) for r in role["rules"] for group in r["apiGroups"] for res in r["resources"]
            for verb in r["verbs"]}


def test_runs_become_spec_files_that_the_launcher_reads_as_the_same_spec(helm):
    from jobs.spec import TrainingRunSpec

    runs = {"support-bot": example_spec(), "tiny": MINIMAL_SPEC, "cpu": CPU_SPEC}
    docs = template(helm, values={"runs": runs}, namespace="team-ns")
    specs = find(docs, "ConfigMap", "lora-jobs-runs")
    assert sorted(specs["data"]) == ["cpu.yaml", "support-bot.yaml", "tiny.yaml"]
    for key, spec in runs.items():
        # Go's YAML layout is not PyYAML's, but it is the same spec, hence the same run and Job name.
        from_chart = TrainingRunSpec.model_validate(yaml.safe_load(specs["data"][f"{key}.yaml"]))
        model = TrainingRunSpec.model_validate(spec)
        assert from_chart == model and from_chart.spec_hash() == model.spec_hash()

    # The chart renders no training object: the only Job is the hook, and no object carries a spec hash.
    assert [d["metadata"]["name"] for d in docs if d["kind"] in ("Job", "JobSet")] == ["lora-jobs-submit"]
    assert not [d for d in docs if "lora-jobs.io/spec-hash" in (d["metadata"].get("labels") or {})]
    hook = find(docs, "Job", "lora-jobs-submit")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert "hook-failed" not in hook["metadata"]["annotations"]["helm.sh/hook-delete-policy"]  # kept for its log
    assert hook["spec"]["backoffLimit"] == 0
    pod = hook["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "lora-jobs-submit" and pod["automountServiceAccountToken"] is True
    container = pod["containers"][0]
    assert container["image"] == "lora-jobs/launcher:0.1.0"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "runs")
    assert next(v for v in pod["volumes"] if v["name"] == "runs")["configMap"]["name"] == "lora-jobs-runs"
    assert container["args"] == [f"{mount['mountPath']}/{k}.yaml" for k in sorted(runs)]
    assert "launcher submit" in container["command"][2]
    # No LAUNCHER_* or kubeconfig: the launcher finds the cluster, namespace and defaults from the pod.
    assert not container.get("env")


def test_the_submit_hook_runs_after_the_minio_bucket_hook(helm):
    docs = template(helm, values={"runs": {"tiny": MINIMAL_SPEC}, "minio": {"enabled": True}})
    weight = {d["metadata"]["name"]: int(d["metadata"]["annotations"].get("helm.sh/hook-weight", 0))
              for d in docs if d["kind"] == "Job"}
    assert weight["lora-jobs-submit"] > weight["lora-jobs-minio-buckets"]


@pytest.mark.parametrize("workload, grants", [("indexed-job", SUBMIT_GRANTS),
                                              ("jobset", SUBMIT_GRANTS | JOBSET_GRANTS),
                                              ("auto", SUBMIT_GRANTS | JOBSET_GRANTS)])
def test_submit_role_grants_what_launcher_submit_calls_and_no_more(helm, workload, grants):
    docs = template(helm, values={"runs": {"tiny": MINIMAL_SPEC}, "settings": {"multinodeWorkload": workload}})
    assert _grants(find(docs, "Role", "lora-jobs-submit")) == grants
    binding = find(docs, "RoleBinding", "lora-jobs-submit")
    assert binding["roleRef"]["name"] == "lora-jobs-submit"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "lora-jobs-submit", "namespace": "ns-test"}]
    lines = (CHART / "templates" / "runs.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("- apiGroups:"):
            assert lines[i - 1].strip().startswith("#"), f"rule at line {i + 1} has no comment saying why"
    # Without runs there is no hook, account or Role.
    assert not [d for d in template(helm) if "submit" in d["metadata"]["name"]]


# -------------------------------------------------------- the real API server (dry-run, PSA)

def _restricted_namespace(kube_api, namespace: str) -> None:
    from kubernetes import client

    client.CoreV1Api(kube_api).patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})


def _dry_run_create(kube_api, doc: dict, namespace: str) -> None:
    from kubernetes import dynamic

    dyn = dynamic.DynamicClient(kube_api)
    resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    kw = {"namespace": namespace} if resource.namespaced else {}
    resource.create(body=doc, dry_run="All", **kw)


def _pod_from_workload(doc: dict) -> dict | None:
    """A Pod with a workload's template: PSA enforces on Pods only (workloads just warn)."""
    if doc["kind"] == "Deployment" or doc["kind"] == "Job":
        template_ = copy.deepcopy(doc["spec"]["template"])
        spec = template_["spec"]
        # Dry-run persisted neither the chart's accounts nor its PriorityClass; PSA looks at neither.
        spec["serviceAccountName"] = "default"
        spec.pop("priorityClassName", None)
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"psa-{doc['metadata']['name']}"[:63].rstrip("-"),
                             "labels": template_.get("metadata", {}).get("labels", {})},
                "spec": spec}
    return None


@pytest.mark.parametrize("which", ["default", "full"])
def test_rendered_objects_are_accepted_by_the_api_server_under_restricted_psa(helm, kube_api, namespace, which):
    from kubernetes.client.exceptions import ApiException

    _restricted_namespace(kube_api, namespace)
    # Release "team": the namespace fixture already holds a Secret named lora-jobs-s3.
    docs = template(helm, values=full_values() if which == "full" else None, namespace=namespace, release="team")
    rejected = []
    pods = []
    for doc in docs:
        pod = _pod_from_workload(doc)
        if pod:
            pods.append(pod)
        if doc["kind"] == "Pod":
            doc = copy.deepcopy(doc)
            doc["spec"]["serviceAccountName"] = "default"
        for obj in [doc] + ([pod] if pod else []):
            try:
                _dry_run_create(kube_api, obj, namespace)
            except ApiException as err:
                rejected.append(f"{obj['kind']} {obj['metadata']['name']}: {err.status} {err.body}")
    assert not rejected, "\n".join(rejected)
    if which == "full":
        assert {p["metadata"]["name"] for p in pods} >= {"psa-team-lora-jobs-minio", "psa-team-lora-jobs-minio-buckets"}


def test_a_privileged_pod_is_refused_in_the_restricted_namespace(kube_api, namespace):
    """The control for the test above: the namespace really enforces `restricted`."""
    from kubernetes.client.exceptions import ApiException

    _restricted_namespace(kube_api, namespace)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root-pod"},
           "spec": {"containers": [{"name": "c", "image": "lora-jobs/launcher:0.1.0"}]}}
    with pytest.raises(ApiException) as err:
        _dry_run_create(kube_api, pod, namespace)
    assert err.value.status == 403 and "restricted" in err.value.body


# ------------------------------------------------------------ install, then the launcher submits

def _token_kubeconfig(kube_api, stack, namespace: str, service_account: str, path: Path) -> str:
    """A kubeconfig that authenticates as a ServiceAccount (a short-lived bound token)."""
    from kubernetes import client

    token = client.CoreV1Api(kube_api).create_namespaced_service_account_token(
        service_account, namespace,
        client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[],
                                                                            expiration_seconds=3600))).status.token
    admin = yaml.safe_load(Path(stack.kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "stack", "cluster": cluster}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "stack", "user": service_account,
                                                 "namespace": namespace}}],
        "current-context": "sa",
    }))
    return str(path)


def install(helm: str, stack, namespace: str, *flags: str, runs: dict | None = None, **s3: str) -> None:
    values = {"s3": {"existingSecret": "lora-jobs-s3", "endpoint": stack.s3_endpoint, "bucket": stack.bucket, **s3},
              "images": {"trainer": {"tag": "from-the-chart"}}, "runs": runs or {}}
    run_helm(helm, "install", "lora-jobs", str(CHART), "--namespace", namespace, "--wait", "--timeout", "2m",
             *flags, values=values, kubeconfig=stack.kubeconfig)


@pytest.fixture()
def installed(helm, stack, kube_api, namespace):
    """The chart installed in a fresh restricted namespace, with the stack's MinIO and Secret."""
    _restricted_namespace(kube_api, namespace)
    install(helm, stack, namespace)
    yield namespace
    run_helm(helm, "uninstall", "lora-jobs", "--namespace", namespace, kubeconfig=stack.kubeconfig, check=False)


def launcher_as_service_account(kube_api, stack, namespace: str, tmp_path: Path, *args: str,
                                timeout: float = 180, account: str = "lora-jobs-launcher") -> subprocess.CompletedProcess:
    """The launcher CLI authenticated as one of the chart's ServiceAccounts (the launcher's by default), so with
    exactly its Role. Only where the cluster is and the namespace are given: every other setting must come from
    the chart."""
    kubeconfig = _token_kubeconfig(kube_api, stack, namespace, account, tmp_path / "kubeconfig")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCHER_", "AWS_", "KUBECONFIG"))}
    env.update({"LAUNCHER_KUBECONFIG": kubeconfig, "LAUNCHER_NAMESPACE": namespace,
                "HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    return subprocess.run([sys.executable, "-m", "launcher", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def test_after_install_the_launcher_submits_with_the_charts_defaults_and_the_job_completes(
        installed, stack, kube_api, tmp_path):
    from kubernetes import client

    namespace = installed
    proc = launcher_as_service_account(kube_api, stack, namespace, tmp_path,
                                       "submit", str(EXAMPLE_SPEC), "--wait", "--timeout", "120")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    jobs = client.BatchV1Api(kube_api).list_namespaced_job(
        namespace, label_selector="app.kubernetes.io/name=lora-jobs,lora-jobs.io/run=support-bot").items
    assert len(jobs) == 1
    job = jobs[0]
    assert job.status.succeeded == 1
    pod = job.spec.template.spec
    container = pod.containers[0]
    assert container.image == "lora-jobs/trainer:from-the-chart"  # the chart's image, via its ConfigMap
    env_by_name = {e.name: e for e in container.env}
    assert env_by_name["AWS_ENDPOINT_URL"].value == stack.s3_endpoint
    assert env_by_name["AWS_SECRET_ACCESS_KEY"].value_from.secret_key_ref.name == "lora-jobs-s3"
    assert pod.service_account_name == "lora-jobs-trainer"
    assert pod.automount_service_account_token is False
    pods = client.CoreV1Api(kube_api).list_namespaced_pod(namespace, label_selector=f"job-name={job.metadata.name}")
    assert [p.spec.node_name for p in pods.items] == ["kwok-gpu-0"]


def test_a_missing_existing_secret_is_caught_by_the_launchers_preflight_not_a_pod(
        helm, stack, kube_api, namespace, tmp_path):
    from kubernetes import client

    install(helm, stack, namespace, existingSecret="team-s3-not-created-yet")
    proc = launcher_as_service_account(kube_api, stack, namespace, tmp_path, "submit", str(EXAMPLE_SPEC))
    assert proc.returncode != 0
    assert "team-s3-not-created-yet" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert client.BatchV1Api(kube_api).list_namespaced_job(namespace).items == []


def test_the_launcher_account_is_refused_what_its_role_does_not_grant(installed, stack, kube_api, tmp_path):
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    namespace = installed
    kubeconfig = _token_kubeconfig(kube_api, stack, namespace, "lora-jobs-launcher", tmp_path / "kubeconfig")
    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    with client.ApiClient(cfg) as api:
        core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
        # Granted: the one credentials Secret, and the Job verbs.
        assert core.read_namespaced_secret("lora-jobs-s3", namespace).metadata.name == "lora-jobs-s3"
        batch.list_namespaced_job(namespace)
        refused = {
            "list secrets": lambda: core.list_namespaced_secret(namespace),
            "get another Secret": lambda: core.read_namespaced_secret("someone-elses", namespace),
            "create pods": lambda: core.create_namespaced_pod(namespace, {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                "spec": {"containers": [{"name": "c", "image": "x"}]}}, dry_run="All"),
            "evict pods": lambda: core.create_namespaced_pod_eviction("any", namespace, {
                "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "any"}}),
            "patch jobs": lambda: batch.patch_namespaced_job("any", namespace, {"spec": {"suspend": False}}),
            "delete the Role": lambda: client.RbacAuthorizationV1Api(api).delete_namespaced_role(
                "lora-jobs-launcher", namespace),
            "list nodes": lambda: core.list_node(),
            "delete a Service": lambda: core.delete_namespaced_service("any", namespace),
        }
        for what, call in refused.items():
            with pytest.raises(ApiException) as err:
                call()
            assert err.value.status == 403, f"{what}: expected 403, got {err.value.status}"


def _allowed(kube_api, namespace: str, account: str, verb: str, resource: str, group: str = "",
             name: str | None = None, in_namespace: str | None = None) -> bool:
    """The real API server's answer (SubjectAccessReview, as `kubectl auth can-i --as`) for a ServiceAccount,
    with the groups its token carries."""
    from kubernetes import client

    review = client.AuthorizationV1Api(kube_api).create_subject_access_review(client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{namespace}:{account}",
            groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(namespace=in_namespace or namespace, verb=verb,
                                                            group=group, resource=resource, name=name))))
    return bool(review.status.allowed)


def test_the_submit_account_may_do_what_launcher_submit_needs_and_no_more(helm, stack, kube_api, namespace,
                                                                          tmp_path):
    """The chart installed with `runs`, on the real API server. --no-hooks: this namespace's pods land on kwok's
    fake nodes, which run no container, so the hook would "complete" without the launcher having run
    (test_chart_real_node.py runs the hook itself on the real node). Here the launcher runs as the hook's
    account, on the spec file the chart made."""
    from kubernetes import client

    from jobs.spec import TrainingRunSpec
    from launcher.render import job_name

    _restricted_namespace(kube_api, namespace)
    spec = {**MINIMAL_SPEC, "name": "from-values", "base_model": {"uri": f"s3://{stack.bucket}/m/"},
            "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi", "scratch": "1Gi"}}
    install(helm, stack, namespace, "--no-hooks", runs={"from-values": spec})

    sa = "lora-jobs-submit"
    for group, resource, verb in SUBMIT_GRANTS:
        assert _allowed(kube_api, namespace, sa, verb, resource, group), f"{verb} {resource} refused"
    assert _allowed(kube_api, namespace, sa, "get", "configmaps", name="lora-jobs-launcher")
    refused = [("list", "jobs", "batch"), ("watch", "jobs", "batch"), ("delete", "jobs", "batch"),
               ("patch", "jobs", "batch"), ("create", "jobsets", "jobset.x-k8s.io"), ("create", "pods", ""),
               ("create", "pods/exec", ""), ("list", "pods", ""), ("get", "secrets", ""), ("list", "secrets", ""),
               ("list", "configmaps", ""), ("delete", "services", ""), ("create", "rolebindings",
                                                                         "rbac.authorization.k8s.io"),
               ("escalate", "roles", "rbac.authorization.k8s.io"), ("list", "nodes", "")]
    wrongly = [r for r in refused if _allowed(kube_api, namespace, sa, r[0], r[1], r[2])]
    assert not wrongly, f"{sa} may {wrongly}"
    assert not _allowed(kube_api, namespace, sa, "get", "secrets", name="lora-jobs-s3")
    assert not _allowed(kube_api, namespace, sa, "create", "jobs", "batch", in_namespace="default")
    # The control: the review tells granted from refused for this very account.
    assert _allowed(kube_api, namespace, "lora-jobs-launcher", "list", "jobs", "batch")

    # The spec file as the hook reads it (the live ConfigMap), submitted as the hook's account: enough for the
    # whole of `launcher submit`, and the same spec twice is one Job.
    live = client.CoreV1Api(kube_api).read_namespaced_config_map("lora-jobs-runs", namespace)
    spec_file = tmp_path / "from-values.yaml"
    spec_file.write_text(live.data["from-values.yaml"])
    expected = job_name(TrainingRunSpec.model_validate(yaml.safe_load(spec_file.read_text())))
    first = launcher_as_service_account(kube_api, stack, namespace, tmp_path, "submit", str(spec_file), account=sa)
    assert first.returncode == 0, f"stdout:\n{first.stdout}\nstderr:\n{first.stderr}"
    assert f"submitted: job {expected}" in first.stdout
    # What the Role leaves out on purpose is skipped with a warning, not an error.
    assert "could not check Secret lora-jobs-s3" in first.stderr, first.stderr
    again = launcher_as_service_account(kube_api, stack, namespace, tmp_path, "submit", str(spec_file), account=sa)
    assert again.returncode == 0 and f"already submitted: job {expected}" in again.stdout, again.stderr
    jobs = client.BatchV1Api(kube_api).list_namespaced_job(namespace, label_selector="lora-jobs.io/run=from-values")
    assert [j.metadata.name for j in jobs.items] == [expected]
    assert jobs.items[0].spec.template.spec.containers[0].image == "lora-jobs/trainer:from-the-chart"


def test_invalid_values_fail_helm_install_naming_the_value(helm, stack, namespace):
    proc = run_helm(helm, "install", "lora-jobs", str(CHART), "--namespace", namespace,
                    values={"settings": {"gpuResource": "nvidia.com/gpu count"}},
                    kubeconfig=stack.kubeconfig, check=False)
    assert proc.returncode != 0
    assert "at '/settings/gpuResource'" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------ the helm test check

def _docker() -> str:
    return "/usr/bin/docker" if Path("/usr/bin/docker").exists() else (shutil.which("docker") or "docker")


@pytest.mark.docker
def test_the_helm_test_check_tells_a_reachable_bucket_from_a_missing_one(helm, stack):
    """kwok does not run containers, so the hook Pod's check runs here, in the launcher image,
    with the Pod's own command and the stack's MinIO."""
    docker = _docker()
    if subprocess.run([docker, "image", "inspect", "lora-jobs/launcher:0.1.0"], capture_output=True).returncode:
        subprocess.run(["bash", str(REPO / "hack" / "build-images.sh"), "launcher"], check=True, timeout=1200)
    pod = find(template(helm, values={"s3": {"endpoint": stack.s3_endpoint, "bucket": stack.bucket}}), "Pod")
    container = pod["spec"]["containers"][0]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"

    # The Pod reads its keys from the Secret mounted as files, not from env.
    env_in_pod = {e["name"]: e.get("value") for e in container["env"]}
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env_in_pod)
    keys = Path(tempfile.mkdtemp())
    for name, value in (("access-key-id", stack.s3_access_key), ("secret-access-key", stack.s3_secret_key)):
        (keys / name).write_text(value)
        (keys / name).chmod(0o644)
    keys.chmod(0o755)

    def check(bucket: str) -> subprocess.CompletedProcess:
        args = container["args"][:-1] + [bucket]
        env = ["-e", f"AWS_ENDPOINT_URL={stack.s3_endpoint}", "-e", "AWS_REGION=us-east-1",
               "-e", f"S3_CREDENTIALS_DIR={env_in_pod['S3_CREDENTIALS_DIR']}",
               "-v", f"{keys}:{env_in_pod['S3_CREDENTIALS_DIR']}:ro"]
        return subprocess.run([docker, "run", "--rm", "--network", "host", "--read-only", "--user", "10001:10001",
                               "--cap-drop", "ALL", "--security-opt", "no-new-privileges", *env,
                               "--entrypoint", container["command"][0], container["image"],
                               *container["command"][1:], *args],
                              capture_output=True, text=True, timeout=120)

    ok = check(stack.bucket)
    assert ok.returncode == 0, ok.stderr
    assert f"ok: bucket {stack.bucket} is reachable" in ok.stdout
    missing = check(f"no-such-bucket-{uuid.uuid4().hex[:8]}")
    assert missing.returncode != 0
    assert "FAIL" in missing.stderr and "404" in missing.stderr and "create the bucket" in missing.stderr


# ---------------------------------------------------------------------------------- kind

# kind's v1alpha4 API as of kind v0.33.0 (sigs.k8s.io/kind/pkg/apis/config/v1alpha4/types.go):
# the fields its strict loader accepts, so a typo fails here as it would in `kind create cluster`.
KIND_CLUSTER_FIELDS = {"kind", "apiVersion", "name", "nodes", "networking", "featureGates", "runtimeConfig",
                       "kubeadmConfigPatches", "kubeadmConfigPatchesJSON6902", "containerdConfigPatches",
                       "containerdConfigPatchesJSON6902"}
KIND_NODE_FIELDS = {"role", "image", "labels", "extraMounts", "extraPortMappings", "kubeadmConfigPatches",
                    "kubeadmConfigPatchesJSON6902"}
KIND_MOUNT_FIELDS = {"containerPath", "hostPath", "readOnly", "selinuxRelabel", "propagation"}
KIND_PORT_FIELDS = {"containerPort", "hostPort", "listenAddress", "protocol"}
KIND_NETWORKING_FIELDS = {"ipFamily", "apiServerPort", "apiServerAddress", "podSubnet", "serviceSubnet",
                          "disableDefaultCNI", "kubeProxyMode", "dnsSearch"}


def _check_kind_config(cfg: dict) -> list[str]:
    problems = []

    def unknown(where: str, obj: dict, allowed: set[str]) -> None:
        for key in set(obj) - allowed:
            problems.append(f"{where}.{key}: unknown field")

    if cfg.get("kind") != "Cluster" or cfg.get("apiVersion") != "kind.x-k8s.io/v1alpha4":
        problems.append("kind/apiVersion must be Cluster / kind.x-k8s.io/v1alpha4")
    unknown("", cfg, KIND_CLUSTER_FIELDS)
    unknown("networking", cfg.get("networking") or {}, KIND_NETWORKING_FIELDS)
    nodes = cfg.get("nodes") or []
    roles = [n.get("role", "control-plane") for n in nodes]
    if nodes and "control-plane" not in roles:
        problems.append("nodes: at least one control-plane node is required")
    for i, node in enumerate(nodes):
        unknown(f"nodes[{i}]", node, KIND_NODE_FIELDS)
        if node.get("role", "control-plane") not in ("control-plane", "worker"):
            problems.append(f"nodes[{i}].role: must be control-plane or worker")
        for j, m in enumerate(node.get("extraMounts") or []):
            unknown(f"nodes[{i}].extraMounts[{j}]", m, KIND_MOUNT_FIELDS)
            if m.get("propagation", "None") not in ("None", "HostToContainer", "Bidirectional"):
                problems.append(f"nodes[{i}].extraMounts[{j}].propagation: invalid")
        for j, p in enumerate(node.get("extraPortMappings") or []):
            unknown(f"nodes[{i}].extraPortMappings[{j}]", p, KIND_PORT_FIELDS)
        for j, patch in enumerate(node.get("kubeadmConfigPatches") or []):
            if not isinstance(yaml.safe_load(patch), dict):
                problems.append(f"nodes[{i}].kubeadmConfigPatches[{j}]: not a YAML object")
        if not all(isinstance(v, str) for v in (node.get("labels") or {}).values()):
            problems.append(f"nodes[{i}].labels: values must be strings")
    return problems


def test_kind_config_parses_against_kinds_v1alpha4_api():
    text = (REPO / "kind-config.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert _check_kind_config(cfg) == []
    assert [n["role"] for n in cfg["nodes"]] == ["control-plane", "worker"]
    # The GPU worker is documented, commented out; uncommented it must parse too.
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if 'remove the leading "# "' in line) + 1
    gpu_node = yaml.safe_load("\n".join(line[2:] for line in lines[start:] if line.startswith("# ")))
    assert isinstance(gpu_node, list) and gpu_node[0]["role"] == "worker"
    with_gpu = dict(cfg, nodes=cfg["nodes"] + gpu_node)
    assert _check_kind_config(with_gpu) == []
    mounts = {m["containerPath"] for m in gpu_node[0]["extraMounts"]}
    assert "/var/run/nvidia-container-devices/all" in mounts


def test_the_kind_check_catches_what_kind_would_refuse():
    bad = {"kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4",
           "nodes": [{"role": "worker", "extraMount": []}], "networkin": {}}
    problems = _check_kind_config(bad)
    assert "nodes[0].extraMount: unknown field" in problems and ".networkin: unknown field" in problems
    assert "nodes: at least one control-plane node is required" in problems


def test_kind_up_stops_before_cluster_creation_with_a_clear_message(tmp_path):
    """No kind (or no node image) here: the script must say so and what to do, not fail obscurely."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "helm", "kubectl"):  # present, so the kind check is the one that fails
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "KIND": "kind-not-installed"}
    proc = subprocess.run(["bash", str(REPO / "hack" / "kind-up.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "kind is not installed" in proc.stderr and "go install sigs.k8s.io/kind@" in proc.stderr

    # kind present but its node image cannot be had: stop before `kind create cluster`.
    (bin_dir / "kind").write_text("#!/bin/sh\necho \"kind $*\" >> \"$HOME/kind-calls\"\n"
                                  "[ \"$1\" = version ] && echo 'kind v0.30.0 go1.24 linux/amd64'\nexit 0\n")
    (bin_dir / "kind").chmod(0o755)
    (bin_dir / "docker").write_text("#!/bin/sh\ncase \"$1 $2\" in\n  'image inspect') exit 1 ;;\n"
                                    "  'pull '*) echo 'Error response from daemon: no route to registry' >&2; exit 1 ;;\n"
                                    "esac\nexit 0\n")
    env["KIND"] = "kind"
    env["KIND_BUILD_NODE_IMAGE"] = "0"  # else it goes on to build a node image here (hack/kind-node-image.sh)
    proc = subprocess.run(["bash", str(REPO / "hack" / "kind-up.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "node image" in proc.stderr and "kindest/node" in proc.stderr
    calls = (tmp_path / "kind-calls").read_text() if (tmp_path / "kind-calls").exists() else ""
    assert "create cluster" not in calls
