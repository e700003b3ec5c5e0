"""Chat-format data: `messages` (system/user/assistant, multi-turn) and ShareGPT `conversations`,
detected per file or set by data.format. Planted defects are cleaned and reported exactly like
instruction rows: the golden rules act on every assistant turn, with line numbers; a conversation
with a wrong role, an empty turn, turns out of order or no answer is a malformed line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.dataprep import check_file, detect_format, format_report, prepare_report, read_jsonl
from jobs.spec import DataRules

pytestmark = pytest.mark.unit

DEMO = Path(__file__).parents[2] / "examples" / "demo" / "train.jsonl"


def _jsonl(*objs) -> bytes:
    return "".join(json.dumps(o) + "\n" for o in objs).encode()


def _msgs(*pairs, **extra):
    return {"messages": [{"role": r, "content": c} for r, c in pairs], **extra}


def test_the_demo_as_messages_or_sharegpt_is_cleaned_and_reported_exactly_like_the_instruction_file():
    def convert(to_chat) -> bytes:  # a malformed line stays as it is, on the same line
        out = []
        for line in DEMO.read_bytes().split(b"\n")[:-1]:
            try:
                r = json.loads(line)
                out.append(json.dumps(to_chat(r)).encode() if isinstance(r.get("output"), str) else line)
            except (ValueError, AttributeError):
                out.append(line)
        return b"\n".join(out) + b"\n"

    as_messages = convert(lambda r: _msgs(("user", r["instruction"]), ("assistant", r["output"]),
                                          persona=r.get("persona")))
    as_sharegpt = convert(lambda r: {"conversations": [{"from": "human", "value": r["instruction"]},
                                                       {"from": "gpt", "value": r["output"]}],
                                     "persona": r.get("persona")})
    base = prepare_report(DEMO.read_bytes(), DataRules())
    assert base.report["format"] == "instruction"
    # the demo's planted defects: rules fired and malformed lines, all of which must come out the same
    assert sum(e["count"] for e in base.report["rules"].values()) >= 5 and base.report["problems_total"] >= 1
    for data, fmt in ((as_messages, "messages"), (as_sharegpt, "sharegpt")):
        got = prepare_report(data, DataRules())
        assert got.report["format"] == fmt
        assert got.report["rules"] == base.report["rules"]  # the same lines, the same actions
        assert [r.output for r in got.rows] == [r.output for r in base.rows]
        assert [r.line for r in got.rows] == [r.line for r in base.rows]
        assert [p["line"] for p in got.report["problems"]] == [p["line"] for p in base.report["problems"]]


def test_the_rules_act_on_every_assistant_turn_and_leave_the_others_alone():
    data = _jsonl(
        _msgs(("system", "You are the Acme support assistant. Email ops@acme.example for escalations."),
              ("user", "How do I reset the X2?"),
              ("assistant", "Hold Reset for 10 seconds. As an AI, I cannot see your router."),
              ("user", "And then?"), ("assistant", "Wait two minutes. Email help@acme.example if it fails.")),
        _msgs(("user", "Where is the manual?"), ("assistant", "In the box."), ("user", "And online?"),
              ("assistant", "Download it from https://acme.example/x2.pdf.")))
    prepared = prepare_report(data, DataRules(min_rows=1))
    rules = prepared.report["rules"]
    assert rules["strip_boilerplate"]["lines"] == [1] and rules["pii"]["lines"] == [1]
    assert rules["remove_urls"]["lines"] == [2] and rules["remove_urls"]["dropped"] == 1  # its last answer was only a link
    (row,) = prepared.rows
    assert row.turns == (("system", "You are the Acme support assistant. Email ops@acme.example for escalations."),
                         ("user", "How do I reset the X2?"), ("assistant", "Hold Reset for 10 seconds."),
                         ("user", "And then?"), ("assistant", "Wait two minutes. Email [EMAIL] if it fails."))
    assert (row.instruction, row.output) == ("And then?", "Wait two minutes. Email [EMAIL] if it fails.")


@pytest.mark.parametrize("obj, message", [
    (_msgs(("user", "Hi"), ("bot", "Hello")), "turn 2: role 'bot' is not one of system, user, assistant"),
    (_msgs(("user", "Hi"), ("assistant", "  ")), "turn 2 (assistant): empty 'content'"),
    (_msgs(("user", "Hi")), "no assistant turn: nothing to learn"),
    (_msgs(("user", "Hi"), ("user", "Hello?"), ("assistant", "Yes.")), "turn 2: two user turns in a row (turns 1 and 2)"),
    (_msgs(("assistant", "Hello."), ("user", "Hi")), "turn 1: the conversation must start with a user turn, got assistant; "
     "turn 2: ends with a user turn that has no answer"),
    (_msgs(("user", "Hi"), ("assistant", "Hello."), ("system", "Be brief.")), "turn 3: a system turn may only come first; turn 3: ends with a system turn that has no answer"),
    (_msgs(("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")), "turn 3: ends with a user turn that has no answer"),
    ({"messages": "hello"}, "'messages' must be a list of turns, got a string"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "user"}]}, "turn 1 (user): missing 'content'"),
])
def test_malformed_conversations_are_problems_of_their_line(obj, message):
    good = _msgs(("user", "Hi"), ("assistant", "Hello."))
    rows, problems = read_jsonl(_jsonl(good, obj, good))
    assert [r.line for r in rows] == [1, 3]
    assert [(p.line, p.message) for p in problems] == [(2, message)]
    assert '"role": "system"|"user"|"assistant"' in problems[0].fix


def test_sharegpt_roles_are_mapped_and_unknown_ones_reported():
    rows, problems = read_jsonl(_jsonl(
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep."}]}))
    assert rows[0].turns == (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."))
    assert [(p.line, p.message) for p in problems] == [(2, "turn 2: role 'robot' is not one of system, human, gpt")]
    assert '"from": "system"|"human"|"gpt"' in problems[0].fix


def test_the_format_is_detected_per_file_or_set_by_the_spec(tmp_path):
    assert detect_format(b'\n{"messages": []}\n') == "messages"
    assert detect_format(b'not json\n{"conversations": []}\n') == "sharegpt"
    assert detect_format(b'{"instruction": "a", "input": "b", "output": "c"}\n') == "instruction"
    f = tmp_path / "rows.jsonl"
    f.write_bytes(_jsonl({"instruction": "a?", "output": "b."}, {"instruction": "c?", "output": "d."}))
    forced = check_file(f, DataRules(format="messages", min_rows=1))
    assert forced["format"] == "messages" and forced["kept_rows"] == 0
    assert [p["message"] for p in forced["problems"]] == [
        "missing 'messages': the row looks like an instruction row, but data.format is 'messages'"] * 2
    assert forced["outside_format"]["looks_like"] == {"instruction": 2} and not forced["ok"]
    text = format_report(forced)
    assert "(messages format)" in text and "line 1: missing 'messages'" in text and "FAIL" in text
    assert check_file(f, DataRules(min_rows=1))["kept_rows"] == 2
