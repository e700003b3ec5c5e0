"""Versions are immutable and visible only when complete (local-folder store)."""
import json

import pytest

from jobs.publish import existing_versions, publish_version, verify_version
from jobs.storage import LocalStore

pytestmark = pytest.mark.unit


def _artifacts(tmp_path, text="weights"):
    d = tmp_path / "out"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_text(text)
    (d / "metadata.json").write_text("{}")
    return d


def test_publish_writes_manifest_marker_and_latest(tmp_path):
    store = LocalStore(str(tmp_path / "bucket"))
    v = publish_version(store, "runs/demo", _artifacts(tmp_path))
    assert v == "v1"
    assert store.get_bytes("runs/demo/latest").decode().strip() == "v1"
    manifest = json.loads(store.get_bytes("runs/demo/v1/manifest.json"))
    assert set(manifest["files"]) == {"adapter/adapter_model.safetensors", "metadata.json"}
    assert verify_version(store, "runs/demo", "v1") == []


def test_second_publish_is_a_new_version_and_never_overwrites(tmp_path):
    store = LocalStore(str(tmp_path / "bucket"))
    publish_version(store, "r", _artifacts(tmp_path, "one"))
    import shutil
    shutil.rmtree(tmp_path / "out")
    assert publish_version(store, "r", _artifacts(tmp_path, "two")) == "v2"
    assert store.get_bytes("r/v1/adapter/adapter_model.safetensors") == b"one"
    assert existing_versions(store, "r") == {1: True, 2: True}


def test_incomplete_version_is_skipped_not_reused(tmp_path):
    store = LocalStore(str(tmp_path / "bucket"))
    store.put_bytes("r/v1/adapter/adapter_model.safetensors", b"partial")  # a crashed publish
    assert existing_versions(store, "r") == {1: False}
    assert verify_version(store, "r", "v1") == ["v1 has no _COMPLETE marker: incomplete"]
    assert publish_version(store, "r", _artifacts(tmp_path)) == "v2"
    assert store.get_bytes("r/v1/adapter/adapter_model.safetensors") == b"partial"


def test_tampered_file_is_caught_by_verify(tmp_path):
    store = LocalStore(str(tmp_path / "bucket"))
    publish_version(store, "r", _artifacts(tmp_path))
    store.put_bytes("r/v1/metadata.json", b'{"evil": 1}')
    assert verify_version(store, "r", "v1") == ["metadata.json: sha256 mismatch"]


def test_local_store_refuses_keys_that_escape_its_root(tmp_path):
    from jobs.errors import StorageError
    store = LocalStore(str(tmp_path / "bucket"))
    with pytest.raises(StorageError, match="escapes"):
        store.put_bytes("../outside", b"x")


def test_racing_publishers_on_a_folder_store_get_distinct_versions(tmp_path):
    import threading

    from jobs.publish import existing_versions, publish_version, verify_version
    from jobs.storage import LocalStore

    store = LocalStore(str(tmp_path / "store"))
    folders = []
    for i in range(5):
        d = tmp_path / f"pub-{i}"
        d.mkdir()
        (d / "metadata.json").write_text(f'{{"publisher": {i}}}')
        (d / "weights.bin").write_bytes(bytes([i]) * 200_000)
        folders.append(d)
    start = threading.Barrier(5)
    got = {}

    def publish(i):
        start.wait()
        got[i] = publish_version(LocalStore(str(tmp_path / "store")), "run", folders[i])

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got.values()) == ["v1", "v2", "v3", "v4", "v5"]
    assert existing_versions(store, "run") == {n: True for n in range(1, 6)}
    assert all(verify_version(store, "run", v) == [] for v in got.values())
    assert store.get_bytes("run/latest").decode().strip() == "v5"


@pytest.mark.parametrize("rel", ["../escape", "a/../../b", "/etc/passwd", "a//b", "./x", "a/..", "a\\..\\b", ""])
def test_keys_that_would_leave_the_download_folder_are_refused(rel):
    from jobs.errors import StorageError
    from jobs.storage import safe_relative_path

    with pytest.raises(StorageError) as err:
        safe_relative_path(rel, "s3://bucket/prefix/x")
    assert "unsafe path" in str(err.value) and "s3://bucket/prefix/x" in str(err.value)


def test_ordinary_keys_map_to_relative_paths():
    from pathlib import Path

    from jobs.storage import safe_relative_path

    assert safe_relative_path("adapter/adapter_model.safetensors", "x") == Path("adapter/adapter_model.safetensors")
    assert safe_relative_path("model-00001-of-00004.safetensors", "x") == Path("model-00001-of-00004.safetensors")


def test_every_reader_opens_a_version_one_way_and_keeps_its_own_words_for_a_missing_marker(tmp_path):
    """open_version is how verify_version, fetch_version_files, jobs.promotion.read_evidence and the launcher's
    download list a version and read its marker and manifest; each keeps its own message for a half-written one."""
    import hashlib

    from jobs.errors import StorageError
    from jobs.promotion import read_evidence
    from jobs.publish import IncompleteVersion, fetch_version_files, open_version

    store = LocalStore(str(tmp_path / "bucket"))
    publish_version(store, "r", _artifacts(tmp_path))
    opened = open_version(store, "r/v1")
    assert sorted(opened.entries) == ["adapter/adapter_model.safetensors", "metadata.json"]
    assert {"_COMPLETE", "manifest.json", "metadata.json"} <= set(opened.sizes)
    assert opened.marker.decode().strip() == hashlib.sha256(opened.manifest).hexdigest()
    assert opened.key("metadata.json") == "r/v1/metadata.json"
    rooted = open_version(LocalStore(str(tmp_path / "bucket" / "r" / "v1")), "")  # the launcher's: a URI per version
    assert rooted.entries == opened.entries and rooted.key("metadata.json") == "metadata.json"

    store.put_bytes("r/v2/metadata.json", b"{}")  # a publish that died before its marker
    with pytest.raises(IncompleteVersion, match="r/v2 has no _COMPLETE marker: it is incomplete") as err:
        open_version(store, "r/v2")
    assert err.value.objects == 1
    assert verify_version(store, "r", "v2") == ["v2 has no _COMPLETE marker: incomplete"]
    dest = tmp_path / "fetched"
    with pytest.raises(IncompleteVersion, match=r"^s3://b/r/v2 has no _COMPLETE marker: it is incomplete"):
        fetch_version_files(store, "r/v2", ["metadata.json"], dest, "s3://b/r/v2")
    with pytest.raises(StorageError, match=r"^s3://b/r/v9 holds nothing: no published version there\n"):
        fetch_version_files(store, "r/v9", ["metadata.json"], dest, "s3://b/r/v9")
    assert not dest.exists()
    with pytest.raises(StorageError, match=r"/r/v2 is not a complete version \(no _COMPLETE marker\)\n") as err2:
        read_evidence(store, "r", "v2")
    assert "(complete: v1)" in (err2.value.hint or "") and not isinstance(err2.value, IncompleteVersion)
