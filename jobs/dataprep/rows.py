"""What every part of the data rules shares: a training row (:class:`Row`) and its text, what a rule returns
(:class:`RuleResult`), and the limits on lines, files and reports."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


#: Longer lines are reported, not parsed: one runaway line must not eat the pod's memory.
MAX_LINE_BYTES = 1_000_000
#: The most `launcher data check` reads of one file. The guide's datasets are under 10k rows
#: (a few MB); 1 GiB is a million 1 KB rows and still fits the check's memory. A bigger file,
#: or /dev/zero, is refused with this number instead of being read until memory runs out.
MAX_FILE_BYTES = 1 << 30
#: Rows outside the format (JSON objects in no accepted format or in two; with data.format set,
#: also rows in another format) are skipped and listed; beyond this share of the non-blank lines
#: they are an error: that is a wrong setting or two files concatenated, not a stray line, and
#: training on the rest would lose data with an "OK".
MAX_OUTSIDE_FORMAT_SHARE = 0.05
#: How many line numbers a report keeps per rule, and how many problems it lists.
REPORT_LINES = 200
REPORT_PROBLEMS = 1000


@dataclass(frozen=True)
class Row:
    """One valid training example; ``line`` is its 1-based line in the source file.

    A conversation (``messages`` or ShareGPT ``conversations``) keeps every turn in ``turns``
    as (role, content) pairs, roles system/user/assistant; its ``instruction`` is the last user
    turn and its ``output`` the last assistant turn (what evaluation compares against)."""

    line: int
    instruction: str
    output: str
    input: str = ""
    persona: str | None = None
    turns: tuple[tuple[str, str], ...] = ()
    #: the format the row was read in ("instruction", "messages", "sharegpt"); not part of its
    #: identity, so a row compares equal to the same example written in another format
    fmt: str = field(default="instruction", compare=False)


def assistant_texts(row: Row) -> list[str]:
    """What the model learns to write: the output, or every assistant turn of a conversation."""
    return [c for r, c in row.turns if r == "assistant"] if row.turns else [row.output]


def user_texts(row: Row) -> list[str]:
    return [c for r, c in row.turns if r != "assistant"] if row.turns else [row.instruction, row.input]


def with_assistant_texts(row: Row, texts: list[str]) -> Row:
    """``row`` with its assistant text(s) replaced, in order."""
    if not row.turns:
        return replace(row, output=texts[0])
    it = iter(texts)
    turns = tuple((r, next(it) if r == "assistant" else c) for r, c in row.turns)
    return replace(row, turns=turns, output=[c for r, c in turns if r == "assistant"][-1])


@dataclass
class RuleResult:
    """What one rule did: the rows it kept, the lines it touched, and how."""

    rows: list[Row]
    lines: list[int] = field(default_factory=list)
    action: str = "off"
    details: dict[str, Any] = field(default_factory=dict)

    def entry(self) -> dict[str, Any]:
        return {"count": len(self.lines), "lines": self.lines[:REPORT_LINES], "action": self.action,
                **self.details}
