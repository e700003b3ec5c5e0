"""Rows that max length changes are named, never lost silently: a row whose prompt alone is longer than
training.max_seq_length is dropped, one whose answer runs past it is kept with the answer cut there; each is a
warning in the run's log naming its lines and the fix, and its lines are in the published data report (training
rows and held-out rows apart). A max_seq_length above the base model's context is named too, with the length the
rows are cut at. The subject is the bookkeeping, not learning: the tiny random Llama (conftest's tiny_model_dir),
a folder as the object store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.train]

REPO = Path(__file__).resolve().parents[2]
LONG = " ".join(f"word{i}" for i in range(120))  # ~400 tokens: over 96


def test_rows_cut_or_dropped_at_max_length_are_named_in_the_log_and_the_data_report(tmp_path, tiny_model_dir):
    from jobs.storage import join, open_store

    rows = [{"instruction": f"Question number {i}: what colour is item {i}?", "output": f"Item {i} is blue."}
            for i in range(1, 41)]
    rows[4]["output"] = LONG                      # line 5: answer cut
    rows[9]["output"] = "Seven. " + LONG          # line 10: answer cut
    rows[14]["instruction"] = LONG                # line 15: prompt too long, dropped
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = [{"instruction": f"Held-out question {i}?", "output": "Green."} for i in range(1, 7)]
    held[2]["output"] = LONG                      # validation line 3: answer cut
    held[4]["instruction"] = LONG                 # validation line 5: dropped
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in held))
    spec = {"name": "cut-rows", "base_model": {"uri": str(tiny_model_dir), "max_context": 96},
            "dataset": {"train": str(train), "validation": str(val)}, "output": str(tmp_path / "store"),
            "data": {"min_rows": 8, "balance": False, "dedup_near": False},
            "training": {"max_seq_length": 128, "per_device_batch_size": 8, "gradient_accumulation_steps": 1,
                         "max_steps": 2, "early_stopping_patience": None},
            "eval": {"num_prompts": 1, "max_new_tokens": 4}, "merge": {"enabled": False}, "resources": {"gpus": 0}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2",
           "LAUNCHER_LOCAL_STATE_DIR": str(tmp_path / "state")}
    run = subprocess.run([sys.executable, "-m", "launcher", "submit", str(path), "--local"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    # the context: 128 asked, the model (by base_model.max_context) holds 96
    assert ("training.max_seq_length 128 is above the base model's context length 96 (base_model.max_context): "
            "rows are cut at 96 tokens") in out, out[-4000:]
    assert ("1 training row was dropped: the prompt alone is longer than max length 96 tokens (line 15); raise "
            "training.max_seq_length or shorten the prompts") in out, out[-4000:]
    assert ("2 training rows longer than max length 96 tokens: kept, with the answer cut there (lines 5 and 10); "
            "raise training.max_seq_length to keep them whole") in out, out[-4000:]
    assert ("1 validation row was dropped: the prompt alone is longer than max length 96 tokens (line 5)") in out
    assert ("1 validation row longer than max length 96 tokens: kept, with the answer cut there (line 3); raise "
            "training.max_seq_length to keep it whole") in out

    store, prefix = open_store(str(tmp_path / "store"))
    report = json.loads(store.get_bytes(join(prefix, "cut-rows", "v1", "data_report.json")))
    assert report["train"]["prompt_too_long"] == {"count": 1, "lines": [15]}
    assert report["train"]["answer_cut"] == {"count": 2, "lines": [5, 10]}
    assert report["validation"]["prompt_too_long"] == {"count": 1, "lines": [5]}
    assert report["validation"]["answer_cut"] == {"count": 1, "lines": [3]}
