"""Preference tuning on the packed path: DPO and ORPO losses over pairs (chosen, rejected).

A pair's two sides are packed into the same micro-batch, one after the other (a pair is never split), and one
packed forward gives each side's summed target log-prob (``fastpath.example_losses``). The prompt is masked on both
sides (``encode_pair``), so a side's log-prob is its response's.

* **DPO** (sigmoid loss, Rafailov et al. 2023): ``-logsigmoid(beta * ((pc - rc) - (pr - rr)))`` with ``pc``/``pr`` the
  policy's summed log-probs of chosen/rejected and ``rc``/``rr`` the reference's: the base with the adapter
  switched off (PEFT ``disable_adapter``), computed once before training in a no-grad packed pass
  (:func:`reference_log_probs`; TRL's ``precompute_ref_log_probs``), so no second model and no adapter toggling
  inside a compiled step. Normalised per pair of the optimizer step.
* **ORPO** (Hong et al. 2024), no reference: the NLL of the chosen response (per chosen target token of the step,
  as SFT) plus ``beta * -logsigmoid(log_odds)`` per pair, with the log odds of the length-normalised log-probs.
  TRL's ORPOTrainer (``trl.experimental.orpo``) puts the prompt's tokens into its NLL term too; ours is the
  paper's (the response only), and ``tests/unit/test_preference_parity.py`` compares the terms accordingly.

Every normaliser (pairs, chosen target tokens) is the whole optimizer step's, over accumulation and ranks, so a
step's gradient does not depend on how its pairs were laid into micro-batches or spread over ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


# ----------------------------------------------------------------------------- pairs

def response_only(encoded: dict) -> dict:
    """``encoded`` (``train.encode_example``) with only its last answer trained: a pair's earlier assistant turns
    are part of its shared prompt (TRL's convention), so only the final contiguous run of labels is kept."""
    labels = list(encoded["labels"])
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return {"input_ids": list(encoded["input_ids"]),
            "labels": [IGNORE] * start + labels[start:end] + [IGNORE] * (len(labels) - end)}


def encode_pair(tok, pair, max_len: int, index: int, cut: list[int] | None = None) -> dict | None:
    """A pair as the trainer packs it: ``{"chosen", "rejected"}`` (each ``input_ids``/``labels``, the prompt masked),
    ``index`` (its position in its set: where its reference log-probs are), ``line``; None when a side's prompt alone
    does not fit ``max_len`` or a side has nothing to learn."""
    from jobs.trainer.train import encode_example

    sides, was_cut = [], False
    for row in (pair.chosen, pair.rejected):
        enc = encode_example(tok, row, max_len)
        if enc is None:
            return None
        was_cut = enc.pop("cut", False) or was_cut
        enc = response_only(enc)
        if target_tokens(enc) == 0:
            return None
        sides.append(enc)
    if was_cut and cut is not None:  # a side's answer cut at max_len: named in the data report
        cut.append(pair.line)
    return {"chosen": sides[0], "rejected": sides[1], "index": index, "line": pair.line}


def encode_pairs(tok, pairs, max_len: int, cut: list[int] | None = None) -> tuple[list[dict], list[int]]:
    """Every pair encoded (:func:`encode_pair`), and the lines of those that did not fit; the lines of pairs kept
    with an answer cut at ``max_len`` go to ``cut`` when given."""
    out, too_long = [], []
    for p in pairs:
        e = encode_pair(tok, p, max_len, len(out), cut)
        if e is None:
            too_long.append(p.line)
        else:
            out.append(e)
    return out, too_long


def target_tokens(example: dict) -> int:
    """Tokens that carry a loss (the labels shifted by one: position 0 never does)."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE)


def pair_tokens(pair: dict) -> int:
    return len(pair["chosen"]["input_ids"]) + len(pair["rejected"]["input_ids"])


def pack_pairs(pairs: list[dict], max_tokens: int) -> list[dict]:
    """One step's pairs into as few micro-batches of <= ``max_tokens`` as fit, each pair whole: its chosen then its
    rejected (examples 2j and 2j+1 of a micro-batch are pair ``pairs[j]``). First-fit decreasing, as
    ``fastpath.pack_step``; a pair longer than ``max_tokens`` goes alone. Same fields as ``pack_step`` plus
    ``pairs`` (each pair's ``index``) and ``chosen_targets`` (the chosen sides' target tokens)."""
    order = sorted(pairs, key=lambda p: -pair_tokens(p))
    bins: list[list] = []
    for p in order:
        n = pair_tokens(p)
        for b in bins:
            if b[0] + n <= max_tokens:
                b[0] += n
                b[1].append(p)
                break
        else:
            bins.append([n, [p]])
    out = []
    for _, group in bins:
        mb: dict = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": [], "pairs": [],
                    "chosen_targets": 0}
        for p in group:
            for side in (p["chosen"], p["rejected"]):
                ids = side["input_ids"]
                mb["input_ids"].extend(ids)
                mb["labels"].extend(side["labels"])
                mb["position_ids"].extend(range(len(ids)))
                mb["seq_lens"].append(len(ids))
            mb["pairs"].append(p["index"])
            mb["chosen_targets"] += target_tokens(p["chosen"])
        out.append(mb)
    return out


# ----------------------------------------------------------------------------- losses

def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def dpo_losses(pc, pr, rc, rr, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: DPO's sigmoid loss, and the implicit rewards ``beta * (policy - reference)`` of chosen and
    rejected (detached)."""
    chosen_logratio, rejected_logratio = pc - rc, pr - rr
    loss = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    return loss, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def orpo_odds_losses(avg_c, avg_r, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: ORPO's odds-ratio term ``beta * -logsigmoid(log_odds)`` of the length-normalised log-probs, and
    the log odds (detached)."""
    avg_c, avg_r = avg_c.float(), avg_r.float()
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    return -beta * F.logsigmoid(log_odds), log_odds.detach()


@dataclass
class Objective:
    """SFT (``method == "sft"``) or a preference loss, chosen once for a run: how a step's examples are laid into
    micro-batches, what each step is normalised by, the loss of one micro-batch, and what a step's statistics
    read as. Statistics are a small tensor summed over micro-batches and ranks (no host sync in a step)."""

    method: str = "sft"
    beta: float = 0.1  # a preference run's is the spec's (training.preference_beta(): :meth:`for_spec`)
    #: DPO: the reference's summed log-probs of each pair's chosen and rejected (``[pairs, 2]``, by ``index``), of
    #: the training pairs and of the held-out ones (:meth:`prepare`)
    ref: torch.Tensor | None = None
    val_ref: torch.Tensor | None = None
    #: DPO's reference: None, the base (the adapter switched off); or spec.base_adapter's URI, the adapter the run
    #: starts from, frozen (its log-probs are taken before the first step, with the adapter as loaded)
    base_adapter: str | None = None
    #: with a base_adapter, the held-out pairs' preference accuracy under it (:meth:`prepare`)
    reference_accuracy: float | None = None

    def prepare(self, model, train: list[dict], val: list[dict], budget, strategy) -> None:
        """Before training, on the adapter as wrapped (and again on resume, before the checkpoint is restored:
        nothing of it is checkpointed): DPO's reference log-probs of the training and held-out pairs, one no-grad
        packed pass of the base (the adapter switched off), or of the base_adapter the run starts from (the adapter
        as loaded); the held-out pairs' base log-probs are :meth:`measure_base`'s where it ran."""
        if self.method != "dpo":
            return
        import logging
        import time

        t0 = time.perf_counter()
        frozen = self.base_adapter is not None
        self.ref = reference_log_probs(model, train, budget, strategy, adapter_on=frozen)
        if val and (frozen or self.val_ref is None or self.val_ref.shape[0] != len(val)):  # else measure_base's
            self.val_ref = reference_log_probs(model, val, budget, strategy, adapter_on=frozen)
        if frozen and val:
            assert self.val_ref is not None
            self.reference_accuracy = float((self.val_ref[:, 0] > self.val_ref[:, 1]).double().mean())
        logging.getLogger("jobs").info(
            "DPO: the reference's log-probs of %d training pairs (%s) in %.1fs", len(train),
            f"the base_adapter {self.base_adapter}, frozen" if frozen else "the base, adapter off",
            time.perf_counter() - t0)

    def length(self, example: dict) -> int:
        """Tokens of one unit of the schedule (an example, or a pair's two sides)."""
        return pair_tokens(example) if self.preference else len(example["input_ids"])

    def validate(self, model, examples: list[dict], budget, strategy):
        """The held-out loss of ``examples`` (``mean``, this rank's per-example ``mine``): SFT's cross-entropy
        (``train.evaluate_loss``), or the preference loss of held-out pairs (:func:`evaluate_pairs`)."""
        if not self.preference:
            from jobs.trainer.train import evaluate_loss

            return evaluate_loss(model, examples, budget, strategy)
        return evaluate_pairs(model, examples, budget, strategy, self, self.val_ref)

    def validation_metrics(self, measured) -> dict:
        """What a validation shows beside its loss: preference accuracy and DPO's reward accuracy and margin."""
        if not isinstance(measured, PairMetrics):
            return {}
        out = {"preference_accuracy": measured.preference_accuracy}
        if measured.reward_accuracy is not None and measured.reward_margin is not None:
            out.update(reward_accuracy=measured.reward_accuracy, reward_margin=measured.reward_margin)
        return out

    @classmethod
    def for_spec(cls, spec) -> "Objective":
        t = spec.training
        return cls(t.method, t.preference_beta(), base_adapter=spec.base_adapter) if t.method != "sft" else cls("sft")

    @property
    def preference(self) -> bool:
        return self.method in ("dpo", "orpo")

    def measure_base(self, model, examples: list[dict], budget, strategy):
        """The held-out loss of the base (the model as loaded, no adapter), as :meth:`validate` measures the
        adapter's: for DPO the base is its own reference (its loss is log 2, its rewards 0)."""
        if not self.preference:
            return self.validate(model, examples, budget, strategy)
        if not examples:
            return None
        measured = evaluate_pairs(model, examples, budget, strategy, self, "self" if self.method == "dpo" else None)
        if self.method == "dpo" and measured is not None:  # the base's log-probs are the held-out pairs' reference
            self.val_ref = by_index(examples, torch.tensor(measured.log_probs, dtype=torch.float64))
        return measured

    # what a step is normalised by ----------------------------------------------------------------

    def pack(self, examples: list[dict], tokens: int) -> list[dict]:
        from jobs.trainer import fastpath

        return pack_pairs(examples, tokens) if self.preference else fastpath.pack_step(examples, tokens)

    def counts(self, mbs: list[dict]) -> list[float]:
        """This rank's normalisers of a step: SFT [target tokens]; DPO [pairs]; ORPO [chosen target tokens, pairs]."""
        from jobs.trainer.train import _target_tokens

        if self.method == "dpo":
            return [float(sum(len(mb["pairs"]) for mb in mbs))]
        if self.method == "orpo":
            return [float(sum(mb["chosen_targets"] for mb in mbs)), float(sum(len(mb["pairs"]) for mb in mbs))]
        return [float(sum(_target_tokens(mb) for mb in mbs))]

    @property
    def stats_size(self) -> int:
        return {"dpo": 4, "orpo": 4}.get(self.method, 1)

    def micro_loss(self, model, batch: dict, mb: dict, scale: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch: the loss to back-propagate (each term times its ``scale``: 1 / the step's total of its
        count, times what the strategy needs) and its statistics (fp32, ``[stats_size]``, detached).

        SFT: [loss sum]. DPO: [loss sum, pairs with chosen's reward above rejected's, reward margin sum, 0].
        ORPO: [chosen NLL sum, odds-ratio term sum, pairs whose chosen log-prob is above rejected's, log odds sum].
        """
        from jobs.trainer import fastpath

        if not self.preference:
            loss_sum, _ = fastpath.lm_loss(model, batch)
            return loss_sum * scale[0], loss_sum.detach().float().reshape(1)
        sums, counts = fastpath.example_losses(model, batch)
        logp = -sums
        pc, pr = logp[0::2], logp[1::2]
        if self.method == "dpo":
            assert self.ref is not None, "DPO needs the reference log-probs (reference_log_probs)"
            ref = self.ref[mb["pairs"]].to(pc.device, torch.float32)  # this micro-batch's pairs only
            loss, cr, rr = dpo_losses(pc, pr, ref[:, 0], ref[:, 1], self.beta)
            total = loss.sum()
            stats = torch.stack([total.detach(), (cr > rr).float().sum(), (cr - rr).sum(), torch.zeros_like(total)])
            return total * scale[0], stats.float()
        nc = torch.tensor(counts[0::2], dtype=torch.float32, device=pc.device)
        nr = torch.tensor(counts[1::2], dtype=torch.float32, device=pc.device)
        odds, log_odds = orpo_odds_losses(pc / nc, pr / nr, self.beta)
        nll = sums[0::2].sum()
        stats = torch.stack([nll.detach(), odds.sum().detach(), (pc / nc > pr / nr).float().sum().detach(),
                             log_odds.sum()])
        return nll * scale[0] + odds.sum() * scale[1], stats.float()

    def summary(self, stats, totals: list[float]) -> dict:
        """What a step's (or a set's) summed statistics read as: ``loss`` and, for preference runs, the rest."""
        s = [float(x) for x in stats]
        if not self.preference:
            return {"loss": s[0] / max(1.0, totals[0])}
        if self.method == "dpo":
            pairs = max(1.0, totals[0])
            return {"loss": s[0] / pairs, "reward_accuracy": s[1] / pairs, "reward_margin": s[2] / pairs}
        tokens, pairs = max(1.0, totals[0]), max(1.0, totals[1])
        return {"loss": s[0] / tokens + s[1] / pairs, "nll": s[0] / tokens, "odds_ratio_loss": s[1] / pairs,
                "preference_accuracy": s[2] / pairs, "log_odds": s[3] / pairs}

    def filler(self, examples: list[dict], tokens: int) -> dict:
        """A micro-batch whose loss counts for nothing (weighted 0): what a sharded rank runs when it has fewer
        micro-batches than another."""
        return self.pack(examples[:1], tokens)[0]


# ------------------------------------------------------------------- log-probs of a set

def sides(pairs: list[dict]) -> list[dict]:
    """chosen, rejected, chosen, rejected, ... of ``pairs``: the examples whose log-probs a set needs."""
    return [s for p in pairs for s in (p["chosen"], p["rejected"])]


def side_log_probs(model, pairs: list[dict], budget, strategy) -> torch.Tensor:
    """Each pair's summed target log-probs of chosen and rejected (``[pairs, 2]``, float64 on the CPU; every rank
    gets all of them), no grad, packed as validation is (``train.evaluate_loss``, each rank its share)."""
    from jobs.trainer.train import evaluate_loss

    if not pairs:
        return torch.zeros(0, 2, dtype=torch.float64)
    examples = sides(pairs)
    losses = evaluate_loss(model, examples, budget, strategy)
    assert losses is not None
    means = strategy.gather_per_example(losses.mine, len(examples))
    counts = [target_tokens(e) for e in examples]
    return -torch.tensor([m * n for m, n in zip(means, counts)], dtype=torch.float64).view(-1, 2)


def reference_log_probs(model, pairs: list[dict], budget, strategy, *, adapter_on: bool = False) -> torch.Tensor:
    """DPO's reference: :func:`side_log_probs` of the base (the adapter switched off), or with ``adapter_on`` of
    the model as it is (the base_adapter a run starts from, before its first step), by pair ``index``."""
    import contextlib

    with contextlib.nullcontext() if adapter_on else model.disable_adapter():
        return by_index(pairs, side_log_probs(model, pairs, budget, strategy))


def by_index(pairs: list[dict], values: torch.Tensor) -> torch.Tensor:
    """``values`` (one row per pair, in ``pairs``' order) placed by each pair's ``index``."""
    out = torch.zeros(len(pairs), *values.shape[1:], dtype=values.dtype)
    for i, p in enumerate(pairs):
        out[p["index"]] = values[i]
    return out


@dataclass
class PairMetrics:
    """A set of pairs under one model: the preference loss (``mean``; ``mine``: this rank's share of the per-pair
    losses, as ``train.Losses``), preference accuracy (the model gives chosen the higher summed log-prob), and,
    with a reference, DPO's implicit reward accuracy and mean margin."""

    mean: float
    mine: list[float]
    preference_accuracy: float
    reward_accuracy: float | None
    reward_margin: float | None
    log_probs: list[list[float]]  # [chosen, rejected] per pair


def evaluate_pairs(model, pairs: list[dict], budget, strategy, objective: Objective,
                   ref) -> PairMetrics | None:
    """The held-out preference loss of ``pairs`` (what validation and early stopping use for DPO/ORPO runs) and its
    accuracies. ``ref``: the reference's log-probs by pair ``index`` (:func:`reference_log_probs`), "self" (the model
    is the reference: the base), or None (ORPO). Every rank gets the same ``mean``; ``mine`` is its share
    (``pairs[rank::world]``) of per-pair losses."""
    if not pairs:
        return None
    lp = side_log_probs(model, pairs, budget, strategy)
    pc, pr = lp[:, 0], lp[:, 1]
    if isinstance(ref, str):
        ref = torch.zeros(max(p["index"] for p in pairs) + 1, 2, dtype=torch.float64)
        ref[torch.tensor([p["index"] for p in pairs])] = lp
    pref_acc = float((pc > pr).double().mean())
    reward_acc = margin = None
    if ref is not None:
        r = ref[torch.tensor([p["index"] for p in pairs])].double()
        margins = objective.beta * ((pc - r[:, 0]) - (pr - r[:, 1]))
        reward_acc, margin = float((margins > 0).double().mean()), float(margins.mean())
    if objective.method == "orpo":
        nc = torch.tensor([target_tokens(p["chosen"]) for p in pairs], dtype=torch.float64)
        nr = torch.tensor([target_tokens(p["rejected"]) for p in pairs], dtype=torch.float64)
        odds, _ = orpo_odds_losses(pc / nc, pr / nr, objective.beta)
        per = (-pc / nc + odds.double())
        mean = float(-pc.sum() / nc.sum() + odds.double().mean())
    else:
        assert ref is not None, "DPO's held-out loss needs the reference log-probs"
        r = ref[torch.tensor([p["index"] for p in pairs])].double()
        per, _, _ = dpo_losses(pc, pr, r[:, 0], r[:, 1], objective.beta)
        mean = float(per.mean())
    world = strategy.world
    return PairMetrics(mean=mean, mine=[float(x) for x in per[world.rank::world.size]],
                       preference_accuracy=pref_acc, reward_accuracy=reward_acc, reward_margin=margin,
                       log_probs=lp.tolist())
