"""Data preparation: raw JSONL bytes → clean training rows and a report.

Pure functions, no torch and no I/O except :func:`check_file`. Each golden rule of
``docs/lora-training-guide.md`` is one function over a list of :class:`Row` and is
switched by :class:`jobs.spec.DataRules`. :func:`prepare` runs them in order and
builds the report that becomes ``data_report.json`` and what ``launcher data check``
prints. A malformed line is a problem in the report, never a crash; the run fails
(:class:`DataError`, exit code 11) only when too few rows are left.

The package: ``rows`` (:class:`Row`, :class:`RuleResult`, the limits), ``formats`` (lines → rows, the
accepted formats), ``rules`` (the rules on a row's own text), ``dedup`` (duplicates and conflicts),
``balance`` (personas), ``report`` (the report, its counts and wording); here the entry points
(:func:`prepare`, :func:`prepare_report`, :func:`check_file`, :func:`split_validation`, ...). Every
public name of the modules is also ``jobs.dataprep.X``.
"""
from __future__ import annotations

import os
import random
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from jobs.dataprep.balance import NO_PERSONA, balance_groups
from jobs.dataprep.dedup import (FUNCTION_WORDS, content_key, content_words, dedup_exact, dedup_near, find_conflicts,
                                 jaccard, shingles)
from jobs.dataprep.formats import (FORMAT_EXAMPLES, FORMAT_KEYS, FORMATS, _OutsideFormat, count_lines, detect_format,
                                   read_jsonl, read_object, row_formats)
from jobs.dataprep.report import (_FIX_PAIRS_AS_ROWS, _line_list, build_report, counted, format_report,
                                  refuse_unusable, rule_count)
from jobs.dataprep.rows import (MAX_FILE_BYTES, MAX_LINE_BYTES, MAX_OUTSIDE_FORMAT_SHARE, REPORT_LINES,
                                REPORT_PROBLEMS, Row, RuleResult, assistant_texts, user_texts, with_assistant_texts)
from jobs.dataprep.rules import (BOILERPLATE_PATTERNS, URL_RE, asks_about_links, count_words, handle_pii,
                                 is_boilerplate, limit_output_words, limit_sentences, long_sentences, map_assistant,
                                 remove_urls, remove_urls_text, strip_boilerplate, strip_boilerplate_text,
                                 trim_sentence)
from jobs.errors import DataError
from jobs.spec import DataRules

#: What the package offers, as ``jobs.dataprep.X``: the entry points here and each module's public names.
__all__ = ["BOILERPLATE_PATTERNS", "FORMATS", "FORMATS_SUMMARY", "FORMAT_EXAMPLES", "FORMAT_KEYS", "FUNCTION_WORDS",
           "MAX_FILE_BYTES", "MAX_LINE_BYTES", "MAX_OUTSIDE_FORMAT_SHARE", "NO_PERSONA", "Prepared", "REPORT_LINES",
           "REPORT_PROBLEMS", "Row", "RuleResult", "URL_RE", "asks_about_links", "assistant_texts", "balance_groups",
           "build_report", "check_file", "content_key", "content_words", "count_lines", "count_words", "counted",
           "dedup_exact", "dedup_near", "detect_format", "explain_text", "find_conflicts", "format_report",
           "handle_pii", "is_boilerplate", "jaccard", "limit_output_words", "limit_sentences", "long_sentences",
           "map_assistant", "prepare", "prepare_report", "read_data_file", "read_jsonl", "read_object",
           "refuse_unusable", "remove_urls", "remove_urls_text", "row_formats", "rule_count", "shingles",
           "split_validation", "strip_boilerplate", "strip_boilerplate_text", "trim_sentence", "user_texts",
           "with_assistant_texts"]


@dataclass
class Prepared:
    rows: list[Row]
    report: dict[str, Any]


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
