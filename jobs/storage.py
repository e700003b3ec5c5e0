"""The one storage module: S3-compatible object stores and local folders behind one interface.

``s3://bucket/key`` goes to boto3, configured only from the standard AWS
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_REGION``), so any S3 endpoint works. Anything else is
a local folder, which is what ``make demo`` uses. boto3 is imported lazily.

Errors name the bucket and key and never a credential: access denied and not
found raise :class:`StorageError` (never retried); 5xx, throttling and
connection failures are retried by one policy, :class:`RetryPolicy`, installed in
botocore's own retry hook (no loop of ours around it), and then raise
:class:`TransientError` (exit 75: the Job reruns the pod). Its worst case is stated:
with the defaults a call that makes no progress gives up within
``RetryPolicy().worst_case_stall()`` = 238 s, and an outage shorter than
``RetryPolicy().shortest_outage_ridden()`` = 31.5 s is always ridden out.
"""
from __future__ import annotations

import builtins
import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar, Union

from jobs.errors import StorageError, TransientError
from jobs.formatting import duration, size
from jobs.retry import RetryPolicy

T = TypeVar("T")
#: Told each chunk's byte count as it is sent or written (a :class:`TransferProgress`).
Progress = Callable[[int], None]

log = logging.getLogger("jobs")

# Objects at least this big are fetched by download_file_ranged (parallel ranged GETs
# written in place); smaller ones go through get_file. Defaults chosen by
# benchmarks/s3_download.py (results in benchmarks/results/).
RANGED_THRESHOLD = 64 * 2**20
RANGED_PART_SIZE = 32 * 2**20
RANGED_WORKERS = 8
# Bytes per read from a part's response (into one reused buffer) and per pwrite. On the
# 2-core benchmark machine 128-256 KiB cost the least kernel time; 512 KiB-1 MiB
# reads cost 2-4x more (benchmarks/README.md, "Cold start").
RANGED_READ_SIZE = 128 * 2**10

_PERMANENT = {"AccessDenied", "403", "NoSuchBucket", "NoSuchKey", "404", "NotFound", "InvalidAccessKeyId",
              "SignatureDoesNotMatch", "InvalidBucketName", "AllAccessDisabled", "AccountProblem"}


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float | None = None  # seconds since the epoch, when the store says
    etag: str | None = None  # the S3 ETag (changes whenever the object is written with other content)


