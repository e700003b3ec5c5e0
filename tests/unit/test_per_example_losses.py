"""Per-example losses for the promotion gate: the validation's loss of each held-out example (packed, each example's
loss summed apart from the same forward, the same as it has alone; every rank's share put back in the examples'
order), the general-ability regression set shipped as package data, and the report's ``validation.losses_after`` and
``regression`` as build_report writes them."""
from __future__ import annotations

import json
import tomllib
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from jobs.regression import GENERAL, general_set, general_set_sha256
from jobs.trainer import fastpath
from jobs.trainer.distributed import World
from jobs.trainer.strategies import DataParallel, SingleDevice
from jobs.trainer.train import evaluate_loss

ROOT = Path(__file__).resolve().parents[2]
#: the SmolLM2 the stack's tests use (hack/kind-up.sh's MODEL_DIR), read here for its tokenizer only; resolved at
#: import, before conftest points HOME at a temporary folder
SMOLLM2 = Path.home() / ".cache" / "lora-jobs" / "models" / "smollm2-135m-instruct"


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    fastpath.prepare_model(model, fastpath.Plan(fastpath.ATTN_IMPL, model.dtype, False, 256, False))
    return model


def _examples(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        prompt = 2 + i % 3  # the prompt's tokens carry no loss, as encode_example masks them
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def test_validation_gives_each_examples_own_loss_in_order_and_the_token_weighted_mean():
    model, examples = _tiny(), _examples(5)
    losses = evaluate_loss(model, examples, 256, SingleDevice())
    assert losses is not None and len(losses.mine) == 5
    sums, counts = [], []
    with torch.no_grad():
        for e in examples:  # each example alone: the plain transformers forward and cross-entropy
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            target = torch.tensor(e["labels"][1:])
            keep = target != -100
            sums.append(float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")))
            counts.append(int(keep.sum()))
    assert losses.mine == pytest.approx([s / n for s, n in zip(sums, counts)], rel=1e-4)
    assert losses.mean == pytest.approx(sum(sums) / sum(counts), rel=1e-4)
    assert len(set(round(x, 4) for x in losses.mine)) == 5  # distinct examples: no value repeated or shuffled


def _one_at_a_time(model, examples):
    """Each example alone through the packed path (what validation did before it packed): its loss sum and
    target tokens."""
    out = []
    for e in examples:
        batch = fastpath.to_device(fastpath.pack_rows([e], 1024, seed=0, shuffle=False)[0], "cpu")
        loss, n = fastpath.lm_loss(model, batch)
        out.append((loss, n))
    return out


@pytest.mark.parametrize("budget", [256, 40])  # everything in one forward; several forwards
def test_packed_validation_gives_each_example_the_loss_it_has_alone(budget):
    model, examples = _tiny(), _examples(7)
    with torch.no_grad():
        alone = _one_at_a_time(model, [dict(e, input_ids=e["input_ids"][:budget], labels=e["labels"][:budget])
                                       for e in examples])
    mbs, counted = SingleDevice().validation_batches(examples, budget)
    assert (len(mbs) == 1) == (budget == 256) and counted == len(mbs)
    losses = evaluate_loss(model, examples, budget, SingleDevice())
    assert losses is not None
    expected = [float(s) / n for s, n in alone]
    assert losses.mine == pytest.approx(expected, rel=2e-5, abs=1e-6)
    assert losses.mean == pytest.approx(sum(float(s) for s, _ in alone) / sum(n for _, n in alone), rel=2e-5)


def test_example_losses_are_differentiable_per_example_and_chunked():
    """The per-example sums of one packed forward give the same LoRA gradients as each example's own forward, for
    any weighting of the examples (what the preference losses do), with chunks smaller than an example."""
    from peft import LoraConfig, get_peft_model

    from jobs.trainer.fastpath import loss as loss_mod

    model = get_peft_model(_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for n, p in model.named_parameters():  # lora_B starts at 0: give it values so gradients reach lora_A
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    examples = _examples(4)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25])
    params = [p for p in model.parameters() if p.requires_grad]
    base = fastpath._unwrap(model)
    setattr(base, loss_mod.CE_CHUNK_ATTR, 5)  # the plan's chunk, as prepare_model sets it
    try:
        batch = fastpath.to_device(fastpath.pack_rows(examples, 1024, seed=0, shuffle=False)[0], "cpu")
        sums, counts = fastpath.example_losses(model, batch)
        assert counts == [sum(1 for t in e["labels"][1:] if t != -100) for e in examples]
        packed = torch.autograd.grad((sums * weights).sum(), params)
        alone = _one_at_a_time(model, examples)
    finally:
        setattr(base, loss_mod.CE_CHUNK_ATTR, loss_mod.CE_CHUNK)
    assert torch.allclose(sums.detach(), torch.stack([s.detach() for s, _ in alone]), rtol=1e-5)
    each = torch.autograd.grad(sum(w * s for w, (s, _) in zip(weights, alone)), params)
    for a, b in zip(packed, each):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in packed)


