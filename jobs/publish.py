"""Publishing an immutable version: <output>/<name>/v<N>/ ... manifest.json, then _COMPLETE, then latest.

A version is visible only once ``_COMPLETE`` (which holds the manifest's sha256) is
written, last. Nothing is ever overwritten: a version folder that already holds any
object is never written into; the next number is taken instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypedDict

from jobs.digest import sha256_file
from jobs.errors import StorageError
from jobs.retry import RetryPolicy
from jobs.storage import Store, join

log = logging.getLogger("jobs")

# The layout of a version, for the publisher and the launcher's reader alike (launcher/artifacts.py).
VERSION_RE = re.compile(r"^v(\d+)$")
MARKER = "_COMPLETE"  # written last; holds the sha256 of manifest.json
MANIFEST = "manifest.json"
LATEST = "latest"
CLAIM = "_CLAIM"  # created first, conditionally: whoever creates it owns the version number


def existing_versions(store: Store, run_prefix: str) -> dict[int, bool]:
    """{N: complete?} for every v<N> folder under the run prefix."""
    out: dict[int, bool] = {}
    for d in store.list_dirs(run_prefix):
        m = VERSION_RE.match(d)
        if m:
            out[int(m.group(1))] = store.exists(join(run_prefix, d, MARKER))
    return out


def build_manifest(folder: Path) -> dict[str, Any]:
    # never lists itself: a folder published before (an interrupted local run, published again) holds one
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)
    return {"files": {str(p.relative_to(folder)): {"sha256": sha256_file(p), "size": p.stat().st_size}
                      for p in files}}


def publish_version(store: Store, run_prefix: str, folder: Path, *, max_attempts: int = 50) -> str:
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


def _remove_incomplete(store: Store, prefix: str) -> None:
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


class _LatestMoved(Exception):
    """Another publisher moved ``latest`` between our read and our compare-and-swap."""


#: Compare-and-swap rounds on ``latest``: a lost round is tried again after a short jittered wait, so
#: publishers that collide spread out instead of colliding again.
LATEST_POLICY = RetryPolicy(attempts=50, base_delay=0.01, max_delay=0.5)


def _advance_latest(store: Store, run_prefix: str, n: int, policy: RetryPolicy = LATEST_POLICY) -> None:
    """Point ``latest`` at v<n> unless it already names a newer version."""
    key = join(run_prefix, LATEST)

    def swap() -> None:
        data, tag = store.get_versioned(key)
        m = VERSION_RE.match(data.decode().strip()) if data else None
        if m and int(m.group(1)) >= n:
            return
        if not store.put_bytes_if_match(key, f"v{n}\n".encode(), tag):
            raise _LatestMoved

    try:
        policy.call(swap, retryable=lambda err: isinstance(err, _LatestMoved))
    except _LatestMoved:
        raise StorageError(f"could not move {store.label}/{key} to v{n}: it kept changing under us",
                           hint="the version is complete; set latest by hand or publish again") from None


# ------------------------------------------------------------------ the one verify
# A version is whole when its _COMPLETE marker holds the sha256 of its manifest.json and every file the manifest
# lists is there with that sha256 and size. The publisher's store (verify_version) and the launcher's downloaded
# copy (launcher.artifacts) are checked by the same two functions below; open_version is the one way a reader
# (verify_version, fetch_version_files, jobs.promotion, launcher.artifacts) lists a version and reads its marker
# and manifest.

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestEntry(TypedDict):
    """One file of a version's manifest.json."""

    sha256: str
    size: int


@dataclass
class FileCheck:
    """What :func:`check_files` found: files the manifest lists but that are absent, and files whose sha256
    or size differ from it."""

    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.changed

    def problems(self) -> list[str]:
        return [f"{rel}: missing" for rel in self.missing] + [f"{rel}: sha256 mismatch" for rel in self.changed]


