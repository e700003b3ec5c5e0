"""Publishing an immutable version: <output>/<name>/v<N>/ ... manifest.json, then _COMPLETE, then latest.

A version is visible only once ``_COMPLETE`` (which holds the manifest's sha256) is
written, last. Nothing is ever overwritten: a version folder that already holds any
object is never written into; the next number is taken instead.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from jobs.errors import StorageError
from jobs.modelio import sha256_file
from jobs.storage import join

log = logging.getLogger("jobs")

# The layout of a version, for the publisher and the launcher's reader alike (launcher/artifacts.py).
VERSION_RE = re.compile(r"^v(\d+)$")
MARKER = "_COMPLETE"  # written last; holds the sha256 of manifest.json
MANIFEST = "manifest.json"
LATEST = "latest"
CLAIM = "_CLAIM"  # created first, conditionally: whoever creates it owns the version number


def existing_versions(store, run_prefix: str) -> dict[int, bool]:
    """{N: complete?} for every v<N> folder under the run prefix."""
    out = {}
    for d in store.list_dirs(run_prefix):
        m = VERSION_RE.match(d)
        if m:
            out[int(m.group(1))] = store.exists(join(run_prefix, d, MARKER))
    return out


def build_manifest(folder: Path) -> dict:
    # never lists itself: a folder published before (an interrupted local run, published again) holds one
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)
    return {"files": {str(p.relative_to(folder)): {"sha256": sha256_file(p), "size": p.stat().st_size}
                      for p in files}}


def publish_version(store, run_prefix: str, folder: Path, *, max_attempts: int = 50) -> str:
    """Upload ``folder`` as the next version under ``run_prefix``; return 'v<N>'.

    A number is claimed by creating ``v<N>/_CLAIM`` with a conditional write (``If-None-Match: *``):
    of publishers racing for the same number exactly one wins and the others take the next, so a
    version never holds a mix of two runs' files. ``latest`` only ever moves forward (a
    compare-and-swap on its ETag), however the publishers finish.
    """
    from jobs.storage import TransferProgress, upload_dir

    manifest = build_manifest(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    manifest_sha = sha256_file(folder / MANIFEST)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    n = max(existing_versions(store, run_prefix), default=0) + 1
    for _ in range(max_attempts):
        version = f"v{n}"
        prefix = join(run_prefix, version)
        # a folder with objects but no claim is an older publisher's (or a half-written) version
        if store.list(prefix + "/") or not store.put_bytes_if_absent(join(prefix, CLAIM), manifest_sha.encode()):
            n += 1
            continue
        log.info("publishing %d files to %s/%s", len(files), store.label, prefix)
        sent = TransferProgress(f"uploading {version}", sum(p.stat().st_size for p in files))
        try:
            upload_dir(store, folder, prefix, files=files, progress=sent)
            sent.finish()
            store.put_bytes(join(prefix, MARKER), (manifest_sha + "\n").encode())
        except BaseException:  # Ctrl-C, SIGTERM, a failed upload: no half-written version stays behind
            _remove_incomplete(store, prefix)
            raise
        _advance_latest(store, run_prefix, n)
        log.info("published %s/%s (complete)", store.label, prefix)
        return version
    raise StorageError(f"could not claim a free version number under {store.label}/{run_prefix}",
                       hint="another publisher keeps racing this run; retry later")


def _remove_incomplete(store, prefix: str) -> None:
    """Best effort: delete what an interrupted publish uploaded under ``prefix`` (never a completed version:
    its marker is written last, after which nothing here runs). What stays (the store unreachable now)
    has no marker, so no reader takes it for a version, and ``launcher artifacts prune`` removes it."""
    try:
        for obj in store.list(prefix + "/"):
            if not obj.key.endswith("/" + MARKER):
                store.delete(obj.key)
    except Exception as err:  # noqa: BLE001 - the original failure is what the user must see
        log.warning("could not remove the incomplete %s/%s (%s); it has no %s marker, so it is not a version; "
                    "`launcher artifacts prune` removes it", store.label, prefix, str(err).splitlines()[0], MARKER)
    else:
        log.warning("publishing was interrupted: the incomplete %s/%s was removed", store.label, prefix)


def _advance_latest(store, run_prefix: str, n: int, attempts: int = 50) -> None:
    """Point ``latest`` at v<n> unless it already names a newer version."""
    key = join(run_prefix, LATEST)
    for _ in range(attempts):
        data, tag = store.get_versioned(key)
        m = VERSION_RE.match(data.decode().strip()) if data else None
        if m and int(m.group(1)) >= n:
            return
        if store.put_bytes_if_match(key, f"v{n}\n".encode(), tag):
            return
    raise StorageError(f"could not move {store.label}/{key} to v{n}: it kept changing under us",
                       hint="the version is complete; set latest by hand or publish again")


def verify_version(store, run_prefix: str, version: str) -> list[str]:
    """Problems with a published version (empty when complete and every sha256 matches the manifest)."""
    import hashlib

    prefix = join(run_prefix, version)
    problems = []
    if not store.exists(join(prefix, MARKER)):
        return [f"{version} has no {MARKER} marker: incomplete"]
    manifest_bytes = store.get_bytes(join(prefix, MANIFEST))
    if store.get_bytes(join(prefix, MARKER)).decode().strip() != hashlib.sha256(manifest_bytes).hexdigest():
        problems.append("manifest.json does not match the sha256 in the marker")
    manifest = json.loads(manifest_bytes)
    for rel, info in manifest["files"].items():
        data = store.get_bytes(join(prefix, rel))
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    return problems
