"""spec.base_adapter before any weights load: the URI must name one version; the version must be complete, its
files those its manifest vouches for, trained on this run's base and with this spec's LoRA shape. Each refusal
names the field and the fix. Versions are made by the publisher itself (jobs.publish.publish_version) into a
folder store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.errors import SpecError, StorageError
from jobs.publish import publish_version
from jobs.spec import parse_spec
from jobs.storage import LocalStore

pytestmark = pytest.mark.unit

ADAPTER_CONFIG = {"r": 8, "lora_alpha": 16, "use_rslora": False, "use_dora": False, "peft_type": "LORA",
                  "target_modules": ["q_proj", "v_proj"]}


def _spec(**over):
    raw = {"name": "dpo-next", "base_model": {"uri": "s3://models/base/"}, "dataset": {"train": "s3://data/p.jsonl"},
           "output": "s3://runs/out", "training": {"method": "dpo"}, "lora": {"rank": 8, "alpha": 16}, **over}
    return parse_spec(raw)


def _publish(root: Path, base_sha: str = "b" * 64, config: dict | None = None) -> str:
    folder = root / "staging"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(config or ADAPTER_CONFIG))
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "metadata.json").write_text(json.dumps({"base_model": {"uri": "s3://models/base/", "sha256": base_sha}}))
    store = LocalStore(str(root / "store"))
    return publish_version(store, "sft", folder)


def test_the_uri_must_name_one_version():
    assert _spec(base_adapter="s3://runs/out/sft/v3/").base_adapter == "s3://runs/out/sft/v3"
    for bad in ("s3://runs/out/sft", "s3://runs/out/sft/latest", "s3://runs/out/sft/v0"):
        with pytest.raises(SpecError, match="names no version"):
            _spec(base_adapter=bad)


def test_a_run_without_base_adapter_keeps_its_hash_and_one_with_it_is_another_run():
    plain = _spec()
    assert plain.spec_hash() == parse_spec(plain.model_dump(mode="json", exclude={"base_adapter"})).spec_hash()
    assert _spec(base_adapter="s3://runs/out/sft/v1").training_hash() != plain.training_hash()
    assert _spec(base_adapter="s3://runs/out/sft/v1").training_hash() != \
        _spec(base_adapter="s3://runs/out/sft/v2").training_hash()


def test_a_complete_version_is_fetched_and_recorded(tmp_path):
    from jobs.trainer.recipe import fetch_base_adapter

    version = _publish(tmp_path)
    uri = str(tmp_path / "store" / "sft" / version)
    got = fetch_base_adapter(_spec(base_adapter=uri), tmp_path / "work", "b" * 64)
    assert (got.dir / "adapter_model.safetensors").read_bytes() == b"weights"
    assert got.record()["uri"] == uri and got.record()["base_model_sha256"] == "b" * 64
    assert len(got.record()["manifest_sha256"]) == 64


def test_an_altered_file_an_incomplete_version_and_another_base_are_refused(tmp_path):
    from jobs.trainer.recipe import fetch_base_adapter

    version = _publish(tmp_path)
    folder = tmp_path / "store" / "sft" / version
    weights = folder / "adapter" / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(b"WEIGHTS")
    with pytest.raises(StorageError, match="adapter/adapter_model.safetensors: sha256 mismatch") as err:
        fetch_base_adapter(_spec(base_adapter=str(folder)), tmp_path / "w1", "b" * 64)
    assert "do not start from it" in (err.value.hint or "")
    weights.write_bytes(b"weights")
    fetch_base_adapter(_spec(base_adapter=str(folder)), tmp_path / "w2", "b" * 64)  # restored: fine again

    (folder / "_COMPLETE").unlink()
    with pytest.raises(StorageError, match="incomplete"):
        fetch_base_adapter(_spec(base_adapter=str(folder)), tmp_path / "w3", "b" * 64)


def test_another_base_or_another_lora_shape_is_a_spec_error_naming_each_field(tmp_path):
    from jobs.trainer.recipe import fetch_base_adapter

    version = _publish(tmp_path, config={**ADAPTER_CONFIG, "r": 32, "lora_alpha": 64, "use_rslora": True})
    uri = str(tmp_path / "store" / "sft" / version)
    with pytest.raises(SpecError) as err:
        fetch_base_adapter(_spec(base_adapter=uri), tmp_path / "w", "c" * 64)
    where = [p.where for p in err.value.problems]
    assert where == ["base_adapter", "lora.rank", "lora.alpha", "lora.use_rslora"], err.value
    text = str(err.value)
    assert "set lora.rank: 32" in text and "set lora.alpha: 64" in text and "set lora.use_rslora: true" in text
    assert "not on this run's base_model" in text
