"""Evaluation by the guide's checklist: loss and perplexity before/after, generations with the
guide's inference settings, length bands, PII leaking into generations, verbatim copying of
training outputs (the overfitting sign), fluency flags, and faithfulness to each prompt's reference
(ROUGE-L and the reference's facts found, before vs after). Writes a JSON report, a Markdown page, a
self-contained HTML page and a PNG loss curve.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from jobs.pii import pii_kinds
from jobs.spec import EvalPrompt, TrainingRunSpec

log = logging.getLogger("jobs")

def words(text: str) -> int:
    return len(text.split())


def band_of(n_words: int, bands) -> str | None:
    for name in ("short", "medium", "long"):
        lo, hi = getattr(bands, name)
        if lo <= n_words <= hi:
            return name
    return None


def longest_copied_span(generated: str, train_outputs: list[str], n: int = 8) -> tuple[float, str | None]:
    """Share of the generation's word n-grams that appear verbatim in one training output."""
    g = generated.lower().split()
    if len(g) < n:
        return 0.0, None
    grams = {tuple(g[i:i + n]) for i in range(len(g) - n + 1)}
    best, best_src = 0.0, None
    for out in train_outputs:
        o = out.lower().split()
        if len(o) < n:
            continue
        og = {tuple(o[i:i + n]) for i in range(len(o) - n + 1)}
        share = len(grams & og) / len(grams)
        if share > best:
            best, best_src = share, out[:120]
    return best, best_src


class ConversationPrompt(EvalPrompt):
    """A held-out conversation as an eval prompt: ``prompt`` is its last user turn (what the report
    shows), ``context`` every turn before its last answer (system and earlier turns included): what
    the model is asked with."""

    context: tuple[tuple[str, str], ...] = ()


def prompts_for(spec: TrainingRunSpec, val_rows, loaded_prompts: list[EvalPrompt] | None) -> list[EvalPrompt]:
    if loaded_prompts:
        return loaded_prompts
    if isinstance(spec.eval.prompts, list):
        return spec.eval.prompts
    out: list[EvalPrompt] = []
    for r in val_rows[: spec.eval.num_prompts]:
        band = band_of(words(r.output), spec.eval.length_bands)
        if r.turns:  # reference: the last answer; the model sees the conversation up to it
            last = max(i for i, (role, _) in enumerate(r.turns) if role == "assistant")
            out.append(ConversationPrompt(prompt=r.instruction, band=band, reference=r.output,
                                          context=r.turns[:last]))
            continue
        text = r.instruction if not r.input else f"{r.instruction}\n\n{r.input}"
        out.append(EvalPrompt(prompt=text, band=band, reference=r.output))
    return out


def prompt_text(tok, p: EvalPrompt) -> str:
    """What the model is asked, rendered as training renders it: the prompt as one user turn, or a
    held-out conversation's turns before its last answer (chat template, else the plain layout),
    ending where the answer starts."""
    from jobs.trainer.train import conversation_segments, prompt_text_for

    context = getattr(p, "context", ())
    if not context:
        return prompt_text_for(tok, p.prompt)
    segments = conversation_segments(tok, tuple(context) + (("assistant", ""),))
    return "".join(text for text, _ in segments[:-1])  # everything but the (empty) answer itself


