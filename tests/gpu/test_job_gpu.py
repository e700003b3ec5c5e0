"""The whole job on a GPU (skipped without CUDA): ``jobs.trainer.recipe.run`` with the spec's training
defaults, on random-weight Llamas with SmolLM2's tokenizer (no hub here), a local folder as store.

* fp16 (T4/V100-class GPUs, where ``precision: auto`` picks fp16): trains with loss scaling.
* the out-of-memory back-off: this process's GPU memory is capped at 8 GiB
  (``torch.cuda.set_per_process_memory_fraction``), which the planner does not see, so the planned
  micro-batch really fails; the step is
  retried with smaller micro-batches of the same examples and the run publishes.
* FP8 (``training.fp8: on``, where the GPU has FP8): trains, merges, publishes; the same run again
  finds the compile cache its first run saved next to the checkpoints.

The 8B-scale runs are benchmarks/gpu_acceptance.sh. Run: ``LORA_GPU_TOKENIZER=path pytest tests/gpu``.
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from jobs.trainer import fastpath  # noqa: E402
from jobs.trainer.modelio import load_tokenizer  # noqa: E402
from jobs.publish import verify_version  # noqa: E402
from jobs.trainer.recipe import run  # noqa: E402
from jobs.spec import parse_spec  # noqa: E402
from jobs.storage import LocalStore  # noqa: E402

pytestmark = pytest.mark.gpu

TOKENIZER = Path(os.environ.get("LORA_GPU_TOKENIZER")
                 or Path.home() / ".cache/lora-jobs/models/smollm2-135m-instruct")


def _model(tmp_path_factory, name, **shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(TOKENIZER))
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    return _model(tmp_path_factory, "small-llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4)


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    return _model(tmp_path_factory, "llama-1b", hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Learnable rows with the peer's lengths (lognormal, median ~350 tokens)."""
    rng = random.Random(0)
    rows = []
    for i in range(400):
        n = min(1500, max(24, int(math.exp(rng.gauss(math.log(250), 0.7)))))
        colour = ["green", "amber", "red", "blue"][i % 4]
        steps = " ".join(f"Step {k + 1}: hold the button for {k + 2} seconds until the light is {colour}."
                         for k in range(max(1, n // 18)))
        rows.append({"instruction": f"Ticket {i}: how do I reset router model {i % 37}?", "output": steps})
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path, model_dir, data, name, **sections):
    spec = {"name": name, "base_model": {"uri": str(model_dir)}, "dataset": {"train": str(data)},
            "output": str(tmp_path / "store"), "eval": {"num_prompts": 2, "max_new_tokens": 16}, **sections}
    meta = run(parse_spec(spec), tmp_path / "work")
    store = LocalStore(str(tmp_path / "store"))
    assert verify_version(store, name, "v1") == [], "the version is complete and verifies"
    return meta, json.loads(store.get_bytes(f"{name}/v1/eval_report.json"))


def test_fp16_trains_with_loss_scaling_and_publishes(tmp_path, small_llama, data):
    meta, report = _run(tmp_path, small_llama, data, "fp16", training={"precision": "fp16", "epochs": 2})
    t = meta["training"]
    assert t["precision"] == "fp16" and t["loss_scaling"] is True
    assert t["examples_per_step"] == 16
    losses = [h["loss"] for h in report["training"]["history"]]
    assert all(math.isfinite(x) for x in losses)
    assert meta["metrics"]["val_loss_after"] < meta["metrics"]["val_loss_before"] - 0.5, meta["metrics"]
    assert report["merge"]["ok"] and report["merge"]["dtype"] == "fp16"


def test_out_of_memory_halves_the_micro_batch_and_the_run_still_publishes(tmp_path, llama_1b, data):
    # As if another tenant held the rest of the card: this process may allocate 8 GiB. The planner sizes from the
    # free memory the driver reports, which the cap does not change, so the planned micro-batch really fails.
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 8 * 2**30 / total), 0)
    try:
        meta, report = _run(tmp_path, llama_1b, data, "oom", training={"max_steps": 8})
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    t = meta["training"]
    assert t["oom_backoffs"], "the planned micro-batch did not fit under the cap"
    first = t["oom_backoffs"][0]
    assert first["to"] < first["from"] <= 8192
    assert t["steps"] == 8 and t["examples_per_step"] == 16
    assert [h["examples"] for h in report["training"]["history"]] == [16] * 8, "the same examples per step"
    assert t["tokens_per_micro_batch"] > first["to"], "the plan did not know about the cap: it really failed"


def test_fp8_trains_through_the_job_publishes_and_a_rerun_starts_from_the_compile_cache(tmp_path, small_llama,
                                                                                        data, monkeypatch):
    if not fastpath.fp8_support(torch.device("cuda"))[0]:
        pytest.skip(f"no FP8 here: {fastpath.fp8_support(torch.device('cuda'))[1]}")
    monkeypatch.setenv("LORA_JOBS_COMPILE_CACHE_KEY", "gpu-test")
    meta, report = _run(tmp_path, small_llama, data, "fp8", training={"fp8": "on", "max_steps": 12})
    t = meta["training"]
    assert t["fp8"] is True and any(n.startswith("FP8 (") for n in t["plan"])
    assert all(math.isfinite(h["loss"]) for h in report["training"]["history"])
    assert meta["metrics"]["val_loss_after"] < meta["metrics"]["val_loss_before"] - 0.5, meta["metrics"]
    assert report["merge"]["ok"], report["merge"]
    assert t["compile_cache"]["outcome"].startswith("cold") and t["compile_cache"]["saved_bytes"] > 0
    # the same run again (its next version): the cache saved next to the checkpoints is found and loaded
    again = run(parse_spec({"name": "fp8", "base_model": {"uri": str(small_llama)}, "dataset": {"train": str(data)},
                            "output": str(tmp_path / "store"), "eval": {"enabled": False},
                            "training": {"fp8": "on", "max_steps": 12, "seed": 7}}), tmp_path / "work2")
    assert again["version"] == "v2" and again["training"]["compile_cache"]["outcome"] == "warm"
