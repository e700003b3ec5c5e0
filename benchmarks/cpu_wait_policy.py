"""How torch's OpenMP threads should wait, measured through the CPU job: libgomp's default (spin ~300k
rounds, then sleep), a short spin (GOMP_SPINCOUNT=10000) and OMP_WAIT_POLICY=PASSIVE (sleep at once), on
a quiet machine and beside one busy process.

Each run is the job itself (`launcher submit --local`, as `make demo` runs it) on SmolLM2-135M with the
demo's data: 10 steps of 4 examples, 2 generations before and after, the merge. The numbers are the
seconds per stage from the published version's metadata.json, the wall time and the CPU time the job used.
The job sets neither variable (the result, README "Speed"): a user's own value reaches a --local run.

Usage: python benchmarks/cpu_wait_policy.py MODEL_DIR [ROUNDS]   (~1 min a run, 6 runs a round)
       WAIT_POLICIES="GOMP_SPINCOUNT=10000" ... runs only the named policies
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
POLICIES = {"libgomp default (GOMP_SPINCOUNT=300000)": {"GOMP_SPINCOUNT": "300000"},
            "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
            "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}
if os.environ.get("WAIT_POLICIES"):  # a subset by name, comma-separated
    POLICIES = {k: v for k, v in POLICIES.items() if k in os.environ["WAIT_POLICIES"].split(",")}


def run_job(model_dir: str, work: Path, extra_env: dict) -> dict:
    spec = {"name": "waitbench", "base_model": {"uri": model_dir},
            "dataset": {"train": str(REPO / "examples" / "demo" / "train.jsonl"), "validation_split": 0.1},
            "output": str(work / "store"),
            "training": {"max_steps": 10, "max_seq_length": 256, "per_device_batch_size": 4,
                         "gradient_accumulation_steps": 1, "eval_interval_steps": 10, "checkpoint_interval_steps": 50},
            "eval": {"num_prompts": 2, "max_new_tokens": 32}, "merge": {"enabled": True}, "resources": {"gpus": 0}}
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(extra_env, PYTHONPATH=str(REPO))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "launcher", "submit", str(work / "spec.yaml"), "--local",
                        "--workdir", str(work / "w")], env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"the job failed ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    meta = json.loads((work / "store" / "waitbench" / "v1" / "metadata.json").read_text())
    stages = {k: v["seconds"] for k, v in meta["stages"].items()}
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), **stages}


def main() -> None:
    model_dir = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    rows = []
    for rnd in range(rounds):
        for load in ("quiet", "one busy process"):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "quiet" else None
            try:
                for name, extra in POLICIES.items():
                    with tempfile.TemporaryDirectory() as tmp:
                        res = run_job(model_dir, Path(tmp), extra)
                    rows.append({"round": rnd + 1, **res, "beside": load, "policy": name})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                if hog:
                    hog.kill()
                    hog.wait()
    cols = ("wall", "cpu", "load", "train", "evaluate", "merge")
    print(f"\n{'beside the job':18} {'wait policy':42} " + " ".join(f"{c:>9}" for c in cols) + "   (seconds; median of rounds)")
    for load in ("quiet", "one busy process"):
        base = None
        for name in POLICIES:
            sel = [r for r in rows if r["beside"] == load and r["policy"] == name]
            med = {c: sorted(r[c] for r in sel)[len(sel) // 2] for c in cols}
            line = f"{load:18} {name:42} " + " ".join(f"{med[c]:9.1f}" for c in cols)
            if base is None:
                base = med
            else:
                line += f"   wall {base['wall'] / med['wall']:.2f}x faster, train {base['train'] / med['train']:.2f}x"
            print(line)


if __name__ == "__main__":
    main()
