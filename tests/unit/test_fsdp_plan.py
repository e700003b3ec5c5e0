"""training.fsdp without GPUs: the spec field, and the planner's decision to shard the base with FSDP2 on
real model shapes (Llama-3-8B and -70B configs). The sharded training itself runs for real in
tests/integration/test_fsdp_cpu.py."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from jobs.trainer import fastpath  # noqa: E402
from jobs.errors import OutOfMemory, SpecError  # noqa: E402
from jobs.spec import TrainingSpec, parse_spec  # noqa: E402

pytestmark = pytest.mark.unit

BASE = {"name": "support-bot", "base_model": {"uri": "s3://models/m/"},
        "dataset": {"train": "s3://data/train.jsonl"}, "output": "s3://runs/lora"}
GIB = 2**30


def _llama3(size: str):
    from transformers import LlamaConfig

    shapes = {"8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
              "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)}
    return LlamaConfig(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=8192, **shapes[size])


def _plan(size: str, world: int, device: str = "cuda", free_gib: float = 139, quantization: str = "none",
          **training):
    training.setdefault("precision", "bf16")  # what an H200 gets (this process has no GPU to ask)
    return fastpath.plan(_llama3(size), TrainingSpec(**training), torch.device(device),
                         free_memory_bytes=int(free_gib * GIB), world_size=world, quantization=quantization)


# ----------------------------------------------------------------------------- the plan

def test_auto_shards_a_70b_bf16_base_over_8_gpus_and_plans_on_what_a_rank_holds():
    assert fastpath.estimate_param_count(_llama3("70b")) > 70e9  # ~131 GiB in bf16: more than an H200 has free
    p = _plan("70b", 8)
    assert p.fsdp is True and p.dtype == torch.bfloat16
    assert p.compile is False and p.fp8 is False  # both left out of sharded plans
    assert any(n.startswith("FSDP2: ") and "do not fit one GPU" in n for n in p.notes), p.notes
    # weights / 8 (~16 GiB a rank): a micro-batch planned on that, not on the whole base
    [mem] = [n for n in p.notes if n.startswith("free ")]
    weights = float(mem.split("weights ~")[1].split(" GiB")[0])
    assert 15 <= weights <= 17, mem
    assert p.tokens_per_micro_batch >= 4096
    # more ranks, smaller shards, more room for activations (on 80 GiB cards: 2048 tokens on 2, 8192 on 8)
    assert _plan("70b", 2, free_gib=80).tokens_per_micro_batch < _plan("70b", 8, free_gib=80).tokens_per_micro_batch


def test_auto_does_not_shard_what_fits_one_gpu_and_leaves_that_plan_as_it_was():
    one = _plan("8b", 1)
    eight = _plan("8b", 8)
    assert eight.fsdp is False and eight == one  # data parallel: the very plan of one GPU
    assert not any("FSDP2" in n for n in one.notes)
    # on the CPU auto never shards (no memory to plan with), one process never does
    assert _plan("70b", 2, device="cpu").fsdp is False
    assert _plan("8b", 1, fsdp="on").fsdp is False


def test_on_shards_whenever_there_is_more_than_one_process_and_off_never():
    on = _plan("8b", 2, fsdp="on")
    assert on.fsdp is True and on.compile is False
    assert on.tokens_per_micro_batch >= _plan("8b", 2).tokens_per_micro_batch  # half the weights a GPU
    assert _plan("8b", 2, device="cpu", fsdp="on").fsdp is True  # how tests shard without GPUs
    assert _plan("8b", 8, fsdp="off").fsdp is False


def test_on_with_one_process_is_a_note_and_a_warning_not_an_error(caplog):
    with caplog.at_level("WARNING", logger="jobs.trainer.fastpath"):
        p = _plan("8b", 1, device="cpu", fsdp="on")
    assert p.fsdp is False and any("no effect with one training process" in n for n in p.notes)
    assert "no effect with one training process" in caplog.text


def test_a_base_that_does_not_fit_one_gpu_unsharded_fails_at_planning_naming_the_fix():
    with pytest.raises(OutOfMemory) as one:
        _plan("70b", 1)
    assert "does not fit" in str(one.value) and "one training process" in str(one.value)
    assert "resources.gpus" in one.value.hint and "training.fsdp" in one.value.hint
    with pytest.raises(OutOfMemory) as off:
        _plan("70b", 8, fsdp="off")
    assert "8 processes, each with the whole base" in str(off.value)
    assert "training.fsdp: auto or on" in off.value.hint
    with pytest.raises(OutOfMemory) as tiny:  # sharded, and 1/2 of 70B still does not fit 40 GiB
        _plan("70b", 2, free_gib=40)
    assert "sharded" in str(tiny.value) and "resources.gpus" in tiny.value.hint
    # a quantised base is not sharded: the fix is not fsdp (70B in 4 bit is ~37 GiB, over QLoRA's 12 GiB)
    assert _plan("8b", 8, quantization="4bit").fsdp is False
    with pytest.raises(OutOfMemory) as q:
        _plan("70b", 8, quantization="4bit")
    assert "not sharded" in q.value.hint and "training.fsdp" not in q.value.hint
    # ... and where the card has the memory, the fix is the budget QLoRA plans for by default
    assert "set training.gpu_memory_gib to 5" in q.value.hint, q.value.hint
    with pytest.raises(OutOfMemory) as big:  # 70B in 4 bit does not fit a 40 GiB card at all
        _plan("70b", 8, quantization="4bit", free_gib=40)
    assert "gpu_memory_gib" not in big.value.hint and "more memory" in big.value.hint


# ----------------------------------------------------------------------------- the spec

def test_fsdp_defaults_to_auto_keeps_earlier_hashes_and_does_not_key_the_checkpoints():
    plain = parse_spec(BASE)
    assert plain.training.fsdp == "auto"
    assert plain.spec_hash() == parse_spec({**BASE, "training": {"fsdp": "auto"}}).spec_hash()
    on, off = (parse_spec({**BASE, "training": {"fsdp": v}}) for v in ("on", "off"))
    assert on.spec_hash() != plain.spec_hash()  # another Job name: another layout over the GPUs
    # a checkpoint written sharded resumes unsharded and back: the checkpoints' key leaves fsdp out
    assert on.training_hash() == off.training_hash() == plain.training_hash()


def test_fsdp_yaml_booleans_bad_values_and_quantization_are_spec_errors_naming_the_field():
    from jobs.spec import load_spec_text

    spec = load_spec_text("name: a\nbase_model: {uri: s3://models/m/}\ndataset: {train: s3://data/t.jsonl}\n"
                          "output: s3://runs/lora\ntraining: {fsdp: off}\n")
    assert spec.training.fsdp == "off"  # YAML 1.1 reads a bare off as false
    with pytest.raises(SpecError) as bad:
        parse_spec({**BASE, "training": {"fsdp": "sometimes"}})
    assert "training.fsdp" in str(bad.value)
    with pytest.raises(SpecError) as q:
        parse_spec({**BASE, "training": {"fsdp": "on"}, "quantization": {"mode": "4bit"}})
    assert "training.fsdp" in str(q.value)


def test_fsdp_on_with_one_gpu_is_advice():
    [warning] = [a for a in parse_spec({**BASE, "training": {"fsdp": "on"}}).advice() if a.where == "training.fsdp"]
    assert "no effect with one training process" in warning.message and "resources.gpus" in warning.fix
    assert not [a for a in parse_spec({**BASE, "training": {"fsdp": "on"}, "resources": {"gpus": 4}}).advice()
                if a.where == "training.fsdp"]


def test_rank_0_ends_a_sharded_run_on_the_gpu_only_when_the_whole_base_fits_there():
    """After an FSDP2 run rank 0 reloads the whole base to evaluate, save and merge: on its GPU when the base
    fits the budget (8B sharded over 2 H200s for its activations; 70B's ~131 GiB in bf16 on an H200, which
    holds it for generations but not for training), else on the CPU (70B bf16 on 80 GiB cards)."""
    assert fastpath.whole_base_fits(_llama3("8b"), _plan("8b", 2, fsdp="on")) is True
    assert fastpath.whole_base_fits(_llama3("70b"), _plan("70b", 8)) is True
    big = _plan("70b", 8, free_gib=80)
    assert big.fsdp is True and fastpath.whole_base_fits(_llama3("70b"), big) is False
    # a budget the user set below the card: the same 8B no longer fits it whole (~15 GiB of bf16 weights)
    assert fastpath.whole_base_fits(_llama3("8b"), _plan("8b", 4, fsdp="on", gpu_memory_gib=12)) is False
    assert fastpath.whole_base_fits(_llama3("70b"), _plan("70b", 2, device="cpu", fsdp="on")) is True  # no budget


def test_compile_defaults_to_auto_keeps_earlier_hashes_and_does_not_key_the_checkpoints():
    """training.compile came after runs were named and checkpointed: auto leaves their hashes as they were
    (the golden render still matches), and compiling or not resumes the same checkpoints."""
    plain = parse_spec(BASE)
    assert plain.training.compile == "auto"
    off = parse_spec({**BASE, "training": {"compile": "off"}})
    assert plain.spec_hash() == parse_spec({**BASE, "training": {"compile": "auto"}}).spec_hash()
    assert off.spec_hash() != plain.spec_hash()
    assert off.training_hash() == plain.training_hash()
