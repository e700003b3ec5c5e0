"""The rules that edit or drop a row by its own text: boilerplate, URLs, PII, long sentences and overlong outputs,
with the sentence and word helpers they share. Each takes rows and returns a :class:`RuleResult`."""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Callable

from jobs.dataprep.rows import Row, RuleResult, assistant_texts, user_texts, with_assistant_texts
from jobs.pii import find_pii


# ---------------------------------------------------------------------------- text helpers

_WORD = re.compile(r"\S+")
# A sentence ends at . ! ? (and closing quotes) before a space and a capital or digit,
# so "e.g. this" and "v2.1" stay whole.
_SENTENCE_END = re.compile(r"(?<![.!?…])[.!?…]+[\"'”’)\]]*(?=\s+[\"'“‘(\[]?[A-Z0-9])")
_BULLET = re.compile(r"^(\s*(?:[-*•]|\d+[.)])\s+)")


def count_words(text: str) -> int:
    """Words as a reader counts them: whitespace tokens with a letter or digit."""
    return sum(1 for t in _WORD.findall(text) if any(c.isalnum() for c in t))


def _split_sentences(line: str) -> list[str]:
    parts, start = [], 0
    for m in _SENTENCE_END.finditer(line):
        parts.append(line[start:m.end()])
        start = m.end()
    parts.append(line[start:])
    return [s.strip() for s in parts if s.strip()]


def _map_sentences(text: str, fn: Callable[[str], str | None]) -> str:
    """Apply ``fn`` to every sentence, line by line; ``None`` removes the sentence.

    Bullet markers stay with their line, lines left empty disappear, and the line
    structure (bullet lists) survives. When ``fn`` changes nothing, ``text`` comes
    back as it was.
    """
    out_lines, changed = [], False
    for line in text.split("\n"):
        if not line.strip():
            out_lines.append("")
            continue
        m = _BULLET.match(line)
        marker, body = (m.group(1), line[m.end():]) if m else ("", line)
        kept = []
        for sentence in _split_sentences(body):
            result = fn(sentence)
            changed |= result != sentence
            if result:
                kept.append(result)
        if kept:
            out_lines.append(marker + " ".join(kept))
    if not changed:
        return text  # untouched text keeps its exact spacing
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out_lines)).strip()


def _tidy(text: str) -> str:
    """Spaces and punctuation left behind when a span is cut out of a sentence."""
    text = re.sub(r"\(\s*\)|\[\s*\]|<\s*>", "", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([.,;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?=[.!?])", "", text)
    text = re.sub(r"(?m)^[ \t]+|[ \t]+$", "", text)
    return text.strip()


def _normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def map_assistant(row: Row, fn: Callable[[str], str]) -> tuple[Row, bool, bool]:
    """Apply ``fn`` to every assistant text: (new row, changed?, some text left without words?)."""
    old = assistant_texts(row)
    new = [fn(x) for x in old]
    return with_assistant_texts(row, new), new != old, any(count_words(x) == 0 for x in new)


# ---------------------------------------------------------------------------- rule: boilerplate

#: A sentence matching any of these is boilerplate. Case-insensitive; ’ and ' both work.
BOILERPLATE_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    r"\bas an? (?:ai|a\.i\.|artificial intelligence|(?:large )?language model|llm|virtual assistant|chatbot)\b",
    r"\bi(?: am|['’]m) (?:just |only |merely )?(?:an? )?(?:ai|a\.i\.|artificial intelligence|(?:large )?"
    r"language model|llm|virtual assistant|chatbot)\b",
    r"\bi (?:do not|don['’]t|cannot|can['’]t) (?:have|hold|form) (?:personal |any )?(?:opinions|feelings|"
    r"emotions|beliefs|preferences|experiences)\b",
    r"\bi (?:do not|don['’]t|cannot|can['’]t) (?:have access to|access|browse) (?:real[- ]time|the internet|"
    r"current)\b",
    r"\bmy (?:knowledge|training)(?: data)? (?:cut-?off|only goes|is limited|extends)\b",
    r"\bas of my (?:last )?(?:knowledge|training)(?: data)?(?: cut-?off| update)?\b",
    r"^\s*(?:\**\s*)?disclaimer\s*\**\s*:",
    r"\b(?:this|it) (?:is not|isn['’]t|does not constitute|should not be (?:taken|considered|construed) as)"
    r" (?:professional |legal |medical |financial |expert )?advice\b",
    r"\b(?:please )?(?:always )?consult (?:with )?(?:a|an|your) (?:qualified |licensed |certified )?"
    r"(?:professional|doctor|physician|lawyer|attorney|financial advis[eo]r|medical professional)\b",
    r"\bi (?:hope|trust) (?:this|that) helps\b",
    r"\b(?:feel free to|don['’]t hesitate to) (?:ask|reach out|let me know)\b",
    r"\blet me know if you (?:have|need) any (?:other|more|further|additional) (?:questions|help)\b",
    r"\bi(?:['’]m| am) (?:sorry|afraid),? but i (?:cannot|can['’]t|am unable|am not able|won['’]t)\b",
)]


