"""Property tests: whatever the bytes or rows, data preparation returns or raises DataError."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.dataprep import (Row, balance_groups, prepare, read_jsonl, split_validation,
                           strip_boilerplate_text)
from jobs.errors import DataError
from jobs.pii import find_pii
from jobs.spec import DataRules

pytestmark = pytest.mark.unit

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=30))
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)), max_leaves=6)
words = st.sampled_from("the router reset light amber As an AI language model I hope this helps https://acme.example "
                        "mail a@b.example call (555) 010-4477 card 4111111111111111 . , ! ? - \n".split(" "))
sentence_text = st.lists(words, min_size=1, max_size=40).map(" ".join)
text_field = st.one_of(sentence_text, st.text(max_size=60), scalars)
any_dicts = st.dictionaries(
    st.sampled_from(["instruction", "output", "input", "persona", "tone", "extra"]),
    st.one_of(text_field, json_values), max_size=6)
# Mostly well-formed rows, so that the rules, not just the schema check, see the data.
good_dicts = st.fixed_dictionaries(
    {"instruction": sentence_text, "output": sentence_text},
    optional={"input": st.one_of(st.just(""), sentence_text), "persona": st.sampled_from(["a", "b", "c"]),
              "tone": st.one_of(st.none(), st.sampled_from(["x", "y"]))})
row_dicts = st.one_of(good_dicts, good_dicts, any_dicts)
rules = st.builds(
    DataRules,
    strip_boilerplate=st.booleans(), remove_urls=st.booleans(),
    long_sentences=st.sampled_from(["flag", "trim", "drop", "off"]), max_sentence_words=st.integers(5, 40),
    dedup_exact=st.booleans(), dedup_near=st.booleans(), near_dup_threshold=st.floats(0.05, 1.0),
    pii=st.sampled_from(["redact", "drop", "off"]), balance=st.booleans(), max_group_share=st.floats(0.05, 1.0),
    min_rows=st.integers(1, 20), max_output_words=st.one_of(st.none(), st.integers(1, 50)))


def _check_read(data: bytes) -> None:
    rows, problems = read_jsonl(data)
    n_lines = data.count(b"\n") + 1
    good = {r.line for r in rows}
    bad = {p.line for p in problems}
    assert not good & bad
    assert all(1 <= n <= n_lines for n in good | bad)
    assert all(isinstance(r, Row) and r.instruction.strip() and r.output.strip() for r in rows)
    assert all(p.where == f"line {p.line}" and p.message for p in problems)


@FAST
@given(st.binary(max_size=400))
def test_read_jsonl_never_raises_on_arbitrary_bytes(data):
    _check_read(data)


@settings(FAST, max_examples=100)
@given(st.lists(st.one_of(any_dicts.map(json.dumps), json_values.map(json.dumps), st.binary(max_size=40)),
                max_size=8),
       st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_read_jsonl_never_raises_on_mixed_lines(lines, sep, bom):
    encoded = [x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines]
    _check_read((b"\xef\xbb\xbf" if bom else b"") + sep.join(encoded))


@FAST
@given(st.lists(row_dicts, max_size=25), rules, st.integers(0, 2**32))
def test_prepare_returns_or_raises_data_error_for_any_rows(dicts, rules, seed):
    data = "\n".join(json.dumps(d) for d in dicts).encode("utf-8", "surrogatepass")
    try:
        prepared = prepare(data, rules, seed=seed)
    except DataError as err:
        report = err.report
        # a DataError means too few rows, or too many rows outside the format (named in the report)
        assert report["kept_rows"] < rules.min_rows or report["errors"]
        outside = report["outside_format"]
        assert not report["errors"] or outside["count"] > outside["max_share"] * (len(dicts) - report["counts"]["blank"])
    else:
        report = prepared.report
        assert len(prepared.rows) == report["kept_rows"] >= rules.min_rows and not report["errors"]
        assert {r.line for r in prepared.rows} <= set(range(1, len(dicts) + 1))
        assert all(r.output.strip() for r in prepared.rows)
    json.dumps(report, allow_nan=False)
    assert report["kept_rows"] <= report["valid_rows"] <= report["total_lines"] == len(dicts)
    for entry in report["rules"].values():
        assert entry["count"] >= len(entry["lines"])
    # nothing is lost without a count: every line is blank, malformed, outside the format or
    # valid, and every valid row is kept or dropped by a named rule
    c = report["counts"]
    assert c["blank"] + c["malformed"] + c["outside_format"] + c["valid"] == c["lines"] == len(dicts)
    assert c["valid"] - sum(c["dropped_by_rule"].values()) == c["kept"] == report["kept_rows"]
    assert sum(f["valid"] for f in c["by_format"].values()) == c["valid"]
    assert sum(f["kept"] for f in c["by_format"].values()) == c["kept"]


@settings(FAST, max_examples=100)
@given(st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=40), st.floats(0.05, 1.0),
       st.integers(0, 1000))
def test_balance_meets_the_share_whenever_it_can(personas, share, seed):
    rows = [Row(i + 1, f"q{i}", f"a{i}", persona=p) for i, p in enumerate(personas)]
    result = balance_groups(rows, share, seed)
    groups = {p for p in personas if p}
    assert [r for r in result.rows if not r.persona] == [r for r in rows if not r.persona], "untagged rows stay"
    if len(groups) < 2:
        assert result.rows == rows
        return
    effective = max(share, 1 / len(groups))
    tagged = [r for r in result.rows if r.persona]
    counts = [sum(r.persona == g for r in tagged) for g in groups]
    assert max(counts) <= effective * len(tagged) + 1e-9
    assert all(c >= 1 for c in counts)  # no persona is wiped out
    assert balance_groups(rows, share, seed).rows == result.rows


@FAST
@given(st.text(max_size=200))
def test_pii_redaction_and_boilerplate_stripping_are_idempotent(text):
    once, _ = find_pii(text)
    assert find_pii(once)[0] == once
    stripped = strip_boilerplate_text(text)
    assert strip_boilerplate_text(stripped) == stripped


@settings(FAST, max_examples=100)
@given(st.integers(0, 60), st.floats(0.0, 0.5), st.integers(0, 1000))
def test_split_validation_partitions_the_rows(n, fraction, seed):
    rows = [Row(i + 1, f"q{i}", f"a{i}") for i in range(n)]
    train, val = split_validation(rows, fraction, seed)
    assert sorted(r.line for r in train + val) == list(range(1, n + 1))
    if fraction > 0 and n >= 2:
        assert val and train
    assert split_validation(rows, fraction, seed) == (train, val)
