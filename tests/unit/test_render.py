"""Rendering a spec into the Job and ConfigMap: golden file, contracts, and the settings that feed it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from jobs.errors import PERMANENT_EXIT_CODES, SpecError
from jobs.spec import load_spec_text, parse_spec
from launcher import render
from launcher.settings import (LauncherSettings, SettingsError, cluster_values_from_configmap, load_settings,
                               make_settings)
from spec_texts import minimal_spec

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden" / "job.yaml"

SPEC = {
    "name": "support-bot",
    "base_model": {"uri": "s3://models/smollm2/"},
    "dataset": {"train": "s3://data/support/train.jsonl"},
    "output": "s3://runs/lora",
    "resources": {"gpus": 2, "cpu": "8", "memory": "64Gi", "scratch": "200Gi", "timeout_hours": 6, "retries": 2},
    "labels": {"team": "support"},
}




def settings(**kw) -> LauncherSettings:
    base = {"namespace": "ml", "s3_endpoint": "http://minio.storage:9000"}
    base.update(kw)
    return make_settings(**base)


def spec(**changes):
    data = yaml.safe_load(yaml.safe_dump(SPEC))
    for key, value in changes.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return parse_spec(data)


def container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------------------ golden

def test_rendered_job_and_configmap_match_the_golden_file():
    text = render.to_yaml(*render.render_run(spec(), settings()).objects)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "rendering changed: review the diff, then UPDATE_GOLDEN=1 pytest"


def test_rendering_is_pure_and_deterministic():
    s = spec()
    assert render.render_run(s, settings()) == render.render_run(s, settings())


# ------------------------------------------------------------------------------ identity

def test_job_name_is_run_name_plus_eight_hex_of_the_spec_hash():
    s = spec()
    assert render.job_name(s) == f"support-bot-{s.spec_hash()[:8]}"
    assert len(render.job_name(s)) <= 63


def test_changed_spec_is_a_new_job_name_same_spec_same_name():
    assert render.job_name(spec()) == render.job_name(spec())
    assert render.job_name(spec()) != render.job_name(spec(**{"training.epochs": 2}))


def test_labels_on_job_pod_template_and_configmap():
    s = spec()
    run = render.render_run(s, settings())
    job, cm = run.workload, run.configmap
    want = {"app.kubernetes.io/name": "lora-jobs", "app.kubernetes.io/component": "training",
            "lora-jobs.io/run": "support-bot", "lora-jobs.io/spec-hash": s.spec_hash()}
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"], cm["metadata"]["labels"]):
        assert want.items() <= labels.items()
        assert labels["team"] == "support"
    assert cm["metadata"]["name"] == job["metadata"]["name"]
    assert job["metadata"]["annotations"]["lora-jobs.io/output"] == "s3://runs/lora/support-bot"


def test_user_labels_cannot_override_ours():
    s = spec(labels={"team": "x"})
    s.labels["lora-jobs.io/run"] = "evil"  # the spec cannot say this (no '/' allowed); ours win regardless
    labels = render.run_labels(s)
    assert labels["lora-jobs.io/run"] == "support-bot"


# ------------------------------------------------------------------------------ the pod

def test_gpu_limit_requests_tolerations_and_node_selector():
    job = render.render_run(spec(), settings(node_selector={"nvidia.com/gpu.present": "true"})).workload
    res = container(job)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 2
    assert res["requests"] == {"cpu": "8", "memory": "64Gi"}
    # limits = requests for CPU and memory: the pod is in the Guaranteed QoS class
    assert {k: res["limits"][k] for k in ("cpu", "memory")} == res["requests"]
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_custom_gpu_resource_name():
    job = render.render_run(spec(), settings(gpu_resource="amd.com/gpu")).workload
    assert container(job)["resources"]["limits"]["amd.com/gpu"] == 2
    assert "nvidia.com/gpu" not in container(job)["resources"]["limits"]


def test_cpu_run_has_no_gpu_limit_and_no_gpu_steering():
    job = render.render_run(spec(**{"resources.gpus": 0}), settings(node_selector={"gpu": "yes"})).workload
    assert "nvidia.com/gpu" not in container(job)["resources"]["limits"]
    pod = job["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_job_failure_handling():
    job = render.render_run(spec(), settings(ttl_seconds_after_finished=3600)).workload
    js = job["spec"]
    assert js["backoffLimit"] == 2
    assert js["activeDeadlineSeconds"] == 6 * 3600
    assert js["ttlSecondsAfterFinished"] == 3600
    assert js["podReplacementPolicy"] == "Failed"
    assert js["template"]["spec"]["restartPolicy"] == "Never"
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    rules = js["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob"
    assert rules[1]["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [10, 11, 12, 13, 14, 15, 137]}
    assert sorted(int(c) for c in PERMANENT_EXIT_CODES) == [10, 11, 12, 13, 14, 15]


def test_credentials_only_by_secret_reference_endpoint_as_plain_value():
    job = render.render_run(spec(), settings(s3_secret_name="creds", s3_access_key_key="ak",
                                             s3_secret_key_key="sk")).workload
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID",
                                        "valueFrom": {"secretKeyRef": {"name": "creds", "key": "ak"}}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": "sk"}
    assert "value" not in env["AWS_SECRET_ACCESS_KEY"]
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert env["LORA_JOBS_RUN_ID"]["value"] == job["metadata"]["name"]
    assert env["LORA_JOBS_WORKDIR"]["value"] == "/scratch"
    assert env["HF_HOME"]["value"] == "/scratch/hf"
    assert env["LORA_JOBS_IMAGE"]["value"] == "lora-jobs/trainer:0.1.0"
    assert container(job)["command"] == ["python", "-m", "jobs", "run", "--spec", "/etc/lora-jobs/spec.yaml"]


def test_no_endpoint_variable_when_none_is_configured():
    job = render.render_run(spec(), settings(s3_endpoint=None)).workload
    assert "AWS_ENDPOINT_URL" not in {e["name"] for e in container(job)["env"]}


def test_pod_passes_pod_security_restricted():
    job = render.render_run(spec(), settings()).workload
    pod = job["spec"]["template"]["spec"]
    for sc in (pod["securityContext"], container(job)["securityContext"]):
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == 10001 and sc["runAsGroup"] == 10001  # above 10000: no user of the node
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    csc = container(job)["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc["readOnlyRootFilesystem"] is True
    for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
        assert forbidden not in pod
    assert all(set(v) <= {"name", "configMap", "emptyDir"} for v in pod["volumes"])


def test_volumes_scratch_tmp_and_spec():
    job = render.render_run(spec(), settings()).workload
    pod = job["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["scratch"]["emptyDir"] == {"sizeLimit": "200Gi"}
    assert "emptyDir" in vols["tmp"]
    assert vols["spec"]["configMap"]["name"] == job["metadata"]["name"]
    mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
    assert mounts["/etc/lora-jobs"]["readOnly"] is True
    assert {"/scratch", "/tmp"} <= set(mounts)


def test_priority_class_from_spec_wins_over_settings():
    job = render.render_run(spec(), settings(priority_class="batch-low")).workload
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "batch-low"
    job = render.render_run(spec(**{"resources.priority_class": "urgent"}),
                            settings(priority_class="batch-low")).workload
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "urgent"


def test_kueue_queue_labels_the_job_and_creates_it_suspended():
    job = render.render_run(spec(), settings(queue="gpu-queue")).workload
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    job = render.render_run(spec(), settings()).workload
    assert "suspend" not in job["spec"] and "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_only_documented_fields_shape_the_pod():
    """Two specs that differ outside resources/name/labels render the same pod (apart from hash-derived names)."""
    a, b = spec(), spec(**{"training.epochs": 3, "lora.rank": 32, "base_model.uri": "s3://models/other/"})
    ja, jb = render.render_job(a, settings()), render.render_job(b, settings())

    def strip(job):
        text = yaml.safe_dump(job["spec"]["template"]["spec"])
        return text.replace(render.job_name(a), "X").replace(render.job_name(b), "X")

    assert strip(ja) == strip(jb)


def test_spec_cannot_inject_pod_fields():
    with pytest.raises(SpecError) as e:
        spec(**{"resources.hostNetwork": True, "resources.securityContext": {"privileged": True}})
    wheres = {p.where for p in e.value.problems}
    assert {"resources.hostNetwork", "resources.securityContext"} <= wheres


def test_configmap_holds_the_validated_spec_with_defaults():
    s = spec()
    cm = render.render_run(s, settings()).configmap
    data = yaml.safe_load(cm["data"]["spec.yaml"])
    assert data["training"]["learning_rate"] == 2e-4  # defaults filled in
    again = parse_spec(data)
    assert again == s and again.spec_hash() == s.spec_hash()


def test_owner_reference_points_at_the_created_job():
    job = render.render_run(spec(), settings()).workload
    job["metadata"]["uid"] = "1234"
    ref = render.owner_reference(job)
    assert ref["kind"] == "Job" and ref["uid"] == "1234" and ref["name"] == job["metadata"]["name"]


# ------------------------------------------------------------------------------ bad specs

def test_bad_spec_reports_every_problem_with_field_paths_and_lines():
    text = minimal_spec("Bad_Name") + """\
