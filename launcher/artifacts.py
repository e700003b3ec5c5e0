"""Published versions of a run: list them, download one and verify it.

Layout (docs/architecture.md): ``<output>/<name>/v<N>/`` with ``manifest.json``
(sha256 and size of every file) and ``_COMPLETE`` written last (the sha256 of
``manifest.json``); ``<output>/<name>/latest`` holds ``v<N>``. A folder without
``_COMPLETE`` is an incomplete (or in-progress) publish and is never a version.
"""
from __future__ import annotations

import logging
import os
import shutil
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.errors import StorageError
from jobs.digest import sha256_file as _sha256
from jobs.publish import LATEST, MANIFEST, MARKER as COMPLETE, check_files, existing_versions, open_version
from jobs.storage import TransferProgress, join, open_store, safe_relative_path


EVAL_PAGE = "eval_report.html"


@dataclass
class Version:
    name: str  # "v3"
    number: int
    uri: str  # the version's folder, ending with '/'
    files: int = 0
    bytes: int = 0
    eval_page: str | None = None  # <uri>/eval_report.html: the self-contained evaluation page, when published
    # vLLM's verdict on the adapter (metadata.json's serving.summary): read for the latest version only (one GET)
    serving: str | None = None


@dataclass
class Listing:
    run: str
    prefix: str  # <output>/<run>
    versions: list[Version] = field(default_factory=list)  # complete only, oldest first
    incomplete: list[str] = field(default_factory=list)  # v<N> folders without _COMPLETE
    latest: str | None = None
    # the version the run's champion pointer names (`launcher promote`, docs/promotion.md), and when/how it got there
    champion: str | None = None
    champion_info: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_prefix(output: str, run: str) -> str:
    return f"{output.rstrip('/')}/{run}"


