"""`launcher render` and `submit --dry-run` print every object a run creates, and `submit` creates exactly those:
one renderer (launcher.render.render_run), offline, deterministic."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from jobs.spec import load_spec
from launcher import cli, render
from launcher.errors import AlreadyExists
from launcher.settings import make_settings
from launcher.submit import submit
from tests.unit.test_golden import GOLDEN, LOCAL_EXAMPLES, ROOT, SETTINGS, VARIANTS, examples, golden_name

pytestmark = pytest.mark.unit

EXAMPLE = str(ROOT / "examples" / "spec.yaml")


def invoke(*args, env=None):
    return CliRunner().invoke(cli.app, list(args), env=env)


def words(text: str) -> str:
    """Help and usage text as one line of words, whatever panels or wrapping the CLI prints it in."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def render_args(example: str, variant: str) -> list[str]:
    """`launcher render` of the example in a golden variant: its settings as the command's own flags."""
    overrides, extra = VARIANTS[variant]
    args = ["-n", SETTINGS["namespace"], "render", str(ROOT / example)]
    for o in overrides:
        args += ["--set", o]
    if "queue" in extra:
        args += ["--queue", extra["queue"]]
    if "multinode_workload" in extra:
        args += ["--multinode-workload", extra["multinode_workload"]]
    return args


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("example", examples())
def test_render_prints_what_a_run_creates_with_flags_for_the_cluster_choices(example, variant):
    r = invoke(*render_args(example, variant), env={"LAUNCHER_S3_ENDPOINT": SETTINGS["s3_endpoint"]})
    if example in LOCAL_EXAMPLES:  # local folders: what render prints runs in a pod, which cannot read them
        assert r.exit_code == 2 and "output (line " in r.output and "is a local path" in r.output, r.output
        assert "--local" in r.output, r.output
        return
    assert r.exit_code == 0, r.output
    assert r.stdout == (GOLDEN / "runs" / golden_name(example, variant)).read_text()


