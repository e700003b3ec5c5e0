"""`launcher serving manifest` against real parts: versions published to the stack's MinIO by jobs.publish, the
manifests checked by the stack's kube-apiserver with KServe's own LLMInferenceService CRD installed
(tests/integration/crds/, pinned), by server-side dry-run with strict field validation, and the vLLM pod template
by Pod Security admission (restricted). The serving pod's init container command runs here against MinIO.

An invalid LLMInferenceService (an unknown field, a maxRank below 1) is refused by the same check, so it can fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jobs import serving as verdicts

pytestmark = [pytest.mark.kube, pytest.mark.s3]
CRD = Path(__file__).parent / "crds" / "serving.kserve.io_llminferenceservices.yaml"
REPO = Path(__file__).resolve().parents[2]
BASE_SHA = "ab" * 32


@pytest.fixture(scope="session")
def kserve_crd(kube_api):
    """KServe's LLMInferenceService CRD in the stack's apiserver (created or replaced; left installed: it holds no
    objects, dry-runs store nothing)."""
    import yaml
    from kubernetes import client

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = next(d for d in yaml.load_all(CRD.read_text(), Loader=loader) if d)
    ext = client.ApiextensionsV1Api(kube_api)
    name = crd["metadata"]["name"]
    try:
        current = ext.read_custom_resource_definition(name)
        crd["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(name, crd)
    except client.ApiException as err:
        if err.status != 404:
            raise
        ext.create_custom_resource_definition(crd)
    deadline = time.time() + 60
    while time.time() < deadline:
        conds = ext.read_custom_resource_definition(name).status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conds):
            return name
        time.sleep(0.5)
    pytest.fail(f"the CRD {name} was not Established within 60 s")


def _version_folder(folder: Path, *, rank: int = 32, dora: bool = False, merged: bool = True) -> Path:
    """A version's files as the job publishes them: the two adapter files, metadata.json with the verdict."""
    from safetensors.numpy import save_file

    a = folder / "adapter"
    a.mkdir(parents=True)
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "target_modules": ["q_proj"],
                                                       "use_dora": dora, "base_model_name_or_path": "s3://m/llama/"}))
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((rank, 8), np.float32),
               "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((8, rank), np.float32)},
              str(a / "adapter_model.safetensors"))
    verdict = verdicts.check_adapter_dir(a, base_model_sha256=BASE_SHA).to_dict()
    (folder / "metadata.json").write_text(json.dumps({"base_model": {"uri": "s3://m/llama/", "sha256": BASE_SHA},
                                                      "serving": verdict}))
    if merged:
        (folder / "merged").mkdir()
        (folder / "merged" / "config.json").write_text("{}")
    return folder


def _publish(s3_prefix: str, run: str, folder: Path) -> str:
    from jobs.publish import publish_version
    from jobs.storage import join, open_store

    store, base = open_store(s3_prefix)
    return publish_version(store, join(base, run), folder)


