"""The rules that weigh rows against each other: exact and near duplicates (dedup_exact, dedup_near), and the
conflicts check (the same question answered differently; questions one word apart with the same answer)."""
from __future__ import annotations

import re
from typing import Any

from jobs.dataprep.rows import REPORT_LINES, Row, RuleResult
from jobs.dataprep.rules import _normalise


_NUM_PERM = 128


# ---------------------------------------------------------------------------- rules: dedup

def _row_key(row: Row) -> str:
    parts = [f"{r}:{c}" for r, c in row.turns] if row.turns else [row.instruction, row.input, row.output]
    return "\x1f".join(_normalise(t) for t in parts)


def dedup_exact(rows: list[Row]) -> RuleResult:
    """Rule: keep the first of rows equal after normalising case, spaces and Unicode forms."""
    first: dict[str, int] = {}
    kept, lines, pairs = [], [], []
    for row in rows:
        key = _row_key(row)
        if key in first:
            lines.append(row.line)
            pairs.append([row.line, first[key]])
        else:
            first[key] = row.line
            kept.append(row)
    return RuleResult(kept, lines, "dropped", {"duplicate_of": pairs[:REPORT_LINES]})


def shingles(text: str, k: int = 3) -> set[str]:
    """Word k-shingles of normalised text; a text shorter than k words is one shingle."""
    words = re.findall(r"\w+", _normalise(text))
    if len(words) < k:
        return {" ".join(words)}
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _lsh_params(threshold: float) -> tuple[int, int]:
    """Bands × rows for the LSH index, chosen for recall: a pair at exactly ``threshold``
    becomes a candidate with probability >= 0.99. False candidates only cost an exact
    Jaccard check; datasketch's own optimum misses about half of the pairs at the threshold."""
    for r in range(_NUM_PERM // 2, 0, -1):
        b = _NUM_PERM // r
        if 1.0 - (1.0 - threshold ** r) ** b >= 0.99:
            return b, r
    return _NUM_PERM, 1


#: Words whose change rewords a row without changing what it says: articles, approximators
#: ("about 5 minutes" = "around 5 minutes"), fillers, and forms of be/do/can. Two rows whose other
#: words are the same, in order, are near-duplicates at any length. The list is small on purpose:
#: words that flip a meaning (not, no, on/off, in/out, to/from, before/after, must/may, numbers)
#: stay out, so "the WAN port" vs "the LAN port" or "turn it on" vs "off" remain different rows.
#: Tuned on tests/unit/data/near_duplicates.jsonl (precision and recall in test_near_duplicates.py).
FUNCTION_WORDS = frozenset("""
a an the about around approximately approx roughly nearly almost circa some
very really quite just simply basically actually please kindly also then so that which
it its this there here of
is are was were be been being am do does did can could will would
""".split())
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_TOKEN = re.compile(r"\w+")


def content_words(text: str) -> list[str]:
    """The words of ``text`` that carry its meaning: normalised (NFKC, case-folded, number words
    as digits) and without :data:`FUNCTION_WORDS`."""
    words = (_NUMBER_WORDS.get(w, w) for w in _TOKEN.findall(_normalise(text)))
    return [w for w in words if w not in FUNCTION_WORDS]


def _texts_of(row: Row) -> list[str]:
    """The row's texts, question then answer(s), the same for one example in any format."""
    return [c for _, c in row.turns] if row.turns else [f"{row.instruction} {row.input}", row.output]


def content_key(texts: list[str]) -> str:
    """Texts compared by their content words, each text apart (a word moved from the question
    to the answer makes a different row). '' when no text has a content word."""
    parts = [" ".join(content_words(t)) for t in texts]
    return "\x1f".join(parts) if any(parts) else ""


def dedup_near(rows: list[Row], threshold: float, seed: int = 42) -> RuleResult:
    """Rule: drop a row that is a near-duplicate of an earlier kept row; it is one when either

    * their content words (:func:`content_words`) are the same, in order, so they differ only
      in function words ("about"/"around", "a"/"the"): a one-word rewording of a row of any
      length, which word shingles miss in rows under ~40 words; or
    * the Jaccard similarity of their word 3-shingles is at least ``threshold`` (paraphrases and
      edits of longer rows). MinHash LSH finds the candidates, the exact Jaccard decides.

    At ``threshold`` 1.0 only identical shingle sets count. Deterministic for a seed and order.
    Cost: O(total words) for the content keys (one dict lookup per row) plus MinHash's
    O(words x 128 permutations) per row and an LSH query per row, so linear in the file.
    """
    from datasketch import MinHash, MinHashLSH

    b, r = _lsh_params(float(threshold))
    lsh = MinHashLSH(num_perm=_NUM_PERM, params=(b, r))
    template = MinHash(num_perm=_NUM_PERM, seed=seed % 2**32)  # the spec's seed has no upper bound; numpy's has
    kept, lines, pairs = [], [], []
    sets: dict[str, tuple[set[str], int]] = {}
    by_content: dict[str, int] = {}
    reworded = 0
    for i, row in enumerate(rows):
        texts = _texts_of(row)
        ckey = content_key(texts) if threshold < 1.0 else ""
        match = by_content.get(ckey) if ckey else None
        if match is not None:
            reworded += 1
            lines.append(row.line)
            pairs.append([row.line, match])
            continue
        sh = shingles(" ".join(c for _, c in row.turns) if row.turns else
                      f"{row.instruction} {row.input} {row.output}")
        mh = template.copy()  # shares the permutations: cheaper than a new MinHash per row
        mh.update_batch([s.encode("utf-8") for s in sh])
        for key in sorted(lsh.query(mh), key=lambda k: sets[k][1]):
            if jaccard(sh, sets[key][0]) >= threshold:
                match = sets[key][1]
                break
        if match is not None:
            lines.append(row.line)
            pairs.append([row.line, match])
            continue
        key = str(i)
        lsh.insert(key, mh)
        sets[key] = (sh, row.line)
        if ckey:
            by_content[ckey] = row.line
        kept.append(row)
    return RuleResult(kept, lines, "dropped", {"threshold": threshold, "reworded": reworded,
                                               "duplicate_of": pairs[:REPORT_LINES]})


# ---------------------------------------------------------------------------- check: conflicts

def _prompt_and_answer(row: Row) -> tuple[list[str], str]:
    """What a row asks (every text before its last answer) and its last answer."""
    if not row.turns:
        return [f"{row.instruction} {row.input}"], row.output
    last = max(i for i, (r, _) in enumerate(row.turns) if r == "assistant")
    return [c for _, c in row.turns[:last]], row.turns[last][1]


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


_NEGATIONS = frozenset("not no never t none nothing nobody neither nor without cannot".split())


def _contradicts(akey: str, bkey: str) -> bool:
    """Two answers' content words say different things: each has a word the other lacks
    ("blue" vs "yellow"), or one adds a negation ("supports" vs "does not support"). One answer
    that only adds words to the other ("... Thanks.") says more, not something else."""
    a, b = set(akey.split()), set(bkey.split())
    return bool((a - b and b - a) or (a ^ b) & _NEGATIONS)


def find_conflicts(rows: list[Row]) -> RuleResult:
    """Check (report only; keeps every row): rows that ask the same question (same content words,
    :func:`content_key`) but answer it differently, e.g. the WAN port "blue" vs "yellow". Training
    on both teaches the model to pick one at random, and near-dedup would keep whichever came
    first, so a person must choose. Answers that differ only in function words are rewordings, and
    an answer that only adds to another elaborates: neither is a conflict. Synonyms ("supplied"
    vs "included") are reported too: telling them from "blue" vs "yellow" takes meaning, and a
    warning that keeps both rows costs a look. O(total words): one dict of prompts."""
    groups: dict[str, list[tuple[Row, str, str]]] = {}
    for row in rows:
        prompt, answer = _prompt_and_answer(row)
        pkey = content_key(prompt)
        if pkey:
            groups.setdefault(pkey, []).append((row, content_key([answer]), answer))
    conflicts, lines = [], []
    for members in groups.values():
        if len({akey for _, akey, _ in members}) < 2:
            continue
        first = members[0]
        other = next((m for m in members[1:] if _contradicts(first[1], m[1])), None)
        if other is None:
            continue
        a, b = set(first[1].split()), set(other[1].split())
        only_a = [w for w in first[1].split() if w not in b][:5]
        only_b = [w for w in other[1].split() if w not in a][:5]
        group_lines = [m[0].line for m in members]
        lines.extend(group_lines)
        conflicts.append({"lines": group_lines, "prompt": _short(first[0].instruction),
                          "answers": {str(first[0].line): _short(first[2]), str(other[0].line): _short(other[2])},
                          "differ": [" ".join(only_a), " ".join(only_b)]})
    rewordings = _reworded_questions(rows)
    return RuleResult(list(rows), sorted(lines), "flagged", {"conflicts": conflicts[:REPORT_LINES],
                                                             "groups": len(conflicts),
                                                             "reworded_questions": rewordings[:REPORT_LINES],
                                                             "reworded_count": len(rewordings)})


#: Questions longer than this (in content words) are left to the shingle rule, which sees their edits.
_REWORDING_MAX_WORDS = 64


def _reworded_questions(rows: list[Row]) -> list[dict[str, Any]]:
    """Pairs of rows with the same answer whose questions differ by one content word (one substituted, added
    or removed: "reset" vs "restart"). Reported, never dropped: it may be a rewording (teaches nothing new)
    or two questions that share an answer (the X1 and the X2), and only a person can tell. Linear: each
    question of n words gives n keys with one word blanked and n with one word left out."""
    blanked: dict[tuple[object, ...], int] = {}
    shortened: dict[tuple[object, ...], int] = {}
    whole: dict[tuple[object, ...], int] = {}
    found: list[dict[str, Any]] = []
    words_of: dict[int, list[str]] = {}
    asked: dict[int, str] = {}
    for row in rows:
        prompt, answer = _prompt_and_answer(row)
        akey = content_key([answer])
        words = content_words(" ".join(prompt))
        if not akey or not words or len(words) > _REWORDING_MAX_WORDS:
            continue
        words_of[row.line] = words
        asked[row.line] = " ".join(prompt).strip()
        match = None
        for j in range(len(words)):
            rest = tuple(words[:j]) + tuple(words[j + 1:])
            match = match or blanked.get((akey, j, rest)) or whole.get((akey, *rest))
        match = match or shortened.get((akey, *words))
        if match is not None and words_of[match] != words:
            mine, theirs = words, words_of[match]
            found.append({"lines": [match, row.line], "prompts": [_short(asked[match]), _short(asked[row.line])],
                          "differ": [" ".join(w for w in theirs if w not in mine),
                                     " ".join(w for w in mine if w not in theirs)]})
            continue
        for j in range(len(words)):
            rest = tuple(words[:j]) + tuple(words[j + 1:])
            blanked.setdefault((akey, j, rest), row.line)
            shortened.setdefault((akey, *rest), row.line)
        whole.setdefault((akey, *words), row.line)
    return found
