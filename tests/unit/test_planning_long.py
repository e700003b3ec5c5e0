"""The planner and long sequences: one micro-batch must hold a whole row (a preference pair's two sides), so a
max_seq_length whose activations cannot fit is refused before the base loads, naming the longest that fits and
the other ways out; a quantised run under gpu_memory_gib auto plans for what one long row needs (12 GiB is a
floor). Planned for an H100's free memory from an 8B config, without a GPU (the planner is arithmetic)."""
from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

from jobs.errors import OutOfMemory  # noqa: E402
from jobs.spec import TrainingSpec  # noqa: E402
from jobs.trainer import fastpath  # noqa: E402
from jobs.trainer.fastpath import planning  # noqa: E402

pytestmark = pytest.mark.unit
FREE = 79 * 2**30


@pytest.fixture(autouse=True)
def _a_gpu_with_the_varlen_kernel(monkeypatch):
    # what an H100 reports; the planner's arithmetic is what is tested
    monkeypatch.setattr(planning, "varlen_available", lambda device: True)
    monkeypatch.setattr(planning, "bnb_4bit_compiles", lambda: True)


def _llama8b():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072)


def _plan(quantization="none", **training):
    return fastpath.plan(_llama8b(), TrainingSpec(**training), torch.device("cuda"), free_memory_bytes=FREE,
                         quantization=quantization)


def test_a_preference_pair_is_planned_whole_and_refused_when_it_cannot_fit():
    sft = _plan(max_seq_length=16384, gpu_memory_gib=32)
    assert sft.tokens_per_micro_batch >= 16384 and sft.gradient_checkpointing
    with pytest.raises(OutOfMemory) as err:
        _plan(max_seq_length=16384, gpu_memory_gib=32, method="dpo")
    assert "a pair of two 16384-token sides" in err.value.message
    fits = int(re.search(r"lower training.max_seq_length to (\d+)", err.value.hint).group(1))
    assert 1024 <= fits < 16384
    ok = _plan(max_seq_length=fits, gpu_memory_gib=32, method="dpo")  # what it names does fit
    assert ok.tokens_per_micro_batch >= 2 * fits


def test_long_context_at_8b_on_one_80gb_card_plans_or_says_what_fits():
    bf16 = _plan(max_seq_length=8192)
    assert bf16.tokens_per_micro_batch >= 8192
    q = _plan("4bit", max_seq_length=16384)  # gpu_memory_gib auto: 12 GiB is a floor, not a wall
    assert q.tokens_per_micro_batch >= 16384 and q.gradient_checkpointing
    assert any("gpu_memory_gib auto" in n and "16384-token" in n for n in q.notes), q.notes
    assert 12 * 2**30 < q.memory_budget_bytes < 24 * 2**30
    with pytest.raises(OutOfMemory) as err:
        _plan(max_seq_length=131072, gpu_memory_gib=40)
    assert "training.max_seq_length 131072 does not fit" in err.value.message
    assert "lower training.max_seq_length to" in err.value.hint and "quantization.mode: 4bit" in err.value.hint


def test_checkpointing_turned_off_by_hand_is_named_as_the_way_out():
    with pytest.raises(OutOfMemory) as err:
        _plan(max_seq_length=32768, gradient_checkpointing=False)
    assert "without checkpointing" in err.value.message
    assert err.value.hint.startswith("set training.gradient_checkpointing: auto")
