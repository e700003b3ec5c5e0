"""A newcomer's first commands: `launcher init` writes a spec that validates, help shows flags as flags,
`--version` says what runs, and `submit -o` prints its result for scripts."""
from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from launcher import cli

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def runner():
    return CliRunner()


def _comments(text: str) -> str:
    """The file's comment text, one line, whitespace collapsed (a description wraps over lines)."""
    parts = [re.sub(r"^[\s#]+", "", line) for line in text.splitlines() if line.lstrip().startswith("#")]
    return " ".join(" ".join(parts).split())


# ------------------------------------------------------------------------------ init

def test_init_writes_a_spec_that_validates_as_is_with_no_warning(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(cli.app, ["init"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "spec.yaml").is_file() and "launcher validate spec.yaml" in r.output
    v = runner.invoke(cli.app, ["validate", "spec.yaml"])
    assert v.exit_code == 0, v.output
    assert v.output.startswith("ok: spec.yaml is valid") and "warning" not in v.output and "error" not in v.output


def test_init_writes_every_field_with_the_models_default_and_description(runner, tmp_path):
    from jobs.spec import field_docs, load_spec

    path = tmp_path / "spec.yaml"
    assert runner.invoke(cli.app, ["init", str(path), "--name", "support-bot"]).exit_code == 0
    text = path.read_text()
    raw = yaml.safe_load(text)
    spec = load_spec(path)
    comments = _comments(text)
    assert spec.name == "support-bot"
    for field, default, description in field_docs():
        node: object = raw
        for part in field.split("."):  # written out, not left to the model's default
            assert isinstance(node, dict) and part in node, f"{field} is not in the file"
            node = node[part]
            if node is None:  # an optional section left off (tracking): its fields are in the example
                break
        off = node is None and part != field.split(".")[-1]
        if default != "required" and not off:
            value: object = spec
            for part in field.split("."):
                value = getattr(value, part)
            assert value == ast.literal_eval(default), f"{field}: the file has {value!r}, the default is {default}"
        if description:
            assert " ".join(description.split()) in comments, f"{field}'s description is not in its comment"


def test_init_comments_name_the_default_and_the_allowed_range(runner, tmp_path):
    path = tmp_path / "spec.yaml"
    runner.invoke(cli.app, ["init", str(path)])
    comments = _comments(path.read_text())
    assert "(default: 16; allowed: 1-1024)" in comments  # lora.rank: ge=1, le=1024
    assert "one of: cosine, linear, constant" in comments  # training.lr_scheduler's Literal
    assert "(default: auto; one of: a number, auto)" in comments  # gradient_accumulation_steps: int | 'auto'


def test_init_tracking_example_validates_once_uncommented(runner, tmp_path):
    from jobs.spec import load_spec_text

    path = tmp_path / "spec.yaml"
    runner.invoke(cli.app, ["init", str(path)])
    lines = path.read_text().splitlines()
    start = lines.index("# to turn it on, replace null with:") + 1
    end = lines.index("tracking: null")
    block = [line[2:] for line in lines[start:end]]
    turned_on = "\n".join(lines[:start - 1] + ["tracking:"] + block + lines[end + 1:])
    spec = load_spec_text(turned_on)
    assert spec.tracking.mlflow.experiment == "my-experiment"
    assert spec.tracking.mlflow.uri_env == "MLFLOW_TRACKING_URI"


def test_init_refuses_to_overwrite_without_force(runner, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("mine\n")
    r = runner.invoke(cli.app, ["init", str(path)])
    assert r.exit_code == 2 and "exists" in r.output and "--force" in r.output and "Traceback" not in r.output
    assert path.read_text() == "mine\n"
    r = runner.invoke(cli.app, ["init", str(tmp_path)])  # a folder means its spec.yaml: the same file
    assert r.exit_code == 2 and path.read_text() == "mine\n"
    r = runner.invoke(cli.app, ["init", str(path), "--force"])
    assert r.exit_code == 0 and path.read_text().startswith("# A LoRA training run")


def test_init_with_a_bad_name_says_why_and_writes_nothing(runner, tmp_path):
    path = tmp_path / "spec.yaml"
    r = runner.invoke(cli.app, ["init", str(path), "--name", "Not_Valid"])
    assert r.exit_code == 2 and "not a valid run name" in r.output and not path.exists()


# ------------------------------------------------------------------------------ help and version

def _commands(group, prefix: tuple[str, ...] = ()):
    yield prefix, group
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer's own copy of click's classes)
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def test_help_shows_flags_as_flags_and_no_python_types_as_metavars(runner):
    seen = 0
    for path, command in _commands(typer.main.get_command(cli.app)):
        r = runner.invoke(cli.app, [*path, "--help"], terminal_width=100)
        assert r.exit_code == 0, path
        assert "<bool>" not in r.output and "<list[" not in r.output, (path, r.output)
        for param in command.params:
            if param.param_type_name == "option" and param.is_flag:
                for opt in param.opts:
                    assert re.search(rf"(^|[ ,]){re.escape(opt)}( {{2,}}|,| /|\n|$)", r.output, re.M), (path, opt)
                    assert f"{opt} <" not in r.output, (path, opt)
                    seen += 1
    assert seen >= 10  # the walk reached the verbs' flags (--dry-run, --wait, --force, …)


def test_version_prints_the_package_version_and_the_default_trainer_image(runner):
    from jobs import __version__
    from launcher.settings import LauncherSettings

    r = runner.invoke(cli.app, ["--version"])
    assert r.exit_code == 0
    assert r.output.startswith(f"launcher {__version__} ")
    assert LauncherSettings.model_fields["image"].default in r.output
    # one version: the package's metadata and the code's agree
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"] == __version__


# ------------------------------------------------------------------------------ submit -o

GOOD = ("name: demo-run\nbase_model:\n  uri: s3://models/smollm2/\ndataset:\n  train: s3://data/train.jsonl\n"
        "output: s3://runs/lora\n")


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_submit_prints_its_result_as_json_or_yaml(runner, tmp_path, monkeypatch, fmt):
    from launcher.client import Client
    from launcher.render import job_name, run_labels
    from launcher.submit import SubmitResult

    def submit(self, spec, overrides=(), **kw):  # the cluster's answer, without a cluster
        s = self.load_spec(spec, overrides)
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": job_name(s), "namespace": "ml", "labels": run_labels(s)}}
        return SubmitResult(job_name(s), True, job, ["a warning"])

    monkeypatch.setattr(Client, "submit", submit)
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD)
    v = runner.invoke(cli.app, ["validate", str(path)])
    job = re.search(r"job (\S+),", v.output).group(1)
    r = runner.invoke(cli.app, ["submit", str(path), "-o", fmt])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout) if fmt == "json" else yaml.safe_load(r.stdout)
    assert data["job"] == job and data["run"] == "demo-run" and data["created"] is True
    assert data["namespace"] == "ml" and job.endswith(data["spec_hash"][:8]) and data["kind"] == "job"
    assert data["warnings"] == ["a warning"] and data["message"] == f"submitted: job {job}"
    assert "follow it" not in r.stdout  # hints go to stderr: stdout is one document
