"""Data parallel through PyTorch's own launcher: the real job under ``torchrun --nproc-per-node 2``
(gloo on CPU, SmolLM2-135M) against the same job in one process.

Same examples per optimizer step, the same loss curve (the gradients are summed across ranks
weighted by target tokens, so a step's loss is the same token mean), and exactly one version,
published by rank 0.
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


def _job(tmp_path: Path, name: str, model_dir: Path, nproc: int) -> tuple[subprocess.CompletedProcess, Path]:
    spec = {"name": name, "base_model": {"uri": str(model_dir)}, "dataset": {"train": str(DEMO / "train.jsonl")},
            "output": str(tmp_path / "store"), "training": {"max_steps": 4, "max_seq_length": 256},
            # no LoRA dropout: its masks come from each process's own random stream, so with it the
            # two runs could only agree statistically; without it they must agree to rounding
            "lora": {"dropout": 0.0},
            "eval": {"enabled": False}, "merge": {"enabled": False}, "resources": {"gpus": 0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    tmsg = tmp_path / f"{name}.termination"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERMINATION_MESSAGE_PATH": str(tmsg), "OMP_NUM_THREADS": "1"}
    job = ["-m", "jobs", "run", "--spec", str(path), "--workdir", str(tmp_path / f"work-{name}")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *job]
    else:
        cmd = [sys.executable, *job]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO), tmsg


def test_two_processes_train_like_one_and_publish_one_version(tmp_path, small_model_dir):
    from jobs.publish import existing_versions
    from jobs.storage import LocalStore

    one, _ = _job(tmp_path, "one", small_model_dir, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two, tmsg = _job(tmp_path, "two", small_model_dir, 2)
    assert two.returncode == 0, two.stderr[-4000:]
    assert json.loads(tmsg.read_text())["exit_code"] == 0
    assert "rank 1 of 2" in two.stderr and "rank 1: training done; rank 0 publishes" in two.stderr

    store = LocalStore(str(tmp_path / "store"))
    assert existing_versions(store, "two") == {1: True}, "rank 0 alone publishes, once"
    meta = json.loads(store.get_bytes("two/v1/metadata.json"))
    assert meta["training"]["world_size"] == 2 and meta["training"]["examples_per_step"] == 16

    def history(run):
        return json.loads(store.get_bytes(f"{run}/v1/eval_report.json"))["training"]["history"]

    h1, h2 = history("one"), history("two")
    assert [h["examples"] for h in h2] == [h["examples"] for h in h1] == [16] * 4
    assert [h["tokens"] for h in h2] == [h["tokens"] for h in h1], "the same examples in every step"
    for a, b in zip(h1, h2):  # the same token-mean loss; fp32 sums in another order
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (h1, h2)


def test_under_torchrun_the_job_still_exits_with_its_own_code(tmp_path, small_model_dir, monkeypatch):
    """torchrun exits 1 whatever its workers did; the job's relaunch maps it back (11: bad data,
    never retried) from the termination message rank 0 wrote."""
    from jobs.distributed import relaunch

    spec = {"name": "too-few", "base_model": {"uri": str(small_model_dir)},
            "dataset": {"train": str(DEMO / "train.jsonl")}, "output": str(tmp_path / "store"),
            "data": {"min_rows": 100000}, "resources": {"gpus": 0}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    tmsg = tmp_path / "termination"
    tmsg.write_text('{"exit_code": 0}')  # a stale message from an earlier run must not count
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(tmsg))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(REPO)
    code = relaunch(2, ["run", "--spec", str(path), "--workdir", str(tmp_path / "work")])
    assert code == 11
    msg = json.loads(tmsg.read_text())
    assert msg["exit_code"] == 11 and msg["stage"] == "prepare"