class TransferProgress:
    """Bytes done of a long transfer, for the pod log and a terminal.

    Call it with each chunk's byte count (from any thread; a negative count takes bytes back, as
    boto3's upload callback does on a retried part). It logs ``"<what>: 4.2 GiB of 16.0 GiB (26%),
    512.0 MiB/s, ETA 23s"`` at most every ``interval`` seconds, and :meth:`finish` logs the total and
    the mean rate once. ``on_update(done, total)`` sees every change (a rich progress bar)."""

    def __init__(self, what: str, total: int, *, interval: float = 10.0, logger: logging.Logger | None = None,
                 on_update: Callable[[int, int], None] | None = None):
        self.what, self.total, self.interval = what, max(0, int(total)), interval
        self.log = logger or log
        self.on_update = on_update
        self.done = 0
        self.lines = 0
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._last = self._t0

    def __call__(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.done += n
            due = now - self._last >= self.interval and self.done < self.total
            if due:
                self._last = now
            done = self.done
        if self.on_update is not None:
            self.on_update(done, self.total)
        if due:
            rate = done / max(now - self._t0, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else None
            pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
            self.lines += 1
            self.log.info("%s: %s of %s%s, %s/s, ETA %s", self.what, size(done), size(self.total), pct,
                          size(rate), "?" if eta is None else duration(eta))

    def finish(self) -> None:
        took = time.monotonic() - self._t0
        self.lines += 1
        self.log.info("%s: %s in %.1fs (%s/s)", self.what, size(self.done), took, size(self.done / max(took, 1e-9)))


def parse_uri(uri: str) -> tuple[str, str, str]:
    """('s3', bucket, key) or ('file', '', absolute-path)."""
    if uri.startswith("s3://"):
        rest = uri[5:]
        bucket, _, key = rest.partition("/")
        return "s3", bucket, key
    if uri.startswith("file://"):
        uri = uri[7:]
    return "file", "", str(Path(uri).expanduser().resolve())


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class LocalStore:
    """A folder that behaves like a bucket: keys are relative paths. A write the file system refuses (the
    output names a file, a read-only or pseudo file system, no permission) is a :class:`StorageError`
    naming the folder, as an S3 AccessDenied is, never an ``OSError`` traceback."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.label = str(self.root)

    def _refused(self, key: str, err: OSError) -> StorageError:
        where = self.root / key
        blocker = next((p for p in (where, *where.parents) if p.exists() and not p.is_dir()), None)
        reason = (f"{blocker} is a file, not a folder" if blocker is not None and blocker != where
                  else err.strerror or type(err).__name__)
        return StorageError(f"cannot write {where}: {reason}",
                            hint="point output at a folder you can write (it is created when missing), "
                                 "or at an s3:// prefix")

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root.resolve() not in (p, *p.parents):
            raise StorageError(f"key '{key}' escapes the store root {self.root}")
        return p

    def put_file(self, path: str | Path, key: str, progress: Progress | None = None) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
        if progress is not None:
            progress(dest.stat().st_size)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".part")
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        except OSError as err:
            raise self._refused(key, err) from err

    def get_file(self, key: str, dest: str | Path, progress: Progress | None = None) -> None:
        src = self._path(key)
        if not src.is_file():
            raise StorageError(f"{self.root}/{key} not found", hint="check the path in the spec")
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        if progress is not None:
            progress(src.stat().st_size)

    def get_bytes(self, key: str) -> bytes:
        src = self._path(key)
        if not src.is_file():
            raise StorageError(f"{self.root}/{key} not found", hint="check the path in the spec")
        return src.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist (O_EXCL); False when it already did."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """(content, tag) of ``key`` for :meth:`put_bytes_if_match`; (None, None) when absent."""
        p = self._path(key)
        if not p.is_file():
            return None, None
        data = p.read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    def put_bytes_if_match(self, key: str, data: bytes, tag: str | None) -> bool:
        """Replace ``key`` only if it still has ``tag`` (None: only if absent). A lock file stands in
        for the store's compare-and-swap."""
        import fcntl

        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest.with_name(dest.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.get_versioned(key)[1] != tag:
                return False
            self.put_bytes(key, data)
            return True

    def delete(self, key: str) -> None:
        p = self._path(key)
        if p.is_file():
            p.unlink()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [ObjectInfo(prefix, base.stat().st_size)]
        if not base.is_dir():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.endswith((".part", ".lock")):
                st = p.stat()
                out.append(ObjectInfo(str(p.relative_to(self.root)), st.st_size, st.st_mtime))
        return out

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())


class S3Store:
    """One bucket on an S3-compatible endpoint."""

    def __init__(self, bucket: str, client: Any = None, policy: RetryPolicy | None = None,
                 endpoint: str | None = None):
        """``client``: a boto3 S3 client, made by :func:`make_s3_client` when None (pass one made
        there, so that it carries ``policy``); ``policy``: the retry policy of that client; ``endpoint``:
        the S3 endpoint URL where the environment names none (see :func:`make_s3_client`)."""
        self.bucket = bucket
        self.label = f"s3://{bucket}"
        self._client = client
        self.policy = policy or RetryPolicy.from_env()
        self.endpoint = endpoint

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_s3_client(self.policy, endpoint=self.endpoint)
        return self._client

    # -- error mapping: every call of this class goes through here, once; botocore retries inside
    def _call(self, what: str, key: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"s3://{self.bucket}/{key}"
        try:
            try:
                return fn(*args, **kwargs)
            except S3UploadFailedError as wrapped:  # upload_file hides the ClientError: classify that
                if isinstance(wrapped.__context__, ClientError):
                    raise wrapped.__context__ from None
                raise
        except NoCredentialsError:
            raise StorageError(f"no S3 credentials to {what} {where}",
                               hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in a pod: the "
                                    "credentials Secret)") from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _PERMANENT or status in (400, 401, 403, 404):
                raise StorageError(f"cannot {what} {where}: {_explain(code, status)}",
                                   hint=_fix_for(code, status)) from None
            last = f"{code or status}"
        except (BotoCoreError, RetriesExceededError, S3UploadFailedError) as err:
            last = type(err).__name__  # connection, timeout, broken stream; the last two: transfer manager
        raise TransientError(f"cannot {what} {where}: storage unavailable ({last}) after "
                             f"{self.policy.attempts} attempts",
                             hint="check that the S3 endpoint is up; the Job retries transient failures")

    def put_file(self, path: str | Path, key: str, progress: Progress | None = None) -> None:
        """``progress(n)`` sees the bytes of each part as it is sent (negative when a part is resent)."""
        self._call("upload to", key, self.client.upload_file, str(path), self.bucket, key,
                   **({"Callback": progress} if progress is not None else {}))

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=key, Body=data, **extra)

    def get_file(self, key: str, dest: str | Path, progress: Progress | None = None) -> None:
        """One object into ``dest`` (via ``dest.part``): one ranged GET per part, resumed where a
        stream broke, under :attr:`policy` (never the transfer manager's own download retries)."""
        download_file_ranged(self, key, dest, workers=1, progress=progress)

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if no object has that name (``If-None-Match: *``); False if one did."""
        return self._conditional_put(key, data, IfNoneMatch="*")

    def get_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """(content, ETag) of ``key``; (None, None) when absent."""
        from botocore.exceptions import ClientError

        def get() -> tuple[bytes | None, str | None]:
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as err:
                if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None, None
                raise
            return bytes(r["Body"].read()), str(r["ETag"])

        return self._call("read", key, get)

    def put_bytes_if_match(self, key: str, data: bytes, tag: str | None) -> bool:
        """Replace ``key`` only if its ETag is still ``tag`` (None: only if absent); False otherwise."""
        return self._conditional_put(key, data, **({"IfMatch": tag} if tag else {"IfNoneMatch": "*"}))

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> bool:
        from botocore.exceptions import ClientError

        def put() -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **condition)
            except ClientError as err:
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                # 412: the condition failed; 409: a concurrent conditional write won (AWS)
                if status in (409, 412) or err.response.get("Error", {}).get("Code") in (
                        "PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                if status == 404 and "IfMatch" in condition:  # the object went away: not ours to write
                    return False
                raise
            return True

        return self._call("write", key, put)

    def get_bytes(self, key: str) -> bytes:
        return self._call("read", key, lambda: bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()))

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=key)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
                return True
            except ClientError as err:
                if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) == 404:
                    return False
                raise

        return self._call("check", key, head)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        def run() -> builtins.list[ObjectInfo]:
            out: builtins.list[ObjectInfo] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                out.extend(ObjectInfo(o["Key"], o["Size"], o["LastModified"].timestamp() if o.get("LastModified")
                                      else None, o.get("ETag")) for o in page.get("Contents", []))
            return out
        return self._call("list", prefix, run)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        pre = prefix.rstrip("/") + "/" if prefix else ""

        def run() -> builtins.list[str]:
            out: builtins.list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=pre, Delimiter="/"):
                out.extend(p["Prefix"][len(pre):].rstrip("/") for p in page.get("CommonPrefixes", []))
            return sorted(out)
        return self._call("list", pre, run)


#: Either store: what the job and the launcher hold (:func:`open_store`).
Store = Union[LocalStore, S3Store]


def _explain(code: str, status: int) -> str:
    if code in ("NoSuchBucket",):
        return "the bucket does not exist"
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return "no such object"
    if code in ("InvalidAccessKeyId",):
        return "the access key is not known to the endpoint"
    if code in ("SignatureDoesNotMatch",):
        return "the secret key does not match the access key"
    return "access denied" if status in (401, 403) or code == "AccessDenied" else f"refused ({code or status})"


def _fix_for(code: str, status: int) -> str:
    if code == "NoSuchBucket":
        return "create the bucket or fix the bucket name in the spec"
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return "check the key in the spec; `aws s3 ls` the prefix to see what is there"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return "check the credentials Secret (keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    return "grant the credentials read/write on this bucket and prefix"


def install_retry_policy(client: Any, policy: RetryPolicy) -> None:
    """Put ``policy`` into ``client``'s botocore retry hook, in place of botocore's own waits.

    The client was made in botocore's ``legacy`` retry mode (which classifies errors by its ``_retry.json``:
    connection errors, timeouts, 500/502/503/504, throttling and ``RequestTimeout`` codes, and has no retry
    quota that could cut retries short during an outage); its handler is replaced by one with the same checks
    and the policy's waits."""
    from botocore import loaders, retryhandler, translate

    if (client.meta.config.retries or {}).get("mode") != "legacy":
        raise ValueError("install_retry_policy needs a client made with retries={'mode': 'legacy', ...}")
    model = client.meta.service_model
    name, prefix = model.service_id.hyphenize(), model.endpoint_prefix
    data = loaders.create_loader().load_data("_retry")
    config = translate.build_retry_config(prefix, data.get("retry", {}), data.get("definitions", {}),
                                          {"max_attempts": policy.attempts - 1})
    handler = retryhandler.RetryHandler(
        checker=retryhandler.create_checker_from_retry_config(config, operation_name=prefix),
        action=policy.delay)
    client.meta.events.unregister(f"needs-retry.{name}", unique_id=f"retry-config-{name}")
    client.meta.events.register(f"needs-retry.{name}", handler, unique_id=f"retry-config-{name}")


def make_s3_client(policy: RetryPolicy | None = None, endpoint: str | None = None) -> Any:
    """A boto3 S3 client from the standard AWS environment, path-style for MinIO and friends,
    retrying by ``policy`` (default :meth:`RetryPolicy.from_env`). ``endpoint`` is used where the
    environment names none (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` win): the launcher passes its
    ``s3_endpoint`` setting here rather than writing it into the process environment."""
    import boto3
    from botocore.config import Config

    policy = policy or RetryPolicy.from_env()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or endpoint or None
    cfg = Config(s3={"addressing_style": "path"}, retries={"mode": "legacy", "total_max_attempts": policy.attempts},
                 connect_timeout=policy.connect_timeout, read_timeout=policy.read_timeout, max_pool_connections=32,
                 # checksum-on-every-request is not supported by every S3-compatible server
                 request_checksum_calculation="when_required", response_checksum_validation="when_required")
    client = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"),
                          config=cfg)
    install_retry_policy(client, policy)
    return client


