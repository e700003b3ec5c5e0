"""A preference step's gradient does not depend on how its pairs are laid out: one process with one micro-batch, one
process with a micro-batch per pair, and two ranks (real gloo processes), data parallel or FSDP2-sharded, give the same
LoRA gradients and the same step statistics, for DPO (normalised per pair) and ORPO (chosen tokens and pairs). SFT's
are tests/integration/test_distributed_cpu.py's and test_fsdp_cpu.py's."""
from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from jobs.trainer import fastpath
from jobs.trainer.distributed import World
from jobs.trainer.preference import Objective, reference_log_probs
from jobs.trainer.strategies import FSDP2, DataParallel, SingleDevice
from jobs.trainer.train import Schedule, TokenBudget

METHODS = ("dpo", "orpo")


def _model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).float()
    fastpath.prepare_model(base, fastpath.Plan(fastpath.ATTN_IMPL, torch.float32, False, 128, False))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return model


def _pairs(n: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 96, (4 + i % 3,), generator=g).tolist()
        sides = []
        for length in (3 + i, 6 - i % 4):
            answer = torch.randint(3, 96, (length,), generator=g).tolist()
            sides.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
        out.append({"chosen": sides[0], "rejected": sides[1], "index": i, "line": i + 1})
    return out


def _loop(model, objective, pairs, tokens, rank=0, world=1):
    sched = Schedule(pairs, len(pairs), seed=0, epochs=1, rank=rank, world_size=world)
    params = [p for p in model.parameters() if p.requires_grad]
    return SimpleNamespace(sched=sched, budget=TokenBudget(tokens, 2), objective=objective, params=params,
                           scaler=torch.amp.GradScaler("cpu", enabled=False), optimizer=None, state=None,
                           stop_requested=lambda: False, longest=tokens, examples_per_step=len(pairs))


def _step(strategy, method, tokens, rank=0, world=1, shard=False):
    model, pairs = _model(), _pairs()
    if shard:  # FSDP2 over the ranks (as training.fsdp: on does on CPUs); gradients come back as whole tensors
        from jobs.trainer.distributed import shard_model

        shard_model(strategy.world, model)
    objective = Objective(method, 0.1)
    objective.prepare(model, pairs, [], 4096, strategy)
    model.train()
    loop = _loop(model, objective, pairs, tokens, rank, world)
    done = strategy.forward_backward(model, loop, 0)
    summary = objective.summary(done.loss, [float(x) for x in done.n_target])
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return summary, grads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        world = World(rank=rank, size=2)
        for method in METHODS:
            for name, strategy in (("ddp", DataParallel(world, torch.device("cpu"))),
                                   ("fsdp", FSDP2(world, torch.device("cpu")))):
                summary, grads = _step(strategy, method, 4096, rank, 2, shard=name == "fsdp")
                out.put((method, name, rank, summary, {k: v.numpy() for k, v in grads.items()}))
    finally:
        dist.destroy_process_group()


def _close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        scale = float(b[k].abs().max())
        assert scale > 0, k
        assert float((a[k] - b[k]).abs().max()) <= 2e-5 * scale + 1e-8, k


def test_a_steps_gradient_is_the_same_on_one_process_per_pair_micro_batches_and_two_ranks():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for method in METHODS:  # meanwhile, in this process
        one, one_grads = _step(SingleDevice(), method, 4096)
        split, split_grads = _step(SingleDevice(), method, 1)  # every pair alone in its micro-batch
        assert split == pytest.approx(one, rel=1e-5)
        _close(split_grads, one_grads)
        for _ in range(4):  # each rank, data parallel then FSDP2
            got_method, name, rank, summary, grads = out.get(timeout=300)
            assert got_method == method
            assert summary == pytest.approx(one, rel=1e-5), (name, rank)
            _close({k: torch.from_numpy(v) for k, v in grads.items()}, one_grads)
        assert one["loss"] > 0 and (method != "dpo" or 0.0 <= one["reward_accuracy"] <= 1.0)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0


def test_reference_log_probs_are_the_base_s_whatever_the_adapter():
    model, pairs = _model(), _pairs()
    ref = reference_log_probs(model, pairs, 4096, SingleDevice())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()  # now the adapter is a no-op: the policy is the base
    from jobs.trainer.preference import side_log_probs

    assert torch.allclose(side_log_probs(model, pairs, 4096, SingleDevice()), ref, rtol=1e-6)
    assert ref.shape == (len(pairs), 2) and bool((ref < 0).all())


def test_the_bases_held_out_measure_is_its_own_reference_for_dpo_and_has_no_rewards_for_orpo():
    import math

    model, pairs = _model(), _pairs()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()  # a fresh adapter: the model is the base
    dpo = Objective("dpo", 0.1)
    base = dpo.measure_base(model, pairs, 4096, SingleDevice())
    assert base.mean == pytest.approx(math.log(2)) and base.reward_margin == 0.0 and base.reward_accuracy == 0.0
    assert dpo.val_ref is not None and torch.allclose(dpo.val_ref, reference_log_probs(model, pairs, 4096,
                                                                                       SingleDevice()))
    assert set(dpo.validation_metrics(base)) == {"preference_accuracy", "reward_accuracy", "reward_margin"}
    orpo = Objective("orpo", 0.1)
    measured = orpo.measure_base(model, pairs, 4096, SingleDevice())
    assert measured.reward_accuracy is None and orpo.val_ref is None
    assert set(orpo.validation_metrics(measured)) == {"preference_accuracy"}
    assert measured.mean > 0 and len(measured.mine) == len(pairs)