def test_dry_run_of_two_nodes_prints_the_headless_service_submit_creates():
    r = invoke("submit", EXAMPLE, "--dry-run", "--set", "resources.nodes=2")
    assert r.exit_code == 0, r.output
    job, service, cm = yaml.safe_load_all(r.stdout)
    assert (job["kind"], service["kind"], cm["kind"]) == ("Job", "Service", "ConfigMap")
    # the Service is the pods' subdomain: without it torchrun's rendezvous on <job>-0.<job> never resolves
    assert service["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"] == job["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"


def test_dry_run_and_render_print_the_same():
    args = ["--set", "resources.nodes=2", "--set", "resources.gpus=4"]
    assert invoke("submit", EXAMPLE, "--dry-run", *args).stdout == invoke("render", EXAMPLE, *args).stdout


def test_json_is_one_v1_list_of_the_same_objects():
    as_yaml = list(yaml.safe_load_all(invoke("render", EXAMPLE, "--set", "resources.nodes=2").stdout))
    r = invoke("render", EXAMPLE, "--set", "resources.nodes=2", "-o", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["apiVersion"], doc["kind"]) == ("v1", "List")
    assert doc["items"] == as_yaml and [o["kind"] for o in doc["items"]] == ["Job", "Service", "ConfigMap"]


def test_rendering_twice_prints_the_same_bytes():
    assert invoke("render", EXAMPLE, "-o", "json").stdout == invoke("render", EXAMPLE, "-o", "json").stdout


def test_render_never_loads_a_cluster_client(tmp_path):
    """Offline for real: with a kubeconfig of a dead server it still renders, and the kubernetes client is never
    even imported (no probe for JobSets, no namespace ConfigMap)."""
    dead = tmp_path / "kubeconfig"
    dead.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": "https://127.0.0.1:9"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    code = ("import sys\nfrom launcher.cli import main\n"
            f"rc = main(['render', {EXAMPLE!r}, '--set', 'resources.nodes=2'])\n"
            # launcher.kube may load: it reads the kubeconfig file for its context's namespace, as kubectl does
            "print('loaded:', sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'),"
            " file=sys.stderr)\nsys.exit(rc)\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
           "KUBECONFIG": str(dead), "LAUNCHER_KUBECONFIG": str(dead), "LAUNCHER_MULTINODE_WORKLOAD": "auto"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "loaded: []" in r.stderr
    assert [d["kind"] for d in yaml.safe_load_all(r.stdout)] == ["Job", "Service", "ConfigMap"]
    assert "multinode_workload is auto and rendering asks no cluster: shown as an Indexed Job" in r.stderr


def test_a_bad_spec_is_the_error_validate_prints(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("name: Bad_Name\nbase_model: {uri: s3://m/x/}\ndataset: {train: s3://d/t.jsonl}\n"
                   "output: s3://o/p\nlora: {ranq: 16}\n")
    v, r = invoke("validate", str(bad)), invoke("render", str(bad))
    assert r.exit_code == v.exit_code == 2
    assert r.stdout == "" and r.stderr == v.stderr
    assert "lora.ranq (line 5): unknown field" in r.stderr and "Traceback" not in r.output


def test_an_output_format_render_cannot_print_is_a_usage_error():
    r = invoke("render", EXAMPLE, "-o", "table")
    assert r.exit_code == 2 and "'table' is not one of 'yaml', 'json'" in words(r.output)


def test_help_says_it_is_for_gitops():
    r = invoke("render", "--help")
    assert r.exit_code == 0
    text = words(r.output)
    assert "Argo CD, Flux and other GitOps tools" in text and "launcher render spec.yaml | kubectl apply -f -" in text


# ------------------------------------------------------------------------------ submit creates what render_run returns

class MemoryCluster:
    """Just the part of launcher.kube.Kube that submit (without preflight) uses: a store of created objects with
    409 on a taken name, and JobSets served."""

    namespace = "ml"

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.n = 0

    def _get(self, kind, name):
        return self.objects.get((kind, name))

    def _create(self, body, dry_run=False):
        key = (body["kind"], body["metadata"]["name"])
        if key in self.objects:
            raise AlreadyExists(f"{key} exists")
        self.n += 1
        obj = copy.deepcopy(body)
        obj["metadata"]["uid"] = f"uid-{self.n}"
        if not dry_run:
            self.objects[key] = obj
        return obj

    def serves_jobsets(self):
        return True

    def get_job(self, name):
        return self._get("Job", name)

    def get_jobset(self, name):
        return self._get("JobSet", name)

    def get_configmap(self, name, namespace=None):
        return self._get("ConfigMap", name)

    create_job = create_jobset = create_configmap = create_service = _create

    def patch_configmap(self, name, patch):
        self.objects[("ConfigMap", name)]["metadata"].update(patch["metadata"])


@pytest.mark.parametrize("variant", ["as-written", "nodes-2", "jobset", "nodes-2-kueue"])
def test_submit_creates_exactly_the_objects_render_run_returns(variant):
    overrides, extra = VARIANTS[variant]
    spec = load_spec(EXAMPLE, overrides=overrides)
    settings = make_settings(**SETTINGS, **extra)
    cluster = MemoryCluster()
    result = submit(cluster, spec, settings, skip_preflight=True)
    assert result.created

    def as_rendered(obj):
        meta = {k: v for k, v in obj["metadata"].items() if k not in ("uid", "ownerReferences")}
        return {**obj, "metadata": meta}

    want = render.render_run(spec, settings, jobsets_served=True).objects
    assert sorted(cluster.objects) == sorted((o["kind"], o["metadata"]["name"]) for o in want)
    for obj in want:
        assert as_rendered(cluster.objects[(obj["kind"], obj["metadata"]["name"])]) == obj
    workload = cluster.objects[(want[0]["kind"], want[0]["metadata"]["name"])]
    for kind in {o["kind"] for o in want} - {"Job", "JobSet"}:  # the rest go with the run
        (owner,) = cluster.objects[(kind, want[0]["metadata"]["name"])]["metadata"]["ownerReferences"]
        assert owner["uid"] == workload["metadata"]["uid"]


def test_skipping_the_preflight_never_skips_the_local_path_check():
    """--skip-preflight skips the checks that need read access to the cluster; a local path needs none, and a pod
    could never read it, so an SDK caller with skip_preflight=True is refused before anything is created."""
    from launcher.errors import PreflightError

    spec = load_spec(str(ROOT / "examples" / "demo" / "spec.yaml"))
    cluster = MemoryCluster()
    with pytest.raises(PreflightError) as e:
        submit(cluster, spec, make_settings(**SETTINGS), skip_preflight=True)
    assert "dataset.train is a local path (train.jsonl) that a pod cannot read" in str(e.value), str(e.value)
    assert cluster.objects == {}
