"""resources.nodes: 2 on the real control plane: the Indexed Job, its headless Service and the pods
the real Job controller makes of them (kwok runs them: no container; see test_sdk.py's notes).

What kwok cannot show: two real pods rendezvousing over a pod network (that needs a real kubelet);
the rendezvous itself is proved by tests/integration/test_distributed_cpu.py, which runs the real
job as two "nodes" with exactly the PET_* variables rendered here.
"""
from __future__ import annotations

import pytest
from test_sdk import EXIT, HOLD, eventually, notes, sdk, spec, trainer_sa  # noqa: F401  (fixtures)

from launcher import errors

pytestmark = [pytest.mark.kube, pytest.mark.s3]
INDEX = "batch.kubernetes.io/job-completion-index"


def _create(sdk, data):
    """Create the run as submit does (Job, ConfigMap, Service; or a JobSet and ConfigMap, as the settings say),
    with kwok's hold annotation on the pods."""
    from launcher.render import job_spec_of, render_run
    from launcher.submit import create_run

    settings, kube = sdk.connect()
    s = sdk.load_spec(data)
    run = render_run(s, settings)
    job_spec_of(run.workload)["template"]["metadata"]["annotations"] = {HOLD: "true"}
    return create_run(kube, run).job_name, kube


def _pods(kube, name):
    return sorted(kube.list_pods(f"batch.kubernetes.io/job-name={name}"),
                  key=lambda p: p["metadata"]["creationTimestamp"])


def test_two_nodes_become_two_indexed_pods_with_stable_names_and_one_service(sdk, stack, s3_prefix):
    from kubernetes import client

    name, kube = _create(sdk, spec(stack, s3_prefix, "mn-two", gpus=4, nodes=2))
    st = eventually(lambda: (lambda s: s if s.state == "Running" else None)(sdk.status("mn-two")), what="Running")
    assert st.sentence == "running: 2 pods on kwok-gpu-0", st.sentence

    pods = _pods(kube, name)
    by_index = {p["metadata"]["annotations"][INDEX]: p for p in pods}
    assert sorted(by_index) == ["0", "1"]
    for idx, p in by_index.items():
        assert p["spec"]["hostname"] == f"{name}-{idx}" and p["spec"]["subdomain"] == name
        env = {e["name"]: e for e in p["spec"]["containers"][0]["env"]}
        assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{INDEX}']"
        assert env["PET_MASTER_ADDR"]["value"] == f"{name}-0.{name}" and env["PET_NNODES"]["value"] == "2"

    core = client.CoreV1Api(kube.api)
    svc = core.read_namespaced_service(name, kube.namespace)
    job = kube.get_job(name)
    assert svc.spec.cluster_ip == "None" and svc.spec.selector == {"batch.kubernetes.io/job-name": name}
    assert [(o.kind, o.uid) for o in svc.metadata.owner_references] == [("Job", job["metadata"]["uid"])]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["backoffLimit"] == 3 * 2

    # logs: rank 0 by default, any rank on request, a rank that does not exist is a usage error
    assert list(sdk.logs("mn-two", rank=1)) == []
    with pytest.raises(errors.UsageError, match="has 2 pods .* there is no rank 5"):
        sdk.logs("mn-two", rank=5)

    # index 1 fails: the Job controller replaces that index, under the same DNS name (the rendezvous
    # address of node 0 and the name of node 1 do not change), and counts the failure
    core.patch_namespaced_pod(by_index["1"]["metadata"]["name"], kube.namespace,
                              {"metadata": {"annotations": {HOLD: "false", EXIT: "1"}}})
    job = eventually(lambda: (lambda j: j if (j.get("status") or {}).get("failed") == 1 else None)(kube.get_job(name)),
                     what="the failure counted")
    again = eventually(lambda: [p for p in _pods(kube, name) if p["metadata"]["annotations"][INDEX] == "1"
                                and p["metadata"]["name"] != by_index["1"]["metadata"]["name"]],
                       what="a replacement pod for index 1")
    assert again[0]["spec"]["hostname"] == f"{name}-1"
    st = sdk.status("mn-two")
    assert st.state in ("Running", "Pending") and "attempt 2" in st.sentence, st.sentence

    gone = sdk.cancel("mn-two", timeout=90)
    assert gone.waited and _pods(kube, name) == []
    eventually(lambda: _service_gone(core, name, kube.namespace), what="the Service deleted with its Job")


def test_when_node_zero_succeeds_the_run_is_done_and_a_lingering_ranks_log_is_said_to_be_gone(sdk, stack, s3_prefix,
                                                                                                  notes):
    """successPolicy (index 0): the run succeeds with pod 0, and the real Job controller deletes pod 1, which was
    still running. `logs --rank 1` then says why there is nothing to show (the job's node 0 waits a grace
    period so that in a real run the other pods have ended by then: test_real_pods.py reads their logs)."""
    from kubernetes import client

    name, kube = _create(sdk, spec(stack, s3_prefix, "mn-done", gpus=4, nodes=2))
    eventually(lambda: (lambda s: s if s.state == "Running" else None)(sdk.status("mn-done")), what="Running")
    by_index = {p["metadata"]["annotations"][INDEX]: p for p in _pods(kube, name)}
    client.CoreV1Api(kube.api).patch_namespaced_pod(by_index["0"]["metadata"]["name"], kube.namespace,
                                                    {"metadata": {"annotations": {HOLD: None}}})  # kwok completes it
    st = eventually(lambda: (lambda s: s if s.state == "Succeeded" else None)(sdk.status("mn-done")), timeout=90,
                    what="the run to succeed with node 0")
    eventually(lambda: [p["metadata"]["annotations"][INDEX] for p in _pods(kube, name)] == ["0"], timeout=90,
               what="the Job controller to delete pod 1")
    assert list(sdk.logs("mn-done", rank=1)) == []
    gone = [n for n in notes if "the pod of node rank 1 is gone" in n]
    assert gone and "launcher logs " + name + " --rank 1 -f" in gone[0], notes
    assert st.sentence.startswith("succeeded"), st.sentence


def _service_gone(core, name, ns) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        core.read_namespaced_service(name, ns)
        return False
    except ApiException as err:
        return err.status == 404


def test_a_multi_node_run_the_cluster_can_never_hold_is_refused_before_anything_is_created(sdk, stack, s3_prefix):
    with pytest.raises(errors.PreflightError) as e:
        sdk.submit(spec(stack, s3_prefix, "mn-too-big", gpus=8, nodes=2))
    assert "the run's 2 pods (resources.nodes) need 8 nvidia.com/gpu each" in str(e.value)
    assert "lower resources.nodes to 1" in str(e.value) and sdk.list() == []

    dry = sdk.submit(spec(stack, s3_prefix, "mn-dry", gpus=4, nodes=2), server_dry_run=True)
    assert dry.dry_run and sdk.list() == [], "the server-side dry run admits Job, ConfigMap and Service, creates none"
