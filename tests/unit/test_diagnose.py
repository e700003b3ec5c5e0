"""diagnose(): realistic Job, pod and event dicts (shaped like the API's JSON) -> one sentence."""
from __future__ import annotations

import json

import pytest

from launcher.diagnose import Diagnosis, attempt_of, diagnose, parse_termination_message

pytestmark = pytest.mark.unit

JOB = "support-bot-1a2b3c4d"




def job(conditions=(), *, active=0, failed=0, succeeded=0, backoff=3, labels=None, deleting=False, **spec):
    meta = {"name": JOB, "namespace": "ml", "uid": "u-1", "creationTimestamp": "2025-05-01T10:00:00Z",
            "labels": {"lora-jobs.io/run": "support-bot", **(labels or {})}}
    if deleting:
        meta["deletionTimestamp"] = "2025-05-01T10:05:00Z"
    status = {"conditions": [dict(c) for c in conditions], "active": active, "failed": failed,
              "succeeded": succeeded, "startTime": "2025-05-01T10:00:01Z", "uncountedTerminatedPods": {}}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": backoff, "activeDeadlineSeconds": 6 * 3600, **spec}, "status": status}


def cond(ctype, reason="", message="", status="True"):
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "lastProbeTime": "2025-05-01T10:02:00Z", "lastTransitionTime": "2025-05-01T10:02:00Z"}


def pod(name="a1", phase="Pending", *, created="2025-05-01T10:00:02Z", conditions=(), state=None,
        node=None, restarts=0, image="lora-jobs/trainer:0.1.0", reason=None):
    status = {"phase": phase, "conditions": list(conditions), "qosClass": "Burstable"}
    if reason:
        status["reason"] = reason
    if state is not None:
        status["containerStatuses"] = [{"name": "trainer", "image": image, "imageID": "", "ready": False,
                                        "restartCount": restarts, "started": False, "state": state,
                                        "lastState": {}}]
    spec = {"containers": [{"name": "trainer", "image": image}], "restartPolicy": "Never"}
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": f"{JOB}-{name}", "namespace": "ml", "creationTimestamp": created,
                         "labels": {"batch.kubernetes.io/job-name": JOB}}, "spec": spec, "status": status}


def terminated(code, message="", reason="Error"):
    return {"terminated": {"exitCode": code, "reason": reason, "message": message,
                           "startedAt": "2025-05-01T10:00:05Z", "finishedAt": "2025-05-01T10:01:00Z",
                           "containerID": "containerd://abc"}}


def tmsg(code, message, stage):
    return json.dumps({"exit_code": code, "reason": "x", "message": message, "stage": stage})


def event(reason, message, kind="Job", name=JOB, etype="Warning", when="2025-05-01T10:00:03Z"):
    return {"metadata": {"name": f"{name}.17f", "namespace": "ml"}, "type": etype, "reason": reason,
            "message": message, "involvedObject": {"kind": kind, "name": name, "namespace": "ml"},
            "count": 3, "lastTimestamp": when, "firstTimestamp": when}


SCHED_MSG = ("0/2 nodes are available: 1 Insufficient nvidia.com/gpu, 1 node(s) had untolerated taint "
             "{nvidia.com/gpu: present}. no new claims to deallocate, preemption: 0/2 nodes are available: "
             "1 No preemption victims found for incoming pod, 1 Preemption is not helpful for scheduling.")


def test_unschedulable_for_gpus_says_waiting_for_gpus_with_the_schedulers_reason():
    p = pod(conditions=[cond("PodScheduled", "Unschedulable", SCHED_MSG, status="False")],
            state={"waiting": {"reason": "ContainerCreating"}})
    d = diagnose(job(active=1), [p], [event("FailedScheduling", SCHED_MSG, kind="Pod", name=p["metadata"]["name"])])
    assert d.state == "Pending"
    assert d.sentence == ("waiting for GPUs: 0/2 nodes are available: 1 Insufficient nvidia.com/gpu, "
                          "1 node(s) had untolerated taint {nvidia.com/gpu: present}")
    assert any("preemption" in x for x in d.details)
    assert d.exit_code is None and not d.finished


