"""download_file_ranged and download_prefix's large-object path against the real MinIO.

Exact bytes for sizes around the part boundaries (0 bytes included), a missing key,
and MinIO paused (SIGSTOP) in the middle of a download: the stalled parts time out,
are retried, and the file still comes out byte for byte.
"""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from jobs.errors import StorageError, TransientError
from jobs.retry import RetryPolicy
from jobs.storage import S3Store, TransferProgress, download_file_ranged, download_prefix, install_retry_policy

pytestmark = pytest.mark.s3

PART = 1 << 20


def _client(stack, policy: RetryPolicy | None = None):
    """A client of the stack's MinIO that retries by ``policy`` (the job's default when None)."""
    import boto3
    from botocore.config import Config

    policy = policy or RetryPolicy()
    client = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.s3_access_key,
                          aws_secret_access_key=stack.s3_secret_key, region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}, max_pool_connections=32,
                                        connect_timeout=policy.connect_timeout, read_timeout=policy.read_timeout,
                                        retries={"mode": "legacy", "total_max_attempts": policy.attempts}))
    install_retry_policy(client, policy)
    return client


def _count_gets(client) -> list[str]:
    """The Range header of every GetObject request the client sends (retries included)."""
    ranges: list[str] = []

    def hook(request, **_):
        value = request.headers.get("Range", "")
        ranges.append(value.decode() if isinstance(value, bytes) else str(value))

    client.meta.events.register("before-send.s3.GetObject", hook)
    return ranges


def _key(s3_prefix: str, name: str) -> tuple[str, str]:
    bucket, _, rest = s3_prefix[5:].partition("/")
    return bucket, f"{rest}/{name}"


@pytest.mark.parametrize("size", [0, 1, PART - 1, PART, PART + 1, 3 * PART, 3 * PART + 12345])
def test_exact_bytes_around_part_boundaries(stack, s3_prefix, tmp_path, size):
    client = _client(stack)
    bucket, key = _key(s3_prefix, f"obj-{size}")
    data = os.urandom(size)
    client.put_object(Bucket=bucket, Key=key, Body=data)
    ranges = _count_gets(client)

    dest = tmp_path / "sub" / "out.bin"
    moved = TransferProgress("downloading", size)
    got = download_file_ranged(S3Store(bucket, client=client), key, dest, part_size=PART, workers=3, progress=moved)
    assert moved.done == size

    assert got == dest
    assert dest.stat().st_size == size
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert not Path(f"{dest}.part").exists()
    assert len(ranges) == -(-size // PART)  # one GET per part, none for an empty object
    assert all(r.startswith("bytes=") for r in ranges)


def test_missing_key_is_a_storage_error_naming_bucket_and_key(stack, s3_prefix, tmp_path):
    bucket, key = _key(s3_prefix, "no-such-object.safetensors")
    dest = tmp_path / "out.bin"
    with pytest.raises(StorageError) as err:
        download_file_ranged(S3Store(bucket, client=_client(stack)), key, dest, part_size=PART, workers=2)
    assert f"s3://{bucket}/{key}" in str(err.value)
    assert "no such object" in str(err.value)
    assert not dest.exists() and not Path(f"{dest}.part").exists()


def test_download_prefix_sends_large_objects_through_ranged_gets(stack, s3_prefix, tmp_path):
    client = _client(stack)
    bucket, _ = _key(s3_prefix, "x")
    files = {"config.json": b'{"a": 1}', "model-00001.safetensors": os.urandom(5 * PART + 7),
             "model-00002.safetensors": os.urandom(2 * PART), "tok/tokenizer.json": os.urandom(1000)}
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=_key(s3_prefix, rel)[1], Body=data)
    ranges = _count_gets(client)

    got = download_prefix(S3Store(bucket, client=client), _key(s3_prefix, "")[1], tmp_path / "m",
                          workers=4, ranged_threshold=2 * PART)

    assert sorted(str(p.relative_to(tmp_path / "m")) for p in got) == sorted(files)
    for rel, data in files.items():
        assert (tmp_path / "m" / rel).read_bytes() == data
    # Every object is one ranged GET of its whole span: the two large ones (RANGED_PART_SIZE > 5 MiB)
    # through download_file_ranged's parallel path, the two small ones through get_file, which is the same
    # resumable path with one worker (never the transfer manager's own retry loop).
    assert sorted(ranges) == sorted(f"bytes=0-{len(d) - 1}" for d in files.values()), ranges


