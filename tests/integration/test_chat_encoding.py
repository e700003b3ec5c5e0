"""Conversations through SmolLM2's real chat template: the loss is on every assistant turn
(with its end-of-turn token) and on nothing else; a template-less tokenizer gets the plain
"### Instruction / ### Response" layout with the same masking."""
from __future__ import annotations

import pytest

from jobs.dataprep import read_jsonl
from jobs.trainer.train import IGNORE, encode_example
from chat import CONVERSATION, tok  # noqa: F401,E402 (tok: a fixture)

pytestmark = pytest.mark.train


def _trained_spans(tok, example) -> list[str]:
    spans, cur = [], []
    for i, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE:
            assert label == i
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


def test_every_assistant_turn_is_trained_and_nothing_else(tok):
    (row,), _ = read_jsonl(CONVERSATION)
    ex = encode_example(tok, row, 512)
    assert _trained_spans(tok, ex) == ["Hold Reset for 10 seconds.<|im_end|>\n", "Wait two minutes.<|im_end|>\n"]
    text = tok.decode(ex["input_ids"])
    assert text == tok.apply_chat_template([{"role": r, "content": c} for r, c in row.turns], tokenize=False)


def test_a_conversation_whose_first_answer_does_not_fit_is_too_long_and_a_later_one_is_cut(tok):
    (row,), _ = read_jsonl(CONVERSATION)
    assert encode_example(tok, row, 20) is None
    cut = encode_example(tok, row, 40)
    assert len(cut["input_ids"]) == 40 and _trained_spans(tok, cut)[0].startswith("Hold Reset")


def test_without_a_chat_template_the_plain_layout_masks_the_same_way(tok):
    (row,), _ = read_jsonl(CONVERSATION)
    template, tok.chat_template = tok.chat_template, None
    try:
        ex = encode_example(tok, row, 512)
    finally:
        tok.chat_template = template
    eos = tok.eos_token
    assert _trained_spans(tok, ex) == [f"Hold Reset for 10 seconds.{eos}\n\n", f"Wait two minutes.{eos}\n\n"]
    assert tok.decode(ex["input_ids"]).startswith("### System:\nYou are the Acme support assistant.\n\n### Instruction:")
