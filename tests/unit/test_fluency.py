"""The fluency checks on real generations: the after-training answers of `make demo`
(SmolLM2-135M, 2026-12-01), and the ones issue 13 quotes. Each flag fires where it should, and
the fluent answers of the same run stay clean; the report's checklist counts and names them."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobs.trainer.evaluate import answer_ids, build_report, fluency_flags, render_markdown, stop_token_ids
from jobs.spec import EvalPrompt, load_spec_text

pytestmark = pytest.mark.unit

#: (answer, cut off at max_new_tokens?, expected flags) — the demo's own output, verbatim
DEMO = [
    ("Turn it off.", False, []),
    ("Turn on the guest network by pressing the power button and then enter the guest network settings.",
     False, []),
    ("1. Press and hold the Power button.\n2. Press the reset button.\n3. Wait for 30 seconds.\n4. Press the "
     "power button again.\n5. Wait for 1 minute.\n\nIf you have a router with a reset button, you can press it.",
     False, []),
    ("The Acme Router X2 has ports 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,", True,
     ["counting_run", "cut_off"]),
    ("Step 1: Install the router.\nStep 2: Connect the router to the modem.\nStep 3: Add the router to the "
     "router.\nStep 4: Set up the network.\nStep 5: Enable the Wi-Fi.\nStep 6: Set up the internet.", False, []),
    ("Check the internet settings > Settings > Internet > Internet > Uninstall > Uninstall.", False,
     ["repeated_phrase"]),
]


#: the after-training answers of the demo's best tried setting (3 epochs, lr 1e-3; README), verbatim
DEMO_3_EPOCHS = [
    ("Restart the modem, wait two minutes, and restart the router.", False, []),
    ("Go to Settings > Advanced > Guest and tap Add- ins. Choose the device, enter the password, and save.", False,
     []),
    ("Open the router and disconnect power. Restart the modem, wait two minutes, then restart the router.", False,
     []),
    ("The Acme Router X2 has 192.168.8.1, 192.168.8.1, 192.168.8.1, 192.168.8.1, 192", True,
     ["repeated_number", "cut_off"]),
    ("Please choose the device, enter the network name, and select Save.", False, []),
    ("Please check the following:\n- Ensure the modem cable is firmly in the blue WAN port\n- Check the firmware on "
     "the router\n- Check the internet connection in Settings > Internet > Logs\n- Check that the modem is in the "
     "blue WAN port", False, []),
]


@pytest.mark.parametrize("answer, cut_off, expected", DEMO + DEMO_3_EPOCHS)
def test_the_demos_answers_are_flagged_exactly_where_they_degenerate(answer, cut_off, expected):
    assert fluency_flags(answer, cut_off=cut_off) == expected


def test_the_same_number_again_and_again_is_flagged_even_when_the_answer_ends_cleanly():
    assert fluency_flags("The Acme Router X2 has 192.168.8.1, 192.168.8.1, 192.168.8.1.") == ["repeated_number"]
    assert fluency_flags("Hold Reset for 10, 10, 10 and 10 seconds.") == ["repeated_number"]
    # a number said twice, or a dotted address that repeats its own digits, is not a loop
    assert fluency_flags("Hold Reset for 10 seconds, then wait 10 more.") == []
    assert fluency_flags("Use 1.1.1.1 or 8.8.8.8 as the DNS server.") == []


def test_counting_elided_with_an_ellipsis_is_still_a_counting_run():
    # issue 13's quote of the demo's answer
    assert fluency_flags("The Acme Router X2 has ports 1, 2, 3, 4, 5, … 16,") == ["counting_run"]
    assert fluency_flags("The Acme Router X2 has ports 1, 2, 3, 4, 5, ... 16,") == ["counting_run"]
    assert fluency_flags("Pick any channel 1, 2, … 11 on the 2.4 GHz band.") == []  # a range written out


SENTENCE = "Check your router's internet connection."


@pytest.mark.parametrize("answer", [
    " ".join([SENTENCE] * 5),
    "\n".join([SENTENCE] * 5),
    "\n".join(f"- {SENTENCE[:-1]}" for _ in range(5)),
    "\n".join(f"{n}. {SENTENCE}" for n in range(1, 6)),
    " ".join([SENTENCE] * 4) + " Check your router's",  # and then cut off
], ids=["sentences", "lines", "bullets", "numbered", "cut-off"])
def test_a_sentence_repeated_five_times_is_a_repeated_sentence_in_every_layout(answer):
    assert "repeated_sentence" in fluency_flags(answer)


def test_a_sentence_repeated_behind_step_numbers_is_still_caught_as_a_repeated_phrase():
    assert fluency_flags("\n".join(f"Step {n}: {SENTENCE}" for n in range(1, 6))) == ["repeated_phrase"]


def test_the_same_sentence_again_and_again_is_flagged():
    answer = ("Check your router's internet connection. Check your router's internet connection. "
              "Restart the router. Check your router's internet connection.")
    assert "repeated_sentence" in fluency_flags(answer)


def test_a_cut_off_answer_is_flagged_only_when_it_stopped_mid_sentence():
    assert fluency_flags("Open Settings > Wi-Fi > Guest Network and switch it", cut_off=True) == ["cut_off"]
    assert fluency_flags("Open Settings > Wi-Fi > Guest Network and switch it on.", cut_off=True) == []
    assert fluency_flags("Open Settings > Wi-Fi > Guest Network and switch it", cut_off=False) == []


def test_scaffolding_and_empty_answers():
    assert fluency_flags("") == ["empty"]
    assert fluency_flags("Sure.\n### Response:\nReset it.") == ["scaffolding"]
    assert fluency_flags("Reset it. <|im_end|>") == ["scaffolding"]
    assert fluency_flags("Assistant: reset it.") == ["scaffolding"]
    assert fluency_flags("Reset it.<|im_start|>user\nAnd the light?") == ["scaffolding"]
    assert fluency_flags("Reset it.</s>") == ["scaffolding"]
    assert fluency_flags("Reset it.\nHuman: and then?") == ["scaffolding"]


# SmolLM2 as converted from GGUF: generation stops at <|im_end|> (2); the tokenizer's EOS and pad are <|im_start|> (1)
SMOLLM2 = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2))
SMOLLM2_TOK = SimpleNamespace(eos_token_id=1)


def test_an_answer_is_cut_off_only_when_it_ran_to_max_new_tokens_without_the_models_stop_token():
    stop = stop_token_ids(SMOLLM2, SMOLLM2_TOK)
    assert stop == {2}
    # a row of a batch that ended early: its stop token, then padding
    assert answer_ids([10, 11, 2, 1, 1, 1], stop, 6) == ([10, 11], False)
    # ended on its very last token: complete, not cut off
    assert answer_ids([10, 11, 12, 13, 14, 2], stop, 6) == ([10, 11, 12, 13, 14], False)
    # ran out of tokens
    assert answer_ids([10, 11, 12, 13, 14, 15], stop, 6) == ([10, 11, 12, 13, 14, 15], True)
    # the tokenizer's "EOS" mid-answer is no end: it is what a leaked "<|im_start|>user" starts with
    assert answer_ids([10, 1, 12, 13, 14, 15], stop, 6) == ([10, 1, 12, 13, 14, 15], True)
    llama3 = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 9]))  # several end-of-turn ids
    assert stop_token_ids(llama3, SMOLLM2_TOK) == {7, 9}
    assert stop_token_ids(SimpleNamespace(), SMOLLM2_TOK) == {1}


PROMPTS = [json.loads(line) for line in
           (Path(__file__).parents[2] / "examples/demo/eval_prompts.jsonl").read_text().splitlines()]


class _Answer(str):
    cut_off = False


def _answers(rows) -> list[str]:
    out = []
    for text, cut_off, _ in rows:
        a = _Answer(text)
        a.cut_off = cut_off
        out.append(a)
    return out


@pytest.mark.parametrize("run, broken, named", [
    (DEMO, 2, '2 of 6 generations look broken: #4 "Which ports does the Acme Router X2 have?" (counting run, '
              'cut off); #6 "My Acme Router X2 keeps losing its internet connection. Wha…" (repeated phrase)'),
    (DEMO_3_EPOCHS, 1, '1 of 6 generations look broken: #4 "Which ports does the Acme Router X2 have?" '
                       '(repeated number, cut off)'),
], ids=["1-epoch", "3-epochs"])
def test_the_checklist_counts_the_demos_broken_answers_and_names_each_prompt(run, broken, named):
    spec = load_spec_text("name: demo\nbase_model: {uri: s3://models/x/}\ndataset: {train: s3://data/t.jsonl}\n"
                          "output: s3://runs/lora\n")
    prompts = [EvalPrompt(**p) for p in PROMPTS]
    report = build_report(spec, prompts=prompts, before=[p["prompt"] for p in PROMPTS], after=_answers(run),
                          val_loss_before=3.6, val_loss_after=2.8, history=[], evals=[], train_outputs=[])
    fl = report["checklist"]["fluency"]
    assert fl["broken_generations"] == broken and fl["of"] == 6
    assert [b["prompt"] for b in fl["broken"]] == [n for n, (_, _, flags) in enumerate(run, 1) if flags]
    assert [b["flags"] for b in fl["broken"]] == [flags for _, _, flags in run if flags]
    assert f"- Fluency: {named}" in render_markdown(report, spec)


def test_short_enumerations_and_ranges_are_not_counting_runs():
    assert fluency_flags("Use ports 1, 2, 3 and 4 for wired devices.") == []
    assert fluency_flags("Pick a channel from 1-11 on the 2.4 GHz band.") == []