def test_unschedulable_for_other_reasons_says_waiting_for_a_node():
    msg = "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
    p = pod(conditions=[cond("PodScheduled", "Unschedulable", msg, status="False")])
    d = diagnose(job(active=1), [p], [])
    assert d.sentence.startswith("waiting for a node: 0/2 nodes are available: 2 node(s) didn't match")


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff", "InvalidImageName"])
def test_image_pull_errors_are_blocked_with_the_image_named(reason):
    p = pod(conditions=[cond("PodScheduled")], node="kwok-gpu-0", image="lora-jobs/trainer:nope",
            state={"waiting": {"reason": reason, "message": 'Back-off pulling image "lora-jobs/trainer:nope"'}})
    d = diagnose(job(active=1), [p], [])
    assert d.state == "Pending" and d.blocked
    assert "cannot pull the trainer image lora-jobs/trainer:nope" in d.sentence and reason in d.sentence


def test_missing_secret_is_create_container_config_error_with_the_fix():
    p = pod(conditions=[cond("PodScheduled")], node="kwok-gpu-0",
            state={"waiting": {"reason": "CreateContainerConfigError",
                               "message": 'secret "lora-jobs-s3" not found'}})
    d = diagnose(job(active=1), [p], [])
    assert d.blocked and d.state == "Pending"
    assert 'secret "lora-jobs-s3" not found' in d.sentence and "create the S3 credentials Secret" in d.sentence


def test_quota_failed_create_event_when_no_pod_exists():
    msg = ('Error creating: pods "support-bot-1a2b3c4d-x" is forbidden: exceeded quota: gpu-quota, requested: '
           'requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8')
    d = diagnose(job(), [], [event("FailedCreate", msg)])
    assert d.state == "Pending" and d.blocked
    assert d.sentence.startswith("cannot create the pod: Error creating:") and "exceeded quota" in d.sentence
    assert "raise the ResourceQuota" in d.sentence


def test_no_pod_yet():
    d = diagnose(job(), [], [])
    assert d.state == "Pending" and "Job controller" in d.sentence


def test_running():
    p = pod(phase="Running", node="kwok-gpu-0", conditions=[cond("PodScheduled"), cond("Ready")],
            state={"running": {"startedAt": "2025-05-01T10:00:05Z"}})
    d = diagnose(job(active=1), [p], [])
    assert d.state == "Running" and d.sentence == "running on kwok-gpu-0"


def test_starting_after_scheduling():
    p = pod(conditions=[cond("PodScheduled")], node="kwok-gpu-0", state={"waiting": {"reason": "ContainerCreating"}})
    assert diagnose(job(active=1), [p], []).sentence == "starting on kwok-gpu-0"


def test_complete():
    p = pod(phase="Succeeded", state=terminated(0, reason="Completed"))
    d = diagnose(job([cond("SuccessCriteriaMet", "CompletionsReached"), cond("Complete", "CompletionsReached")],
                     succeeded=1), [p], [])
    assert d.state == "Succeeded" and d.exit_code == 0 and d.finished


def test_bad_data_fails_by_pod_failure_policy_with_the_termination_message():
    p = pod(phase="Failed", node="kwok-gpu-0",
            state=terminated(11, tmsg(11, "only 3 valid rows; min_rows is 8", "prepare")))
    msg = f"Container trainer for pod ml/{p['metadata']['name']} failed with exit code 11 matching FailJob rule at index 1"
    d = diagnose(job([cond("FailureTarget", "PodFailurePolicy", msg), cond("Failed", "PodFailurePolicy", msg)],
                     failed=1), [p], [])
    assert d.state == "Failed" and d.exit_code == 11
    assert d.sentence == ("failed: the data or base model is unusable (not retried): only 3 valid rows; "
                          "min_rows is 8 (stage prepare, exit code 11)")