def test_every_ranks_share_of_per_example_losses_is_put_back_in_the_examples_order(monkeypatch):
    """Rank r validates examples r, r + world, ... (validation_batches); the gather pads the shorter shares and
    interleaves them back. all_gather_floats is replaced by what two ranks would send."""
    from jobs.trainer import distributed

    n = 5  # rank 0: examples 0, 2, 4; rank 1: examples 1, 3
    shares = {0: [10.0, 12.0, 14.0], 1: [11.0, 13.0]}
    sent = {}

    def all_gather(world, values, device, what):
        sent[world.rank] = list(values)
        padded = [shares[r] + [0.0] * (len(values) - len(shares[r])) for r in (0, 1)]
        return torch.tensor(padded, dtype=torch.float64)

    monkeypatch.setattr(distributed, "all_gather_floats", all_gather)
    for rank in (0, 1):
        s = DataParallel(World(rank=rank, size=2), torch.device("cpu"))
        mbs, counted = s.validation_batches(_examples(n), 256)
        assert counted == len(mbs) == 1  # the share packs into one forward
        assert mbs[0]["seq_lens"] == [len(e["input_ids"]) for e in _examples(n)[rank::2]]  # in the share's order
        assert s.gather_per_example(shares[rank], n) == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert sent == {0: [10.0, 12.0, 14.0], 1: [11.0, 13.0, 0.0]}


def test_the_regression_set_is_valid_unique_and_shipped_as_package_data():
    resource = files("jobs.regression").joinpath(GENERAL)
    assert resource.is_file()
    lines = resource.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(set(r) == {"prompt", "reference"} and r["prompt"].strip() and r["reference"].strip() for r in rows)
    prompts = general_set()
    assert 24 <= len(prompts) <= 32 and [p.instruction for p in prompts] == [r["prompt"] for r in rows]
    assert len({p.instruction.lower() for p in prompts}) == len(prompts)
    assert all(len(p.instruction) <= 120 and len(p.output) <= 120 for p in prompts)  # short: a cheap pass
    assert len(general_set_sha256()) == 64
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.jsonl" in package_data["jobs.regression"]


def test_the_report_records_per_example_losses_and_the_general_ability_line(tmp_path):
    from jobs.spec import parse_spec
    from jobs.trainer import evaluate as ev

    spec = parse_spec({"name": "r1", "base_model": {"uri": "s3://models/base/"},
                       "dataset": {"train": "s3://data/train.jsonl"}, "output": str(tmp_path / "out")})
    regression = ev.regression_section([2.0, 3.0], [2.5, 3.5], "f" * 64)
    report = ev.build_report(spec, prompts=[], before=[], after=[], val_loss_before=2.0, val_loss_after=1.5,
                             history=[], evals=[], train_outputs=[], val_losses_after=[1.4, 1.6123456],
                             regression=regression)
    assert report["validation"]["losses_after"] == [1.4, 1.61235] and report["validation"]["loss_after"] == 1.5
    assert report["regression"] == {"set_sha256": "f" * 64, "prompts": 2, "losses_before": [2.0, 3.0],
                                    "losses_after": [2.5, 3.5], "loss_before": 2.5, "loss_after": 3.0}
    line = "general ability: loss 2.5 → 3.0 on 2 prompts"
    assert line in ev.render_markdown(report, spec) and line in ev.render_html(report, spec)
    plain = ev.build_report(spec, prompts=[], before=[], after=[], val_loss_before=None, val_loss_after=None,
                            history=[], evals=[], train_outputs=[])
    assert "losses_after" not in plain["validation"] and plain["regression"] is None
    assert "general ability" not in ev.render_markdown(plain, spec)
    with pytest.raises(ValueError, match="2 regression losses before training against 1 after"):
        ev.regression_section([2.0, 3.0], [2.5], "f" * 64)


def test_the_regression_set_encodes_like_training_rows_with_the_loss_on_the_answer_only():
    from transformers import AutoTokenizer

    from jobs.trainer.train import IGNORE, encode_rows

    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer at {SMOLLM2} (hack/kind-up.sh's model cache)")
    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    prompts = general_set()
    examples, too_long = encode_rows(tok, prompts, 128)
    assert not too_long and len(examples) == len(prompts)
    for p, e in zip(prompts, examples):
        answer = [t for t in e["labels"] if t != IGNORE]
        assert p.output in tok.decode(answer) and p.instruction not in tok.decode(answer)
        assert p.instruction in tok.decode(e["input_ids"]) and len(e["input_ids"]) <= 96  # short: a cheap pass
    assert encode_rows(tok, prompts, 16)[1] == list(range(1, len(prompts) + 1))  # too long: named by line