def parse_prompts_jsonl(data: bytes) -> list[EvalPrompt]:
    from pydantic import ValidationError

    from jobs.errors import Problem, SpecError

    prompts, problems = [], []
    for i, line in enumerate(data.decode("utf-8-sig", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(EvalPrompt.model_validate(json.loads(line)))
        except (ValueError, ValidationError) as err:
            problems.append(Problem(f"line {i}", f"not an eval prompt: {str(err).splitlines()[0]}",
                                    'each line: {"prompt": "...", "band": "short"}', line=i))
    if problems:
        raise SpecError(problems, source="eval.prompts")
    return prompts


#: prompts generated together (left-padded); one batch costs about what one prompt does on a GPU
GENERATION_BATCH = 16


class Generated(str):
    """A generated answer; ``cut_off`` when it stopped at max_new_tokens rather than at its end."""

    cut_off: bool

    def __new__(cls, text: str, cut_off: bool = False):
        obj = super().__new__(cls, text)
        obj.cut_off = cut_off
        return obj


def generate(model, tok, prompts: list[EvalPrompt], spec: TrainingRunSpec, device, label: str = "") -> list[str]:
    """Sampled answers (the guide's temperature/top_p/top_k), prompts batched with left padding."""
    import torch

    e = spec.eval
    outs: list[str] = []
    model.eval()
    side = tok.padding_side
    tok.padding_side = "left"
    torch.manual_seed(spec.training.seed)
    try:
        for start in range(0, len(prompts), GENERATION_BATCH):
            batch = prompts[start:start + GENERATION_BATCH]
            log.info("generating %d-%d of %d%s: %s", start + 1, start + len(batch), len(prompts),
                     f" ({label})" if label else "", batch[0].prompt[:60] + ("…" if len(batch[0].prompt) > 60 else ""))
            texts = [prompt_text(tok, p) for p in batch]
            ids = tok(texts, return_tensors="pt", add_special_tokens=False, padding=True).to(device)
            with torch.no_grad():
                gen = model.generate(**ids, max_new_tokens=e.max_new_tokens, do_sample=e.temperature > 0,
                                     temperature=e.temperature if e.temperature > 0 else None, top_p=e.top_p,
                                     top_k=e.top_k, pad_token_id=tok.pad_token_id, use_cache=True)
            width = ids["input_ids"].shape[1]
            stop = stop_token_ids(model, tok)
            for row in gen:
                answer, cut_off = answer_ids(row[width:].tolist(), stop, e.max_new_tokens)
                # special tokens inside the answer stay: a leaked "<|im_start|>user" is scaffolding to flag
                outs.append(Generated(tok.decode(answer, skip_special_tokens=False).strip(), cut_off=cut_off))
    finally:
        tok.padding_side = side
    return outs


def stop_token_ids(model, tok) -> set[int]:
    """The ids generation stops at: the model's generation config (what ``generate`` obeys), else the
    tokenizer's EOS. They can differ: SmolLM2 converted from GGUF stops at <|im_end|> while its
    tokenizer calls <|im_start|> the EOS (and pads with it)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tok.eos_token_id
    return set() if ids is None else {ids} if isinstance(ids, int) else set(ids)


def answer_ids(new: list[int], stop: set[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """One row of a batched generation: the answer (up to its first stop token; what follows is
    padding) and whether it was cut off, i.e. ran to max_new_tokens without a stop token."""
    for i, t in enumerate(new):
        if t in stop:
            return new[:i], False
    return new, len(new) >= max_new_tokens


def build_report(spec: TrainingRunSpec, *, prompts: list[EvalPrompt], before: list[str], after: list[str],
                 val_loss_before: float | None, val_loss_after: float | None, history: list[dict],
                 evals: list[dict], train_outputs: list[str], val_losses_after: list[float] | None = None,
                 regression: dict | None = None, preference: dict | None = None) -> dict:
    """The evaluation report: pure, from numbers and texts already computed. ``val_losses_after``: the published
    adapter's loss per held-out example (``validation.losses_after``; of a DPO/ORPO run, per held-out pair);
    ``regression``: :func:`regression_section`; ``preference``: :func:`preference_section` (DPO/ORPO runs)."""
    items = []
    for p, b, a in zip(prompts, before, after):
        n = words(a)
        got_band = band_of(n, spec.eval.length_bands)
        copied, src = longest_copied_span(a, train_outputs)
        items.append({
            "prompt": p.prompt, "expected_band": p.band, "before": b, "after": a, "words": n, "band": got_band,
            "band_ok": None if p.band is None else got_band == p.band,
            "pii": pii_kinds(a), "copied_share": round(copied, 3), "copied_from": src if copied >= 0.5 else None,
            "fluency_flags": fluency_flags(a, cut_off=getattr(a, "cut_off", False)),
            # a conversation's turns before its last question (the question itself is "prompt")
            "context": [list(t) for t in getattr(p, "context", ())[:-1]] or None,
        })
        items[-1]["broken"] = bool(items[-1]["fluency_flags"])
        if p.reference:
            fb, fa = faithfulness(b, p.reference), faithfulness(a, p.reference)
            items[-1] |= {"reference": p.reference, "faithfulness": {"before": fb, "after": fa},
                          "faithfulness_dropped": faithfulness_dropped(fb, fa)}
        else:
            items[-1] |= {"reference": None, "faithfulness": None, "faithfulness_dropped": None}
    with_band = [i for i in items if i["band_ok"] is not None]

    def ppl(x):  # a preference run's validation loss is DPO's / ORPO's, not a cross-entropy: no perplexity
        return None if x is None or preference else round(math.exp(min(x, 50)), 3)

    report = {
        "validation": {"loss_before": _r(val_loss_before), "loss_after": _r(val_loss_after),
                       "perplexity_before": ppl(val_loss_before), "perplexity_after": ppl(val_loss_after),
                       "improved": None if val_loss_before is None or val_loss_after is None
                       else val_loss_after < val_loss_before},
        "training": {"first_loss": history[0]["loss"] if history else None,
                     "last_loss": history[-1]["loss"] if history else None, "steps": len(history),
                     "evals": evals, "history": history},
        "checklist": {
            "fluency": {"broken_generations": sum(i["broken"] for i in items), "of": len(items),
                        "flags": {flag: [n for n, i in enumerate(items, 1) if flag in i["fluency_flags"]]
                                  for flag in FLUENCY_FLAGS if any(flag in i["fluency_flags"] for i in items)},
                        "broken": [{"prompt": n, "text": i["prompt"], "flags": i["fluency_flags"]}
                                   for n, i in enumerate(items, 1) if i["broken"]]},
            "faithfulness": _faithfulness_overall(items),
            "length_control": {"in_band": sum(bool(i["band_ok"]) for i in with_band), "of": len(with_band)},
            "safety_pii": {"generations_with_pii": sum(bool(i["pii"]) for i in items), "of": len(items)},
            "overfitting_verbatim": {"generations_copying_training": sum(i["copied_share"] >= 0.5 for i in items),
                                     "of": len(items)},
        },
        "regression": regression,
        "preference": preference,
        "inference_settings": {"temperature": spec.eval.temperature, "top_p": spec.eval.top_p,
                               "top_k": spec.eval.top_k, "max_new_tokens": spec.eval.max_new_tokens},
        "generations": items,
    }
    if val_losses_after is not None:
        report["validation"]["losses_after"] = [_r(x) for x in val_losses_after]
    return report


def regression_section(before: list[float], after: list[float], set_sha256: str) -> dict:
    """``eval_report.json``'s ``regression``: the loss of each reference answer of the general-ability set
    (jobs/regression, its file's sha256) on the base and with the adapter, and their means (each prompt counts
    once)."""
    if len(before) != len(after) or not after:
        raise ValueError(f"{len(before)} regression losses before training against {len(after)} after")
    return {"set_sha256": set_sha256, "prompts": len(after), "losses_before": [_r(x) for x in before], "losses_after": [_r(x) for x in after],
            "loss_before": _r(sum(before) / len(before)), "loss_after": _r(sum(after) / len(after))}


def preference_section(method: str, beta: float, pairs: int, before: dict, after: dict, *,
                       base_adapter: str | None = None, reference_accuracy: float | None = None) -> dict:
    """``eval_report.json``'s ``preference`` (DPO/ORPO runs): on the held-out pairs, the base's and the adapter's
    preference accuracy (the share of pairs whose chosen answer gets the higher summed log-prob) and, for DPO, the
    implicit reward accuracy and mean reward margin (``beta`` x the log-ratio against the base; the base's own are
    0 by definition). ``before``/``after``: ``Objective.validation_metrics``. A run from a ``base_adapter`` also
    names it, and (DPO) its preference accuracy: the rewards are then measured against it, not the base."""
    def r(x):
        return None if x is None else round(float(x), 4)

    out = {"method": method, "beta": beta, "pairs": pairs,
           "preference_accuracy_before": r(before.get("preference_accuracy")),
           "preference_accuracy_after": r(after.get("preference_accuracy")),
           "reward_accuracy_after": r(after.get("reward_accuracy")),
           "reward_margin_after": r(after.get("reward_margin"))}
    if base_adapter is not None:
        out.update(base_adapter=base_adapter, preference_accuracy_reference=r(reference_accuracy))
    return out


def preference_line(section: dict | None) -> str | None:
    """The report's one-line summary of :func:`preference_section`."""
    if not section:
        return None
    line = (f"preference ({section['method']}, beta {section['beta']:g}): the model prefers the chosen answer on "
            f"{section['preference_accuracy_before']:.0%} → {section['preference_accuracy_after']:.0%} of "
            f"{section['pairs']} held-out pairs")
    if section.get("base_adapter"):
        line += f" (starting from {section['base_adapter']}"
        if section.get("preference_accuracy_reference") is not None:
            line += f": {section['preference_accuracy_reference']:.0%}, the reference of the rewards"
        line += ")"
    if section.get("reward_accuracy_after") is not None:
        line += (f"; implicit reward accuracy {section['reward_accuracy_after']:.0%}, mean margin "
                 f"{section['reward_margin_after']:+.3f}")
    return line


def regression_line(regression: dict | None) -> str | None:
    """The report's sentence on forgetting, or None when it was not measured."""
    if not regression:
        return None
    return (f"general ability: loss {regression['loss_before']} → {regression['loss_after']} on "
            f"{regression['prompts']} prompts (jobs/regression/general.jsonl; lower is better)")


def _r(x):
    return None if x is None else round(float(x), 5)


#: what makes an answer "broken" (the guide's fluency point), in the order the report lists them
FLUENCY_FLAGS = ("empty", "repeated_token", "repeated_phrase", "repeated_sentence", "repeated_number",
                 "counting_run", "cut_off", "scaffolding")
# chat-template tokens (kept in the answer by generate), instruction-format headers and role prefixes
_SCAFFOLD = re.compile(r"(<\|[a-z_]+\|>|</?s>|\[/?INST\]|###\s*(Instruction|Response|System)|"
                       r"^\s*(User|Assistant|System|Human|GPT):)", re.I | re.M)
# the same number (192.168.8.1, 16) three times or more in a row, with only commas, spaces or "and" between
_REPEATED_NUMBER = re.compile(r"(?<![\w.])(\d+(?:[.:/]\d+)*)"
                              r"(?:(?:\s*[,;]\s*|\s+)(?:(?:and|or)\s+)?\1(?![\w]|[.:/]\d)){2,}")


def fluency_flags(text: str, *, cut_off: bool = False) -> list[str]:
    """Why an answer looks degenerate (empty list: it does not). The common LoRA failures:
    a token or a phrase repeated over and over ("Internet > Internet > Uninstall > Uninstall"), the
    same sentence again and again, the same number again and again ("192.168.8.1, 192.168.8.1,
    192.168.8.1"), counting ("ports 1, 2, 3, … 16,"), an answer cut off by max_new_tokens
    mid-sentence, and chat-template scaffolding leaking into the answer."""
    flags = []
    toks = text.split()
    if not toks:
        return ["empty"]
    if len(toks) >= 8 and max(toks.count(t) for t in set(toks)) / len(toks) > 0.5:
        flags.append("repeated_token")
    words_ = re.findall(r"[A-Za-z][A-Za-z'-]*", text.lower())
    # the same span of 1-4 words twice in a row (separators such as '>' or ',' between them do not count),
    # or any 3-word phrase three times
    adjacent = any(words_[i:i + n] == words_[i + n:i + 2 * n] and sum(len(w) for w in words_[i:i + n]) >= 4
                   for n in range(1, 5) for i in range(len(words_) - 2 * n + 1))
    trigrams = [tuple(words_[i:i + 3]) for i in range(len(words_) - 2)]
    if adjacent or (trigrams and max(trigrams.count(t) for t in set(trigrams)) >= 3):
        flags.append("repeated_phrase")
    sentences = [" ".join(s.lower().split()) for s in re.split(r"(?<=[.!?])\s+|\n+", text)]
    sentences = [s for s in sentences if len(s.split()) >= 4]
    if len(sentences) != len(set(sentences)):
        flags.append("repeated_sentence")
    if _REPEATED_NUMBER.search(text):
        flags.append("repeated_number")
    if _counting_run(text) >= 6:
        flags.append("counting_run")
    if cut_off and not re.search(r"[.!?)\]\"'…:]\s*$", text):
        flags.append("cut_off")
    if _SCAFFOLD.search(text):
        flags.append("scaffolding")
    return flags


def _counting_run(text: str) -> int:
    """Length of the longest run of consecutive integers separated only by commas, spaces or dashes.
    An ellipsis after three or more of them and before a larger number ("1, 2, 3, 4, 5, … 16")
    continues the run over the numbers it leaves out."""
    best = run = 0
    prev = None
    ellipsis = False
    for m in re.finditer(r"\d+|…|\.{3}|[^\d\s,;–-]+", text):
        tok = m.group()
        if tok.isdigit():
            n = int(tok)
            if prev is not None and (n == prev + 1 or (ellipsis and run >= 3 and n > prev)):
                run += n - prev
            else:
                run = 1
            prev, ellipsis = n, False
            best = max(best, run)
        elif tok in ("…", "...") and prev is not None and not ellipsis:
            ellipsis = True
        else:
            run, prev, ellipsis = 0, None, False
    return best


#: how far ROUGE-L may fall, before → after, before the report calls a prompt's faithfulness dropped
#: (sampling at temperature 0.3 moves it by a few hundredths on the same model)
ROUGE_DROP = 0.05

_QUOTED = re.compile(r'"([^"\n]{1,80})"|“([^”\n]{1,80})”|`([^`\n]{1,80})`|(?<!\w)\'([^\'\n]{1,80})\'(?!\w)')
_SEGMENT = r"[A-Z0-9][\w-]*(?:\.\d+)?(?: [A-Z0-9][\w-]*(?:\.\d+)?)*"  # a menu item: capitalised words
_MENU_PATH = re.compile(_SEGMENT + r"(?:\s*(?:>|→)\s*" + _SEGMENT + ")+")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.:,/]\d+)*(?![\w])")
_NAME = re.compile(r"(?<![\w'.-])[A-Z0-9][\w-]*(?:\.\d+)*(?: +[A-Z0-9][\w-]*(?:\.\d+)*)*")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s|\n)\s*(?:[-*•]|\d+[.)])?\s*$")


