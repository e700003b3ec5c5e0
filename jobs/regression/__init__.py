"""The general-ability regression set: short general prompts with reference answers, written for this project and
taken from no user's data (general knowledge, arithmetic in words, short instructions). The job measures the loss
of each reference answer given its prompt on the base and with the adapter (``eval_report.json`` → ``regression``);
the promotion gate compares it per prompt (docs/promotion.md). Fixed and committed: changing it makes versions
measured before and after incomparable on it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files

GENERAL = "general.jsonl"


@dataclass(frozen=True)
class RegressionPrompt:
    """One prompt and its reference answer; shaped like a single-turn training row (``jobs.dataprep.Row``), so the
    trainer encodes it as it encodes a training example (chat template, loss on the answer only)."""

    instruction: str
    output: str
    line: int  # 1-based, in general.jsonl
    input: str = ""
    turns: tuple[tuple[str, str], ...] = ()


def general_set_sha256() -> str:
    """The sha256 of the committed set's file: two versions' regression losses pair up only when it is equal."""
    return hashlib.sha256(files(__name__).joinpath(GENERAL).read_bytes()).hexdigest()


def general_set() -> list[RegressionPrompt]:
    """The committed set (package data ``jobs/regression/general.jsonl``), in its file's order."""
    text = files(__name__).joinpath(GENERAL).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [RegressionPrompt(instruction=r["prompt"], output=r["reference"], line=n) for n, r in enumerate(rows, 1)]
