"""The node's base-model cache as the launcher renders it (settings model_cache_host_path, model_cache_max_gib) and
as the job reads it (jobs.model_cache.CacheConfig.from_env). The cache itself is tested against the real MinIO in
tests/integration/test_model_cache.py, and on the stack's real node in test_model_cache_real_node.py."""
from __future__ import annotations

import logging

import pytest

from jobs.model_cache import ENV_DIR, ENV_MAX_GIB, CacheConfig
from jobs.spec import parse_spec
from launcher import render
from launcher.settings import SettingsError, cluster_values_from_configmap, make_settings

pytestmark = pytest.mark.unit

SPEC = {"name": "support-bot", "base_model": {"uri": "s3://models/smollm2/"},
        "dataset": {"train": "s3://data/support/train.jsonl"}, "output": "s3://runs/lora", "resources": {"gpus": 1}}


def pod_of(workload: dict) -> dict:
    return render.job_spec_of(workload)["template"]["spec"]


def test_off_by_default_the_pod_has_no_host_folder_and_no_cache_variables():
    pod = pod_of(render.render_job(parse_spec(SPEC), make_settings(namespace="ml")))
    assert not any("hostPath" in v for v in pod["volumes"])
    names = {e["name"] for e in pod["containers"][0]["env"]}
    assert ENV_DIR not in names and ENV_MAX_GIB not in names


@pytest.mark.parametrize("nodes, workload", [(1, "indexed-job"), (2, "indexed-job"), (2, "jobset")])
def test_on_every_pod_mounts_the_node_folder_and_is_told_where_and_how_big(nodes, workload):
    settings = make_settings(namespace="ml", model_cache_host_path="/var/cache/lora-jobs/models/",
                             model_cache_max_gib=150, multinode_workload=workload)
    spec = parse_spec({**SPEC, "resources": {"gpus": 1, "nodes": nodes}})
    pod = pod_of(render.render_run(spec, settings).workload)
    volume = next(v for v in pod["volumes"] if v["name"] == "model-cache")
    assert volume == {"name": "model-cache", "hostPath": {"path": "/var/cache/lora-jobs/models",
                                                          "type": "DirectoryOrCreate"}}
    container = pod["containers"][0]
    assert {"name": "model-cache", "mountPath": render.MODEL_CACHE_MOUNT} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[ENV_DIR] == render.MODEL_CACHE_MOUNT and env[ENV_MAX_GIB] == "150"
    # what the job makes of it
    config = CacheConfig.from_env(env)
    assert config is not None and str(config.root) == render.MODEL_CACHE_MOUNT and config.max_bytes == 150 * 2**30


def test_the_namespaces_configmap_can_turn_it_on():
    cm = {"metadata": {"name": "lora-jobs-launcher"}, "data": {"settings.yaml": (
        "model_cache_host_path: /mnt/nvme/lora-models\nmodel_cache_max_gib: 500\n")}}
    s = make_settings(cluster_values_from_configmap(cm), namespace="ml")
    assert (s.model_cache_host_path, s.model_cache_max_gib) == ("/mnt/nvme/lora-models", 500)
    assert make_settings(namespace="ml", model_cache_host_path="").model_cache_host_path is None, "empty: off"


@pytest.mark.parametrize("value", ["var/cache/models", "/", "/var/../etc", "/var/./cache", "//var/cache",
                                   "/var/cache:/etc"])
def test_a_host_folder_that_is_not_an_absolute_clean_path_is_refused_naming_the_setting(value):
    with pytest.raises(SettingsError) as e:
        make_settings(namespace="ml", model_cache_host_path=value)
    assert "model_cache_host_path" in e.value.message and "/var/cache/lora-jobs/models" in e.value.message


@pytest.mark.parametrize("value", [0, -5])
def test_the_bound_must_be_positive(value):
    with pytest.raises(SettingsError, match="model_cache_max_gib"):
        make_settings(namespace="ml", model_cache_max_gib=value)


def test_the_job_reads_no_cache_without_the_variable_and_warns_on_a_bad_bound(caplog):
    assert CacheConfig.from_env({}) is None
    assert CacheConfig.from_env({ENV_DIR: "/c"}).max_bytes == 200 * 2**30, "the default bound"
    with caplog.at_level(logging.WARNING, logger="jobs"):
        assert CacheConfig.from_env({ENV_DIR: "/c", ENV_MAX_GIB: "lots"}) is None
    assert "not a positive number" in caplog.text and "model_cache_max_gib" in caplog.text
