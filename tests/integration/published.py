"""What the end-to-end tests share: the small CPU run they ask for, what they check of its version, how they read MLflow."""
from __future__ import annotations

import json
import urllib.parse
import urllib.request

REQUIRED = ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged/config.json",
            "tokenizer/tokenizer.json", "metadata.json", "data_report.json", "eval_report.json",
            "eval_report.md", "eval_report.html", "loss_curve.png", "manifest.json", "_COMPLETE")


def assert_complete_v1(store, run_prefix: str) -> set[str]:
    """v1 is `latest`, verifies against its manifest and marker, and holds every artifact; returns its keys."""
    from jobs.publish import verify_version

    assert store.get_bytes(f"{run_prefix}/latest").decode().strip() == "v1"
    assert verify_version(store, run_prefix, "v1") == [], "every file matches manifest.json and the marker"
    keys = {o.key[len(run_prefix) + 4:] for o in store.list(f"{run_prefix}/v1/")}
    for needed in REQUIRED:
        assert needed in keys, f"{needed} missing from the published version"
    assert any(k.startswith("tensorboard/events.out.tfevents.") for k in keys), "TensorBoard event file missing"
    return keys


def small_cpu_spec(name: str, model_uri: str, train_uri: str, output: str, **training) -> dict:
    """SmolLM2 on CPU in a few steps. 2 epochs over a dozen rows: the second pass sees the same
    tokens, so its mean loss falling below the first's is a deterministic sign of learning."""
    return {
        "name": name,
        "base_model": {"uri": model_uri},
        "dataset": {"train": train_uri, "validation_split": 0.15},
        "output": output,
        "lora": {"rank": 16, "alpha": 32},
        "training": {"epochs": 2, "max_seq_length": 128, "per_device_batch_size": 4,
                     "gradient_accumulation_steps": 1, "eval_interval_steps": 2, "checkpoint_interval_steps": 2,
                     "early_stopping_patience": None, **training},
        "data": {"min_rows": 8, "balance": False},
        "eval": {"num_prompts": 2, "max_new_tokens": 16},
        "merge": {"enabled": True},
        "resources": {"gpus": 0},
    }


def cpu_spec(name: str, model_uri: str, train_uri: str, output: str, memory: str = "6Gi", cpu: str = "2",
             **training) -> dict:
    """small_cpu_spec sized for the stack's real node (2 CPUs)."""
    spec = small_cpu_spec(name, model_uri, train_uri, output, **training)
    spec["resources"] = {"gpus": 0, "cpu": cpu, "memory": memory, "scratch": "4Gi"}
    return spec


def lean(spec: dict) -> dict:
    """Training only (no generations, no merge): for tests whose subject is the pod or the chart, not the
    artifacts the e2e test already checks. The node has 2 CPUs; this saves a minute a run."""
    spec["eval"] = {"enabled": False}
    spec["merge"] = {"enabled": False}
    return spec


def train_jsonl(rows: int = 16) -> bytes:
    """A tiny instruction dataset (JSON lines) for the real-node runs."""
    return "\n".join(json.dumps({"instruction": f"What is the status light number {i} on the Acme X{i}?",
                                 "output": f"Light {i} on the Acme X{i} means the router is updating; wait {i} minutes."})
                     for i in range(rows)).encode()


def mlflow_get(uri: str, endpoint: str, **query) -> dict:
    """A GET of MLflow's REST API, as any MLflow client would make it."""
    url = f"{uri}/api/2.0/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def find_run(uri: str, experiment: str) -> dict:
    """The one run of ``experiment``: {"info", "data"}."""
    exp_id = mlflow_get(uri, "mlflow/experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", method="POST",
                                 data=json.dumps({"experiment_ids": [exp_id]}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        runs = json.loads(resp.read()).get("runs", [])
    assert len(runs) == 1, runs
    return runs[0]