def open_store(uri: str, *, endpoint: str | None = None) -> tuple[Store, str]:
    """(store, key_prefix) for an s3:// URI or a local path; ``endpoint``: see :func:`make_s3_client`."""
    scheme, bucket, key = parse_uri(uri)
    if scheme == "s3":
        return S3Store(bucket, endpoint=endpoint), key.strip("/")
    return LocalStore(key), ""


class _Cancelled(Exception):
    """Another part failed: stop this one (never leaves download_file_ranged)."""


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes (so a full disk fails now, with ENOSPC); extend where fallocate is not supported."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def _stream_readinto(body: Any) -> Callable[[memoryview], int]:
    """``readinto(view) -> n`` for a GetObject body, 0 at its end.

    botocore's ``StreamingBody.read(n)`` allocates and copies every chunk twice
    (http.client, then urllib3); where the body is the usual urllib3 response over an
    ``http.client.HTTPResponse`` (botocore does not decode content), read straight
    from the latter into the caller's buffer: about a quarter less client CPU on the
    benchmark. A socket error there is re-raised as botocore's ResponseStreamingError,
    so the retry logic sees the same exception either way.
    """
    import http.client

    from botocore.exceptions import ResponseStreamingError

    fp = getattr(getattr(body, "_raw_stream", None), "_fp", None)
    if isinstance(fp, http.client.HTTPResponse) and not fp.chunked:
        def readinto(view: memoryview) -> int:
            try:
                return fp.readinto(view)
            except (OSError, http.client.HTTPException) as err:
                raise ResponseStreamingError(error=err) from None
        return readinto

    def read_copy(view: memoryview) -> int:
        data = body.read(len(view))
        view[:len(data)] = data
        return len(data)
    return read_copy


