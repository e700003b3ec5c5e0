"""Near-duplicates at the word level and same-question conflicts, measured on a labelled set.

tests/unit/data/near_duplicates.jsonl holds pairs of rows, each labelled by a person: is the
second row a near-duplicate of the first (a rewording that teaches nothing new), and do the two
answer the same question differently (a conflict a person must settle)? Short rows are the
point: word 3-shingles at the 0.85 cutoff catch a one-word edit only in rows of ~39+ words.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("datasketch")

from jobs.dataprep import Row, dedup_near, find_conflicts, jaccard, prepare_report, shingles  # noqa: E402
from jobs.spec import DataRules  # noqa: E402

PAIRS = [json.loads(line) for line in
         (Path(__file__).parent / "data" / "near_duplicates.jsonl").read_text().splitlines()]
THRESHOLD = DataRules().near_dup_threshold


def _rows(pair: dict) -> list[Row]:
    return [Row(1, pair["a"]["instruction"], pair["a"]["output"]), Row(2, pair["b"]["instruction"], pair["b"]["output"])]


def _precision_recall(predicted: list[bool], labels: list[bool]) -> tuple[float, float]:
    tp = sum(p and y for p, y in zip(predicted, labels))
    fp = sum(p and not y for p, y in zip(predicted, labels))
    fn = sum(y and not p for p, y in zip(predicted, labels))
    return tp / ((tp + fp) or 1), tp / ((tp + fn) or 1)


def _old_rule(pair: dict) -> bool:
    """The detector before issue 32: word-3-shingle Jaccard only (MinHash just finds candidates)."""
    def text(r: dict) -> str:
        return f"{r['instruction']}  {r['output']}"
    return jaccard(shingles(text(pair["a"])), shingles(text(pair["b"]))) >= THRESHOLD


def test_the_labelled_set_has_both_kinds_and_short_rows():
    labels = [p["near_duplicate"] for p in PAIRS]
    assert sum(labels) >= 10 and len(labels) - sum(labels) >= 10
    short = [p for p in PAIRS if len(f"{p['a']['instruction']} {p['a']['output']}".split()) < 39]
    assert sum(p["near_duplicate"] for p in short) >= 8


def test_near_duplicates_precision_and_recall_on_the_labelled_set():
    labels = [p["near_duplicate"] for p in PAIRS]
    predicted = [dedup_near(_rows(p), THRESHOLD, seed=1).lines == [2] for p in PAIRS]
    precision, recall = _precision_recall(predicted, labels)
    old_precision, old_recall = _precision_recall([_old_rule(p) for p in PAIRS], labels)
    print(f"\nnear-duplicates on {len(PAIRS)} labelled pairs at {THRESHOLD}: precision {precision:.2f}, "
          f"recall {recall:.2f} (word shingles alone: precision {old_precision:.2f}, recall {old_recall:.2f})")
    wrong = [p["why"] for p, y, x in zip(PAIRS, labels, predicted) if x != y]
    assert precision == 1.0 and recall == 1.0, wrong
    assert old_recall < 0.5  # the set holds the short one-word edits the old rule missed


@pytest.mark.parametrize("pair", [p for p in PAIRS if p["near_duplicate"]], ids=lambda p: p["why"])
def test_each_labelled_rewording_is_dropped_naming_the_row_it_repeats(pair):
    result = dedup_near(_rows(pair), THRESHOLD, seed=3)
    assert [r.line for r in result.rows] == [1]
    assert result.details["duplicate_of"] == [[2, 1]]


def test_a_rewording_is_caught_whatever_the_row_length():
    for n in (1, 3, 10, 30, 38, 60):
        words = " ".join(f"step{i}" for i in range(n))
        rows = [Row(1, "How do I fix it?", f"It takes about {words}."),
                Row(2, "How do I fix it?", f"It takes around {words}.")]
        assert dedup_near(rows, THRESHOLD).lines == [2], n


def test_threshold_one_keeps_rewordings_apart():
    pair = PAIRS[0]
    assert dedup_near(_rows(pair), 1.0).lines == []


def test_conflicts_precision_and_recall_on_the_labelled_set():
    labels = [p["conflict"] for p in PAIRS]
    predicted = [bool(find_conflicts(_rows(p)).details["conflicts"]) for p in PAIRS]
    precision, recall = _precision_recall(predicted, labels)
    print(f"\nconflicts on {len(PAIRS)} labelled pairs: precision {precision:.2f}, recall {recall:.2f}")
    assert recall == 1.0, [p["why"] for p, y, x in zip(PAIRS, labels, predicted) if y and not x]
    # synonyms in the same answer ("supplied"/"included") are warned about: meaning tells them apart
    assert precision >= 0.85


def test_a_conflict_is_a_named_line_numbered_warning_that_keeps_both_rows():
    data = "\n".join(json.dumps(r) for r in [
        {"instruction": "What colour is the WAN port?", "output": "The WAN port is blue."},
        {"instruction": "How do I reset the router?", "output": "Hold Reset for ten seconds."},
        {"instruction": "What colour is the WAN port?", "output": "The WAN port is yellow."},
    ]).encode()
    prepared = prepare_report(data, DataRules(min_rows=1))
    (conflict,) = prepared.report["conflicts"]["conflicts"]
    assert conflict["lines"] == [1, 3] and conflict["differ"] == ["blue", "yellow"]
    assert conflict["prompt"] == "What colour is the WAN port?"
    assert [r.line for r in prepared.rows] == [1, 2, 3]  # a warning: a person picks the right answer
    from jobs.dataprep import format_report
    text = format_report(prepared.report)
    assert "lines 1, 3" in text and "'blue' vs 'yellow'" in text and "warning" in text


def test_near_duplicates_across_formats_are_one_example():
    data = "\n".join(json.dumps(r) for r in [
        {"instruction": "How long does a reboot take?", "output": "About two minutes."},
        {"messages": [{"role": "user", "content": "How long does a reboot take?"},
                      {"role": "assistant", "content": "Around two minutes."}]},
    ]).encode()
    report = prepare_report(data, DataRules(min_rows=1)).report
    assert report["rules"]["dedup_near"]["duplicate_of"] == [[2, 1]]
    assert report["counts"]["by_format"] == {"instruction": {"valid": 1, "kept": 1},
                                             "messages": {"valid": 1, "kept": 0}}


def test_questions_one_content_word_apart_with_the_same_answer_are_reported_and_kept():
    """A one-word edit of a short question ("reset" vs "restart", a word added) with the same answer is caught,
    as a warning that keeps both rows: it may be a rewording or two questions sharing an answer. Different
    answers, or questions two words apart, are not reported."""
    same = "Hold Reset for ten seconds until the light blinks."
    rows = [Row(1, "How do I reset the router?", same), Row(2, "How do I restart the router?", same),
            Row(3, "How do I reset the router quickly?", same),
            Row(4, "What does the blue light mean?", "The router is updating its firmware."),
            Row(5, "What does the red light mean?", "The router has no internet connection."),
            Row(6, "Why does the green lamp flash?", same), Row(7, "Why does the amber lamp glow?", same)]
    result = find_conflicts(rows)
    pairs = {tuple(r["lines"]): r["differ"] for r in result.details["reworded_questions"]}
    assert pairs == {(1, 2): ["reset", "restart"], (1, 3): ["", "quickly"]}, pairs
    assert result.details["reworded_count"] == 2 and len(result.rows) == len(rows)