def test_failure_target_alone_is_already_failed():
    msg = f"Container trainer for pod ml/{JOB}-zz failed with exit code 12 matching FailJob rule at index 1"
    d = diagnose(job([cond("FailureTarget", "PodFailurePolicy", msg)], failed=1), [], [])
    assert d.state == "Failed" and d.exit_code == 12 and "object storage" in d.sentence


def test_backoff_limit_exceeded_names_attempts_and_last_error():
    pods = [pod(f"p{i}", "Failed", created=f"2025-05-01T10:0{i}:00Z",
                state=terminated(75 if i < 2 else 1, tmsg(75 if i < 2 else 1, f"boom {i}", "train")))
            for i in range(3)]
    d = diagnose(job([cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")],
                     failed=3, backoff=2), pods, [])
    assert d.state == "Failed" and d.exit_code == 1
    assert d.sentence.startswith("failed after 3 attempts; the last one crashed with an unexpected error")
    assert "boom 2" in d.sentence
    assert sum("failed:" in x for x in d.details) == 3


def test_deadline_exceeded():
    d = diagnose(job([cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]), [], [])
    assert d.state == "Failed" and "time limit of 6 h" in d.sentence and "timeout_hours" in d.sentence


def test_oom_kill_is_explained():
    p = pod(phase="Failed", state=terminated(137, "", reason="OOMKilled"))
    d = diagnose(job([cond("Failed", "BackoffLimitExceeded")], failed=1, backoff=0), [p], [])
    assert d.exit_code == 137 and "OOMKilled" in d.sentence and "raise resources.memory" in d.sentence


def test_oom_kill_fails_the_job_at_once_and_names_the_limit():
    p = pod(phase="Failed", state=terminated(137, "", reason="OOMKilled"))
    p["spec"]["containers"][0]["resources"] = {"limits": {"memory": "350Mi"}, "requests": {"memory": "350Mi"}}
    d = diagnose(job([cond("Failed", "PodFailurePolicy",
                           f"Container trainer for pod ml/{JOB}-a1 failed with exit code 137 matching FailJob "
                           "rule at index 1")], failed=1), [p], [])
    assert d.state == "Failed" and d.exit_code == 137
    assert d.sentence == ("failed: the kernel killed the trainer because it used more memory than its limit of "
                          "350Mi (OOMKilled, exit code 137) — raise resources.memory, or lower "
                          "training.max_seq_length or per_device_batch_size")


def test_fallback_to_logs_termination_message_uses_the_last_line():
    assert parse_termination_message("Traceback...\n  File x\nRuntimeError: CUDA error\n") == {
        "message": "RuntimeError: CUDA error"}
    assert parse_termination_message("") == {}
    assert parse_termination_message('noise\n{"exit_code": 12, "message": "denied", "stage": "fetch"}\n') == {
        "exit_code": 12, "message": "denied", "stage": "fetch"}


def test_eviction_is_not_counted_and_shows_as_replacement():
    evicted = pod("e1", "Failed", reason="Evicted", state=terminated(137, reason="Error"),
                  conditions=[cond("DisruptionTarget", "EvictionByEvictionAPI", "Eviction API: evicting")])
    nxt = pod("e2", "Running", created="2025-05-01T10:03:00Z", node="kwok-gpu-0",
              state={"running": {"startedAt": "2025-05-01T10:03:05Z"}})
    d = diagnose(job(active=1), [evicted, nxt], [])
    assert d.state == "Running" and "replacing evicted pod" in d.sentence
    assert any("evicted (EvictionByEvictionAPI): not counted against retries" in x for x in d.details)
    assert attempt_of(evicted).evicted


def test_retry_after_transient_failure_mentions_the_attempt():
    first = pod("r1", "Failed", state=terminated(75, tmsg(75, "S3 503", "fetch")))
    second = pod("r2", "Pending", created="2025-05-01T10:02:00Z",
                 conditions=[cond("PodScheduled", "Unschedulable", SCHED_MSG, status="False")])
    d = diagnose(job(active=1, failed=1), [second, first], [])
    assert d.sentence.startswith("waiting for GPUs:")
    assert "(attempt 2; the last one a transient failure" in d.sentence


def test_suspended_by_kueue():
    d = diagnose(job([cond("Suspended", "JobSuspended", "Job suspended")],
                     labels={"kueue.x-k8s.io/queue-name": "gpus"}, suspend=True), [], [])
    assert d.state == "Queued" and d.sentence == "queued: waiting for Kueue queue gpus to admit it"


def test_deleting():
    assert diagnose(job(deleting=True), [], []).state == "Deleting"


def test_missing_configmap_mount_is_blocked():
    p = pod(conditions=[cond("PodScheduled")], node="kwok-gpu-0", state={"waiting": {"reason": "ContainerCreating"}})
    e = event("FailedMount", 'MountVolume.SetUp failed for volume "spec" : configmap "x" not found', kind="Pod",
              name=p["metadata"]["name"])
    d = diagnose(job(active=1), [p], [e])
    assert d.blocked and d.sentence.startswith("cannot mount a volume")


def test_empty_and_sparse_dicts_do_not_crash():
    d = diagnose({}, [{}], [{}])
    assert isinstance(d, Diagnosis) and d.state == "Pending"
    assert diagnose({"metadata": {"name": "x"}, "status": {"conditions": None}}, [], []).state == "Pending"


# ------------------------------------------------------------------------------ preflight: can a node EVER fit?

def _node(name, gpus=0, taints=(), labels=None, cpu="64", memory="512Gi"):
    alloc = {"cpu": cpu, "memory": memory, "pods": "110"}
    if gpus:
        alloc["nvidia.com/gpu"] = str(gpus)
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": {"taints": list(taints)},
            "status": {"allocatable": alloc, "capacity": alloc}}


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
NODES = [_node("kwok-gpu-0", 8, [GPU_TAINT], {"nvidia.com/gpu.present": "true"}), _node("kwok-cpu-0")]


