"""metadata.json keeps its keys: users and tests read them. The list below is the hand-built dict's of
jobs/trainer/recipe.py before metadata became the typed RunMetadata (jobs/trainer/metadata.py), in its order;
keys added since are appended at its end."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from jobs.spec import parse_spec  # noqa: E402
from jobs.trainer import fastpath  # noqa: E402
from jobs.trainer.metadata import run_metadata  # noqa: E402
from jobs.trainer.train import TrainResult, TrainState  # noqa: E402

pytestmark = pytest.mark.unit

KEYS = {
    "run": None, "run_id": None, "spec_hash": None,
    "base_model": ["uri", "sha256", "fetch"],  # fetch: added with the node cache (jobs/model_cache.py), appended
    "lora": ["rank", "alpha", "dropout", "target_modules", "use_rslora", "use_dora"],
    "quantization": None,
    "training": ["epochs", "learning_rate", "weight_decay", "optimizer", "examples_per_step", "world_size",
                 "tokens_per_step", "tokens_per_micro_batch", "max_seq_length", "precision", "seed", "loss_scaling",
                 "gradient_checkpointing", "fp8", "fp8_recipe", "first_step_seconds", "compile_cache", "steps",
                 "planned_steps", "published_step", "best_val_loss", "stopped_early", "resumed_from_step",
                 "oom_backoffs", "train_seconds", "tokens_per_second", "tokens_per_second_steady",
                 "gpu_memory_budget_gib", "plan"],
    "dataset": ["train", "sha256", "rows_kept"],
    "metrics": ["train_loss_first", "train_loss_last", "val_loss_before", "val_loss_after", "perplexity_after"],
    "merged": None, "serving": None, "code_version": None, "image": None, "device": None, "torch": None,
    "started_at": None, "seconds": None, "stages": None, "cost": None,
    "held_out": None,  # added with promotion (jobs/promotion.py): appended, so every earlier key keeps its place
    "gguf": None,  # added with export.gguf (jobs/trainer/gguf_export.py)
    "base_adapter": None,  # added with spec.base_adapter (a run that starts from a published adapter)
}


def _metadata():
    from transformers import LlamaConfig

    spec = parse_spec({"name": "meta", "base_model": {"uri": "s3://models/m/"},
                       "dataset": {"train": "s3://data/train.jsonl"}, "output": "s3://runs/lora"})
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    plan = fastpath.plan(config, spec.training, torch.device("cpu"))
    plan.tokens_per_micro_batch = 1024
    state = TrainState(step=12, best_val=1.25, tokens_seen=9000, oom_backoffs=[{"step": 3, "from": 2048, "to": 1024}])
    result = TrainResult(state=state, total_steps=12, resumed_from=6, plan_notes=["a note"], seconds=61.26,
                         tokens_per_second=146.916, tokens_per_second_steady=150.04, examples_per_step=16,
                         tokens_per_step=750.04, val_loss=1.25, published_step=10, loss_scaling=False,
                         first_step_seconds=4.2)
    report = {"training": {"first_loss": 2.5, "last_loss": 1.1},
              "validation": {"loss_before": 2.4, "loss_after": 1.25, "perplexity_after": 3.49}}
    return run_metadata(spec, run_id="meta-abc", image=None, base_model_hash="f00",
                        report=report, data_report={"train": {"dataset_sha256": "d00", "kept_rows": 200}},
                        result=result, plan=plan, max_len=512, precision="fp32", world_size=2, compile_cache=None,
                        serving={"engine": "vllm"}, device=torch.device("cpu"), started_at=1.8e9,
                        stages={"fetch": {"seconds": 1.0, "peak_gpu_gib": None}},
                        cost=lambda seconds: {"seconds": round(seconds, 1)})


def test_metadata_json_has_exactly_the_keys_it_had_in_their_order():
    written = json.loads(_metadata().to_json())
    assert list(written) == list(KEYS)
    for key, inner in KEYS.items():
        if inner is not None:
            assert list(written[key]) == inner, key


def test_metadata_json_carries_the_run_s_values_rounded_as_before():
    m = json.loads(_metadata().to_json())
    t = m["training"]
    assert (t["tokens_per_step"], t["train_seconds"], t["tokens_per_second"], t["tokens_per_second_steady"]) == \
        (750.0, 61.3, 146.9, 150.0)
    assert (t["steps"], t["planned_steps"], t["published_step"], t["resumed_from_step"]) == (12, 12, 10, 6)
    assert t["world_size"] == 2 and t["tokens_per_micro_batch"] == 1024 and t["oom_backoffs"][0]["to"] == 1024
    assert m["base_model"] == {"uri": "s3://models/m/", "sha256": "f00", "fetch": None}
    assert m["base_adapter"] is None
    assert m["dataset"] == {"train": "s3://data/train.jsonl", "sha256": "d00", "rows_kept": 200}
    assert m["metrics"]["val_loss_before"] == 2.4 and m["device"] == "cpu" and m["started_at"] == "2027-01-15T08:00:00Z"
    assert m["cost"]["seconds"] == m["seconds"], "cost and seconds read one clock"
