"""Golden files of a run's identity and of everything it creates, so a refactoring shows what it changes.

- ``golden/spec_hashes.yaml``: the spec hash (it names the Job) and the training hash (it keys the checkpoints)
  of every committed training spec. A changed hash renames a running Job or orphans its checkpoints.
- ``golden/runs/<example>.<variant>.yaml``: every object a run of each example creates (the Job or JobSet, the
  headless Service of a multi-node Indexed Job, the spec ConfigMap), per variant: as written, 1 GPU, 4 GPUs,
  2 nodes, a JobSet, a Kueue queue.
- ``golden/dry_run/<example>.<variant>.yaml``: what ``launcher submit --dry-run`` prints for the same.

Settings are fixed here (the conftest clears LAUNCHER_* and HOME), so the files do not depend on who runs them.
After an intended change: ``UPDATE_GOLDEN=1 pytest tests/unit/test_golden.py`` and review the diff.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jobs.spec import load_spec
from launcher import cli, render
from launcher.settings import make_settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
HASHES = GOLDEN / "spec_hashes.yaml"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

#: The settings every golden render uses: fixed values, nothing from the user's environment.
SETTINGS = {"namespace": "ml", "s3_endpoint": "http://minio.storage:9000"}

#: variant -> (``--set`` overrides of the spec, settings on top of SETTINGS)
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "as-written": ([], {}),
    "gpus-1": (["resources.gpus=1"], {}),
    "gpus-4": (["resources.gpus=4"], {}),
    "nodes-2": (["resources.nodes=2"], {}),
    "jobset": (["resources.nodes=2"], {"multinode_workload": "jobset"}),
    "kueue": ([], {"queue": "team-a"}),
    "nodes-2-kueue": (["resources.nodes=2"], {"queue": "team-a"}),
    "jobset-kueue": (["resources.nodes=2"], {"multinode_workload": "jobset", "queue": "team-a"}),
}


def _is_training_spec(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "name" in data and "base_model" in data


def committed_specs() -> list[str]:
    """Every training spec in the repository (examples and benchmark records), relative to its root."""
    found = [p for pattern in ("examples/**/*.yaml", "benchmarks/**/*.yaml") for p in ROOT.glob(pattern)]
    return sorted(str(p.relative_to(ROOT)) for p in found if _is_training_spec(p))


def examples() -> list[str]:
    return [p for p in committed_specs() if p.startswith("examples/")]


def golden_name(example: str, variant: str) -> str:
    """examples/spec.yaml -> spec.<variant>.yaml; examples/demo/spec.yaml -> demo-spec.<variant>.yaml"""
    stem = "-".join(Path(example).relative_to("examples").with_suffix("").parts)
    return f"{stem}.{variant}.yaml"


def check(path: Path, text: str) -> None:
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} is missing: UPDATE_GOLDEN=1 pytest {__file__} writes it"
    assert text == path.read_text(), f"{path.name} changed: review the diff, then UPDATE_GOLDEN=1 pytest"


# ------------------------------------------------------------------------------ identity

def test_the_spec_and_training_hashes_of_every_committed_spec_are_unchanged():
    got = {}
    for rel in committed_specs():
        s = load_spec(ROOT / rel)
        got[rel] = {"spec_hash": s.spec_hash(), "training_hash": s.training_hash()}
    check(HASHES, yaml.safe_dump(got, sort_keys=True))


def test_the_golden_specs_are_found():
    """The discovery above is not silently empty: both examples and the benchmark records are there."""
    specs = committed_specs()
    assert {"examples/spec.yaml", "examples/demo/spec.yaml"} <= set(specs)
    assert sum(p.startswith("benchmarks/") for p in specs) >= 20


# ------------------------------------------------------------------------------ what a run creates

def run_objects(example: str, variant: str) -> list[dict]:
    """Every object ``submit`` creates for the example in this variant, in the order the YAML lists them."""
    overrides, extra = VARIANTS[variant]
    spec = load_spec(ROOT / example, overrides=overrides)
    settings = make_settings(**SETTINGS, **extra)
    return render.render_run(spec, settings).objects


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("example", examples())
def test_the_objects_a_run_creates_are_unchanged(example, variant):
    check(GOLDEN / "runs" / golden_name(example, variant), render.to_yaml(*run_objects(example, variant)))


def test_the_variants_render_what_they_name():
    """The goldens hold what their names say (a wrong override would quietly record the wrong thing)."""
    def kinds(variant):
        return [o["kind"] for o in run_objects("examples/spec.yaml", variant)]

    assert kinds("as-written") == kinds("gpus-4") == kinds("kueue") == ["Job", "ConfigMap"]
    assert kinds("nodes-2") == kinds("nodes-2-kueue") == ["Job", "Service", "ConfigMap"]
    assert kinds("jobset") == kinds("jobset-kueue") == ["JobSet", "ConfigMap"]
    limits = run_objects("examples/spec.yaml", "gpus-4")[0]["spec"]["template"]["spec"]["containers"][0]
    assert limits["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert run_objects("examples/spec.yaml", "kueue")[0]["metadata"]["labels"][render.LABEL_QUEUE] == "team-a"


# ------------------------------------------------------------------------------ submit --dry-run

#: Examples run with `launcher submit --local` (local folders): a dry run refuses them, naming the first local path.
LOCAL_EXAMPLES = {"examples/demo/spec.yaml": "dataset.train (line 8)",
                  "examples/preference/spec.yaml": "dataset.train (line 10)"}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("example", examples())
def test_what_submit_dry_run_prints_is_unchanged(example, variant, monkeypatch):
    overrides, extra = VARIANTS[variant]
    monkeypatch.setenv("LAUNCHER_S3_ENDPOINT", SETTINGS["s3_endpoint"])
    for key, value in extra.items():
        monkeypatch.setenv(f"LAUNCHER_{key.upper()}", value)
    args = ["-n", SETTINGS["namespace"], "submit", str(ROOT / example), "--dry-run"]
    for o in overrides:
        args += ["--set", o]
    r = CliRunner().invoke(cli.app, args)
    if example in LOCAL_EXAMPLES:
        # the demos read and write local folders: a dry run is for a cluster, whose pods cannot read them
        assert r.exit_code == 2 and "a pod cannot read" in r.output and LOCAL_EXAMPLES[example] in r.output, r.output
        assert not (GOLDEN / "dry_run" / golden_name(example, variant)).exists()
        return
    assert r.exit_code == 0, r.output
    check(GOLDEN / "dry_run" / golden_name(example, variant), r.stdout)
