"""The node's base-model cache on the stack's REAL node (hack/node.sh): two jobs submitted one after the other
with the chart's ``settings.modelCache`` read from the namespace's ConfigMap, as every ``launcher submit`` reads it.
The first downloads the base model into the node folder; the second fetches 0 base-model bytes from MinIO, loads
the model from the cache's read-only entry, trains and publishes.

The first job's dataset holds too few rows, so it stops at the data stage right after its fetch (a cheap miss: a
failed run fills the cache as well as a finished one); the second trains SmolLM2 cut to 4 layers, training only.
The namespace enforces Pod Security "privileged": "restricted" and "baseline" refuse the hostPath
(docs/model-cache.md).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from published import cpu_spec, lean, train_jsonl
from tests.integration.test_chart import CHART, run_helm
from tests.integration.test_real_pods import cli, env_for, wait_status, write_spec

pytestmark = [pytest.mark.node, pytest.mark.helm, pytest.mark.train, pytest.mark.s3]

POD_UID = 10001  # launcher/render.py RUN_AS


def test_the_second_job_on_the_node_fetches_no_base_model_bytes(s3_env, stack, node, kube_api, make_node_namespace,
                                                                 trainer_ref, short_model_dir, short_model_in_minio,
                                                                 s3_client, s3_prefix, tmp_path):
    import yaml
    from kubernetes import client

    from jobs.digest import hash_dir
    from jobs.storage import open_store

    core = client.CoreV1Api(kube_api)
    ns = make_node_namespace("cache")
    core.patch_namespace(ns, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "privileged"}}})
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="lora-jobs-trainer")))
    # The node folder, prepared as docs/model-cache.md says (the node's file system is this machine's).
    cache = tmp_path / "node-model-cache"
    cache.mkdir()
    os.chown(cache, POD_UID, POD_UID)
    # The chart's launcher ConfigMap with the cache on: the one home of the setting.
    out = run_helm(stack.helm, "template", "lora-jobs", str(CHART), "--namespace", ns,
                   values={"settings": {"modelCache": {"hostPath": str(cache), "maxGiB": 2}}}).stdout
    cm = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "ConfigMap"
              and d["metadata"]["name"] == "lora-jobs-launcher")
    core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=cm["metadata"]["name"]),
                                                             data=cm["data"]))
    env = env_for(stack, node, ns, trainer_ref, tmp_path)
    bucket, _, prefix = s3_prefix[5:].partition("/")
    model_bytes = sum(p.stat().st_size for p in Path(short_model_dir).iterdir() if p.is_file())

    # Job 1: a miss. Two rows: the data stage refuses them (exit 11) right after the fetch.
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}/few.jsonl", Body=train_jsonl(2))
    first = lean(cpu_spec("cache-miss", short_model_in_minio, f"{s3_prefix}/few.jsonl", f"{s3_prefix}/runs"))
    r = cli(env, "submit", str(write_spec(tmp_path, first)))
    assert r.returncode == 0, r.stdout + r.stderr
    s1 = wait_status(env, "cache-miss", lambda s: s["state"] in ("Succeeded", "Failed"), 600, "the first job to end")
    p1 = s1["progress"]
    assert p1 and p1["stage"] == "prepare" and p1["state"] == "failed", (s1, cli(env, "logs", "cache-miss").stdout[-3000:])
    assert p1["base_model"]["cache"] == "miss" and p1["base_model"]["fetched_bytes"] == model_bytes, p1
    entries = list((cache / "entries").iterdir())
    assert len(entries) == 1 and (entries[0] / "model" / "config.json").stat().st_uid == POD_UID

    # Job 2: a hit. It reads the base from the node folder, trains and publishes.
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}/train.jsonl", Body=train_jsonl())
    second = lean(cpu_spec("cache-hit", short_model_in_minio, f"{s3_prefix}/train.jsonl", f"{s3_prefix}/runs"))
    r = cli(env, "submit", str(write_spec(tmp_path, second)))
    assert r.returncode == 0, r.stdout + r.stderr
    s2 = wait_status(env, "cache-hit", lambda s: s["state"] in ("Succeeded", "Failed"), 900, "the second job to end")
    p2 = s2["progress"]
    assert s2["state"] == "Succeeded" and p2["version"] == "v1", s2
    assert p2["base_model"] == {**p2["base_model"], "cache": "hit", "fetched_bytes": 0, "bytes": model_bytes}, p2
    logs = cli(env, "logs", "cache-hit").stdout
    assert "read from the node's model cache" in logs and "nothing downloaded" in logs, logs[-3000:]
    store, out_prefix = open_store(f"{s3_prefix}/runs")
    meta = json.loads(store.get_bytes(f"{out_prefix}/cache-hit/v1/metadata.json"))
    assert meta["base_model"]["sha256"] == hash_dir(short_model_dir), "the model hash the version records"
    assert [e.name for e in (cache / "entries").iterdir()] == [entries[0].name]
    print(f"CACHE| first job: {p1['base_model']}; second job: {p2['base_model']}")