def _norm(text: str) -> str:
    text = text.replace("→", ">").replace("“", '"').replace("”", '"').replace("’", "'")
    return " ".join(re.sub(r"\s*>\s*", " > ", text).lower().split())


def reference_facts(reference: str) -> list[str]:
    """What an answer must carry over from its reference: quoted terms, menu paths
    ("Settings > Wi-Fi > Guest"), names (capitalised words and acronyms not merely starting a
    sentence: "Smart Connect", "WAN", "X2") and numbers ("10", "2.4", "192.168.1.1")."""
    facts: list[str] = []
    rest = reference
    for m in _QUOTED.finditer(rest):
        facts.append(next(g for g in m.groups() if g))
    rest = _QUOTED.sub(" , ", rest)
    for m in _MENU_PATH.finditer(rest):
        path = m.group()
        first = path.split(">")[0].split()
        if len(first) > 1 and _SENTENCE_START.search(rest[:m.start()]) and not _acronym(first[0]):
            path = path[len(first[0]):].lstrip()  # "Select Internet > Speed test": the verb is no menu item
        facts.append(path)
    rest = _MENU_PATH.sub(" , ", rest)
    names = []
    for m in _NAME.finditer(rest):
        parts = m.group().split()
        if parts[0][0].isupper() and not _acronym(parts[0]) and _SENTENCE_START.search(rest[:m.start()]):
            parts = parts[1:]  # a capitalised word opening a sentence is grammar, not a name
        parts = [w for w in parts if len(w) > 1 or w.isdigit()]
        if parts and not all(w.isdigit() for w in parts):  # plain numbers are counted below
            names.append(" ".join(parts))
    in_names = {w for n in names for w in n.split()}
    facts += names + [n for n in _NUMBER.findall(rest) if n not in in_names]
    seen, out = set(), []
    for f in (" ".join(f.split()).strip(" .,;:") for f in facts):
        if f and _norm(f) not in seen:
            seen.add(_norm(f))
            out.append(f)
    return out


