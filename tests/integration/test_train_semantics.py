"""What a step is, when validation runs, which adapter is published, and how divergence fails:
the real job (``jobs.trainer.recipe.run`` / ``python -m jobs run``) on CPU, local folders as the store. The
steps' arithmetic and early stopping's choice of adapter are the recipe's, not what is learned: they run on
conftest's tiny_model_dir (SmolLM2's architecture and vocabulary, randomly initialised).

The first test runs the spec's training defaults: nothing about batches, micro-batches,
accumulation or evaluation intervals is forced.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.train

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"


def _run(spec: dict, tmp_path: Path) -> dict:
    from jobs.trainer.recipe import run
    from jobs.spec import parse_spec

    return run(parse_spec(spec), tmp_path / "work")


def test_default_spec_steps_are_sixteen_examples_and_validation_runs_several_times_an_epoch(
        tmp_path, tiny_model_dir):
    from jobs.storage import LocalStore

    # the base is a tiny random model of SmolLM2's architecture (conftest's tiny_model_dir): a base model is the
    # user's choice, not a training default, and the subject here is the steps, not what is learned
    spec = {"name": "defaults", "base_model": {"uri": str(tiny_model_dir)},
            "dataset": {"train": str(DEMO / "train.jsonl")}, "output": str(tmp_path / "store"),
            "resources": {"gpus": 0},
            # only the evaluation's generations are shortened: they are not what this test is about
            "eval": {"num_prompts": 2, "max_new_tokens": 16}}
    meta = _run(spec, tmp_path)
    report = json.loads(LocalStore(str(tmp_path / "store")).get_bytes("defaults/v1/eval_report.json"))
    history = report["training"]["history"]
    data_report = json.loads(LocalStore(str(tmp_path / "store")).get_bytes("defaults/v1/data_report.json"))
    n_train = data_report["split"]["train_rows"]
    t = meta["training"]
    assert t["examples_per_step"] == 16
    assert [h["examples"] for h in history[:-1]] == [16] * (len(history) - 1)
    assert sum(h["examples"] for h in history) == n_train, "one epoch: every training row once"
    assert len(history) == t["steps"] == -(-n_train // 16)
    evals = report["training"]["evals"]
    assert len(evals) >= 4, f"validation several times an epoch, not once at the end: {evals}"
    assert history[0]["lr"] < max(h["lr"] for h in history), "a warm-up on a short run"
    assert t["tokens_per_step"] > 0 and t["published_step"] in [e["step"] for e in evals]


def _contradicting_data(tmp_path: Path) -> tuple[Path, Path]:
    """Train on one answer, validate on its opposite: validation loss must rise as training goes on. Every
    training answer is "Blue.", every validation answer "Green.": the answer's form (a word, a full stop, the
    end) helps both, learning that it is blue hurts the other; a rule a tiny model learns in a few steps."""
    items = ["router", "switch", "modem", "cable", "antenna", "adapter", "charger", "bridge", "hub", "repeater"]
    train, val = [], []
    for item in items:
        for j in range(4):
            q = f"What colour is the status light of the {item} in room {j + 1}?"
            train.append({"instruction": q, "output": "Blue."})
            if j == 0:
                val.append({"instruction": q, "output": "Green."})
    tp, vp = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    tp.write_text("".join(json.dumps(r) + "\n" for r in train))
    vp.write_text("".join(json.dumps(r) + "\n" for r in val))
    return tp, vp


def test_early_stopping_publishes_the_best_adapter_not_the_last(tmp_path, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jobs.trainer.modelio import load_tokenizer
    from jobs.storage import LocalStore
    from jobs.trainer.strategies import SingleDevice
    from jobs.trainer.train import encode_rows, evaluate_loss

    tp, vp = _contradicting_data(tmp_path)
    # The tiny random model at 50 times the guide's learning rate (a warning, not an error): validation loss falls,
    # then rises once "Blue" wins (measured, seeds 1-4 and 42: stopped after 8-12 of 30 steps, the last adapter
    # 0.1-0.4 nats worse than the best; SmolLM2-135M at 1e-3 on the same data: 10 steps, +2.4 nats, 38 s in all)
    spec = {"name": "early", "base_model": {"uri": str(tiny_model_dir)},
            "dataset": {"train": str(tp), "validation": str(vp)}, "output": str(tmp_path / "store"),
            "training": {"epochs": 3, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
                         "learning_rate": 1e-2, "eval_interval_steps": 2, "early_stopping_patience": 2,
                         "max_seq_length": 96},
            "data": {"min_rows": 4, "balance": False},
            "eval": {"enabled": False}, "merge": {"enabled": False}, "resources": {"gpus": 0}}
    meta = _run(spec, tmp_path)
    store = LocalStore(str(tmp_path / "store"))
    report = json.loads(store.get_bytes("early/v1/eval_report.json"))
    evals = report["training"]["evals"]
    best = min(evals, key=lambda e: e["val_loss"])
    t = meta["training"]
    assert t["stopped_early"], f"validation loss on contradicting answers rose: {evals}"
    assert t["published_step"] == best["step"] < t["steps"], (t, evals)
    assert report["training"]["published_step"] == best["step"]

    # the published adapter really is that step's: its validation loss is the best one
    tok = load_tokenizer(str(tiny_model_dir))
    from jobs.dataprep import prepare as prep_rows
    from jobs.spec import parse_spec

    rows = prep_rows(vp.read_bytes(), parse_spec(spec).data.model_copy(update={"min_rows": 1}), seed=42).rows
    val_ex, _ = encode_rows(tok, rows, 96)
    store.get_file("early/v1/adapter/adapter_model.safetensors", tmp_path / "dl" / "adapter_model.safetensors")
    store.get_file("early/v1/adapter/adapter_config.json", tmp_path / "dl" / "adapter_config.json")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "dl")).eval()
    got = evaluate_loss(model, val_ex, 4096, SingleDevice(device=torch.device("cpu"))).mean
    assert abs(got - best["val_loss"]) < 2e-3, (got, best, evals[-1])
    assert got < evals[-1]["val_loss"] - 1e-2, "the last adapter was clearly worse than the published one"


def test_a_diverging_loss_exits_14_with_a_sentence_and_publishes_nothing(tmp_path, small_model_dir):
    """A base model whose weights overflow (a corrupted checkpoint) makes the loss NaN."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs.trainer.modelio import load_tokenizer

    tok = load_tokenizer(str(small_model_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    base = tmp_path / "overflowing-model"
    model.save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    spec = {"name": "nan", "base_model": {"uri": str(base)}, "dataset": {"train": str(DEMO / "train.jsonl")},
            "output": str(tmp_path / "store"), "eval": {"enabled": False}, "resources": {"gpus": 0}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    tmsg = tmp_path / "termination-log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERMINATION_MESSAGE_PATH": str(tmsg)}
    proc = subprocess.run([sys.executable, "-m", "jobs", "run", "--spec", str(path), "--workdir",
                           str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 14, proc.stderr[-3000:]
    msg = json.loads(tmsg.read_text())
    assert msg["exit_code"] == 14 and msg["stage"] == "train"
    assert "the training loss became nan at step 1" in msg["message"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store" / "nan" / "v1").exists()
