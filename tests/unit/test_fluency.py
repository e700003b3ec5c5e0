"""The fluency checks on real generations: the after-training answers of `make demo`
(SmolLM2-135M, 2026-12-01), and the ones issue 13 quotes. Each flag fires where it should, and
the fluent answers of the same run stay clean."""
from __future__ import annotations

import pytest

from jobs.evaluate import fluency_flags

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


@pytest.mark.parametrize("answer, cut_off, expected", DEMO)
def test_the_demos_answers_are_flagged_exactly_where_they_degenerate(answer, cut_off, expected):
    assert fluency_flags(answer, cut_off=cut_off) == expected


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


def test_short_enumerations_and_ranges_are_not_counting_runs():
    assert fluency_flags("Use ports 1, 2, 3 and 4 for wired devices.") == []
    assert fluency_flags("Pick a channel from 1-11 on the 2.4 GHz band.") == []
