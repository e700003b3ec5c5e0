"""Preference pairs (training.method dpo/orpo): TRL's three formats load, every golden rule applies to pairs and is
counted and line-numbered in the report, and the report prints like an SFT one."""
from __future__ import annotations

import json

import pytest

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
    assert "pairs whose chosen and rejected are the same dropped" in str(err.value)
    assert err.value.report["rules"]["identical_sides"]["lines"] == [1]


def test_split_validation_splits_pairs_like_rows():
    pairs = [Pair(Row(i, f"q{i}", "good"), Row(i, f"q{i}", "bad"), i) for i in range(1, 21)]
    train, val = split_validation(pairs, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16 and all(isinstance(p, Pair) for p in train + val)
    assert split_validation(pairs, 0.2, seed=3) == (train, val)


def test_the_report_prints_with_format_report():
    data = jsonl({"prompt": "a?", "chosen": "Yes, gladly.", "rejected": "No."})
    text = format_report(prepare_pairs_report(data, ALL_OFF).report)
    assert "1 valid pairs, 1 kept" in text and "OK: a run would accept this data" in text
