"""The guide's batch semantics: an optimizer step is a count of examples, however they are packed."""
from __future__ import annotations

import random

import pytest

from jobs.spec import TrainingSpec

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")

from jobs.trainer import fastpath  # noqa: E402
from jobs.trainer.train import Schedule, TokenBudget  # noqa: E402


def _examples(n, seed=0, lo=20, hi=900):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        L = rng.randint(lo, hi)
        out.append({"input_ids": [i % 50000 + 3] * L, "labels": [-100] * (L // 3) + [7] * (L - L // 3), "id": i})
    return out


def test_defaults_give_sixteen_examples_per_optimizer_step():
    t = TrainingSpec()
    assert t.examples_per_step(1) == 16
    # more devices: fewer accumulation steps, the same 16 examples a step
    assert t.examples_per_step(2) == 16 and t.accumulation_for(2) == 2
    assert t.examples_per_step(4) == 16 and t.accumulation_for(4) == 1
    assert t.examples_per_step(3) == 16, "the same step on any number of GPUs"
    assert TrainingSpec(per_device_batch_size=2, gradient_accumulation_steps=3).examples_per_step(2) == 12


def test_every_step_sees_its_examples_once_per_epoch_whatever_the_token_budget():
    ex = _examples(1425)
    sched = Schedule(ex, 16, seed=42, epochs=2)
    assert sched.steps_per_epoch == 90  # ceil(1425 / 16)
    for budget in (16384, 8192, 2048, 900):
        seen = []
        for k in range(sched.steps_per_epoch):
            mbs = sched.micro_batches(k, budget, fastpath.pack_step)
            assert all(len(mb["input_ids"]) <= budget for mb in mbs)
            n = sum(len(mb["seq_lens"]) for mb in mbs)
            assert n == (16 if k < 89 else 1425 - 89 * 16)
            seen += [mb["input_ids"][p] for mb in mbs for p in _starts(mb)]
        assert sorted(seen) == sorted(e["input_ids"][0] for e in ex), "each example exactly once an epoch"
    # a new epoch is a new shuffle, the same one on every call (resume needs that)
    assert sched.step_indices(90) != sched.step_indices(0)
    assert Schedule(ex, 16, seed=42, epochs=2).step_indices(95) == sched.step_indices(95)


def _starts(mb):
    pos, out = 0, []
    for n in mb["seq_lens"]:
        out.append(pos)
        pos += n
    return out


def test_ranks_split_each_step_without_overlap():
    ex = _examples(100)
    world = [Schedule(ex, 16, seed=1, epochs=1, rank=r, world_size=2) for r in (0, 1)]
    single = Schedule(ex, 16, seed=1, epochs=1)
    for k in range(single.steps_per_epoch):
        a, b = ([e["id"] for e in s.rank_examples(k)] for s in world)
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(e["id"] for e in single.rank_examples(k))


def test_pack_step_uses_as_few_micro_batches_as_fit_and_balances_them():
    rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in (3000, 2500, 1500, 1200, 300, 100)]  # 8600
    mbs = fastpath.pack_step(rows, 8192)
    assert len(mbs) == 2, "8,600 tokens need two micro-batches of at most 8,192"
    sizes = sorted(len(mb["input_ids"]) for mb in mbs)
    assert sizes[0] > 3000, f"balanced, not 8k + a tiny tail: {sizes}"
    assert sorted(n for mb in mbs for n in mb["seq_lens"]) == [100, 300, 1200, 1500, 2500, 3000]
    for mb in mbs:  # positions restart at every example
        assert mb["position_ids"].count(0) == len(mb["seq_lens"])
    assert len(fastpath.pack_step(rows, 16384)) == 1


def test_token_budget_halves_down_to_the_longest_example_then_gives_up():
    b = TokenBudget(8192, floor=1500)
    seen = [b.tokens]
    while b.halve():
        seen.append(b.tokens)
    assert seen == [8192, 4096, 2048, 1500]


def test_small_runs_get_warmup_and_several_validations_per_epoch():
    t = TrainingSpec()
    assert t.warmup_steps_for(14) == 1 and t.warmup_steps_for(90) == 9 and t.warmup_steps_for(1000) == 30
    assert TrainingSpec(warmup_ratio=0).warmup_steps_for(90) == 0
    assert t.eval_interval_for(14) == 4  # 4 validations an epoch
    assert t.eval_interval_for(90) == 23
    assert t.eval_interval_for(10_000) == 50  # at most 50 steps apart
    assert TrainingSpec(eval_interval_steps=7).eval_interval_for(90) == 7
