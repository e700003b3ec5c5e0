"""Personal data in text: emails, phone numbers, payment cards and ID numbers, found one way.

The data rules (``data.pii`` in :mod:`jobs.dataprep`: redact or drop training rows) and the eval (generations
that leak PII, :mod:`jobs.trainer.evaluate`) both ask this module, so a string is PII to both or to neither.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable

# Every pattern below starts only where the previous character cannot continue it, and
# never puts two unbounded runs of the same characters side by side: a 1 MB line
# must cost linear time, not quadratic.
_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_SSN = re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])")
_PHONE = re.compile(
    r"(?<![\w+.])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)|\d{1,4})(?:[ .-]?\d{2,4}){1,4}"  # international: +44 20 7946 0958
    r"|(?:1[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-]?)\d{3}[ .-]?\d{4}"  # NANP: (555) 123-4567, 555.123.4567
    r")(?![\w]|\.\d)")
_ID_KEYWORD = re.compile(
    r"(?P<key>\b(?:ssn|social security(?: number)?|passport|driver['’]?s? licen[cs]e|licen[cs]e|national id|"
    r"tax id|tin|iban|account|acct|customer|member|employee|patient|policy|id)"
    r"(?:\s*(?:number|no\.?|num|#))?\s*(?:[:#]\s*)?)(?P<value>[A-Z0-9][A-Z0-9-]{4,})\b", re.IGNORECASE)
_LONG_DIGITS = re.compile(r"(?<![\w-])\d{9,}(?![\w-])")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def find_pii(text: str) -> tuple[str, Counter[str]]:
    """Return ``text`` with PII replaced by [EMAIL], [CARD], [PHONE], [ID], and what was found
    (``{"EMAIL": 1, ...}``).

    Cards count only when the Luhn check passes; a long digit run that is not a card
    or a phone is a generic ID. Order matters: emails hide digits, cards are longer
    than phones.
    """
    found: Counter[str] = Counter()

    def sub(pattern: re.Pattern[str], token: str, text: str,
            keep: Callable[[re.Match[str]], bool] | None = None) -> str:
        def repl(m: re.Match[str]) -> str:
            if keep is not None and not keep(m):
                return m.group(0)
            found[token.strip("[]")] += 1
            return token
        return pattern.sub(repl, text)

    def is_card(m: re.Match[str]) -> bool:
        digits = re.sub(r"\D", "", m.group(0))
        return 13 <= len(digits) <= 19 and luhn_ok(digits)

    def id_value(m: re.Match[str]) -> str:
        value = m.group("value")
        if sum(c.isdigit() for c in value) < 5:
            return m.group(0)
        found["ID"] += 1
        return m.group("key") + "[ID]"

    text = sub(_EMAIL, "[EMAIL]", text)
    text = sub(_CARD, "[CARD]", text, is_card)
    text = sub(_SSN, "[ID]", text)
    text = sub(_PHONE, "[PHONE]", text, lambda m: 7 <= sum(c.isdigit() for c in m.group(0)) <= 15)
    text = _ID_KEYWORD.sub(id_value, text)
    text = sub(_LONG_DIGITS, "[ID]", text)
    return text, found


def pii_kinds(text: str) -> list[str]:
    """The kinds of PII in ``text``, sorted and lower-case (``["email", "phone"]``); empty when there is none."""
    return sorted(kind.lower() for kind in find_pii(text)[1])