class IncompleteVersion(StorageError):
    """A version folder without its ``_COMPLETE`` marker: a publish in progress or one that died, never a version.
    ``objects``: how many objects its folder holds (0: nothing there at all)."""

    def __init__(self, where: str, objects: int | None = None) -> None:
        super().__init__(f"{where} has no {MARKER} marker: it is incomplete (a publish in progress or one that "
                         "died)", hint="wait for the publish to finish, or pick a complete version")
        self.objects = objects


def read_manifest(manifest_raw: bytes | None, marker_raw: bytes | None, where: str) -> dict[str, ManifestEntry]:
    """{relative path: {"sha256", "size"}} of a version's manifest, once its ``_COMPLETE`` marker vouches for it:
    the marker must hold the manifest's sha256 (what :func:`publish_version` writes), so an empty marker or a
    manifest edited after publishing is refused. ``where`` names the version (``s3://b/runs/r/v1``).
    Raises :class:`StorageError` naming what is wrong and what to do."""
    damaged = "the version was damaged or altered after publishing: do not use it; download another version " \
              "(`launcher artifacts RUN` lists them) or publish again"
    if marker_raw is None:
        raise IncompleteVersion(where)
    if manifest_raw is None:
        raise StorageError(f"{where} has a {MARKER} marker but no {MANIFEST}", hint=damaged)
    marker = marker_raw.decode("utf-8", "replace").strip()
    if not _SHA256.match(marker):
        what = "is empty" if not marker else "does not hold a sha256"
        raise StorageError(f"{where}/{MARKER} {what}: the publisher writes the sha256 of {MANIFEST} there, so "
                           f"nothing vouches for this {MANIFEST}", hint=damaged)
    if marker != hashlib.sha256(manifest_raw).hexdigest():
        raise StorageError(f"{where}/{MANIFEST} does not match the sha256 in its {MARKER} marker", hint=damaged)
    try:
        files = json.loads(manifest_raw)["files"]
    except (ValueError, TypeError, KeyError):
        raise StorageError(f"{where}/{MANIFEST} is not a manifest (JSON with a \"files\" mapping)",
                           hint=damaged) from None
    if not isinstance(files, dict) or not files:
        raise StorageError(f"{where}/{MANIFEST} lists no files", hint=damaged)
    entries: dict[str, ManifestEntry] = {}
    for rel, info in files.items():
        size = info.get("size") if isinstance(info, dict) else None
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and _SHA256.match(info["sha256"])
                and isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise StorageError(f"{where}/{MANIFEST}: the entry {rel!r} has no valid sha256 and size", hint=damaged)
        entries[rel] = {"sha256": info["sha256"], "size": size}
    return entries


def check_files(entries: dict[str, ManifestEntry], digest_of: Callable[[str], tuple[str, int] | None]) -> FileCheck:
    """Each manifest entry against ``digest_of(rel)`` -> (sha256, size), or None when the file is absent."""
    found = FileCheck()
    for rel, info in sorted(entries.items()):
        got = digest_of(rel)
        if got is None:
            found.missing.append(rel)
        elif got != (info["sha256"], info["size"]):
            found.changed.append(rel)
    return found


@dataclass(frozen=True)
class OpenedVersion:
    """A published version whose ``_COMPLETE`` marker vouches for its manifest (:func:`open_version`)."""

    prefix: str  # the version's folder in the store ('' : the store's root)
    sizes: dict[str, int]  # every object of the folder, by its name relative to ``prefix`` -> its size
    entries: dict[str, ManifestEntry]  # the manifest (:func:`read_manifest`)
    manifest: bytes  # manifest.json as stored
    marker: bytes  # _COMPLETE as stored: the manifest's sha256

    def key(self, rel: str) -> str:
        """The store key of the version's file ``rel``."""
        return join(self.prefix, rel)


def version_objects(store: Store, prefix: str) -> dict[str, int]:
    """{name relative to ``prefix``: size} of every object in the version folder ``prefix`` ('' : the store's
    root, what :func:`jobs.storage.open_store` gives for a URI naming the version itself)."""
    return {o.key[len(prefix) + 1:] if prefix else o.key: o.size for o in store.list(prefix + "/" if prefix else "")}


