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

VERSION_RE = re.compile(r"^v(\d+)$")
MARKER = "_COMPLETE"


def existing_versions(store, run_prefix: str) -> dict[int, bool]:
    """{N: complete?} for every v<N> folder under the run prefix."""
    out = {}
    for d in store.list_dirs(run_prefix):
        m = VERSION_RE.match(d)
        if m:
            out[int(m.group(1))] = store.exists(join(run_prefix, d, MARKER))
    return out


def build_manifest(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {"files": {str(p.relative_to(folder)): {"sha256": sha256_file(p), "size": p.stat().st_size}
                      for p in files}}


def publish_version(store, run_prefix: str, folder: Path, *, max_attempts: int = 5) -> str:
    """Upload ``folder`` as the next version under ``run_prefix``; return 'v<N>'."""
    from jobs.storage import upload_dir

    manifest = build_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    manifest_sha = sha256_file(folder / "manifest.json")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for _ in range(max_attempts):
        versions = existing_versions(store, run_prefix)
        n = max(versions, default=0) + 1
        version = f"v{n}"
        prefix = join(run_prefix, version)
        if store.list(prefix + "/"):
            continue  # someone is writing this number right now: never write into it
        log.info("publishing %d files to %s/%s", len(files), store.label, prefix)
        upload_dir(store, folder, prefix, files=files)
        store.put_bytes(join(prefix, MARKER), (manifest_sha + "\n").encode())
        store.put_bytes(join(run_prefix, "latest"), (version + "\n").encode(), content_type="text/plain")
        log.info("published %s/%s (complete)", store.label, prefix)
        return version
    raise StorageError(f"could not claim a free version number under {store.label}/{run_prefix}",
                       hint="another publisher keeps racing this run; retry later")


def verify_version(store, run_prefix: str, version: str) -> list[str]:
    """Problems with a published version (empty when complete and every sha256 matches the manifest)."""
    import hashlib

    prefix = join(run_prefix, version)
    problems = []
    if not store.exists(join(prefix, MARKER)):
        return [f"{version} has no {MARKER} marker: incomplete"]
    manifest_bytes = store.get_bytes(join(prefix, "manifest.json"))
    if store.get_bytes(join(prefix, MARKER)).decode().strip() != hashlib.sha256(manifest_bytes).hexdigest():
        problems.append("manifest.json does not match the sha256 in the marker")
    manifest = json.loads(manifest_bytes)
    for rel, info in manifest["files"].items():
        data = store.get_bytes(join(prefix, rel))
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    return problems
