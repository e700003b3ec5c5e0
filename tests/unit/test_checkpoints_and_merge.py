"""Checkpoints that hold no pickle, and a merge check that passes a right merge and fails a wrong one.

A tiny random Llama on CPU; the adapter starts with non-zero B (``init_lora_weights=False``) so
that every module has a real change to merge.
"""
from __future__ import annotations

import json
import pickle
import random

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from jobs.errors import DataError, ExitCode, MergeMismatch  # noqa: E402
from jobs.trainer.merge import check_merged_weights  # noqa: E402
from jobs.storage import LocalStore  # noqa: E402
from jobs.trainer.checkpoints import Checkpoints  # noqa: E402
from jobs.trainer.train import TrainState  # noqa: E402

pytestmark = pytest.mark.unit


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def _with_adapter(model, rank=4, alpha=8):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False,
                     task_type="CAUSAL_LM")
    torch.manual_seed(1)
    return get_peft_model(model, cfg)


@pytest.fixture()
def base_and_adapter(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    _tiny_llama().save_pretrained(base_dir, safe_serialization=True)
    peft_model = _with_adapter(_tiny_llama())
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    return base_dir, adapter_dir


def _merged(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


# ------------------------------------------------------------------------------ merge check

def test_a_correct_merge_passes_and_reports_how_much_survives_bf16(base_and_adapter):
    base_dir, adapter_dir = base_and_adapter
    merged = _merged(base_dir, adapter_dir)
    r = check_merged_weights(merged, base_dir, adapter_dir, target_dtype=torch.bfloat16)
    assert r["modules_checked"] == 2 * 7 and not r["unchecked"]
    assert r["worst_rel_error"] < 1e-5, r
    assert 0.5 < r["delta_retained"] <= 1.05, r


def test_a_module_left_out_of_the_merge_fails_naming_it(base_and_adapter):
    from safetensors import safe_open

    base_dir, adapter_dir = base_and_adapter
    merged = _merged(base_dir, adapter_dir)
    name = "model.layers.1.mlp.down_proj"
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as f:
        merged.get_submodule(name).weight.data.copy_(f.get_tensor(name + ".weight"))
    r = check_merged_weights(merged, base_dir, adapter_dir, target_dtype=torch.bfloat16)
    assert r["worst_module"] == name and r["worst_rel_error"] > 0.5, r


def test_a_merge_with_the_wrong_scaling_fails(base_and_adapter, tmp_path):
    base_dir, adapter_dir = base_and_adapter
    # merged with alpha 16 where the published adapter says alpha 8: every delta doubled
    wrong = tmp_path / "wrong-alpha"
    wrong.mkdir()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 16}))
    (wrong / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    merged = _merged(base_dir, wrong)
    r = check_merged_weights(merged, base_dir, adapter_dir, target_dtype=torch.bfloat16)
    assert r["worst_rel_error"] > 0.5, r


def test_merge_mismatch_is_a_distinct_code_that_is_never_retried():
    from jobs.errors import PERMANENT_EXIT_CODES

    assert MergeMismatch("x").exit_code == ExitCode.MERGE_MISMATCH == 15
    assert {13, 14, 15} <= {int(c) for c in PERMANENT_EXIT_CODES}


# ------------------------------------------------------------------------------ checkpoints

def _optimizer(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(2):
        loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt, sched


def test_checkpoint_round_trip_restores_adapter_optimizer_schedule_and_rng(tmp_path):
    store = LocalStore(str(tmp_path / "bucket"))
    model = _with_adapter(_tiny_llama())
    opt, sched = _optimizer(model)
    state = TrainState(step=2, best_val=1.5, best_step=2)
    ck = Checkpoints(store, "run/checkpoints/abc", tmp_path / "work")
    torch.manual_seed(123)
    random.seed(7)
    ck.save(model, opt, sched, state)
    expected_rand, expected_py = torch.rand(3), random.random()

    fresh = _with_adapter(_tiny_llama())
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    state2 = TrainState()
    assert Checkpoints(store, "run/checkpoints/abc", tmp_path / "work2").restore(fresh, opt2, sched2, state2) == 2
    assert state2.step == 2 and state2.best_val == 1.5
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for pid in s1["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(s1["state"][pid][key]), torch.as_tensor(s2["state"][pid][key]))
    assert sched2.last_epoch == sched.last_epoch
    assert torch.equal(torch.rand(3), expected_rand) and random.random() == expected_py


def test_only_the_newest_checkpoint_stays_on_local_disk(tmp_path):
    store = LocalStore(str(tmp_path / "bucket"))
    model = _with_adapter(_tiny_llama())
    opt, sched = _optimizer(model)
    ck = Checkpoints(store, "run/checkpoints/abc", tmp_path / "work")
    for step in (1, 2, 3):
        ck.save(model, opt, sched, TrainState(step=step))
    assert [p.name for p in (tmp_path / "work" / "checkpoints").iterdir()] == ["step-000003"]
    assert ck._steps() == [2, 3], "the bucket keeps the two newest"


def test_checkpoints_kept_under_the_earlier_key_are_resumed_and_new_ones_go_under_the_new(tmp_path):
    """Runs that checkpointed before the key became the training hash resume after an upgrade."""
    store = LocalStore(str(tmp_path / "bucket"))
    model = _with_adapter(_tiny_llama())
    opt, sched = _optimizer(model)
    Checkpoints(store, "run/checkpoints/spechash", tmp_path / "old").save(model, opt, sched, TrainState(step=3))
    ck = Checkpoints(store, "run/checkpoints/trainhash", tmp_path / "work",
                     earlier_prefix="run/checkpoints/spechash")
    assert ck.restore(model, opt, sched, TrainState()) == 3
    assert ck.location.endswith("run/checkpoints/spechash")
    ck.save(model, opt, sched, TrainState(step=4))
    assert ck._steps() == [4] and ck._steps("run/checkpoints/spechash") == [3], "the earlier key is only read"


def test_a_checkpoint_whose_steps_were_other_batches_is_refused_with_the_fix(tmp_path):
    from jobs.errors import SpecError
    from jobs.trainer.train import _check_resumable

    ck = Checkpoints(LocalStore(str(tmp_path / "bucket")), "run/checkpoints/abc", tmp_path / "work")
    # written before the fields existed, or a step of the same size on another world size: resumes
    _check_resumable(TrainState(), 5, 16, 2, ck)
    _check_resumable(TrainState(world_size=4, examples_per_step=16), 5, 16, 2, ck)
    with pytest.raises(SpecError) as err:  # accumulation 4 x batch 2 x 4 GPUs = 32, now 2 GPUs = 16
        _check_resumable(TrainState(world_size=4, examples_per_step=32), 5, 16, 2, ck)
    text = str(err.value)
    assert "step 5" in text and "32 examples per optimizer step" in text and "on 2 this spec makes 16" in text
    assert "gradient_accumulation_steps" in text and "run/checkpoints/abc" in text


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/lora-jobs-pickle-ran", "w"))


def test_a_pickled_checkpoint_in_the_bucket_is_refused_not_unpickled(tmp_path):
    import os

    marker = "/tmp/lora-jobs-pickle-ran"
    if os.path.exists(marker):
        os.remove(marker)
    store = LocalStore(str(tmp_path / "bucket"))
    prefix = "run/checkpoints/abc/step-000004"
    payload = pickle.dumps({"optimizer": _Boom()})
    store.put_bytes(f"{prefix}/optim.pt", payload)
    store.put_bytes(f"{prefix}/adapter.pt", payload)
    store.put_bytes(f"{prefix}/state.json", b'{"step": 4}')
    store.put_bytes(f"{prefix}/_COMPLETE", b"ok\n")
    model = _with_adapter(_tiny_llama())
    opt, sched = _optimizer(model)
    with pytest.raises(DataError) as err:
        Checkpoints(store, "run/checkpoints/abc", tmp_path / "work").restore(model, opt, sched, TrainState())
    assert "step-000004" in str(err.value) and "safetensors" in str(err.value)
    assert not os.path.exists(marker), "nothing from the bucket was unpickled"


# ------------------------------------------------------------------------------ Liger's global patch

def test_liger_patches_are_undone_before_the_merge_reloads_the_base_on_cpu(base_and_adapter):
    """QLoRA on an 8B base merges on the CPU; Liger had patched transformers' Llama classes with
    Triton kernels during training, and the CPU reload then failed. Applied here on a CPU model
    (patching needs no GPU), undone, and the reload runs its forward on the CPU."""
    pytest.importorskip("liger_kernel")
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    from jobs.trainer import fastpath

    base_dir, _ = base_and_adapter
    plain_norm, plain_rope = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    assert fastpath._apply_liger(model)
    assert modeling_llama.LlamaRMSNorm is not plain_norm, "Liger patches the module, not only the instance"
    assert fastpath.undo_module_patches() >= 2
    assert modeling_llama.LlamaRMSNorm is plain_norm and modeling_llama.apply_rotary_pos_emb is plain_rope
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(fresh(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
