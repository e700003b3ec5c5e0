"""jobs.storage.TransferProgress: long transfers say bytes done, rate and ETA at a bounded rate."""
from __future__ import annotations

import logging
import os

import pytest

from jobs.storage import LocalStore, TransferProgress, download_prefix, upload_dir

pytestmark = pytest.mark.unit


def _tree(root, sizes):
    for i, n in enumerate(sizes):
        p = root / f"d{i % 2}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(n))
    return sum(sizes)


def test_every_byte_is_counted_and_the_bar_sees_each_change(tmp_path):
    total = _tree(tmp_path / "src", [1000, 250_000, 3, 70_000])
    store = LocalStore(str(tmp_path / "bucket"))
    seen = []
    up = TransferProgress("uploading v1", total, on_update=lambda done, tot: seen.append((done, tot)))
    upload_dir(store, tmp_path / "src", "run/v1", progress=up)
    assert up.done == total and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen), "never goes backwards here"

    down = TransferProgress("downloading v1", total)
    download_prefix(store, "run/v1", tmp_path / "out", progress=down)
    assert down.done == total


def test_lines_are_bounded_by_the_interval(tmp_path, caplog):
    log = logging.getLogger("test.transfer")
    fast = TransferProgress("downloading the base model", 100 * 2**20, interval=3600, logger=log)
    with caplog.at_level(logging.INFO, logger="test.transfer"):
        for _ in range(100):
            fast(2**20)
        fast.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("downloading the base model: 100.0 MiB in "), lines

    caplog.clear()
    every = TransferProgress("uploading v2", 4 * 2**30, interval=0, logger=log)
    with caplog.at_level(logging.INFO, logger="test.transfer"):
        every(2**30)
        every(2**30)
    first, second = [r.getMessage() for r in caplog.records]
    assert first.startswith("uploading v2: 1.0 GiB of 4.0 GiB (25%), ") and "/s, ETA " in first, first
    assert second.startswith("uploading v2: 2.0 GiB of 4.0 GiB (50%), "), second


def test_a_resent_part_takes_its_bytes_back():
    p = TransferProgress("uploading v3", 10, interval=3600)
    p(8)
    p(-8)  # boto3's upload callback after a part failed
    p(10)
    assert p.done == 10
