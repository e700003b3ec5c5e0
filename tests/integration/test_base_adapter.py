"""A DPO run that starts from a published SFT adapter (`base_adapter:`), as a user runs one: SFT on the chosen
answers of examples/preference publishes v1; a DPO run names v1 as its base_adapter. Its training starts from v1's
weights, and v1 (frozen) is the reference of DPO's rewards, not the base: with a learning rate too small to move
the adapter, the published adapter is v1's weights and the held-out reward margin is ~0 (against the base it is
not: v1 moved the model). metadata.json records which version, by its manifest's sha256. A spec whose LoRA shape is
not v1's is refused before any weights load, naming the field and the fix. The subject is which weights a run
starts from and measures against, not what it learns: the tiny random Llama (conftest's tiny_model_dir), a folder
as the object store."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.train]

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "examples" / "preference"


def _submit(tmp_path: Path, spec: dict) -> subprocess.CompletedProcess:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2",
           "LAUNCHER_LOCAL_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run([sys.executable, "-m", "launcher", "submit", str(path), "--local"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def test_a_dpo_run_starts_from_a_published_sft_adapter_which_is_its_frozen_reference(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from jobs.publish import verify_version
    from jobs.storage import join, open_store

    pairs = [json.loads(line) for line in (PAIRS / "pairs.jsonl").read_text().splitlines()]
    pairs = [p for p in pairs if isinstance(p.get("prompt"), str) and isinstance(p["chosen"], str)][:32]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"instruction": p["prompt"], "output": p["chosen"]})
                                                + "\n" for p in pairs))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join((PAIRS / "heldout.jsonl").read_text().splitlines()[:12]) + "\n")
    store_dir = tmp_path / "store"
    common = {"base_model": {"uri": str(tiny_model_dir)}, "output": str(store_dir), "lora": {"rank": 8, "alpha": 16},
              "data": {"min_rows": 8, "balance": False}, "eval": {"num_prompts": 1, "max_new_tokens": 4},
              "merge": {"enabled": False}, "resources": {"gpus": 0}}
    loop = {"max_seq_length": 64, "per_device_batch_size": 8, "gradient_accumulation_steps": 1,
            "early_stopping_patience": None, "eval_interval_steps": 2}

    # v1: SFT on the chosen answers, at a learning rate that moves the model well away from the base
    sft = _submit(tmp_path, {**common, "name": "sft-first", "dataset": {"train": str(tmp_path / "sft.jsonl")},
                             "training": {**loop, "epochs": 2, "learning_rate": 5e-3}})
    assert sft.returncode == 0, (sft.stdout + sft.stderr)[-4000:]
    store, prefix = open_store(str(store_dir))
    v1 = join(prefix, "sft-first", "v1")
    v1_uri = str(store_dir / "sft-first" / "v1")

    # DPO from v1, with a learning rate that leaves the adapter where it started
    dpo_spec = {**common, "name": "dpo-from-sft", "base_adapter": v1_uri,
                "dataset": {"train": str(tmp_path / "pairs.jsonl"), "validation": str(heldout)},
                "training": {**loop, "method": "dpo", "learning_rate": 1e-9, "max_steps": 2}}
    dpo = _submit(tmp_path, dpo_spec)
    out = dpo.stdout + dpo.stderr
    assert dpo.returncode == 0, out[-4000:]
    assert "tensors loaded into the adapter; training starts from them" in out, out[-4000:]
    assert f"the base_adapter {v1_uri}, frozen" in out, out[-4000:]
    run = join(prefix, "dpo-from-sft")
    assert verify_version(store, run, "v1") == []

    meta = json.loads(store.get_bytes(join(run, "v1", "metadata.json")))
    v1_meta = json.loads(store.get_bytes(join(v1, "metadata.json")))
    assert meta["base_adapter"] == {
        "uri": v1_uri, "manifest_sha256": hashlib.sha256(store.get_bytes(join(v1, "manifest.json"))).hexdigest(),
        "base_model_sha256": v1_meta["base_model"]["sha256"]}

    # training started from v1's weights: after 2 steps at lr 1e-9 the published adapter is v1's
    ours = load_file(str(store_dir / "dpo-from-sft" / "v1" / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(store_dir / "sft-first" / "v1" / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    b_keys = [k for k in theirs if "lora_B" in k]
    assert max(float(theirs[k].abs().max()) for k in b_keys) > 1e-3, "v1's lora_B moved away from 0"
    assert all(float((ours[k] - theirs[k]).abs().max()) < 1e-5 for k in theirs)

    # v1 is the reference: the policy (still v1) has rewards ~0 against it; the base is only "before"
    pref = json.loads(store.get_bytes(join(run, "v1", "eval_report.json")))["preference"]
    assert pref["base_adapter"] == v1_uri, pref
    assert abs(pref["reward_margin_after"]) < 1e-3, pref
    assert pref["preference_accuracy_reference"] == pytest.approx(pref["preference_accuracy_after"], abs=1e-9), pref
    report = json.loads(store.get_bytes(join(run, "v1", "eval_report.json")))
    assert report["validation"]["loss_before"] == pytest.approx(0.6931, abs=1e-3)  # the base against itself

    # a LoRA shape other than v1's is refused before anything loads, with the field and the fix, no traceback
    bad = _submit(tmp_path, {**dpo_spec, "name": "dpo-wrong-rank", "lora": {"rank": 16, "alpha": 16}})
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0
    assert "lora.rank" in out and "set lora.rank: 8" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