def open_version(store: Store, prefix: str, where: str | None = None, *,
                 objects: dict[str, int] | None = None) -> OpenedVersion:
    """The version folder ``prefix`` of ``store``: its objects (``objects`` when the caller listed them already,
    :func:`version_objects`), its ``_COMPLETE`` marker and its manifest, read and checked by :func:`read_manifest`.
    ``where`` names it in messages (default ``<store label>/<prefix>``). Raises :class:`IncompleteVersion`
    (before reading anything) when the folder has no marker, and :func:`read_manifest`'s :class:`StorageError`
    when the marker does not vouch for the manifest."""
    where = f"{store.label}/{prefix}" if where is None else where
    sizes = version_objects(store, prefix) if objects is None else objects
    if MARKER not in sizes:
        raise IncompleteVersion(where, len(sizes))
    marker = store.get_bytes(join(prefix, MARKER))
    manifest = store.get_bytes(join(prefix, MANIFEST)) if MANIFEST in sizes else None
    entries = read_manifest(manifest, marker, where)
    assert manifest is not None  # read_manifest refused a version without one
    return OpenedVersion(prefix, sizes, entries, manifest, marker)


def verify_version(store: Store, run_prefix: str, version: str) -> list[str]:
    """Problems with a published version in ``store`` (empty when its marker vouches for its manifest and every
    file matches the manifest). A store that cannot list the version raises; one that fails a read is a problem."""
    prefix = join(run_prefix, version)
    sizes = version_objects(store, prefix)
    try:
        opened = open_version(store, prefix, objects=sizes)
    except IncompleteVersion:
        return [f"{version} has no {MARKER} marker: incomplete"]
    except StorageError as err:
        return [err.message]

    def digest_of(rel: str) -> tuple[str, int] | None:
        if rel not in sizes:
            return None
        data = store.get_bytes(opened.key(rel))
        return hashlib.sha256(data).hexdigest(), len(data)

    return check_files(opened.entries, digest_of).problems()


def fetch_version_files(store: Store, prefix: str, names: list[str], dest: Path, where: str) -> dict[str, bytes]:
    """Files ``names`` of the complete version at ``prefix`` (``where`` names it: ``s3://b/runs/r/v3``), downloaded
    into ``dest`` and each checked against the version's manifest, whose sha256 its ``_COMPLETE`` marker must hold
    (:func:`read_manifest`, :func:`check_files`: the publisher's own check). Returns the bytes of the manifest and
    of the marker under their names. A :class:`StorageError` names an incomplete version, a name its manifest does
    not list, or a file missing or altered; nothing checked is left in ``dest`` then."""
    try:
        opened = open_version(store, prefix, where)
    except IncompleteVersion as err:
        if err.objects:
            raise
        raise StorageError(f"{where} holds nothing: no published version there",
                           hint="name a complete version, <output>/<run>/v<N> (`launcher artifacts RUN` lists them)"
                           ) from None
    sizes, entries = opened.sizes, opened.entries
    unlisted = [n for n in names if n not in entries]
    if unlisted:
        raise StorageError(f"{where} has no {', '.join(unlisted)} in its manifest",
                           hint="name a version the job published (its adapter/ folder holds "
                                "adapter_config.json and adapter_model.safetensors)")
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in sizes:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(opened.key(name), target)

    def digest_of(rel: str) -> tuple[str, int] | None:
        local = dest / rel
        return (sha256_file(local), local.stat().st_size) if local.is_file() else None

    found = check_files({n: entries[n] for n in names}, digest_of)
    if not found.ok:
        for name in names:
            (dest / name).unlink(missing_ok=True)
        raise StorageError(f"{where}: " + "; ".join(found.problems()),
                           hint="the version was damaged or altered after publishing: do not start from it; name "
                                "another version (`launcher artifacts RUN` lists them) or publish again")
    return {MANIFEST: opened.manifest, MARKER: opened.marker}
