"""resources.nodes > 1 as a JobSet (settings.multinode_workload): the render, what submit picks, and the
diagnosis of a JobSet run from realistic API dicts. The real controller is in tests/integration/test_jobset.py."""
from __future__ import annotations

import re

import pytest

from jobs.spec import parse_spec
from launcher import render
from launcher.diagnose import diagnose_run
from launcher.errors import PreflightError, SettingsError
from launcher.settings import make_settings
from launcher.submit import fit_failure, jobsets_served

pytestmark = pytest.mark.unit

BASE = {"name": "big-run", "base_model": {"uri": "s3://models/llama/"},
        "dataset": {"train": "s3://data/train.jsonl"}, "output": "s3://runs/lora"}


def _spec(**resources):
    return parse_spec({**BASE, "resources": {"cpu": "8", "memory": "64Gi", **resources}})


def _settings(workload="jobset", **kw):
    return make_settings(namespace="ml", s3_endpoint="http://minio.storage:9000", multinode_workload=workload, **kw)


def _env(pod_spec) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod_spec["containers"][0]["env"]}


# ------------------------------------------------------------------------------ render

def test_a_two_node_jobset_is_one_replicated_job_of_the_indexed_jobs_pods_with_jobsets_dns():
    spec, settings = _spec(gpus=4, nodes=2, retries=3), _settings()
    run = render.render_run(spec, settings)
    js, cm = run.workload, run.configmap
    job = render.render_job(spec, settings)
    name = render.job_name(spec)
    assert (js["apiVersion"], js["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert js["metadata"] == job["metadata"] and cm["metadata"]["name"] == name
    assert run.service is None and run.objects == [js, cm], "a JobSet makes its own headless Service (network)"

    (rj,) = js["spec"]["replicatedJobs"]
    assert rj["name"] == render.REPLICATED_JOB and rj["replicas"] == 1 and "metadata" not in rj["template"], \
        "no run labels on the child Job: it is not a run of its own in `launcher list`"
    child = rj["template"]["spec"]
    assert child["completionMode"] == "Indexed" and child["completions"] == child["parallelism"] == 2
    assert child["backoffLimit"] == 0 and child["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    assert "ttlSecondsAfterFinished" not in child and "suspend" not in child
    assert js["spec"]["ttlSecondsAfterFinished"] == settings.ttl_seconds_after_finished and "suspend" not in js["spec"]
    assert js["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True}

    # the pods are the Indexed Job's, but for torchrun's rendezvous address: JobSet's hostname of pod 0
    pod, indexed = child["template"]["spec"], job["spec"]["template"]["spec"]
    assert _env(pod)["PET_MASTER_ADDR"] == f"{name}-n-0-0.{name}"
    assert {k: v for k, v in _env(pod).items() if k != "PET_MASTER_ADDR"} == \
        {k: v for k, v in _env(indexed).items() if k != "PET_MASTER_ADDR"}
    def strip(p):
        return {**p, "containers": [{**p["containers"][0], "env": None}]}

    assert strip(pod) == strip(indexed), "security context, resources, volumes, /dev/shm: all as the Indexed Job's"
    assert child["template"]["metadata"] == job["spec"]["template"]["metadata"]


def test_gang_semantics_are_the_jobset_failure_policy_and_match_the_job_controllers_messages():
    spec = _spec(gpus=4, nodes=2, retries=2)
    js = render.render_run(spec, _settings()).workload
    policy = js["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 2 and policy["restartStrategy"] == "BlockingRecreate"
    pod_rules = js["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]["rules"]
    indexed_rules = render.render_job(spec, _settings())["spec"]["podFailurePolicy"]["rules"]
    assert [r["action"] for r in pod_rules] == ["FailJob", "FailJob"]
    assert pod_rules[1] == indexed_rules[1], "the same deterministic exit codes end the run"

    # what kube-controller-manager 1.34 writes into the Failed condition (pkg/controller/job/pod_failure_policy.go)
    exit_msg = ("Container trainer for pod ml/big-run-n-0-1-abcde failed with exit code 11 matching FailJob rule at "
                "index 1")
    disrupted = "Pod ml/big-run-n-0-1-abcde has condition DisruptionTarget matching FailJob rule at index 0"
    actions = {r["name"]: r for r in policy["rules"]}

    def matches(rule, message):
        return any(re.search(p, message) for p in rule.get("onJobFailureMessagePatterns", []))

    assert actions["PermanentFailure"]["action"] == "FailJobSet" and matches(actions["PermanentFailure"], exit_msg)
    assert not matches(actions["PermanentFailure"], disrupted)
    assert actions["Disruption"]["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert matches(actions["Disruption"], disrupted) and not matches(actions["Disruption"], exit_msg)
    assert actions["TimeLimit"] == {"name": "TimeLimit", "action": "FailJobSet",
                                    "onJobFailureReasons": ["DeadlineExceeded"]}
    for rule in policy["rules"]:  # JobSet's webhook: ^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$
        assert re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", rule["name"])


def test_the_longest_run_name_fits_jobsets_63_character_pod_names_at_64_nodes():
    spec = parse_spec({**BASE, "name": "a" * 40, "resources": {"gpus": 0, "nodes": 64}})
    js = render.render_run(spec, _settings()).workload
    # JobSet's webhook checks <jobset>-<replicatedJob>-<last job index>-<last pod index>-<5 random characters>
    longest = f"{js['metadata']['name']}-{render.REPLICATED_JOB}-0-63-abcde"
    assert len(longest) <= 63, longest


def test_a_queue_suspends_and_labels_the_jobset_not_its_child_job():
    js = render.render_run(_spec(gpus=4, nodes=2), _settings(queue="team-a")).workload
    assert js["spec"]["suspend"] is True and js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "suspend" not in js["spec"]["replicatedJobs"][0]["template"]["spec"]


@pytest.mark.parametrize("workload,served,nodes,kind", [
    ("indexed-job", True, 2, "Job"), ("jobset", False, 2, "JobSet"), ("auto", True, 2, "JobSet"),
    ("auto", False, 2, "Job"), ("jobset", True, 1, "Job"), ("auto", True, 1, "Job"),
])
def test_what_a_run_becomes(workload, served, nodes, kind):
    run = render.render_run(_spec(gpus=1, nodes=nodes), _settings(workload), jobsets_served=served)
    assert run.workload["kind"] == kind
    assert (run.service is not None) == (kind == "Job" and nodes > 1), "an Indexed Job of 2 nodes, and it alone"


def test_the_default_is_the_indexed_job_and_a_wrong_value_names_the_choices(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert make_settings().multinode_workload == "indexed-job"
    with pytest.raises(SettingsError, match="multinode_workload: Input should be 'indexed-job', 'jobset' or 'auto'"):
        make_settings(multinode_workload="jobsets")
    with pytest.raises(SettingsError,
                       match="multinode_worklaod: not a setting \\(did you mean multinode_workload\\?\\)"):
        make_settings(multinode_worklaod="jobset")


class _Discovery:
    """Just the part of launcher.kube.Kube that submit asks before rendering."""

    def __init__(self, served: bool):
        self.served, self.asked = served, 0

    def serves_jobsets(self) -> bool:
        self.asked += 1
        return self.served


class _Cluster(_Discovery):
    """A cluster that serves JobSets and holds ``jobs`` (name -> Job): what submit reads before creating."""

    def __init__(self, jobs):
        super().__init__(served=True)
        self.jobs = jobs

    def get_job(self, name):
        return self.jobs.get(name)

    def get_jobset(self, name):
        return None

    def create_jobset(self, body, dry_run=False):
        raise AssertionError("the run exists: nothing is created")


def test_a_run_submitted_as_a_job_is_found_again_after_the_setting_changed_to_jobset():
    from launcher.submit import submit

    spec = _spec(gpus=4, nodes=2)
    job = render.render_job(spec, _settings("indexed-job"))
    result = submit(_Cluster({job["metadata"]["name"]: job}), spec, _settings("jobset"))
    assert not result.created and result.message == f"already submitted: job {render.job_name(spec)}"


def test_submit_asks_the_cluster_only_where_it_decides_and_refuses_jobset_without_the_crd():
    two, one = _spec(gpus=4, nodes=2), _spec(gpus=4)
    kube = _Discovery(served=False)
    assert jobsets_served(kube, one, _settings("jobset")) is False and kube.asked == 0
    assert jobsets_served(kube, two, _settings("indexed-job")) is False and kube.asked == 0
    assert jobsets_served(kube, two, _settings("auto")) is False and kube.asked == 1
    with pytest.raises(PreflightError) as e:
        jobsets_served(kube, two, _settings("jobset"))
    assert "multinode_workload is jobset, but the cluster does not serve jobsets.jobset.x-k8s.io" in str(e.value)
    assert "set multinode_workload to indexed-job or auto (LAUNCHER_MULTINODE_WORKLOAD)" in str(e.value)
    assert jobsets_served(_Discovery(served=True), two, _settings("auto")) is True


def test_fit_failure_reads_the_jobsets_pods():
    js = render.render_run(_spec(gpus=8, nodes=2), _settings()).workload
    node = {"metadata": {"name": "gpu-0"}, "spec": {}, "status": {"allocatable": {
        "cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}}}
    msg = fit_failure([node], js, "nvidia.com/gpu")
    assert msg and "the run's 2 pods (resources.nodes) need 8 nvidia.com/gpu each" in msg


# ------------------------------------------------------------------------------ diagnosis

NAME = "big-run-0123abcd"


def _jobset(restarts=0, counted=0, conditions=(), suspend=False, max_restarts=3):
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": NAME, "labels": {"kueue.x-k8s.io/queue-name": "team-a"} if suspend else {}},
            "spec": {"suspend": suspend, "failurePolicy": {"maxRestarts": max_restarts},
                     "replicatedJobs": [{"name": "n", "template": {"spec": {"completions": 2}}}]},
            "status": {"restarts": restarts, "restartsCountTowardsMax": counted, "conditions": list(conditions)}}


def _child(attempt, conditions=(), **status):
    return {"metadata": {"name": f"{NAME}-n-0", "creationTimestamp": f"2026-12-01T10:0{attempt}:00Z",
                         "labels": {"jobset.sigs.k8s.io/restart-attempt": str(attempt)}},
            "spec": {"completions": 2, "completionMode": "Indexed", "backoffLimit": 0},
            "status": {"conditions": list(conditions), **status}}


def _pod(attempt, index, phase="Running", exit_code=None, node="gpu-0"):
    state = {"terminated": {"exitCode": exit_code}} if exit_code is not None else {"running": {}}
    return {"metadata": {"name": f"{NAME}-n-0-{index}-a{attempt}",
                         "creationTimestamp": f"2026-12-01T10:0{attempt}:0{index}Z",
                         "labels": {"jobset.sigs.k8s.io/restart-attempt": str(attempt)},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {"nodeName": node, "containers": [{"name": "trainer"}]},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}}


def test_a_restarted_run_reads_its_current_attempt_and_names_the_restart():
    old = [_pod(0, 0, "Running"), _pod(0, 1, "Failed", exit_code=1)]
    d = diagnose_run(_jobset(restarts=1, counted=1), old + [_pod(1, 0), _pod(1, 1)], [],
                     jobs=[_child(1, active=2)])
    assert d.state == "Running"
    assert d.sentence == "running: 2 pods on gpu-0 (restart 1 of the whole run; 1 of 3 allowed used)"
    assert d.details[0] == f"jobset {NAME}: restart 1, 1 counted of the 3 allowed"
    assert not any("retries allowed: 0" in x for x in d.details), "the child Job's backoffLimit 0 is not the user's"


def test_between_attempts_the_run_waits_for_the_old_pods_to_go():
    d = diagnose_run(_jobset(restarts=2, counted=1), [_pod(1, 0), _pod(1, 1)], [], jobs=[])
    assert d.state == "Pending"
    assert d.sentence == ("restarting every pod: waiting for the 2 pods of the last attempt to go (restart 2 of the "
                          "whole run; 1 of 3 allowed used, 1 after disruptions, not counted)")


def test_a_run_past_its_restarts_says_which_pod_ended_the_last_attempt():
    failed = [{"type": "Failed", "status": "True", "reason": "ReachedMaxRestarts",
               "message": "jobset failed due to reaching max number of restarts"}]
    child = _child(3, [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}], failed=1)
    d = diagnose_run(_jobset(restarts=3, counted=3, conditions=failed), [_pod(3, 0), _pod(3, 1, "Failed", 75)], [],
                     jobs=[child])
    assert d.state == "Failed" and d.exit_code == 75
    assert d.sentence == (f"failed after 4 attempts of the whole run (3 counted restarts of 3 allowed); the last one: "
                          f"pod {NAME}-n-0-1-a3 a transient failure: preemption, network or storage hiccup (retried) "
                          "(exit code 75)")


def test_a_jobset_whose_job_cannot_be_created_is_blocked_with_the_controllers_reason():
    event = {"type": "Warning", "reason": "JobCreationFailed", "lastTimestamp": "2026-12-01T10:00:05Z",
             "involvedObject": {"kind": "JobSet", "name": NAME},
             "message": 'jobs.batch "big-run-0123abcd-n-0" is forbidden: exceeded quota: gpus'}
    d = diagnose_run(_jobset(), [], [event], jobs=[])
    assert d.state == "Pending" and d.blocked
    assert d.sentence == ("the JobSet controller cannot create the run's Job or Service: jobs.batch "
                          '"big-run-0123abcd-n-0" is forbidden: exceeded quota: gpus')


def test_a_finished_a_queued_and_a_cancelled_jobset():
    done = [{"type": "Completed", "status": "True", "reason": "AllJobsCompleted"}]
    d = diagnose_run(_jobset(conditions=done), [_pod(0, 0, "Succeeded", 0)], [],
                     jobs=[_child(0, [{"type": "Complete", "status": "True"}])])
    assert (d.state, d.sentence, d.exit_code) == ("Succeeded", f"succeeded (pod {NAME}-n-0-0-a0)", 0)
    q = diagnose_run(_jobset(suspend=True), [], [], jobs=[])
    assert (q.state, q.sentence) == ("Queued", "queued: waiting for Kueue queue team-a to admit it")
    gone = _jobset()
    gone["metadata"]["deletionTimestamp"] = "2026-12-01T10:10:00Z"
    assert diagnose_run(gone, [], [], jobs=[]).state == "Deleting"
