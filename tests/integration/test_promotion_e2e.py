"""promotion.auto through the real job (CPU, the 4-layer SmolLM2, real MinIO): the first run's version becomes
the run's champion, and its published eval report and page say so (no champion before); a second run of the same
run name that learns nothing (learning rate 1e-9) is published as v2 and not promoted, with the gate's reasons in
its published eval report and page, its progress and its log, and the champion pointer still names v1."""
from __future__ import annotations

import hashlib
import html
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from published import small_cpu_spec

pytestmark = [pytest.mark.train, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"


def _job(tmp_path: Path, stack, spec: dict, tag: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"spec-{tag}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(stack.s3_env())
    env.update({"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2",
                "TERMINATION_MESSAGE_PATH": str(tmp_path / f"tmsg-{tag}")})
    return subprocess.run([sys.executable, "-m", "jobs", "run", "--spec", str(path), "--workdir",
                           str(tmp_path / f"work-{tag}")], env=env, capture_output=True, text=True, timeout=900,
                          cwd=REPO)


def test_a_learning_run_becomes_champion_and_a_run_that_learns_nothing_is_published_but_not_promoted(
        tmp_path, stack, s3_client, s3_prefix, s3_env, short_model_in_minio):
    from jobs.progress import read_run_progress
    from jobs.promotion import compare, read_champion, read_evidence
    from jobs.publish import existing_versions
    from jobs.regression import general_set, general_set_sha256
    from jobs.spec import parse_spec
    from jobs.storage import open_store

    lines = (DEMO / "train.jsonl").read_text().splitlines()[:24]
    key = s3_prefix.split("/", 3)[3] + "/data/train.jsonl"
    s3_client.put_object(Bucket=stack.bucket, Key=key, Body=("\n".join(lines) + "\n").encode())
    train_uri, output = f"s3://{stack.bucket}/{key}", s3_prefix + "/out"

    def spec(**training) -> dict:
        s = small_cpu_spec("promo", short_model_in_minio, train_uri, output, **training)
        s["merge"] = {"enabled": False}
        s["promotion"] = {"auto": True}
        return s

    first = _job(tmp_path, stack, spec(learning_rate=2e-3), "good")
    assert first.returncode == 0, first.stderr[-4000:]
    store, prefix = open_store(output)
    run_prefix = f"{prefix}/promo"
    pointer, etag = read_champion(store, run_prefix)
    assert pointer is not None and pointer["version"] == "v1" and etag, pointer
    manifest_sha = hashlib.sha256(store.get_bytes(f"{run_prefix}/v1/manifest.json")).hexdigest()
    assert pointer["manifest_sha256"] == manifest_sha

    second = _job(tmp_path, stack, spec(learning_rate=1e-9), "flat")
    assert second.returncode == 0, "a failed gate never fails the run: " + second.stderr[-4000:]
    assert existing_versions(store, run_prefix) == {1: True, 2: True}, "v2 is published"
    pointer2, etag2 = read_champion(store, run_prefix)
    assert pointer2["version"] == "v1" and etag2 == etag, "the champion did not move"
    assert "promotion: v2 stays published, unpromoted (v1 stays champion)" in second.stderr, second.stderr[-3000:]

    meta2 = json.loads(store.get_bytes(f"{run_prefix}/v2/metadata.json"))
    meta1 = json.loads(store.get_bytes(f"{run_prefix}/v1/metadata.json"))
    assert meta1["held_out"]["sha256"] == meta2["held_out"]["sha256"], "both measured on the same held-out set"
    assert meta2["metrics"]["val_loss_after"] > meta1["metrics"]["val_loss_after"]
    # per-example losses: one per held-out row, and the general-ability set's on the base and with the adapter
    n_val, n_general = meta2["held_out"]["validation_rows"], len(general_set())
    for v in ("v1", "v2"):
        report = json.loads(store.get_bytes(f"{run_prefix}/{v}/eval_report.json"))
        assert len(report["validation"]["losses_after"]) == n_val and n_val > 1, report["validation"]
        reg = report["regression"]
        assert reg["prompts"] == n_general and reg["set_sha256"] == general_set_sha256(), reg
        assert len(reg["losses_before"]) == len(reg["losses_after"]) == n_general
        assert all(x > 0 for x in reg["losses_before"] + reg["losses_after"])
        assert f"general ability: loss {reg['loss_before']} → {reg['loss_after']} on {n_general} prompts" in \
            store.get_bytes(f"{run_prefix}/{v}/eval_report.md").decode()
    gate = {m.metric: m for m in compare(read_evidence(store, run_prefix, "v1"),
                                         read_evidence(store, run_prefix, "v2")).metrics}
    val = gate["val_loss"]
    assert val.pairs == n_val and val.low is not None and val.high is not None and not val.note, val
    assert val.low <= val.difference <= val.high
    assert gate["regression"].pairs == n_general and gate["regression"].low is not None, gate["regression"]
    # the gate ran before publishing: its verdict is in each version's eval report and page
    page1 = json.loads(store.get_bytes(f"{run_prefix}/v1/eval_report.json"))["promotion"]
    assert page1["status"] == "first" and page1["champion"] is None and page1["comparison"] is None, page1
    for name in ("eval_report.md", "eval_report.html"):
        assert "first version: no champion to compare" in store.get_bytes(f"{run_prefix}/v1/{name}").decode()
    page2 = json.loads(store.get_bytes(f"{run_prefix}/v2/eval_report.json"))["promotion"]
    assert page2["status"] == "failed" and page2["champion"] == "v1", page2
    assert page2["champion_manifest_sha256"] == manifest_sha and page2["reasons"], page2
    assert any("validation loss" in r for r in page2["reasons"]), page2["reasons"]
    assert {m["metric"] for m in page2["comparison"]["metrics"]} >= {"val_loss", "regression", "rouge_l"}
    md2 = store.get_bytes(f"{run_prefix}/v2/eval_report.md").decode()
    html2 = store.get_bytes(f"{run_prefix}/v2/eval_report.html").decode()
    assert "**compared with the champion v1: the gate failed**" in md2 and "| val_loss (primary) |" in md2
    assert "compared with the champion v1: the gate failed</span>" in html2
    for reason in page2["reasons"]:
        assert f"- {reason}" in md2 and f"<li>{html.escape(reason)}</li>" in html2
    spec_hash = parse_spec(spec(learning_rate=1e-9)).spec_hash()
    progress = read_run_progress(f"{output}/promo", spec_hash)
    assert progress["state"] == "succeeded" and progress["promotion"]["promoted"] is False, progress
    assert progress["promotion"]["champion"] == "v1" and progress["promotion"]["page"] == "failed"
    assert not progress["promotion"]["rejudged"]
    for reason in page2["reasons"]:
        assert reason in progress["promotion"]["sentence"]