def is_boilerplate(sentence: str) -> bool:
    return any(p.search(sentence) for p in BOILERPLATE_PATTERNS)


def strip_boilerplate_text(text: str) -> str:
    """Remove every boilerplate sentence from ``text``; may return ''."""
    return _map_sentences(text, lambda s: None if is_boilerplate(s) else s)


def strip_boilerplate(rows: list[Row]) -> RuleResult:
    """Rule: strip 'As an AI…' boilerplate and disclaimers from outputs; drop rows left empty."""
    kept, lines, dropped = [], [], []
    for row in rows:
        cleaned, changed, emptied = map_assistant(row, strip_boilerplate_text)
        if not changed:
            kept.append(row)
            continue
        lines.append(row.line)
        if emptied:  # an answer that was only boilerplate: the row (or conversation) teaches nothing else
            dropped.append(row.line)
        else:
            kept.append(cleaned)
    return RuleResult(kept, lines, "stripped", {"dropped": len(dropped)})


# ---------------------------------------------------------------------------- rule: URLs

_MD_LINK = re.compile(r"\[([^\[\]\n]{1,300})\]\(\s*(?:https?://|www\.)[^)\s]*\s*\)", re.IGNORECASE)
URL_RE = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"'`]+", re.IGNORECASE)
_ABOUT_LINKS = re.compile(r"\b(?:urls?|links?|hyperlinks?|websites?|web ?sites?|web ?pages?|web address(?:es)?|"
                          r"domains?|homepage)\b", re.IGNORECASE)


_SENTINEL = "\x00"
#: A sentence that ends pointing at a URL ("Download it from URL.") says nothing without
#: it, so the whole sentence goes; elsewhere only the URL is cut out.
_POINTER = re.compile(r"\b(?:at|see|visit|via|from|to|on|here|under)\s*(?::\s*)?\x00[.!?:;]*$", re.IGNORECASE)


def _cut_url(match: re.Match[str]) -> str:
    # Sentence punctuation after a URL belongs to the sentence, not the URL.
    url = match.group(0)
    trail = len(url) - len(url.rstrip(".,;:!?)]}'\""))
    return _SENTINEL + (url[-trail:] if trail else "")


def _remove_urls_sentence(sentence: str) -> str | None:
    text = _MD_LINK.sub(r"\1", sentence)
    if not URL_RE.search(text):
        return text
    text = URL_RE.sub(_cut_url, text)
    if _POINTER.search(text) or not count_words(text.replace(_SENTINEL, "")):
        return None
    return _tidy(text.replace(_SENTINEL, ""))


def remove_urls_text(text: str) -> str:
    """Remove URLs from ``text``; may return ''.

    A Markdown link keeps its words. A sentence that only pointed at a URL
    ("Download it from https://…") is removed whole; elsewhere just the URL goes.
    """
    return _map_sentences(text, _remove_urls_sentence)


def asks_about_links(row: Row) -> bool:
    """The instruction (or input) itself is about a URL or link: the URL is the answer."""
    text = "\n".join(user_texts(row))
    return bool(URL_RE.search(text) or _ABOUT_LINKS.search(text))


