"""DPO and ORPO on our packed path against TRL 1.16, the reference implementation, on the same batch: a tiny random
Llama (the real SmolLM2 tokenizer and chat template) with a LoRA whose B is not zero (policy != reference).

Tolerances: fp32 throughout; the loss within 1e-5 relative, each LoRA gradient within 1e-4 relative of its largest
entry (our chunked head and per-example attention against TRL's padded batch and fused head: summation order only).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.dataprep import Row
from jobs.trainer import fastpath
from jobs.trainer.preference import Objective, encode_pair, pack_pairs, reference_log_probs
from jobs.trainer.strategies import SingleDevice

#: resolved at import, before conftest points HOME at a temporary folder
SMOLLM2 = Path.home() / ".cache" / "lora-jobs" / "models" / "smollm2-135m-instruct"
BETA = 0.1

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I think it might be Lyon, or Rome."),
    ("Name a primary colour.", "Red is a primary colour.", "Green."),
    ("Say hello politely.", "Hello, it is nice to meet you.", "go away"),
]


class _Pair:
    def __init__(self, i, prompt, chosen, rejected):
        self.chosen = Row(line=i + 1, instruction=prompt, output=chosen)
        self.rejected = Row(line=i + 1, instruction=prompt, output=rejected)
        self.line = i + 1


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer at {SMOLLM2} (hack/kind-up.sh's model cache)")
    return AutoTokenizer.from_pretrained(SMOLLM2)


def _perturb(model):
    """An adapter that already moved (lora_B no longer 0): policy and reference differ."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and ".default." in n:
                p.normal_(std=0.02)


def _model(tok):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    base = LlamaForCausalLM(cfg).float()
    fastpath.prepare_model(base, fastpath.Plan(fastpath.ATTN_IMPL, torch.float32, False, 512, False))
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if ".default." in n}


def _assert_grads_close(ours, theirs):
    assert ours.keys() == theirs.keys()
    for n in ours:
        scale = float(theirs[n].abs().max())
        assert scale > 0, n
        assert float((ours[n] - theirs[n]).abs().max()) <= 1e-4 * scale, n


def _ours(model, objective, encoded, *, tokens):
    """Our loss of one optimizer step of ``encoded`` (micro-batches of at most ``tokens``), its LoRA gradients."""
    model.zero_grad(set_to_none=True)
    mbs = pack_pairs(encoded, tokens)
    totals = objective.counts(mbs)
    stats = torch.zeros(objective.stats_size)
    for mb in mbs:
        loss, s = objective.micro_loss(model, fastpath.to_device(mb, "cpu"), mb, [1.0 / t for t in totals])
        loss.backward()
        stats += s
    return objective.summary(stats, totals), _lora_grads(model), len(mbs)


def _encoded(tok):
    out = [encode_pair(tok, _Pair(i, *p), 256, i) for i, p in enumerate(PAIRS)]
    assert all(e is not None for e in out)
    return out


def _check_same_tokens(encoded, batch):
    """TRL tokenised the pairs to the very ids we did (else the comparison would be of other inputs)."""
    n = len(encoded)
    for j, e in enumerate(encoded):
        for k, side in enumerate(("chosen", "rejected")):
            row = batch["input_ids"][k * n + j][batch["attention_mask"][k * n + j].bool()].tolist()
            completion = batch["completion_mask"][k * n + j][batch["attention_mask"][k * n + j].bool()].tolist()
            assert row == e[side]["input_ids"]
            assert [int(label != -100) for label in e[side]["labels"]] == completion


def _dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                               "chosen": [{"role": "assistant", "content": c}],
                               "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS])


