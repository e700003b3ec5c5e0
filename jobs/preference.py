"""Preference pairs (training.method dpo or orpo): raw JSONL bytes → clean pairs and a report.

The data side of preference tuning, beside :mod:`jobs.dataprep` (SFT rows), whose reader and rules it reuses
rather than copies. Pure functions, no torch. A line is one pair in any of TRL's three preference formats:

* ``preference``: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``, all strings;
* ``preference_chat``: ``prompt`` a list of messages, ``chosen`` and ``rejected`` each a list of one assistant
  message;
* ``preference_implicit``: ``chosen`` and ``rejected`` whole conversations that start with the same turns (the
  prompt) and end in one assistant message each (TRL's ``extract_prompt``; a string ``prompt`` beside them is
  ignored, as TRL's ``maybe_extract_prompt`` does).

Each pair becomes two :class:`jobs.dataprep.Row` that share the prompt and differ only in the last assistant
turn, so the trainer encodes each side as an SFT row (the prompt masked). The golden rules apply to pairs: every
text rule acts on the chosen answer (what the model learns to write; a rejected answer's boilerplate or URL is
what it learns not to write, so it stays), PII is redacted or dropped on both sides, and pairs whose two answers
are the same, exact and near duplicate pairs, and pairs that prefer both ways are found. :func:`prepare_pairs`
builds the report in :func:`jobs.dataprep.prepare`'s shape, so :func:`jobs.dataprep.format_report` prints it.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from jobs import dataprep
from jobs.dataprep import (MAX_LINE_BYTES, MAX_OUTSIDE_FORMAT_SHARE, REPORT_LINES, FORMAT_KEYS,
                           Row, RuleResult, balance_groups, content_key, dedup_exact, handle_pii, jaccard,
                           limit_output_words, limit_sentences, read_object, remove_urls,
                           row_formats, shingles, strip_boilerplate, strip_boilerplate_text)
from jobs.dataprep.dedup import _NUM_PERM, _lsh_params
from jobs.dataprep.formats import (_a, _is_encodable, _OutsideFormat, _parse_turns, _persona_of, _split_lines,
                                   _type_name)
from jobs.dataprep.rules import _normalise
from jobs.errors import Problem
from jobs.spec import DataRules

#: The formats a pair may be written in (the report counts pairs per format).
PAIR_FORMATS = ("preference", "preference_chat", "preference_implicit")
PAIR_EXAMPLES = {
    "preference": '{"prompt": "...", "chosen": "...", "rejected": "..."}',
    "preference_chat": '{"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", '
                       '"content": "..."}], "rejected": [{"role": "assistant", "content": "..."}]}',
    "preference_implicit": '{"chosen": [{"role": "user", ...}, {"role": "assistant", "content": "..."}], '
                           '"rejected": [{"role": "user", ...}, {"role": "assistant", "content": "..."}]}',
}
_FIX_PAIR = ('write each line as one pair, e.g. {"prompt": "...", "chosen": "...", "rejected": "..."} (TRL\'s '
             'conversational forms too: `launcher data check --explain` shows each)')
_FIX_JSON = 'make the line one JSON object, e.g. {"prompt": "...", "chosen": "...", "rejected": "..."}'
_FIX_CHAT = ('give "prompt" as a list of {"role": "system"|"user"|"assistant", "content": "..."} ending with a '
             'user turn, and "chosen" and "rejected" each as a list of one {"role": "assistant", "content": "..."}')
_FIX_IMPLICIT = ('give "chosen" and "rejected" as whole conversations that share their first turns (the prompt) '
                 'and end in one assistant message each, or give the prompt apart: ' + PAIR_EXAMPLES["preference_chat"])


@dataclass(frozen=True)
class Pair:
    """One preference pair from line ``line``: two rows with the same prompt (``instruction``/``input``, or the
    same turns before the last) that differ only in their last assistant answer. Each side encodes as an SFT
    row (``jobs.trainer.train.encode_example``), its prompt masked."""

    chosen: Row
    rejected: Row
    line: int


@dataclass
class PreparedPairs:
    """What :func:`prepare_pairs` returns: the kept pairs, in file order, and the data report."""

    pairs: list[Pair]
    report: dict[str, Any]


# ---------------------------------------------------------------------------- reading

def looks_like_pairs(data: bytes) -> bool:
    """Whether a JSONL file is preference pairs: its first JSON object has 'chosen' or 'rejected' (the keys no
    SFT format has). What `launcher data check` goes by when neither a spec nor --method says."""
    for n, raw in enumerate(_split_lines(bytes(data).removeprefix(b"\xef\xbb\xbf")), 1):
        obj = read_object(raw.removesuffix(b"\r"), n)
        if isinstance(obj, dict):
            return "chosen" in obj or "rejected" in obj
    return False


def _relabel(error: str, label: Callable[[int], str]) -> str:
    """A turn error of dataprep's conversation check ('turn 3: ...', 'turns 2 and 3') with each turn named by
    where it sits in the pair ('prompt turn 2', "'chosen'")."""
    return re.sub(r"\bturns? (\d+)(?: and (\d+))?",
                  lambda m: label(int(m.group(1))) + (f" and {label(int(m.group(2)))}" if m.group(2) else ""), error)


def _one_answer(side: str, value: list[Any]) -> str | None:
    """What is wrong with an explicit-prompt side that should be one assistant message, or None."""
    if not value:
        return f"'{side}' is empty"
    if len(value) != 1:
        return f"'{side}' must be one assistant message, got {len(value)} messages"
    msg = value[0]
    if isinstance(msg, dict) and isinstance(msg.get("role"), str) and msg["role"].strip().lower() != "assistant":
        return f"'{side}' must be an assistant message, got role '{msg['role']}'"
    return None


def _chat_pair(obj: dict[str, Any], n: int) -> tuple[tuple[tuple[str, str], ...], str, str] | Problem:
    """An explicit conversational pair: (prompt turns, chosen text, rejected text) or its Problem."""
    prompt = obj["prompt"]
    errors: list[str] = []
    if not prompt:
        errors.append("'prompt' is empty")
    elif isinstance(prompt[-1], dict) and str(prompt[-1].get("role", "")).strip().lower() == "assistant":
        # said once here, rather than as 'two assistant turns in a row' for each side
        return Problem(f"line {n}", f"prompt turn {len(prompt)} is an assistant turn: a prompt ends with the user "
                                    "turn that 'chosen' and 'rejected' answer", _FIX_CHAT, n)
    answers: dict[str, str] = {}
    prompt_turns: tuple[tuple[str, str], ...] = ()
    for side in ("chosen", "rejected"):
        bad = _one_answer(side, obj[side])
        if bad:
            errors.append(bad)
            continue
        turns, found = _parse_turns({"messages": [*prompt, *obj[side]]}, "messages")
        size = len(prompt)
        errors += [_relabel(e, lambda i: f"prompt turn {i}" if i <= size else f"'{side}'") for e in found]
        if not found:
            answers[side] = turns[-1][1]
            prompt_turns = turns[:-1]
    errors = list(dict.fromkeys(errors))  # a prompt's problem is found once per side
    if errors:
        return Problem(f"line {n}", "; ".join(errors[:5]), _FIX_CHAT, n)
    return prompt_turns, answers["chosen"], answers["rejected"]


def _implicit_pair(obj: dict[str, Any], n: int) -> tuple[tuple[tuple[str, str], ...], str, str] | Problem:
    """A pair of whole conversations: the prompt is the turns both start with (TRL's extract_prompt)."""
    errors: list[str] = []
    convs: dict[str, tuple[tuple[str, str], ...]] = {}
    for side in ("chosen", "rejected"):
        if not obj[side]:
            errors.append(f"'{side}' is empty")
            continue
        turns, found = _parse_turns({"messages": obj[side]}, "messages")
        errors += [_relabel(e, lambda i: f"'{side}' turn {i}") for e in found]
        convs[side] = turns
    if errors:
        return Problem(f"line {n}", "; ".join(errors[:5]), _FIX_IMPLICIT, n)
    chosen, rejected = convs["chosen"], convs["rejected"]
    if chosen == rejected:  # the same conversation twice: a pair whose sides are equal (counted by its rule)
        return chosen[:-1], chosen[-1][1], rejected[-1][1]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        return Problem(f"line {n}", "'chosen' and 'rejected' start differently, so they share no prompt (an "
                                    "implicit prompt is the turns both conversations start with)", _FIX_IMPLICIT, n)
    if len(chosen) != shared + 1 or len(rejected) != shared + 1:
        return Problem(f"line {n}", f"after the {shared} turn(s) both conversations share, 'chosen' has "
                                    f"{len(chosen) - shared} more and 'rejected' {len(rejected) - shared}: each must "
                                    "end in exactly one assistant message of its own", _FIX_IMPLICIT, n)
    return chosen[:-1], chosen[-1][1], rejected[-1][1]


def _string_pair(obj: dict[str, Any], n: int) -> tuple[str, str, str] | Problem:
    errors: list[str] = []
    values: dict[str, str] = {}
    for key in ("prompt", "chosen", "rejected"):
        value = obj.get(key)
        if key not in obj:
            errors.append("missing 'prompt' (plain-text pairs need it: an implicit prompt is read only from "
                          "conversations, as splitting two strings at their common prefix would cut a word)")
        elif not isinstance(value, str):
            errors.append(f"'{key}' must be a string like the others, got {_type_name(value)}")
        elif not value.strip():
            errors.append(f"'{key}' is empty")
        elif not _is_encodable(value):
            errors.append(f"'{key}' contains an unpaired \\ud800-\\udfff escape")
        else:
            values[key] = value.strip()
    if errors:
        return Problem(f"line {n}", "; ".join(errors), "give non-empty strings 'prompt', 'chosen' and 'rejected' "
                                                        "(or conversations: see `launcher data check --explain`)", n)
    return values["prompt"], values["chosen"], values["rejected"]


def _parse_pair(obj: dict[str, Any], n: int, persona_field: str) -> Pair | Problem:
    """One JSON object read as a pair of any format. Never raises."""
    where = f"line {n}"
    if "chosen" not in obj and "rejected" not in obj:
        looks = row_formats(obj)
        if looks:
            return _OutsideFormat(where, f"{_a(looks[0])} row ('{FORMAT_KEYS[looks[0]][0]}'), not a preference "
                                         "pair", "write it as a pair, or set training.method: sft to train on rows",
                                  n, looks_like=looks[0])
        keys = ", ".join(f"'{k}'" for k in list(obj)[:6]) or "no keys"
        return _OutsideFormat(where, f"missing 'chosen' and 'rejected'; the row has {keys}, which is no "
                                     "preference format", _FIX_PAIR, n,
                              looks_like="prompt-completion" if "completion" in obj else "unknown")
    missing = [f"missing '{side}'" for side in ("chosen", "rejected") if side not in obj]
    if missing:
        return Problem(where, "; ".join(missing) + ": a pair needs both sides", _FIX_PAIR, n)
    persona, bad_persona = _persona_of(obj, persona_field)
    if bad_persona:
        return Problem(where, bad_persona, "give the persona as a string", n)
    chosen, rejected, prompt = obj["chosen"], obj["rejected"], obj.get("prompt")
    kinds = {side: type(v) for side, v in (("chosen", chosen), ("rejected", rejected))}
    wrong = [f"'{side}' must be a string or a list of messages, got {_type_name(obj[side])}"
             for side, t in kinds.items() if t not in (str, list)]
    if wrong:
        return Problem(where, "; ".join(wrong), _FIX_PAIR, n)
    if kinds["chosen"] is not kinds["rejected"]:
        return Problem(where, "'chosen' is a " + ("string" if kinds["chosen"] is str else "list") + " and "
                              "'rejected' a " + ("string" if kinds["rejected"] is str else "list") +
                       ": write both sides the same way", _FIX_PAIR, n)
    if kinds["chosen"] is str:
        parsed_text = _string_pair(obj, n)
        if isinstance(parsed_text, Problem):
            return parsed_text
        question, good, bad = parsed_text
        return Pair(Row(n, question, good, persona=persona, fmt="preference"),
                    Row(n, question, bad, persona=persona, fmt="preference"), n)
    if isinstance(prompt, list):
        fmt, parsed = "preference_chat", _chat_pair(obj, n)
    elif prompt is None or isinstance(prompt, str):
        fmt, parsed = "preference_implicit", _implicit_pair(obj, n)
    else:
        return Problem(where, f"'prompt' must be a list of messages like 'chosen', got {_type_name(prompt)}",
                       _FIX_CHAT, n)
    if isinstance(parsed, Problem):
        return parsed
    turns, good, bad = parsed
    users = [c for r, c in turns if r == "user"]
    if not users:
        return Problem(where, "the prompt has no user turn", _FIX_CHAT, n)
    return Pair(Row(n, users[-1], good, persona=persona, turns=(*turns, ("assistant", good)), fmt=fmt),
                Row(n, users[-1], bad, persona=persona, turns=(*turns, ("assistant", bad)), fmt=fmt), n)


def read_pairs(data: bytes | str, *, persona_field: str = "persona") -> tuple[list[Pair], list[Problem]]:
    """Parse JSONL bytes into pairs and one :class:`Problem` per bad line, like :func:`jobs.dataprep.read_jsonl`
    (a BOM, CRLF, invalid UTF-8, oversized lines, non-objects: each a problem of its line; blank lines skipped).
    Never raises. A line with neither 'chosen' nor 'rejected' is outside the format (an SFT row names its
    format); a missing, empty or non-string side, a bad role or a prompt that does not end with a user turn is
    a malformed line."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    data = bytes(data).removeprefix(b"\xef\xbb\xbf")
    pairs: list[Pair] = []
    problems: list[Problem] = []
    for n, raw in enumerate(_split_lines(data), start=1):
        obj = read_object(raw.removesuffix(b"\r"), n, _FIX_JSON)
        if obj is None:
            continue
        parsed = obj if isinstance(obj, Problem) else _parse_pair(obj, n, persona_field)
        (pairs if isinstance(parsed, Pair) else problems).append(parsed)  # type: ignore[arg-type]
    return pairs, problems


# ---------------------------------------------------------------------------- rules over pairs

def _entry(lines: list[int], action: str, **details: Any) -> dict[str, Any]:
    """A rule's report entry, in the shape of dataprep's (count, lines, action, details)."""
    return RuleResult([], list(lines), action, details).entry()


def _on_chosen(pairs: list[Pair], rule: Callable[[list[Row]], RuleResult]) -> tuple[list[Pair], dict[str, Any]]:
    """Run an SFT text rule on the chosen answers: a pair whose chosen row the rule drops is dropped; a changed
    chosen row replaces the pair's chosen side."""
    result = rule([p.chosen for p in pairs])
    by_line = {r.line: r for r in result.rows}
    kept = [replace(p, chosen=by_line[p.line]) for p in pairs if p.line in by_line]
    return kept, {**result.entry(), "side": "chosen"}


def _boilerplate(pairs: list[Pair]) -> tuple[list[Pair], dict[str, Any]]:
    kept, entry = _on_chosen(pairs, strip_boilerplate)
    rejected = [p.line for p in pairs if strip_boilerplate_text(p.rejected.output) != p.rejected.output]
    # left in the rejected answer: the pair teaches the model not to write it
    entry["in_rejected_kept"] = len(rejected)
    return kept, entry


def _pii(pairs: list[Pair], mode: str) -> tuple[list[Pair], dict[str, Any]]:
    """PII on both sides: a rejected answer is training data too (the model reads it), so it is redacted, or
    the pair dropped, like a chosen one."""
    chosen = handle_pii([p.chosen for p in pairs], mode)
    rejected = handle_pii([p.rejected for p in pairs], mode)
    kinds = Counter(chosen.details["kinds"]) + Counter(rejected.details["kinds"])
    new_chosen, new_rejected = {r.line: r for r in chosen.rows}, {r.line: r for r in rejected.rows}
    kept = [Pair(new_chosen[p.line], new_rejected[p.line], p.line) for p in pairs
            if p.line in new_chosen and p.line in new_rejected]
    lines = sorted(set(chosen.lines) | set(rejected.lines))
    return kept, _entry(lines, chosen.action, kinds=dict(sorted(kinds.items())), side="both")


def _identical(pairs: list[Pair]) -> tuple[list[Pair], dict[str, Any]]:
    """Pairs whose two answers are the same (after case, spaces and Unicode forms): nothing to prefer, and in
    DPO a zero gradient. Checked after the text rules, which can make two answers equal."""
    same = [p.line for p in pairs if _normalise(p.chosen.output) == _normalise(p.rejected.output)]
    drop = set(same)
    return [p for p in pairs if p.line not in drop], _entry(same, "dropped")


def _prompt_texts(pair: Pair) -> list[str]:
    row = pair.chosen
    return [c for _, c in row.turns[:-1]] if row.turns else [f"{row.instruction} {row.input}"]


def _swapped(pairs: list[Pair]) -> tuple[list[Pair], dict[str, Any]]:
    """Check (keeps every pair): two pairs with the same prompt that prefer each other's answer. Training on
    both cancels them out; a person must decide which preference is right."""
    seen: dict[tuple[str, str, str], int] = {}
    lines: list[int] = []
    with_: list[list[int]] = []
    for p in pairs:
        prompt = content_key(_prompt_texts(p))
        good, bad = _normalise(p.chosen.output), _normalise(p.rejected.output)
        other = seen.get((prompt, bad, good))
        if other is not None:
            lines += [other, p.line]
            with_.append([p.line, other])
        seen.setdefault((prompt, good, bad), p.line)
    return pairs, _entry(sorted(set(lines)), "flagged", swapped_with=with_[:REPORT_LINES])


def _proxy(pair: Pair) -> Row:
    """The pair as one row (prompt, chosen, rejected), for dataprep's exact-duplicate key."""
    prompt = tuple(pair.chosen.turns[:-1]) or (("user", f"{pair.chosen.instruction} {pair.chosen.input}"),)
    return Row(pair.line, pair.chosen.instruction, pair.chosen.output,
               turns=(*prompt, ("assistant", pair.chosen.output), ("assistant", pair.rejected.output)))


def _dedup_exact(pairs: list[Pair]) -> tuple[list[Pair], dict[str, Any]]:
    result = dedup_exact([_proxy(p) for p in pairs])
    keep = {r.line for r in result.rows}
    return [p for p in pairs if p.line in keep], result.entry()


def _dedup_near(pairs: list[Pair], threshold: float, seed: int) -> tuple[list[Pair], dict[str, Any]]:
    """Drop a pair that is a near-duplicate of an earlier kept pair: its prompt, chosen and rejected differ only
    in function words (dataprep's content words), or both its prompt's and its answers' word 3-shingles reach
    ``threshold`` against the earlier pair's. Prompt and answers are compared apart: several pairs may share a
    long prompt with different answers, and one shingle set over all three would call them duplicates.
    MinHash LSH over the answers finds the candidates; exact Jaccard decides."""
    from datasketch import MinHash, MinHashLSH

    b, r = _lsh_params(float(threshold))
    lsh = MinHashLSH(num_perm=_NUM_PERM, params=(b, r))
    template = MinHash(num_perm=_NUM_PERM, seed=seed % 2**32)
    kept: list[Pair] = []
    lines: list[int] = []
    dup_of: list[list[int]] = []
    by_content: dict[str, int] = {}
    sets: dict[str, tuple[set[str], set[str], int]] = {}
    reworded = 0
    for i, pair in enumerate(pairs):
        prompt_text = " ".join(_prompt_texts(pair))
        ckey = content_key([prompt_text, pair.chosen.output, pair.rejected.output]) if threshold < 1.0 else ""
        match = by_content.get(ckey) if ckey else None
        if match is not None:
            reworded += 1
        prompt_sh = shingles(prompt_text)
        answer_sh = {"c " + s for s in shingles(pair.chosen.output)} | {"r " + s for s in shingles(pair.rejected.output)}
        if match is None:
            mh = template.copy()
            mh.update_batch([s.encode("utf-8") for s in answer_sh])
            for key in sorted(lsh.query(mh), key=lambda k: sets[k][2]):
                other_prompt, other_answers, other_line = sets[key]
                if jaccard(answer_sh, other_answers) >= threshold and jaccard(prompt_sh, other_prompt) >= threshold:
                    match = other_line
                    break
        if match is not None:
            lines.append(pair.line)
            dup_of.append([pair.line, match])
            continue
        lsh.insert(str(i), mh)
        sets[str(i)] = (prompt_sh, answer_sh, pair.line)
        if ckey:
            by_content[ckey] = pair.line
        kept.append(pair)
    return kept, _entry(lines, "dropped", threshold=threshold, reworded=reworded, duplicate_of=dup_of[:REPORT_LINES])


def _balance(pairs: list[Pair], share: float, seed: int) -> tuple[list[Pair], dict[str, Any]]:
    result = balance_groups([p.chosen for p in pairs], share, seed)
    keep = {r.line for r in result.rows}
    return [p for p in pairs if p.line in keep], result.entry()


def _run_rules(pairs: list[Pair], rules: DataRules, seed: int) -> tuple[list[Pair], dict[str, dict[str, Any]]]:
    steps: list[tuple[str, bool, Callable[[list[Pair]], tuple[list[Pair], dict[str, Any]]]]] = [
        ("strip_boilerplate", rules.strip_boilerplate, _boilerplate),
        ("remove_urls", rules.remove_urls, lambda ps: _on_chosen(ps, remove_urls)),
        ("pii", rules.pii != "off", lambda ps: _pii(ps, rules.pii)),
        ("long_sentences", rules.long_sentences != "off",
         lambda ps: _on_chosen(ps, lambda rs: limit_sentences(rs, rules.max_sentence_words, rules.long_sentences))),
        ("max_output_words", rules.max_output_words is not None,
         lambda ps: _on_chosen(ps, lambda rs: limit_output_words(rs, rules.max_output_words))),
        # checks, always on; after the text rules, which can make two answers equal
        ("identical_sides", True, _identical),
        ("swapped", True, _swapped),
        ("dedup_exact", rules.dedup_exact, _dedup_exact),
        ("dedup_near", rules.dedup_near, lambda ps: _dedup_near(ps, rules.near_dup_threshold, seed)),
        ("balance", rules.balance, lambda ps: _balance(ps, rules.max_group_share, seed)),
    ]
    entries: dict[str, dict[str, Any]] = {}
    for name, enabled, fn in steps:
        if not enabled:
            entries[name] = _entry([], "off")
            continue
        pairs, entries[name] = fn(pairs)
    return pairs, entries


def _outside_error(outside: list[_OutsideFormat], non_blank: int) -> str:
    looks = Counter(p.looks_like for p in outside)
    shown = ", ".join(str(p.line) for p in outside[:10]) + (f", … ({len(outside) - 10} more)"
                                                            if len(outside) > 10 else "")
    return (f"{len(outside)} of {non_blank} lines are not preference pairs (more than "
            f"{MAX_OUTSIDE_FORMAT_SHARE:.0%}): lines {shown}; they look like "
            + ", ".join(f"{k} ({v})" for k, v in looks.most_common()))


def prepare_pairs_report(data: bytes | str, rules: DataRules, *, seed: int = 42) -> PreparedPairs:
    """Like :func:`prepare_pairs` but never raises: the caller decides what too few pairs means."""
    data = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    pairs, problems = read_pairs(data, persona_field=rules.balance_field)
    kept, entries = _run_rules(pairs, rules, seed)
    valid_by_format = Counter(p.chosen.fmt for p in pairs)
    fmt = "mixed" if len(valid_by_format) > 1 else next(iter(valid_by_format), "preference")
    # SFT's conflict check (one question, two answers) does not apply: several pairs may share a prompt.
    # Pairs that prefer both ways are the 'swapped' check among the rules.
    no_conflicts = {"conflicts": [], "groups": 0, "reworded_questions": [], "reworded_count": 0}
    # a pair's chosen side carries its format and persona
    report = dataprep.build_report(data, rules, seed=seed, fmt=fmt, formats=PAIR_FORMATS,
                                   valid=[p.chosen for p in pairs], kept=[p.chosen for p in kept],
                                   problems=problems, entries=entries, conflicts=no_conflicts,
                                   outside_error=_outside_error, unit="pairs")
    return PreparedPairs(kept, report)


def prepare_pairs(data: bytes, data_spec: DataRules, *, seed: int = 42) -> PreparedPairs:
    """Read preference pairs from JSONL bytes, apply the data rules (``data_spec``: the spec's ``data:``
    section), and return the kept pairs with a JSON-ready report in :func:`jobs.dataprep.prepare`'s shape
    (``unit: pairs``; ``valid_rows``/``kept_rows`` count pairs).

    Raises :class:`DataError` (with ``.report``) when more than MAX_OUTSIDE_FORMAT_SHARE of the lines are not
    pairs, or when fewer than ``data_spec.min_rows`` pairs are kept; a few malformed lines never raise."""
    prepared = prepare_pairs_report(data, data_spec, seed=seed)
    dataprep.refuse_unusable(prepared.report, data_spec, unit="preference pairs",
                             check="launcher data check --method dpo FILE",
                             format_fix="write every line as a preference pair (run `launcher data check --method dpo "
                                        "FILE` to see each line), or set training.method: sft to train on SFT rows")
    return prepared


def check_pairs_file(path: str | Path, rules: DataRules | None = None, *, seed: int = 42,
                     data: bytes | None = None) -> dict[str, Any]:
    """:func:`jobs.dataprep.check_file` for preference pairs: the report of a local file (never raises for bad
    data; ``report['ok']`` says whether a dpo/orpo run would accept it). ``data``: its bytes, when already read."""
    return dataprep.check_file(path, rules, seed=seed, data=data, report_of=prepare_pairs_report)


def explain_text() -> str:
    """The preference part of `launcher data check --explain`."""
    out = ["Preference pairs (training.method dpo or orpo; `launcher data check --method dpo FILE`): one pair per "
           "line, in any of TRL's formats (a file may mix them):"]
    for name, example in PAIR_EXAMPLES.items():
        out.append(f"  {name:<20} {example}")
    out += [
        "  preference_implicit: the prompt is the turns both conversations start with (a string 'prompt' beside",
        "  them is ignored, as in TRL); each must then end in one assistant message. Plain-text pairs need 'prompt'.",
        "Each side is trained as a row of that prompt and its answer (the prompt masked, the chat template applied).",
        "Rules: the text rules (boilerplate, URLs, long sentences, max_output_words) act on the chosen answer: what",
        "the model learns to write (a rejected answer keeps its boilerplate: the model learns not to write it); PII",
        "is redacted or dropped on both sides. Always dropped: pairs whose chosen and rejected are the same",
        "(identical_sides). Flagged: two pairs with one prompt that prefer each other's answer (swapped).",
        "dedup_exact and dedup_near compare prompt and both answers; near duplicates need the prompt and the answers",
        "each near (pairs that share a prompt with other answers stay). data.min_rows counts pairs.",
        f"Limits as for rows: a line over {MAX_LINE_BYTES:,} bytes is a problem of its line; lines that are no "
        f"pair are an error beyond {MAX_OUTSIDE_FORMAT_SHARE:.0%}.",
    ]
    return "\n".join(out)