def download_file_ranged(store: Store, key: str, dest: str | Path, *, part_size: int = RANGED_PART_SIZE,
                         workers: int = RANGED_WORKERS, read_size: int = RANGED_READ_SIZE,
                         progress: Progress | None = None) -> Path:
    """Download one (large) object with parallel ranged GETs written in place into ``dest``.

    The object's size and ETag come from one HEAD. ``dest.part`` is preallocated to the
    full size, then ``workers`` threads each GET one ``part_size`` range (``If-Match``
    the ETag, so an object replaced mid-download is never stitched from two versions)
    and ``os.pwrite`` it at its offset as it streams: no temporary copies. A part whose
    connection fails or stalls (the client's read timeout) is retried from the byte it
    had reached (botocore retries the GET under the store's :class:`RetryPolicy`; a stream
    that breaks after bytes arrived resumes, at most ``policy.resumes`` times per part; one whose
    body stalls before its first byte is sent again, up to ``policy.attempts`` times with the policy's waits),
    with the error mapping of every other call here: missing/denied → :class:`StorageError`,
    still failing → :class:`TransientError`.
    The byte count is verified, then ``dest.part`` is renamed to ``dest``; on any
    failure it is removed. ``progress(n)`` (e.g. a :class:`TransferProgress`) sees every chunk written. A :class:`LocalStore` just copies the file.
    """
    if part_size < 1 or workers < 1 or read_size < 1:
        raise ValueError("part_size, workers and read_size must be positive")
    dest = Path(dest)
    if not isinstance(store, S3Store):
        store.get_file(key, dest, progress=progress)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    client = store.client
    head = store._call("download", key, client.head_object, Bucket=store.bucket, Key=key)
    size, etag = int(head["ContentLength"]), head.get("ETag")
    where = f"s3://{store.bucket}/{key}"
    tmp = Path(f"{dest}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    stop = threading.Event()
    try:
        _preallocate(fd, size)

        def part(start: int, end: int) -> int:  # [start, end)
            reached = start  # kept across retries: a retry resumes where the stream broke
            streaming = False  # this attempt's GET answered: a failure now is the body's, which botocore never retries

            def attempt() -> None:
                nonlocal reached, streaming
                from botocore.exceptions import ClientError, IncompleteReadError

                streaming = False
                if stop.is_set():
                    raise _Cancelled
                extra = {"IfMatch": etag} if etag else {}
                try:
                    resp = client.get_object(Bucket=store.bucket, Key=key, Range=f"bytes={reached}-{end - 1}",
                                             **extra)
                except ClientError as err:
                    if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 412:
                        raise
                    raise TransientError(f"cannot download {where}: the object was replaced during the download "
                                         f"(ETag {etag} no longer matches)",
                                         hint="the Job retries and then downloads the new version") from None
                body = resp["Body"]
                streaming = True
                complete = False
                try:
                    want = f"bytes {reached}-{end - 1}/{size}"
                    if resp.get("ContentRange") != want:
                        raise StorageError(f"cannot download {where}: asked for {want}, the server sent "
                                           f"{resp.get('ContentRange') or 'the whole object'}",
                                           hint="the S3 endpoint must support ranged GETs")
                    readinto, buf = _stream_readinto(body), memoryview(bytearray(min(read_size, end - reached)))
                    while reached < end:
                        if stop.is_set():
                            raise _Cancelled
                        got = readinto(buf[:min(len(buf), end - reached)])
                        if not got:
                            raise IncompleteReadError(actual_bytes=reached - start, expected_bytes=end - start)
                        view, off = buf[:got], reached
                        while view:
                            n = os.pwrite(fd, view, off)
                            view, off = view[n:], off + n
                        reached += got
                        if progress is not None:
                            progress(got)
                    complete = True
                finally:
                    release = getattr(getattr(body, "_raw_stream", None), "release_conn", None) if complete else None
                    if release is not None:
                        release()  # the whole range was read: the connection goes back to the pool
                    else:
                        body.close()

            resumed = stalled = 0
            while True:  # botocore retries the GET itself; a stream that breaks after bytes arrived resumes here
                before = reached
                try:
                    store._call("download", key, attempt)
                    return reached - start
                except TransientError:
                    if reached > before and resumed < store.policy.resumes:
                        resumed += 1
                        continue
                    # the GET was answered and then its body stalled before a byte came (an endpoint that stops
                    # right after the headers): botocore does not retry a body, so this loop does, under the
                    # policy's attempts and waits
                    if reached == before and streaming and stalled + 1 < store.policy.attempts and not stop.is_set():
                        stalled += 1
                        time.sleep(store.policy.delay(stalled))
                        continue
                    raise

        spans = [(off, min(off + part_size, size)) for off in range(0, size, part_size)]
        got = 0
        if spans:
            pool = ThreadPoolExecutor(max_workers=min(workers, len(spans)), thread_name_prefix="s3-range")
            try:  # as completed: the first failure seen is the cause (the others are then _Cancelled)
                for fut in as_completed([pool.submit(part, a, b) for a, b in spans]):
                    got += fut.result()
            except BaseException:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
        if got != size or os.fstat(fd).st_size != size:
            raise TransientError(f"cannot download {where}: got {got} of {size} bytes "
                                 f"({os.fstat(fd).st_size} on disk)", hint="the Job retries transient failures")
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, dest)
    return dest


