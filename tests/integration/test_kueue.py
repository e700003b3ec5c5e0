"""Kueue for real: its controller (built from sigs.k8s.io/kueue, hack/kueue.sh) against the stack's apiserver,
with its webhooks, a ClusterQueue of 8 GPUs over the kwok GPU node, and the launcher's ``queue`` setting.

A 2-node x 4-GPU run is one Workload of 8 GPUs: admitted as a whole (both indexed pods created at once), a
second such run stays suspended, with no pod, until the first finishes, and ``status`` says which queue it
waits in. Kueue's own preemption suspends a running Job, which deletes its pods without counting a failure:
the preempted run keeps every retry, and runs again once admitted.

kwok runs the pods (no container): they stay Running while the test's hold annotation is set, as in
test_multinode_kube.py.
"""
from __future__ import annotations

import uuid

import pytest
from test_sdk import EXIT, HOLD, eventually, notes, sdk, spec, trainer_sa  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.kueue, pytest.mark.kube, pytest.mark.s3]
KUEUE = ("kueue.x-k8s.io", "v1beta2")
INDEX = "batch.kubernetes.io/job-completion-index"


@pytest.fixture()
def queue(kueue, kube_api, namespace, monkeypatch):
    """A ResourceFlavor, a ClusterQueue with 8 GPUs (preempting lower priorities), and a LocalQueue in the
    test's namespace, which the launcher setting ``queue`` names. Deleted afterwards."""
    from kubernetes import client

    custom = client.CustomObjectsApi(kube_api)
    tag = uuid.uuid4().hex[:6]
    flavor, cq, lq = f"gpu-{tag}", f"cq-{tag}", "team-a"
    custom.create_cluster_custom_object(*KUEUE, "resourceflavors", {
        "apiVersion": "/".join(KUEUE), "kind": "ResourceFlavor", "metadata": {"name": flavor}})
    custom.create_cluster_custom_object(*KUEUE, "clusterqueues", {
        "apiVersion": "/".join(KUEUE), "kind": "ClusterQueue", "metadata": {"name": cq},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                 "preemption": {"withinClusterQueue": "LowerPriority"},
                 "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": [
                     {"name": flavor, "resources": [{"name": "cpu", "nominalQuota": "64"},
                                                    {"name": "memory", "nominalQuota": "512Gi"},
                                                    {"name": "nvidia.com/gpu", "nominalQuota": "8"}]}]}]}})
    custom.create_namespaced_custom_object(*KUEUE, namespace, "localqueues", {
        "apiVersion": "/".join(KUEUE), "kind": "LocalQueue", "metadata": {"name": lq},
        "spec": {"clusterQueue": cq}})
    sched = client.SchedulingV1Api(kube_api)
    for name, value in ((f"low-{tag}", 10), (f"high-{tag}", 1000)):
        sched.create_priority_class(client.V1PriorityClass(metadata=client.V1ObjectMeta(name=name), value=value))
    eventually(lambda: _active(custom, cq), what=f"ClusterQueue {cq} active")
    monkeypatch.setenv("LAUNCHER_QUEUE", lq)
    yield {"local": lq, "cluster": cq, "low": f"low-{tag}", "high": f"high-{tag}"}
    for name in (f"low-{tag}", f"high-{tag}"):
        sched.delete_priority_class(name)
    custom.delete_namespaced_custom_object(*KUEUE, namespace, "localqueues", lq)
    custom.delete_cluster_custom_object(*KUEUE, "clusterqueues", cq)
    custom.delete_cluster_custom_object(*KUEUE, "resourceflavors", flavor)


def _active(custom, cq) -> bool:
    obj = custom.get_cluster_custom_object(*KUEUE, "clusterqueues", cq)
    return any(c["type"] == "Active" and c["status"] == "True" for c in (obj.get("status") or {}).get("conditions", []))


def _submit(sdk, data) -> str:
    """Create the run as ``submit`` does (Job suspended and labelled with the queue, ConfigMap, Service), with
    kwok's hold annotation on the pod template."""
    from launcher.render import render_run
    from launcher.submit import create_run

    settings, kube = sdk.connect()
    s = sdk.load_spec(data)
    run = render_run(s, settings)
    job = run.workload
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == settings.queue
    job["spec"]["template"]["metadata"]["annotations"] = {HOLD: "true"}
    return create_run(kube, run).job_name


def _pods(kube, job):
    return [p for p in kube.list_pods(f"batch.kubernetes.io/job-name={job}") if not p["metadata"].get("deletionTimestamp")]


def _workload(custom, namespace, job) -> dict | None:
    for wl in custom.list_namespaced_custom_object(*KUEUE, namespace, "workloads")["items"]:
        if any(o.get("name") == job for o in wl["metadata"].get("ownerReferences", [])):
            return wl
    return None


def _cond(obj: dict | None, kind: str) -> dict:
    for c in ((obj or {}).get("status") or {}).get("conditions", []):
        if c["type"] == kind:
            return c
    return {}


def _release(kube, core, job) -> None:
    """Let kwok finish the run's pods (exit 0): a pod without the hold annotation completes."""
    for p in _pods(kube, job):
        core.patch_namespaced_pod(p["metadata"]["name"], kube.namespace, {"metadata": {"annotations": {HOLD: None}}})


