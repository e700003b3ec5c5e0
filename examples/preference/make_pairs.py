"""Writes pairs.jsonl and heldout.jsonl of the preference example from facts.py (run from anywhere; deterministic).

Every fact becomes two pairs (the question asked two ways). Both answers of a pair state the same fact, so what
separates them is only the style, the same in every pair: the chosen answer is polite and concise, the rejected one
rude. That is a preference a 135M model can learn from a few hundred pairs on CPU, and one it can carry to
questions it never saw: the held-out facts are not in pairs.jsonl. The pairs are written in all three of TRL's
formats (plain strings, a conversational prompt, and whole conversations with an implicit prompt).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from facts import FACTS  # noqa: E402

POLITE_OPEN = ["Good question!", "Happy to help.", "Sure thing.", "Of course.", "Great question.", "Glad you asked."]
POLITE_CLOSE = ["Good luck!", "Enjoy!", "Have a great day!", "Take care!", "All the best!", "Have fun!"]
RUDE_OPEN = ["Ugh, seriously?", "Obviously.", "Wow, really?", "Figure it out.", "Whatever.", "Fine, listen."]
RUDE_CLOSE = ["Stop bothering me.", "Not that hard.", "Use your head next time.", "Don't ask again.",
              "Everyone knows that.", "Try harder."]
HELD_OUT_FACTS = 20
SEED = 35


def _pair(question: str, answer: str, rng: random.Random, index: int) -> dict[str, object]:
    chosen = f"{rng.choice(POLITE_OPEN)} {answer} {rng.choice(POLITE_CLOSE)}"
    # Half the rude answers end without a closing jab, so they are shorter than the chosen one. A model's summed
    # log-probability favours shorter answers, so the base model starts near chance at preferring the chosen
    # side, rather than already preferring politeness, and the rise measures what the adapter learned.
    rejected = f"{rng.choice(RUDE_OPEN)} {answer}" + (f" {rng.choice(RUDE_CLOSE)}" if rng.random() < 0.5 else "")
    if index % 5 == 3:  # a conversational prompt, one assistant message a side
        return {"prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    if index % 5 == 4:  # whole conversations: the prompt is what both start with
        ask = {"role": "user", "content": question}
        return {"chosen": [ask, {"role": "assistant", "content": chosen}],
                "rejected": [ask, {"role": "assistant", "content": rejected}]}
    return {"prompt": question, "chosen": chosen, "rejected": rejected}


def build() -> dict[str, list[dict[str, object]]]:
    """The two files' pairs: {"pairs.jsonl": [...], "heldout.jsonl": [...]}."""
    rng = random.Random(SEED)
    order = list(range(len(FACTS)))
    rng.shuffle(order)
    held = set(order[:HELD_OUT_FACTS])
    train, heldout = [], []
    for i, (question, other_question, answer) in enumerate(FACTS):
        out = heldout if i in held else train
        out.append(_pair(question, answer, rng, len(out)))
        out.append(_pair(other_question, answer, rng, len(out)))
    rng.shuffle(train)
    return {"pairs.jsonl": train, "heldout.jsonl": heldout}


def jsonl(pairs: list[dict[str, object]]) -> str:
    return "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)


def main() -> None:
    for name, pairs in build().items():
        (HERE / name).write_text(jsonl(pairs), encoding="utf-8")
        print(f"{name}: {len(pairs)} pairs")


if __name__ == "__main__":
    main()