def remove_urls(rows: list[Row]) -> RuleResult:
    """Rule: remove URLs from outputs unless the row asks about a link; drop rows left empty."""
    kept, lines, dropped, about = [], [], 0, 0
    for row in rows:
        if not any(URL_RE.search(x) for x in assistant_texts(row)):
            kept.append(row)
            continue
        if asks_about_links(row):
            about += 1
            kept.append(row)
            continue
        lines.append(row.line)
        cleaned, _, emptied = map_assistant(row, remove_urls_text)
        if emptied:
            dropped += 1
        else:
            kept.append(cleaned)
    return RuleResult(kept, lines, "removed", {"dropped": dropped, "kept_on_topic": about})


# ---------------------------------------------------------------------------- rule: PII

def handle_pii(rows: list[Row], mode: str) -> RuleResult:
    """Rule: emails, phones, Luhn-valid cards and ID numbers in outputs: 'redact', 'drop' or 'off'."""
    if mode == "off":
        return RuleResult(list(rows))
    kept: list[Row] = []
    lines: list[int] = []
    kinds: Counter[str] = Counter()
    for row in rows:
        found: Counter[str] = Counter()
        redacted_texts = []
        for text in assistant_texts(row):
            redacted, f = find_pii(text)
            redacted_texts.append(redacted)
            found.update(f)
        if not found:
            kept.append(row)
            continue
        lines.append(row.line)
        kinds.update(found)
        if mode == "redact":
            kept.append(with_assistant_texts(row, redacted_texts))
    action = "redacted" if mode == "redact" else "dropped"
    return RuleResult(kept, lines, action, {"kinds": dict(sorted(kinds.items()))})


# ---------------------------------------------------------------------------- rule: long sentences

_CONJUNCTIONS = frozenset("and but or so because which while although though whereas unless until since "
                          "when where if then however".split())


def trim_sentence(sentence: str, max_words: int) -> str:
    """Cut a sentence to at most ``max_words`` words, at the last clause boundary if one
    lies in the second half of the allowance, else at the limit; end it with a period."""
    tokens = sentence.split()
    if count_words(sentence) <= max_words:
        return sentence
    words = 0
    limit = len(tokens)
    for i, tok in enumerate(tokens):
        words += any(c.isalnum() for c in tok)
        if words == max_words:
            limit = i + 1
            break
    cut = limit
    for i in range(limit, max(1, max_words // 2) - 1, -1):
        # A boundary after token i-1: it ends with , ; : or a dash, or token i opens a clause.
        before = tokens[i - 1]
        after = tokens[i].lower().strip("\"'(") if i < len(tokens) else ""
        if before.endswith((",", ";", ":", "—", "–")) or before in ("-", "—", "–") or after in _CONJUNCTIONS:
            cut = i
            break
    head = " ".join(tokens[:cut]).rstrip(" ,;:—–-")
    return head + ("" if head.endswith((".", "!", "?")) else ".")


def long_sentences(text: str, max_words: int) -> list[str]:
    out: list[str] = []
    for line in text.split("\n"):
        m = _BULLET.match(line)
        body = line[m.end():] if m else line
        out.extend(s for s in _split_sentences(body) if count_words(s) > max_words)
    return out


def limit_sentences(rows: list[Row], max_words: int, mode: str) -> RuleResult:
    """Rule: sentences over ``max_words`` in outputs: 'flag' (report), 'trim', 'drop' the row, or 'off'."""
    if mode == "off":
        return RuleResult(list(rows))
    kept, lines = [], []
    for row in rows:
        if not any(long_sentences(x, max_words) for x in assistant_texts(row)):
            kept.append(row)
            continue
        lines.append(row.line)
        if mode == "flag":
            kept.append(row)
        elif mode == "trim":
            kept.append(map_assistant(row, lambda x: _map_sentences(x, lambda s: trim_sentence(s, max_words)))[0])
    action = {"flag": "flagged", "trim": "trimmed", "drop": "dropped"}[mode]
    return RuleResult(kept, lines, action, {"max_sentence_words": max_words})


def limit_output_words(rows: list[Row], max_words: int | None) -> RuleResult:
    """Rule: drop rows whose output has more than ``max_words`` words (None: off)."""
    if max_words is None:
        return RuleResult(list(rows))
    kept = [r for r in rows if all(count_words(x) <= max_words for x in assistant_texts(r))]
    keep_lines = {r.line for r in kept}
    lines = [r.line for r in rows if r.line not in keep_lines]
    return RuleResult(kept, lines, "dropped", {"max_output_words": max_words})
