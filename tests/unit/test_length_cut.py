"""Which rows max length cuts, by line: an instruction row or a conversation whose tokens run past it is kept, cut
there, and its line listed; a preference pair is listed when either side's answer is cut; rows that fit are not
listed and encode as before (SmolLM2's tokenizer and chat template)."""
from __future__ import annotations

from pathlib import Path

import pytest

from jobs.dataprep.rows import Row
from jobs.preference import Pair

pytestmark = pytest.mark.unit
SMOLLM2 = Path.home() / ".cache" / "lora-jobs" / "models" / "smollm2-135m-instruct"
LONG = " ".join(f"word{i}" for i in range(80))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer at {SMOLLM2} (hack/kind-up.sh's model cache)")
    return AutoTokenizer.from_pretrained(SMOLLM2)


def test_rows_and_conversations_cut_at_max_length_are_listed_by_line(tok):
    from jobs.trainer.train import encode_rows

    rows = [Row(line=1, instruction="What colour is the sky?", output="Blue."),
            Row(line=2, instruction="Count.", output=LONG),
            Row(line=3, instruction="Hi", output="Hello.",
                turns=(("user", "Hi"), ("assistant", "Hello."), ("user", "More?"), ("assistant", LONG))),
            Row(line=4, instruction="Hi", output="Hello.", turns=(("user", "Hi"), ("assistant", "Hello.")))]
    cut: list[int] = []
    examples, too_long = encode_rows(tok, rows, 96, cut)
    assert too_long == [] and cut == [2, 3]
    assert [len(e["input_ids"]) for e in examples][1:3] == [96, 96]
    assert all(set(e) == {"input_ids", "labels"} for e in examples)  # the mark does not travel into training
    whole, _ = encode_rows(tok, rows, 4096)  # without the list: the same examples as before, none cut
    assert len(whole[1]["input_ids"]) > 96 and whole[0] == examples[0] and whole[3] == examples[3]


def test_a_pair_is_listed_when_either_answer_is_cut(tok):
    from jobs.trainer.preference import encode_pairs

    def pair(line, chosen, rejected):
        return Pair(Row(line=line, instruction="Say something.", output=chosen),
                    Row(line=line, instruction="Say something.", output=rejected), line)

    cut: list[int] = []
    encoded, too_long = encode_pairs(tok, [pair(1, "Fine.", "No."), pair(2, "Fine.", LONG), pair(3, LONG, "No.")],
                                     96, cut)
    assert too_long == [] and cut == [2, 3] and len(encoded) == 3
    assert all(set(e["chosen"]) == {"input_ids", "labels"} for e in encoded)
