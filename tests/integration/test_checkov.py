"""checkov (a maintained IaC scanner) on the rendered chart, default values and every option on.

Every failed check must be listed, with its reason, in charts/lora-jobs/checkov-skips.yaml,
and every listed skip must still fail somewhere: a fixed finding leaves the file, a new one
fails this test. checkov runs from its own virtualenv (hack/checkov.sh, pinned in
hack/versions.env), with the kubernetes framework only and no download from its vendor.
"""
from __future__ import annotations

import fnmatch
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.test_chart import CHART, REPO, full_values, helm, run_helm  # noqa: F401  (helm: fixture)

pytestmark = pytest.mark.helm

SKIPS = CHART / "checkov-skips.yaml"
NAMESPACE = "ml"  # a real install's namespace: `helm template` without one renders "default" (CKV_K8S_21)


@pytest.fixture(scope="module")
def checkov() -> str:
    proc = subprocess.run(["bash", str(REPO / "hack" / "checkov.sh")], capture_output=True, text=True, timeout=900)
    if proc.returncode:
        pytest.fail(f"hack/checkov.sh could not install checkov:\n{proc.stderr}", pytrace=False)
    return proc.stdout.strip().splitlines()[-1]


def failed_checks(checkov: str, helm: str, values: dict | None, tmp: Path) -> list[tuple[str, str, str]]:
    """(check id, "Kind/name", check name) of every failed check on the chart rendered with `values`."""
    tmp.mkdir()
    out = run_helm(helm, "template", "lora-jobs", str(CHART), "--namespace", NAMESPACE, values=values).stdout
    (tmp / "chart.yaml").write_text(out)
    proc = subprocess.run([checkov, "--directory", str(tmp), "--framework", "kubernetes", "--output", "json",
                           "--quiet", "--skip-download", "--compact"],
                          capture_output=True, text=True, timeout=300)
    # exit 1 means "some check failed"; anything else is checkov itself failing
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    report = report if isinstance(report, dict) else next(r for r in report if r["check_type"] == "kubernetes")
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["passed"] > 50, report["summary"]
    found = []
    for c in report["results"]["failed_checks"]:
        kind, _ns, name = c["resource"].split(".", 2)
        # graph checks (CKV2_*) name a pod as "<name>.<label>-<value>..."; the object is the first part
        found.append((c["check_id"], f"{kind}/{name.split('.', 1)[0]}", c["check_name"]))
    return found


def test_every_failed_check_is_a_listed_skip_and_every_skip_still_fails(checkov, helm, tmp_path):
    skips = yaml.safe_load(SKIPS.read_text())["skips"]
    for s in skips:
        assert set(s) == {"check", "resources", "reason"} and len(s["reason"]) > 40, f"{SKIPS.name}: {s}"
    found = {which: failed_checks(checkov, helm, values, tmp_path / which)
             for which, values in (("default", None), ("all-options", full_values()))}

    def skip_for(check: str, resource: str) -> dict | None:
        return next((s for s in skips if s["check"] == check
                     and any(fnmatch.fnmatchcase(resource, p) for p in s["resources"])), None)

    unlisted = [f"{which}: {check} on {res} ({name})" for which, hits in found.items()
                for check, res, name in hits if not skip_for(check, res)]
    assert not unlisted, ("checkov failed checks that are not in charts/lora-jobs/checkov-skips.yaml: fix them, "
                          "or list them there with the reason:\n  " + "\n  ".join(unlisted))
    all_hits = [(c, r) for hits in found.values() for c, r, _ in hits]
    stale = [f"{s['check']} {p}" for s in skips for p in s["resources"]
             if not any(c == s["check"] and fnmatch.fnmatchcase(r, p) for c, r in all_hits)]
    assert not stale, ("checkov-skips.yaml lists checks that no longer fail: remove them:\n  " + "\n  ".join(stale))


def test_the_scan_sees_what_it_should_fail_on(checkov, helm, tmp_path):
    """The test above proves nothing if checkov cannot see a finding: a pod env secret and a
    low uid, put back into the rendered chart, must both be reported."""
    values = full_values()
    found = failed_checks(checkov, helm, values, tmp_path / "baseline")
    out = run_helm(helm, "template", "lora-jobs", str(CHART), "--namespace", NAMESPACE, values=values).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    minio = next(d for d in docs if d["kind"] == "Deployment")
    container = minio["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "MINIO_ROOT_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}})
    minio["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 1000
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "chart.yaml").write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run([checkov, "--directory", str(bad), "--framework", "kubernetes", "--output", "json",
                           "--quiet", "--skip-download", "--compact"], capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    report = report if isinstance(report, dict) else report[0]
    hits = {(c["check_id"], c["resource"].split(".")[0]) for c in report["results"]["failed_checks"]}
    assert ("CKV_K8S_35", "Deployment") in hits and ("CKV_K8S_40", "Deployment") in hits
    assert ("CKV_K8S_35", "Deployment/lora-jobs-minio") not in {(c, r) for c, r, _ in found}