@pytest.fixture()
def client(stack, namespace, s3_env, monkeypatch):
    from launcher.client import Client

    for k in list(os.environ):
        if k.startswith("LAUNCHER_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("LAUNCHER_S3_ENDPOINT", stack.s3_endpoint)
    return Client(namespace, kubeconfig=stack.kubeconfig)


def _dry_run(kube_api, namespace: str, obj: dict) -> dict:
    """Create ``obj`` with dryRun=All and strict field validation (an unknown field is an error, not dropped)."""
    from kubernetes import dynamic

    api = dynamic.DynamicClient(kube_api).resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    return api.create(body=obj, namespace=namespace,
                      query_params=[("dryRun", "All"), ("fieldValidation", "Strict")]).to_dict()


def test_both_manifests_of_a_lora_version_are_accepted_by_the_apiserver_with_kserves_crd(
        kserve_crd, kube_api, client, namespace, s3_prefix, tmp_path, make_namespace):
    _publish(s3_prefix, "bot", _version_folder(tmp_path / "v"))
    kserve = client.serving_manifests("bot", output=s3_prefix)
    assert kserve.plan.serve_as == "lora" and kserve.plan.max_lora_rank == 32
    (isvc,) = kserve.objects
    got = _dry_run(kube_api, namespace, isvc)
    assert got["spec"]["model"]["lora"] == {"adapters": [{"name": "bot", "uri": f"{s3_prefix}/bot/v1/adapter/"}],
                                            "maxRank": 32}, "stored as rendered: nothing pruned"
    assert got["spec"]["model"]["uri"] == "s3://m/llama/"

    vllm = client.serving_manifests("bot", "v1", engine="vllm", gpus=2, output=s3_prefix)
    deployment, service = vllm.objects
    for obj in vllm.objects:
        _dry_run(kube_api, namespace, obj)
    # the pod the Deployment makes passes Pod Security admission's restricted profile (enforced for pods)
    restricted = make_namespace(prefix="psa", labels={"pod-security.kubernetes.io/enforce": "restricted",
                                                      "pod-security.kubernetes.io/enforce-version": "latest"})
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "serving-check"},
           "spec": deployment["spec"]["template"]["spec"]}
    _dry_run(kube_api, restricted, pod)
    text = json.dumps(vllm.to_dict()) + json.dumps(kserve.to_dict())
    assert client.offline_settings.s3_secret_name in text
    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]):
        assert secret not in text, "credentials appear only by reference"


def test_an_invalid_llminferenceservice_is_refused_by_the_same_check(kserve_crd, kube_api, client, namespace,
                                                                     s3_prefix, tmp_path):
    from kubernetes import client as k8s

    _publish(s3_prefix, "bot", _version_folder(tmp_path / "v"))
    (isvc,) = client.serving_manifests("bot", output=s3_prefix).objects
    wrong_field = json.loads(json.dumps(isvc))
    wrong_field["spec"]["model"]["lora"]["maxRnak"] = 32
    low_rank = json.loads(json.dumps(isvc))
    low_rank["spec"]["model"]["lora"]["maxRank"] = 0
    both = json.loads(json.dumps(isvc))
    both["spec"]["scaling"] = {"minReplicas": 1, "maxReplicas": 2}
    for bad, says in ((wrong_field, "maxRnak"), (low_rank, "maxRank"), (both, "mutually exclusive")):
        with pytest.raises(k8s.ApiException) as err:
            _dry_run(kube_api, namespace, bad)
        assert err.value.status in (400, 422) and says in err.value.body, err.value.body


def test_a_dora_version_is_served_merged_and_accepted(kserve_crd, kube_api, client, namespace, s3_prefix,
                                                      tmp_path):
    from launcher.errors import UsageError

    _publish(s3_prefix, "dora", _version_folder(tmp_path / "v1", dora=True))
    result = client.serving_manifests("dora", output=s3_prefix)
    assert result.plan.serve_as == "merged" and "DoRA" in result.plan.why
    (isvc,) = result.objects
    assert isvc["spec"]["model"] == {"uri": f"{s3_prefix}/dora/v1/merged/", "name": "dora"}
    _dry_run(kube_api, namespace, isvc)
    _publish(s3_prefix, "dora", _version_folder(tmp_path / "v2", dora=True, merged=False))
    with pytest.raises(UsageError, match="no merged model") as err:
        client.serving_manifests("dora", "v2", output=s3_prefix)
    assert "merge.enabled" in err.value.hint


