"""GPU-only paths of the job (skipped without CUDA): bf16 LoRA through the fast path, and
QLoRA (4-bit NF4) trained, checkpointed, restored and merged into the base reloaded in 16 bit.

A tiny random Llama with SmolLM2's tokenizer stands in for a real model (no hub here);
the tokenizer folder comes from LORA_GPU_TOKENIZER (default: the converted SmolLM2).
Run: ``LORA_GPU_TOKENIZER=path python -m pytest -q tests/gpu/test_recipe_gpu.py``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from jobs.trainer import fastpath  # noqa: E402
from jobs.trainer.merge import merge_and_check  # noqa: E402
from jobs.trainer.modelio import load_model, load_tokenizer, resolve_precision  # noqa: E402
from jobs.spec import parse_spec  # noqa: E402
from jobs.storage import LocalStore  # noqa: E402
from jobs.trainer.strategies import SingleDevice  # noqa: E402
from jobs.trainer.checkpoints import Checkpoints  # noqa: E402
from jobs.trainer.train import TrainState, encode_rows, train, wrap_lora  # noqa: E402

pytestmark = pytest.mark.gpu

TOKENIZER = Path(os.environ.get("LORA_GPU_TOKENIZER")
                 or Path.home() / ".cache/lora-jobs/models/smollm2-135m-instruct")


class _Row:
    def __init__(self, i):
        self.line, self.input, self.persona = i, "", None
        self.instruction = f"How do I fix problem number {i} on the Acme Router X2?"
        self.output = f"Restart it, then hold Reset for {i % 9 + 2} seconds. Check the light turns green."


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(TOKENIZER))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _spec(mode: str, steps: int):
    return parse_spec({
        "name": f"gpu-{mode}", "base_model": {"uri": "/unused"}, "dataset": {"train": "/unused"},
        "output": "/unused", "quantization": {"mode": mode},
        "training": {"epochs": 3, "max_steps": steps, "max_seq_length": 128, "per_device_batch_size": 4,
                     "gradient_accumulation_steps": 1, "checkpoint_interval_steps": 5, "eval_interval_steps": 100},
        "resources": {"gpus": 1},
    })


def _train(model_dir, spec, tmp_path):
    device = torch.device("cuda")
    precision = resolve_precision("auto", device)
    assert precision == "bf16"
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), precision=precision, quantization=spec.quantization.mode, device=device)
    plan = fastpath.plan(model.config, spec.training, device, quantization=spec.quantization.mode)
    plan.tokens_per_micro_batch = 512
    model = fastpath.prepare_model(wrap_lora(model, spec), plan)
    examples, _ = encode_rows(tok, [_Row(i) for i in range(80)], 128)
    ckpts = Checkpoints(LocalStore(str(tmp_path / "store")), "ckpt", tmp_path / "work")
    torch.cuda.reset_peak_memory_stats()
    result = train(model, spec, examples, [], strategy=SingleDevice(device=device), plan=plan, checkpoints=ckpts)
    return model, tok, result, ckpts, plan


def test_bf16_lora_learns_on_the_fast_path(tiny_model_dir, tmp_path):
    spec = _spec("none", 30)
    model, tok, result, _, plan = _train(tiny_model_dir, spec, tmp_path)
    losses = [h["loss"] for h in result.state.history]
    assert len(losses) == 30 and all(l == l for l in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert any("varlen" in n or "SDPA" in n for n in plan.notes)


def test_qlora_trains_restores_and_merges_into_16bit_base(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    spec = _spec("4bit", 10)
    model, tok, result, ckpts, _ = _train(tiny_model_dir, spec, tmp_path)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()), "the base is really 4-bit"
    assert result.state.step == 10 and all(h["loss"] == h["loss"] for h in result.state.history)
    # checkpoints made under 4-bit restore into a fresh 4-bit model
    fresh = fastpath.prepare_model(wrap_lora(load_model(str(tiny_model_dir), precision="bf16", quantization="4bit",
                                                        device=torch.device("cuda")), spec),
                                   fastpath.plan(
        model.config, spec.training, torch.device("cuda"), quantization="4bit"))
    opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-4)
    from transformers import get_scheduler
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=10)
    assert ckpts.restore(fresh, opt, sched, TrainState()) == 5  # the newest before the final step
    # merge into the base reloaded unquantised in bf16; merged == base + adapter within tolerance
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir, safe_serialization=True)
    info = merge_and_check(str(tiny_model_dir), adapter_dir, tmp_path / "merged", dtype="bf16", tolerance=1e-3,
                           prompts=["How do I reset it?", "Is the light green?"], tok=tok,
                           device=torch.device("cuda"))
    assert info["ok"], info
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert next(merged.parameters()).dtype == torch.bfloat16
    assert not any("lora" in n for n, _ in merged.named_parameters())
