"""One PII rule: the data rules (data.pii) and the eval's safety check flag the same strings, kind for kind."""
from __future__ import annotations

import pytest

from jobs.dataprep import Row, handle_pii
from jobs.spec import EvalPrompt, load_spec_text
from jobs.trainer.evaluate import build_report

pytestmark = pytest.mark.unit

TEXTS = [
    "Write to jane.doe+x2@mail.example.com today.",
    "Call (555) 010-4477 now.",
    "Ring +44 20 7946 0958 in London.",
    "Card 4111-1111-1111-1111.",
    "SSN 123-45-6789 on file.",
    "Your customer ID: AB1234567 is ready.",
    "Reference 123456789012 applies.",
    "Mail ops@example.org or call 555.010.4477.",
    # not PII to either: an address, a version, a date, a card number that fails the Luhn check
    "Open 192.168.8.1 in a browser.",
    "It uses a 12 V, 2 A adapter and firmware 2.4.1.",
    "Ports 8080 and 443 are open from 2024-01-15.",
    "Card 4111 1111 1111 1112 fails the Luhn check.",
    "Hold Reset for 10 seconds.",
]


def _eval_kinds(texts: list[str]) -> list[list[str]]:
    spec = load_spec_text("name: demo\nbase_model: {uri: s3://models/x/}\ndataset: {train: s3://data/t.jsonl}\n"
                          "output: s3://runs/lora\n")
    report = build_report(spec, prompts=[EvalPrompt(prompt="q")] * len(texts), before=texts, after=texts,
                          val_loss_before=None, val_loss_after=None, history=[], evals=[], train_outputs=[])
    return [g["pii"] for g in report["generations"]]


def _data_kinds(texts: list[str]) -> list[list[str]]:
    out = []
    for text in texts:
        entry = handle_pii([Row(line=1, instruction="q", output=text)], "redact").entry()
        out.append(sorted(k.lower() for k in entry.get("kinds", {})))
    return out


def test_the_data_rules_and_the_eval_flag_the_same_strings_as_the_same_kinds():
    assert _eval_kinds(TEXTS) == _data_kinds(TEXTS)
    flagged = [t for t, kinds in zip(TEXTS, _eval_kinds(TEXTS)) if kinds]
    assert flagged == TEXTS[:8], "the first eight hold PII, the rest do not"
