"""`launcher artifacts RUN --download DIR` is all or nothing, against a real folder store (jobs.storage.LocalStore):
a version whose files, manifest or _COMPLETE marker were altered leaves nothing in DIR, and the error names
the files and the fix. The launcher's check and the publisher's verify_version are the same code."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from jobs.errors import StorageError
from jobs.publish import publish_version, verify_version
from jobs.storage import LocalStore
from launcher.artifacts import download_version

pytestmark = pytest.mark.unit


@pytest.fixture()
def published(tmp_path):
    """A run `r` with one published version v1 in a folder store; returns (output prefix, store)."""
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (out / "metadata.json").write_text('{"n": 1}')
    root = tmp_path / "bucket"
    store = LocalStore(str(root))
    assert publish_version(store, "r", out) == "v1"
    return str(root), store


def _rewrite_manifest(store, edit, marker: bytes | None = None) -> None:
    """Edit v1's manifest consistently (as a careful tamperer would); the marker gets ``marker`` or the new sha."""
    manifest = json.loads(store.get_bytes("r/v1/manifest.json"))
    edit(manifest["files"])
    raw = json.dumps(manifest).encode()
    store.put_bytes("r/v1/manifest.json", raw)
    store.put_bytes("r/v1/_COMPLETE", hashlib.sha256(raw).hexdigest().encode() + b"\n" if marker is None else marker)


def _nothing_left(dest) -> bool:
    return not dest.exists() or not any(dest.iterdir())


def test_a_whole_version_lands_in_place_with_its_manifest_and_marker(published, tmp_path):
    output, store = published
    dest = tmp_path / "dl"
    version, folder = download_version(output, "r", None, dest)
    assert (version, folder) == ("v1", dest / "v1")
    assert (folder / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights" * 100
    assert (folder / "manifest.json").read_bytes() == store.get_bytes("r/v1/manifest.json")
    assert (folder / "_COMPLETE").read_bytes() == store.get_bytes("r/v1/_COMPLETE")
    assert sorted(p.name for p in dest.iterdir()) == ["v1"], "no staging folder is left beside it"


def test_a_tampered_file_leaves_nothing_and_names_the_file(published, tmp_path):
    output, store = published
    store.put_bytes("r/v1/metadata.json", b'{"evil": 1}')
    dest = tmp_path / "dl"
    with pytest.raises(StorageError) as e:
        download_version(output, "r", "v1", dest)
    assert "do not match the manifest" in e.value.message and "metadata.json" in e.value.message
    assert "download again" in e.value.hint and "check the path in the spec" not in e.value.hint
    assert _nothing_left(dest), list(dest.rglob("*"))
    assert verify_version(store, "r", "v1") == ["metadata.json: sha256 mismatch"], "the publisher's verify agrees"


def test_an_empty_marker_with_a_consistently_edited_manifest_is_refused(published, tmp_path):
    output, store = published
    store.put_bytes("r/v1/metadata.json", b'{"evil": 1}')
    _rewrite_manifest(store, lambda files: files.update({"metadata.json": {
        "sha256": hashlib.sha256(b'{"evil": 1}').hexdigest(), "size": 11}}), marker=b"")
    dest = tmp_path / "dl"
    with pytest.raises(StorageError) as e:
        download_version(output, "r", "v1", dest)
    assert "_COMPLETE is empty" in e.value.message and "sha256 of manifest.json" in e.value.message
    assert _nothing_left(dest)
    assert any("_COMPLETE is empty" in p for p in verify_version(store, "r", "v1"))


def test_a_manifest_edited_after_publishing_does_not_match_its_marker(published, tmp_path):
    output, store = published
    raw = store.get_bytes("r/v1/manifest.json")
    store.put_bytes("r/v1/manifest.json", raw.replace(b'"size"', b' "size"'))  # same content, other bytes
    with pytest.raises(StorageError, match="does not match the sha256 in its _COMPLETE marker"):
        download_version(output, "r", "v1", tmp_path / "dl")
    assert _nothing_left(tmp_path / "dl")
    assert any("does not match the sha256" in p for p in verify_version(store, "r", "v1"))


def test_a_missing_file_is_named_with_the_fix_for_a_damaged_version(published, tmp_path):
    output, store = published
    store.delete("r/v1/adapter/adapter_model.safetensors")
    dest = tmp_path / "dl"
    with pytest.raises(StorageError) as e:
        download_version(output, "r", "v1", dest)
    assert "missing from the store: adapter/adapter_model.safetensors" in e.value.message
    assert "download another version" in e.value.hint and "check the path in the spec" not in e.value.hint
    assert _nothing_left(dest)
    assert verify_version(store, "r", "v1") == ["adapter/adapter_model.safetensors: missing"]


@pytest.mark.parametrize("marker", [b"not a sha", b"0" * 64])
def test_a_marker_that_does_not_vouch_for_the_manifest_is_refused(published, tmp_path, marker):
    output, store = published
    store.put_bytes("r/v1/_COMPLETE", marker)
    with pytest.raises(StorageError, match="_COMPLETE"):
        download_version(output, "r", "v1", tmp_path / "dl")
    assert _nothing_left(tmp_path / "dl") and verify_version(store, "r", "v1") != []


def test_an_existing_download_folder_is_never_overwritten(published, tmp_path):
    output, _ = published
    mine = tmp_path / "dl" / "v1" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own file")
    with pytest.raises(StorageError, match="already exists") as e:
        download_version(output, "r", "v1", tmp_path / "dl")
    assert "remove it" in e.value.hint and mine.read_text() == "my own file"


def test_an_interrupted_download_leaves_nothing(published, tmp_path):
    output, _ = published
    dest = tmp_path / "dl"
    dest.mkdir()

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_version(output, "r", "v1", dest, on_progress=interrupt)
    assert list(dest.iterdir()) == [], "the staging folder went with the interrupt; DIR itself was the user's"


def test_the_settings_endpoint_is_passed_not_written_into_the_environment(published, tmp_path, monkeypatch):
    from launcher.client import Client
    from launcher.settings import make_settings

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    output, _ = published
    client = Client(settings=make_settings(s3_endpoint="http://minio.example:9000"))
    got = client.download("r", tmp_path / "dl", output=output)
    assert got.version == "v1" and "all files match" in got.message
    assert [v.name for v in client.artifacts("r", output=output).versions] == ["v1"]
    assert "AWS_ENDPOINT_URL" not in os.environ, "issue 31: the process environment is left alone"


def test_the_cli_reports_a_tampered_download_with_exit_3_and_no_traceback(published, tmp_path):
    from typer.testing import CliRunner

    from launcher import cli

    output, store = published
    store.put_bytes("r/v1/metadata.json", b"{}")
    r = CliRunner().invoke(cli.app, ["artifacts", "r", "--output", output, "--download", str(tmp_path / "dl")])
    assert r.exit_code == 3, r.output
    assert "metadata.json" in r.output and "fix:" in r.output and "Traceback" not in r.output
    assert _nothing_left(tmp_path / "dl")
