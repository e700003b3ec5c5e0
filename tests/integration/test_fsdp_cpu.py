"""FSDP2 sharding of the frozen base (``training.fsdp``) in the real job: ``torchrun --nproc-per-node 2``,
gloo on CPU, against the same spec run data parallel (every rank the whole base).

What each rank holds and loads is measured on the real SmolLM2-135M (its memory is the point: the tiny model's
weights, 12 MiB, would vanish in a rank's peak host memory), in one step without the eval. The rest is the ranks'
arithmetic and mechanics, not what is learned, proved on conftest's tiny_model_dir (SmolLM2's architecture and
vocabulary, randomly initialised): the agreement with data parallel (the loss curve, the checkpoint, a checkpoint
resumed across the two), the filler micro-batches, one version, and the eval on rank 0's copy of the whole base.

``fsdp: on`` shards on CPU too (``auto`` decides from GPU memory, and a CPU has no budget to plan
with), so the sharded path runs here as it would on GPUs: fully_shard per decoder layer and at the
root, reduce-scattered LoRA gradients, whole-adapter checkpoints gathered from the shards.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.train

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"

#: Per-step loss agreement, relative. Both runs compute the same fp32 sums over the same examples per
#: rank; only the order of the cross-rank sums differs (a reduce-scatter of world-scaled, globally
#: normalised gradients vs an all-reduce of token-weighted ones), which moves fp32 results by ~1e-7
#: relative a step and ~1e-6 after a few AdamW updates. 1e-4 is the neighbouring data-parallel test's
#: bound; a wrong weighting (a rank's own token mean, a missing average, gradients synced once per
#: micro-batch and summed twice) moves the loss after one update by more than 1e-3.
LOSS_RTOL = 1e-4


def _spec(tmp_path: Path, name: str, model_dir: Path, fsdp: str, evaluate: bool = False, steps: int = 3,
          validation: Path | None = None) -> Path:
    spec = {"name": name, "base_model": {"uri": str(model_dir)}, "dataset": {"train": str(DEMO / "train.jsonl")},
            "output": str(tmp_path / "store"),
            # 4 examples a step, 2 a rank in micro-batches of <= 128 tokens (the demo's rows are ~30-100): with
            # seed 0, step 1 packs rank 0's two rows into one micro-batch and rank 1's into two (and step 2 the
            # other way round), so a sharded rank runs a filler micro-batch; a checkpoint after step 2 of 3
            "training": {"max_steps": steps, "max_seq_length": 128, "per_device_batch_size": 1, "seed": 0,
                         "gradient_accumulation_steps": 2, "checkpoint_interval_steps": 2, "fsdp": fsdp},
            # no dropout: each rank's masks come from its own random stream (see test_distributed_cpu)
            "lora": {"dropout": 0.0},
            "eval": {"enabled": evaluate, "num_prompts": 2, "max_new_tokens": 16, "temperature": 0.0},
            "merge": {"enabled": False}, "resources": {"gpus": 0}}
    if validation is not None:
        spec["dataset"]["validation"] = str(validation)
    path = tmp_path / f"{name}-{fsdp}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _job(tmp_path: Path, spec: Path, attempt: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TERMINATION_MESSAGE_PATH": str(tmp_path / f"{attempt}.termination")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "jobs", "run", "--spec", str(spec), "--workdir", str(tmp_path / f"work-{attempt}")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / f"{attempt}.termination").read_text())["exit_code"] == 0
    return proc


def _losses(log: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+)/\d+  loss ([0-9.]+)", log)}


def _close(a: dict[int, float], b: dict[int, float], steps) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= LOSS_RTOL * abs(b[s]), (s, a, b)


def test_fsdp_shards_the_base_so_no_rank_but_0_ever_holds_it_whole_and_publishes_once(tmp_path, small_model_dir):
    from jobs.publish import existing_versions
    from jobs.storage import LocalStore

    # sharded from step 0: each rank holds half of the model, one version is published. What is measured here is the
    # load and what each rank holds: one step, no eval, two validation rows (the whole model's validation of the
    # demo's 17 held-out rows took as long as a step, twice); the rest is the next test's, on the tiny model
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in (
        {"instruction": "Does the Acme Router X2 have a guest network?", "output": "Yes: Settings > Wi-Fi > Guest."},
        {"instruction": "Reset the router?", "output": "Hold the reset button for ten seconds."})))
    fs = _job(tmp_path, _spec(tmp_path, "fs", small_model_dir, "on", steps=1, validation=val), "fs").stderr
    held = {int(m[1]): (int(m[2]), int(m[3])) for m in re.finditer(
        r"FSDP2: the base is sharded over 2 ranks; rank (\d) holds (\d+) of (\d+) parameters", fs)}
    assert set(held) == {0, 1}, fs[-3000:]
    total = held[0][1]
    assert total > 130_000_000  # SmolLM2-135M (its tied embeddings counted once) plus LoRA
    for rank, (mine, _) in held.items():
        assert 0.49 * total <= mine <= 0.51 * total, held  # each rank about half
    assert held[0][0] + held[1][0] >= total  # shards cover everything (FSDP pads uneven dims)
    assert "FSDP2: rank 0 holds the whole base again (on cpu) with the gathered adapter of step 1" in fs
    # no rank but 0 ever held the whole base: rank 1 built it on the meta device and received only its
    # shards; rank 0 read it into host memory, once (its copy is what it evaluates and merges at the end)
    loaded = {int(m[1]): (int(m[2]), float(m[3])) for m in re.finditer(
        r"FSDP2: rank (\d) built the base on the meta device and took its shards of (\d+) tensors .* "
        r"peak host memory of this rank ([0-9.]+) GiB", fs)}
    assert set(loaded) == {0, 1} and loaded[0][0] == loaded[1][0] > 30 * 7 * 3, loaded
    base_gib = 134_515_008 * 4 / 2**30  # SmolLM2-135M's weights in fp32 (the CPU precision)
    assert loaded[1][1] < loaded[0][1] - 0.75 * base_gib, (loaded, base_gib)
    first = {int(m[2]): (int(m[1]), int(m[3])) for m in re.finditer(
        r"FSDP2 step 1: (\d+) micro-batches on rank (\d) and (\d+) filler", fs)}
    assert set(first) == {0, 1}, first  # both ranks ran the sharded step (its fillers: the next test)
    store = LocalStore(str(tmp_path / "store"))
    assert existing_versions(store, "fs") == {1: True}, "rank 0 alone publishes, once"
    meta = json.loads(store.get_bytes("fs/v1/metadata.json"))
    assert meta["training"]["world_size"] == 2 and any(n.startswith("FSDP2: ") for n in meta["training"]["plan"])
    print(f"\nFSDP2 held per rank {held}, first step micro-batches (n, filler) {first}\n"
          f"(tensors, peak host GiB) per rank after loading {loaded}")


def test_fsdp_trains_like_data_parallel_and_checkpoints_cross_over(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from jobs.publish import existing_versions
    from jobs.storage import LocalStore

    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    store = LocalStore(str(tmp_path / "store"))
    # 1. sharded from step 0, with the ranks' micro-batches as unequal as on the real model (the same tokenizer,
    #    rows and packing), so rank 1 runs a filler micro-batch in step 1; with the eval
    fs = _job(tmp_path, _spec(tmp_path, "fs", tiny_model_dir, "on", evaluate=True), "fs").stderr
    first = {int(m[2]): (int(m[1]), int(m[3])) for m in re.finditer(
        r"FSDP2 step 1: (\d+) micro-batches on rank (\d) and (\d+) filler", fs)}
    assert set(first) == {0, 1} and max(n for n, _ in first.values()) >= 2, first  # accumulation in the step
    # ranks with unequal micro-batches: the one with fewer runs fillers (each forward gathers the shards from
    # every rank), whose loss counts for nothing: the loss curve below still matches the data-parallel run's
    assert sorted(first.values()) == [(1, 1), (2, 0)], first
    assert existing_versions(store, "fs") == {1: True}, "rank 0 alone publishes, once"
    # after training, rank 0 alone holds the whole base again with the gathered adapter and generates on it, with
    # the adapter switched off and on (the tiny random model's answers may be empty: that they ran is the point)
    whole = fs.index("FSDP2: rank 0 holds the whole base again (on cpu) with the gathered adapter of step 3")
    assert whole < fs.index("generating 1-2 of 2 (base model)") < fs.index("generating 1-2 of 2 (with adapter)"), \
        fs[-3000:]
    gens = json.loads(store.get_bytes("fs/v1/eval_report.json"))["generations"]
    assert len(gens) == 2 and all(isinstance(g["before"], str) and isinstance(g["after"], str) for g in gens), gens

    # 2. the same spec data parallel (fsdp: off): the same loss curve
    ddp = _job(tmp_path, _spec(tmp_path, "ddp", tiny_model_dir, "off"), "ddp").stderr
    assert "FSDP2" not in ddp
    l_fs, l_ddp = _losses(fs), _losses(ddp)
    assert sorted(l_fs) == sorted(l_ddp) == [1, 2, 3], (l_fs, l_ddp)
    _close(l_fs, l_ddp, [1, 2, 3])
    # the base's validation loss, measured sharded with the fresh adapter in place (lora_B is 0), is the
    # unsharded base's
    before = {n: json.loads(store.get_bytes(f"{n}/v1/metadata.json"))["metrics"]["val_loss_before"]
              for n in ("fs", "ddp")}
    assert before["fs"] is not None and abs(before["fs"] - before["ddp"]) <= LOSS_RTOL * before["ddp"], before
    print(f"\nlosses sharded {l_fs}\nlosses data parallel {l_ddp}")

    # 3. the sharded run's checkpoint is the whole adapter and optimizer state an unsharded run writes.
    #    AdamW's first moment is 0.1 x the gradient after one step: it checks the reduce-scattered gradients'
    #    weighting directly (Adam's update, and so the loss, hardly sees a gradient's scale). Per tensor the
    #    two agree to ~2e-6 (the median, fp32 sums in another order); a few lora_A tensors, whose gradients
    #    are small differences of large products (lora_B is 0 at step 1, ~lr after it), to ~1e-3. A rank
    #    weighted by its own token mean instead of the step's, or a gradient summed once too often, is off
    #    by more than 1e-1.
    def checkpoint(name: str) -> Path:
        [prefix] = store.list_dirs(f"{name}/checkpoints")
        local = tmp_path / f"ckpt-{name}"
        for f in ("adapter.safetensors", "optimizer.safetensors"):
            local.mkdir(exist_ok=True)
            (local / f).write_bytes(store.get_bytes(f"{name}/checkpoints/{prefix}/step-000002/{f}"))
        return local

    c_fs, c_ddp = checkpoint("fs"), checkpoint("ddp")
    for f in ("adapter.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(c_fs / f)), load_file(str(c_ddp / f))
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), f
        rel = {k: float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)) for k in a
               if a[k].is_floating_point() and not k.startswith("rng.") and a[k].dim() > 0}
        assert len(rel) >= 2 * layers * 7, (f, len(rel))  # every LoRA tensor: A and B of 7 projections a layer
        assert sorted(rel.values())[len(rel) // 2] <= 1e-4 and max(rel.values()) <= 1e-2, \
            (f, sorted(rel.items(), key=lambda kv: kv[1])[-3:])
        print(f"{f}: {len(rel)} tensors, relative difference median {sorted(rel.values())[len(rel) // 2]:.1e}, "
              f"max {max(rel.values()):.1e}")

    # 4. the data-parallel run's checkpoint resumes sharded (a new attempt of the same run with fsdp: on):
    #    step 3 again, from the same state, the same loss
    again = _job(tmp_path, _spec(tmp_path, "ddp", tiny_model_dir, "on"), "ddp-again").stderr
    assert again.count("resumed from checkpoint at step 2 of 3") == 2, again[-3000:]
    assert "FSDP2: the base is sharded over 2 ranks" in again
    resumed = _losses(again)
    assert sorted(resumed) == [3], resumed
    _close(resumed, l_ddp, [3])
    print(f"resumed sharded from the data-parallel checkpoint: {resumed}")
    assert existing_versions(store, "ddp") == {1: True, 2: True}


def test_a_base_that_will_not_load_on_rank_0_fails_every_rank_with_the_reason_not_a_lost_peer(tmp_path,
                                                                                             small_model_dir):
    # config.json and the tokenizer are fine (the plan and the meta-device model come from them), the
    # weights are not: only rank 0 reads them. Every rank must end with rank 0's reason (exit 11, not
    # retried), well inside the 300 s after which a rank waiting in a collective would call its peer lost.
    broken = tmp_path / "broken-base"
    broken.mkdir()
    for f in small_model_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TERMINATION_MESSAGE_PATH": str(tmp_path / "broken.termination")}
    logs = tmp_path / "rank-logs"  # torchrun writes each rank's stderr to a file of its own
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--log-dir={logs}", "--redirects=2",
           "-m", "jobs", "run", "--spec", str(_spec(tmp_path, "broken", broken, "on")),
           "--workdir", str(tmp_path / "work-broken")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode != 0
    per_rank = {int(f.parent.name): f.read_text() for f in logs.rglob("stderr.log")}
    assert set(per_rank) == {0, 1}, (sorted(logs.rglob("*")), proc.stderr[-2000:])
    for rank, text in per_rank.items():
        assert re.search(r"the base model in \S+ could not be loaded", text), (rank, text[-2000:])
        assert "lost a peer" not in text and "Traceback" not in text, (rank, text[-2000:])
    message = json.loads((tmp_path / "broken.termination").read_text())
    assert message["exit_code"] == 11 and "could not be loaded" in message["message"], message
