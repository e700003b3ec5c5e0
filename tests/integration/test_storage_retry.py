"""The one S3 retry policy (jobs.retry.RetryPolicy), measured against real endpoints.

Every S3Store call that cannot reach its endpoint sends exactly ``policy.attempts``
requests (botocore's retries, no loop of ours stacked on them), waits at least the
policy's shortest backoff and gives up within its stated worst case, and raises
TransientError (exit 75), never a raw botocore exception. A MinIO that hangs
(SIGSTOP: connections accepted, nothing answered) is given up on within
``worst_case_stall()``, each attempt cut by the read timeout.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from jobs.errors import StorageError, TransientError
from jobs.retry import RetryPolicy
from jobs.storage import S3Store, download_file_ranged, make_s3_client

pytestmark = pytest.mark.s3


def _closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _counting_store(policy: RetryPolicy, bucket: str = "lora-jobs") -> tuple[S3Store, list[float]]:
    client = make_s3_client(policy)
    sends: list[float] = []
    client.meta.events.register("before-send.s3", lambda request, **_: sends.append(time.monotonic()))
    return S3Store(bucket, client=client, policy=policy), sends


CALLS = {
    "exists": lambda st, tmp: st.exists("k"),
    "get_bytes": lambda st, tmp: st.get_bytes("k"),
    "get_file": lambda st, tmp: st.get_file("k", tmp / "f"),
    "download_file_ranged": lambda st, tmp: download_file_ranged(st, "k", tmp / "r"),
    "put_bytes": lambda st, tmp: st.put_bytes("k", b"x"),
    "put_file": lambda st, tmp: st.put_file(Path(__file__), "k"),
    "put_bytes_if_absent": lambda st, tmp: st.put_bytes_if_absent("k", b"x"),
    "get_versioned": lambda st, tmp: st.get_versioned("k"),
    "list": lambda st, tmp: st.list("p/"),
    "list_dirs": lambda st, tmp: st.list_dirs("p"),
    "delete": lambda st, tmp: st.delete("k"),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_every_call_to_a_dead_endpoint_sends_attempts_requests_then_raises_transient(call, stack, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", stack.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", stack.s3_secret_key)
    policy = RetryPolicy(attempts=4, connect_timeout=1, read_timeout=1, base_delay=0.1)
    store, sends = _counting_store(policy)

    t0 = time.monotonic()
    with pytest.raises(TransientError) as err:
        CALLS[call](store, tmp_path)
    took = time.monotonic() - t0

    assert len(sends) == policy.attempts, f"{len(sends)} requests sent: retries are stacked or missing"
    waits = [b - a for a, b in zip(sends, sends[1:])]
    assert all(w >= 0.5 * policy.base_delay * 2 ** i for i, w in enumerate(waits)), waits
    assert policy.shortest_outage_ridden() <= took <= policy.worst_case_stall()
    assert "storage unavailable" in str(err.value) and f"after {policy.attempts} attempts" in str(err.value)
    assert stack.s3_secret_key not in str(err.value)
    assert not list(tmp_path.iterdir()), "a failed download left a file behind"


def test_a_hung_endpoint_is_given_up_within_the_stated_worst_case(stack, s3_env, s3_prefix):
    """MinIO SIGSTOPped for the whole call: each attempt ends at the read timeout."""
    bucket, _, prefix = s3_prefix[5:].partition("/")
    key = f"{prefix}/hung.txt"
    S3Store(bucket).put_bytes(key, b"hello")
    policy = RetryPolicy(attempts=3, connect_timeout=1, read_timeout=1, base_delay=0.2)
    store, sends = _counting_store(policy, bucket)
    assert store.get_bytes(key) == b"hello"  # the connection is in the pool before MinIO stops
    sends.clear()

    pid = int(Path(stack.env()["STACK_MINIO_PID_FILE"]).read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(TransientError, match="ReadTimeoutError|ConnectTimeoutError"):
            store.get_bytes(key)
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)

    assert len(sends) == policy.attempts
    assert policy.attempts * policy.read_timeout <= took <= policy.worst_case_stall() + 0.5, took
    assert store.get_bytes(key) == b"hello", "MinIO answers again after SIGCONT"


def test_the_default_policy_keeps_the_promise_of_docs_reliability():
    """docs/reliability.md states these numbers; this keeps the defaults and the page in step."""
    policy = RetryPolicy()
    assert (policy.attempts, policy.connect_timeout, policy.read_timeout) == (7, 5.0, 20.0)
    assert policy.worst_case_stall() == 238.0 and policy.worst_case_stall() <= 300
    assert policy.shortest_outage_ridden() == 31.5
    page = (Path(__file__).parents[2] / "docs" / "reliability.md").read_text()
    assert "238 s" in page and "31.5 s" in page


def test_attempts_from_the_environment_and_a_bad_value_named(monkeypatch):
    monkeypatch.setenv("LORA_JOBS_S3_ATTEMPTS", "2")
    assert RetryPolicy.from_env().attempts == 2
    monkeypatch.setenv("LORA_JOBS_S3_ATTEMPTS", "lots")
    with pytest.raises(StorageError, match="LORA_JOBS_S3_ATTEMPTS='lots' is not a whole number"):
        RetryPolicy.from_env()