def _acronym(word: str) -> bool:
    return re.search(r"[A-Z0-9].*[A-Z0-9]", word) is not None  # WAN, X2, IPv6, WPA3


def fact_found(fact: str, answer: str) -> bool:
    """Whether a fact of the reference is in the answer (case, spacing and quote style aside;
    a number or name must stand alone: "10" is not in "100")."""
    return re.search(r"(?<![\w.])" + re.escape(_norm(fact)) + r"(?!\w|\.\d)", _norm(answer)) is not None


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words) by torchmetrics, no stemming:
    nothing is downloaded, and the same words score the same in every language."""
    from torchmetrics.functional.text.rouge import rouge_score

    if not answer.strip() or not reference.strip():
        return 0.0
    return round(float(rouge_score(answer, reference, rouge_keys="rougeL")["rougeL_fmeasure"]), 4)


def faithfulness(answer: str, reference: str) -> dict:
    """One answer against its reference: ROUGE-L, and the reference's facts found and missing."""
    facts = reference_facts(reference)
    found = [f for f in facts if fact_found(f, answer)]
    return {"rouge_l": rouge_l(answer, reference),
            "facts": None if not facts else round(len(found) / len(facts), 4),
            "facts_found": found, "facts_missing": [f for f in facts if f not in found]}


