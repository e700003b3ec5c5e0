"""resources.nodes > 1: the Indexed Job, the headless Service and torchrun's rendezvous variables."""
from __future__ import annotations

import pytest

from jobs.spec import parse_spec
from launcher import render
from launcher.settings import make_settings
from launcher.submit import fit_failure

pytestmark = pytest.mark.unit

BASE = {"name": "big-run", "base_model": {"uri": "s3://models/llama/"},
        "dataset": {"train": "s3://data/train.jsonl"}, "output": "s3://runs/lora"}


def _render(**resources):
    spec = parse_spec({**BASE, "resources": {"cpu": "8", "memory": "64Gi", **resources}})
    s = make_settings(namespace="ml", s3_endpoint="http://minio.storage:9000")
    run = render.render_run(spec, s)
    return spec, run.workload, run.service


def _env(job) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_one_node_is_the_plain_one_pod_job():
    _, job, svc = _render(gpus=4)
    assert svc is None
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    assert "completionMode" not in job["spec"] and "subdomain" not in job["spec"]["template"]["spec"]
    assert not any(k.startswith("PET_") for k in _env(job))


def test_two_nodes_render_an_indexed_job_with_a_static_rendezvous_on_pod_zero():
    spec, job, svc = _render(gpus=4, nodes=2, retries=3)
    name = render.job_name(spec)
    js, pod = job["spec"], job["spec"]["template"]["spec"]
    assert js["completionMode"] == "Indexed" and js["completions"] == js["parallelism"] == 2
    assert js["backoffLimit"] == 6, "a gang failure fails every pod: retries x nodes"
    assert pod["subdomain"] == name and pod["restartPolicy"] == "Never"
    env = _env(job)
    assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "4"
    assert env["PET_NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env["PET_MASTER_ADDR"] == f"{name}-0.{name}" and env["PET_MASTER_PORT"] == "29500"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4

    assert svc["metadata"]["name"] == name and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["ports"] == [{"name": "rendezvous", "port": 29500, "targetPort": 29500}]


def test_cpu_nodes_get_one_process_each():
    _, job, _ = _render(gpus=0, nodes=3)
    assert _env(job)["PET_NPROC_PER_NODE"] == "1" and job["spec"]["completions"] == 3


@pytest.mark.parametrize("bad", [0, -1, 65])
def test_nodes_out_of_range_is_an_error_naming_the_field(bad):
    from jobs.errors import SpecError

    with pytest.raises(SpecError, match="resources.nodes"):
        parse_spec({**BASE, "resources": {"nodes": bad}})


def _node(name, gpus):
    return {"metadata": {"name": name, "labels": {}}, "spec": {},
            "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": str(gpus), "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def test_preflight_counts_how_many_of_the_runs_pods_the_cluster_can_ever_hold():
    _, job, _ = _render(gpus=4, nodes=3)
    assert fit_failure([_node("a", 8), _node("b", 4)], job, "nvidia.com/gpu") is None  # 2 + 1 pods
    msg = fit_failure([_node("a", 8)], job, "nvidia.com/gpu")
    assert msg and "the run's 3 pods (resources.nodes) need 4 nvidia.com/gpu each" in msg
    assert "can ever hold only 2 such pods" in msg and "lower resources.nodes to 2" in msg


def test_a_multi_node_job_is_rendered_to_fail_and_finish_as_a_gang():
    """What the Job API can do for a gang (the pods do the rest: a dead or silent peer ends every rank with
    exit 75, tests/integration/test_distributed_cpu.py): every failure of any index counts against one
    budget of retries x nodes; a permanent exit code of any pod fails the whole Job at once; a preempted or
    evicted pod is not counted; a replacement starts only once its predecessor has ended; and the Job is done
    when node 0 (the publisher) is."""
    from jobs.errors import PERMANENT_EXIT_CODES

    _, job, _ = _render(gpus=4, nodes=4, retries=2)
    js = job["spec"]
    assert js["backoffLimit"] == 8 and "backoffLimitPerIndex" not in js and "maxFailedIndexes" not in js
    assert js["podReplacementPolicy"] == "Failed"
    assert js["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    rules = js["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["operator"] == "In"
    assert {int(c) for c in PERMANENT_EXIT_CODES} <= set(rules[1]["onExitCodes"]["values"])
    assert 75 not in rules[1]["onExitCodes"]["values"] and len(rules) == 2, "75 (a lost peer) is retried"

    _, one, _ = _render(gpus=4)
    assert "successPolicy" not in one["spec"], "a success policy needs an Indexed Job"
