"""Issue 32: no row is lost for its format, every line is counted, and reads are bounded.

`data.format: auto` reads each row by its own keys, so a file may mix instruction, `messages`
and ShareGPT rows; the report counts rows per format and where every line went. Rows in no
format, in two, or (with data.format set) in another one are problems naming the format they
look like, and beyond MAX_OUTSIDE_FORMAT_SHARE an error. Devices, FIFOs and oversized files are
refused before they are read whole.
"""
from __future__ import annotations

import json
import os
import re

import pytest
from typer.testing import CliRunner

from jobs import dataprep
from jobs.dataprep import MAX_OUTSIDE_FORMAT_SHARE, check_file, format_report, prepare, prepare_report
from jobs.errors import DataError
from jobs.spec import DataRules
from launcher import cli


def _instruction(i: int) -> dict:
    return {"instruction": f"Question {i} about part {i * 7}?", "output": f"Part {i * 7} weighs {i * 13} grams."}


def _messages(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Where is depot {i} of region {i * 3}?"},
                         {"role": "assistant", "content": f"Depot {i} sits {i * 11} km north of town {i}."}]}


def _sharegpt(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"Who runs shift {i} on line {i * 5}?"},
                              {"from": "gpt", "value": f"Team {i} runs shift {i} with {i * 2} people."}]}


def _jsonl(*objs: dict) -> bytes:
    return ("\n".join(json.dumps(o) for o in objs) + "\n").encode()


def test_one_instruction_row_then_a_thousand_messages_rows_keeps_every_row():
    data = _jsonl(_instruction(0), *[_messages(i) for i in range(1000)])
    report = prepare(data, DataRules()).report
    assert report["valid_rows"] == 1001 and report["problems_total"] == 0
    assert report["format"] == "mixed"
    assert report["counts"]["by_format"]["messages"]["valid"] == 1000
    assert report["counts"]["by_format"]["instruction"]["valid"] == 1
    text = format_report(report)
    assert "mixed formats" in text and "instruction 1 valid" in text and "messages 1000 valid" in text


def test_instruction_messages_and_sharegpt_rows_in_one_file_are_all_read():
    data = _jsonl(*[_instruction(i) for i in range(10)], *[_messages(i) for i in range(10)],
                  *[_sharegpt(i) for i in range(5)])
    report = prepare_report(data, DataRules(min_rows=1)).report
    assert {f: c["valid"] for f, c in report["counts"]["by_format"].items()} == \
        {"instruction": 10, "messages": 10, "sharegpt": 5}
    assert report["kept_rows"] == 25 and not report["errors"]


def test_a_set_format_lists_a_stray_row_with_the_format_it_looks_like():
    data = _jsonl(*[_instruction(i) for i in range(30)], _messages(1))
    report = prepare(data, DataRules(format="instruction")).report  # 1 of 31 rows: under the share
    (problem,) = report["problems"]
    assert problem["line"] == 31 and "looks like a messages row" in problem["message"]
    assert report["counts"]["outside_format"] == 1 and report["outside_format"]["looks_like"] == {"messages": 1}
    assert "1 outside the format" in format_report(report)


def test_rows_outside_a_set_format_beyond_the_share_are_an_error_naming_lines_and_format():
    data = _jsonl(_instruction(0), *[_messages(i) for i in range(20)])
    with pytest.raises(DataError) as caught:
        prepare(data, DataRules(format="instruction", min_rows=1))
    message = str(caught.value)
    assert "20 of 21 rows are outside data.format 'instruction'" in message
    assert "lines 2, 3, 4" in message and "look like messages (20)" in message
    assert caught.value.report["counts"]["outside_format"] == 20


