"""resources.nodes: 2 as a JobSet (settings.multinode_workload), against the REAL JobSet controller (built from
sigs.k8s.io/jobset, hack/jobset.sh) and the stack's apiserver, Job controller and scheduler.

The apiserver (with JobSet's webhooks) accepts the rendered JobSet; the JobSet controller makes its Indexed Job
and headless Service, the Job controller both pods, with the hostnames, subdomain and PET_* variables torchrun's
rendezvous needs. A failure of index 1 restarts the whole run (both pods recreated), counted against retries
and visible in ``launcher status``; a preemption restarts it without counting; a deterministic exit code ends
it. ``cancel`` deletes the JobSet, and with it every pod and the Service. With a queue setting, Kueue (its
jobset integration, hack/kueue.sh) admits both pods as one Workload.

kwok runs the pods (no container): they stay Running while the test's hold annotation is set, as in
test_multinode_kube.py, whose helpers these tests share.
"""
from __future__ import annotations

import pytest
from test_kueue import _cond, _workload, queue  # noqa: F401  (queue: a fixture)
from test_launcher_kube import cli
from test_multinode_kube import _create, _service_gone
from test_real_pods import real_ns, train_data  # noqa: F401  (fixtures)
from test_sdk import EXIT, HOLD, eventually, notes, sdk, spec, trainer_sa  # noqa: F401  (fixtures)

from launcher import errors, render

pytestmark = [pytest.mark.jobset, pytest.mark.kube, pytest.mark.s3]
INDEX = "batch.kubernetes.io/job-completion-index"
ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"


@pytest.fixture()
def as_jobset(jobset, monkeypatch):
    """The launcher setting that makes a multi-node run a JobSet (name the fixture after ``sdk``: it clears
    LAUNCHER_* variables)."""
    monkeypatch.setenv("LAUNCHER_MULTINODE_WORKLOAD", "jobset")


def _pods(kube, name, attempt: int | None = None):
    """The JobSet's live pods (of one restart attempt, when given), by node rank."""
    pods = [p for p in kube.list_pods(f"{render.JOBSET_NAME_LABEL}={name}")
            if not p["metadata"].get("deletionTimestamp")
            and (attempt is None or p["metadata"]["labels"].get(ATTEMPT) == str(attempt))]
    return {p["metadata"]["annotations"][INDEX]: p for p in pods}


def fresh(sdk, stack):
    """Another Client of the same namespace: settings and API discovery read afresh."""
    from launcher.client import Client

    return Client(sdk.namespace, kubeconfig=stack.kubeconfig)


def _running(sdk, run):
    return eventually(lambda: (lambda s: s if s.state == "Running" else None)(sdk.status(run)), what=f"{run} Running")


def _both(kube, name, attempt: int):
    return eventually(lambda: (lambda ps: ps if sorted(ps) == ["0", "1"] and all(
        p["status"].get("phase") == "Running" for p in ps.values()) else None)(_pods(kube, name, attempt)),
        timeout=90, what=f"both pods of attempt {attempt} running")


