"""Preference pairs (training.method dpo/orpo): TRL's three formats load, every golden rule applies to pairs and is
counted and line-numbered in the report, and the report prints like an SFT one."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.dataprep import Row, format_report, split_validation
from jobs.errors import DataError, ExitCode
from jobs.preference import Pair, looks_like_pairs, prepare_pairs, prepare_pairs_report, read_pairs
from jobs.spec import DataRules

pytestmark = pytest.mark.unit

ALL_OFF = DataRules(strip_boilerplate=False, remove_urls=False, long_sentences="off", dedup_exact=False,
                    dedup_near=False, pii="off", balance=False, min_rows=1)


def jsonl(*rows: dict | str) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


# ---------------------------------------------------------------------------- the three formats

def test_string_pairs_load_as_two_rows_with_the_same_prompt():
    pairs, problems = read_pairs(jsonl({"prompt": " How do I reset it? ", "chosen": "Hold reset.", "rejected": "No."}))
    assert problems == []
    assert pairs == [Pair(Row(1, "How do I reset it?", "Hold reset."), Row(1, "How do I reset it?", "No."), 1)]
    assert pairs[0].chosen.fmt == "preference"


def test_conversational_pairs_keep_the_prompt_turns_and_differ_only_in_the_last_answer():
    prompt = [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "WAN port?")]
    pairs, problems = read_pairs(jsonl({"prompt": prompt, "chosen": [msg("assistant", "The blue one.")],
                                        "rejected": [msg("assistant", "Any port.")]}))
    assert problems == []
    (pair,) = pairs
    shared = (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "WAN port?"))
    assert pair.chosen.turns == (*shared, ("assistant", "The blue one."))
    assert pair.rejected.turns == (*shared, ("assistant", "Any port."))
    assert (pair.chosen.instruction, pair.chosen.output, pair.rejected.output) == ("WAN port?", "The blue one.",
                                                                                  "Any port.")
    assert pair.chosen.fmt == "preference_chat"


def test_an_implicit_prompt_is_the_turns_both_conversations_start_with():
    shared = [msg("user", "Hi"), msg("assistant", "Hello."), msg("user", "WAN port?")]
    line = {"chosen": [*shared, msg("assistant", "The blue one.")],
            "rejected": [*shared, msg("assistant", "Any port.")]}
    pairs, problems = read_pairs(jsonl(line, {**line, "prompt": "ignored, as TRL ignores it"}))
    assert problems == []
    assert [p.chosen.turns[:-1] for p in pairs] == [(("user", "Hi"), ("assistant", "Hello."), ("user", "WAN port?"))] * 2
    assert [(p.chosen.output, p.rejected.output, p.chosen.fmt) for p in pairs] == [
        ("The blue one.", "Any port.", "preference_implicit")] * 2


def test_a_file_may_mix_the_formats_and_the_report_counts_each():
    data = jsonl({"prompt": "a?", "chosen": "Yes, gladly.", "rejected": "No."},
                 {"prompt": [msg("user", "b?")], "chosen": [msg("assistant", "Sure thing.")],
                  "rejected": [msg("assistant", "Go away.")]},
                 {"chosen": [msg("user", "c?"), msg("assistant", "Of course.")],
                  "rejected": [msg("user", "c?"), msg("assistant", "Never.")]})
    report = prepare_pairs_report(data, ALL_OFF).report
    assert report["format"] == "mixed" and report["unit"] == "pairs"
    assert report["counts"]["by_format"] == {f: {"valid": 1, "kept": 1} for f in
                                             ("preference", "preference_chat", "preference_implicit")}


def test_files_are_told_apart_by_their_first_row():
    assert looks_like_pairs(b"\n" + jsonl({"prompt": "a", "chosen": "b", "rejected": "c"}))
    assert not looks_like_pairs(jsonl({"instruction": "a", "output": "b"}, {"prompt": "a", "chosen": "b"}))
    assert not looks_like_pairs(b"")


# ---------------------------------------------------------------------------- the contract the trainer uses

def test_prepare_pairs_raises_data_error_with_the_report_when_too_few_pairs_remain():
    data = jsonl({"prompt": "a?", "chosen": "Same.", "rejected": "same."}, "not json")
    with pytest.raises(DataError) as err:
        prepare_pairs(data, DataRules(min_rows=1), seed=1)
    assert err.value.exit_code == ExitCode.BAD_DATA
    assert "only 0 of 2 lines are usable preference pairs" in str(err.value)
    assert "1 pair whose chosen and rejected are the same dropped" in str(err.value)
    assert err.value.report["rules"]["identical_sides"]["lines"] == [1]


def test_split_validation_splits_pairs_like_rows():
    pairs = [Pair(Row(i, f"q{i}", "good"), Row(i, f"q{i}", "bad"), i) for i in range(1, 21)]
    train, val = split_validation(pairs, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16 and all(isinstance(p, Pair) for p in train + val)
    assert split_validation(pairs, 0.2, seed=3) == (train, val)


def test_the_report_prints_with_format_report():
    data = jsonl({"prompt": "a?", "chosen": "Yes, gladly.", "rejected": "No."})
    text = format_report(prepare_pairs_report(data, ALL_OFF).report)
    assert "1 valid pair, 1 kept" in text and "OK: a run would accept this data" in text


# ---------------------------------------------------------------------------- planted defects, each by line

DEFECTS = Path(__file__).parent / "data" / "pairs_with_defects.jsonl"
#: Every planted defect of tests/unit/data/pairs_with_defects.jsonl (63 lines; the others are good pairs).
MALFORMED = {11: "not valid JSON", 12: "expected a JSON object, got a list",
             13: "missing 'rejected': a pair needs both sides", 14: "'chosen' is empty",
             15: "'chosen' must be a string or a list of messages, got a number",
             16: "'chosen' is a string and 'rejected' a list",
             23: "prompt turn 1: role 'bot' is not one of system, user, assistant; 'rejected' must be an assistant "
                 "message, got role 'user'",
             24: "'chosen' and 'rejected' start differently, so they share no prompt",
             37: "missing 'prompt' (plain-text pairs need it",
             38: "prompt turn 2 is an assistant turn",
             40: "'persona' must be a string, got a number"}


@pytest.fixture(scope="module")
def defects_report() -> dict:
    return prepare_pairs_report(DEFECTS.read_bytes(), DataRules(), seed=42).report


def test_every_malformed_line_is_a_problem_naming_its_line(defects_report):
    problems = {p["line"]: p["message"] for p in defects_report["problems"]}
    assert set(problems) == set(MALFORMED) | {25}
    for line, message in MALFORMED.items():
        assert message in problems[line], (line, problems[line])
    assert defects_report["counts"]["malformed"] == len(MALFORMED) == 11


def test_an_sft_row_in_a_pairs_file_is_outside_the_format_and_names_what_it_looks_like(defects_report):
    assert defects_report["outside_format"] == {"count": 1, "lines": [25], "looks_like": {"instruction": 1},
                                                "max_share": 0.05}
    assert defects_report["errors"] == []  # 1 of 63 lines: under the 5% that fails the data


def test_every_rule_counts_its_pairs_and_names_their_lines(defects_report):
    rules = defects_report["rules"]
    got = {name: (e["count"], e["lines"], e["action"]) for name, e in rules.items()}
    assert got == {
        "strip_boilerplate": (2, [21, 22], "stripped"),   # 22's chosen was only boilerplate: the pair goes
        "remove_urls": (1, [39], "removed"),
        "pii": (1, [20], "redacted"),                     # an email in chosen, a phone number in rejected
        "long_sentences": (0, [], "flagged"),
        "max_output_words": (0, [], "off"),
        "identical_sides": (1, [17], "dropped"),          # 'Yes, it does.' vs 'yes,  it DOES.'
        "swapped": (2, [1, 36], "flagged"),               # the same prompt, preferring both ways
        "dedup_exact": (1, [18], "dropped"),              # line 1 again
        "dedup_near": (2, [19, 62], "dropped"),           # a/the and one added word
        "balance": (0, [], "skipped (fewer than two personas)"),
    }
    assert rules["strip_boilerplate"]["dropped"] == 1 and rules["strip_boilerplate"]["in_rejected_kept"] == 1
    assert rules["pii"]["kinds"] == {"EMAIL": 1, "PHONE": 1}
    assert rules["dedup_exact"]["duplicate_of"] == [[18, 1]]
    assert rules["dedup_near"]["duplicate_of"] == [[19, 2], [62, 61]] and rules["dedup_near"]["reworded"] == 1
    assert rules["swapped"]["swapped_with"] == [[36, 1]]


def test_the_counts_account_for_every_line(defects_report):
    counts = defects_report["counts"]
    assert counts["lines"] == 63 and counts["blank"] == 0
    assert counts["malformed"] + counts["outside_format"] + counts["valid"] == 63
    assert counts["dropped_by_rule"] == {"strip_boilerplate": 1, "identical_sides": 1, "dedup_exact": 1,
                                         "dedup_near": 2}
    assert counts["valid"] - sum(counts["dropped_by_rule"].values()) == counts["kept"] == 46
    assert defects_report["valid_rows"] == 51 and defects_report["kept_rows"] == 46
    assert defects_report["problems_total"] == 12


def test_the_counts_of_pairs_say_pair_or_pairs(defects_report):
    text = format_report(defects_report)
    assert "\n  63 lines (preference format), 51 valid pairs, 46 kept\n" in text
    assert ("\n  not kept: 11 malformed lines, 1 outside the format, 1 pair with boilerplate, 1 pair whose chosen and "
            "rejected are the same, 1 exact duplicate, 2 near duplicates\n") in text
    assert "(1 rejected answer keeps its own: the model learns not to write it)" in text
    assert "2 dropped (1 differs only in words like about/around, a/the)" in text


def test_launcher_data_check_of_the_defects_file_counts_pairs():
    from typer.testing import CliRunner

    from launcher import cli

    r = CliRunner().invoke(cli.app, ["data", "check", "--method", "dpo", str(DEFECTS)])
    assert r.exit_code == 0, r.output
    assert "1 pair with boilerplate, 1 pair whose chosen and rejected" in r.stdout and " rows with" not in r.stdout


def test_too_few_pairs_give_their_reasons_in_pairs():
    data = jsonl(*[{"prompt": "a?", "chosen": "Yes.", "rejected": "No."}] * 3,
                 {"prompt": "b?", "chosen": "As an AI language model, I cannot help with that.", "rejected": "No."},
                 "{bad")
    with pytest.raises(DataError) as err:
        prepare_pairs(data, DataRules(min_rows=4), seed=1)
    msg = str(err.value)
    assert "Main reasons: 2 exact duplicates dropped (data.dedup_exact); 1 malformed line (first: line 5" in msg
    assert "; 1 pair with boilerplate dropped (data.strip_boilerplate)" in msg
    text = format_report(prepare_pairs_report(data, DataRules(min_rows=4), seed=1).report)
    assert "FAIL: 1 pair kept, data.min_rows is 4" in text


def test_the_rules_change_the_pairs_they_report():
    pairs = {p.line: p for p in prepare_pairs(DEFECTS.read_bytes(), DataRules(), seed=42).pairs}
    assert "[EMAIL]" in pairs[20].chosen.output and "[PHONE]" in pairs[20].rejected.output
    assert pairs[21].chosen.output == "The X2 suits most flats."  # stripped from the chosen answer only
    assert pairs[21].rejected.output == "As an AI language model, I refuse."
    assert "https://" not in pairs[39].chosen.output and pairs[39].chosen.output == "It covers setup."
    assert {17, 18, 19, 22, 62} .isdisjoint(pairs) and {1, 36, 61, 63} <= set(pairs)
    # the two sides of a kept pair still share the prompt
    assert all(p.chosen.instruction == p.rejected.instruction and p.chosen.turns[:-1] == p.rejected.turns[:-1]
               for p in pairs.values())


def test_pii_drop_drops_a_pair_with_pii_on_either_side():
    data = jsonl({"prompt": "a?", "chosen": "Mail bob@example.com.", "rejected": "No."},
                 {"prompt": "b?", "chosen": "Sure.", "rejected": "Call 555-867-5309."},
                 {"prompt": "c?", "chosen": "Sure.", "rejected": "No."})
    report = prepare_pairs_report(data, ALL_OFF.model_copy(update={"pii": "drop"})).report
    assert (report["rules"]["pii"]["lines"], report["kept_rows"]) == ([1, 2], 1)


def test_rules_that_are_off_touch_nothing():
    report = prepare_pairs_report(DEFECTS.read_bytes(), ALL_OFF).report
    assert report["kept_rows"] == report["valid_rows"] - 1  # the pair whose sides are equal: always dropped
    assert all(e["action"] == "off" for name, e in report["rules"].items()
               if name not in ("identical_sides", "swapped"))


def test_near_duplicates_need_the_prompt_and_the_answers_near():
    prompt = "My router sits in a hallway with thick stone walls and the far bedroom has no signal. What first?"
    data = jsonl({"prompt": prompt, "chosen": "Move the router to a central shelf.", "rejected": "Not my problem."},
                 {"prompt": prompt, "chosen": "Add a mesh satellite in between.", "rejected": "Buy a new flat."},
                 {"prompt": "Which port is WAN?", "chosen": "Move the router to a central shelf.",
                  "rejected": "Not my problem."})
    assert prepare_pairs_report(data, DataRules(min_rows=1)).report["rules"]["dedup_near"]["count"] == 0


def test_a_file_of_sft_rows_read_as_pairs_fails_and_says_why():
    data = jsonl(*({"instruction": f"q{i}?", "output": "a."} for i in range(10)))
    with pytest.raises(DataError) as err:
        prepare_pairs(data, DataRules(), seed=1)
    assert "10 of 10 lines are not preference pairs" in str(err.value) and "instruction (10)" in str(err.value)
    assert "training.method: sft" in err.value.hint


def test_pairs_read_as_sft_rows_fail_naming_the_method_to_set():
    from jobs.dataprep import prepare

    data = jsonl(*({"prompt": f"q{i}?", "chosen": "a.", "rejected": "b."} for i in range(10)))
    with pytest.raises(DataError) as err:
        prepare(data, DataRules(), seed=1)
    assert "they look like preference (10)" in str(err.value)
    assert "set training.method: dpo or orpo" in err.value.hint


# ---------------------------------------------------------------------------- any input

def test_the_report_has_every_key_of_an_sft_report():
    from jobs.dataprep import prepare_report

    sft = prepare_report(jsonl({"instruction": "a?", "output": "b."}), ALL_OFF).report
    pairs = prepare_pairs_report(jsonl({"prompt": "a?", "chosen": "b.", "rejected": "c."}), ALL_OFF).report
    assert set(sft) <= set(pairs) and set(sft["counts"]) <= set(pairs["counts"])
    assert set(sft["rules"]) - {"conflicts"} <= set(pairs["rules"])


def test_the_report_keys_in_order_and_what_a_pair_report_carries():
    from test_dataprep import COUNTS_KEYS, REPORT_KEYS

    data = jsonl({"prompt": "a?", "chosen": "b.", "rejected": "c.", "persona": "pirate"},
                 {"prompt": [msg("user", "d?")], "chosen": [msg("assistant", "e.")],
                  "rejected": [msg("assistant", "f.")]},
                 {"prompt": "a?", "chosen": "g.", "rejected": "h."})
    rules = ALL_OFF.model_copy(update={"min_rows": 3})
    report = prepare_pairs_report(data, rules, seed=5).report
    assert list(report) == ["unit", *REPORT_KEYS] and list(report["counts"]) == COUNTS_KEYS
    assert (report["unit"], report["format"], report["seed"], report["min_rows"]) == ("pairs", "mixed", 5, 3)
    assert report["dataset_sha256"] == hashlib.sha256(data).hexdigest()
    assert report["settings"] == rules.model_dump(mode="json")
    assert report["counts"]["by_format"] == {"preference": {"valid": 2, "kept": 2},
                                             "preference_chat": {"valid": 1, "kept": 1}}
    assert report["personas"] == {"(none)": 2, "pirate": 1}
    # one prompt, two answers is no conflict between pairs
    assert report["conflicts"] == {"conflicts": [], "groups": 0, "reworded_questions": [], "reworded_count": 0}


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12))
_values = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(st.sampled_from(["role", "content", "x"]), c,
                                                                     max_size=3)), max_leaves=6)
_msgs = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "gpt", ""]),
                                        "content": st.one_of(st.text(max_size=12), _scalars)}), max_size=4)
_sides = st.one_of(st.text(max_size=20), _msgs, _values)
_lines = st.one_of(
    st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "persona", "instruction", "output"]), _sides,
                    max_size=4),
    st.fixed_dictionaries({"prompt": _sides, "chosen": _sides, "rejected": _sides}),
    _values)


@given(st.lists(_lines, max_size=12), st.booleans())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_lines_give_pairs_or_problems_never_an_exception(lines, rules_on):
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    pairs, problems = read_pairs(data)
    assert len(pairs) + len(problems) == sum(1 for x in lines)  # every line is one or the other
    assert all(p.chosen.line == p.rejected.line == p.line for p in pairs)
    assert all(p.chosen.turns[:-1] == p.rejected.turns[:-1] and p.chosen.instruction == p.rejected.instruction
               for p in pairs)
    report = prepare_pairs_report(data, DataRules(min_rows=1) if rules_on else ALL_OFF).report
    assert report["counts"]["malformed"] + report["counts"]["outside_format"] + report["counts"]["valid"] == len(lines)


@pytest.mark.parametrize("line, message", [
    ({"prompt": [msg("user", "a?")], "chosen": [], "rejected": [msg("assistant", "b.")]}, "'chosen' is empty"),
    ({"prompt": [msg("user", "a?")], "chosen": [msg("assistant", "b."), msg("assistant", "c.")],
      "rejected": [msg("assistant", "d.")]}, "'chosen' must be one assistant message, got 2 messages"),
    ({"prompt": [msg("user", "a?")], "chosen": [msg("assistant", "b.")], "rejected": [msg("assistant", 7)]},
     "'rejected' (assistant): 'content' must be a string, got a number"),
    ({"prompt": [msg("user", "a?")], "chosen": [msg("assistant", "b.")], "rejected": [msg("assistant", " ")]},
     "'rejected' (assistant): empty 'content'"),
    ({"prompt": [], "chosen": [msg("assistant", "b.")], "rejected": [msg("assistant", "c.")]}, "'prompt' is empty"),
    ({"prompt": 5, "chosen": [msg("assistant", "b.")], "rejected": [msg("assistant", "c.")]},
     "'prompt' must be a list of messages like 'chosen', got a number"),
    ({"chosen": [msg("user", "a?"), msg("assistant", "b.")], "rejected": [msg("user", "a?"), msg("user", "c?")]},
     "'rejected' turn 2: two user turns in a row ('rejected' turn 1 and 'rejected' turn 2)"),
    ({"chosen": [msg("user", "a?"), msg("assistant", "b."), msg("user", "more?"), msg("assistant", "c.")],
      "rejected": [msg("user", "a?"), msg("assistant", "x.")]},
     "after the 1 turn(s) both conversations share, 'chosen' has 3 more and 'rejected' 1"),
    ({"prompt": "a?", "chosen": None, "rejected": "b."}, "'chosen' must be a string or a list of messages, got null"),
])
def test_each_malformed_conversation_names_the_side_and_turn(line, message):
    pairs, problems = read_pairs(jsonl(line))
    assert pairs == [] and len(problems) == 1 and message in problems[0].message, problems