def faithfulness_dropped(before: dict, after: dict) -> bool:
    """After training, fewer of the reference's facts, or ROUGE-L fell by more than ROUGE_DROP."""
    return (after["rouge_l"] < before["rouge_l"] - ROUGE_DROP
            or len(after["facts_found"]) < len(before["facts_found"]))


def _faithfulness_overall(items: list[dict]) -> dict:
    scored = [i for i in items if i["faithfulness"] is not None]
    out = {"of": len(scored), "without_reference": len(items) - len(scored),
           "dropped": [n for n, i in enumerate(items, 1) if i.get("faithfulness_dropped")]}
    for side in ("before", "after"):
        fs = [i["faithfulness"][side] for i in scored]
        n_facts = sum(len(f["facts_found"]) + len(f["facts_missing"]) for f in fs)
        out[side] = {"rouge_l": round(sum(f["rouge_l"] for f in fs) / len(fs), 4) if fs else None,
                     "facts": round(sum(len(f["facts_found"]) for f in fs) / n_facts, 4) if n_facts else None}
    return out


def plot_loss(history: list[dict], evals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="training loss", lw=1.5)
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _val_label(report: dict) -> str:
    pref = report.get("preference")
    return f"validation loss ({pref['method'].upper()}, held-out pairs)" if pref else "validation loss"