def test_two_nodes_become_a_jobset_whose_pods_rendezvous_on_pod_zero_and_restart_as_a_whole(
        sdk, as_jobset, stack, s3_prefix, launcher_env):
    from kubernetes import client

    name, kube = _create(sdk, spec(stack, s3_prefix, "js-two", gpus=4, nodes=2))
    js = kube.get_jobset(name)
    assert js["kind"] == "JobSet" and kube.get_job(name) is None, "the run is the JobSet, not a Job of its name"
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 3

    st = _running(sdk, "js-two")
    assert st.kind == "JobSet" and st.sentence == "running: 2 pods on kwok-gpu-0", st.sentence
    first = _both(kube, name, 0)
    master = f"{name}-{render.REPLICATED_JOB}-0-0.{name}"
    for idx, p in first.items():
        assert p["spec"]["hostname"] == f"{name}-{render.REPLICATED_JOB}-0-{idx}" and p["spec"]["subdomain"] == name
        env = {e["name"]: e for e in p["spec"]["containers"][0]["env"]}
        assert env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{INDEX}']"
        assert env["PET_MASTER_ADDR"]["value"] == master and env["PET_NNODES"]["value"] == "2"
        assert env["PET_NPROC_PER_NODE"]["value"] == "4"
        assert p["spec"]["securityContext"]["runAsNonRoot"] is True and p["spec"]["restartPolicy"] == "Never"
        assert p["metadata"]["labels"][render.LABEL_RUN] == "js-two"

    # JobSet's own headless Service names the pods; it goes with the JobSet
    core = client.CoreV1Api(kube.api)
    svc = core.read_namespaced_service(name, kube.namespace)
    assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses is True
    assert svc.spec.selector == {render.JOBSET_NAME_LABEL: name}
    assert [(o.kind, o.uid) for o in svc.metadata.owner_references] == [("JobSet", js["metadata"]["uid"])]
    # the run is listed once (its child Job is not a run), and logs know its ranks
    assert [r.job for r in sdk.list()] == [name]
    assert list(sdk.logs("js-two", rank=1)) == []
    with pytest.raises(errors.UsageError, match="has 2 pods .* there is no rank 5"):
        sdk.logs("js-two", rank=5)

    # index 1 fails: the JobSet controller restarts the whole run, both pods new, under the same names
    core.patch_namespaced_pod(first["1"]["metadata"]["name"], kube.namespace,
                              {"metadata": {"annotations": {HOLD: "false", EXIT: "1"}}})
    again = _both(kube, name, 1)
    assert {p["metadata"]["uid"] for p in again.values()}.isdisjoint({p["metadata"]["uid"] for p in first.values()})
    assert again["0"]["spec"]["hostname"] == f"{name}-{render.REPLICATED_JOB}-0-0"
    st = _running(sdk, "js-two")
    assert st.sentence == "running: 2 pods on kwok-gpu-0 (restart 1 of the whole run; 1 of 3 allowed used)", \
        st.sentence
    assert (st.attempts.restarts, st.attempts.failed, st.attempts.retries_allowed) == (1, 1, 3)
    table = cli(launcher_env, "status", "js-two")
    assert table.returncode == 0 and "restart 1 of the whole run; 1 of 3 allowed used" in table.stdout, table.stdout

    gone = sdk.cancel("js-two", timeout=90)
    assert gone.waited and gone.message == f"cancelled: jobset {name} (jobset and pods deleted)"
    assert _pods(kube, name) == {} and kube.get_jobset(name) is None
    eventually(lambda: _service_gone(core, name, kube.namespace), what="the Service deleted with its JobSet")
    eventually(lambda: kube.get_configmap(name) is None, what="the spec ConfigMap deleted")


def test_a_preemption_restarts_the_run_without_counting_and_a_failure_past_the_retries_ends_it(
        sdk, as_jobset, stack, s3_prefix, kube_api):
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    # retries 0: had the eviction counted, the JobSet would have failed instead of restarting
    name, kube = _create(sdk, spec(stack, s3_prefix, "js-evicted", gpus=4, nodes=2, retries=0))
    pod = _both(kube, name, 0)["1"]["metadata"]["name"]
    core.create_namespaced_pod_eviction(pod, kube.namespace, client.V1Eviction(
        metadata=client.V1ObjectMeta(name=pod, namespace=kube.namespace)))
    second = _both(kube, name, 1)
    js = kube.get_jobset(name)
    assert (js["status"]["restarts"], js["status"].get("restartsCountTowardsMax", 0)) == (1, 0)
    st = _running(sdk, "js-evicted")
    assert st.sentence.endswith("(restart 1 of the whole run; 0 of 0 allowed used, 1 after disruptions, not "
                                "counted)"), st.sentence

    # a crash (exit 1) counts: with no retry left the run ends, saying which pod ended the last attempt
    core.patch_namespaced_pod(second["0"]["metadata"]["name"], kube.namespace,
                              {"metadata": {"annotations": {HOLD: "false", EXIT: "1"}}})
    st = eventually(lambda: (lambda s: s if s.state == "Failed" else None)(sdk.status("js-evicted")), what="Failed")
    assert st.sentence == (f"failed after 2 attempts of the whole run (0 counted restarts of 0 allowed); the last one: "
                           f"pod {second['0']['metadata']['name']} crashed with an unexpected error (a bug; retried) "
                           "(exit code 1)"), st.sentence
    assert st.exit_code == 1


