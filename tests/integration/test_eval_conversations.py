"""A held-out conversation is evaluated with its context: the model is asked the turns before the
conversation's last answer, rendered by SmolLM2's real chat template exactly as training put them
before that answer, not just the last user turn; the report shows the earlier turns."""
from __future__ import annotations

import pytest

from jobs.dataprep import read_jsonl
from jobs.trainer.evaluate import build_report, generate, prompt_text, prompts_for, render_html
from jobs.spec import load_spec_text
from jobs.trainer.train import IGNORE, encode_example
from chat import CONVERSATION, tok  # noqa: F401,E402 (tok: a fixture)

pytestmark = pytest.mark.train

SPEC = load_spec_text("name: chat\nbase_model: {uri: s3://models/x/}\ndataset: {train: s3://data/t.jsonl}\n"
                      "output: s3://runs/lora\neval: {max_new_tokens: 24}\n")


def _row():
    (row,), problems = read_jsonl(CONVERSATION)
    assert not problems
    return row


def _text_before_last_answer(tok, row) -> str:
    """What training put before the conversation's last answer (its last run of trained labels)."""
    ex = encode_example(tok, row, 512)
    trained = [i for i, label in enumerate(ex["labels"]) if label != IGNORE]
    start = trained[-1]
    while start - 1 in trained:
        start -= 1
    return tok.decode(ex["input_ids"][:start])


def test_a_held_out_conversation_is_asked_with_every_turn_before_its_last_answer(tok):
    row = _row()
    (p,) = prompts_for(SPEC, [row], None)
    assert p.prompt == "And then?" and p.reference == "Wait two minutes."
    text = prompt_text(tok, p)
    assert text == tok.apply_chat_template([{"role": r, "content": c} for r, c in row.turns[:4]], tokenize=False,
                                           add_generation_prompt=True)
    for earlier in ("You are the Acme support assistant.", "How do I reset the X2?", "Hold Reset for 10 seconds."):
        assert earlier in text
    assert text == _text_before_last_answer(tok, row)  # asked exactly what it learned to answer


def test_without_a_chat_template_the_conversation_is_asked_in_the_plain_layout_training_used(tok):
    row = _row()
    (p,) = prompts_for(SPEC, [row], None)
    template, tok.chat_template = tok.chat_template, None
    try:
        text = prompt_text(tok, p)
        assert text == _text_before_last_answer(tok, row)
    finally:
        tok.chat_template = template
    assert text.startswith("### System:\nYou are the Acme support assistant.\n\n### Instruction:\nHow do I reset")
    assert text.endswith("### Instruction:\nAnd then?\n\n### Response:\n")


def test_generation_sees_the_context_and_the_report_shows_it(tok, small_model_dir):
    import torch

    from jobs.trainer.modelio import load_model

    row = _row()
    prompts = prompts_for(SPEC, [row], None)
    model = load_model(str(small_model_dir), precision="fp32", quantization="none", device=torch.device("cpu"))
    asked = []
    real_generate = model.generate

    def recording_generate(**kwargs):
        asked.append(tok.decode(kwargs["input_ids"][0]))
        return real_generate(**kwargs)

    model.generate = recording_generate
    (answer,) = generate(model, tok, prompts, SPEC, torch.device("cpu"))
    assert asked == [prompt_text(tok, prompts[0])]
    assert "<|im_end|>" not in answer  # the stop token ends the answer; it is not part of it
    report = build_report(SPEC, prompts=prompts, before=[answer], after=[answer], val_loss_before=None,
                          val_loss_after=None, history=[], evals=[], train_outputs=[])
    g = report["generations"][0]
    assert g["prompt"] == "And then?"
    assert g["context"] == [["system", "You are the Acme support assistant."], ["user", "How do I reset the X2?"],
                            ["assistant", "Hold Reset for 10 seconds."]]
    assert "asked after 3 earlier turns" in render_html(report, SPEC)
