"""Faults injected into the real local stack while the code under test runs.

* the object store pauses (SIGSTOP/SIGCONT) and dies (SIGKILL, restarted by
  ``hack/stack.sh up --no-docker``) in the middle of a publish;
* the scratch volume (a real tmpfs mounted here) is too small for the base model,
  or fills up while it downloads;
* the API server restarts while ``launcher wait`` and ``launcher logs -f`` run;
* the same spec is submitted from several processes at once.

Preemption (SIGTERM → checkpoint → exit 75 → resume with exact step accounting) is
covered on the real model by tests/integration/test_train_e2e.py
(test_preempted_run_resumes_from_its_checkpoint_not_step_zero) and not repeated here.

Every test prints one ``FAULT|`` line (fault, what happened, what was lost) that
docs/reliability.md is written from.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def report(fault: str, happened: str, lost: str) -> None:
    """One row of docs/reliability.md, to the terminal even when pytest captures output."""
    sys.__stderr__.write(f"\nFAULT| {fault} | {happened} | {lost}\n")


# ------------------------------------------------------------------------------------ MinIO control

def minio_pid(stack) -> int:
    return int(Path(stack.env()["STACK_MINIO_PID_FILE"]).read_text().strip())


def minio_live(stack, timeout: float = 1.0) -> bool:
    import urllib.request
    try:
        urllib.request.urlopen(stack.s3_endpoint + "/minio/health/live", timeout=timeout)
        return True
    except Exception:
        return False


def restart_stack_parts() -> float:
    """``hack/stack.sh up --no-docker`` restarts only what is down; returns the seconds it took."""
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "hack" / "stack.sh"), "up", "--no-docker"], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return time.monotonic() - t0


@contextmanager
def minio_guard(stack):
    """Whatever a test does to MinIO, it is running and responsive again afterwards."""
    try:
        yield
    finally:
        try:
            os.kill(minio_pid(stack), signal.SIGCONT)
        except (OSError, ValueError):
            pass
        if not minio_live(stack, 3):
            restart_stack_parts()


# ------------------------------------------------------------------------------------ publish helpers

def make_folder(root: Path, seed: int, big_mb: int = 20, small: int = 16) -> Path:
    """A publish folder of a few MB: one multipart-sized weights file and a handful of small ones."""
    folder = root / f"publish-{seed}"
    (folder / "adapter").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    rnd = hashlib.sha256(str(seed).encode()).digest()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(big_mb << 20))
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 16, "seed": seed}))
    for i in range(small):
        (folder / "tokenizer" / f"part-{i:02d}.json").write_bytes(rnd * 2048 + os.urandom(1024))
    (folder / "metadata.json").write_text(json.dumps({"run": "outage", "seed": seed}))
    return folder


class FaultAfter:
    """Wraps a store: on the n-th ``put_file`` starts ``fault`` in a thread, while uploads are in flight, and
    sends that upload only once the fault has landed (``fault`` sets ``landed``). So the fault always hits the
    publish in flight, whatever the machine's speed (after a fixed sleep instead, a fast machine could finish
    the publish first, and a slow one send the upload before the fault)."""

    def __init__(self, store, n: int, fault, landed: threading.Event):
        self._store, self._n, self._fault, self._landed = store, n, fault, landed
        self.calls = 0
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def put_file(self, path, key, progress=None):
        with self._lock:
            self.calls += 1
            fire = self.calls == self._n
        if fire:
            self.thread = threading.Thread(target=self._fault, daemon=True)
            self.thread.start()
            assert self._landed.wait(120), "the fault did not land"  # the other workers' uploads go on meanwhile
        return self._store.put_file(path, key, progress=progress)


class Watcher(threading.Thread):
    """Polls what a user would see (``launcher artifacts`` = launcher.artifacts.list_versions, and
    jobs.publish.existing_versions) for the whole publish, outage included, and checks on every
    observation that each version listed as complete really is: manifest + every file + marker."""

    def __init__(self, output: str, run: str, bucket: str, run_prefix: str):
        super().__init__(daemon=True)
        self.output, self.run_name, self.bucket, self.run_prefix = output, run, bucket, run_prefix
        self.stop = threading.Event()
        self.observations: list[tuple[float, list[str], list[str], str | None]] = []
        self.errors: list[str] = []
        self.failed_listings = 0
        self.verified: set[str] = set()

    def started_watching(self, timeout: float = 60) -> "Watcher":
        self.start()
        deadline = time.monotonic() + timeout
        while len(self.observations) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.observations) >= 2, "the watcher could not list the run before the fault"
        return self

    def seen_between(self, t0: float, t1: float) -> list:
        return [o for o in self.observations if t0 <= o[0] <= t1]

    def incomplete_seen(self) -> set[str]:
        return {v for o in self.observations for v in o[2]}

    def run(self):
        from jobs.publish import existing_versions, verify_version
        from jobs.storage import S3Store
        from launcher.artifacts import list_versions

        while not self.stop.is_set():
            try:
                listing = list_versions(self.output, self.run_name)
                raw = existing_versions(S3Store(self.bucket), self.run_prefix)
            except Exception:  # the store is down: nothing is visible, which is fine
                self.failed_listings += 1
                time.sleep(0.2)
                continue
            complete = [v.name for v in listing.versions]
            self.observations.append((time.monotonic(), complete, list(listing.incomplete), listing.latest))
            for name in complete:
                if not raw.get(int(name[1:])):
                    self.errors.append(f"{name} listed by launcher.artifacts but existing_versions says incomplete")
                if name not in self.verified:
                    try:
                        problems = verify_version(S3Store(self.bucket), self.run_prefix, name)
                    except Exception:  # noqa: BLE001 - an outage mid-verify proves nothing either way
                        self.failed_listings += 1
                        continue
                    if problems:
                        self.errors.append(f"{name} was listed while: {problems}")
                    self.verified.add(name)
            if listing.latest is not None and listing.latest not in complete:
                self.errors.append(f"latest points at {listing.latest}, which is not complete")
            time.sleep(0.05)


def object_state(s3_client, bucket: str, prefix: str) -> dict[str, tuple[str, str]]:
    out = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["ETag"], o["LastModified"].isoformat())
    return out


@pytest.fixture()
def publish_setup(stack, s3_env, s3_prefix, s3_client, tmp_path):
    from jobs.publish import publish_version
    from jobs.storage import S3Store, join

    run = "outage"
    output = s3_prefix  # s3://bucket/t-xxxx
    run_prefix = join(s3_prefix.split("/", 3)[3], run)
    v1 = publish_version(S3Store(stack.bucket), run_prefix, make_folder(tmp_path, 1, big_mb=1, small=2))
    assert v1 == "v1"
    before = object_state(s3_client, stack.bucket, run_prefix + "/v1/")
    return {"run": run, "output": output, "run_prefix": run_prefix, "v1_state": before}


def _check_after(stack, s3_client, setup, expect_complete: list[str], watcher: Watcher):
    from jobs.publish import verify_version
    from jobs.storage import S3Store
    from launcher.artifacts import list_versions

    assert not watcher.errors, watcher.errors
    assert object_state(s3_client, stack.bucket, setup["run_prefix"] + "/v1/") == setup["v1_state"], \
        "v1 was modified"
    listing = list_versions(setup["output"], setup["run"])
    assert [v.name for v in listing.versions] == expect_complete
    for v in expect_complete:
        assert verify_version(S3Store(stack.bucket), setup["run_prefix"], v) == []
    return listing


# ------------------------------------------------------------------------------------ tests: object store

@pytest.mark.s3
def test_publish_rides_out_a_paused_object_store(stack, s3_client, publish_setup, tmp_path):
    """SIGSTOP MinIO for 6 s while the publish has uploads in flight, then SIGCONT."""
    from jobs.publish import publish_version
    from jobs.storage import S3Store

    setup = publish_setup
    pause = 6.0
    window = {}
    landed = threading.Event()

    def fault():
        # First a listing that completes inside the publish (which cannot end while its upload waits for this
        # fault), so one is seen during the publish however fast the rest of it goes after SIGCONT.
        seen = len(watcher.observations)
        deadline = time.monotonic() + 60
        while len(watcher.observations) <= seen and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = minio_pid(stack)
        window["start"] = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        landed.set()
        time.sleep(pause)
        os.kill(pid, signal.SIGCONT)
        window["end"] = time.monotonic()

    watcher = Watcher(setup["output"], setup["run"], stack.bucket, setup["run_prefix"])
    folder = make_folder(tmp_path, 2)
    with minio_guard(stack):
        watcher.started_watching()
        store = FaultAfter(S3Store(stack.bucket), 3, fault, landed)
        t0 = time.monotonic()
        version = publish_version(store, setup["run_prefix"], folder)
        t1 = time.monotonic()
        store.thread.join(10)
        time.sleep(0.5)
        watcher.stop.set()
        watcher.join(60)
    took = t1 - t0
    assert version == "v2"
    assert took >= pause * 0.9, "the fault did not land during the publish"
    listing = _check_after(stack, s3_client, setup, ["v1", "v2"], watcher)
    assert listing.latest == "v2"
    during = watcher.seen_between(t0, t1)
    assert during, "no listing completed while the publish was in progress"
    report("object store paused (SIGSTOP 6 s) mid-upload",
           f"publish stalled, then finished as v2 in {took:.1f} s; {len(watcher.observations)} listings "
           f"({len(during)} during the publish, v2 seen incomplete: {'v2' in watcher.incomplete_seen()}); none "
           "showed a version before its _COMPLETE or a `latest` ahead of it", "nothing (v1 untouched)")


@pytest.mark.s3
def test_publish_retries_through_an_object_store_restart_and_gives_up_cleanly(
        stack, s3_client, publish_setup, tmp_path, monkeypatch):
    """SIGKILL MinIO mid-upload. (a) Restarted within seconds: the S3 layer retries with backoff and the
    publish completes. (b) Down longer than the retry budget: a TransientError (exit 75, the Job retries),
    the half-written folder is never listed, and the next publish takes a new number."""
    from jobs.errors import TransientError
    from jobs.publish import existing_versions, publish_version
    from jobs.storage import S3Store

    setup = publish_setup
    restart = {}
    down = threading.Event()

    def kill_then_restart():
        os.kill(minio_pid(stack), signal.SIGKILL)
        restart["killed"] = time.monotonic()
        down.set()
        time.sleep(2)
        restart["took"] = restart_stack_parts()
        restart["up"] = time.monotonic()

    watcher = Watcher(setup["output"], setup["run"], stack.bucket, setup["run_prefix"])
    with minio_guard(stack):
        watcher.started_watching()
        store = FaultAfter(S3Store(stack.bucket), 3, kill_then_restart, down)
        t0 = time.monotonic()
        v2 = publish_version(store, setup["run_prefix"], make_folder(tmp_path, 3))
        took_a = time.monotonic() - t0
        store.thread.join(120)
        assert v2 == "v2" and "up" in restart

        # (b) one attempt per call, and MinIO stays down until the publish has given up
        monkeypatch.setenv("LORA_JOBS_S3_ATTEMPTS", "1")
        killed = threading.Event()

        def kill():
            os.kill(minio_pid(stack), signal.SIGKILL)
            killed.set()

        store = FaultAfter(S3Store(stack.bucket), 12, kill, killed)  # 8 uploads in flight: 4+ have landed by then
        t0 = time.monotonic()
        with pytest.raises(TransientError) as err:
            publish_version(store, setup["run_prefix"], make_folder(tmp_path, 4))
        took_b = time.monotonic() - t0
        assert killed.is_set()
        assert "storage unavailable" in str(err.value) and stack.s3_secret_key not in str(err.value)
        restart_stack_parts()
        monkeypatch.delenv("LORA_JOBS_S3_ATTEMPTS")
        assert existing_versions(S3Store(stack.bucket), setup["run_prefix"]).get(3) is False, "no partial v3"
        v4 = publish_version(S3Store(stack.bucket), setup["run_prefix"], make_folder(tmp_path, 5, big_mb=2))
        time.sleep(0.5)
        watcher.stop.set()
        watcher.join(60)

    raw = existing_versions(S3Store(stack.bucket), setup["run_prefix"])
    listing = _check_after(stack, s3_client, setup, ["v1", "v2", "v4"], watcher)
    assert v4 == "v4" and raw.get(3) is False and listing.incomplete == ["v3"] and listing.latest == "v4"
    report("object store killed (SIGKILL) mid-upload, restarted after "
           f"{restart['up'] - restart['killed']:.1f} s",
           f"S3 retries with backoff carried the publish to v2 in {took_a:.1f} s", "nothing")
    report("object store down longer than the retry budget",
           f"publish raised TransientError (exit 75, Job retries) after {took_b:.1f} s; the partial v3 is listed "
           "as incomplete, never as a version; the next publish took v4",
           "the partial upload's storage (v3 stays as an orphan folder); no version overwritten")


# ------------------------------------------------------------------------------------ tests: scratch disk

@pytest.fixture()
def small_scratch(tmp_path):
    """A real 24 MiB tmpfs, mounted here (needs root, as the test stack does)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "scratch"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _upload_model(s3_client, stack, s3_prefix: str, files: dict[str, int]) -> str:
    key_prefix = s3_prefix.split("/", 3)[3] + "/model"
    for name, size in files.items():
        body = json.dumps({"model_type": "llama"}).encode() if name == "config.json" else os.urandom(size)
        s3_client.put_object(Bucket=stack.bucket, Key=f"{key_prefix}/{name}", Body=body)
    return f"s3://{stack.bucket}/{key_prefix}/"


