"""The data report: :func:`build_report` (data_report.json, what `launcher data check` prints, for SFT rows and
preference pairs alike), the counts and their wording (:func:`counted`, :func:`rule_count`), the refusal of data a
run cannot use (:func:`refuse_unusable`) and the printed summary (:func:`format_report`)."""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Callable

from jobs.dataprep.balance import NO_PERSONA
from jobs.dataprep.formats import _OutsideFormat, count_lines
from jobs.dataprep.rows import MAX_OUTSIDE_FORMAT_SHARE, REPORT_LINES, REPORT_PROBLEMS, Row
from jobs.errors import DataError, Problem
from jobs.spec import DataRules


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


#: The fix when SFT data holds preference pairs: the spec's method, not the rows, is what is wrong.
_FIX_PAIRS_AS_ROWS = ("these are preference pairs: set training.method: dpo or orpo to train on them (`launcher data "
                      "check --method dpo FILE` checks them as pairs)")


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