def test_a_deterministic_exit_code_of_any_pod_ends_the_run_without_a_restart(sdk, as_jobset, stack, s3_prefix,
                                                                             kube_api):
    from kubernetes import client

    name, kube = _create(sdk, spec(stack, s3_prefix, "js-bad-data", gpus=4, nodes=2))
    pod = _both(kube, name, 0)["1"]["metadata"]["name"]
    client.CoreV1Api(kube_api).patch_namespaced_pod(pod, kube.namespace, {"metadata": {"annotations": {
        HOLD: "false", EXIT: "11", "lora-jobs.test/message": "only 3 valid rows"}}})
    st = eventually(lambda: (lambda s: s if s.state == "Failed" else None)(sdk.status("js-bad-data")), what="Failed")
    assert st.sentence == ("failed: the data or base model is unusable (not retried): only 3 valid rows (exit code "
                           "11)"), st.sentence
    assert st.exit_code == 11 and kube.get_jobset(name)["status"]["restarts"] == 0


def test_auto_makes_a_jobset_where_the_cluster_serves_them_and_jobset_without_them_is_refused(
        sdk, jobset, stack, s3_prefix, monkeypatch):
    from launcher import kube as kubemod

    monkeypatch.setenv("LAUNCHER_MULTINODE_WORKLOAD", "auto")
    dry = sdk.submit(spec(stack, s3_prefix, "js-auto", gpus=4, nodes=2), server_dry_run=True)
    assert render.is_jobset(dry.job) and dry.message.startswith("server-side dry-run passed: jobset js-auto-")
    assert sdk.list() == [], "the dry run (JobSet webhooks and schema included) creates nothing"
    one = sdk.submit(spec(stack, s3_prefix, "js-auto-one", gpus=1), server_dry_run=True)
    assert not render.is_jobset(one.job), "a one-node run stays a plain Job"

    # a cluster that does not serve the API (here: a group nobody serves, asked of the real apiserver)
    monkeypatch.setattr(kubemod, "JOBSET", ("nothing.x-k8s.io", "v1alpha2", "jobsets"))
    monkeypatch.setenv("LAUNCHER_MULTINODE_WORKLOAD", "jobset")
    with pytest.raises(errors.PreflightError, match="multinode_workload is jobset, but the cluster does not serve "
                                                    "jobsets.jobset.x-k8s.io"):
        fresh(sdk, stack).submit(spec(stack, s3_prefix, "js-none", gpus=4, nodes=2))
    monkeypatch.setenv("LAUNCHER_MULTINODE_WORKLOAD", "auto")
    fallback = fresh(sdk, stack).submit(spec(stack, s3_prefix, "js-none", gpus=4, nodes=2), server_dry_run=True)
    assert fallback.job["kind"] == "Job" and fallback.job["spec"]["completionMode"] == "Indexed"


