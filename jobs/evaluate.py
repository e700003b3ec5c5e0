"""Evaluation by the guide's checklist: loss and perplexity before/after, generations with the
guide's inference settings, length bands, PII leaking into generations, verbatim copying of
training outputs (the overfitting sign). Writes a JSON report, a Markdown page and a PNG loss curve.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from jobs.spec import EvalPrompt, TrainingRunSpec

log = logging.getLogger("jobs")

_PII = {
    "email": re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b"),
    "phone": re.compile(r"(?<!\w)(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{3}\)|\d{3})[\s.-]\d{3}[\s.-]\d{4}(?!\w)"),
    "card": re.compile(r"\b(?:\d[ -]?){13,16}\b"),
    "ssn": re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),
}


def words(text: str) -> int:
    return len(text.split())


def band_of(n_words: int, bands) -> str | None:
    for name in ("short", "medium", "long"):
        lo, hi = getattr(bands, name)
        if lo <= n_words <= hi:
            return name
    return None


def pii_found(text: str) -> list[str]:
    return [kind for kind, rx in _PII.items() if rx.search(text)]


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


def prompts_for(spec: TrainingRunSpec, val_rows, loaded_prompts: list[EvalPrompt] | None) -> list[EvalPrompt]:
    if loaded_prompts:
        return loaded_prompts
    if isinstance(spec.eval.prompts, list):
        return spec.eval.prompts
    out = []
    for r in val_rows[: spec.eval.num_prompts]:
        text = r.instruction if not r.input else f"{r.instruction}\n\n{r.input}"
        out.append(EvalPrompt(prompt=text, band=band_of(words(r.output), spec.eval.length_bands),
                              reference=r.output))
    return out


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

    from jobs.train import prompt_text_for

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
            texts = [prompt_text_for(tok, p.prompt) for p in batch]
            ids = tok(texts, return_tensors="pt", add_special_tokens=False, padding=True).to(device)
            with torch.no_grad():
                gen = model.generate(**ids, max_new_tokens=e.max_new_tokens, do_sample=e.temperature > 0,
                                     temperature=e.temperature if e.temperature > 0 else None, top_p=e.top_p,
                                     top_k=e.top_k, pad_token_id=tok.pad_token_id, use_cache=True)
            width = ids["input_ids"].shape[1]
            for row in gen:
                new = row[width:].tolist()
                ended = tok.eos_token_id is not None and tok.eos_token_id in new
                outs.append(Generated(tok.decode(new, skip_special_tokens=True).strip(),
                                      cut_off=not ended and len(new) >= e.max_new_tokens))
    finally:
        tok.padding_side = side
    return outs


def build_report(spec: TrainingRunSpec, *, prompts: list[EvalPrompt], before: list[str], after: list[str],
                 val_loss_before: float | None, val_loss_after: float | None, history: list[dict],
                 evals: list[dict], train_outputs: list[str]) -> dict:
    """The evaluation report: pure, from numbers and texts already computed."""
    items = []
    for p, b, a in zip(prompts, before, after):
        n = words(a)
        got_band = band_of(n, spec.eval.length_bands)
        copied, src = longest_copied_span(a, train_outputs)
        items.append({
            "prompt": p.prompt, "expected_band": p.band, "before": b, "after": a, "words": n, "band": got_band,
            "band_ok": None if p.band is None else got_band == p.band,
            "pii": pii_found(a), "copied_share": round(copied, 3), "copied_from": src if copied >= 0.5 else None,
            "fluency_flags": fluency_flags(a, cut_off=getattr(a, "cut_off", False)),
        })
        items[-1]["broken"] = bool(items[-1]["fluency_flags"])
    with_band = [i for i in items if i["band_ok"] is not None]

    def ppl(x):
        return None if x is None else round(math.exp(min(x, 50)), 3)

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
                                  for flag in FLUENCY_FLAGS if any(flag in i["fluency_flags"] for i in items)}},
            "length_control": {"in_band": sum(bool(i["band_ok"]) for i in with_band), "of": len(with_band)},
            "safety_pii": {"generations_with_pii": sum(bool(i["pii"]) for i in items), "of": len(items)},
            "overfitting_verbatim": {"generations_copying_training": sum(i["copied_share"] >= 0.5 for i in items),
                                     "of": len(items)},
        },
        "inference_settings": {"temperature": spec.eval.temperature, "top_p": spec.eval.top_p,
                               "top_k": spec.eval.top_k, "max_new_tokens": spec.eval.max_new_tokens},
        "generations": items,
    }
    return report


def _r(x):
    return None if x is None else round(float(x), 5)


#: what makes an answer "broken" (the guide's fluency point), in the order the report lists them
FLUENCY_FLAGS = ("empty", "repeated_token", "repeated_phrase", "repeated_sentence", "counting_run", "cut_off",
                 "scaffolding")
_SCAFFOLD = re.compile(r"(<\|[a-z_]+\|>|\[/?INST\]|###\s*(Instruction|Response)|^\s*(User|Assistant|System):)",
                       re.I | re.M)


def fluency_flags(text: str, *, cut_off: bool = False) -> list[str]:
    """Why an answer looks degenerate (empty list: it does not). The common LoRA failures:
    a token or a phrase repeated over and over ("Internet > Internet > Uninstall > Uninstall"), the
    same sentence again and again, counting ("ports 1, 2, 3, … 16,"), an answer cut off by
    max_new_tokens mid-sentence, and chat-template scaffolding leaking into the answer."""
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
    if _counting_run(text) >= 6:
        flags.append("counting_run")
    if cut_off and not re.search(r"[.!?)\]\"'…:]\s*$", text):
        flags.append("cut_off")
    if _SCAFFOLD.search(text):
        flags.append("scaffolding")
    return flags


def _counting_run(text: str) -> int:
    """Length of the longest run of consecutive integers separated only by commas, spaces or dashes."""
    best = run = 0
    prev = None
    for m in re.finditer(r"\d+|[^\d\s,;–-]+", text):
        tok = m.group()
        if tok.isdigit():
            n = int(tok)
            run = run + 1 if prev is not None and n == prev + 1 else 1
            prev = n
            best = max(best, run)
        else:
            run, prev = 0, None
    return best


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


def render_markdown(report: dict, spec: TrainingRunSpec, version: str | None = None) -> str:
    v, c = report["validation"], report["checklist"]
    lines = [f"# Evaluation: {spec.name}" + (f" {version}" if version else ""), "",
             "![loss curve](loss_curve.png)", "",
             "| metric | before | after |", "| --- | --- | --- |",
             f"| validation loss | {v['loss_before']} | {v['loss_after']} |",
             f"| perplexity | {v['perplexity_before']} | {v['perplexity_after']} |", "",
             "## Checklist (docs/lora-training-guide.md)", "",
             f"- Fluency: {c['fluency']['broken_generations']} of {c['fluency']['of']} generations look broken"
             + "".join(f"; {flag.replace('_', ' ')}: #{', #'.join(map(str, which))}"
                       for flag, which in c["fluency"].get("flags", {}).items()),
             f"- Length control: {c['length_control']['in_band']} of {c['length_control']['of']} in their band",
             f"- Safety: {c['safety_pii']['generations_with_pii']} of {c['safety_pii']['of']} generations contain PII",
             f"- Overfitting: {c['overfitting_verbatim']['generations_copying_training']} of "
             f"{c['overfitting_verbatim']['of']} copy a training output verbatim", "",
             "## Generations", "",
             f"Settings: temperature {report['inference_settings']['temperature']}, top_p "
             f"{report['inference_settings']['top_p']}, top_k {report['inference_settings']['top_k']}.", ""]
    for i, g in enumerate(report["generations"], 1):
        lines += [f"### {i}. {g['prompt'][:200]}", "", f"**Before:** {g['before'] or '(empty)'}", "",
                  f"**After:** {g['after'] or '(empty)'}", "",
                  f"_words: {g['words']}, band: {g['band']} (expected {g['expected_band']}), PII: "
                  f"{', '.join(g['pii']) or 'none'}, copied share: {g['copied_share']}_", ""]
    return "\n".join(lines)
