"""Publishers racing for one run against the real MinIO: distinct, complete versions and a
``latest`` that only moves forward (two Jobs of one run name with different ``--set`` overrides
publish under the same prefix).

Before conditional writes, three concurrent publishers both claimed v2 and left it holding a mix
of two folders *with* a completion marker.
"""
from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.s3

PUBLISHERS = 6


def _folder(tmp_path, i: int):
    d = tmp_path / f"pub-{i}"
    (d / "adapter").mkdir(parents=True)
    # distinct content, several files, one large enough to take a while to upload
    (d / "adapter" / "adapter_model.safetensors").write_bytes(bytes([i]) * (3 * 2**20 + i))
    (d / "metadata.json").write_text(f'{{"publisher": {i}}}')
    (d / "eval_report.md").write_text(f"publisher {i}\n" * 100)
    return d


def test_concurrent_publishers_get_distinct_complete_versions_and_latest_never_goes_back(
        tmp_path, s3_env, s3_prefix):
    from jobs.publish import existing_versions, publish_version, verify_version
    from jobs.storage import open_store

    store, prefix = open_store(s3_prefix)
    run = f"{prefix}/race"
    folders = [_folder(tmp_path, i) for i in range(PUBLISHERS)]
    start = threading.Barrier(PUBLISHERS + 1)
    got: dict[int, str] = {}
    errors: list[BaseException] = []
    seen_latest: list[int] = []
    done = threading.Event()

    def publish(i):
        own, _ = open_store(s3_prefix)  # one client each, as separate Jobs would have
        start.wait()
        try:
            got[i] = publish_version(own, run, folders[i])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def watch():
        watcher, _ = open_store(s3_prefix)
        start.wait()
        while not done.is_set():
            data, _tag = watcher.get_versioned(f"{run}/latest")
            if data:
                seen_latest.append(int(data.decode().strip()[1:]))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(PUBLISHERS)]
    w = threading.Thread(target=watch)
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    done.set()
    w.join(timeout=30)

    assert not errors, errors
    assert sorted(got.values(), key=lambda v: int(v[1:])) == [f"v{n}" for n in range(1, PUBLISHERS + 1)], got
    assert existing_versions(store, run) == {n: True for n in range(1, PUBLISHERS + 1)}
    for i, version in got.items():
        assert verify_version(store, run, version) == [], f"{version} (publisher {i}) is whole and its own"
        assert store.get_bytes(f"{run}/{version}/metadata.json") == f'{{"publisher": {i}}}'.encode()
    assert store.get_bytes(f"{run}/latest").decode().strip() == f"v{PUBLISHERS}"
    assert seen_latest == sorted(seen_latest), f"latest moved backwards: {seen_latest}"


def test_prune_removes_only_old_incomplete_versions_and_is_a_dry_run_by_default(tmp_path, stack, s3_env, s3_prefix):
    """v1 complete, v2 abandoned half-way (older than the threshold), v3 being published now (it writes a part
    before each prune): `launcher artifacts prune --older-than N` lists v2 only, deletes nothing without --yes,
    and with --yes deletes v2 alone. N is at least 8 s and at least 4 times what a cold prune took here (v3's
    newest part is one launcher start-up old when it is judged): with fixed margins of 3 s and 2 s the launcher
    once took longer than 2 s to start, and the publish in progress looked abandoned too."""
    import json
    import math
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from jobs.publish import existing_versions, publish_version
    from jobs.storage import open_store

    repo = Path(__file__).resolve().parents[2]
    store, prefix = open_store(s3_prefix)
    run = f"{prefix}/pruned"
    publish_version(store, run, _folder(tmp_path, 1))
    env = {**os.environ, "PYTHONPATH": str(repo), "LAUNCHER_S3_ENDPOINT": stack.s3_endpoint}
    t0 = time.monotonic()
    text = subprocess.run([sys.executable, "-m", "launcher", "artifacts", "prune", "pruned", "--output", s3_prefix],
                          env=env, cwd=repo, capture_output=True, text=True, timeout=120)
    cold = time.monotonic() - t0
    assert "nothing to prune" in text.stdout, text.stdout + text.stderr
    # S3's timestamps are whole seconds (+1 s); the threshold scales with this machine's start-up
    older = max(8, math.ceil(4 * cold) + 1)
    store.put_bytes(f"{run}/v2/_CLAIM", b"x")
    store.put_bytes(f"{run}/v2/adapter/adapter_model.safetensors", b"half" * 1000)
    time.sleep(older + 2)
    store.put_bytes(f"{run}/v3/_CLAIM", b"y")  # a publish in progress
    parts = iter(range(100))

    def prune(*extra, json_out=True):
        store.put_bytes(f"{run}/v3/adapter/part-{next(parts)}", b"z")  # the publish in progress goes on
        return subprocess.run([sys.executable, "-m", "launcher", "artifacts", "prune", "pruned", "--output", s3_prefix,
                               "--older-than", f"{older}s", *(["-o", "json"] if json_out else []), *extra], env=env,
                              cwd=repo, capture_output=True, text=True, timeout=120)

    dry = prune()
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert [o["name"] for o in report["orphans"]] == ["v2"] and not report["orphans"][0]["removed"]
    assert existing_versions(store, run) == {1: True, 2: False, 3: False}, "a dry run deletes nothing"
    applied = prune("--yes")
    assert applied.returncode == 0, applied.stderr
    assert [o["name"] for o in json.loads(applied.stdout)["orphans"]] == ["v2"]
    assert existing_versions(store, run) == {1: True, 3: False}, "only the abandoned v2 went"
    text = prune(json_out=False)
    assert "nothing to prune" in text.stdout, text.stdout + text.stderr
