"""Data preparation: raw JSONL bytes → clean training rows and a report.

Pure functions, no torch and no I/O except :func:`check_file`. Each golden rule of
``docs/lora-training-guide.md`` is one function over a list of :class:`Row` and is
switched by :class:`jobs.spec.DataRules`. :func:`prepare` runs them in order and
builds the report that becomes ``data_report.json`` and what ``launcher data check``
prints. A malformed line is a problem in the report, never a crash; the run fails
(:class:`DataError`, exit code 11) only when too few rows are left.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import stat
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

from jobs.errors import DataError, Problem
from jobs.pii import find_pii
from jobs.spec import DataRules

#: Longer lines are reported, not parsed: one runaway line must not eat the pod's memory.
MAX_LINE_BYTES = 1_000_000
#: The most `launcher data check` reads of one file. The guide's datasets are under 10k rows
#: (a few MB); 1 GiB is a million 1 KB rows and still fits the check's memory. A bigger file,
#: or /dev/zero, is refused with this number instead of being read until memory runs out.
MAX_FILE_BYTES = 1 << 30
#: Rows outside the format (JSON objects in no accepted format or in two; with data.format set,
#: also rows in another format) are skipped and listed; beyond this share of the non-blank lines
#: they are an error: that is a wrong setting or two files concatenated, not a stray line, and
#: training on the rest would lose data with an "OK".
MAX_OUTSIDE_FORMAT_SHARE = 0.05
#: How many line numbers a report keeps per rule, and how many problems it lists.
REPORT_LINES = 200
REPORT_PROBLEMS = 1000
_NUM_PERM = 128


@dataclass(frozen=True)
class Row:
    """One valid training example; ``line`` is its 1-based line in the source file.

    A conversation (``messages`` or ShareGPT ``conversations``) keeps every turn in ``turns``
    as (role, content) pairs, roles system/user/assistant; its ``instruction`` is the last user
    turn and its ``output`` the last assistant turn (what evaluation compares against)."""

    line: int
    instruction: str
    output: str
    input: str = ""
    persona: str | None = None
    turns: tuple[tuple[str, str], ...] = ()
    #: the format the row was read in ("instruction", "messages", "sharegpt"); not part of its
    #: identity, so a row compares equal to the same example written in another format
    fmt: str = field(default="instruction", compare=False)


def assistant_texts(row: Row) -> list[str]:
    """What the model learns to write: the output, or every assistant turn of a conversation."""
    return [c for r, c in row.turns if r == "assistant"] if row.turns else [row.output]


def user_texts(row: Row) -> list[str]:
    return [c for r, c in row.turns if r != "assistant"] if row.turns else [row.instruction, row.input]


def with_assistant_texts(row: Row, texts: list[str]) -> Row:
    """``row`` with its assistant text(s) replaced, in order."""
    if not row.turns:
        return replace(row, output=texts[0])
    it = iter(texts)
    turns = tuple((r, next(it) if r == "assistant" else c) for r, c in row.turns)
    return replace(row, turns=turns, output=[c for r, c in turns if r == "assistant"][-1])


def map_assistant(row: Row, fn: Callable[[str], str]) -> tuple[Row, bool, bool]:
    """Apply ``fn`` to every assistant text: (new row, changed?, some text left without words?)."""
    old = assistant_texts(row)
    new = [fn(x) for x in old]
    return with_assistant_texts(row, new), new != old, any(count_words(x) == 0 for x in new)


@dataclass
class RuleResult:
    """What one rule did: the rows it kept, the lines it touched, and how."""

    rows: list[Row]
    lines: list[int] = field(default_factory=list)
    action: str = "off"
    details: dict[str, Any] = field(default_factory=dict)

    def entry(self) -> dict[str, Any]:
        return {"count": len(self.lines), "lines": self.lines[:REPORT_LINES], "action": self.action,
                **self.details}


@dataclass
class Prepared:
    rows: list[Row]
    report: dict[str, Any]


# ---------------------------------------------------------------------------- reading

class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFinite(name)


_FIX_JSON = "make the line one JSON object, e.g. {\"instruction\": \"...\", \"output\": \"...\"}"


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud800" escapes break every tokenizer
        return False
    return True


#: the formats a data file may be in; "auto" looks at the file's first JSON object
FORMATS = ("instruction", "messages", "sharegpt")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "model": "assistant", "system": "system"}
_FIX_MESSAGES = ('give "messages" as a list of {"role": "system"|"user"|"assistant", "content": "..."}: '
                 "an optional system turn first, then user and assistant turns in turn, ending with an assistant turn")
_FIX_SHAREGPT = ('give "conversations" as a list of {"from": "system"|"human"|"gpt", "value": "..."}: '
                 "an optional system turn first, then human and gpt turns in turn, ending with a gpt turn")


#: The keys that mark each format. "auto" reads each row by its own keys rather than fixing the
#: format by the first row (which dropped 1,000 `messages` rows after one instruction row, with
#: "OK": issue 32). Per row is safe because the keys name a format without ambiguity and every
#: format becomes the same Row, rendered through the same chat template (jobs/trainer/train.py), so a
#: mixed file trains as intended. Mixing is reported (rows per format), never an error; a row in
#: no format, or in two, is a problem of its line, and many of them fail the data (see
#: MAX_OUTSIDE_FORMAT_SHARE).
FORMAT_KEYS = {"instruction": ("instruction", "output"), "messages": ("messages",), "sharegpt": ("conversations",)}
FORMAT_EXAMPLES = {
    "instruction": '{"instruction": "...", "input": "..." (optional), "output": "..."}',
    "messages": '{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}',
    "sharegpt": '{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}',
}


def row_formats(obj: dict[str, Any]) -> list[str]:
    """The formats whose marking keys ``obj`` has, in FORMATS order: [] for none, two or more
    for a row that mixes formats (which is an error: which half to train on is a guess)."""
    return [f for f in FORMATS if any(k in obj for k in FORMAT_KEYS[f])]


def detect_format(data: bytes) -> str:
    """The format of a JSONL file's first JSON object: a "messages" list is the chat format, a
    "conversations" list ShareGPT, anything else instruction/output (alpaca). Only a summary:
    reading with "auto" decides per row."""
    for raw in _split_lines(bytes(data)):
        try:
            obj = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(obj, dict):
            return "messages" if "messages" in obj else "sharegpt" if "conversations" in obj else "instruction"
    return "instruction"


def _parse_turns(obj: dict[str, Any], fmt: str) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    """The turns of a conversation and what is wrong with them (turns are numbered from 1)."""
    key, role_key, text_key = ("messages", "role", "content") if fmt == "messages" else \
        ("conversations", "from", "value")
    raw = obj.get(key)
    if key not in obj:
        return (), [f"missing '{key}'"]
    if not isinstance(raw, list):
        return (), [f"'{key}' must be a list of turns, got {_type_name(raw)}"]
    if not raw:
        return (), [f"'{key}' is empty"]
    turns, errors = [], []
    for i, turn in enumerate(raw, 1):
        if not isinstance(turn, dict):
            errors.append(f"turn {i} must be an object, got {_type_name(turn)}")
            continue
        role, text = turn.get(role_key), turn.get(text_key)
        if not isinstance(role, str):
            errors.append(f"turn {i}: missing '{role_key}'" if role is None else
                          f"turn {i}: '{role_key}' must be a string, got {_type_name(role)}")
            continue
        norm = role.strip().lower() if fmt == "messages" else _SHAREGPT_ROLES.get(role.strip().lower())
        if norm not in ("system", "user", "assistant"):
            allowed = "system, user, assistant" if fmt == "messages" else "system, human, gpt"
            errors.append(f"turn {i}: role '{role}' is not one of {allowed}")
            continue
        if not isinstance(text, str):
            errors.append(f"turn {i} ({norm}): missing '{text_key}'" if text is None else
                          f"turn {i} ({norm}): '{text_key}' must be a string, got {_type_name(text)}")
            continue
        if not text.strip():
            errors.append(f"turn {i} ({norm}): empty '{text_key}'")
            continue
        if not _is_encodable(text):
            errors.append(f"turn {i} ({norm}): contains an unpaired \\ud800-\\udfff escape")
            continue
        turns.append((i, norm, text.strip()))
    if errors:
        return (), errors
    for (i, role, _), prev in zip(turns, [None, *turns[:-1]]):
        if role == "system" and prev is not None:
            errors.append(f"turn {i}: a system turn may only come first")
        elif role != "system" and (prev is None or prev[1] == "system") and role != "user":
            errors.append(f"turn {i}: the conversation must start with a user turn, got {role}")
        elif prev is not None and role == prev[1] and role != "system":
            errors.append(f"turn {i}: two {role} turns in a row (turns {prev[0]} and {i})")
    if not any(role == "assistant" for _, role, _ in turns):
        errors.append("no assistant turn: nothing to learn")
    elif turns[-1][1] != "assistant":
        errors.append(f"turn {turns[-1][0]}: ends with a {turns[-1][1]} turn that has no answer")
    return tuple((r, c) for _, r, c in turns), errors[:5]


def read_object(raw: bytes, n: int, fix: str = "") -> dict[str, Any] | Problem | None:
    """One line → its JSON object, a Problem naming line ``n`` (too long, not UTF-8, not JSON, NaN, not an
    object; ``fix`` is the advice for the last three), or None for a blank line. Never raises. The one reader of
    a data line: SFT rows here, preference pairs in :mod:`jobs.preference`."""
    where = f"line {n}"
    fix = fix or _FIX_JSON
    if len(raw) > MAX_LINE_BYTES:
        return Problem(where, f"line is {len(raw):,} bytes, over the {MAX_LINE_BYTES:,}-byte limit",
                       "split it into several rows or shorten the output", n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Problem(where, f"not UTF-8 text (bad byte 0x{raw[err.start]:02x} at column {err.start + 1})",
                       "save the file as UTF-8", n)
    text = text.lstrip("\ufeff")  # a BOM on an inner line: files concatenated with `cat`
    if not text.strip():
        return None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except _NonFinite as err:
        return Problem(where, f"{err} is not valid JSON", "use a string or a finite number", n)
    except json.JSONDecodeError as err:
        return Problem(where, f"not valid JSON: {err.msg} (column {err.colno})", fix, n)
    except RecursionError:
        return Problem(where, "JSON nested too deeply to read", fix, n)
    except ValueError as err:  # e.g. an integer over Python's 4300-digit limit
        return Problem(where, f"not valid JSON: {err}", fix, n)
    if not isinstance(obj, dict):
        return Problem(where, f"expected a JSON object, got {_type_name(obj)}", fix, n)
    return obj


def _parse_line(raw: bytes, n: int, persona_field: str, fmt: str = "instruction") -> Row | Problem | None:
    """One line → a Row, a Problem, or None for a blank line. Never raises."""
    where = f"line {n}"
    obj = read_object(raw, n)
    if obj is None or isinstance(obj, Problem):
        return obj
    looks = row_formats(obj)
    if len(looks) > 1:
        keys = " and ".join(f"'{FORMAT_KEYS[f][0]}'" for f in looks)
        return _OutsideFormat(where, f"has both {keys}: one row is one format ({', '.join(looks)})",
                              "split it into one row per format, or remove the keys that do not belong", n,
                              looks_like="+".join(looks))
    if not looks and ("chosen" in obj or "rejected" in obj):
        return _OutsideFormat(where, "a preference pair ('chosen'/'rejected'), not an SFT row",
                              "set training.method: dpo or orpo to train on pairs (`launcher data check --method dpo "
                              "FILE` checks them), or write the row in an SFT format", n, looks_like="preference")
    if fmt == "auto":
        if not looks:  # no format's key: read as instruction so the message names what is missing
            parsed = _parse_line_as(obj, n, persona_field, "instruction")
            if isinstance(parsed, Problem):
                keys = ", ".join(f"'{k}'" for k in list(obj)[:6]) or "no keys"
                return _OutsideFormat(where, f"{parsed.message}; the row has {keys}, which is none of the "
                                             f"accepted formats", _FIX_ANY_FORMAT, n, looks_like="unknown")
            return parsed
        return _parse_line_as(obj, n, persona_field, looks[0])
    if looks and looks[0] != fmt:
        return _OutsideFormat(where, f"missing '{FORMAT_KEYS[fmt][0]}': the row looks like {_a(looks[0])} row, "
                                     f"but data.format is '{fmt}'",
                              "set data.format: auto (each row is read by its own keys) or convert the row", n,
                              looks_like=looks[0])
    parsed = _parse_line_as(obj, n, persona_field, fmt)
    if isinstance(parsed, Problem) and not looks:
        return _OutsideFormat(parsed.where, parsed.message, parsed.fix, n, looks_like="unknown")
    return parsed


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


_FIX_ANY_FORMAT = "write each row in one of the accepted formats: " + "; ".join(FORMAT_EXAMPLES.values())


@dataclass(frozen=True)
class _OutsideFormat(Problem):
    """A line that is a JSON object but in no accepted format, in two, or not in the format
    data.format names. Counted apart from other problems: beyond a small share it is an error."""

    looks_like: str = "unknown"


def _parse_line_as(obj: dict[str, Any], n: int, persona_field: str, fmt: str) -> Row | Problem:
    """One JSON object read as a row of ``fmt``."""
    where = f"line {n}"
    if fmt != "instruction":
        return _parse_conversation(obj, n, persona_field, fmt)

    errors: list[str] = []
    values: dict[str, str] = {}
    for key in ("instruction", "output"):
        value = obj.get(key)
        if key not in obj:
            errors.append(f"missing '{key}'")
        elif not isinstance(value, str):
            errors.append(f"'{key}' must be a string, got {_type_name(value)}")
        elif not value.strip():
            errors.append(f"'{key}' is empty")
        else:
            values[key] = value.strip()
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        errors.append(f"'input' must be a string, got {_type_name(extra)}")
    persona_key = next((k for k in (persona_field, "persona", "tone") if obj.get(k) is not None), None)
    persona = obj.get(persona_key) if persona_key else None
    if persona is not None and not isinstance(persona, str):
        errors.append(f"'{persona_key}' must be a string, got {_type_name(persona)}")
    if not errors and not all(_is_encodable(v) for v in (*values.values(), extra or "", persona or "")):
        errors.append("contains an unpaired \\ud800-\\udfff escape")
    if errors:
        return Problem(where, "; ".join(errors),
                       "give every row non-empty string 'instruction' and 'output' "
                       "(optional string 'input' and 'persona')", n)
    return Row(line=n, instruction=values["instruction"], output=values["output"],
               input=(extra or "").strip(), persona=(persona or "").strip() or None)


def _persona_of(obj: dict[str, Any], persona_field: str) -> tuple[str | None, str | None]:
    key = next((k for k in (persona_field, "persona", "tone") if obj.get(k) is not None), None)
    value = obj.get(key) if key else None
    if value is not None and not isinstance(value, str):
        return None, f"'{key}' must be a string, got {_type_name(value)}"
    return (value or "").strip() or None, None


def _parse_conversation(obj: dict[str, Any], n: int, persona_field: str, fmt: str) -> Row | Problem:
    turns, errors = _parse_turns(obj, fmt)
    persona, bad = _persona_of(obj, persona_field)
    if bad:
        errors.append(bad)
    if errors:
        return Problem(f"line {n}", "; ".join(errors), _FIX_MESSAGES if fmt == "messages" else _FIX_SHAREGPT, n)
    last_answer = max(i for i, (r, _) in enumerate(turns) if r == "assistant")
    question = next(c for r, c in reversed(turns[:last_answer]) if r == "user")
    return Row(line=n, instruction=question, output=turns[last_answer][1], persona=persona, turns=turns, fmt=fmt)


def read_jsonl(data: bytes | str, *, persona_field: str = "persona", fmt: str = "auto") -> tuple[list[Row], list[Problem]]:
    """Parse JSONL bytes into valid rows and one :class:`Problem` per bad line.

    ``fmt``: "instruction" ({instruction, input?, output}), "messages" ({messages: [{role,
    content}]}), "sharegpt" ({conversations: [{from, value}]}) or "auto": each row in the format
    its keys name (:func:`row_formats`), so a file may mix formats and loses no row for it; the
    report counts rows per format. With a set format, a row in another format is a problem that
    names the format it looks like. A conversation with a wrong role, an empty turn, turns out of
    order or no assistant turn is a problem of its line, like a malformed instruction row.

    Never raises on any input: a BOM, CRLF endings, invalid UTF-8, oversized or
    deeply nested lines, NaN/Infinity, non-objects and wrong types each become a
    problem naming the line, and reading goes on. Blank lines are skipped. The
    persona is read from ``persona_field``, else ``persona``, else ``tone``.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    data = bytes(data)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    rows: list[Row] = []
    problems: list[Problem] = []
    # Split on \n only, so line numbers match what an editor shows; \r\n loses its \r.
    for n, raw in enumerate(_split_lines(data), start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        parsed = _parse_line(raw, n, persona_field, fmt)
        if isinstance(parsed, Row):
            rows.append(parsed)
        elif parsed is not None:
            problems.append(parsed)
    return rows, problems


def _split_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline does not start a line
    return lines


def count_lines(data: bytes) -> int:
    return len(_split_lines(bytes(data)))


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


# ---------------------------------------------------------------------------- rules: dedup

def _row_key(row: Row) -> str:
    parts = [f"{r}:{c}" for r, c in row.turns] if row.turns else [row.instruction, row.input, row.output]
    return "\x1f".join(_normalise(t) for t in parts)


def dedup_exact(rows: list[Row]) -> RuleResult:
    """Rule: keep the first of rows equal after normalising case, spaces and Unicode forms."""
    first: dict[str, int] = {}
    kept, lines, pairs = [], [], []
    for row in rows:
        key = _row_key(row)
        if key in first:
            lines.append(row.line)
            pairs.append([row.line, first[key]])
        else:
            first[key] = row.line
            kept.append(row)
    return RuleResult(kept, lines, "dropped", {"duplicate_of": pairs[:REPORT_LINES]})


def shingles(text: str, k: int = 3) -> set[str]:
    """Word k-shingles of normalised text; a text shorter than k words is one shingle."""
    words = re.findall(r"\w+", _normalise(text))
    if len(words) < k:
        return {" ".join(words)}
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _lsh_params(threshold: float) -> tuple[int, int]:
    """Bands × rows for the LSH index, chosen for recall: a pair at exactly ``threshold``
    becomes a candidate with probability >= 0.99. False candidates only cost an exact
    Jaccard check; datasketch's own optimum misses about half of the pairs at the threshold."""
    for r in range(_NUM_PERM // 2, 0, -1):
        b = _NUM_PERM // r
        if 1.0 - (1.0 - threshold ** r) ** b >= 0.99:
            return b, r
    return _NUM_PERM, 1


#: Words whose change rewords a row without changing what it says: articles, approximators
#: ("about 5 minutes" = "around 5 minutes"), fillers, and forms of be/do/can. Two rows whose other
#: words are the same, in order, are near-duplicates at any length. The list is small on purpose:
#: words that flip a meaning (not, no, on/off, in/out, to/from, before/after, must/may, numbers)
#: stay out, so "the WAN port" vs "the LAN port" or "turn it on" vs "off" remain different rows.
#: Tuned on tests/unit/data/near_duplicates.jsonl (precision and recall in test_near_duplicates.py).
FUNCTION_WORDS = frozenset("""
a an the about around approximately approx roughly nearly almost circa some
very really quite just simply basically actually please kindly also then so that which
it its this there here of
is are was were be been being am do does did can could will would
""".split())
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_TOKEN = re.compile(r"\w+")


def content_words(text: str) -> list[str]:
    """The words of ``text`` that carry its meaning: normalised (NFKC, case-folded, number words
    as digits) and without :data:`FUNCTION_WORDS`."""
    words = (_NUMBER_WORDS.get(w, w) for w in _TOKEN.findall(_normalise(text)))
    return [w for w in words if w not in FUNCTION_WORDS]


def _texts_of(row: Row) -> list[str]:
    """The row's texts, question then answer(s), the same for one example in any format."""
    return [c for _, c in row.turns] if row.turns else [f"{row.instruction} {row.input}", row.output]


def content_key(texts: list[str]) -> str:
    """Texts compared by their content words, each text apart (a word moved from the question
    to the answer makes a different row). '' when no text has a content word."""
    parts = [" ".join(content_words(t)) for t in texts]
    return "\x1f".join(parts) if any(parts) else ""


def dedup_near(rows: list[Row], threshold: float, seed: int = 42) -> RuleResult:
    """Rule: drop a row that is a near-duplicate of an earlier kept row; it is one when either

    * their content words (:func:`content_words`) are the same, in order, so they differ only
      in function words ("about"/"around", "a"/"the"): a one-word rewording of a row of any
      length, which word shingles miss in rows under ~40 words; or
    * the Jaccard similarity of their word 3-shingles is at least ``threshold`` (paraphrases and
      edits of longer rows). MinHash LSH finds the candidates, the exact Jaccard decides.

    At ``threshold`` 1.0 only identical shingle sets count. Deterministic for a seed and order.
    Cost: O(total words) for the content keys (one dict lookup per row) plus MinHash's
    O(words x 128 permutations) per row and an LSH query per row, so linear in the file.
    """
    from datasketch import MinHash, MinHashLSH

    b, r = _lsh_params(float(threshold))
    lsh = MinHashLSH(num_perm=_NUM_PERM, params=(b, r))
    template = MinHash(num_perm=_NUM_PERM, seed=seed % 2**32)  # the spec's seed has no upper bound; numpy's has
    kept, lines, pairs = [], [], []
    sets: dict[str, tuple[set[str], int]] = {}
    by_content: dict[str, int] = {}
    reworded = 0
    for i, row in enumerate(rows):
        texts = _texts_of(row)
        ckey = content_key(texts) if threshold < 1.0 else ""
        match = by_content.get(ckey) if ckey else None
        if match is not None:
            reworded += 1
            lines.append(row.line)
            pairs.append([row.line, match])
            continue
        sh = shingles(" ".join(c for _, c in row.turns) if row.turns else
                      f"{row.instruction} {row.input} {row.output}")
        mh = template.copy()  # shares the permutations: cheaper than a new MinHash per row
        mh.update_batch([s.encode("utf-8") for s in sh])
        for key in sorted(lsh.query(mh), key=lambda k: sets[k][1]):
            if jaccard(sh, sets[key][0]) >= threshold:
                match = sets[key][1]
                break
        if match is not None:
            lines.append(row.line)
            pairs.append([row.line, match])
            continue
        key = str(i)
        lsh.insert(key, mh)
        sets[key] = (sh, row.line)
        if ckey:
            by_content[ckey] = row.line
        kept.append(row)
    return RuleResult(kept, lines, "dropped", {"threshold": threshold, "reworded": reworded,
                                               "duplicate_of": pairs[:REPORT_LINES]})


# ---------------------------------------------------------------------------- check: conflicts

def _prompt_and_answer(row: Row) -> tuple[list[str], str]:
    """What a row asks (every text before its last answer) and its last answer."""
    if not row.turns:
        return [f"{row.instruction} {row.input}"], row.output
    last = max(i for i, (r, _) in enumerate(row.turns) if r == "assistant")
    return [c for _, c in row.turns[:last]], row.turns[last][1]


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


_NEGATIONS = frozenset("not no never t none nothing nobody neither nor without cannot".split())


def _contradicts(akey: str, bkey: str) -> bool:
    """Two answers' content words say different things: each has a word the other lacks
    ("blue" vs "yellow"), or one adds a negation ("supports" vs "does not support"). One answer
    that only adds words to the other ("... Thanks.") says more, not something else."""
    a, b = set(akey.split()), set(bkey.split())
    return bool((a - b and b - a) or (a ^ b) & _NEGATIONS)


def find_conflicts(rows: list[Row]) -> RuleResult:
    """Check (report only; keeps every row): rows that ask the same question (same content words,
    :func:`content_key`) but answer it differently, e.g. the WAN port "blue" vs "yellow". Training
    on both teaches the model to pick one at random, and near-dedup would keep whichever came
    first, so a person must choose. Answers that differ only in function words are rewordings, and
    an answer that only adds to another elaborates: neither is a conflict. Synonyms ("supplied"
    vs "included") are reported too: telling them from "blue" vs "yellow" takes meaning, and a
    warning that keeps both rows costs a look. O(total words): one dict of prompts."""
    groups: dict[str, list[tuple[Row, str, str]]] = {}
    for row in rows:
        prompt, answer = _prompt_and_answer(row)
        pkey = content_key(prompt)
        if pkey:
            groups.setdefault(pkey, []).append((row, content_key([answer]), answer))
    conflicts, lines = [], []
    for members in groups.values():
        if len({akey for _, akey, _ in members}) < 2:
            continue
        first = members[0]
        other = next((m for m in members[1:] if _contradicts(first[1], m[1])), None)
        if other is None:
            continue
        a, b = set(first[1].split()), set(other[1].split())
        only_a = [w for w in first[1].split() if w not in b][:5]
        only_b = [w for w in other[1].split() if w not in a][:5]
        group_lines = [m[0].line for m in members]
        lines.extend(group_lines)
        conflicts.append({"lines": group_lines, "prompt": _short(first[0].instruction),
                          "answers": {str(first[0].line): _short(first[2]), str(other[0].line): _short(other[2])},
                          "differ": [" ".join(only_a), " ".join(only_b)]})
    rewordings = _reworded_questions(rows)
    return RuleResult(list(rows), sorted(lines), "flagged", {"conflicts": conflicts[:REPORT_LINES],
                                                             "groups": len(conflicts),
                                                             "reworded_questions": rewordings[:REPORT_LINES],
                                                             "reworded_count": len(rewordings)})


#: Questions longer than this (in content words) are left to the shingle rule, which sees their edits.
_REWORDING_MAX_WORDS = 64


def _reworded_questions(rows: list[Row]) -> list[dict[str, Any]]:
    """Pairs of rows with the same answer whose questions differ by one content word (one substituted, added
    or removed: "reset" vs "restart"). Reported, never dropped: it may be a rewording (teaches nothing new)
    or two questions that share an answer (the X1 and the X2), and only a person can tell. Linear: each
    question of n words gives n keys with one word blanked and n with one word left out."""
    blanked: dict[tuple[object, ...], int] = {}
    shortened: dict[tuple[object, ...], int] = {}
    whole: dict[tuple[object, ...], int] = {}
    found: list[dict[str, Any]] = []
    words_of: dict[int, list[str]] = {}
    asked: dict[int, str] = {}
    for row in rows:
        prompt, answer = _prompt_and_answer(row)
        akey = content_key([answer])
        words = content_words(" ".join(prompt))
        if not akey or not words or len(words) > _REWORDING_MAX_WORDS:
            continue
        words_of[row.line] = words
        asked[row.line] = " ".join(prompt).strip()
        match = None
        for j in range(len(words)):
            rest = tuple(words[:j]) + tuple(words[j + 1:])
            match = match or blanked.get((akey, j, rest)) or whole.get((akey, *rest))
        match = match or shortened.get((akey, *words))
        if match is not None and words_of[match] != words:
            mine, theirs = words, words_of[match]
            found.append({"lines": [match, row.line], "prompts": [_short(asked[match]), _short(asked[row.line])],
                          "differ": [" ".join(w for w in theirs if w not in mine),
                                     " ".join(w for w in mine if w not in theirs)]})
            continue
        for j in range(len(words)):
            rest = tuple(words[:j]) + tuple(words[j + 1:])
            blanked.setdefault((akey, j, rest), row.line)
            shortened.setdefault((akey, *rest), row.line)
        whole.setdefault((akey, *words), row.line)
    return found


# ---------------------------------------------------------------------------- rule: balance

NO_PERSONA = "(none)"


def _group_cap(sizes: list[int], share: float) -> int:
    """The largest per-group cap c with c <= share * sum(min(n, c)): keeps the most rows."""
    for c in range(max(sizes), 0, -1):
        if c <= share * sum(min(n, c) for n in sizes) + 1e-9:
            return c
    return min(sizes)


def balance_groups(rows: list[Row], max_share: float, seed: int = 42) -> RuleResult:
    """Rule: cap each persona's share of the rows that name a persona at ``max_share``.

    Rows without a persona are no persona and are kept as they are: a dataset with
    a few tagged rows must not shrink to a few rows. With fewer than two named
    personas there is nothing to balance. When ``max_share`` is below 1/groups it
    cannot be met and 1/groups is used. Which rows of a large group stay is drawn
    with ``seed``; order is kept.
    """
    groups: dict[str, list[int]] = {}
    untagged = 0
    for i, row in enumerate(rows):
        if row.persona:
            groups.setdefault(row.persona, []).append(i)
        else:
            untagged += 1
    summary_all = {g: [len(v), len(v)] for g, v in sorted(groups.items())}
    if untagged:
        summary_all[NO_PERSONA] = [untagged, untagged]
    if len(groups) < 2:
        return RuleResult(list(rows), [], "skipped (fewer than two personas)", {"groups": summary_all})
    share = max(max_share, 1.0 / len(groups))
    cap = _group_cap([len(v) for v in groups.values()], share)
    rng = random.Random(seed)
    drop: set[int] = set()
    for name in sorted(groups):
        members = groups[name]
        if len(members) > cap:
            drop.update(set(members) - set(rng.sample(members, cap)))
    kept = [r for i, r in enumerate(rows) if i not in drop]
    lines = [r.line for i, r in enumerate(rows) if i in drop]
    summary = {g: [len(v), sum(i not in drop for i in v)] for g, v in sorted(groups.items())}
    if untagged:
        summary[NO_PERSONA] = [untagged, untagged]
    return RuleResult(kept, lines, "dropped", {"max_group_share": round(share, 4), "groups": summary})


# ---------------------------------------------------------------------------- the pipeline

def counted(n: int, singular: str, plural: str | None = None) -> str:
    """``n`` and the noun it takes: "1 row", "2 rows", "0 rows" (``plural``: when it is not ``singular`` + s)."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


#: What each rule drops, for the counts (`launcher data check`'s "not kept", a DataError's reasons): (noun, rest).
#: A noun of None is the report's unit: a row, or a pair for preference reports.
_RULE_NOUNS: dict[str, tuple[str | None, str]] = {
    "strip_boilerplate": (None, "with boilerplate"), "remove_urls": (None, "with URLs"), "pii": (None, "with PII"),
    "long_sentences": (None, "with long sentences"), "max_output_words": (None, "with overlong outputs"),
    "conflicts": (None, "answering the same question differently"),
    "dedup_exact": ("exact duplicate", ""), "dedup_near": ("near duplicate", ""),
    "balance": (None, "over a persona's share"),
    # preference pairs (jobs/preference.py)
    "identical_sides": ("pair", "whose chosen and rejected are the same"), "swapped": ("pair", "preferring both ways"),
}


def _unit_noun(report: dict[str, Any]) -> str:
    """A report's unit, singular: "row", or "pair" for preference pairs (``unit: pairs``)."""
    return "pair" if report.get("unit") == "pairs" else "row"


def rule_count(n: int, rule: str, unit: str = "row") -> str:
    """What ``n`` drops of ``rule`` are, counted: "1 row with boilerplate", "2 pairs with boilerplate",
    "1 exact duplicate" (``unit``: "row" or "pair")."""
    if rule not in _RULE_NOUNS:
        return f"{n} {rule}"
    noun, rest = _RULE_NOUNS[rule]
    return counted(n, noun or unit) + (f" {rest}" if rest else "")


def _run_rules(rows: list[Row], rules: DataRules, seed: int) -> tuple[list[Row], dict[str, dict[str, Any]]]:
    steps: list[tuple[str, bool, Callable[[list[Row]], RuleResult]]] = [
        ("strip_boilerplate", rules.strip_boilerplate, strip_boilerplate),
        ("remove_urls", rules.remove_urls, remove_urls),
        ("pii", rules.pii != "off", lambda rs: handle_pii(rs, rules.pii)),
        ("long_sentences", rules.long_sentences != "off",
         lambda rs: limit_sentences(rs, rules.max_sentence_words, rules.long_sentences)),
        ("max_output_words", rules.max_output_words is not None,
         lambda rs: limit_output_words(rs, rules.max_output_words)),
        # before dedup, which would keep whichever of two contradicting rows came first
        ("conflicts", True, find_conflicts),
        ("dedup_exact", rules.dedup_exact, dedup_exact),
        ("dedup_near", rules.dedup_near, lambda rs: dedup_near(rs, rules.near_dup_threshold, seed)),
        ("balance", rules.balance, lambda rs: balance_groups(rs, rules.max_group_share, seed)),
    ]
    entries = {}
    for name, enabled, fn in steps:
        if not enabled:
            entries[name] = RuleResult(rows).entry()
            continue
        result = fn(rows)
        rows = result.rows
        entries[name] = result.entry()
    return rows, entries


def _rows_dropped(entry: dict[str, Any]) -> int:
    return int(entry["count"] if entry["action"] == "dropped" else entry.get("dropped", 0))


def _top_reasons(report: dict[str, Any], limit: int = 3) -> list[str]:
    """The biggest causes of lost rows, largest first, for the DataError message."""
    reasons: list[tuple[int, str]] = []
    if report["problems_total"]:
        first = report["problems"][0]
        reasons.append((report["problems_total"], f"{counted(report['problems_total'], 'malformed line')} "
                                                  f"(first: line {first['line']}: {first['message']})"))
    for name, entry in report["rules"].items():
        n = _rows_dropped(entry)
        if n:
            setting = f" (data.{name})" if name in DataRules.model_fields else ""
            reasons.append((n, f"{rule_count(n, name, _unit_noun(report))} dropped{setting}"))
    reasons.sort(key=lambda t: -t[0])
    return [text for _, text in reasons[:limit]]


def build_report(data: bytes, rules: DataRules, *, seed: int, fmt: str, formats: tuple[str, ...],
                 valid: list[Row], kept: list[Row], problems: list[Problem], entries: dict[str, dict[str, Any]],
                 conflicts: dict[str, Any], outside_error: Callable[[list[_OutsideFormat], int], str],
                 unit: str | None = None) -> dict[str, Any]:
    """The data report (data_report.json, what `launcher data check` prints) of SFT rows or preference pairs.

    ``valid``/``kept``: the rows read and kept (a pair: its chosen side, which carries its format and persona);
    ``problems``: the lines that did not read; ``entries``: each rule's entry (``RuleResult.entry``);
    ``conflicts``: the conflict check's entry; ``formats``: the formats counted, in order; ``fmt``: the data's
    format; ``outside_error``: the error when more than MAX_OUTSIDE_FORMAT_SHARE of the non-blank lines are
    outside the format (given those lines and the non-blank count); ``unit``: ``pairs`` for preference pairs
    (the report's first key), None for rows (no key)."""
    total_lines = count_lines(data)
    valid_by_format, kept_by_format = Counter(r.fmt for r in valid), Counter(r.fmt for r in kept)
    outside = [p for p in problems if isinstance(p, _OutsideFormat)]
    non_blank = len(valid) + len(problems)
    errors = []
    if outside and len(outside) > MAX_OUTSIDE_FORMAT_SHARE * non_blank:
        errors.append(outside_error(outside, non_blank))
    dropped = {name: _rows_dropped(e) for name, e in entries.items() if _rows_dropped(e)}
    report: dict[str, Any] = {"unit": unit} if unit else {}
    report |= {
        "format": fmt,
        "total_lines": total_lines,
        "valid_rows": len(valid),
        "kept_rows": len(kept),
        "dataset_sha256": hashlib.sha256(data).hexdigest(),
        "seed": seed,
        # Where every line went, so nothing is lost without a count: the run's status carries it.
        "counts": {"lines": total_lines, "blank": total_lines - non_blank,
                   "malformed": len(problems) - len(outside), "outside_format": len(outside),
                   "valid": len(valid), "dropped_by_rule": dropped, "kept": len(kept),
                   "by_format": {f: {"valid": valid_by_format[f], "kept": kept_by_format[f]}
                                 for f in formats if valid_by_format[f]}},
        "outside_format": {"count": len(outside), "lines": [p.line for p in outside[:REPORT_LINES]],
                           "looks_like": dict(Counter(p.looks_like for p in outside).most_common()),
                           "max_share": MAX_OUTSIDE_FORMAT_SHARE},
        "errors": errors,
        "problems_total": len(problems),
        "problems": [{"line": p.line, "message": p.message, "fix": p.fix} for p in problems[:REPORT_PROBLEMS]],
        "rules": entries,
        "conflicts": conflicts,
        "personas": dict(sorted(Counter(r.persona or NO_PERSONA for r in kept).items())),
        "min_rows": rules.min_rows,
        "settings": rules.model_dump(mode="json"),
    }
    return report


def prepare_report(data: bytes | str, rules: DataRules, *, seed: int = 42) -> Prepared:
    """Like :func:`prepare` but never raises: the caller decides what too few rows means."""
    data = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    rows, problems = read_jsonl(data, persona_field=rules.balance_field, fmt=rules.format)
    kept, entries = _run_rules(rows, rules, seed)
    conflicts = entries.pop("conflicts")  # a check, not a switchable rule: it keeps every row
    valid_by_format = Counter(r.fmt for r in rows)
    fmt: str
    if rules.format != "auto":
        fmt = rules.format
    elif len(valid_by_format) > 1:
        fmt = "mixed"
    else:
        fmt = next(iter(valid_by_format), None) or detect_format(data)

    def outside_error(outside: list[_OutsideFormat], non_blank: int) -> str:
        looks = Counter(p.looks_like for p in outside)
        return (f"{len(outside)} of {non_blank} rows are outside "
                + (f"data.format '{rules.format}'" if rules.format != "auto" else "the accepted formats")
                + f" (more than {MAX_OUTSIDE_FORMAT_SHARE:.0%}): lines {_line_list([p.line for p in outside if p.line is not None], len(outside))}"
                + "; they look like " + ", ".join(f"{k} ({v})" for k, v in looks.most_common()))

    return Prepared(kept, build_report(data, rules, seed=seed, fmt=fmt, formats=FORMATS, valid=rows, kept=kept,
                                       problems=problems, entries=entries, conflicts=conflicts,
                                       outside_error=outside_error))


#: The fix when SFT data holds preference pairs: the spec's method, not the rows, is what is wrong.
_FIX_PAIRS_AS_ROWS = ("these are preference pairs: set training.method: dpo or orpo to train on them (`launcher data "
                      "check --method dpo FILE` checks them as pairs)")


def prepare(data: bytes, rules: DataRules, *, seed: int = 42) -> Prepared:
    """Apply every enabled golden rule to JSONL bytes; return kept rows and a JSON-ready report.

    Raises :class:`DataError` when more than MAX_OUTSIDE_FORMAT_SHARE of the rows are outside
    the format (naming their lines and what they look like), or when fewer than
    ``rules.min_rows`` rows are kept (giving the counts and the main reasons). A few malformed
    lines never raise: they are problems in the report.
    """
    prepared = prepare_report(data, rules, seed=seed)
    refuse_unusable(prepared.report, rules, unit="training rows", check="launcher data check FILE",
                    format_fix=_FIX_PAIRS_AS_ROWS if "preference" in prepared.report["outside_format"]["looks_like"]
                    else "write every row in one accepted format (run `launcher data check FILE` to see each "
                         "line), or set data.format: auto to read each row by its own keys")
    return prepared


def refuse_unusable(report: dict[str, Any], rules: DataRules, *, unit: str, check: str, format_fix: str) -> None:
    """Raise :class:`DataError` (with ``.report``, for data_report.json on failure) when ``report`` (SFT rows or
    preference pairs: ``unit``) says a run cannot use the data: too much outside the format, or fewer than
    ``rules.min_rows`` kept. ``check``: the command that shows every line."""
    if report["errors"]:
        err = DataError("; ".join(report["errors"]), hint=format_fix)
        err.report = report  # type: ignore[attr-defined]
        raise err
    if report["kept_rows"] < rules.min_rows:
        reasons = _top_reasons(report)
        msg = (f"only {report['kept_rows']} of {report['total_lines']} lines are usable {unit} "
               f"({report['valid_rows']} valid); data.min_rows is {rules.min_rows}")
        if reasons:
            msg += ". Main reasons: " + "; ".join(reasons)
        err = DataError(msg, hint=f"run `{check}` to see every bad line, fix the data, "
                                  "or relax the rule in the spec's `data:` section (or lower data.min_rows)")
        err.report = report  # type: ignore[attr-defined]
        raise err


_Item = TypeVar("_Item")


def split_validation(rows: list[_Item], fraction: float, seed: int = 42) -> tuple[list[_Item], list[_Item]]:
    """Deterministic train/validation split of rows (or preference pairs); both keep the input order.

    With ``fraction > 0`` and at least 2 rows, validation gets at least 1 row and
    training keeps at least 1.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(rows)
    if fraction == 0 or n < 2:
        return list(rows), []
    n_val = min(n - 1, max(1, round(n * fraction)))
    picked = set(random.Random(seed).sample(range(n), n_val))
    return ([r for i, r in enumerate(rows) if i not in picked],
            [r for i, r in enumerate(rows) if i in picked])


# ---------------------------------------------------------------------------- the CLI's view

def check_file(path: str | Path, rules: DataRules | None = None, *, seed: int = 42,
               data: bytes | None = None,
               report_of: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run the rules over a local JSONL file and return the report (never raises for bad data;
    ``report['ok']`` says whether a run would accept it). ``data``: the file's bytes, when already read;
    ``report_of``: what reads them (default :func:`prepare_report`; preference pairs pass theirs)."""
    p = Path(path)
    data = read_data_file(p) if data is None else data
    rules = rules or DataRules()
    report = (report_of or prepare_report)(data, rules, seed=seed).report
    report["source"] = str(p)
    report["ok"] = report["kept_rows"] >= rules.min_rows and not report["errors"]
    return report


_NOT_REGULAR = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def read_data_file(p: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a local data file, read at most ``limit`` + 1 bytes deep.

    Only a regular file is read: a device (/dev/zero) or a FIFO never ends or blocks, so it is
    refused before reading. A file over ``limit`` is refused naming the limit: a bounded read,
    never all of memory. Lines over MAX_LINE_BYTES are problems of their line, found later."""
    try:
        st = os.stat(p)  # follows a symlink: what matters is what would be read
        if stat.S_ISDIR(st.st_mode):
            raise DataError(f"{p}: is a folder, not a JSONL file", hint="name the .jsonl file")
        kind = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), None)
        if kind is not None:
            raise DataError(f"{p}: is {kind}, not a regular file; a data file is read whole and hashed",
                            hint="save the data to a .jsonl file and check that")
        with open(p, "rb") as f:
            data = f.read(limit + 1)  # +1: a file of exactly the limit is fine
    except FileNotFoundError:
        raise DataError(f"{p}: file not found", hint="check the path") from None
    except IsADirectoryError:
        raise DataError(f"{p}: is a folder, not a JSONL file", hint="name the .jsonl file") from None
    except OSError as err:
        raise DataError(f"{p}: cannot be read: {err.strerror}", hint="check permissions") from None
    if len(data) > limit:
        line = data.count(b"\n") + 1
        raise DataError(f"{p}: larger than the {limit:,}-byte limit of a data file (stopped reading at line "
                        f"{line:,})", hint="split the file, or sample the rows you mean to train on")
    return data


#: One sentence on the accepted rows, for `launcher data check --help`.
FORMATS_SUMMARY = ("A JSONL file, one JSON object per line, each row in one accepted format: "
                   "{instruction, input?, output}, chat {messages: [{role, content}]} or ShareGPT "
                   "{conversations: [{from, value}]}; a file may mix them (see --explain).")


def explain_text() -> str:
    """What `launcher data check --explain` prints: every accepted format with an example, how
    the format is chosen, the limits, and each data rule with its default (from the spec)."""
    from jobs.spec import field_docs

    out = ["Accepted data: JSON Lines (UTF-8, a BOM and CRLF are fine), one JSON object per line, each in one of:"]
    for name, example in FORMAT_EXAMPLES.items():
        out.append(f"  {name:<12} {example}")
    out += [
        "  instruction rows may also carry 'persona' (or 'tone'); conversations may be multi-turn: an optional",
        "  system turn first, then user and assistant turns in turn (ShareGPT: human and gpt), ending with an",
        "  assistant turn. Loss is on the assistant turns only.",
        "",
        "data.format: auto (default) reads each row by its own keys, so a file may mix formats; the report counts",
        "rows per format. Set instruction, messages or sharegpt to require one: rows in another format are listed",
        f"with the format they look like. Rows in no format, in two, or outside a set format are an error beyond "
        f"{MAX_OUTSIDE_FORMAT_SHARE:.0%} of the rows.",
        f"Limits: a line over {MAX_LINE_BYTES:,} bytes is a problem of its line; a file over {MAX_FILE_BYTES:,} bytes, "
        "a device or a FIFO is refused.",
        "",
        "Rules (the spec's data: section; `launcher data check --spec spec.yaml FILE` applies a spec's):",
    ]
    for path, default, desc in field_docs():
        if path.startswith("data.") and path != "data.format":
            out.append(f"  {path[5:]:<20} {default:<10} {desc}")
    out += ["",
            "Near duplicates (dedup_near): rows whose words differ only in function words (about/around, a/the, "
            "is/was; number words = digits), at any length, or whose word 3-shingles reach near_dup_threshold.",
            "Conflicts (a check that keeps every row): the same question with different answers, e.g. 'blue' vs "
            "'yellow', named with their lines."]
    return "\n".join(out)


def _line_list(lines: list[int], count: int, limit: int = 10) -> str:
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (f", … ({count - limit} more)" if count > limit else "")


def format_report(report: dict[str, Any], *, max_problems: int = 20) -> str:
    """A short human-readable summary of a report: what ``launcher data check`` prints."""
    head = f"{report.get('source', 'dataset')} (sha256 {report['dataset_sha256'][:12]})"
    counts = report.get("counts") or {}
    by_format = counts.get("by_format") or {}
    fmt = report.get("format", "instruction")
    fmt_text = f"{fmt} format" if fmt != "mixed" else "mixed formats, each row read by its own keys"
    unit = report.get("unit", "rows")  # preference reports count pairs
    one = _unit_noun(report)
    out = [head,
           f"  {counted(report['total_lines'], 'line')} ({fmt_text}), {counted(report['valid_rows'], 'valid ' + one)}, "
           f"{report['kept_rows']} kept"]
    if len(by_format) > 1 or (by_format and fmt not in by_format):
        out.append(f"  {unit} by format: " + ", ".join(f"{f} {c['valid']} valid, {c['kept']} kept"
                                                    for f, c in by_format.items()))
    if counts:
        lost = [(counts["malformed"], counted(counts["malformed"], "malformed line")),
                (counts["outside_format"], f"{counts['outside_format']} outside the format")]
        lost += [(n, rule_count(n, name, one)) for name, n in counts["dropped_by_rule"].items()]
        if any(n for n, _ in lost):
            out.append("  not kept: " + ", ".join(what for n, what in lost if n))
    personas = report.get("personas") or {}
    if len(personas) > 1 or (personas and NO_PERSONA not in personas):
        out.append("  personas: " + ", ".join(f"{k} {v}" for k, v in personas.items()))
    problems = report["problems"]
    total = report.get("problems_total", len(problems))
    if total:
        out.append(f"  problems ({total}):")
        fixes_shown: set[str] = set()
        for p in problems[:max_problems]:
            fix = p.get("fix") or ""
            # Each fix once: twenty lines of the same advice hide the line numbers.
            out.append(f"    line {p['line']}: {p['message']}" + (f" — {fix}" if fix not in fixes_shown else ""))
            fixes_shown.add(fix)
        if total > max_problems:
            out.append(f"    … {total - max_problems} more")
    out.append("  rules:")
    for name, entry in report["rules"].items():
        if entry["action"] == "off":
            out.append(f"    {name:<18} off")
            continue
        text = f"    {name:<18} {entry['count']:>4} {entry['action']}"
        if entry.get("dropped"):
            text += f" ({entry['dropped']} dropped)"
        if entry.get("kinds"):
            text += " [" + ", ".join(f"{k} {v}" for k, v in entry["kinds"].items()) + "]"
        if entry.get("side"):  # a preference pair's rule acts on one side or both
            text += f" (on {'both answers' if entry['side'] == 'both' else 'the ' + entry['side'] + ' answer'})"
        if entry.get("in_rejected_kept"):
            n = entry["in_rejected_kept"]
            text += (f" ({counted(n, 'rejected answer')} {'keeps its own' if n == 1 else 'keep theirs'}: the model "
                     "learns not to write it)")
        if entry.get("reworded"):
            n = entry["reworded"]
            text += f" ({n} {'differs' if n == 1 else 'differ'} only in words like about/around, a/the)"
        if entry["count"]:
            text += ": lines " + _line_list(entry["lines"], entry["count"])
        out.append(text)
    conflicts = (report.get("conflicts") or {}).get("conflicts", [])
    if conflicts:
        groups = report["conflicts"]["groups"]
        out.append(f"  warning: {counted(groups, 'question')} answered differently (conflicts), the model would learn "
                   f"either answer — keep the right one, delete the others:")
        for c in conflicts[:max_problems]:
            (la, a), (lb, b) = list(c["answers"].items())[:2]
            differ = f" ('{c['differ'][0]}' vs '{c['differ'][1]}')" if any(c["differ"]) else ""
            out.append(f"    lines {_line_list(c['lines'], len(c['lines']))}: \"{c['prompt']}\"{differ}: "
                       f"line {la} \"{a}\", line {lb} \"{b}\"")
        if groups > max_problems:
            out.append(f"    … {groups - max_problems} more")
    reworded = (report.get("conflicts") or {}).get("reworded_questions", [])
    if reworded:
        count = report["conflicts"]["reworded_count"]
        out.append(f"  warning: {counted(count, 'pair')} of questions one word apart with the same answer: a rewording "
                   f"teaches nothing new (delete one), two questions that share an answer are fine (keep both):")
        for r in reworded[:max_problems]:
            out.append(f"    lines {r['lines'][0]}, {r['lines'][1]}: '{r['differ'][0]}' vs '{r['differ'][1]}' in "
                       f"\"{r['prompts'][1]}\"")
        if count > max_problems:
            out.append(f"    … {count - max_problems} more")
    errors = report.get("errors") or []
    for e in errors:
        out.append(f"  ERROR: {e} — " + ("write every line as a preference pair, or set training.method: sft"
                                          if unit == "pairs" else _FIX_PAIRS_AS_ROWS if "preference" in
                                          (report.get("outside_format") or {}).get("looks_like", {}) else
                                          "write every row in one accepted format, or use data.format: auto"))
    if report["kept_rows"] < report["min_rows"]:
        out.append(f"  FAIL: {counted(report['kept_rows'], one)} kept, data.min_rows is {report['min_rows']}")
    elif errors:
        out.append("  FAIL: a run would reject this data")
    else:
        out.append("  OK: a run would accept this data")
    return "\n".join(out)