def test_a_two_node_run_is_admitted_as_a_whole_and_the_next_waits_in_its_queue_until_it_finishes(
        sdk, stack, s3_prefix, queue, kube_api, namespace):
    from kubernetes import client

    custom, core = client.CustomObjectsApi(kube_api), client.CoreV1Api(kube_api)
    first = _submit(sdk, spec(stack, s3_prefix, "kq-first", gpus=4, nodes=2))
    _, kube = sdk.connect()

    # admitted as one unit: one Workload of 2 pods x 4 GPUs, and the Job controller makes both pods at once
    wl = eventually(lambda: (lambda w: w if _cond(w, "Admitted").get("status") == "True" else None)(
        _workload(custom, namespace, first)), what="the first run's Workload admitted")
    assert wl["status"]["admission"]["clusterQueue"] == queue["cluster"]
    (podset,) = wl["spec"]["podSets"]
    assert podset["count"] == 2
    assert podset["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    pods = eventually(lambda: (lambda ps: ps if len(ps) == 2 else None)(_pods(kube, first)), what="both pods")
    assert sorted(p["metadata"]["annotations"][INDEX] for p in pods) == ["0", "1"]
    st = eventually(lambda: (lambda s: s if s.state == "Running" else None)(sdk.status("kq-first")), what="Running")
    assert st.sentence == "running: 2 pods on kwok-gpu-0", st.sentence

    # the second needs 8 more GPUs than the queue has left: suspended, no pod, and status names the queue
    second = _submit(sdk, spec(stack, s3_prefix, "kq-second", gpus=4, nodes=2))
    wl2 = eventually(lambda: (lambda w: w if _cond(w, "QuotaReserved").get("status") == "False" else None)(
        _workload(custom, namespace, second)), what="the second run's Workload pending")
    assert "insufficient unused quota for nvidia.com/gpu" in _cond(wl2, "QuotaReserved")["message"], wl2["status"]
    st2 = sdk.status("kq-second")
    assert st2.state == "Queued", st2
    assert st2.sentence.startswith(f"queued: waiting for Kueue queue {queue['local']} to admit it"), st2.sentence
    assert "insufficient unused quota for nvidia.com/gpu" in st2.sentence, st2.sentence
    assert kube.get_job(second)["spec"]["suspend"] is True and _pods(kube, second) == []

    # the first finishes: its quota comes back and the second is admitted, both of its pods at once
    _release(kube, core, first)
    assert eventually(lambda: sdk.status("kq-first").state == "Succeeded", what="the first run done")
    eventually(lambda: (lambda ps: ps if len(ps) == 2 else None)(_pods(kube, second)), timeout=90,
               what="the second run's two pods")
    assert kube.get_job(second)["spec"]["suspend"] is False
    _release(kube, core, second)
    assert eventually(lambda: sdk.status("kq-second").state == "Succeeded", what="the second run done")


def test_kueue_preempting_a_run_costs_it_no_retry_and_it_runs_again_once_readmitted(
        sdk, stack, s3_prefix, queue, kube_api, namespace):
    from kubernetes import client

    custom, core = client.CustomObjectsApi(kube_api), client.CoreV1Api(kube_api)
    low = _submit(sdk, spec(stack, s3_prefix, "kq-low", gpus=4, nodes=2, priority_class=queue["low"]))
    _, kube = sdk.connect()
    first_pods = eventually(lambda: (lambda ps: ps if len(ps) == 2 else None)(_pods(kube, low)), what="low's pods")

    high = _submit(sdk, spec(stack, s3_prefix, "kq-high", gpus=4, nodes=2, priority_class=queue["high"]))
    # Kueue evicts the lower-priority Workload: suspends its Job, whose pods the Job controller deletes
    eventually(lambda: (lambda w: w if _cond(w, "Evicted").get("reason") == "Preempted" else None)(
        _workload(custom, namespace, low)), what="low's Workload preempted")
    eventually(lambda: (lambda ps: ps if len(ps) == 2 else None)(_pods(kube, high)), timeout=90, what="high's pods")
    eventually(lambda: not _pods(kube, low), what="low's pods gone")
    job = kube.get_job(low)
    assert job["spec"]["suspend"] is True
    assert (job.get("status") or {}).get("failed", 0) == 0, "a Kueue preemption counts no failure against retries"
    st = sdk.status("kq-low")
    assert st.state == "Queued" and f"Kueue queue {queue['local']}" in st.sentence, st.sentence
    assert "(preempted by Kueue: Preempted to accommodate a workload" in st.sentence, st.sentence
    assert st.sentence.endswith("; not counted against retries)"), st.sentence
    assert st.attempts.failed == 0 and st.attempts.retries_allowed == 3 * 2

    # high finishes; low is admitted again and gets two new pods, still with every retry
    _release(kube, core, high)
    again = eventually(lambda: (lambda ps: ps if len(ps) == 2 else None)(_pods(kube, low)), timeout=90,
                       what="low's pods again")
    assert {p["metadata"]["uid"] for p in again}.isdisjoint({p["metadata"]["uid"] for p in first_pods})
    st = eventually(lambda: (lambda s: s if s.state == "Running" else None)(sdk.status("kq-low")), what="low Running")
    assert "attempt" not in st.sentence, st.sentence
    _release(kube, core, low)
    assert eventually(lambda: sdk.status("kq-low").state == "Succeeded", what="low done")
    assert (kube.get_job(low).get("status") or {}).get("failed", 0) == 0
