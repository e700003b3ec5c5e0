"""A node-local cache of base models: the second job on a node reads its base model from the node's disk.

The cache is node infrastructure, not part of the training spec: the launcher setting ``model_cache_host_path``
mounts a node folder into the pod (a hostPath volume) and names it in ``LORA_JOBS_MODEL_CACHE``; its bound is
``LORA_JOBS_MODEL_CACHE_MAX_GIB`` (setting ``model_cache_max_gib``). Unset, the job downloads its base model into
its own scratch, as before. docs/model-cache.md says when to turn it on and what it trusts.

Layout of the cache folder::

    entries/<key>/model/...     one base model, published whole by a rename (files read-only)
    entries/<key>/entry.json    its listing, each file's size and sha256, the folder's hash; mtime = last use
    locks/<key>.fetch           exclusive: the one job downloading <key> (the others wait for it)
    locks/<key>.use             shared by every job using <key>, for the job's whole life (the merge reads the
                                base again after training); eviction needs it exclusive, so an entry in use stays
    locks/evict                 exclusive while room is made (least recently used entries first)
    tmp/<key>.<bytes>.<pid>/    a download in progress (<bytes>: what it reserves of the bound)

The key is known before anything is downloaded: the sha256 of the prefix's listing (each object's key below the
prefix, size and ETag). S3 gives an object a new ETag whenever it is written with other content (an MD5 of the
content, or of its parts for a multipart upload), so a changed model is a new key; the same content uploaded
differently (other part sizes) only costs one more download. The listing is what the store says: the cache trusts
the store's ETags, as the download itself trusts the store. What is on the node's disk is not trusted: every use
checks each file's size and sha256 against those recorded when the entry was made, and a damaged entry is dropped
and fetched again. The cache folder is shared by every pod that mounts it: whoever can write there can change
what other jobs load (docs/model-cache.md, "Trust").

The cache never fails a run: a folder that cannot be written, a model larger than the bound, a full disk or an
entry that is damaged while another job uses it — the job downloads into its scratch instead, with a warning that
says why (and names the setting where that is the fix).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

from jobs.digest import hash_dir, sha256_file
from jobs.formatting import duration, size
from jobs.storage import ObjectInfo, Store, TransferProgress, download_prefix, safe_relative_path

log = logging.getLogger("jobs")

#: The pod's environment: the cache folder (as mounted in the pod) and its bound in GiB.
ENV_DIR = "LORA_JOBS_MODEL_CACHE"
ENV_MAX_GIB = "LORA_JOBS_MODEL_CACHE_MAX_GIB"
#: The launcher settings that set them (named in warnings: where the fix is).
SETTING_DIR = "model_cache_host_path"
SETTING_MAX_GIB = "model_cache_max_gib"
DEFAULT_MAX_GIB = 200.0
#: How often a job waiting for another job's download says so.
WAIT_LOG_INTERVAL_S = 30.0

#: The use locks this process holds: released when it exits (the base is read until the merge, at the end).
_held: list[IO[str]] = []


def release_uses() -> None:
    """Stop using the entries this process fetched (a process's exit does the same): for a process that runs
    several jobs one after another, and for tests."""
    while _held:
        _held.pop().close()


class CacheUnusable(Exception):
    """The cache cannot serve this model now; the message says why (and the setting that fixes it, if one does)."""


@dataclass(frozen=True)
class CacheConfig:
    root: Path
    max_bytes: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CacheConfig | None:
        """The cache the pod was given (``LORA_JOBS_MODEL_CACHE``), None when it has none. A bound that is not a
        positive number is warned about and the cache is left off (never a failed run)."""
        env = os.environ if env is None else env
        root = (env.get(ENV_DIR) or "").strip()
        if not root:
            return None
        text = (env.get(ENV_MAX_GIB) or "").strip()
        try:
            gib = float(text) if text else DEFAULT_MAX_GIB
        except ValueError:
            gib = -1.0
        if not gib > 0:
            log.warning("%s=%r is not a positive number of GiB: the node's model cache is not used (fix the "
                        "launcher setting %s)", ENV_MAX_GIB, text, SETTING_MAX_GIB)
            return None
        return cls(Path(root), int(gib * 2**30))


@dataclass(frozen=True)
class BaseModel:
    """The base model folder the job loads, and how it got there."""

    path: Path
    sha256: str  # jobs.digest.hash_dir of the folder
    cache: str  # "hit": read from the node cache; "miss": downloaded into it; "off": downloaded into scratch
    fetched_bytes: int  # bytes this job downloaded from the store for it (0 on a hit)
    total_bytes: int
    files: int
    seconds: float
    note: str | None = None  # why a configured cache was not used

    def record(self) -> dict[str, Any]:
        """The progress object's ``base_model``."""
        out: dict[str, Any] = {"cache": self.cache, "fetched_bytes": self.fetched_bytes, "bytes": self.total_bytes,
                               "files": self.files, "seconds": round(self.seconds, 1)}
        if self.note:
            out["note"] = self.note
        return out


def relative_listing(objs: Sequence[ObjectInfo], prefix: str) -> list[tuple[str, int, str]]:
    """(key below ``prefix``, size, ETag) of every object, sorted; the file names as download_prefix writes them."""
    pre = prefix.strip("/")
    out = []
    for o in objs:
        if o.key.endswith("/"):
            continue
        rel = o.key[len(pre):].lstrip("/") if pre and o.key != pre else Path(o.key).name
        tag = o.etag if o.etag is not None else f"mtime:{o.modified}"  # a store without ETags: its mtimes
        out.append((str(safe_relative_path(rel, o.key)), int(o.size), tag))
    return sorted(out)


def listing_key(objs: Sequence[ObjectInfo], prefix: str) -> str:
    """The cache key of a model folder: sha256 of its listing (keys below the prefix, sizes, ETags)."""
    h = hashlib.sha256()
    for rel, n, tag in relative_listing(objs, prefix):
        h.update(f"{rel}\0{n}\0{tag}\n".encode())
    return h.hexdigest()


def fetch_base_model(store: Store, prefix: str, objs: Sequence[ObjectInfo], dest: Path,
                     download: Callable[[Path], None], config: CacheConfig | None) -> BaseModel:
    """The base model under ``prefix`` (listed as ``objs``) as a local folder.

    With a cache (``config``), from the node cache: a verified entry is used in place (nothing downloaded), a
    missing one is downloaded into the cache once for all the node's jobs. Without one, or when the cache cannot
    serve it, ``download(dest)`` fetches it into the job's own scratch (the caller's checks of its space)."""
    t0 = time.monotonic()
    total, files = sum(o.size for o in objs if not o.key.endswith("/")), len(relative_listing(objs, prefix))
    note = None
    if config is not None:
        cache = NodeCache(config)
        try:
            return cache.fetch(store, prefix, objs)
        except CacheUnusable as err:
            note = str(err)
        except OSError as err:  # the cache's disk (full, read-only, gone): never the run's failure
            note = f"the node's model cache at {config.root} failed: {err.strerror or err}"
        cache.release()
        log.warning("base model: %s; downloading it into this job's scratch instead", note)
    download(dest)
    return BaseModel(dest, hash_dir(dest), "off", total, total, files, time.monotonic() - t0, note)


@dataclass
class NodeCache:
    """The cache folder of one node (see the module's docstring for its layout and locks)."""

    config: CacheConfig
    _use: IO[str] | None = field(default=None, repr=False)

    @property
    def root(self) -> Path:
        return self.config.root

    def _dir(self, name: str) -> Path:
        return self.root / name

    def _writable(self) -> None:
        """Make the cache's folders; CacheUnusable naming the setting when the folder is missing or not writable."""
        if not self.root.is_dir():
            raise CacheUnusable(f"the node's model cache {self.root} ({ENV_DIR}) is not a folder in this pod: "
                                f"check the launcher setting {SETTING_DIR}")
        try:
            for name in ("entries", "locks", "tmp"):
                self._dir(name).mkdir(exist_ok=True)
            probe = self._dir("tmp") / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise CacheUnusable(f"the node's model cache {self.root} is not writable ({err.strerror or err}): give "
                                f"the node folder of the launcher setting {SETTING_DIR} to uid {os.getuid()} "
                                f"(e.g. install -d -o {os.getuid()} -g {os.getgid()} -m 0750 <folder> on each "
                                f"node) or unset the setting") from None

    def _lock(self, name: str) -> IO[str]:
        return open(self._dir("locks") / name, "a+")

    def release(self) -> None:
        """Give up this job's use of its entry (when it falls back to its scratch)."""
        if self._use is not None:
            self._use.close()
            self._use = None

    # ------------------------------------------------------------------ fetch

    def fetch(self, store: Store, prefix: str, objs: Sequence[ObjectInfo]) -> BaseModel:
        t0 = time.monotonic()
        self._writable()
        listing = relative_listing(objs, prefix)
        key = listing_key(objs, prefix)
        total = sum(n for _, n, _ in listing)
        entry = self._dir("entries") / key
        self._use = self._lock(f"{key}.use")
        try:
            fcntl.flock(self._use, fcntl.LOCK_SH)  # waits only while an eviction of this entry finishes
            found = self._usable(entry, listing)
            if found is None:
                log.info("base model: not in the node's model cache %s: downloading it there, once for this node",
                         self.root)
                with _FetchLock(self, key):
                    found = self._usable(entry, listing)  # another job's download may have published it meanwhile
                    if found is None:
                        return self._download(store, prefix, key, listing, total, t0)
        except BaseException:
            self.release()
            raise
        os.utime(entry / "entry.json")  # its last use, for the least-recently-used eviction
        _held.append(self._use)
        self._use = None
        took = time.monotonic() - t0
        log.info("base model: read from the node's model cache %s (%s, %d files, verified in %.1fs); nothing "
                 "downloaded", entry / "model", size(total), len(listing), took)
        return BaseModel(entry / "model", str(found["sha256"]), "hit", 0, total, len(listing), took)

    def _usable(self, entry: Path, listing: list[tuple[str, int, str]]) -> dict[str, Any] | None:
        """The entry's record when it is whole and every file matches its size and sha256; None when there is no
        entry, or it was damaged (and then dropped, said in the log). Called holding the use lock shared."""
        if not entry.exists():
            return None
        problem, meta = self._check(entry, listing)
        if problem is None:
            return meta
        assert self._use is not None
        try:  # dropped only when no other job uses it: one that does may still read it (the merge)
            fcntl.flock(self._use, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self._use, fcntl.LOCK_SH)
            raise CacheUnusable(f"the node cache's copy of the base model {entry} is damaged ({problem}) and another "
                                "job is using it; it is dropped by the next job that finds it unused") from None
        log.warning("base model: the node cache's copy %s is damaged (%s): dropping it and downloading it again",
                    entry, problem)
        self._remove(entry)
        fcntl.flock(self._use, fcntl.LOCK_SH)
        return None

    def _check(self, entry: Path, listing: list[tuple[str, int, str]]) -> tuple[str | None, dict[str, Any]]:
        """(what is wrong or None, the entry's record)."""
        try:
            meta = json.loads((entry / "entry.json").read_text())
            recorded = meta["files"]
            assert isinstance(recorded, dict) and isinstance(meta["sha256"], str)
        except (OSError, ValueError, KeyError, AssertionError):
            return "its entry.json is missing or unreadable", {}
        if sorted((rel, int(f["size"])) for rel, f in recorded.items()) != [(rel, n) for rel, n, _ in listing]:
            return "its files are not the listing's", meta
        model = entry / "model"
        on_disk = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
        extra = sorted(set(on_disk) - set(recorded))
        if extra:
            return f"{extra[0]} is not one of its files", meta
        for rel, f in recorded.items():
            p = model / rel
            if not p.is_file():
                return f"{rel} is missing", meta
            if p.stat().st_size != int(f["size"]):
                return f"{rel} has {p.stat().st_size} bytes, not {f['size']} (truncated?)", meta
        with ThreadPoolExecutor(max_workers=min(4, max(1, len(recorded)))) as pool:  # hashlib frees the GIL
            sums = dict(zip(recorded, pool.map(lambda rel: sha256_file(model / rel), recorded)))
        bad = sorted(rel for rel, f in recorded.items() if sums[rel] != f["sha256"])
        if bad:
            return f"{bad[0]}: sha256 {sums[bad[0]][:12]}… is not the recorded {recorded[bad[0]]['sha256'][:12]}…", meta
        return None, meta

    def _download(self, store: Store, prefix: str, key: str, listing: list[tuple[str, int, str]], total: int,
                  t0: float) -> BaseModel:
        """Download into tmp/, check, record, and publish as entries/<key> by one rename. Holds the fetch lock."""
        self._make_room(total, key)
        tmp = self._dir("tmp") / f"{key}.{total}.{os.getpid()}"
        moved = TransferProgress(f"downloading the base model into the node cache ({len(listing)} files)", total)
        try:
            try:
                download_prefix(store, prefix, tmp / "model", workers=16, progress=moved)
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise CacheUnusable(f"the node's disk under {self.root} filled up during the download") from None
                raise
            moved.finish()
            model = tmp / "model"
            got = sorted((str(p.relative_to(model)), p.stat().st_size) for p in model.rglob("*") if p.is_file())
            if got != [(rel, n) for rel, n, _ in listing]:
                raise CacheUnusable("the base model changed in the store during its download (its files differ from "
                                    "the listing)")
            with ThreadPoolExecutor(max_workers=min(4, max(1, len(listing)))) as pool:
                sums = dict(zip([rel for rel, _, _ in listing],
                                pool.map(lambda rel: sha256_file(model / rel), [rel for rel, _, _ in listing])))
            folder = hash_dir(model)
            for rel, _, _ in listing:
                (model / rel).chmod(0o444)  # the job only reads it
            meta = {"key": key, "store": store.label, "prefix": prefix, "sha256": folder, "bytes": total,
                    "created": round(time.time(), 1),
                    "files": {rel: {"size": n, "etag": tag, "sha256": sums[rel]} for rel, n, tag in listing}}
            (tmp / "entry.json").write_text(json.dumps(meta, indent=1))
            entry = self._dir("entries") / key
            os.rename(tmp, entry)  # whole or not at all: other jobs see the entry only now
        except BaseException:
            self._remove(tmp)
            raise
        assert self._use is not None
        _held.append(self._use)
        self._use = None
        took = time.monotonic() - t0
        log.info("base model: downloaded into the node's model cache %s (%s in %.1fs); the node's next jobs read it "
                 "from there", entry / "model", size(moved.done), took)
        return BaseModel(entry / "model", folder, "miss", moved.done, total, len(listing), took)

    # ------------------------------------------------------------------ size

    def entries(self) -> list[tuple[float, str, int]]:
        """(last use, key, bytes) of every published entry, least recently used first."""
        out = []
        for d in self._dir("entries").iterdir():
            try:
                meta = d / "entry.json"
                out.append((meta.stat().st_mtime, d.name, int(json.loads(meta.read_text())["bytes"])))
            except (OSError, ValueError, KeyError):  # half-removed or damaged: counted by its files
                out.append((0.0, d.name, sum(p.stat().st_size for p in d.rglob("*") if p.is_file())))
        return sorted(out)

    def _downloads_in_progress(self, keep: str) -> int:
        """Bytes reserved by other jobs' downloads; stale ones (their job is gone) are removed."""
        reserved = 0
        for d in self._dir("tmp").iterdir():
            if d.name.startswith("."):  # a write probe, or what a removal left behind
                if d.name.startswith(".gone-"):
                    shutil.rmtree(d, ignore_errors=True)
                continue
            key, _, rest = d.name.partition(".")
            n = rest.partition(".")[0]
            if key == keep:  # this job holds that key's fetch lock: anything there is a dead job's
                self._remove(d)
                continue
            with self._lock(f"{key}.fetch") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    reserved += int(n) if n.isdigit() else 0
                    continue
                self._remove(d)
        return reserved

    def _make_room(self, need: int, keep: str) -> None:
        """Evict least recently used entries no job uses until ``need`` more bytes fit the bound."""
        if need > self.config.max_bytes:
            raise CacheUnusable(f"the base model ({size(need)}) is larger than the node cache's bound "
                                f"({size(self.config.max_bytes)}): raise the launcher setting {SETTING_MAX_GIB}")
        with self._lock("evict") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = sum(n for _, _, n in self.entries()) + self._downloads_in_progress(keep)
            for _, key, n in self.entries():
                if used + need <= self.config.max_bytes:
                    break
                if key == keep:
                    continue
                with self._lock(f"{key}.use") as use:
                    try:
                        fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a job is using it
                    self._remove(self._dir("entries") / key)
                used -= n
                log.info("base model cache: evicted %s (%s, least recently used) to make room", key[:12], size(n))
            if used + need > self.config.max_bytes:
                raise CacheUnusable(f"the node cache ({size(used)} of {size(self.config.max_bytes)}) cannot make "
                                    f"room for {size(need)}: its other entries are in use (raise the launcher setting "
                                    f"{SETTING_MAX_GIB})")
            free = shutil.disk_usage(self.root).free
            if need > free:
                raise CacheUnusable(f"the node's disk under {self.root} has {size(free)} free, the base model needs "
                                    f"{size(need)}")

    def _remove(self, path: Path) -> None:
        """Rename aside, then delete: a half-deleted folder is never seen under its name."""
        if not path.exists():
            return
        gone = self._dir("tmp") / f".gone-{uuid.uuid4().hex}"
        os.rename(path, gone)
        for p in gone.rglob("*"):  # read-only files need a writable folder only; make sure of that
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(gone, ignore_errors=True)


class _FetchLock:
    """The exclusive download lock of one key; waiting for it says so in the log."""

    def __init__(self, cache: NodeCache, key: str):
        self.cache, self.key = cache, key
        self.file: IO[str] | None = None

    def __enter__(self) -> _FetchLock:
        self.file = self.cache._lock(f"{self.key}.fetch")
        t0 = time.monotonic()
        said_at: float | None = None
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                now = time.monotonic()
                if said_at is None or now - said_at >= WAIT_LOG_INTERVAL_S:
                    log.info("base model: waiting for another job's download of it into the node's model cache "
                             "(%s so far); it is read from there when that finishes", duration(now - t0))
                    said_at = now
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