def test_minio_paused_mid_download_is_retried_and_completes(stack, s3_prefix, tmp_path, monkeypatch):
    """SIGSTOP MinIO when the 3rd part's GET goes out, SIGCONT 4 s later.

    A client with a 1 s read timeout sees the stall as timeouts; botocore retries the GETs under the
    policy's waits (0.5-1 s, 1-2 s, ...), and the parts that broke mid-stream resume where they were.
    """
    pid = int(Path(stack.env()["STACK_MINIO_PID_FILE"]).read_text().strip())
    policy = RetryPolicy(attempts=8, connect_timeout=1, read_timeout=1)
    client = _client(stack, policy)
    bucket, key = _key(s3_prefix, "big.safetensors")
    size = 24 * PART + 333
    data = os.urandom(size)
    client.put_object(Bucket=bucket, Key=key, Body=data)

    pause_s = 4.0
    sends = []
    paused = threading.Event()
    resumed = threading.Event()

    def resume():
        os.kill(pid, signal.SIGCONT)
        resumed.set()

    def on_send(request, **_):
        sends.append(time.monotonic())
        if len(sends) == 3 and not paused.is_set():
            os.kill(pid, signal.SIGSTOP)
            paused.set()
            threading.Timer(pause_s, resume).start()

    client.meta.events.register("before-send.s3.GetObject", on_send)
    dest = tmp_path / "big.safetensors"
    t0 = time.monotonic()
    try:
        moved = TransferProgress("downloading", size)
        download_file_ranged(S3Store(bucket, client=client, policy=policy), key, dest, part_size=PART, workers=4,
                             progress=moved)
    finally:
        if paused.is_set() and not resumed.wait(pause_s + 5):
            os.kill(pid, signal.SIGCONT)  # never leave the shared MinIO stopped
    elapsed = time.monotonic() - t0

    assert paused.is_set() and resumed.is_set()
    assert elapsed >= pause_s
    assert dest.read_bytes() == data
    assert moved.done == size, "resumed parts count each byte once"
    parts = -(-size // PART)
    assert len(sends) > parts, f"{len(sends)} GETs for {parts} parts: nothing was retried"


def _empty_bodies(client, byte_range: str, times: int) -> list[str]:
    """The first ``times`` answers to a GET of ``byte_range`` reach the download with their body already read
    (drained here, in botocore's after-call hook): a response whose headers came and whose body then ended
    before a byte, as from an endpoint that stops right after the headers. Returns the Range of every GET."""
    ranges = _count_gets(client)
    emptied: list[int] = []

    def drain(http_response, parsed, model, context, **_):
        if http_response.status_code == 206 and parsed.get("ContentRange", "").startswith(
                f"bytes {byte_range.removeprefix('bytes=')}/") and len(emptied) < times:
            parsed["Body"].read()
            emptied.append(1)

    client.meta.events.register("after-call.s3.GetObject", drain)
    return ranges


def test_a_part_whose_body_ends_before_its_first_byte_is_sent_again_under_the_policy(stack, s3_prefix, tmp_path):
    """Found in CI (the MinIO pause test: a retried GET was answered after the pause, then its body stalled
    before a byte): botocore retries a GET, never its body, and a part that broke with no new byte was given up
    at once as "after 8 attempts". Now it is sent again under the policy's attempts and waits."""
    policy = RetryPolicy(attempts=3, connect_timeout=2, read_timeout=2, base_delay=0.05)
    client = _client(stack, policy)
    bucket, key = _key(s3_prefix, "stalls.bin")
    data = os.urandom(3 * PART)
    client.put_object(Bucket=bucket, Key=key, Body=data)
    second = f"bytes={PART}-{2 * PART - 1}"
    ranges = _empty_bodies(client, second, times=2)

    dest = tmp_path / "stalls.bin"
    download_file_ranged(S3Store(bucket, client=client, policy=policy), key, dest, part_size=PART, workers=3)

    assert dest.read_bytes() == data
    assert ranges.count(second) == 3, ranges  # two empty answers, then the part

    # every answer empty: given up after the policy's attempts, nothing left behind
    bad = tmp_path / "never.bin"
    ranges = _empty_bodies(client, second, times=10**6)
    with pytest.raises(TransientError) as err:
        download_file_ranged(S3Store(bucket, client=client, policy=policy), key, bad, part_size=PART, workers=3)
    assert f"s3://{bucket}/{key}" in str(err.value) and "after 3 attempts" in str(err.value)
    assert ranges.count(second) == 3, ranges
    assert not bad.exists() and not Path(f"{bad}.part").exists()


def test_object_replaced_mid_download_is_never_stitched(stack, s3_prefix, tmp_path):
    """The 3rd part's GET finds a new version (If-Match the first ETag fails): TransientError, no file."""
    client, other = _client(stack), _client(stack)
    bucket, key = _key(s3_prefix, "replaced.bin")
    client.put_object(Bucket=bucket, Key=key, Body=os.urandom(8 * PART))
    sends = []

    def on_send(request, **_):
        sends.append(1)
        if len(sends) == 3:
            other.put_object(Bucket=bucket, Key=key, Body=os.urandom(8 * PART))

    client.meta.events.register("before-send.s3.GetObject", on_send)
    dest = tmp_path / "replaced.bin"
    with pytest.raises(TransientError, match="replaced during the download"):
        download_file_ranged(S3Store(bucket, client=client), key, dest, part_size=PART, workers=1)
    assert not dest.exists() and not Path(f"{dest}.part").exists()


def test_bodies_without_http_client_underneath_are_read_by_copy():
    """The fallback of the zero-allocation reader: any StreamingBody (here over a BytesIO)."""
    import io

    from botocore.response import StreamingBody

    from jobs.storage import _stream_readinto

    data = os.urandom(300_000)
    readinto = _stream_readinto(StreamingBody(io.BytesIO(data), len(data)))
    buf, out = memoryview(bytearray(128 * 1024)), bytearray()
    while n := readinto(buf):
        out += buf[:n]
    assert bytes(out) == data