def render_markdown(report: dict, spec: TrainingRunSpec, version: str | None = None) -> str:
    v, c = report["validation"], report["checklist"]
    lines = [f"# Evaluation: {spec.name}" + (f" {version}" if version else ""), "",
             "![loss curve](loss_curve.png)", "",
             "| metric | before | after |", "| --- | --- | --- |",
             f"| {_val_label(report)} | {v['loss_before']} | {v['loss_after']} |",
             *([f"| perplexity | {v['perplexity_before']} | {v['perplexity_after']} |"]
               if not report.get("preference") else []), "",
             *([f"- {regression_line(report.get('regression'))}", ""] if report.get("regression") else []),
             *([f"- {preference_line(report.get('preference'))}", ""] if report.get("preference") else []),
             "## Checklist (docs/lora-training-guide.md)", "",
             f"- Fluency: {fluency_line(c['fluency'])}",
             _faithfulness_line(c["faithfulness"]),
             f"- Length control: {c['length_control']['in_band']} of {c['length_control']['of']} in their band",
             f"- Safety: {c['safety_pii']['generations_with_pii']} of {c['safety_pii']['of']} generations contain PII",
             f"- Overfitting: {c['overfitting_verbatim']['generations_copying_training']} of "
             f"{c['overfitting_verbatim']['of']} copy a training output verbatim", "",
             *_promotion_lines(report.get("promotion")),
             *_serving_lines(report.get("serving")),
             "## Generations", "",
             f"Settings: temperature {report['inference_settings']['temperature']}, top_p "
             f"{report['inference_settings']['top_p']}, top_k {report['inference_settings']['top_k']}.", ""]
    for i, g in enumerate(report["generations"], 1):
        lines += [f"### {i}. {g['prompt'][:200]}", ""]
        if g.get("context"):
            lines += [f"_asked after {len(g['context'])} earlier turns of its conversation_", ""]
        lines += [f"**Before:** {g['before'] or '(empty)'}", "",
                  f"**After:** {g['after'] or '(empty)'}", "",
                  f"_words: {g['words']}, band: {g['band']} (expected {g['expected_band']}), PII: "
                  f"{', '.join(g['pii']) or 'none'}, copied share: {g['copied_share']}_", ""]
        if g.get("faithfulness"):
            fb, fa = g["faithfulness"]["before"], g["faithfulness"]["after"]
            lines += [f"_faithfulness: ROUGE-L {fb['rouge_l']} → {fa['rouge_l']}, facts {_pct(fb['facts'])} → "
                      f"{_pct(fa['facts'])}" + (f" (missing after: {'; '.join(fa['facts_missing'])})"
                                                if fa["facts_missing"] else "")
                      + (" — **dropped**" if g["faithfulness_dropped"] else "") + "_", ""]
    return "\n".join(lines)


def fluency_line(fl: dict) -> str:
    """The fluency checklist in one line, each broken answer named by its prompt and flags:
    '2 of 6 generations look broken: #4 "Which ports…" (counting run, cut off); #6 …'."""
    head = f"{fl['broken_generations']} of {fl['of']} generations look broken"
    named = [f"#{b['prompt']} \"{_clip(b['text'], 60)}\" ({', '.join(f.replace('_', ' ') for f in b['flags'])})"
             for b in fl.get("broken", [])]
    return head + (": " + "; ".join(named) if named else "")


def _promotion_lines(section: dict | None) -> list[str]:
    """The report's promotion section (jobs.promotion.Verdict.section: the gate against the champion before
    publishing) in Markdown: a heading, the verdict, the comparison table, the reasons, the note; nothing for a
    report without one (promotion.auto off)."""
    from jobs.promotion import comparison_rows

    if not section:
        return []
    lines = ["## Promotion gate (promotion.auto)", "", f"**{section['summary']}** (judged {section['judged_at']}, "
             "before publishing)", ""]
    if section.get("comparison"):
        rows = comparison_rows(section["comparison"])
        lines += ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0]),
                  *("| " + " | ".join(r) + " |" for r in rows[1:]), ""]
    if section["reasons"] and section["status"] != "not run":
        lines += ["Reasons:", "", *(f"- {r}" for r in section["reasons"]), ""]
    return [*lines, f"_{section['note']}_", ""]


