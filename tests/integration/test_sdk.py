"""The launcher as a library (``launcher.client.Client``) against the real stack: kube-apiserver with the
Job controller, scheduler and kwok GPU nodes, and MinIO for the published versions.

kwok runs no container: a pod completes about a second after it starts, or fails with the code in
the pod annotation ``lora-jobs.test/exit-code``, or stays Running while ``lora-jobs.test/hold`` is set.
Those annotations are added to the pod template by the test (``held``), never by the launcher. A
version is published into MinIO by ``jobs.publish.publish_version``, the job's own publisher.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from jobs.errors import LoraJobError, SpecError, StorageError
from launcher import errors
from launcher.client import Client, Downloaded, LogStream, RunStatus, RunSummary

pytestmark = [pytest.mark.kube, pytest.mark.s3]

HOLD = "lora-jobs.test/hold"
EXIT = "lora-jobs.test/exit-code"


@pytest.fixture()
def trainer_sa(kube_api, namespace):
    """The ServiceAccount the Helm chart would install; the pods name it."""
    from kubernetes import client

    client.CoreV1Api(kube_api).create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="lora-jobs-trainer")))
    return "lora-jobs-trainer"


@pytest.fixture()
def notes() -> list[str]:
    return []


@pytest.fixture()
def sdk(stack, namespace, trainer_sa, s3_env, monkeypatch, tmp_path, notes) -> Client:
    """A Client as a user's program makes one: a namespace and a kubeconfig; S3 from LAUNCHER_S3_ENDPOINT."""
    for k in [k for k in __import__("os").environ if k.startswith("LAUNCHER_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))  # no user config file
    monkeypatch.setenv("LAUNCHER_S3_ENDPOINT", stack.s3_endpoint)
    return Client(namespace, kubeconfig=stack.kubeconfig, notes=notes.append)


def spec(stack, s3_prefix: str, name: str, **resources) -> dict:
    return {"name": name, "base_model": {"uri": f"s3://{stack.bucket}/models/tiny/"},
            "dataset": {"train": f"s3://{stack.bucket}/data/train.jsonl"}, "output": s3_prefix,
            "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi", "scratch": "1Gi", **resources}}


def held(sdk: Client, data: dict, **annotations) -> str:
    """Create the run as ``submit`` would, with kwok's test annotations on the pod template; its Job name."""
    from launcher.render import render_run
    from launcher.submit import create_run

    settings, kube = sdk.connect()
    run = render_run(sdk.load_spec(data), settings)
    run.workload["spec"]["template"]["metadata"]["annotations"] = {HOLD: "true", **annotations}
    return create_run(kube, run).job_name


def eventually(fn, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def publish(tmp_path: Path, s3_prefix: str, run: str, n: int) -> str:
    from jobs.publish import publish_version
    from jobs.storage import open_store

    folder = tmp_path / f"pub-{n}"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(bytes([n]) * 4096)
    (folder / "metadata.json").write_text(f'{{"n": {n}}}')
    store, prefix = open_store(s3_prefix)
    return publish_version(store, f"{prefix}/{run}", folder)


# ------------------------------------------------------------------------------ the life of a run

def test_submit_status_wait_artifacts_download_prune_with_typed_results(sdk, stack, s3_prefix, tmp_path, notes):
    data = spec(stack, s3_prefix, "sdk-life")
    v = sdk.validate(data)
    assert v.spec.name == "sdk-life" and v.job_name.startswith("sdk-life-") and len(v.spec_hash) >= 8

    dry = sdk.submit(data, server_dry_run=True)
    assert dry.dry_run and not dry.created and sdk.list() == [], "a server-side dry-run creates nothing"

    first = sdk.submit(data)
    assert first.created and first.job_name == v.job_name
    assert first.message == f"submitted: job {v.job_name}"
    again = sdk.submit(data)
    assert not again.created and again.message.startswith("already submitted")

    st = sdk.status("sdk-life")
    assert isinstance(st, RunStatus) and st.run == "sdk-life" and st.job == v.job_name
    assert st.state in ("Pending", "Running", "Succeeded") and st.output == f"{s3_prefix}/sdk-life"
    assert st.attempts.retries_allowed == 3 and st.spec_hash == v.spec_hash

    seen: list[str] = []
    final = sdk.wait("sdk-life", timeout=90, interval=0.5, on_change=lambda s: seen.append(s.state))
    assert isinstance(final, RunStatus) and final.succeeded and final.finished and final.exit_code == 0
    assert seen[-1] == "Succeeded" and final.pods[-1].node == "kwok-gpu-0"
    # restarts counts a JobSet run's whole-run restarts; a Job has none to count (null in -o json)
    assert final.to_dict()["attempts"] == {"active": 0, "succeeded": 1, "failed": 0, "retries_allowed": 3,
                                           "restarts": None}

    rows = sdk.list()
    assert [type(r) for r in rows] == [RunSummary] and rows[0].job == v.job_name and rows[0].state == "Succeeded"

    # The job's own publisher writes v1 and v2; v3 dies half-way (a claim and part of the adapter).
    assert publish(tmp_path, s3_prefix, "sdk-life", 1) == "v1"
    assert publish(tmp_path, s3_prefix, "sdk-life", 2) == "v2"
    from jobs.storage import open_store
    store, prefix = open_store(s3_prefix)
    store.put_bytes(f"{prefix}/sdk-life/v3/_CLAIM", b"x")
    store.put_bytes(f"{prefix}/sdk-life/v3/adapter/adapter_model.safetensors", b"half")

    listing = sdk.artifacts("sdk-life")  # the output prefix comes from the run's Job
    assert [x.name for x in listing.versions] == ["v1", "v2"] and listing.latest == "v2"
    assert listing.incomplete == ["v3"] and listing.versions[0].uri == f"{s3_prefix}/sdk-life/v1/"

    got = sdk.download("sdk-life", tmp_path / "dl", version="1")
    assert isinstance(got, Downloaded) and got.version == "v1" and got.path == tmp_path / "dl" / "v1"
    assert (got.path / "adapter" / "adapter_model.safetensors").read_bytes() == bytes([1]) * 4096
    with pytest.raises(StorageError, match="incomplete") as e:
        sdk.download("sdk-life", tmp_path / "dl", version="v3")
    assert errors.exit_code_for(e.value) == 3
    # All or nothing: a file of v2 altered in the bucket leaves nothing in the download folder.
    store.put_bytes(f"{prefix}/sdk-life/v2/metadata.json", b'{"n": 666}')
    with pytest.raises(StorageError, match="do not match the manifest") as e:
        sdk.download("sdk-life", tmp_path / "dl", version="v2")
    assert "metadata.json" in e.value.message and errors.exit_code_for(e.value) == 3
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["v1"], "no v2, no staging folder"

    dry_prune = sdk.prune("sdk-life", older_than=0)
    assert not dry_prune.applied and [(o.name, o.removed) for o in dry_prune.orphans] == [("v3", False)]
    assert sdk.artifacts("sdk-life").incomplete == ["v3"], "a dry run deletes nothing"
    assert sdk.prune("sdk-life", older_than="1h", apply=True).orphans == [], "v3 is seconds old: in progress"
    applied = sdk.prune("sdk-life", older_than=0, apply=True)
    assert [(o.name, o.removed) for o in applied.orphans] == [("v3", True)]
    after = sdk.artifacts("sdk-life", output=s3_prefix)  # and without asking the cluster
    assert after.incomplete == [] and [x.name for x in after.versions] == ["v1", "v2"]

    cancelled = sdk.cancel("sdk-life", timeout=90)
    assert cancelled.waited and cancelled.message == f"cancelled: job {v.job_name} (job and pods deleted)"
    with pytest.raises(errors.UsageError, match="no run or Job named sdk-life"):
        sdk.status("sdk-life")
    assert not any("Traceback" in n for n in notes)


def test_cancel_a_running_run_and_wait_times_out_first(sdk, stack, s3_prefix):
    name = held(sdk, spec(stack, s3_prefix, "sdk-held"))
    running = eventually(lambda: (lambda s: s if s.state == "Running" else None)(sdk.status("sdk-held")),
                         what="Running")
    assert running.sentence == "running on kwok-gpu-0" and running.pods[0].phase == "Running"
    with pytest.raises(errors.WaitTimeout) as e:
        sdk.wait(name, timeout=2, interval=0.5)
    assert "is still running after" in e.value.message and "--timeout" in e.value.hint
    assert errors.exit_code_for(e.value) == 4
    gone = sdk.cancel("sdk-held", timeout=90)
    assert gone.job == name and gone.waited
    _, kube = sdk.connect()
    assert kube.get_job(name) is None and kube.list_pods(f"batch.kubernetes.io/job-name={name}") == []


# ------------------------------------------------------------------------------ logs

def test_logs_is_an_iterator_whose_outcome_is_the_final_status(sdk, stack, s3_prefix, notes):
    # kwok serves no logs: the stream yields nothing, notes that the log cannot be read, and still
    # follows the run to its end; the outcome says why it failed.
    held(sdk, spec(stack, s3_prefix, "sdk-logs"), **{HOLD: "false", EXIT: "12",
                                                     "lora-jobs.test/message": "access denied"})
    stream = sdk.logs("sdk-logs", follow=True)
    assert isinstance(stream, LogStream) and stream.outcome is None
    assert list(stream) == []
    out = stream.outcome
    assert isinstance(out, RunStatus) and out.state == "Failed" and out.exit_code == 12
    assert "object storage refused access" in out.sentence and "access denied" in out.sentence
    assert any("cannot be read" in n for n in notes), notes

    notes.clear()
    once = sdk.logs("sdk-logs")  # without follow: what there is, then stop
    assert list(once) == [] and once.outcome is None
    assert any("cannot be read" in n or "no log yet" in n for n in notes), notes


# ------------------------------------------------------------------------------ errors: one hierarchy

def test_errors_are_the_projects_classes_with_a_fix(sdk, stack, s3_prefix, tmp_path):
    with pytest.raises(errors.PreflightError) as e:
        sdk.submit(spec(stack, s3_prefix, "sdk-too-big", gpus=9))
    assert "no node can ever fit 9 nvidia.com/gpu (the most any node has is 8)" in str(e.value)
    assert "lower resources.gpus to 8" in str(e.value) and errors.exit_code_for(e.value) == 3
    assert sdk.list() == []

    with pytest.raises(SpecError) as e:
        sdk.submit({**spec(stack, s3_prefix, "Bad Name"), "lora": {"rank": 0}})
    assert len(e.value.problems) == 2 and errors.exit_code_for(e.value) == 2

    with pytest.raises(errors.UsageError, match="no run or Job named nobody") as e:
        sdk.wait("nobody", timeout=5)
    assert "launcher list" in e.value.hint

    with pytest.raises(errors.UsageError, match="is not a duration"):
        sdk.prune("anything", older_than="soon", output=s3_prefix)

    dead = tmp_path / "dead-kubeconfig"
    dead.write_text("apiVersion: v1\nkind: Config\ncurrent-context: dead\nclusters:\n- name: dead\n  cluster: "
                    "{server: 'https://127.0.0.1:9'}\ncontexts:\n- name: dead\n  context: {cluster: dead, user: u}\n"
                    "users:\n- name: u\n  user: {token: t}\n")
    with pytest.raises(errors.ClusterUnreachable) as e:
        Client("default", kubeconfig=str(dead)).list()
    assert "cannot reach the Kubernetes API server at https://127.0.0.1:9" in e.value.message and e.value.hint
    assert isinstance(e.value, errors.ClusterError) and isinstance(e.value, LoraJobError)


# ------------------------------------------------------------------------------ live progress

def test_status_and_list_show_the_jobs_live_progress_from_object_storage(sdk, stack, s3_prefix, launcher_env):
    """kwok runs no trainer, so the progress object is written here by the job's own writer
    (jobs.progress.ProgressWriter, at the key the job uses); tests/integration/test_train_e2e.py
    proves that the real job writes it."""
    import json
    import subprocess
    import sys

    from jobs.progress import ProgressWriter, progress_key
    from jobs.storage import open_store

    name = held(sdk, spec(stack, s3_prefix, "sdk-progress"))
    running = eventually(lambda: (lambda s: s if s.state == "Running" else None)(sdk.status("sdk-progress")),
                         what="Running")
    assert running.progress is None, "nothing written yet: nothing shown"

    store, prefix = open_store(running.output)  # the Job's own annotation says where its run lives
    writer = ProgressWriter(store, progress_key(prefix, running.spec_hash))
    writer.stage("train")
    writer.update(step=120, total_steps=400, loss=1.23, val_loss=1.31, tokens_per_s=14_000.0, eta_s=720.0,
                  examples_seen=1920, tokens_seen=880_000)
    writer.close("running", wait_s=10)  # flush now (a job keeps writing; the state stays "running")

    st = sdk.status("sdk-progress")
    assert st.progress["step"] == 120 and st.progress["total_steps"] == 400
    line = st.progress["summary"]
    assert line.startswith("training step 120/400, loss 1.2300, val loss 1.3100, 14.0k tok/s, ETA 12m00s (updated ")
    row = [r for r in sdk.list() if r.job == name][0]
    assert row.progress.split(" (updated ")[0] == line.split(" (updated ")[0], (row.progress, line)

    cli = [sys.executable, "-m", "launcher"]
    out = subprocess.run([*cli, "status", "sdk-progress"], env=launcher_env, capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert "progress: training step 120/400, loss 1.2300" in out.stdout, out.stdout
    t0 = time.monotonic()
    js = subprocess.run([*cli, "status", "sdk-progress", "-o", "json"], env=launcher_env, capture_output=True,
                        text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    with_s3 = time.monotonic() - t0
    assert json.loads(js.stdout)["progress"]["tokens_seen"] == 880_000

    # Without storage credentials the status still answers, without progress, in seconds: no longer than the same
    # command with them (measured just above, on this machine) plus half of what the job's own retry policy
    # waits out on a refused endpoint at the least (31.5 s), so a read that retried like the job would fail here
    # on any machine, and a slow machine's start-up counts on both sides.
    from jobs.retry import RetryPolicy

    no_s3 = {k: v for k, v in launcher_env.items() if not k.startswith("AWS_")}
    no_s3["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
    t0 = time.monotonic()
    bare = subprocess.run([*cli, "status", "sdk-progress", "-o", "json"], env=no_s3, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    without_s3 = time.monotonic() - t0
    assert bare.returncode == 0 and json.loads(bare.stdout)["progress"] is None, bare.stderr
    assert without_s3 < with_s3 + RetryPolicy().shortest_outage_ridden() / 2, (without_s3, with_s3)
    sdk.cancel("sdk-progress", timeout=90)
