"""The launcher's config file, read by pydantic-settings' YAML source: every bad file is one clear error."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from launcher.settings import SettingsError, make_settings

pytestmark = pytest.mark.unit


@pytest.fixture()
def config(tmp_path, monkeypatch):
    path = tmp_path / "launcher.yaml"
    monkeypatch.setenv("LAUNCHER_CONFIG", str(path))
    for var in ("LAUNCHER_NAMESPACE", "LAUNCHER_IMAGE"):
        monkeypatch.delenv(var, raising=False)
    return path


def test_config_file_values_and_a_byte_order_mark(config):
    config.write_text("\ufeffnamespace: team-a\nnode_selector: {pool: gpu}\n", encoding="utf-8")
    s = make_settings()
    assert s.namespace == "team-a" and s.node_selector == {"pool": "gpu"}
    config.write_text("")
    assert make_settings().namespace == "default", "an empty file is no settings"


@pytest.mark.parametrize("text,message,fix", [
    ("namespce: x\n", "namespce: not a setting (did you mean namespace?)", "launcher.yaml"),
    ("namespace: [x\n", "launcher.yaml, line 2 is not valid YAML", "indentation"),
    ("- namespace\n- ml\n", "must be a mapping of settings", "`key: value`"),
    ("42\n", "must be a mapping of settings", "`key: value`"),
    ("ttl_seconds_after_finished: -1\n", "ttl_seconds_after_finished: Input should be greater than or equal to 0",
     "LAUNCHER_*"),
])
def test_a_bad_config_file_is_one_error_naming_the_field_or_line_and_the_fix(config, text, message, fix):
    config.write_text(text)
    with pytest.raises(SettingsError) as e:
        make_settings()
    assert message in e.value.message and fix in e.value.hint


def test_a_config_file_that_is_not_utf8(config):
    config.write_bytes(b"namespace: \xff\n")
    with pytest.raises(SettingsError, match="not UTF-8"):
        make_settings()


def test_the_cli_prints_a_bad_config_file_without_a_traceback_and_exits_2(config, tmp_path):
    from launcher import cli

    config.write_text("imagee: x\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: r\nbase_model: {uri: s3://models/x/}\ndataset: {train: s3://data/t.jsonl}\noutput: s3://runs/p\n")
    r = CliRunner().invoke(cli.app, ["submit", str(spec), "--dry-run"])
    assert r.exit_code == 2
    assert "imagee: not a setting (did you mean image?)" in r.output and "fix:" in r.output
    assert "Traceback" not in r.output
