"""The balance rule: cap each persona's share of the rows."""
from __future__ import annotations

import random

from jobs.dataprep.rows import Row, RuleResult


# ---------------------------------------------------------------------------- rule: balance

NO_PERSONA = "(none)"


def _group_cap(sizes: list[int], share: float) -> int:
    """The largest per-group cap c with c <= share * sum(min(n, c)): keeps the most rows."""
    for c in range(max(sizes), 0, -1):
        if c <= share * sum(min(n, c) for n in sizes) + 1e-9:
            return c
    return min(sizes)


def balance_groups(rows: list[Row], max_share: float, seed: int = 42) -> RuleResult:
    """Rule: cap each persona's share of the rows that name a persona at ``max_share``.

    Rows without a persona are no persona and are kept as they are: a dataset with
    a few tagged rows must not shrink to a few rows. With fewer than two named
    personas there is nothing to balance. When ``max_share`` is below 1/groups it
    cannot be met and 1/groups is used. Which rows of a large group stay is drawn
    with ``seed``; order is kept.
    """
    groups: dict[str, list[int]] = {}
    untagged = 0
    for i, row in enumerate(rows):
        if row.persona:
            groups.setdefault(row.persona, []).append(i)
        else:
            untagged += 1
    summary_all = {g: [len(v), len(v)] for g, v in sorted(groups.items())}
    if untagged:
        summary_all[NO_PERSONA] = [untagged, untagged]
    if len(groups) < 2:
        return RuleResult(list(rows), [], "skipped (fewer than two personas)", {"groups": summary_all})
    share = max(max_share, 1.0 / len(groups))
    cap = _group_cap([len(v) for v in groups.values()], share)
    rng = random.Random(seed)
    drop: set[int] = set()
    for name in sorted(groups):
        members = groups[name]
        if len(members) > cap:
            drop.update(set(members) - set(rng.sample(members, cap)))
    kept = [r for i, r in enumerate(rows) if i not in drop]
    lines = [r.line for i, r in enumerate(rows) if i in drop]
    summary = {g: [len(v), sum(i not in drop for i in v)] for g, v in sorted(groups.items())}
    if untagged:
        summary[NO_PERSONA] = [untagged, untagged]
    return RuleResult(kept, lines, "dropped", {"max_group_share": round(share, 4), "groups": summary})