@pytest.mark.s3
def test_scratch_too_small_for_the_base_model_is_a_clear_error(stack, s3_client, s3_prefix, small_scratch, tmp_path):
    """The real container entrypoint against a 24 MiB scratch volume and a 40 MiB base model."""
    model = _upload_model(s3_client, stack, s3_prefix, {"config.json": 0, "model-1.safetensors": 20 << 20,
                                                        "model-2.safetensors": 20 << 20})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "disk-full", "base_model": {"uri": model},
                                    "dataset": {"train": f"{s3_prefix}/data/train.jsonl"}, "output": s3_prefix,
                                    "resources": {"gpus": 0, "scratch": "24Mi"}}))
    tmsg = tmp_path / "termination-log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(stack.s3_env())
    env.update({"PYTHONPATH": str(REPO), "TERMINATION_MESSAGE_PATH": str(tmsg)})
    proc = subprocess.run([sys.executable, "-m", "jobs", "run", "--spec", str(spec), "--workdir", str(small_scratch)],
                          env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 10, proc.stderr[-3000:]  # ExitCode.BAD_SPEC: not retried, fix resources.scratch
    assert "Traceback" not in proc.stderr
    msg = json.loads(tmsg.read_text())
    text = msg["message"]
    assert msg["exit_code"] == 10 and msg["stage"] == "fetch"
    assert "resources.scratch" in text and str(small_scratch) in text, text
    assert "40.0 MiB" in text and "MiB free" in text, text  # the size needed and what there is
    assert not any(small_scratch.iterdir()) or not (small_scratch / "base-model").exists()
    report("scratch volume (24 MiB tmpfs) smaller than the base model (40 MiB)",
           "exit 10 before any download: " + text.split("resources.scratch: ")[-1].split(" — ")[0].replace(
               str(small_scratch), "<scratch>"),
           "nothing: no bytes downloaded, no retry burnt")


@pytest.mark.s3
def test_scratch_filling_up_during_the_download_is_a_clear_error(stack, s3_client, s3_prefix, small_scratch):
    """The space check passes (16 MiB model, 24 MiB volume); then another writer fills the volume while the
    download is in flight. The download process says when it reserves a file's space (a hook around
    jobs.storage._preallocate) and waits there until the volume is full, so the order is the same on any
    machine: check passed, download begun, space gone, reservation refused. (Polling for the download folder and
    then pausing MinIO raced it: the reservations are made right after the folder, a HEAD later.)

    jobs.trainer.recipe.fetch runs in its own process, as in the pod: when it exits its sockets close. (An aborted
    download left open in a live process keeps MinIO's read lock on the object for ~30 s.)"""
    model = _upload_model(s3_client, stack, s3_prefix, {"config.json": 0, "model-1.safetensors": 8 << 20,
                                                        "model-2.safetensors": 8 << 20})
    spec = {"name": "disk-fills", "base_model": {"uri": model}, "dataset": {"train": f"{s3_prefix}/data/train.jsonl"},
            "output": s3_prefix, "resources": {"gpus": 0}}
    sync = small_scratch.parent / "fill-sync"  # the handshake's files, outside the volume
    sync.mkdir()
    filled = threading.Event()

    def filler():
        deadline = time.monotonic() + 120
        while not (sync / "started").exists():
            if time.monotonic() > deadline:
                return  # the download never began: `filled` stays unset and the test says so
            time.sleep(0.01)
        free = shutil.disk_usage(small_scratch).free
        with open(small_scratch / "someone-elses-file", "wb") as f:
            f.write(b"\0" * max(0, free - (1 << 20)))
        filled.set()
        (sync / "filled").touch()

    code = ("import json, sys, threading, time\nfrom pathlib import Path\nimport jobs.storage\n"
            "from jobs.errors import LoraJobError\nfrom jobs.trainer.recipe import fetch\nfrom jobs.spec import parse_spec\n"
            "sync, reserve, lock = Path(sys.argv[3]), jobs.storage._preallocate, threading.Lock()\n"
            "def preallocate(fd, size):  # a file's download has begun: the other writer fills the volume first\n"
            "    with lock:\n"
            "        if size > 0 and not (sync / 'filled').exists():\n"
            "            (sync / 'started').touch()\n"
            "            deadline = time.monotonic() + 120\n"
            "            while not (sync / 'filled').exists() and time.monotonic() < deadline:\n"
            "                time.sleep(0.01)\n"
            "    reserve(fd, size)\n"
            "jobs.storage._preallocate = preallocate\n"
            "try:\n    fetch(parse_spec(json.loads(sys.argv[1])), Path(sys.argv[2]))\n"
            "except LoraJobError as err:\n    print(err)\n    sys.exit(int(err.exit_code))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({**stack.s3_env(), "PYTHONPATH": str(REPO)})
    t = threading.Thread(target=filler, daemon=True)
    t.start()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(small_scratch), str(sync)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    t.join(10)
    assert filled.is_set(), (proc.returncode, proc.stdout, proc.stderr[-3000:])
    text = proc.stdout
    assert proc.returncode == 10 and "Traceback" not in proc.stderr, (proc.returncode, proc.stdout, proc.stderr)
    assert "resources.scratch" in text and str(small_scratch) in text and "filled up" in text, text
    assert "16.0 MiB" in text, text
    leftovers = [p.name for p in (small_scratch / "base-model").rglob("*.part")]
    report("scratch volume filled by another writer while the base model downloads",
           "SpecError (exit 10): " + text.split("resources.scratch: ")[-1].split(" — ")[0].replace(
               str(small_scratch), "<scratch>"),
           f"nothing beyond the run's scratch ({len(leftovers)} partial .part files left in it)")


# ------------------------------------------------------------------------------------ tests: API server

HOLD = "lora-jobs.test/hold"


def _settings(stack, namespace):
    from launcher.settings import make_settings
    return make_settings(kubeconfig=stack.kubeconfig, namespace=namespace, s3_endpoint=stack.s3_endpoint,
                         service_account="default", image="lora-jobs/trainer:0.1.0")


def _spec(stack, name: str, **resources):
    from jobs.spec import parse_spec
    return parse_spec({"name": name, "base_model": {"uri": f"s3://{stack.bucket}/models/tiny/"},
                       "dataset": {"train": f"s3://{stack.bucket}/data/train.jsonl"},
                       "output": f"s3://{stack.bucket}/runs",
                       "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi", "scratch": "1Gi", **resources}})


def _pods(kube_api, namespace, job):
    from kubernetes import client
    return client.CoreV1Api(kube_api).list_namespaced_pod(
        namespace, label_selector=f"batch.kubernetes.io/job-name={job}").items


def _wait(cond, timeout: float, what: str, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = cond()
        except Exception:  # noqa: BLE001 - the API server may be restarting
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _api_ready(kube_api) -> bool:
    from kubernetes import client
    try:
        client.VersionApi(kube_api).get_code(_request_timeout=2)
        return True
    except Exception:
        return False


@pytest.mark.kube
def test_wait_and_logs_follow_reconnect_across_an_api_server_restart(stack, kube_api, namespace, launcher_env):

    from launcher import render
    from launcher.kube import Kube
    from launcher.submit import create_run

    spec = _spec(stack, "apiserver-restart")
    run = render.render_run(spec, _settings(stack, namespace))
    run.workload["spec"]["template"]["metadata"]["annotations"] = {HOLD: "true"}  # Running until we say so
    name = create_run(Kube(kubeconfig=stack.kubeconfig, namespace=namespace), run).job_name
    pod = _wait(lambda: [p for p in _pods(kube_api, namespace, name) if p.status.phase == "Running"], 60,
                "the pod to run")[0]

    # The restart takes its time on a busy machine: the launchers' outage limit (2 min by default) is raised so
    # that this test measures riding out the restart, not the limit (test_environment.py proves the limit).
    env = {**launcher_env, "LAUNCHER_SERVICE_ACCOUNT": "default", "PYTHONUNBUFFERED": "1",
           "LAUNCHER_CLUSTER_TIMEOUT": "10m"}
    procs = {
        "wait": Tee([sys.executable, "-m", "launcher", "wait", spec.name, "--interval", "1"], env),
        "logs -f": Tee([sys.executable, "-m", "launcher", "logs", spec.name, "-f"], env),
    }
    try:
        # Past start-up (the first answers are in: settings, the run's Job) and now polling / streaming.
        _wait(lambda: all(t.err for t in procs.values()) or any(t.proc.poll() is not None for t in procs.values()),
              90, "both launchers to say something")
        for verb, t in procs.items():
            assert t.proc.poll() is None, f"launcher {verb} ended early: {t.finish()}"
        # The API server stops, and starts again only once both launchers have noticed (each says 'retrying'
        # when a request fails): a restart quicker than `wait`'s poll interval cannot slip between two polls.
        retries = {verb: "".join(t.err).count("retrying") for verb, t in procs.items()}
        t0 = time.monotonic()
        stop = subprocess.run(["bash", str(REPO / "hack" / "stack.sh"), "stop-apiserver"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        try:
            assert stop.returncode == 0, stop.stdout + stop.stderr
            _wait(lambda: all("".join(t.err).count("retrying") > retries[verb] for verb, t in procs.items())
                  or any(t.proc.poll() is not None for t in procs.values()), 120, "both launchers to notice")
        finally:
            proc = subprocess.run(["bash", str(REPO / "hack" / "stack.sh"), "up", "--no-docker"], cwd=REPO,
                                  capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        _wait(lambda: _api_ready(kube_api), 120, "the API server")
        outage = time.monotonic() - t0
        for verb, t in procs.items():
            assert t.proc.poll() is None, f"launcher {verb} gave up during the restart: {t.finish()}"
        results = _release_and_finish(kube_api, namespace, pod, procs, timeout=120)
    finally:
        for t in procs.values():
            t.kill()
    _assert_carried_on(results)
    assert "succeeded" in "".join(results["wait"][1:]).lower()
    notes = {verb: sum("retrying" in line for line in err.splitlines()) for verb, (_, _, err) in results.items()}
    report(f"API server restarted (down ~{outage:.0f} s) under `launcher wait` and `launcher logs -f`",
           f"both noted the outage ('retrying': wait x{notes['wait']}, logs -f x{notes['logs -f']}), reconnected "
           "with backoff and exited 0 when the run succeeded", "nothing")


@pytest.mark.kube
def test_wait_and_logs_follow_wait_out_an_api_server_that_is_down_when_they_start(stack, kube_api, namespace,
                                                                                   launcher_env):

    from launcher import render
    from launcher.kube import Kube
    from launcher.submit import create_run

    spec = _spec(stack, "apiserver-down-at-start")
    run = render.render_run(spec, _settings(stack, namespace))
    run.workload["spec"]["template"]["metadata"]["annotations"] = {HOLD: "true"}
    name = create_run(Kube(kubeconfig=stack.kubeconfig, namespace=namespace), run).job_name
    pod = _wait(lambda: [p for p in _pods(kube_api, namespace, name) if p.status.phase == "Running"], 60,
                "the pod to run")[0]
    # `stack.sh up` may take minutes: above the launchers' default outage limit (2 min), so it is raised here.
    env = {**launcher_env, "LAUNCHER_SERVICE_ACCOUNT": "default", "PYTHONUNBUFFERED": "1",
           "LAUNCHER_CLUSTER_TIMEOUT": "10m"}
    stop = subprocess.run(["bash", str(REPO / "hack" / "stack.sh"), "stop-apiserver"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    procs = {}
    try:
        assert not _api_ready(kube_api)
        started = time.monotonic()
        procs = {
            "wait": Tee([sys.executable, "-m", "launcher", "wait", spec.name, "--interval", "1", "--timeout", "300"],
                        env),
            "logs -f": Tee([sys.executable, "-m", "launcher", "logs", spec.name, "-f"], env),
        }
        # Both started against a dead API server: down until each has said so (a cold start can take longer
        # than any fixed sleep on a slow machine), and for at least 6 s, in which neither gives up.
        _wait(lambda: all("retrying" in "".join(t.err) for t in procs.values())
              or any(t.proc.poll() is not None for t in procs.values()), 120, "both launchers to find it down")
        time.sleep(max(0.0, 6 - (time.monotonic() - started)))
        for verb, t in procs.items():
            assert t.proc.poll() is None, f"launcher {verb} gave up at start: {t.finish()}"
    finally:
        up = subprocess.run(["bash", str(REPO / "hack" / "stack.sh"), "up", "--no-docker"], cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        _wait(lambda: _api_ready(kube_api), 120, "the API server")
        results = _release_and_finish(kube_api, namespace, pod, procs, timeout=180)
    finally:
        for t in procs.values():
            t.kill()
    _assert_carried_on(results)
    assert all("cannot reach the Kubernetes API server" in err for _, _, err in results.values())
    report("API server down when `launcher wait` and `launcher logs -f` start (6 s + restart)",
           "both said once that the API server cannot be reached and that they are retrying, connected when "
           "it came back, and exited 0 when the run succeeded", "nothing")


def _release_and_finish(kube_api, namespace, pod, procs: dict, timeout: float) -> dict:
    """Let the held run finish (kwok completes the pod once the hold annotation is gone); collect the launchers."""
    from kubernetes import client

    _wait(lambda: client.CoreV1Api(kube_api).patch_namespaced_pod(
        pod.metadata.name, namespace, {"metadata": {"annotations": {HOLD: None}}}), 60, "the pod patch")
    return {verb: t.finish(timeout=timeout) for verb, t in procs.items()}


def _assert_carried_on(results: dict) -> None:
    """Each launcher saw the outage ('retrying'), carried on, and exited 0 without a traceback."""
    for verb, (code, out, err) in results.items():
        assert "Traceback" not in err, err
        assert code == 0, f"launcher {verb}: rc {code}\n{out}\n{err}"
        assert "retrying" in err, (verb, err)


class Tee:
    """A subprocess whose stdout/stderr are collected by threads, so a test can look while it runs."""

    def __init__(self, argv: list[str], env: dict):
        self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        for line in stream:
            buf.append(line)

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code, "".join(self.out), "".join(self.err)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.kube
def test_same_spec_submitted_concurrently_from_several_processes_is_one_job(stack, kube_api, namespace,
                                                                           launcher_env, tmp_path):
    from kubernetes import client

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "race", "base_model": {"uri": f"s3://{stack.bucket}/models/tiny/"},
                                    "dataset": {"train": f"s3://{stack.bucket}/data/train.jsonl"},
                                    "output": f"s3://{stack.bucket}/runs",
                                    "resources": {"gpus": 1, "cpu": "1", "memory": "1Gi", "scratch": "1Gi"}}))
    env = {**launcher_env, "LAUNCHER_SERVICE_ACCOUNT": "default"}
    argv = [[sys.executable, "-m", "launcher", "submit", str(spec)]] * 4 + \
        [[sys.executable, "-m", "launcher", "submit", str(spec), "--set", "training.epochs=2"]] * 2
    go = threading.Barrier(len(argv))

    def one(args):
        go.wait()
        return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)

    threads, results = [], [None] * len(argv)
    for i, a in enumerate(argv):
        t = threading.Thread(target=lambda i=i, a=a: results.__setitem__(i, one(a)))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(200)
    for r in results:
        assert r.returncode == 0 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    created = [r.stdout for r in results if r.stdout.startswith("submitted:")]
    already = [r.stdout for r in results if r.stdout.startswith("already submitted:")]
    assert len(created) == 2 and len(already) == 4, [r.stdout for r in results]
    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    jobs = batch.list_namespaced_job(namespace, label_selector="lora-jobs.io/run=race").items
    assert len(jobs) == 2
    cms = core.list_namespaced_config_map(namespace, label_selector="lora-jobs.io/run=race").items
    assert sorted(c.metadata.name for c in cms) == sorted(j.metadata.name for j in jobs)
    uids = {j.metadata.name: j.metadata.uid for j in jobs}
    for c in cms:
        assert [o.uid for o in c.metadata.owner_references or []] == [uids[c.metadata.name]]
    report("same spec submitted by 4 processes at once (+2 with a changed --set)",
           "exactly one Job per spec hash (2 Jobs); 2 processes said 'submitted', 4 'already submitted'; "
           "each spec ConfigMap owned by its Job", "nothing; no duplicate GPU spend")