@pytest.mark.kueue
def test_kueue_admits_a_two_node_jobset_as_one_workload_and_the_next_waits_in_its_queue(
        sdk, as_jobset, queue, stack, s3_prefix, kube_api, namespace):
    from kubernetes import client

    custom, core = client.CustomObjectsApi(kube_api), client.CoreV1Api(kube_api)
    first, kube = _create(sdk, spec(stack, s3_prefix, "jq-first", gpus=4, nodes=2))
    js = kube.get_jobset(first)
    assert js["spec"]["suspend"] is True and js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue["local"]
    wl = eventually(lambda: (lambda w: w if _cond(w, "Admitted").get("status") == "True" else None)(
        _workload(custom, namespace, first)), what="the first JobSet's Workload admitted")
    (podset,) = wl["spec"]["podSets"]
    assert podset["count"] == 2, "both pods, 8 GPUs, admitted as one unit"
    _both(kube, first, 0)
    assert _running(sdk, "jq-first").sentence == "running: 2 pods on kwok-gpu-0"

    second, _ = _create(sdk, spec(stack, s3_prefix, "jq-second", gpus=4, nodes=2))
    st = eventually(lambda: (lambda s: s if "insufficient unused quota" in s.sentence else None)(
        sdk.status("jq-second")), what="the second JobSet waiting for quota")
    assert st.state == "Queued" and st.sentence.startswith(
        f"queued: waiting for Kueue queue {queue['local']} to admit it"), st.sentence
    assert _pods(kube, second) == {}

    # the first finishes (kwok ends a pod without the hold annotation): its quota goes to the second
    for p in _pods(kube, first).values():
        core.patch_namespaced_pod(p["metadata"]["name"], kube.namespace, {"metadata": {"annotations": {HOLD: None}}})
    assert eventually(lambda: sdk.status("jq-first").state == "Succeeded", what="the first run done")
    _both(kube, second, 0)
    assert kube.get_jobset(second)["spec"]["suspend"] is False


@pytest.mark.node
@pytest.mark.train
def test_two_real_pods_of_a_jobset_meet_at_pod_zeros_jobset_hostname_and_publish_one_version(
        s3_env, jobset, stack, node, trainer_ref, real_ns, tiny_model_in_minio, train_data, s3_prefix, tmp_path):
    """As test_real_pods' two-pod run, with multinode_workload: jobset: the node's DNS resolves pod 0's JobSet
    hostname under JobSet's (port-less) headless Service, torchrun's rendezvous meets there over the bridge."""
    import test_real_pods as real
    from jobs.storage import open_store
    from published import cpu_spec, lean

    env = {**real.env_for(stack, node, real_ns, trainer_ref, tmp_path), "LAUNCHER_MULTINODE_WORKLOAD": "jobset"}
    data = lean(cpu_spec("js-real", tiny_model_in_minio, train_data, f"{s3_prefix}/runs", memory="4Gi"))
    data["resources"].update({"nodes": 2, "cpu": "1"})
    r = real.cli(env, "submit", str(real.write_spec(tmp_path, data)))
    assert r.returncode == 0 and "submitted: jobset js-real-" in r.stdout, r.stdout + r.stderr
    # Both pods running, or already done: a short run can end between two polls on a fast machine (the sentence
    # of a running JobSet is the kwok tests' subject above).
    running = real.wait_status(env, "js-real", lambda s: s["sentence"].startswith("running: 2 pods")
                               or s["state"] in ("Succeeded", "Failed"), 600, "both pods to run")
    assert running["kind"] == "JobSet" and {p["node"] for p in running["pods"]} == {node["STACK_NODE_NAME"]}
    logs1 = real.cli(env, "logs", "js-real", "--rank", "1", "-f", timeout=900)
    final = real.wait_status(env, "js-real", lambda s: s["state"] in ("Succeeded", "Failed"), 900, "the run to end")
    assert final["state"] == "Succeeded", final
    assert "node 1 of 2" in logs1.stdout and "rank 1 of 2" in logs1.stdout, logs1.stdout[-3000:] + logs1.stderr
    logs0 = real.cli(env, "logs", "js-real").stdout
    assert "node 0 of 2" in logs0 and "rank 0 of 2" in logs0, logs0[-3000:]
    store, prefix = open_store(f"{s3_prefix}/runs")
    real.assert_one_verified_version(store, f"{prefix}/js-real")
