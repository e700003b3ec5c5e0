"""Faithfulness on real generations: the before/after answers of `make demo` (SmolLM2-135M,
2026-12-01, examples/demo/eval_prompts.jsonl's references). The facts of a reference are found
where the answer carries them and nowhere else; a prompt whose answer lost ROUGE-L or facts is
flagged, one that gained is not; the HTML page escapes what the model wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.trainer.evaluate import build_report, faithfulness, faithfulness_dropped, fact_found, reference_facts, render_html
from jobs.spec import EvalPrompt, load_spec_text

pytestmark = pytest.mark.unit

REFS = [json.loads(line)["reference"] for line in
        (Path(__file__).parents[2] / "examples/demo/eval_prompts.jsonl").read_text().splitlines()]

#: (the demo's base-model answer, its adapter's answer) to the same prompts, verbatim
AMBER = ("The light on your Acme Router X2 is solid amber. This is a common issue that can be caused by various "
         "factors, including a faulty LED, a faulty battery, or a faulty circuit.", "Turn it off.")
RESET = ("To factory reset the Acme Router X2, you need to follow a few steps:\n\n1. **Disable the ACME Router "
         "X2's Power-Up System**: This is a feature that allows you to reset the router to its default "
         "configuration. You can do this by opening the router's settings",
         "1. Press and hold the Power button.\n2. Press the reset button.\n3. Wait for 30 seconds.\n4. Press the "
         "power button again.\n5. Wait for 1 minute.\n\nIf you have a router with a reset button, you can press it.")
GUEST_RIGHT = "Go to Settings > Wi-Fi > Guest and switch it on. Guests get internet access but can't see your devices."


def test_the_facts_of_a_reference_are_its_menu_paths_names_numbers_and_quoted_terms():
    assert reference_facts(REFS[1]) == ["Settings > Wi-Fi > Guest"]
    assert reference_facts(REFS[2]) == ["Reset", "10"]  # "Hold" opens a sentence: grammar, not a name
    assert reference_facts(REFS[3]) == ["WAN", "LAN", "USB 3.0"]
    assert reference_facts(REFS[5]) == ["Settings > System > Firmware", "WAN", "X2"]
    assert reference_facts('Type "admin" as the user name. The X2 is a Wi-Fi 6 router on 2.4 GHz and 5 GHz.') == [
        "admin", "X2", "Wi-Fi 6", "2.4 GHz", "5 GHz"]
    assert reference_facts("Yes, on by default.") == []


def test_a_fact_is_found_whatever_its_case_and_spacing_but_a_number_must_stand_alone():
    assert fact_found("Settings > Wi-Fi > Guest", "open settings  >wi-fi >  guest, then save")
    assert fact_found("Settings > Wi-Fi > Guest", "Settings → Wi-Fi → Guest")
    assert not fact_found("Settings > Wi-Fi > Guest", "Settings > Wi-Fi > Security")
    assert fact_found("10", "Hold it for 10 seconds.")
    assert not fact_found("10", "Hold it for 100 seconds.")
    assert not fact_found("2.4", "Use 2.45 GHz.")


def test_an_answer_that_carries_the_reference_scores_high_and_the_demos_adapter_answer_low():
    right = faithfulness(GUEST_RIGHT, REFS[1])
    wrong = faithfulness("Turn on the guest network by pressing the power button and then enter the guest network "
                         "settings.", REFS[1])  # the demo's adapter, verbatim
    assert right["facts"] == 1.0 and right["facts_missing"] == []
    assert wrong["facts"] == 0.0 and wrong["facts_missing"] == ["Settings > Wi-Fi > Guest"]
    assert right["rouge_l"] > wrong["rouge_l"] > 0
    assert faithfulness("", REFS[1]) == {"rouge_l": 0.0, "facts": 0.0, "facts_found": [],
                                         "facts_missing": ["Settings > Wi-Fi > Guest"]}


def test_the_demos_amber_answer_is_flagged_as_less_faithful_after_training():
    before, after = faithfulness(AMBER[0], REFS[0]), faithfulness(AMBER[1], REFS[0])
    assert after["rouge_l"] < before["rouge_l"] - 0.05
    assert faithfulness_dropped(before, after)


def test_an_answer_that_gained_or_kept_its_facts_is_not_flagged():
    before, after = faithfulness(RESET[0], REFS[2]), faithfulness(RESET[1], REFS[2])
    assert before["facts_found"] == after["facts_found"] == ["Reset"]  # neither says 10 seconds
    assert not faithfulness_dropped(before, after)  # ROUGE-L went up
    assert not faithfulness_dropped(faithfulness(AMBER[1], REFS[1]), faithfulness(GUEST_RIGHT, REFS[1]))
    assert faithfulness_dropped(faithfulness(GUEST_RIGHT, REFS[1]), faithfulness(AMBER[1], REFS[1]))


def _report(prompts, before, after):
    spec = load_spec_text("name: demo\nbase_model: {uri: s3://models/x/}\ndataset: {train: s3://data/t.jsonl}\n"
                          "output: s3://runs/lora\n")
    return spec, build_report(spec, prompts=prompts, before=before, after=after, val_loss_before=2.0,
                              val_loss_after=1.5, history=[{"step": 1, "loss": 2.0}], evals=[], train_outputs=[])


def test_the_report_scores_each_prompt_with_a_reference_and_lists_the_dropped_ones():
    prompts = [EvalPrompt(prompt="amber?", reference=REFS[0]), EvalPrompt(prompt="guest?", reference=REFS[1]),
               EvalPrompt(prompt="no reference")]
    _, report = _report(prompts, [AMBER[0], AMBER[1], "x"], [AMBER[1], GUEST_RIGHT, "y"])
    f = report["checklist"]["faithfulness"]
    assert f["of"] == 2 and f["without_reference"] == 1 and f["dropped"] == [1]
    assert f["before"]["facts"] == 0.0 and f["after"]["facts"] == 0.5  # 1 of the 2 facts (WAN; the guest path)
    assert f["after"]["rouge_l"] > f["before"]["rouge_l"]
    g = report["generations"]
    assert [x["faithfulness_dropped"] for x in g] == [True, False, None]
    assert g[2]["faithfulness"] is None


def test_the_html_page_is_self_contained_escapes_generations_and_says_pass_or_fail():
    prompts = [EvalPrompt(prompt="<b>amber</b>?", reference=REFS[0])]
    spec, report = _report(prompts, [AMBER[0]], ['<script>alert("x")</script> Turn it off & on.'])
    page = render_html(report, spec, b"\x89PNG fake bytes")
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; Turn it off &amp; on." in page
    assert "&lt;b&gt;amber&lt;/b&gt;?" in page
    assert 'src="data:image/png;base64,iVBORyBmYWtlIGJ5dGVz"' in page
    assert "http" not in page  # nothing fetched from elsewhere
    assert '<td>Faithfulness: none dropped</td><td class="fail">fail</td>' in page
    assert '<td>Validation loss improved</td><td class="pass">pass</td>' in page
    assert "faithfulness dropped" in page and "missing after: WAN" in page