def test_a_v1_uri_cannot_reach_v10_objects_in_s3_nor_in_the_serving_pods_download(
        client, stack, s3_client, s3_prefix, tmp_path):
    from launcher.serving import prefix_matches

    _publish(s3_prefix, "bot", _version_folder(tmp_path / "v"))
    bucket, key = s3_prefix[5:].split("/", 1)
    for rel in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/extra.bin"):
        s3_client.put_object(Bucket=bucket, Key=f"{key}/bot/v10/{rel}", Body=b"v10")
    (deployment, _) = client.serving_manifests("bot", "v1", engine="vllm", output=s3_prefix).objects
    (isvc,) = client.serving_manifests("bot", "v1", output=s3_prefix).objects
    uris = [isvc["spec"]["model"]["uri"], isvc["spec"]["model"]["lora"]["adapters"][0]["uri"],
            *(a.split("=", 1)[1] for a in deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]
              if "=s3://" in a)]
    for uri in uris:
        assert uri.endswith("/"), uri
    adapter_uri = isvc["spec"]["model"]["lora"]["adapters"][0]["uri"]

    def listed(uri: str) -> list[str]:  # what KServe's storage initializer lists: Prefix = the URI's path
        path = uri[5:].split("/", 1)[1]
        return [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix=path).get("Contents", [])]

    assert sorted(k.rsplit("/", 1)[-1] for k in listed(adapter_uri)) == list(verdicts.ADAPTER_FILES)
    version_uri = isvc["metadata"]["annotations"]["lora-jobs.io/version-uri"]
    assert not any("/v10/" in k for k in listed(version_uri))
    # the check can fail: the same URI without its '/' reaches v10
    assert any("/v10/" in k for k in listed(version_uri.rstrip("/")))
    assert prefix_matches(version_uri.rstrip("/"), f"{key}/bot/v10/adapter/extra.bin")
    assert not prefix_matches(version_uri, f"{key}/bot/v10/adapter/extra.bin")

    # the init container's own command, here (python -m jobs.serving fetch), minus the base it cannot reach
    command = deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]
    args = [a for a in command[4:] if a.startswith("adapter=")]
    proc = subprocess.run([sys.executable, "-m", "jobs.serving", "fetch", str(tmp_path / "models"), *args],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "models" / "adapter").iterdir()) == list(verdicts.ADAPTER_FILES)
    proc = subprocess.run([sys.executable, "-m", "jobs.serving", "fetch", str(tmp_path / "m2"),
                           args[0].rstrip("/")], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "does not end with '/'" in proc.stderr


def test_the_cli_prints_the_manifests_as_yaml_or_a_json_list_and_the_choice_on_stderr(client, stack, namespace,
                                                                                      s3_prefix, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from launcher import cli

    _publish(s3_prefix, "bot", _version_folder(tmp_path / "v", rank=17))
    runner = CliRunner()
    r = runner.invoke(cli.app, ["-n", namespace, "--kubeconfig", stack.kubeconfig, "serving", "manifest", "bot:v1",
                                "--output", s3_prefix])
    assert r.exit_code == 0, r.output
    (isvc,) = list(yaml.safe_load_all(r.stdout))
    assert isvc["kind"] == "LLMInferenceService" and isvc["metadata"]["namespace"] == namespace
    assert isvc["spec"]["model"]["lora"]["maxRank"] == 32
    assert "served as a LoRA of rank 17" in r.stderr and "storageSecretName" in r.stderr
    r = runner.invoke(cli.app, ["-n", namespace, "serving", "manifest", "bot", "--engine", "vllm", "-o", "json",
                                "--output", s3_prefix])
    assert r.exit_code == 0, r.output
    listed = json.loads(r.stdout)
    assert listed["kind"] == "List" and [o["kind"] for o in listed["items"]] == ["Deployment", "Service"]


def test_the_serving_pods_download_refuses_a_base_changed_since_training(s3_env, stack, s3_client, s3_prefix,
                                                                          tmp_path):
    from jobs.digest import hash_dir

    bucket, key = s3_prefix[5:].split("/", 1)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"vocab_size": 96}')
    s3_client.put_object(Bucket=bucket, Key=f"{key}/base/config.json", Body=(base / "config.json").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def fetch(dest: str, sha: str):
        return subprocess.run([sys.executable, "-m", "jobs.serving", "fetch", str(tmp_path / dest),
                               f"base={s3_prefix}/base/", "--sha256", f"base={sha}"],
                              cwd=REPO, env=env, capture_output=True, text=True)

    ok = fetch("a", hash_dir(base))
    assert ok.returncode == 0 and (tmp_path / "a" / "base" / "config.json").is_file(), ok.stderr
    changed = fetch("b", "0" * 64)
    assert changed.returncode == 1 and "changed since the adapter was trained" in changed.stderr, changed.stderr
