"""One job's base-model fetch through the node cache (jobs.model_cache), counting the bytes the S3 store sent.

Imported by the tests (``fetch``), and run as a process of its own to stand for a job on the same node:
``python cache_fetch.py URI CACHE_ROOT DEST MAX_BYTES [--ready FILE --go FILE] [--slow SECONDS]`` prints the result
as one JSON line. ``--ready``/``--go``: make FILE once imported, then start once the go FILE exists (two processes
start together); ``--slow``: a download into the cache waits that long first (a slow link), so that a second job
surely finds the first one downloading.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def fetch(uri: str, root: Path | None, dest: Path, max_bytes: int = 2**30):
    """(BaseModel, bytes the store sent in GetObject responses) for the model folder at ``uri``."""
    from jobs.model_cache import CacheConfig, fetch_base_model
    from jobs.storage import download_prefix, open_store

    store, prefix = open_store(uri)
    prefix = prefix.rstrip("/") + "/"
    sent: list[int] = []
    store.client.meta.events.register("after-call.s3.GetObject",
                                      lambda parsed, **_: sent.append(int(parsed.get("ContentLength") or 0)))
    objs = store.list(prefix)
    got = fetch_base_model(store, prefix, objs, dest, lambda d: download_prefix(store, prefix, d),
                           CacheConfig(root, max_bytes) if root is not None else None)
    return got, sum(sent)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("root", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("max_bytes", type=int)
    ap.add_argument("--ready", type=Path)
    ap.add_argument("--go", type=Path)
    ap.add_argument("--slow", type=float, default=0.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    import boto3  # noqa: F401 - imported before the start signal, so that both processes start level
    import jobs.model_cache as mc

    if args.slow:
        real = mc.download_prefix

        def slow(*a, **kw):
            time.sleep(args.slow)
            return real(*a, **kw)
        mc.download_prefix = slow
    if args.ready is not None:
        args.ready.touch()
    while args.go is not None and not args.go.exists():
        time.sleep(0.01)
    got, sent = fetch(args.uri, args.root, args.dest, args.max_bytes)
    print(json.dumps({**got.record(), "path": str(got.path), "sha256": got.sha256, "sent": sent}))


if __name__ == "__main__":
    main()
