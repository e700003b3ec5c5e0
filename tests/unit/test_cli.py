"""The CLI, offline: typer's CliRunner for the verbs, subprocesses for import cost and exit codes."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from launcher import cli

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
name: demo-run
base_model:
  uri: s3://models/smollm2/
dataset:
  train: s3://data/train.jsonl
output: s3://runs/lora
resources:
  gpus: 1
"""




@pytest.fixture()
def runner():
    return CliRunner()


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_validate_ok(runner, tmp_path):
    r = runner.invoke(cli.app, ["validate", str(write(tmp_path, GOOD))])
    assert r.exit_code == 0, r.output
    assert "is valid" in r.output and "demo-run-" in r.output


def test_validate_lists_every_problem_without_a_traceback(runner, tmp_path):
    bad = GOOD.replace("name: demo-run", "name: Demo Run") + "lora:\n  rank: 0\n  colour: red\n"
    r = runner.invoke(cli.app, ["validate", str(write(tmp_path, bad))])
    assert r.exit_code == 2
    out = r.output
    assert "3 problems" in out and "name" in out and "lora.rank" in out and "lora.colour" in out
    assert "Traceback" not in out and (r.exception is None or isinstance(r.exception, SystemExit)), out


def test_validate_malformed_yaml_and_missing_file(runner, tmp_path):
    r = runner.invoke(cli.app, ["validate", str(write(tmp_path, "name: [unclosed\n"))])
    assert r.exit_code == 2 and "not valid YAML" in r.output
    r = runner.invoke(cli.app, ["validate", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "file not found" in r.output


def test_validate_set_overrides_and_explain(runner, tmp_path):
    p = write(tmp_path, GOOD)
    r = runner.invoke(cli.app, ["validate", str(p), "--set", "training.epochs=0"])
    assert r.exit_code == 2 and "training.epochs" in r.output
    r = runner.invoke(cli.app, ["validate", str(p), "--set", "training.epochs=9"])  # advice, not an error
    assert r.exit_code == 0 and "warning: training.epochs" in r.output and "outside the guide's 1-3" in r.output
    r = runner.invoke(cli.app, ["validate", "--explain"])
    assert r.exit_code == 0 and "training.learning_rate" in r.output


def test_validate_warns_but_passes_when_the_spec_asks_for_mlflow_and_no_tracking_uri_is_set(runner, tmp_path,
                                                                                            monkeypatch):
    from launcher.client import Client

    p = write(tmp_path, GOOD + "tracking:\n  mlflow: {experiment: support-bot}\n")
    r = runner.invoke(cli.app, ["validate", str(p)])
    assert r.exit_code == 0 and "is valid" in r.output
    assert "warning: tracking.mlflow: no MLflow tracking URI is configured" in r.output
    assert "LAUNCHER_MLFLOW_TRACKING_URI" in r.output and "settings.mlflowTrackingUri" in r.output
    assert [a.where for a in Client().validate(p).advice] == ["tracking.mlflow"]
    # a URI from the variable or from the config file: nothing to warn about
    monkeypatch.setenv("LAUNCHER_MLFLOW_TRACKING_URI", "http://127.0.0.1:25000")
    r = runner.invoke(cli.app, ["validate", str(p)])
    assert r.exit_code == 0 and "warning" not in r.output
    monkeypatch.delenv("LAUNCHER_MLFLOW_TRACKING_URI")
    config = Path(os.environ["HOME"]) / ".config" / "lora-jobs" / "launcher.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("mlflow_tracking_uri: http://127.0.0.1:25000\n")
    assert Client().validate(p).advice == []
    # a spec without tracking never warns
    config.unlink()
    assert Client().validate(write(tmp_path, GOOD, "untracked.yaml")).advice == []


def test_submit_dry_run_prints_job_and_configmap_yaml(runner, tmp_path):
    r = runner.invoke(cli.app, ["-n", "ml", "submit", str(write(tmp_path, GOOD)), "--dry-run",
                                "--set", "training.epochs=2"])
    assert r.exit_code == 0, r.output
    job, cm = list(yaml.safe_load_all(r.output))
    assert job["kind"] == "Job" and cm["kind"] == "ConfigMap"
    assert job["metadata"]["namespace"] == "ml"
    assert yaml.safe_load(cm["data"]["spec.yaml"])["training"]["epochs"] == 2
    assert job["metadata"]["name"] == cm["metadata"]["name"]


def test_set_changes_the_job_name(runner, tmp_path):
    p = str(write(tmp_path, GOOD))
    a = yaml.safe_load_all(runner.invoke(cli.app, ["submit", p, "--dry-run"]).output).__next__()
    b = yaml.safe_load_all(runner.invoke(cli.app, ["submit", p, "--dry-run", "--set", "lora.rank=32"]).stdout).__next__()
    assert a["metadata"]["name"] != b["metadata"]["name"]


def test_unreachable_cluster_is_one_sentence_and_exit_3(runner, tmp_path, monkeypatch):
    pytest.importorskip("kubernetes")
    kcfg = tmp_path / "kubeconfig"
    kcfg.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": "https://127.0.0.1:9"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    monkeypatch.setenv("LAUNCHER_KUBECONFIG", str(kcfg))
    r = runner.invoke(cli.app, ["status", "anything"])
    assert r.exit_code == 3, r.output
    assert "cannot reach the Kubernetes API server at https://127.0.0.1:9" in r.output
    assert "fix:" in r.output and "Traceback" not in r.output


def test_bad_kubeconfig_is_exit_3(runner, tmp_path, monkeypatch):
    pytest.importorskip("kubernetes")
    monkeypatch.setenv("LAUNCHER_KUBECONFIG", str(tmp_path / "missing"))
    r = runner.invoke(cli.app, ["list"])
    assert r.exit_code == 3 and "kubeconfig" in r.output


def test_invalid_settings_is_exit_2(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_IMAGE_PULL_POLICY", "Sometimes")
    r = runner.invoke(cli.app, ["submit", str(write(tmp_path, GOOD)), "--dry-run"])
    assert r.exit_code == 2 and "image_pull_policy" in r.output


def test_data_check_reports_and_exits_by_outcome(runner, tmp_path):
    pytest.importorskip("jobs.dataprep")
    rows = [{"instruction": f"Question number {i} about returns?", "output": f"Answer {i}: send it back within "
             f"{i + 10} days."} for i in range(12)]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = runner.invoke(cli.app, ["data", "check", str(good)])
    assert r.exit_code == 0, r.output
    assert "valid rows" in r.output
    r = runner.invoke(cli.app, ["data", "check", str(good), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\nnot json\n')
    r = runner.invoke(cli.app, ["data", "check", str(bad)])
    assert r.exit_code == 1 and "line 2" in r.output
    r = runner.invoke(cli.app, ["data", "check", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "not found" in r.output


def test_every_verb_has_an_example_in_its_help(runner):
    for verb in (["validate"], ["submit"], ["status"], ["logs"], ["list"], ["cancel"], ["wait"], ["artifacts"],
                 ["data", "check"]):
        r = runner.invoke(cli.app, [*verb, "--help"])
        assert r.exit_code == 0, verb
        assert "Example" in r.output and "launcher " in r.output, verb


def test_help_does_not_import_kubernetes_or_torch():
    code = ("import sys\nfrom launcher.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'torch', 'boto3', 'transformers'))\n"
            "print('HEAVY', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert "Usage" in out.stdout and "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_python_dash_m_launcher_and_exit_code_of_a_spec_error(tmp_path):
    p = write(tmp_path, "name: x\n")
    out = subprocess.run([sys.executable, "-m", "launcher", "validate", str(p)], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "base_model" in out.stderr
    dbg = subprocess.run([sys.executable, "-m", "launcher", "validate", str(p)], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO), "LAUNCHER_DEBUG": "1"}, timeout=60)
    assert dbg.returncode != 0 and "Traceback" in dbg.stderr


def test_a_local_run_has_the_hash_validate_prints_from_any_folder_and_exits_with_the_jobs_code(runner, tmp_path,
                                                                                               monkeypatch):
    from jobs.spec import load_spec
    from jobs.storage import parse_uri

    # the job (`python -P -m jobs run ...`) is this script; its supervisor is the real interpreter
    fake = tmp_path / "fakepython"
    fake.write_text(f'#!/bin/sh\nif [ "$3" != jobs ]; then exec {sys.executable} "$@"; fi\n'
                    'echo "ARGS $*"\necho "CWD $(pwd)"\nwhile [ "$1" != "--spec" ]; do shift; done\n'
                    'cat "$2"\nexit 11\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake))
    specdir = tmp_path / "proj"
    specdir.mkdir()
    text = ("name: local-run\nbase_model:\n  uri: ./model\ndataset:\n  train: data/train.jsonl\n"
            "output: file://out\nresources:\n  gpus: 0\n")
    spec = write(specdir, text)
    (specdir / "model").mkdir()  # a local run's inputs must exist (validate's target "local")
    (specdir / "data").mkdir()
    (specdir / "data" / "train.jsonl").write_text('{"instruction": "Hi?", "output": "Hello."}\n')
    hashes = set()
    for cwd in (tmp_path, specdir, tmp_path / "proj" / "data"):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        given = os.path.relpath(spec, cwd)
        v = runner.invoke(cli.app, ["validate", given])
        spec_hash = re.search(r"spec hash (\w+)", v.output).group(1)
        hashes.add(spec_hash)
        work, state = tmp_path / f"work-{cwd.name}", tmp_path / f"state-{cwd.name}"
        r = runner.invoke(cli.app, ["--state-dir", str(state), "submit", given, "--local", "--workdir", str(work)])
        assert r.exit_code == 11, r.output
        run_dir = state / f"local-run-{spec_hash[:8]}"
        assert f"-m jobs run --spec {run_dir}/spec.yaml --workdir {work}" in r.output
        assert f"running local-run-{spec_hash[:8]} locally" in r.output
        # the job runs next to the spec, on the spec as written: the hash it keys its run by is validate's
        assert f"CWD {specdir}\n" in r.output
        written = load_spec(run_dir / "spec.yaml")
        assert written.spec_hash() == spec_hash and written.dataset.train == "data/train.jsonl"
    assert len(hashes) == 1, hashes
    monkeypatch.chdir(specdir)  # where the job is: its relative paths are the spec file's neighbours
    assert parse_uri("data/train.jsonl")[2] == str(specdir / "data" / "train.jsonl")
    assert parse_uri("file://out")[2] == str(specdir / "out")


def test_exit_code_mapping_covers_one_error_hierarchy():
    from launcher import errors
    from launcher.kube import ClusterUnreachable
    from launcher.settings import SettingsError
    from launcher.submit import PreflightError

    assert ClusterUnreachable is errors.ClusterUnreachable and PreflightError is errors.PreflightError
    assert SettingsError is errors.SettingsError
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.LoraJobError), name
    assert errors.exit_code_for(errors.SpecError([])) == 2
    assert errors.exit_code_for(errors.SettingsError("x")) == 2
    assert errors.exit_code_for(errors.UsageError("x")) == 2
    assert errors.exit_code_for(ClusterUnreachable("x")) == 3
    assert errors.exit_code_for(PreflightError(["x"])) == 3
    assert errors.exit_code_for(errors.StorageError("x")) == 3
    assert errors.exit_code_for(errors.RunFailed("x")) == 1
    assert errors.exit_code_for(errors.WaitTimeout("x")) == 4


def test_log_timestamps_order_regardless_of_fraction_length():
    from launcher.backends.kubernetes import _ts_key as k

    assert k("2025-05-01T10:00:00.1Z") > k("2025-05-01T10:00:00.099999999Z")
    assert k("2025-05-01T10:00:00.100000001Z") > k("2025-05-01T10:00:00.1Z")
    assert k("2025-05-01T10:00:01Z") > k("2025-05-01T10:00:00.999Z")


def test_artifacts_lists_only_complete_versions_and_downloads_verified(runner, tmp_path):
    import hashlib

    from launcher import artifacts

    run = tmp_path / "out" / "r1"
    for n, complete in ((1, True), (2, True), (3, False)):
        v = run / f"v{n}"
        (v / "adapter").mkdir(parents=True)
        (v / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * (n * 10))
        (v / "metadata.json").write_text("{}")
        files = {str(p.relative_to(v)): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                         "size": p.stat().st_size} for p in sorted(v.rglob("*")) if p.is_file()}
        (v / "manifest.json").write_text(json.dumps({"files": files}))
        if complete:
            (v / "_COMPLETE").write_text(hashlib.sha256((v / "manifest.json").read_bytes()).hexdigest() + "\n")
    (run / "latest").write_text("v2\n")
    listing = artifacts.list_versions(str(tmp_path / "out"), "r1")
    assert [v.name for v in listing.versions] == ["v1", "v2"] and listing.incomplete == ["v3"]
    assert listing.latest == "v2"

    r = runner.invoke(cli.app, ["artifacts", "r1", "--output", str(tmp_path / "out"), "-o", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["incomplete"] == ["v3"]
    r = runner.invoke(cli.app, ["artifacts", "r1", "--output", str(tmp_path / "out"), "--download",
                                str(tmp_path / "dl")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "dl" / "v2" / "adapter" / "adapter_model.safetensors").read_bytes() == b"w" * 20
    r = runner.invoke(cli.app, ["artifacts", "r1", "--output", str(tmp_path / "out"), "--version", "v3",
                                "--download", str(tmp_path / "dl")])
    assert r.exit_code == 3 and "incomplete" in r.output
    (run / "v1" / "metadata.json").write_text('{"tampered": 1}')
    r = runner.invoke(cli.app, ["artifacts", "r1", "--output", str(tmp_path / "out"), "--version", "1",
                                "--download", str(tmp_path / "dl")])
    assert r.exit_code == 3 and "do not match the manifest" in r.output


def test_artifacts_prints_where_the_latest_versions_eval_page_is(runner, tmp_path):
    import hashlib

    run = tmp_path / "out" / "r1"
    for n, page in ((1, True), (2, False)):
        v = run / f"v{n}"
        v.mkdir(parents=True)
        if page:
            (v / "eval_report.html").write_text("<!doctype html>")
        (v / "manifest.json").write_text("{}")
        (v / "_COMPLETE").write_text(hashlib.sha256(b"{}").hexdigest() + "\n")
    (run / "latest").write_text("v1\n")
    r = runner.invoke(cli.app, ["artifacts", "r1", "--output", str(tmp_path / "out")], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert f"eval page (v1): {run}/v1/eval_report.html" in r.output
    (run / "latest").write_text("v2\n")  # a version published before the page existed: nothing to point at
    r = runner.invoke(cli.app, ["artifacts", "r1", "--output", str(tmp_path / "out")], terminal_width=200)
    assert r.exit_code == 0 and "eval page" not in r.output


# ------------------------------------------------------------------------------ wait / logs -f reconnect logic

class FlakyKube:
    """Stands in for launcher.kube.Kube: replays Job states, drops the connection when told to."""

    namespace = "ml"

    def __init__(self, states, outages=(), logs=None):
        self.states = list(states)
        self.outages = set(outages)  # call numbers of get_job that fail as if the API server were down
        self.calls = 0
        self.current = "running"
        self.logs = list(logs or [])  # successive pod_log answers: list of lines, or an exception

    def get_job(self, name):
        from launcher.kube import ClusterUnreachable

        self.calls += 1
        if self.calls in self.outages:
            raise ClusterUnreachable("cannot reach the Kubernetes API server at https://x (connection refused)")
        state = self.current = self.states[0] if len(self.states) == 1 else self.states.pop(0)
        conds = {"running": [], "done": [{"type": "Complete", "status": "True"}],
                 "failed": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}[state]
        return {"metadata": {"name": name}, "spec": {}, "status": {"conditions": conds}}

    def get_node(self, name):
        return {"metadata": {"name": name}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}

    def list_pods(self, selector):
        phase = "Succeeded" if self.current == "done" else "Running"
        state = {"terminated": {"exitCode": 0}} if phase == "Succeeded" else {"running": {}}
        return [{"metadata": {"name": "p1", "creationTimestamp": "t"}, "spec": {"nodeName": "n"},
                 "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state,
                                                                   "restartCount": 0}]}}]

    def list_events(self, selector):
        return []

    def list_jobs(self, selector):
        return [{"metadata": {"name": "j"}}]  # RUN "j" is a run name: its Job is "j"

    def list_jobsets(self, selector):
        return []  # a cluster without JobSets

    def get_jobset(self, name):
        return None

    def job_workload(self, job):
        return None  # a cluster without Kueue

    def pod_log(self, pod, **kw):
        answer = self.logs.pop(0) if self.logs else []
        if isinstance(answer, Exception):
            raise answer
        yield from answer


@pytest.fixture()
def no_sleep(monkeypatch):
    import time

    monkeypatch.setattr(time, "sleep", lambda s: None)


def sdk(kube, notes=None):
    from launcher.client import Client
    from launcher.settings import make_settings

    from launcher.backends.kubernetes import KubernetesBackend

    settings = make_settings(namespace="ml")
    note = notes or (lambda message: None)
    return Client(backend=KubernetesBackend(settings, note=note, kube=kube, settings=settings), settings=settings,
                  notes=note)


def test_the_stand_in_adaptor_implements_the_protocol_the_real_one_does():
    from launcher.kube import ClusterReader, Kube

    assert isinstance(Kube(namespace="ml"), ClusterReader)
    assert isinstance(FlakyKube(["running"]), ClusterReader)


def test_wait_outlives_an_api_server_outage(no_sleep):
    kube = FlakyKube(["running", "running", "running", "done"], outages={2, 3})
    seen, notes = [], []
    final = sdk(kube, notes.append).wait("j", on_change=lambda st: seen.append(st.state))
    assert final.state == "Succeeded" and final.succeeded and seen == ["Running", "Succeeded"]
    assert any("retrying" in n for n in notes)


def test_wait_waits_out_an_api_server_that_is_down_when_it_starts(no_sleep):
    from launcher.kube import ClusterUnreachable

    kube = FlakyKube(["running", "done"])
    real = kube.list_jobs
    down = iter([True, True, False])

    def list_jobs(selector):
        if next(down, False):
            raise ClusterUnreachable("cannot reach the Kubernetes API server at https://x (connection refused)")
        return real(selector)

    kube.list_jobs = list_jobs
    notes = []
    assert sdk(kube, notes.append).wait("j").state == "Succeeded"
    assert sum("retrying" in n for n in notes) == 1, notes  # said once, not once per attempt


def test_status_of_a_missing_run_is_a_usage_error_with_a_fix():
    from launcher.errors import UsageError, exit_code_for

    class Empty(FlakyKube):
        def list_jobs(self, selector):
            return []

        def get_job(self, name):
            return None

    with pytest.raises(UsageError) as e:
        sdk(Empty(["running"])).status("ghost")
    assert "no run or Job named ghost in namespace ml" in str(e.value) and "launcher list" in e.value.hint
    assert exit_code_for(e.value) == 2


def test_wait_times_out_with_exit_4(monkeypatch):
    import time

    from launcher.errors import WaitTimeout, exit_code_for

    kube = FlakyKube(["running"])
    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with pytest.raises(WaitTimeout) as e:
        sdk(kube).wait("j", timeout=20)
    assert exit_code_for(e.value) == 4


def test_logs_follow_reconnects_without_repeating_lines(no_sleep):
    from launcher.kube import ClusterUnreachable

    ts = "2025-05-01T10:00:0{}.000000000Z {}"
    kube = FlakyKube(["running", "running", "running", "done"], logs=[
        [ts.format(1, "step 1"), ts.format(2, "step 2")],  # the stream ends: API server restarted
        ClusterUnreachable("cannot reach the Kubernetes API server"),
        [ts.format(1, "step 1"), ts.format(2, "step 2"), ts.format(3, "step 3")],
        [ts.format(1, "step 1"), ts.format(2, "step 2"), ts.format(3, "step 3"), ts.format(4, "done")],
    ])
    notes = []
    stream = sdk(kube, notes.append).logs("j", follow=True)
    assert list(stream) == ["step 1", "step 2", "step 3", "done"]
    assert stream.outcome.state == "Succeeded"
    assert any("retrying" in n for n in notes)


# ------------------------------------------------------------------------------ idempotent create (in-memory API)

class MemoryApi:
    """Just enough of launcher.kube.Kube for create_run: names are unique, create of a taken name is 409."""

    namespace = "ml"

    def __init__(self):
        self.jobs, self.cms, self.n = {}, {}, 0

    def _new(self, body):
        import copy
        self.n += 1
        obj = copy.deepcopy(body)
        obj["metadata"]["uid"] = f"uid-{self.n}"
        return obj

    def get_job(self, name):
        return self.jobs.get(name)

    def create_job(self, body, dry_run=False):
        from launcher.kube import AlreadyExists
        if body["metadata"]["name"] in self.jobs:
            raise AlreadyExists("exists")
        self.jobs[body["metadata"]["name"]] = obj = self._new(body)
        return obj

    def get_configmap(self, name, namespace=None):
        return self.cms.get(name)

    def create_configmap(self, body, dry_run=False):
        from launcher.kube import AlreadyExists
        if body["metadata"]["name"] in self.cms:
            raise AlreadyExists("exists")
        self.cms[body["metadata"]["name"]] = obj = self._new(body)
        return obj

    def patch_configmap(self, name, patch):
        self.cms[name]["metadata"].update(patch["metadata"])

    def delete_configmap(self, name, uid=None):
        if name in self.cms and (uid is None or self.cms[name]["metadata"]["uid"] == uid):
            del self.cms[name]
            return True
        return False


def _rendered(epochs=1):
    from jobs.spec import parse_spec
    from launcher.render import render_run
    from launcher.settings import make_settings

    spec = parse_spec({"name": "idem", "base_model": {"uri": "s3://mod/x/"}, "dataset": {"train": "s3://dat/t"},
                       "output": "s3://out/p", "training": {"epochs": epochs}})
    return render_run(spec, make_settings())


def test_create_run_is_idempotent_and_owns_its_configmap():
    from launcher.submit import create_run

    api = MemoryApi()
    run = _rendered()
    job = run.workload
    first = create_run(api, run)
    again = create_run(api, run)
    assert first.created and not again.created and again.message.startswith("already submitted")
    assert len(api.jobs) == 1
    owner = api.cms[job["metadata"]["name"]]["metadata"]["ownerReferences"][0]
    assert owner["uid"] == api.jobs[job["metadata"]["name"]]["metadata"]["uid"] and owner["kind"] == "Job"


def test_create_run_after_losing_the_race_on_the_job_is_already_submitted():
    from launcher.submit import create_run

    api = MemoryApi()
    run = _rendered()
    job, cm = run.workload, run.configmap
    real_get = api.get_job
    calls = {"n": 0}

    def get_job_racing(name):
        calls["n"] += 1
        if calls["n"] == 1:  # our first look: nothing there; then another process creates it
            api.create_configmap(cm)
            api.create_job(job)
            return None
        return real_get(name)

    api.get_job = get_job_racing
    result = create_run(api, run)
    assert not result.created and len(api.jobs) == 1


def test_stale_configmap_of_a_deleted_job_is_replaced():
    from launcher.submit import create_run

    api = MemoryApi()
    run = _rendered()
    job = run.workload
    create_run(api, run)
    api.jobs.clear()  # the Job was deleted; its ConfigMap still waits for garbage collection
    result = create_run(api, run)
    assert result.created
    new_uid = api.jobs[job["metadata"]["name"]]["metadata"]["uid"]
    assert api.cms[job["metadata"]["name"]]["metadata"]["ownerReferences"][0]["uid"] == new_uid


def test_kube_errors_become_one_sentence_each():
    pytest.importorskip("kubernetes")
    from kubernetes.client.exceptions import ApiException

    from launcher import kube as k

    adaptor = k.Kube(namespace="ml")
    adaptor.server = "https://api:6443"

    def err(status, body):
        e = ApiException(status=status, reason="x")
        e.body = body if isinstance(body, str) else json.dumps(body)
        return adaptor._api_error(e, "create", "job", "job j", " in namespace ml")

    forbidden = err(403, {"kind": "Status", "message": 'jobs.batch is forbidden: User "bob" cannot create resource '
                                                     '"jobs" in API group "batch" in the namespace "ml"'})
    assert isinstance(forbidden, k.Forbidden)
    assert forbidden.message.startswith("not allowed to create jobs in namespace ml:")
    assert "grant 'create' on 'jobs'" in forbidden.hint
    gone = err(404, {"kind": "Status", "reason": "NotFound", "details": {"name": "j", "kind": "jobs"}})
    assert isinstance(gone, k.NotFound)
    starting = err(404, "404 page not found\n")  # an API server still installing its routes
    assert isinstance(starting, k.TransientClusterError)
    assert isinstance(err(503, {"kind": "Status", "message": "etcd not ready"}), k.TransientClusterError)
    assert isinstance(err(409, {"kind": "Status"}), k.AlreadyExists)
    assert isinstance(err(422, {"kind": "Status", "message": "spec.template: Invalid"}), k.Invalid)
    assert "401" in err(401, {}).message


def test_data_check_with_a_spec_applies_that_specs_rules(runner, tmp_path):
    """The same 12 rows pass the guide's rules (min_rows 8) and fail a spec that needs 20 rows
    and drops outputs over 5 words."""
    pytest.importorskip("jobs.dataprep")
    rows = [{"instruction": f"Question number {i} about returns?", "output": f"Answer {i}: send it back within "
             f"{i + 10} days."} for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = write(tmp_path, GOOD + "data:\n  min_rows: 20\n  max_output_words: 5\n")
    assert runner.invoke(cli.app, ["data", "check", str(data), "--json"]).exit_code == 0
    r = runner.invoke(cli.app, ["data", "check", str(data), "--spec", str(spec), "--json"])
    assert r.exit_code == 1, r.output
    report = json.loads(r.output)
    assert report["ok"] is False and report["kept_rows"] < 12


# ------------------------------------------------------------------------------ artifacts prune (dry run by default)

def _half_written(tmp_path, age_s=7200):
    """out/r1: v1 complete, v2 abandoned half-way ``age_s`` ago."""
    import hashlib

    v1 = tmp_path / "out" / "r1" / "v1"
    v1.mkdir(parents=True)
    (v1 / "metadata.json").write_text("{}")
    digest = hashlib.sha256(b"{}").hexdigest()
    (v1 / "manifest.json").write_text(json.dumps({"files": {"metadata.json": {"sha256": digest, "size": 2}}}))
    (v1 / "_COMPLETE").write_text(hashlib.sha256((v1 / "manifest.json").read_bytes()).hexdigest())
    v2 = tmp_path / "out" / "r1" / "v2"
    v2.mkdir()
    (v2 / "_CLAIM").write_text("x")
    old = __import__("time").time() - age_s
    os.utime(v2 / "_CLAIM", (old, old))
    return str(tmp_path / "out")


@pytest.mark.parametrize("verb", [["artifacts", "prune"], ["prune"]])
def test_artifacts_prune_is_a_dry_run_until_yes_and_prune_is_its_alias(runner, tmp_path, verb):
    out = _half_written(tmp_path)
    dry = runner.invoke(cli.app, [*verb, "r1", "--output", out, "--older-than", "1h"])
    assert dry.exit_code == 0, dry.output
    assert "would remove r1/v2: 1 objects" in dry.output and "dry run: nothing was deleted" in dry.output
    assert (tmp_path / "out" / "r1" / "v2" / "_CLAIM").exists()
    r = runner.invoke(cli.app, [*verb, "r1", "--output", out, "--older-than", "1h", "--yes", "-o", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"run": "r1", "applied": True, "orphans": [
        {"name": "v2", "objects": 1, "bytes": 1, "age_seconds": pytest.approx(7200, abs=60), "removed": True}]}
    assert not (tmp_path / "out" / "r1" / "v2").exists() or not any((tmp_path / "out" / "r1" / "v2").iterdir())
    assert (tmp_path / "out" / "r1" / "v1" / "_COMPLETE").exists()
    again = runner.invoke(cli.app, [*verb, "r1", "--output", out])
    assert "nothing to prune: no incomplete version of r1 is older than 24h" in again.output


def test_artifacts_prune_keeps_a_young_folder_and_rejects_a_bad_duration(runner, tmp_path):
    out = _half_written(tmp_path, age_s=60)
    r = runner.invoke(cli.app, ["artifacts", "prune", "r1", "--output", out, "--yes"])
    assert r.exit_code == 0 and "nothing to prune" in r.output
    assert (tmp_path / "out" / "r1" / "v2" / "_CLAIM").exists()
    r = runner.invoke(cli.app, ["artifacts", "prune", "r1", "--output", out, "--older-than", "soon"])
    assert r.exit_code == 2 and "--older-than 'soon' is not a duration" in r.output and "90m, 24h or 7d" in r.output


def test_artifacts_without_a_subcommand_lists_and_help_names_both(runner, tmp_path):
    out = _half_written(tmp_path)
    for args in (["artifacts", "r1"], ["artifacts", "list", "r1"], ["artifacts", "-o", "json", "r1"]):
        r = runner.invoke(cli.app, [*args, "--output", out, "-o", "json"])
        assert r.exit_code == 0, (args, r.output)
        assert json.loads(r.output)["incomplete"] == ["v2"], args
    r = runner.invoke(cli.app, ["artifacts", "--help"])
    assert r.exit_code == 0 and "prune" in r.output and "list" in r.output
    r = runner.invoke(cli.app, ["artifacts", "prune", "--help"])
    assert r.exit_code == 0 and "launcher artifacts prune my-run" in r.output


def test_the_local_backend_names_what_it_cannot_do_and_the_fix_without_a_traceback(runner, tmp_path):
    state = str(tmp_path / "state")
    r = runner.invoke(cli.app, ["--backend", "local", "--state-dir", state, "list"], terminal_width=200)
    assert r.exit_code == 0 and f"no runs in {state} (local runs)" in r.output, r.output
    r = runner.invoke(cli.app, ["--backend", "local", "--state-dir", state, "status", "ghost"])
    assert r.exit_code == 2 and f"no local run named ghost in {state}" in r.output and "fix:" in r.output, r.output
    spec = write(tmp_path, GOOD)
    r = runner.invoke(cli.app, ["--state-dir", state, "submit", str(spec), "--local", "--dry-run"])
    assert r.exit_code == 2 and "a local run creates none" in r.output and "Traceback" not in r.output, r.output
    r = runner.invoke(cli.app, ["--backend", "nowhere", "list"])
    assert r.exit_code == 2 and "nowhere" in r.output, r.output


def test_serving_manifest_has_an_example_and_its_choices_in_its_help(runner):
    r = runner.invoke(cli.app, ["serving", "manifest", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    for text in ("Example", "launcher serving manifest my-run", "--engine", "kserve", "vllm", "--gpus", "--serve-as",
                 "RUN[:vN]"):
        assert text in r.output, text
    r = runner.invoke(cli.app, ["serving", "manifest", "r1", "--engine", "triton", "--output", "s3://b/o"])
    assert r.exit_code == 2 and "triton" in r.output
