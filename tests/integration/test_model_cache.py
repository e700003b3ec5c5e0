"""The node's base-model cache (jobs.model_cache) against the real MinIO: what each fetch downloads is counted
from the store's own responses (every GetObject's Content-Length), not from the cache's word.

A "model" here is a folder of a few MiB (a config, a random safetensors-named file, a tokenizer file): the cache
never looks inside the files, and small folders keep these tests to seconds. Each test has its own cache folder.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cache_fetch import fetch

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("cache_fetch.py")
MiB = 2**20


@pytest.fixture(autouse=True)
def _a_job_per_test():
    """Each test ends as its jobs would: their processes exit, and with them their use of the cache's entries."""
    from jobs.model_cache import release_uses

    yield
    release_uses()


def model_folder(tmp_path: Path, name: str, mib: int = 2) -> Path:
    d = tmp_path / "src" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "name": name}))
    (d / "model.safetensors").write_bytes(os.urandom(mib * MiB))
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "name": name}))
    return d


def upload(s3_client, s3_prefix: str, folder: Path) -> str:
    bucket, _, prefix = s3_prefix[5:].partition("/")
    for p in sorted(folder.iterdir()):
        s3_client.upload_file(str(p), bucket, f"{prefix}/{folder.name}/{p.name}")
    return f"{s3_prefix}/{folder.name}/"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def entries(root: Path) -> set[str]:
    return {d.name for d in (root / "entries").iterdir()}


def test_the_second_job_reads_the_cache_and_downloads_nothing(s3_env, s3_client, s3_prefix, tmp_path):
    from jobs.digest import hash_dir

    src = model_folder(tmp_path, "base")
    uri, total, root = upload(s3_client, s3_prefix, src), folder_bytes(src), tmp_path / "cache"
    root.mkdir()
    first, sent1 = fetch(uri, root, tmp_path / "job1")
    second, sent2 = fetch(uri, root, tmp_path / "job2")
    assert (first.cache, first.fetched_bytes, sent1) == ("miss", total, total)
    assert (second.cache, second.fetched_bytes, sent2) == ("hit", 0, 0), "the second job fetched base-model bytes"
    assert second.path == first.path and second.path.is_relative_to(root) and not (tmp_path / "job2").exists()
    assert first.sha256 == second.sha256 == hash_dir(src), "the folder hash the metadata records, as without a cache"
    assert (second.path / "model.safetensors").stat().st_mode & 0o222 == 0, "the job reads the entry, never writes it"

    # A changed model is another entry (its listing's ETag and size changed), fetched whole.
    (src / "model.safetensors").write_bytes(os.urandom(3 * MiB))
    upload(s3_client, s3_prefix, src)
    third, sent3 = fetch(uri, root, tmp_path / "job3")
    assert (third.cache, sent3) == ("miss", folder_bytes(src)) and third.path != first.path
    assert third.sha256 == hash_dir(src) != first.sha256 and len(entries(root)) == 2


