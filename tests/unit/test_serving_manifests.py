"""`launcher serving manifest` offline (launcher/serving.py): what is served and how, from versions published
here by jobs.publish into a local folder. The reading, the choice (LoRA or merged, the --max-lora-rank), the
prefix-safe URIs and the credentials by reference; the apiserver's check of the same objects is
tests/integration/test_serving_manifests_apiserver.py.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from jobs import serving as verdicts
from launcher import cli, serving
from launcher.errors import UsageError
from launcher.settings import make_settings

pytestmark = pytest.mark.unit
BASE_SHA = "cd" * 32


def _folder(tmp_path, name: str, *, rank: int = 16, dora: bool = False, merged: bool = True, verdict: bool = True,
            base: str = "s3://models/llama-3-8b"):
    from safetensors.numpy import save_file

    f = tmp_path / name
    a = f / "adapter"
    a.mkdir(parents=True)
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "target_modules": ["q_proj"],
                                                       "use_dora": dora, "base_model_name_or_path": base}))
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((rank, 8), np.float32),
               "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((8, rank), np.float32)},
              str(a / "adapter_model.safetensors"))
    meta = {"base_model": {"uri": base, "sha256": BASE_SHA}}
    if verdict:
        meta["serving"] = verdicts.check_adapter_dir(a, base_model_sha256=BASE_SHA).to_dict()
    (f / "metadata.json").write_text(json.dumps(meta))
    if merged:
        (f / "merged").mkdir()
        (f / "merged" / "config.json").write_text("{}")
    return f


def _publish(tmp_path, run: str = "bot", **kw) -> str:
    from jobs.publish import publish_version
    from jobs.storage import LocalStore

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return publish_version(LocalStore(str(out)), run, _folder(tmp_path, f"src-{run}-{len(list(out.glob('*/v*')))}",
                                                                 **kw))


def _on_s3(v: serving.ServedVersion) -> serving.ServedVersion:
    """The version as read, moved to S3: rendering is pure, the reading is what the local store tests."""
    return dataclasses.replace(v, uri=f"s3://artifacts/lora/{v.run}/{v.version}/")


SETTINGS = make_settings(namespace="ml", s3_secret_name="team-s3", s3_access_key_key="id", s3_secret_key_key="key",
                         s3_endpoint="http://minio.storage:9000")


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_the_version_is_read_and_verified_from_its_manifest(tmp_path):
    _publish(tmp_path, rank=32)
    v = serving.read_version(str(tmp_path / "out"), "bot")
    assert (v.version, v.uri, v.base_model_sha256) == ("v1", f"{tmp_path}/out/bot/v1/", BASE_SHA)
    assert v.has_adapter and v.has_merged and v.serving["rank"] == 32
    assert v.serving["base_model"] == "s3://models/llama-3-8b" and v.serving["base_model_sha256"] == BASE_SHA


def test_a_version_whose_files_do_not_match_its_manifest_is_refused(tmp_path):
    from jobs.errors import StorageError

    _publish(tmp_path)
    (tmp_path / "out" / "bot" / "v1" / "adapter" / "adapter_model.safetensors").write_bytes(b"short")
    with pytest.raises(StorageError, match="does not match its manifest"):
        serving.read_version(str(tmp_path / "out"), "bot")
    (tmp_path / "out" / "bot" / "v1" / "metadata.json").write_text("{}")
    with pytest.raises(StorageError, match="metadata.json"):
        serving.read_version(str(tmp_path / "out"), "bot")


@pytest.mark.parametrize("rank,max_rank", [(8, 8), (16, 16), (17, 32), (64, 64), (300, 320)])
def test_the_max_lora_rank_is_the_smallest_vllm_accepts_for_the_rank(tmp_path, rank, max_rank):
    _publish(tmp_path, rank=rank)
    v = _on_s3(serving.read_version(str(tmp_path / "out"), "bot"))
    (isvc,) = serving.render(v, SETTINGS).objects
    assert isvc["spec"]["model"]["lora"]["maxRank"] == max_rank
    deployment, _ = serving.render(v, SETTINGS, engine="vllm").objects
    args = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert args[:3] == ["vllm", "serve", "/models/base"] and "--enable-lora" in args
    assert args[args.index("--max-lora-rank") + 1] == str(max_rank)
    assert args[args.index("--lora-modules") + 1] == "bot=/models/adapter"


def test_every_uri_is_a_folder_so_v1_never_reaches_v10(tmp_path):
    for _ in range(2):
        _publish(tmp_path)
    v = _on_s3(serving.read_version(str(tmp_path / "out"), "bot", "v1"))
    uris = []
    for engine in ("kserve", "vllm"):
        for obj in serving.render(v, SETTINGS, engine=engine).objects:
            uris += [s.split("=", 1)[-1] for s in _strings(obj) if "s3://" in s]
    assert len(uris) >= 6 and all(u.endswith("/") for u in uris), uris
    ours = [u for u in uris if u.startswith("s3://artifacts/")]
    assert ours and not any(serving.prefix_matches(u, sibling) for u in ours
                            for sibling in ("lora/bot/v10/adapter/adapter_model.safetensors", "lora/bot/v1-old/x"))
    assert serving.prefix_matches("s3://artifacts/lora/bot/v1", "lora/bot/v10/adapter/x"), "the bug the '/' prevents"
    assert not serving.prefix_matches("s3://artifacts/lora/bot/v1/", "lora/bot/v10/adapter/x")


def test_the_listing_and_the_sdk_give_version_uris_ending_with_a_slash(tmp_path):
    from launcher import artifacts

    _publish(tmp_path)
    assert [v.uri for v in artifacts.list_versions(str(tmp_path / "out"), "bot").versions] == \
        [f"{tmp_path}/out/bot/v1/"]


def test_a_dora_adapter_is_served_merged_and_says_why(tmp_path):
    _publish(tmp_path, dora=True)
    v = _on_s3(serving.read_version(str(tmp_path / "out"), "bot"))
    result = serving.render(v, SETTINGS)
    (isvc,) = result.objects
    assert isvc["spec"]["model"] == {"uri": "s3://artifacts/lora/bot/v1/merged/", "name": "bot"}
    assert isvc["metadata"]["annotations"]["lora-jobs.io/serve-as"] == "merged"
    assert result.plan.serve_as == "merged" and "DoRA" in result.plan.why and "DoRA" in result.notes[0]
    deployment, _ = serving.render(v, SETTINGS, engine="vllm").objects
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"][:3] == ["vllm", "serve", "/models/merged"]
    assert "--enable-lora" not in pod["containers"][0]["command"]
    assert pod["initContainers"][0]["command"][5:] == ["merged=s3://artifacts/lora/bot/v1/merged/"]
    with pytest.raises(UsageError, match="not serve its adapter as a LoRA"):
        serving.render(v, SETTINGS, serve_as="lora")


def test_without_a_merged_model_an_adapter_vllm_refuses_is_an_error_with_the_fix(tmp_path):
    _publish(tmp_path, dora=True, merged=False)
    v = _on_s3(serving.read_version(str(tmp_path / "out"), "bot"))
    with pytest.raises(UsageError, match="no merged model.*DoRA") as err:
        serving.render(v, SETTINGS)
    assert "merge.enabled: true" in err.value.hint


def test_a_servable_adapter_can_still_be_served_merged_by_choice(tmp_path):
    _publish(tmp_path)
    v = _on_s3(serving.read_version(str(tmp_path / "out"), "bot"))
    assert serving.render(v, SETTINGS, serve_as="merged").plan.model_uri.endswith("/v1/merged/")


def test_a_version_from_before_the_serving_check_is_judged_by_its_adapter_config(tmp_path):
    _publish(tmp_path, rank=64, verdict=False)
    v = serving.read_version(str(tmp_path / "out"), "bot")
    assert v.serving["checked"] == "adapter_config" and v.serving["vllm_max_lora_rank"] == 64


def test_the_s3_secret_is_named_never_its_values(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEVALUE0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-that-must-not-leak")
    _publish(tmp_path)
    v = _on_s3(serving.read_version(str(tmp_path / "out"), "bot"))
    (isvc,) = serving.render(v, SETTINGS).objects
    assert isvc["metadata"]["annotations"][serving.KSERVE_SECRET_ANNOTATION] == "team-s3"
    deployment, service = serving.render(v, SETTINGS, engine="vllm", gpus=2).objects
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["initContainers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "team-s3", "key": "id"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "team-s3", "key": "key"}}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage:9000"
    assert not any("value" in e and e["name"].startswith("AWS_") and "KEY" in e["name"] for e in env.values())
    text = json.dumps([isvc, deployment, service])
    assert "AKIAEXAMPLEVALUE0001" not in text and "s3cr3t-value-that-must-not-leak" not in text
    # non-root, GPUs from the flag, the base checked against the hash the version recorded
    for c in pod["initContainers"] + pod["containers"]:
        assert c["securityContext"]["runAsNonRoot"] and not c["securityContext"]["allowPrivilegeEscalation"]
    assert pod["containers"][0]["resources"]["requests"] == {"nvidia.com/gpu": 2}
    assert "--tensor-parallel-size" in pod["containers"][0]["command"]
    assert pod["initContainers"][0]["command"][-2:] == ["--sha256", f"base={BASE_SHA}"]
    assert isvc["spec"]["template"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}


def test_a_hub_base_is_named_as_each_engine_downloads_it(tmp_path):
    _publish(tmp_path, base="hf:Qwen/Qwen2.5-0.5B")
    v = _on_s3(serving.read_version(str(tmp_path / "out"), "bot"))
    (isvc,) = serving.render(v, SETTINGS).objects
    assert isvc["spec"]["model"]["uri"] == "hf://Qwen/Qwen2.5-0.5B"
    deployment, _ = serving.render(v, SETTINGS, engine="vllm").objects
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"][2] == "Qwen/Qwen2.5-0.5B"
    assert [a for a in pod["initContainers"][0]["command"] if "=s3://" in a] == \
        ["adapter=s3://artifacts/lora/bot/v1/adapter/"]


def test_the_verb_says_what_is_wrong_and_the_fix_without_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("LAUNCHER_NAMESPACE", "ml")
    _publish(tmp_path)
    runner = CliRunner()
    out = str(tmp_path / "out")
    r = runner.invoke(cli.app, ["serving", "manifest", "bot", "--output", out])
    assert r.exit_code == 2 and "local folder" in r.stderr and "Traceback" not in r.output, r.output
    r = runner.invoke(cli.app, ["serving", "manifest", "nobody", "--output", out])
    assert r.exit_code == 2 and "run nobody has no versions" in r.stderr and "fix:" in r.stderr, r.output
    r = runner.invoke(cli.app, ["serving", "manifest", "bot:v7", "--output", out])
    assert r.exit_code == 2 and "no version v7" in r.stderr and "v1" in r.stderr, r.output
    (tmp_path / "out" / "bot" / "v2").mkdir()
    (tmp_path / "out" / "bot" / "v2" / "metadata.json").write_text("{}")
    r = runner.invoke(cli.app, ["serving", "manifest", "bot:2", "--output", out])
    assert r.exit_code == 3 and "incomplete" in r.stderr, r.output
    r = runner.invoke(cli.app, ["serving", "manifest", "bot", "--engine", "triton", "--output", out])
    assert r.exit_code == 2
    r = runner.invoke(cli.app, ["serving", "manifest", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "launcher serving manifest" in r.output
    r = runner.invoke(cli.app, ["serving", "manifest", "bot", "--gpus", "0", "--output", out])
    assert r.exit_code == 2
    with pytest.raises(UsageError, match="gpus"):
        serving.check_options("kserve", 0, None)