def list_versions(output: str, run: str, *, endpoint: str | None = None) -> Listing:
    """Versions of ``run`` under the spec's ``output`` prefix (s3://… or a folder); ``endpoint``: the S3
    endpoint where the environment names none."""
    run_uri = _run_prefix(output, run)
    store, base = open_store(run_uri, endpoint=endpoint)
    listing = Listing(run=run, prefix=run_uri)
    for n, complete in sorted(existing_versions(store, base).items()):  # the publisher's own definition
        d = f"v{n}"
        if complete:
            objs = store.list(join(base, d) + "/")
            page = f"{run_uri}/{d}/{EVAL_PAGE}" if any(o.key.endswith("/" + EVAL_PAGE) for o in objs) else None
            # a folder's URI ends with '/': tools that download by prefix (S3, KServe) would take v1 for v10 too
            listing.versions.append(Version(d, n, f"{run_uri}/{d}/", files=len(objs),
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
    if listing.latest is not None:
        shown = next(v for v in listing.versions if v.name == listing.latest)
        shown.serving = _serving_summary(store, join(base, shown.name, "metadata.json"))
    pointer = _champion_pointer(store, base)
    if pointer is not None and pointer["version"] in {v.name for v in listing.versions}:
        listing.champion = pointer["version"]
        listing.champion_info = {k: pointer.get(k) for k in ("promoted_at", "by", "forced", "previous",
                                                             "manifest_sha256")}
    return listing


def _champion_pointer(store, base: str) -> dict[str, Any] | None:
    """The run's champion pointer (jobs.promotion), or None: no champion, or one that cannot be read (the listing
    never fails for it)."""
    from jobs.promotion import read_champion

    try:
        return read_champion(store, base)[0]
    except Exception:  # noqa: BLE001 - display only
        return None


def champion_of(run_uri: str, *, endpoint: str | None = None) -> dict[str, Any] | None:
    """The champion pointer of the run at ``run_uri`` (``<output>/<run>``), or None."""
    store, base = open_store(run_uri, endpoint=endpoint)
    return _champion_pointer(store, base)


def _serving_summary(store, key: str) -> str | None:
    """metadata.json's serving verdict in one line (jobs/serving.py), or None: a version published before the
    check, or a metadata.json that cannot be read (the listing never fails for it)."""
    import json

    try:
        serving = json.loads(store.get_bytes(key)).get("serving") if store.exists(key) else None
    except Exception:  # noqa: BLE001 - display only
        return None
    return serving.get("summary") if isinstance(serving, dict) else None


def download_version(output: str, run: str, version: str | None, dest: str | Path, on_progress=None, *,
                     endpoint: str | None = None) -> tuple[str, Path]:
    """Download a complete version (default: latest) into ``dest/<version>``, all or nothing: the files land in
    a staging folder beside it, are verified there against the manifest (whose sha256 the ``_COMPLETE`` marker
    must hold: :func:`jobs.publish.open_version`, the publisher's own check), and the folder is renamed into
    place only when every file matches; otherwise nothing is left and the error names the missing or changed
    files. Returns (version, folder). ``on_progress(done, total)`` sees the bytes as they arrive (a progress
    bar); the ``launcher`` logger gets a line every 10 s. ``endpoint``: the S3 endpoint where the environment
    names none."""
    listing = list_versions(output, run, endpoint=endpoint)
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
    where = f"{listing.prefix}/{version}"
    store, base = open_store(where, endpoint=endpoint)
    opened = open_version(store, base, where)
    entries = opened.entries
    for rel in entries:  # every path is checked before anything is written
        safe_relative_path(rel, f"the manifest of {where}")

    dest = Path(dest)
    target = dest / version
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise StorageError(f"{target} already exists", hint=f"remove it, or download into another folder "
                                                            f"(--download DIR); {version} lands in DIR/{version}")
    made_dest = not dest.exists()
    staging = dest / f".{version}.downloading-{secrets.token_hex(4)}"  # beside the target: one rename away
    try:
        dest.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:
        blocker = next((p for p in (dest, *dest.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else (err.strerror or type(err).__name__)
        raise StorageError(f"cannot download into {dest}: {why}",
                           hint="pass --download a folder you can write (it is created when missing)") from None
    try:
        present = {rel: info for rel, info in entries.items() if rel in opened.sizes}
        moved = TransferProgress(f"downloading {run} {version}", sum(info["size"] for info in present.values()),
                                 on_update=on_progress, logger=logging.getLogger("launcher"))
        for rel in sorted(present):
            store.get_file(opened.key(rel), staging / safe_relative_path(rel, where), progress=moved)

        def digest_of(rel: str) -> tuple[str, int] | None:
            local = staging / safe_relative_path(rel, where)
            return (_sha256(local), local.stat().st_size) if local.is_file() else None

        found = check_files(entries, digest_of)
        if not found.ok:
            raise _mismatch(found, where, target)
        (staging / MANIFEST).write_bytes(opened.manifest)
        (staging / COMPLETE).write_bytes(opened.marker)
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made_dest:
            try:
                dest.rmdir()  # only if still empty
            except OSError:
                pass
        raise
    return version, target


def _mismatch(found, where: str, target: Path) -> StorageError:
    """One error naming every missing and changed file of a version, with the fix for each kind."""
    parts, fixes = [], []

    def some(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    if found.missing:
        parts.append(f"{len(found.missing)} file(s) listed in its manifest are missing from the store: "
                     f"{some(found.missing)}")
        fixes.append("the stored version lost files after publishing: it is damaged, so download another "
                     "version (`launcher artifacts RUN` lists them) or publish again")
    if found.changed:
        parts.append(f"{len(found.changed)} file(s) do not match the manifest (sha256 or size): {some(found.changed)}")
        fixes.append("download again; if the same files differ again, the stored version was altered after "
                     "publishing: do not use it, pick another version")
    return StorageError(f"{where}: " + "; ".join(parts) + f"; nothing was written to {target}",
                        hint="; ".join(fixes))


@dataclass
class Orphan:
    """An incomplete version folder: a publish that died half-way (or one still running)."""

    name: str
    objects: int
    bytes: int
    age_seconds: float  # since its newest object was written
    removed: bool = False


def prune_incomplete(output: str, run: str, *, older_than_seconds: float, apply: bool,
                     now: float | None = None, endpoint: str | None = None) -> list[Orphan]:
    """Incomplete version folders of ``run`` whose newest object is older than the threshold;
    deleted only with ``apply``. A complete version is never touched, and neither is a folder
    written to within the threshold (a publish in progress)."""
    import time

    run_uri = _run_prefix(output, run)
    store, base = open_store(run_uri, endpoint=endpoint)
    now = time.time() if now is None else now
    out = []
    for d in list_versions(output, run, endpoint=endpoint).incomplete:
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
