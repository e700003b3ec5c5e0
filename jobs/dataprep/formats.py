"""Reading JSONL bytes into rows: one line into a :class:`Row` or a :class:`Problem` naming the line, the
accepted formats (instruction, chat messages, ShareGPT) and how a row's format is told from its keys."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jobs.dataprep.rows import MAX_LINE_BYTES, Row
from jobs.errors import Problem


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
