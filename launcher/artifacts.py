"""Published versions of a run: list them, download one and verify it.

Layout (docs/architecture.md): ``<output>/<name>/v<N>/`` with ``manifest.json``
(sha256 and size of every file) and ``_COMPLETE`` written last (the sha256 of
``manifest.json``); ``<output>/<name>/latest`` holds ``v<N>``. A folder without
``_COMPLETE`` is an incomplete (or in-progress) publish and is never a version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.errors import StorageError
from jobs.modelio import sha256_file as _sha256
from jobs.publish import LATEST, MANIFEST, MARKER as COMPLETE, existing_versions
from jobs.storage import TransferProgress, join, open_store, safe_relative_path


EVAL_PAGE = "eval_report.html"


@dataclass
class Version:
    name: str  # "v3"
    number: int
    uri: str
    files: int = 0
    bytes: int = 0
    eval_page: str | None = None  # <uri>/eval_report.html: the self-contained evaluation page, when published


@dataclass
class Listing:
    run: str
    prefix: str  # <output>/<run>
    versions: list[Version] = field(default_factory=list)  # complete only, oldest first
    incomplete: list[str] = field(default_factory=list)  # v<N> folders without _COMPLETE
    latest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_prefix(output: str, run: str) -> str:
    return f"{output.rstrip('/')}/{run}"


def list_versions(output: str, run: str) -> Listing:
    """Versions of ``run`` under the spec's ``output`` prefix (s3://… or a folder)."""
    run_uri = _run_prefix(output, run)
    store, base = open_store(run_uri)
    listing = Listing(run=run, prefix=run_uri)
    for n, complete in sorted(existing_versions(store, base).items()):  # the publisher's own definition
        d = f"v{n}"
        if complete:
            objs = store.list(join(base, d) + "/")
            page = f"{run_uri}/{d}/{EVAL_PAGE}" if any(o.key.endswith("/" + EVAL_PAGE) for o in objs) else None
            listing.versions.append(Version(d, n, f"{run_uri}/{d}", files=len(objs),
                                            bytes=sum(o.size for o in objs), eval_page=page))
        else:
            listing.incomplete.append(d)
    latest_key = join(base, LATEST)
    if store.exists(latest_key):
        text = store.get_bytes(latest_key).decode("utf-8", "replace").strip()
        if text in {v.name for v in listing.versions}:
            listing.latest = text
    if listing.latest is None and listing.versions:
        listing.latest = listing.versions[-1].name
    return listing


def manifest_entries(manifest: Any) -> dict[str, dict[str, Any]]:
    """{relative path: {"sha256", "size"}} from the manifest, whichever of the usual shapes it has."""
    files = manifest.get("files", manifest) if isinstance(manifest, dict) else manifest
    out: dict[str, dict[str, Any]] = {}
    if isinstance(files, dict):
        for path, info in files.items():
            if isinstance(info, dict) and "sha256" in info:
                out[path] = info
            elif isinstance(info, str):
                out[path] = {"sha256": info}
    elif isinstance(files, list):
        for info in files:
            if isinstance(info, dict) and "sha256" in info and ("path" in info or "name" in info):
                out[info.get("path") or info["name"]] = info
    return out


def download_version(output: str, run: str, version: str | None, dest: str | Path,
                     on_progress=None) -> tuple[str, Path]:
    """Download a complete version (default: latest) into ``dest/<version>``; verify every file against the
    manifest and the manifest against ``_COMPLETE``. Returns (version, folder). ``on_progress(done, total)``
    sees the bytes as they arrive (a progress bar); the ``launcher`` logger gets a line every 10 s."""
    listing = list_versions(output, run)
    if not listing.versions:
        extra = f" ({len(listing.incomplete)} incomplete)" if listing.incomplete else ""
        raise StorageError(f"run {run} has no complete version under {listing.prefix}{extra}",
                           hint="wait for the run to finish publishing (launcher status)")
    version = version or listing.latest
    if version and version.isdigit():
        version = f"v{version}"
    if version in listing.incomplete:
        raise StorageError(f"{listing.prefix}/{version} is incomplete (no {COMPLETE} marker)",
                           hint="wait for the publish to finish, or pick a complete version")
    if version not in {v.name for v in listing.versions}:
        have = ", ".join(v.name for v in listing.versions)
        raise StorageError(f"run {run} has no version {version}", hint=f"pick one of: {have}")
    store, base = open_store(f"{listing.prefix}/{version}")
    manifest_raw = store.get_bytes(join(base, MANIFEST))
    marker = store.get_bytes(join(base, COMPLETE)).decode("utf-8", "replace").strip()
    digest = hashlib.sha256(manifest_raw).hexdigest()
    if marker and re.fullmatch(r"[0-9a-f]{64}", marker) and marker != digest:
        raise StorageError(f"{listing.prefix}/{version}/{MANIFEST} does not match its {COMPLETE} marker",
                           hint="the version was altered after publishing; do not use it")
    try:
        entries = manifest_entries(json.loads(manifest_raw))
    except ValueError:
        raise StorageError(f"{listing.prefix}/{version}/{MANIFEST} is not valid JSON",
                           hint="the version is damaged; pick another") from None
    if not entries:
        raise StorageError(f"{listing.prefix}/{version}/{MANIFEST} lists no files",
                           hint="the version is damaged or from an incompatible publisher; pick another")
    target = Path(dest) / version
    target.mkdir(parents=True, exist_ok=True)
    bad = []
    total = sum(int(info.get("size") or 0) for info in entries.values())
    moved = TransferProgress(f"downloading {run} {version}", total, on_update=on_progress,
                             logger=logging.getLogger("launcher"))
    for rel, info in sorted(entries.items()):
        local = target / safe_relative_path(rel, f"the manifest of {version}")
        store.get_file(join(base, rel), local, progress=moved)
        if _sha256(local) != info["sha256"] or ("size" in info and local.stat().st_size != int(info["size"])):
            bad.append(rel)
    (target / MANIFEST).write_bytes(manifest_raw)
    (target / COMPLETE).write_text(marker + "\n" if marker else "")
    if bad:
        raise StorageError(f"{len(bad)} file(s) of {version} do not match the manifest: {', '.join(bad[:5])}",
                           hint="download again; if it persists the stored version is damaged")
    return version, target


@dataclass
class Orphan:
    """An incomplete version folder: a publish that died half-way (or one still running)."""

    name: str
    objects: int
    bytes: int
    age_seconds: float  # since its newest object was written
    removed: bool = False


def prune_incomplete(output: str, run: str, *, older_than_seconds: float, apply: bool,
                     now: float | None = None) -> list[Orphan]:
    """Incomplete version folders of ``run`` whose newest object is older than the threshold;
    deleted only with ``apply``. A complete version is never touched, and neither is a folder
    written to within the threshold (a publish in progress)."""
    import time

    run_uri = _run_prefix(output, run)
    store, base = open_store(run_uri)
    now = time.time() if now is None else now
    out = []
    for d in list_versions(output, run).incomplete:
        objs = store.list(join(base, d) + "/")
        if not objs or any(o.key.rsplit("/", 1)[-1] == COMPLETE for o in objs):
            continue  # completed since it was listed
        newest = max((o.modified or now) for o in objs)
        age = now - newest
        if age < older_than_seconds:
            continue
        orphan = Orphan(d, len(objs), sum(o.size for o in objs), round(age, 1))
        if apply:
            for o in objs:
                store.delete(o.key)
            orphan.removed = True
        out.append(orphan)
    return out