lora:
  rank: 0
  ranq: 16
training:
  learning_rate: 0
  epochs: many
resources:
  gpus: 99
"""
    with pytest.raises(SpecError) as e:
        load_spec_text(text, source="spec.yaml")
    by_where = {p.where: p for p in e.value.problems}
    assert {"name", "lora.rank", "lora.ranq", "training.learning_rate", "training.epochs",
            "resources.gpus"} <= set(by_where)
    assert by_where["lora.ranq"].message == "unknown field"
    assert by_where["lora.ranq"].line == 9
    assert by_where["resources.gpus"].line == 14
    assert "6 problems" in str(e.value)


# ------------------------------------------------------------------------------ settings

def test_settings_defaults():
    s = make_settings()
    assert s.namespace == "default" and s.image == "lora-jobs/trainer:0.1.0"
    assert s.gpu_resource == "nvidia.com/gpu" and s.ttl_seconds_after_finished == 7 * 24 * 3600
    assert s.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert s.service_account == "lora-jobs-trainer" and s.queue is None


def test_settings_precedence_args_env_file_cluster(monkeypatch, tmp_path):
    cfg = tmp_path / "launcher.yaml"
    cfg.write_text("image: from-file:1\nqueue: file-queue\nnamespace: file-ns\n")
    monkeypatch.setenv("LAUNCHER_CONFIG", str(cfg))
    monkeypatch.setenv("LAUNCHER_IMAGE", "from-env:1")
    monkeypatch.setenv("LAUNCHER_NODE_SELECTOR", '{"pool": "gpu"}')
    cluster = {"image": "from-cluster:1", "queue": "cluster-queue", "s3_endpoint": "http://cluster-s3",
               "service_account": "sa-from-chart"}
    s = make_settings(cluster, namespace="from-flag")
    assert s.namespace == "from-flag"
    assert s.image == "from-env:1"
    assert s.queue == "file-queue"
    assert s.s3_endpoint == "http://cluster-s3" and s.service_account == "sa-from-chart"
    assert s.node_selector == {"pool": "gpu"}


def test_default_config_file_location(monkeypatch, tmp_path):
    path = tmp_path / ".config" / "lora-jobs" / "launcher.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("namespace: team-a\n")
    assert make_settings().namespace == "team-a"


def test_typo_in_settings_file_is_one_clear_error(monkeypatch, tmp_path):
    cfg = tmp_path / "l.yaml"
    cfg.write_text("namespce: x\n")
    monkeypatch.setenv("LAUNCHER_CONFIG", str(cfg))
    with pytest.raises(SettingsError, match="namespce"):
        make_settings()
    monkeypatch.setenv("LAUNCHER_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match="does not exist"):
        make_settings()


def test_cluster_configmap_is_read_through_a_kube_client_and_cannot_move_us():
    class FakeKube:
        def __init__(self):
            self.asked = []

        def get_configmap(self, name, namespace=None):
            self.asked.append((name, namespace))
            return {"metadata": {"name": name}, "data": {"settings.yaml": (
                "image: chart/trainer:2\nnamespace: elsewhere\nfuture_setting: 1\n"
                "tolerations: [{key: gpu, operator: Exists}]\n")}}

    kube = FakeKube()
    s = load_settings(kube, namespace="ml")
    assert kube.asked == [("lora-jobs-launcher", "ml")]
    assert s.image == "chart/trainer:2" and s.namespace == "ml"
    assert s.tolerations == [{"key": "gpu", "operator": "Exists"}]
    assert cluster_values_from_configmap(None) == {}


def test_a_multi_gpu_pod_gets_a_memory_backed_dev_shm_and_one_gpu_pods_do_not():
    one = render.render_run(spec(**{"resources.gpus": 1}), settings()).workload
    four = render.render_run(spec(**{"resources.gpus": 4}), settings()).workload

    def shm(job):
        pod = job["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        return mounts.get("dshm"), vols.get("dshm")

    assert shm(one) == (None, None)
    mount, vol = shm(four)
    assert mount == "/dev/shm" and vol["emptyDir"]["medium"] == "Memory"
    assert four["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