def _job(gpus, **settings_kw):
    from jobs.spec import parse_spec
    from launcher.render import render_job
    from launcher.settings import make_settings

    spec = parse_spec({"name": "fit", "base_model": {"uri": "s3://mod/x/"}, "dataset": {"train": "s3://dat/t"},
                       "output": "s3://out/p", "resources": {"gpus": gpus, "cpu": "4", "memory": "32Gi"}})
    return render_job(spec, make_settings(**settings_kw))


def test_fit_one_gpu_on_the_tainted_gpu_node():
    from launcher.submit import fit_failure
    assert fit_failure(NODES, _job(1), "nvidia.com/gpu") is None
    assert fit_failure(NODES, _job(0), "nvidia.com/gpu") is None


def test_too_many_gpus_can_never_fit():
    from launcher.submit import fit_failure
    msg = fit_failure(NODES, _job(9), "nvidia.com/gpu")
    assert msg.startswith("no node can ever fit 9 nvidia.com/gpu (the most any node has is 8)")
    assert "lower resources.gpus to 8" in msg and "kwok-cpu-0 has 0 nvidia.com/gpu" in msg


def test_untolerated_taint_and_node_selector_are_reasons():
    from launcher.submit import fit_failure
    msg = fit_failure(NODES, _job(1, tolerations=[]), "nvidia.com/gpu")
    assert "kwok-gpu-0 has taint nvidia.com/gpu=present:NoSchedule the run does not tolerate" in msg
    msg = fit_failure(NODES, _job(1, node_selector={"pool": "a100"}), "nvidia.com/gpu")
    assert "lacks label pool=a100" in msg


def test_no_gpu_nodes_at_all_suggests_the_device_plugin():
    from launcher.submit import fit_failure
    msg = fit_failure([_node("cpu-only")], _job(1), "nvidia.com/gpu")
    assert "device plugin" in msg


def test_memory_too_large_for_any_node():
    from launcher.submit import fit_failure
    msg = fit_failure([_node("small", 8, memory="16Gi")], _job(1), "nvidia.com/gpu")
    assert "has 16Gi memory allocatable, the run asks for 32Gi" in msg