def test_dpo_loss_and_lora_gradients_match_trl_dpo_trainer(tok, tmp_path):
    from trl import DPOConfig, DPOTrainer

    model = _model(tok)
    args = DPOConfig(output_dir=str(tmp_path), beta=BETA, loss_type=["sigmoid"], per_device_train_batch_size=3,
                     report_to=[], use_cpu=True, bf16=False, fp16=False, disable_dropout=True,
                     precompute_ref_log_probs=False, max_length=None, dataset_num_proc=None)
    # TRL's reference for a PEFT model is a frozen copy ("ref") of the adapter it was given: a fresh one (lora_B 0),
    # i.e. the base, which is ours (the adapter switched off). The adapter trained then moves away from it.
    trainer = DPOTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=tok)
    _perturb(model)
    encoded = _encoded(tok)
    objective = Objective("dpo", BETA)
    objective.ref = reference_log_probs(model, encoded, 4096, SingleDevice())
    ours, our_grads, n_mbs = _ours(model, objective, encoded, tokens=4096)
    assert n_mbs == 1
    # the same step split over micro-batches of one pair each: the same loss and gradient (normalised per pair)
    split, split_grads, n_split = _ours(model, objective, encoded, tokens=1)
    assert n_split == len(PAIRS) and split["loss"] == pytest.approx(ours["loss"], rel=1e-6)
    _assert_grads_close(split_grads, our_grads)

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    _check_same_tokens(encoded, batch)
    model.zero_grad(set_to_none=True)
    model.train()
    theirs = trainer.compute_loss(model, batch)
    theirs.backward()
    assert float(theirs.detach()) == pytest.approx(ours["loss"], rel=1e-5)
    assert abs(float(theirs.detach()) - 0.6931) > 1e-3  # policy != reference: not the trivial log 2
    _assert_grads_close(our_grads, _lora_grads(model))
    metrics = trainer._metrics["train"]
    assert metrics["rewards/accuracies"][-1] == pytest.approx(ours["reward_accuracy"])
    assert metrics["rewards/margins"][-1] == pytest.approx(ours["reward_margin"], rel=1e-4, abs=1e-6)


def test_orpo_odds_ratio_term_and_gradients_match_trl_orpo_trainer(tok, tmp_path):
    """TRL's ORPOTrainer (trl.experimental.orpo in 1.16) computes the NLL over prompt and response; ours, as the
    paper, over the response. So TRL's own forward gives the per-pair length-normalised log-probs and its
    odds_ratio_loss the odds term; the expected loss adds the response NLL from the same logits."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model = _model(tok)
    _perturb(model)
    encoded = _encoded(tok)
    objective = Objective("orpo", BETA)
    ours, our_grads, _ = _ours(model, objective, encoded, tokens=4096)
    split, split_grads, n_split = _ours(model, objective, encoded, tokens=1)
    assert n_split == len(PAIRS) and split["loss"] == pytest.approx(ours["loss"], rel=1e-6)
    _assert_grads_close(split_grads, our_grads)

    args = ORPOConfig(output_dir=str(tmp_path), beta=BETA, per_device_train_batch_size=3, report_to=[], use_cpu=True,
                      bf16=False, fp16=False, disable_dropout=True, max_length=256, max_completion_length=128, padding_value=0,
                      remove_unused_columns=False)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=tok)
    # its own tokenisation appends an EOS after the template's end of turn: the batch is given as our ids, in the
    # layout its concatenated_forward reads (right-padded, labels -100 on the prompt and the padding)
    batch = {}
    for side in ("chosen", "rejected"):
        rows = [e[side] for e in encoded]
        width = max(len(r["input_ids"]) for r in rows)
        batch[f"{side}_input_ids"] = torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"]))
                                                   for r in rows])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                                        for r in rows])
        batch[f"{side}_labels"] = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    model.zero_grad(set_to_none=True)
    model.train()
    chosen_logps, rejected_logps, chosen_logits, _, _ = trainer.concatenated_forward(model, batch)[:5]
    odds, *_ = trainer.odds_ratio_loss(chosen_logps, rejected_logps)
    labels = batch["chosen_labels"][:, 1:]
    logits = chosen_logits[:, : labels.shape[1]]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            ignore_index=-100)
    theirs = nll - odds.mean()
    theirs.backward()
    assert float(theirs.detach()) == pytest.approx(ours["loss"], rel=1e-5)
    assert float(-odds.mean()) == pytest.approx(ours["odds_ratio_loss"], rel=1e-5)
    _assert_grads_close(our_grads, _lora_grads(model))
