"""The chart's ``settings.modelCache`` (docs/model-cache.md): off by default, and when set it reaches the launcher
through the one home of its settings, ConfigMap lora-jobs-launcher (which `launcher submit` and the chart's `runs`
hook both read); the schema refuses a folder that is not absolute."""
from __future__ import annotations

import pytest

from tests.integration.test_chart import CHART, helm, run_helm, settings_from_chart, template  # noqa: F401

pytestmark = pytest.mark.helm


def test_the_charts_model_cache_reaches_the_launcher_through_its_configmap(helm):  # noqa: F811
    from jobs.spec import parse_spec
    from launcher import render

    off = settings_from_chart(template(helm), "ns-test")
    assert (off.model_cache_host_path, off.model_cache_max_gib) == (None, 200)
    on = settings_from_chart(template(helm, values={"settings": {"modelCache": {
        "hostPath": "/var/cache/lora-jobs/models", "maxGiB": 0.5}}}), "ns-test")
    assert (on.model_cache_host_path, on.model_cache_max_gib) == ("/var/cache/lora-jobs/models", 0.5)
    spec = parse_spec({"name": "r", "base_model": {"uri": "s3://models/x/"}, "dataset": {"train": "s3://data/t.jsonl"},
                       "output": "s3://runs/p"})
    pod = render.render_job(spec, on)["spec"]["template"]["spec"]
    assert {"name": "model-cache", "hostPath": {"path": "/var/cache/lora-jobs/models",
                                                "type": "DirectoryOrCreate"}} in pod["volumes"]


@pytest.mark.parametrize("values, named", [
    ({"hostPath": "var/cache/models"}, "/settings/modelCache/hostPath"),
    ({"maxGiB": 0}, "/settings/modelCache/maxGiB"),
    ({"hostpath": "/x"}, "/settings/modelCache"),
])
def test_the_schema_refuses_a_bad_model_cache_naming_the_value(helm, values, named):  # noqa: F811
    proc = run_helm(helm, "template", "lora-jobs", str(CHART), values={"settings": {"modelCache": values}},
                    check=False)
    assert proc.returncode != 0 and f"at '{named}'" in proc.stderr, proc.stderr