def safe_relative_path(rel: str, what: str) -> Path:
    """``rel`` (an object key below a prefix, or a manifest entry) as a path that stays inside the
    folder it is joined to. Refuses absolute paths, ``..`` and ``.`` segments, empty segments and
    backslashes, naming ``what`` (the bucket/key or manifest) — S3 itself allows all of these."""
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts)
            or Path(rel).is_absolute()):
        raise StorageError(f"{what} names an unsafe path {rel!r} (absolute, '..', '.', '//' or '\\\\')",
                           hint="that object could write outside the download folder; remove or rename it")
    return Path(*parts)


def download_prefix(store: Store, prefix: str, dest: str | Path, workers: int = 8, *,
                    ranged_threshold: int = RANGED_THRESHOLD, progress: Progress | None = None) -> list[Path]:
    """Download every object under ``prefix`` into ``dest`` (keys relative to the prefix).

    Small objects go ``workers`` at a time through ``get_file``; meanwhile objects of at
    least ``ranged_threshold`` bytes (S3 only) are fetched one after another, each with
    :func:`download_file_ranged` (its own parallel ranged GETs).
    """
    objs = [o for o in store.list(prefix) if not o.key.endswith("/")]
    if not objs:
        raise StorageError(f"nothing found under {store.label}/{prefix}", hint="check the path in the spec")
    dest = Path(dest)
    pre = prefix.strip("/")

    def target(o: ObjectInfo) -> Path:
        rel = o.key[len(pre):].lstrip("/") if pre and o.key != pre else Path(o.key).name
        return dest / safe_relative_path(rel, f"{store.label}/{o.key}")

    for o in objs:  # every key is checked before anything is written
        target(o)

    def one(o: ObjectInfo) -> Path:
        store.get_file(o.key, target(o), progress=progress)
        return target(o)

    big = [o for o in objs if isinstance(store, S3Store) and o.size >= ranged_threshold]
    big_keys = {o.key for o in big}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        small = [pool.submit(one, o) for o in objs if o.key not in big_keys]
        for o in big:
            download_file_ranged(store, o.key, target(o), progress=progress)
        for fut in small:
            fut.result()
    return [target(o) for o in objs]


def upload_dir(store: Store, src: str | Path, prefix: str, files: Iterable[Path] | None = None, workers: int = 8,
               progress: Progress | None = None) -> None:
    src = Path(src)
    files = list(files) if files is not None else sorted(p for p in src.rglob("*") if p.is_file())

    def one(p: Path) -> None:
        store.put_file(p, join(prefix, str(p.relative_to(src))), progress=progress)

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        list(pool.map(one, files))
    finally:  # on a failure or Ctrl-C, the files not yet started are not sent (the caller cleans up)
        pool.shutdown(wait=True, cancel_futures=True)
