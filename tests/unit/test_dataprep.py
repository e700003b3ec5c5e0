"""The data-preparation stage: reading JSONL, each golden rule, the report, the split."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from jobs.dataprep import (Row, balance_groups, check_file, dedup_exact, dedup_near, format_report,
                           handle_pii, limit_output_words, limit_sentences, prepare, prepare_report, read_jsonl, remove_urls,
                           remove_urls_text, split_validation, strip_boilerplate, strip_boilerplate_text,
                           trim_sentence)
from jobs.errors import DataError, ExitCode
from jobs.pii import find_pii
from jobs.spec import DataRules, EvalPrompt

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"
ALL_OFF = DataRules(strip_boilerplate=False, remove_urls=False, long_sentences="off", dedup_exact=False,
                    dedup_near=False, pii="off", balance=False, min_rows=1)


def jsonl(*rows: dict | str) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def row(output: str, instruction: str = "How do I reset the router?", line: int = 1, **kw) -> Row:
    return Row(line=line, instruction=instruction, output=output, **kw)


def distinct_rows(n: int, persona: str | None = None, start: int = 1) -> list[Row]:
    topics = ["reset", "firmware", "guest", "ports", "light", "vpn", "dns", "mesh", "qos", "usb", "logs", "wps"]
    return [Row(start + i, f"Question {i} about {topics[i % len(topics)]} number {i * 7}?",
                f"Answer {i}: the {topics[i % len(topics)]} setting lives under menu {i}.", persona=persona)
            for i in range(n)]


# ---------------------------------------------------------------------------- read_jsonl

def test_read_jsonl_parses_rows_with_line_numbers_and_skips_blank_lines():
    data = jsonl({"instruction": "a?", "output": "b."}, "", "   ",
                 {"instruction": "c?", "input": "ctx", "output": "d.", "tone": "terse"})
    rows, problems = read_jsonl(data)
    assert problems == []
    assert rows == [Row(1, "a?", "b."), Row(4, "c?", "d.", input="ctx", persona="terse")]


def test_read_jsonl_prefers_persona_over_tone_and_honours_a_custom_field():
    data = jsonl({"instruction": "a", "output": "b", "persona": "formal", "tone": "terse", "voice": "pirate"})
    assert read_jsonl(data)[0][0].persona == "formal"
    assert read_jsonl(data, persona_field="voice")[0][0].persona == "pirate"


def test_read_jsonl_handles_bom_and_crlf():
    data = b"\xef\xbb\xbf" + b'{"instruction": "a", "output": "b"}\r\n{"instruction": "c", "output": "d"}\r\n'
    rows, problems = read_jsonl(data)
    assert problems == [] and [(r.line, r.output) for r in rows] == [(1, "b"), (2, "d")]


@pytest.mark.parametrize("line, message", [
    (b'{"instruction": "a"', "not valid JSON"),
    (b'[1, 2]', "expected a JSON object, got a list"),
    (b'"text"', "expected a JSON object, got a string"),
    (b'null', "expected a JSON object, got null"),
    (b'{"output": "b"}', "missing 'instruction'"),
    (b'{"instruction": "a"}', "missing 'output'"),
    (b'{"instruction": 3, "output": "b"}', "'instruction' must be a string, got a number"),
    (b'{"instruction": "a", "output": "  "}', "'output' is empty"),
    (b'{"instruction": "a", "output": "b", "input": ["x"]}', "'input' must be a string, got a list"),
    (b'{"instruction": "a", "output": "b", "persona": 5}', "'persona' must be a string"),
    (b'{"instruction": "a", "output": "b", "x": NaN}', "NaN is not valid JSON"),
    (b'{"instruction": "a", "output": "b", "x": -Infinity}', "-Infinity is not valid JSON"),
    (b'{"instruction": "a", "output": "\\ud800"}', "unpaired"),
    (b'{"instruction": "a", "output": "caf\xe9"}', "not UTF-8 text (bad byte 0xe9 at column 36)"),
    (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
])
def test_read_jsonl_reports_each_bad_line_and_keeps_going(line, message):
    good = b'{"instruction": "ok", "output": "fine"}'
    rows, problems = read_jsonl(good + b"\n" + line + b"\n" + good + b"\n")
    assert [r.line for r in rows] == [1, 3]
    assert len(problems) == 1
    p = problems[0]
    assert (p.line, p.where) == (2, "line 2") and message in p.message and p.fix


def test_read_jsonl_rejects_an_oversized_line_without_parsing_it():
    big = b'{"instruction": "a", "output": "' + b"x" * 2_000_000 + b'"}'
    rows, problems = read_jsonl(big + b'\n{"instruction": "a", "output": "b"}')
    assert [r.line for r in rows] == [2]
    assert problems[0].line == 1 and "over the 1,000,000-byte limit" in problems[0].message


def test_read_jsonl_of_an_empty_file_is_empty():
    assert read_jsonl(b"") == ([], [])
    assert read_jsonl(b"\n\n") == ([], [])


# ---------------------------------------------------------------------------- malformed corpus

def test_a_malformed_corpus_never_crashes_and_every_bad_line_is_named(tmp_path):
    good = [json.dumps({"instruction": f"Question {i} about the router?", "output": f"Answer number {i}."})
            for i in range(11)]
    bad = {
        3: b'{"instruction": "x", "output": "caf\xc3\x28"}',  # invalid UTF-8
        5: b'{"instruction": "' + b"y" * 10_000_000 + b'", "output": "z"}',  # 10 MB line
        7: b'{"instruction": "a", "output": NaN}',
        9: b'{"instruction": "a", "output": "b", "n": Infinity}',
        11: b"[" * 10_000 + b"]" * 10_000,  # 10000-deep nesting
        13: b"[]",
        15: b"42",
        17: b'"just a string"',
        19: b"{not json",
    }
    lines, good_iter = [], iter(good)
    for n in range(1, 21):
        lines.append(bad.get(n) or next(good_iter).encode())
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")

    report = check_file(path)
    assert report["total_lines"] == 20
    assert report["valid_rows"] == report["kept_rows"] == 11
    assert sorted(p["line"] for p in report["problems"]) == sorted(bad)
    json.dumps(report, allow_nan=False)
    text = format_report(report)
    for n in bad:
        assert f"line {n}:" in text

    with pytest.raises(DataError) as err:
        prepare(path.read_bytes(), DataRules(min_rows=12))
    assert "only 11 of 20 lines" in err.value.message and "9 malformed lines" in err.value.message
    assert err.value.exit_code == ExitCode.BAD_DATA and err.value.hint


def test_an_empty_file_fails_with_data_error_not_a_crash(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    report = check_file(tmp_path / "empty.jsonl")
    assert (report["total_lines"], report["kept_rows"], report["ok"]) == (0, 0, False)
    with pytest.raises(DataError, match="only 0 of 0 lines"):
        prepare(b"", DataRules())


def test_check_file_names_a_missing_file():
    with pytest.raises(DataError, match="file not found"):
        check_file("/nonexistent/train.jsonl")


@pytest.mark.parametrize("text", [
    "[" * 30_000 + " https://x.example/a",  # Markdown-link scan from every bracket
    "%a" * 40_000,  # email local part from every position
    "https://x.example at" + " " * 30_000 + "x",  # two adjacent runs of spaces
    "id" + " " * 30_000 + ":" + " " * 30_000,
    "." * 30_000 + " a",  # sentence end from every dot
], ids=["brackets", "percent", "spaces-after-pointer", "spaces-around-colon", "dots"])
def test_rules_take_linear_time_on_pathological_text(text):
    start = time.perf_counter()
    remove_urls_text(text), find_pii(text), strip_boilerplate_text(text)
    limit_sentences([row(text)], 28, "trim")
    assert time.perf_counter() - start < 5  # each shape took 10-60 s when the regexes backtracked quadratically


# ---------------------------------------------------------------------------- boilerplate

@pytest.mark.parametrize("text, expected", [
    ("As an AI language model, I cannot see your router. Hold Reset for 10 seconds.", "Hold Reset for 10 seconds."),
    ("Hold Reset for 10 seconds. I'm just an AI, so I can't check it for you.", "Hold Reset for 10 seconds."),
    ("Hold Reset for 10 seconds. I hope this helps!", "Hold Reset for 10 seconds."),
    ("Disclaimer: results may vary.\nHold Reset for 10 seconds.", "Hold Reset for 10 seconds."),
    ("This is not professional advice. Use a surge protector.", "Use a surge protector."),
    ("As of my last knowledge update, the X2 had two bands. It has 2.4 and 5 GHz.", "It has 2.4 and 5 GHz."),
    ("- As an AI, I have no router.\n- Restart the modem.", "- Restart the modem."),
    ("I don’t have personal opinions. The X2 covers 2,000 square feet.", "The X2 covers 2,000 square feet."),
])
def test_boilerplate_sentences_are_removed(text, expected):
    assert strip_boilerplate_text(text) == expected


def test_text_without_boilerplate_is_returned_unchanged_even_its_spacing():
    text = "Hold  Reset for 10 seconds.\n\n- Then wait.  The light turns white."
    assert strip_boilerplate_text(text) == text


def test_strip_boilerplate_drops_rows_left_empty_and_reports_lines():
    rows = [row("As an AI language model, I don't have opinions.", line=1),
            row("As an AI, I can't. Hold Reset.", line=2), row("Hold Reset.", line=3)]
    result = strip_boilerplate(rows)
    assert [(r.line, r.output) for r in result.rows] == [(2, "Hold Reset."), (3, "Hold Reset.")]
    assert result.entry() == {"count": 2, "lines": [1, 2], "action": "stripped", "dropped": 1}


# ---------------------------------------------------------------------------- URLs

@pytest.mark.parametrize("text, expected", [
    ("The manual (https://acme.example/x2.pdf) covers it.", "The manual covers it."),
    ("Restart it. Download the firmware from https://acme.example/fw.", "Restart it."),
    ("See [the manual](https://acme.example/m) for the reset steps.", "See the manual for the reset steps."),
    ("Visit www.acme.example/help, then restart.", "Visit, then restart."),
    ("https://acme.example/only", ""),
])
def test_urls_are_removed_from_outputs(text, expected):
    assert remove_urls_text(text) == expected


def test_urls_stay_when_the_instruction_asks_for_a_link():
    rows = [row("It is https://acme.example/manual.", instruction="What is the link to the X2 manual?", line=1),
            row("Get it at https://acme.example/fw. Then reboot.", line=2),
            row("https://acme.example/x", line=3)]
    result = remove_urls(rows)
    assert [(r.line, r.output) for r in result.rows] == [(1, "It is https://acme.example/manual."),
                                                         (2, "Then reboot.")]
    assert result.entry() == {"count": 2, "lines": [2, 3], "action": "removed", "dropped": 1, "kept_on_topic": 1}


# ---------------------------------------------------------------------------- PII

@pytest.mark.parametrize("text, expected, kind", [
    ("Write to jane.doe+x2@mail.example.com today.", "Write to [EMAIL] today.", "EMAIL"),
    ("Call (555) 010-4477 now.", "Call [PHONE] now.", "PHONE"),
    ("Call 555.010.4477.", "Call [PHONE].", "PHONE"),
    ("Ring +44 20 7946 0958 in London.", "Ring [PHONE] in London.", "PHONE"),
    ("Card 4111 1111 1111 1111 was charged.", "Card [CARD] was charged.", "CARD"),
    ("Card 4111-1111-1111-1111.", "Card [CARD].", "CARD"),
    ("SSN 123-45-6789 on file.", "SSN [ID] on file.", "ID"),
    ("Your customer ID: AB1234567 is ready.", "Your customer ID: [ID] is ready.", "ID"),
    ("Passport no. 987654321 expires soon.", "Passport no. [ID] expires soon.", "ID"),
    ("Reference 123456789012 applies.", "Reference [ID] applies.", "ID"),
])
def test_pii_is_redacted_with_its_kind(text, expected, kind):
    redacted, found = find_pii(text)
    assert redacted == expected and set(found) == {kind}


@pytest.mark.parametrize("text", [
    "Open 192.168.8.1 in a browser.",
    "It uses a 12 V, 2 A adapter and firmware 2.4.1.",
    "Hold Reset for 10 seconds; it covers 2,000 square feet.",
    "Card 4111 1111 1111 1112 fails the Luhn check.",
    "Ports 8080 and 443 are open from 2024-01-15.",
])
def test_text_without_pii_is_left_alone(text):
    redacted, found = find_pii(text)
    assert not any(k in found for k in ("EMAIL", "PHONE", "CARD")) and "[CARD]" not in redacted
    if "Luhn" not in text:
        assert (redacted, dict(found)) == (text, {})


def test_pii_modes_redact_drop_and_off():
    rows = [row("Mail a@b.example.", line=1), row("No PII here.", line=2)]
    redacted = handle_pii(rows, "redact")
    assert [r.output for r in redacted.rows] == ["Mail [EMAIL].", "No PII here."]
    assert redacted.entry() == {"count": 1, "lines": [1], "action": "redacted", "kinds": {"EMAIL": 1}}
    dropped = handle_pii(rows, "drop")
    assert [r.line for r in dropped.rows] == [2] and dropped.action == "dropped"
    assert handle_pii(rows, "off").rows == rows


# ---------------------------------------------------------------------------- long sentences

LONG = ("The router restarts itself after an update, and the light blinks amber while it works, "
        "so leave it plugged in and do not press any buttons until the light turns solid white again.")


def test_trim_cuts_at_a_clause_boundary():
    assert trim_sentence(LONG, 20) == ("The router restarts itself after an update, and the light blinks amber "
                                       "while it works, so leave it plugged in.")
    assert trim_sentence(LONG, 15) == "The router restarts itself after an update, and the light blinks amber while it works."
    assert trim_sentence(LONG, 14) == "The router restarts itself after an update, and the light blinks amber."


def test_trim_cuts_at_the_word_limit_when_there_is_no_boundary():
    assert trim_sentence("one two three four five six seven eight nine ten", 6) == "one two three four five six."
    assert trim_sentence("Short enough.", 6) == "Short enough."


@pytest.mark.parametrize("mode, kept, outputs_changed", [("flag", [1, 2], False), ("trim", [1, 2], True),
                                                          ("drop", [2], False)])
def test_long_sentence_modes(mode, kept, outputs_changed):
    rows = [row(f"Intro. {LONG}\n- A short bullet.", line=1), row("A short answer.", line=2)]
    result = limit_sentences(rows, 28, mode)
    assert [r.line for r in result.rows] == kept
    assert result.lines == [1] and result.action == {"flag": "flagged", "trim": "trimmed", "drop": "dropped"}[mode]
    if outputs_changed:
        assert result.rows[0].output == ("Intro. The router restarts itself after an update, and the light blinks "
                                         "amber while it works, so leave it plugged in and do not press any "
                                         "buttons.\n- A short bullet.")
    else:
        assert result.rows[-1].output == "A short answer."
    assert limit_sentences(rows, 28, "off").rows == rows


def test_max_output_words_drops_overlong_outputs():
    rows = [row("one two three", line=1), row("one two three four", line=2)]
    result = limit_output_words(rows, 3)
    assert [r.line for r in result.rows] == [1] and result.lines == [2]
    assert limit_output_words(rows, None).rows == rows


# ---------------------------------------------------------------------------- dedup

def test_exact_dedup_ignores_case_and_spacing_and_keeps_the_first():
    rows = [row("Hold Reset.", line=1), row("hold   RESET.", instruction="HOW DO I  reset the router?", line=2),
            row("Hold Reset.", instruction="How do I restart the router?", line=3)]
    result = dedup_exact(rows)
    assert [r.line for r in result.rows] == [1, 3]
    assert result.entry() == {"count": 1, "lines": [2], "action": "dropped", "duplicate_of": [[2, 1]]}


SETUP = ("Connect the modem to the blue WAN port using the supplied cable, connect the power adapter and wait "
         "for a solid white light, install the Acme Home app, join the AcmeX2 network with the password from "
         "the label, and follow the app to set a new administrator password.")


def test_near_dedup_drops_a_one_word_change_and_keeps_different_rows():
    rows = [row(SETUP, line=1), row(SETUP.replace("supplied", "included"), line=2),
            row("Hold the Reset button on the back for ten seconds until the light blinks amber.", line=3)]
    result = dedup_near(rows, 0.85, seed=1)
    assert [r.line for r in result.rows] == [1, 3]
    assert result.lines == [2] and result.details["duplicate_of"] == [[2, 1]]
    assert dedup_near(rows, 1.0, seed=1).lines == []  # only identical shingle sets at 1.0


def test_near_dedup_is_deterministic():
    rows = distinct_rows(40) + [row(SETUP, line=90), row(SETUP + " Thanks.", line=91)]
    first = dedup_near(rows, 0.8, seed=7)
    assert first.lines == [91]
    assert dedup_near(rows, 0.8, seed=7).rows == first.rows


# ---------------------------------------------------------------------------- balance

def test_balance_caps_the_largest_persona_at_its_share():
    rows = distinct_rows(6, "friendly") + distinct_rows(2, "formal", 7) + distinct_rows(2, "terse", 9)
    result = balance_groups(rows, 0.5, seed=3)
    kept = [r.persona for r in result.rows]
    assert kept.count("friendly") == 4 and len(kept) == 8
    assert len(result.lines) == 2 and set(result.lines) <= {r.line for r in rows if r.persona == "friendly"}
    assert result.details["groups"] == {"formal": [2, 2], "friendly": [6, 4], "terse": [2, 2]}
    assert balance_groups(rows, 0.5, seed=3).rows == result.rows  # same seed, same rows
    assert [r.line for r in result.rows] == sorted(r.line for r in result.rows)  # order kept


def test_rows_without_persona_are_kept_and_one_named_persona_is_left_alone():
    mixed = distinct_rows(150) + distinct_rows(3, "formal", 200)
    result = balance_groups(mixed, 0.5, seed=0)
    assert result.rows == mixed, "a few tagged rows must not shrink an untagged dataset"
    assert result.details["groups"] == {"(none)": [150, 150], "formal": [3, 3]}
    two = distinct_rows(20) + distinct_rows(6, "formal", 30) + distinct_rows(2, "terse", 40)
    balanced = balance_groups(two, 0.5, seed=0)
    assert balanced.details["groups"] == {"(none)": [20, 20], "formal": [6, 2], "terse": [2, 2]}
    single = distinct_rows(5, "terse")
    assert balance_groups(single, 0.2, seed=0).rows == single


def test_an_unreachable_share_falls_back_to_equal_groups():
    rows = distinct_rows(5, "a") + distinct_rows(3, "b", 6)
    result = balance_groups(rows, 0.3, seed=0)  # 2 groups cannot each hold under 50 %
    assert result.details["max_group_share"] == 0.5
    assert result.details["groups"] == {"a": [5, 3], "b": [3, 3]}


# ---------------------------------------------------------------------------- prepare and report

def test_prepare_reports_counts_lines_and_hash():
    data = jsonl({"instruction": "Reset?", "output": "As an AI, I can't. Hold Reset for 10 seconds."},
                 {"instruction": "Reset?", "output": "As an AI, I can't. Hold Reset for 10 seconds."},
                 "{broken",
                 {"instruction": "Manual?", "output": "Read it at https://acme.example/m. It has 20 pages."},
                 {"instruction": "Support?", "output": "Email help@acme.example."},
                 *[{"instruction": f"Question {i}?", "output": f"Answer {i} is here."} for i in range(5)])
    prepared = prepare(data, DataRules(min_rows=3))
    report = prepared.report
    assert (report["total_lines"], report["valid_rows"], report["kept_rows"]) == (10, 9, 8)
    assert report["dataset_sha256"] == hashlib.sha256(data).hexdigest()
    assert report["problems"] == [{"line": 3, "message": "not valid JSON: Expecting property name enclosed in "
                                   "double quotes (column 2)", "fix": report["problems"][0]["fix"]}]
    rules = report["rules"]
    assert rules["strip_boilerplate"]["lines"] == [1, 2]
    assert rules["dedup_exact"]["lines"] == [2]
    assert rules["remove_urls"]["lines"] == [4]
    assert rules["pii"] == {"count": 1, "lines": [5], "action": "redacted", "kinds": {"EMAIL": 1}}
    assert rules["balance"]["action"] == "skipped (fewer than two personas)"
    assert [r.output for r in prepared.rows[:3]] == ["Hold Reset for 10 seconds.", "It has 20 pages.",
                                                     "Email [EMAIL]."]
    json.dumps(report, allow_nan=False)


#: data_report.json's keys, in the order written (preference reports put "unit": "pairs" first).
REPORT_KEYS = ["format", "total_lines", "valid_rows", "kept_rows", "dataset_sha256", "seed", "counts", "outside_format",
               "errors", "problems_total", "problems", "rules", "conflicts", "personas", "min_rows", "settings"]
COUNTS_KEYS = ["lines", "blank", "malformed", "outside_format", "valid", "dropped_by_rule", "kept", "by_format"]


def test_the_report_keys_in_order_and_the_settings_it_ran_with():
    data = jsonl({"instruction": "a?", "output": "b.", "persona": "pirate"}, {"instruction": "c?", "output": "d."},
                 {"messages": [{"role": "user", "content": "e?"}, {"role": "assistant", "content": "f."}]})
    rules = ALL_OFF.model_copy(update={"min_rows": 3})
    report = prepare(data, rules, seed=5).report
    assert list(report) == REPORT_KEYS and list(report["counts"]) == COUNTS_KEYS  # no "unit": rows
    assert (report["format"], report["seed"], report["min_rows"]) == ("mixed", 5, 3)
    assert report["settings"] == rules.model_dump(mode="json")
    assert report["counts"]["by_format"] == {"instruction": {"valid": 2, "kept": 2}, "messages": {"valid": 1, "kept": 1}}
    assert report["personas"] == {"(none)": 2, "pirate": 1}
    assert report["conflicts"] == {"count": 0, "lines": [], "action": "flagged", "conflicts": [], "groups": 0,
                                   "reworded_questions": [], "reworded_count": 0}
    assert "conflicts" not in report["rules"]  # a check that keeps every row, not a rule


def test_rules_that_are_off_touch_nothing():
    data = jsonl(*[{"instruction": "As an AI?", "output": "As an AI, mail a@b.example or https://x.example."}] * 3)
    prepared = prepare(data, ALL_OFF)
    assert [r.line for r in prepared.rows] == [1, 2, 3]
    assert prepared.rows[0].output == "As an AI, mail a@b.example or https://x.example."
    assert all(e == {"count": 0, "lines": [], "action": "off"} for e in prepared.report["rules"].values())


def test_too_few_rows_raise_data_error_with_counts_and_reasons():
    data = jsonl(*[{"instruction": "Same?", "output": "Same."}] * 6, "nope", "[]")
    with pytest.raises(DataError) as err:
        prepare(data, DataRules(min_rows=2))
    msg = err.value.message
    assert "only 1 of 8 lines are usable training rows (6 valid); data.min_rows is 2" in msg
    assert "5 exact duplicates dropped (data.dedup_exact)" in msg and "2 malformed lines" in msg
    assert "launcher data check" in err.value.hint
    assert err.value.report["kept_rows"] == 1


@pytest.mark.parametrize("n", [1, 2])
def test_every_count_takes_its_noun_in_the_singular_or_the_plural(n):
    one = n == 1
    good = [{"instruction": f"Question {i} about item {i * 7}?", "output": f"Answer number {i} is here."}
            for i in range(4)]
    data = jsonl(*good, *["{bad"] * n,
                 *[{"instruction": f"Boiler {i}?", "output": "As an AI language model, I cannot help with that."}
                   for i in range(n)],
                 *[good[0]] * n,
                 *[{"instruction": f"Which colour is box {i}?", "output": "Blue."} for i in range(n)],
                 *[{"instruction": f"Which colour is box {i}?", "output": "Yellow."} for i in range(n)])
    text = format_report(prepare_report(data, DataRules(min_rows=20)).report)
    lost = "1 malformed line, 1 row with boilerplate, 1 exact duplicate" if one else \
        "2 malformed lines, 2 rows with boilerplate, 2 exact duplicates"
    assert f"\n  not kept: {lost}\n" in text
    assert f"warning: {'1 question' if one else '2 questions'} answered differently" in text
    if not one:  # box 0 and box 1: a rewording of each other, both for Blue and for Yellow
        assert "warning: 2 pairs of questions one word apart" in text
    assert f"FAIL: {4 + 2 * n} rows kept" in text  # conflicting rows are kept
    with pytest.raises(DataError) as err:
        prepare(data, DataRules(min_rows=20))
    assert (f"Main reasons: {lost.split(', ')[0]} (first: line 5:" in err.value.message
            and f"; {lost.split(', ')[1]} dropped (data.strip_boilerplate); {lost.split(', ')[2]} dropped "
                "(data.dedup_exact)" in err.value.message)


def test_one_line_one_row_one_kept_are_singular():
    report = prepare_report(jsonl({"instruction": "a?", "output": "b."}), ALL_OFF.model_copy(update={"min_rows": 2})
                            ).report
    text = format_report(report)
    assert "  1 line (instruction format), 1 valid row, 1 kept\n" in text and "FAIL: 1 row kept" in text


def test_report_keeps_at_most_200_line_numbers_but_counts_all():
    data = jsonl(*[{"instruction": "Same?", "output": "Same."}] * 301)
    report = prepare(data, DataRules(min_rows=1, dedup_near=False)).report
    assert report["rules"]["dedup_exact"]["count"] == 300
    assert report["rules"]["dedup_exact"]["lines"] == list(range(2, 202))


# ---------------------------------------------------------------------------- split

def test_split_validation_is_deterministic_and_disjoint():
    rows = distinct_rows(50)
    train, val = split_validation(rows, 0.1, seed=5)
    assert len(val) == 5 and len(train) == 45
    assert sorted(r.line for r in train + val) == [r.line for r in rows]
    assert split_validation(rows, 0.1, seed=5) == (train, val)
    assert split_validation(rows, 0.1, seed=6) != (train, val)


def test_split_validation_keeps_at_least_one_on_each_side():
    assert [len(x) for x in split_validation(distinct_rows(2), 0.01, 0)] == [1, 1]
    assert [len(x) for x in split_validation(distinct_rows(5), 0.0, 0)] == [5, 0]
    assert [len(x) for x in split_validation(distinct_rows(1), 0.5, 0)] == [1, 0]
    with pytest.raises(ValueError):
        split_validation(distinct_rows(3), 1.0, 0)


# ---------------------------------------------------------------------------- the demo data

def test_demo_dataset_is_clean_except_the_planted_bad_rows():
    report = check_file(DEMO / "train.jsonl")
    assert report["ok"] and report["kept_rows"] >= 150
    assert (DEMO / "train.jsonl").stat().st_size < 100_000
    rules = report["rules"]
    assert len(report["problems"]) == 3  # malformed JSON, missing output, output of the wrong type
    for name in ("strip_boilerplate", "remove_urls", "dedup_exact", "dedup_near", "long_sentences"):
        assert rules[name]["count"] >= 1, name
    assert rules["pii"]["kinds"] == {"EMAIL": 1, "PHONE": 1}
    assert rules["balance"]["count"] == 0
    personas = report["personas"]
    assert set(personas) == {"friendly", "formal", "terse"} and max(personas.values()) - min(personas.values()) <= 5
    summary = format_report(report)
    assert "dedup_near" in summary and "OK: a run would accept this data" in summary


def test_demo_eval_prompts_are_valid():
    lines = (DEMO / "eval_prompts.jsonl").read_text().splitlines()
    prompts = [EvalPrompt.model_validate(json.loads(line)) for line in lines]
    assert len(prompts) == 6 and {p.band for p in prompts} == {"short", "medium"}
