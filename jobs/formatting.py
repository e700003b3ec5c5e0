"""How numbers read in logs and in `launcher` output: sizes, counts and durations, one way each.

The job's log lines (transfers, the compile cache, the merge), `launcher status` (progress, cost, stages)
and the launcher's tables word a number alike because they all call these.
"""
from __future__ import annotations

_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def size(n: float) -> str:
    """Bytes in binary units with one decimal: "512 B", "4.2 KiB", "512.0 MiB", "16.0 GiB"."""
    for unit, scale in _UNITS:
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def count(n: float) -> str:
    """A rate or a count in thousands past 1000: "950", "14.0k"."""
    return f"{n / 1000:.1f}k" if n >= 1000 else f"{n:.0f}"


def duration(seconds: float) -> str:
    """Whole seconds, two units at most: "12s", "4m05s", "1h02m"."""
    total = int(round(seconds))
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