def test_two_jobs_racing_on_one_node_download_the_model_once(s3_env, s3_client, s3_prefix, tmp_path):
    src = model_folder(tmp_path, "base")
    uri, total, root, go = upload(s3_client, s3_prefix, src), folder_bytes(src), tmp_path / "cache", tmp_path / "go"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HELPER.parent}"}
    # Whichever job takes the download, its first 1.5 s are a slow link: the other surely finds it downloading.
    jobs = [subprocess.Popen([sys.executable, str(HELPER), uri, str(root), str(tmp_path / f"job{i}"), str(2**30),
                              "--ready", str(tmp_path / f"ready{i}"), "--go", str(go), "--slow", "1.5"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in (1, 2)) and time.monotonic() < deadline:
        time.sleep(0.05)  # both jobs imported what they need: they start level
    go.touch()
    outs = [j.communicate(timeout=120) for j in jobs]
    assert all(j.returncode == 0 for j in jobs), [err for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["cache"] for r in results) == ["hit", "miss"], results
    assert sum(r["sent"] for r in results) == total, f"the store sent the model more than once: {results}"
    waited = outs[[r["cache"] for r in results].index("hit")][1]
    assert "waiting for another job's download of it into the node's model cache" in waited, waited
    assert results[0]["path"] == results[1]["path"] and results[0]["sha256"] == results[1]["sha256"]
    assert len(entries(root)) == 1 and not any((root / "tmp").iterdir())


@pytest.mark.parametrize("damage, said", [
    (lambda p: p.write_bytes(b"\0" + p.read_bytes()[1:]), "model.safetensors: sha256"),  # same size, other bytes
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "truncated"),
])
def test_a_damaged_entry_is_dropped_and_fetched_again(s3_env, s3_client, s3_prefix, tmp_path, caplog, damage, said):
    from jobs.digest import hash_dir

    src = model_folder(tmp_path, "base")
    uri, total, root = upload(s3_client, s3_prefix, src), folder_bytes(src), tmp_path / "cache"
    root.mkdir()
    first, _ = fetch(uri, root, tmp_path / "job1")
    from jobs.model_cache import release_uses

    release_uses()  # the first job ended
    victim = first.path / "model.safetensors"
    victim.chmod(0o644)
    damage(victim)
    with caplog.at_level(logging.INFO, logger="jobs"):
        again, sent = fetch(uri, root, tmp_path / "job2")
    assert (again.cache, again.fetched_bytes, sent) == ("miss", total, total)
    assert again.sha256 == hash_dir(again.path) == hash_dir(src), "the refetched entry is the model again"
    assert "is damaged (" in caplog.text and said in caplog.text, caplog.text
    assert "dropping it and downloading it again" in caplog.text, caplog.text


def test_least_recently_used_entries_are_evicted_to_stay_within_the_bound(s3_env, s3_client, s3_prefix, tmp_path,
                                                                           caplog):
    from jobs.model_cache import NodeCache, CacheConfig, release_uses

    uris = {n: upload(s3_client, s3_prefix, model_folder(tmp_path, n)) for n in ("a", "b", "c")}
    size = folder_bytes(tmp_path / "src" / "a")
    root, bound = tmp_path / "cache", int(2.5 * size)  # room for two models
    root.mkdir()
    key = {}
    for n in ("a", "b", "a"):  # a, then b, then a again: b is now the least recently used
        got, _ = fetch(uris[n], root, tmp_path / f"job-{n}", bound)
        key[n] = got.path.parent.name
        release_uses()
        time.sleep(0.05)  # distinct last-use times
    with caplog.at_level(logging.INFO, logger="jobs"):
        c, sent = fetch(uris["c"], root, tmp_path / "job-c", bound)
    assert (c.cache, sent) == ("miss", size)
    assert entries(root) == {key["a"], c.path.parent.name}, "b, the least recently used, went"
    assert f"evicted {key['b'][:12]}" in caplog.text
    used = sum(n for _, _, n in NodeCache(CacheConfig(root, bound)).entries())
    assert used <= bound, (used, bound)


def test_an_entry_in_use_is_never_evicted(s3_env, s3_client, s3_prefix, tmp_path, caplog):
    from jobs.digest import hash_dir
    from jobs.model_cache import release_uses

    a_src, b_src = model_folder(tmp_path, "a"), model_folder(tmp_path, "b")
    a_uri, b_uri = upload(s3_client, s3_prefix, a_src), upload(s3_client, s3_prefix, b_src)
    size, root = folder_bytes(a_src), tmp_path / "cache"
    root.mkdir()
    bound = int(1.5 * size)  # room for one model
    a, _ = fetch(a_uri, root, tmp_path / "job-a", bound)  # job a is still running: its entry is in use
    with caplog.at_level(logging.WARNING, logger="jobs"):
        b, sent = fetch(b_uri, root, tmp_path / "job-b", bound)
    assert (b.cache, sent) == ("off", size) and b.path == tmp_path / "job-b", "b went to its own scratch"
    assert "its other entries are in use" in b.note and "model_cache_max_gib" in b.note, b.note
    assert "downloading it into this job's scratch instead" in caplog.text
    assert hash_dir(a.path) == a.sha256 and entries(root) == {a.path.parent.name}, "a is untouched"
    release_uses()  # job a ended: now b takes its place
    b2, sent2 = fetch(b_uri, root, tmp_path / "job-b2", bound)
    assert (b2.cache, sent2) == ("miss", size) and entries(root) == {b2.path.parent.name}


def test_a_model_larger_than_the_bound_is_downloaded_to_scratch(s3_env, s3_client, s3_prefix, tmp_path):
    src = model_folder(tmp_path, "big")
    uri, total, root = upload(s3_client, s3_prefix, src), folder_bytes(src), tmp_path / "cache"
    root.mkdir()
    got, sent = fetch(uri, root, tmp_path / "job", total // 2)
    assert (got.cache, got.fetched_bytes, sent, got.path) == ("off", total, total, tmp_path / "job")
    assert "larger than the node cache's bound" in got.note and "model_cache_max_gib" in got.note


def test_an_unwritable_cache_falls_back_to_downloading_with_a_warning_naming_the_setting(
        s3_env, s3_client, s3_prefix, tmp_path, caplog):
    src = model_folder(tmp_path, "base", mib=1)
    uri, total, root = upload(s3_client, s3_prefix, src), folder_bytes(src), tmp_path / "cache"
    root.mkdir()
    # What a pod of uid 10001 meets in a folder the kubelet made (root's, 0755); as root here, the immutable flag
    # refuses writes the way the permissions refuse them to the pod.
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(root)], check=True)
    else:
        root.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="jobs"):
            got, sent = fetch(uri, root, tmp_path / "job", 2**30)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(root)], check=True)
        root.chmod(0o755)
    assert (got.cache, got.fetched_bytes, sent, got.path) == ("off", total, total, tmp_path / "job")
    assert "is not writable" in caplog.text and "model_cache_host_path" in caplog.text, caplog.text
    assert got.record()["note"] == got.note and "not writable" in got.note
    missing, _ = fetch(uri, tmp_path / "no-such-folder", tmp_path / "job2", 2**30)
    assert missing.cache == "off" and "is not a folder in this pod" in missing.note