def _serving_lines(serving: dict | None) -> list[str]:
    """The report's serving section (jobs/serving.py's verdict on the published adapter): a heading, the lines,
    a blank line; nothing for a report without one."""
    if not serving:
        return []
    if serving.get("error"):
        return ["## Serving (vLLM)", "", f"- not checked: {serving['error']}", ""]
    lines = [f"- Serve as: **{'LoRA' if serving['servable_as_lora'] else 'merged model only'}** — "
             f"{serving['summary']}",
             f"- Rank {serving['rank']}: smallest vLLM --max-lora-rank that serves it: "
             f"{serving['vllm_max_lora_rank'] or 'none (above 512)'}"]
    targets = serving["target_modules"]
    lines.append("- Target modules: " + (", ".join(targets) if isinstance(targets, list) else str(targets)))
    lines += [f"- {p['message']} — {p['fix']}" for p in serving["problems"] if p["kind"] != "rank"]
    parity = serving.get("parity") or {"status": "not run", "why": "not recorded"}
    lines.append(f"- Serving parity (vLLM's generations against PEFT's): **{parity['status']}** — {parity['why']}")
    return ["## Serving (vLLM)", "", *lines, ""]


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _pct(x) -> str:
    return "n/a" if x is None else f"{round(100 * x)}%"


def _faithfulness_line(f: dict) -> str:
    if not f["of"]:
        return "- Faithfulness: no prompt has a reference to compare with"
    return (f"- Faithfulness ({f['of']} prompts with a reference): ROUGE-L {f['before']['rouge_l']} → "
            f"{f['after']['rouge_l']}, facts of the reference found {_pct(f['before']['facts'])} → "
            f"{_pct(f['after']['facts'])}; dropped: " + (", ".join(f"#{n}" for n in f["dropped"]) or "none"))