def test_rows_in_no_format_beyond_the_share_fail_even_with_enough_good_rows(tmp_path):
    rows = [_instruction(i) for i in range(20)] + [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    f = tmp_path / "train.jsonl"
    f.write_bytes(_jsonl(*rows))
    report = check_file(f)
    assert report["kept_rows"] >= report["min_rows"] and not report["ok"]
    assert report["outside_format"]["looks_like"] == {"unknown": 5}
    assert "'prompt', 'completion'" in report["problems"][0]["message"]
    text = format_report(report)
    assert "ERROR: 5 of 25 rows are outside the accepted formats" in text and "FAIL" in text


def test_a_few_rows_in_no_format_are_problems_not_an_error():
    n = 40
    rows = [_instruction(i) for i in range(n)] + [{"prompt": "p", "completion": "c"}]
    assert 1 <= MAX_OUTSIDE_FORMAT_SHARE * (n + 1)
    report = prepare(_jsonl(*rows), DataRules()).report
    assert report["problems"][0]["line"] == n + 1 and not report["errors"]


def test_a_row_with_two_formats_is_a_problem_not_a_guess():
    both = {**_instruction(1), **_messages(1)}
    rows, problems = dataprep.read_jsonl(_jsonl(_instruction(0), both))
    assert [r.line for r in rows] == [1]
    assert problems[0].line == 2 and "has both 'instruction' and 'messages'" in problems[0].message


def test_every_line_is_counted_kept_or_dropped_by_a_named_reason(tmp_path):
    rows = [_instruction(i) for i in range(12)] + [_instruction(3)] + [{"instruction": "x"}]
    data = _jsonl(*rows) + b"\n" + b"not json\n"
    report = prepare_report(data, DataRules(min_rows=1)).report
    c = report["counts"]
    assert (c["lines"], c["blank"], c["malformed"], c["valid"], c["kept"]) == (16, 1, 2, 13, 12)
    assert c["dropped_by_rule"] == {"dedup_exact": 1}
    assert "  not kept: 2 malformed lines, 1 exact duplicate" in format_report(report).splitlines()


# ---------------------------------------------------------------------------- bounded reads

def test_a_device_is_refused_before_reading():
    with pytest.raises(DataError, match=r"/dev/zero: is a character device, not a regular file"):
        check_file("/dev/zero")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"is a named pipe \(FIFO\), not a regular file"):
        check_file(fifo)


def test_a_file_over_the_size_limit_names_the_limit_and_the_line(tmp_path):
    f = tmp_path / "big.jsonl"
    f.write_bytes(_jsonl(*[_instruction(i) for i in range(50)]))
    with pytest.raises(DataError) as caught:
        dataprep.read_data_file(f, limit=1000)
    message = str(caught.value)
    assert "larger than the 1,000-byte limit" in message
    line = int(re.search(r"stopped reading at line ([\d,]+)", message).group(1))
    assert 1 < line < 50
    assert dataprep.read_data_file(f, limit=f.stat().st_size) == f.read_bytes()  # exactly the limit is fine


def test_data_check_on_dev_zero_is_a_clear_error_without_a_traceback():
    r = CliRunner().invoke(cli.app, ["data", "check", "/dev/zero"])
    assert r.exit_code == 2 and "not a regular file" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------------------- the CLI

def test_data_check_help_and_explain_name_every_format():
    runner = CliRunner()
    helptext = " ".join(runner.invoke(cli.app, ["data", "check", "--help"]).output.split())
    explain = runner.invoke(cli.app, ["data", "check", "--explain"])
    assert explain.exit_code == 0
    for text in (helptext, explain.output):
        assert "instruction" in text and "messages" in text and "conversations" in text
    assert '"from": "system"|"human"|"gpt"' in explain.output and "auto" in explain.output


def test_data_check_exits_1_and_prints_the_error_for_rows_outside_the_format(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_bytes(_jsonl(*[_instruction(i) for i in range(10)], *[{"question": "q", "answer": "a"}] * 3))
    r = CliRunner().invoke(cli.app, ["data", "check", str(f)])
    assert r.exit_code == 1, r.output
    assert "ERROR: 3 of 13 rows are outside the accepted formats" in r.output and "lines 11, 12, 13" in r.output
    as_json = json.loads(CliRunner().invoke(cli.app, ["data", "check", str(f), "--json"]).output)
    assert as_json["ok"] is False and as_json["counts"]["outside_format"] == 3