def test_parse_quantity():
    from launcher.submit import parse_quantity
    assert parse_quantity("500m") == 0.5 and parse_quantity("32Gi") == 32 * 2**30 and parse_quantity(8) == 8
    assert parse_quantity("1k") == 1000 and parse_quantity("1e3") == 1000
    with pytest.raises(ValueError):
        parse_quantity("lots")


def _workload(*conditions):
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
            "metadata": {"name": f"job-{JOB}-5b1e2", "namespace": "ml", "labels": {"kueue.x-k8s.io/job-uid": "u-1"}},
            "status": {"conditions": [dict(c) for c in conditions]}}


def test_a_queued_run_says_why_kueue_has_not_admitted_it_and_that_a_preemption_cost_no_retry():
    suspended = job([cond("Suspended", "JobSuspended", "Job suspended")], suspend=True,
                    labels={"kueue.x-k8s.io/queue-name": "team-a"})
    waiting = _workload(cond("QuotaReserved", "Pending", "couldn't assign flavors to pod set main: insufficient "
                             "unused quota for nvidia.com/gpu in flavor gpu, 8 more needed", status="False"))
    d = diagnose(suspended, [], [], workload=waiting)
    assert d.state == "Queued"
    assert d.sentence == ("queued: waiting for Kueue queue team-a to admit it: couldn't assign flavors to pod set "
                          "main: insufficient unused quota for nvidia.com/gpu in flavor gpu, 8 more needed")
    assert any(line.startswith(f"Kueue workload job-{JOB}-5b1e2: QuotaReserved False (Pending)") for line in d.details)

    preempted = _workload(
        cond("QuotaReserved", "Pending", "couldn't assign flavors to pod set main: insufficient unused quota for "
             "nvidia.com/gpu in flavor gpu, 8 more needed", status="False"),
        cond("Evicted", "Preempted", "Preempted to accommodate a workload (UID: w-2, JobUID: j-2) due to "
             "prioritization in the ClusterQueue"))
    d = diagnose(suspended, [], [], workload=preempted)
    assert d.state == "Queued" and d.sentence.endswith(
        "(preempted by Kueue: Preempted to accommodate a workload (UID: w-2, JobUID: j-2) due to prioritization "
        "in the ClusterQueue; not counted against retries)"), d.sentence

    assert diagnose(suspended, [], []).sentence == "queued: waiting for Kueue queue team-a to admit it", \
        "without the Workload (no Kueue, or no right to read it): the queue alone"


def test_a_running_pod_on_a_node_that_stopped_reporting_says_so():
    p = pod("n1", "Running", node="gpu-node-3", state={"running": {"startedAt": "2025-05-01T10:00:05Z"}})
    lost = {"metadata": {"name": "gpu-node-3"}, "status": {"conditions": [
        {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
         "message": "Kubelet stopped posting node status.", "lastTransitionTime": "2025-05-01T10:05:00Z"}]}}
    d = diagnose(job(active=1), [p], [], nodes={"gpu-node-3": lost})
    assert d.state == "Running"
    assert d.sentence.startswith("running on gpu-node-3, but node gpu-node-3 is not Ready: Kubelet stopped posting "
                                 "node status (since 2025-05-01T10:05:00Z)")
    assert "retries from its newest checkpoint" in d.sentence
    healthy = {"metadata": {"name": "gpu-node-3"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert diagnose(job(active=1), [p], [], nodes={"gpu-node-3": healthy}).sentence == "running on gpu-node-3"
    assert diagnose(job(active=1), [p], []).sentence == "running on gpu-node-3"  # nodes unreadable: as before


def test_a_pod_that_succeeded_before_the_job_is_marked_complete_is_finishing_not_pending():
    done = pod("d1", "Succeeded", node="n", state=terminated(0, tmsg(0, "published s3://b/r/v1", "done")))
    d = diagnose(job(active=0), [done], [])
    assert d.state == "Running" and d.sentence == f"finishing: pod {JOB}-d1 succeeded, the Job is being marked complete"