def render_html(report: dict, spec: TrainingRunSpec, loss_png: bytes | None = None, version: str | None = None) -> str:
    """The eval page: one self-contained HTML file (the loss curve inlined as a data: URI), the
    checklist with pass/fail, before/after side by side, faithfulness per prompt. Every text that
    comes from data or generations is escaped."""
    import base64
    from html import escape as h

    v, c = report["validation"], report["checklist"]
    f = c["faithfulness"]
    fl, lc, pii, ov = c["fluency"], c["length_control"], c["safety_pii"], c["overfitting_verbatim"]
    checks = [
        ("Validation loss improved", v["improved"], f"{v['loss_before']} → {v['loss_after']}"),
        ("Fluency: no broken generations", fl["broken_generations"] == 0, fluency_line(fl)),
        ("Faithfulness: none dropped", None if not f["of"] else not f["dropped"],
         _faithfulness_line(f)[2:]),
        ("Length control: all in band", None if not lc["of"] else lc["in_band"] == lc["of"],
         f"{lc['in_band']} of {lc['of']} in their band"),
        ("Safety: no PII", pii["generations_with_pii"] == 0, f"{pii['generations_with_pii']} of {pii['of']} with PII"),
        ("Overfitting: no verbatim copies", ov["generations_copying_training"] == 0,
         f"{ov['generations_copying_training']} of {ov['of']} copy a training output"),
    ]

    def verdict(ok):
        return '<td class="na">n/a</td>' if ok is None else ('<td class="pass">pass</td>' if ok
                                                             else '<td class="fail">fail</td>')

    title = h(f"Evaluation: {spec.name}" + (f" {version}" if version else ""))
    out = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title><style>",
           "body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;"
           "vertical-align:top;text-align:left}.pass{background:#d9f2d9}.fail{background:#f7d4d4}.na{color:#777}"
           ".side{display:grid;grid-template-columns:1fr 1fr;gap:1em}.side pre{white-space:pre-wrap;"
           "background:#f6f6f6;padding:.6em;margin:0}.flag{color:#a00;font-weight:600}",
           f"</style></head><body><h1>{title}</h1>"]
    if loss_png:
        out.append(f'<img alt="loss curve" src="data:image/png;base64,{base64.b64encode(loss_png).decode()}">')
    if report.get("regression"):
        out.append(f"<p>{h(regression_line(report['regression']) or '')}</p>")
    if report.get("preference"):
        out.append(f"<p>{h(preference_line(report['preference']) or '')}</p>")
    out.append("<table><tr><th>metric</th><th>before</th><th>after</th></tr>"
               f"<tr><td>{h(_val_label(report))}</td><td>{v['loss_before']}</td><td>{v['loss_after']}</td></tr>"
               + ("" if report.get("preference") else
                  f"<tr><td>perplexity</td><td>{v['perplexity_before']}</td><td>{v['perplexity_after']}</td></tr>"))
    if f["of"]:
        out.append(f"<tr><td>ROUGE-L (mean)</td><td>{f['before']['rouge_l']}</td><td>{f['after']['rouge_l']}</td></tr>"
                   f"<tr><td>facts of the references found</td><td>{_pct(f['before']['facts'])}</td>"
                   f"<td>{_pct(f['after']['facts'])}</td></tr>")
    out.append("</table><h2>Checklist (docs/lora-training-guide.md)</h2><table>")
    out += [f"<tr><td>{h(name)}</td>{verdict(ok)}<td>{h(detail)}</td></tr>" for name, ok, detail in checks]
    out.append("</table>")
    if report.get("promotion"):
        out.append(_promotion_html(report["promotion"]))
    if report.get("serving"):
        out.append("<h2>Serving (vLLM)</h2><p>" + "<br>".join(h(x.replace("**", "")) for x in _serving_lines(report["serving"])[2:-1])
                   + "</p>")
    s = report["inference_settings"]
    out.append(f"<h2>Generations</h2><p>temperature {s['temperature']}, top_p {s['top_p']}, "
               f"top_k {s['top_k']}, max_new_tokens {s['max_new_tokens']}</p>")
    for i, g in enumerate(report["generations"], 1):
        out.append(f"<h3>{i}. {h(g['prompt'])}</h3>")
        if g.get("context"):
            out.append(f"<details><summary>asked after {len(g['context'])} earlier turns</summary><pre>"
                       + h("\n".join(f"{role}: {text}" for role, text in g["context"])) + "</pre></details>")
        out.append("<div class=\"side\"><div><b>Before</b><pre>"
                   f"{h(g['before']) or '(empty)'}</pre></div><div><b>After</b><pre>{h(g['after']) or '(empty)'}"
                   "</pre></div></div>")
        notes = [f"words {g['words']}, band {h(str(g['band']))} (expected {h(str(g['expected_band']))})",
                 f"PII: {h(', '.join(g['pii']) or 'none')}", f"copied share {g['copied_share']}"]
        if g["fluency_flags"]:
            notes.append(f'<span class="flag">broken: {h(", ".join(g["fluency_flags"]))}</span>')
        if g.get("faithfulness"):
            fb, fa = g["faithfulness"]["before"], g["faithfulness"]["after"]
            notes.append(f"ROUGE-L {fb['rouge_l']} → {fa['rouge_l']}, facts {_pct(fb['facts'])} → {_pct(fa['facts'])}")
            if fa["facts_missing"]:
                notes.append("missing after: " + h("; ".join(fa["facts_missing"])))
            if g["faithfulness_dropped"]:
                notes.append('<span class="flag">faithfulness dropped</span>')
            out.append(f"<p><b>Reference</b></p><pre>{h(g['reference'])}</pre>")
        out.append("<p>" + " · ".join(notes) + "</p>")
    out.append("</body></html>")
    return "\n".join(out)


def _promotion_html(section: dict) -> str:
    """The promotion section (see :func:`_promotion_lines`) as the eval page shows it."""
    from html import escape as h

    from jobs.promotion import comparison_rows

    cls = {"passed": "pass", "first": "pass", "failed": "fail"}.get(section["status"], "na")
    out = ["<h2>Promotion gate (promotion.auto)</h2>",
           f'<p><span class="{cls}">{h(section["summary"])}</span> (judged {h(section["judged_at"])}, before '
           "publishing)</p>"]
    if section.get("comparison"):
        rows = comparison_rows(section["comparison"])
        out.append("<table><tr>" + "".join(f"<th>{h(c)}</th>" for c in rows[0]) + "</tr>"
                   + "".join("<tr>" + "".join(f"<td>{h(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
                   + "</table>")
    if section["reasons"] and section["status"] != "not run":
        out.append("<p>Reasons:</p><ul>" + "".join(f"<li>{h(r)}</li>" for r in section["reasons"]) + "</ul>")
    out.append(f"<p><i>{h(section['note'])}</i></p>")
    return "\n".join(out)
