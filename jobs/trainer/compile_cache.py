"""Warm start: torch.compile's artifacts, saved next to the checkpoints and restored by a retry or a rerun.

The first optimizer step of a compiled run pays one to two minutes of compilation (dynamo,
AOTAutograd, inductor, Triton). torch's portable cache (``torch.compiler.save_cache_artifacts`` /
``load_cache_artifacts``) serialises what inductor and AOTAutograd produced, Triton binaries
included, into one blob; loaded before the first compile, inductor finds its graphs and kernels and
only dynamo's tracing is paid again.

Where: ``<output>/<run>/compile-cache/<key>.bin`` beside ``checkpoints/``, where the key is a hash of
everything that changes the compiled graphs (torch, Triton and CUDA versions, the GPU, the model's
config, the LoRA settings, dtype, FP8, checkpointing). So a retried pod finds it, and so does a rerun
of the same run name with the same shapes (more epochs, other data): its spec hash differs, its
graphs do not.

One blob, every batch: ``save_cache_artifacts`` appends one batch per kind of artifact at each call
(the first step's graphs, then the validation graphs at the end), and torch 2.11's
``load_cache_artifacts`` reads the batches into a dict, keeping only the *last* batch of each kind; a
twice-saved blob then restored only the validation graphs and every training graph compiled again (the
8B job's "warm" first steps of 76-125 s). :func:`one_batch_per_kind` merges the batches before a blob
is written and again before one is loaded.

Trust: checkpoints are safetensors and JSON only, because anything that can write the bucket must
not be able to run code in the next pod. These artifacts *are* code (inductor's output is Python
source, the kernels are binaries), so a blob is loaded only when its HMAC-SHA256 verifies under a
key that the run's pods hold and a bucket writer does not: ``$LORA_JOBS_COMPILE_CACHE_KEY``, else
the object store's secret key (``$AWS_SECRET_ACCESS_KEY``). With neither there is no cache, and a
blob that does not verify is ignored with a warning. Every failure here is a log line: a cache
never fails or changes a run, it only makes its first step shorter.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time

from jobs.formatting import size

log = logging.getLogger("jobs")

KEY_ENV = "LORA_JOBS_COMPILE_CACHE_KEY"
FOLDER = "compile-cache"
MAGIC = b"lora-jobs compile cache v1\n"


def signing_key(env=os.environ) -> bytes | None:
    """The HMAC key: ``$LORA_JOBS_COMPILE_CACHE_KEY``, else the object store's secret key, else None."""
    key = env.get(KEY_ENV) or env.get("AWS_SECRET_ACCESS_KEY")
    return key.encode() if key else None


def seal(payload: bytes, key: bytes) -> bytes:
    return MAGIC + hmac.new(key, payload, hashlib.sha256).digest() + payload


def unseal(blob: bytes, key: bytes) -> bytes | None:
    """The payload of a sealed blob, or None when it was not sealed with ``key`` (or was changed since)."""
    head = len(MAGIC) + 32
    if len(blob) < head or not blob.startswith(MAGIC):
        return None
    mac, payload = blob[len(MAGIC):head], blob[head:]
    return payload if hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()) else None


def cache_key(model_config: dict, facts: dict) -> str:
    """A short hash of the model's config and of the facts that shape the compiled graphs."""
    import torch

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        versions["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - no Triton: no inductor GPU kernels either
        pass
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
    blob = json.dumps({"model": model_config, "facts": facts, "versions": versions}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def compile_phases(top: int = 6) -> dict[str, float]:
    """Seconds spent so far in torch.compile's timed phases (dynamo's ``compilation_time_metrics``: tracing,
    AOTAutograd, inductor's lowering and code generation, waiting for Triton), the largest ``top``;
    empty where torch has no such timers."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except Exception:  # noqa: BLE001
        return {}
    totals = {name: round(sum(times), 1) for name, times in compilation_time_metrics.items() if times}
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])


def compile_counters() -> dict[str, int]:
    """How many graphs dynamo captured so far and where inductor and AOTAutograd found them (their own
    caches, warm from a restored blob, or compiled now); empty where torch has no such counters."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return {}
    picks = {"graphs": ("stats", "unique_graphs"), "inductor_hits": ("inductor", "fxgraph_cache_hit"),
             "inductor_misses": ("inductor", "fxgraph_cache_miss"),
             "aot_autograd_hits": ("aot_autograd", "autograd_cache_hit"),
             "aot_autograd_misses": ("aot_autograd", "autograd_cache_miss")}
    return {name: int(counters[group][key]) for name, (group, key) in picks.items() if counters[group][key]}


def one_batch_per_kind(payload: bytes) -> bytes:
    """The payload with its appended batches merged into one per kind of artifact (see the module's
    docstring). Reads torch's own serialisation with its private helpers; where they are missing or the
    payload is not theirs, the payload comes back unchanged (the cache is then as good as torch's)."""
    try:
        from torch.compiler._cache import CacheArtifactManager, _deserialize_single_cache, _serialize_single_cache
        from torch.utils._appending_byte_serializer import AppendingByteSerializer

        CacheArtifactManager._ensure_cache_artifacts_registered()
        batches = AppendingByteSerializer.to_list(payload, deserialize_fn=_deserialize_single_cache)
    except Exception as err:  # noqa: BLE001 - another torch: leave it as it is
        log.debug("compile cache: payload left as torch wrote it (%s: %s)", type(err).__name__, err)
        return payload
    merged: dict[str, list] = {}
    for kind, artifacts in batches:
        merged.setdefault(kind, []).extend(artifacts)
    if len(merged) == len(batches):
        return payload
    out = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    out.extend(merged.items())
    return out.to_bytes()


class CompileCache:
    """One run's compile artifacts in the object store. ``restore`` before the first compiled step,
    ``save`` after it (and after training, for the validation graphs); both only log on failure."""

    def __init__(self, store, run_prefix: str, key: str, secret: bytes | None, *, writer: bool = True):
        from jobs.storage import join

        self.store, self.secret, self.writer = store, secret, writer
        self.object_key = join(run_prefix, FOLDER, f"{key}.bin")
        self.where = f"{getattr(store, 'label', '')}/{self.object_key}"
        self.restored_bytes = 0
        self.saved_bytes = 0
        self.restore_seconds: float | None = None
        self.outcome = "not tried"
        self.phases: dict[str, float] | None = None  # where the first step's compile time went
        self.counters: dict[str, int] = {}  # graphs captured by then, and the caches' hits and misses

    def summary(self) -> dict:
        return {"object": self.where, "outcome": self.outcome, "restored_bytes": self.restored_bytes,
                "saved_bytes": self.saved_bytes, "restore_seconds": self.restore_seconds, "phases_first_save": self.phases,
                "counters_first_save": self.counters}

    def restore(self) -> bool:
        if self.secret is None:
            self.outcome = "off (no key)"
            log.info("compile cache off: neither $%s nor $AWS_SECRET_ACCESS_KEY is set, so a cached artifact "
                     "could not be verified; the first step compiles from scratch", KEY_ENV)
            return False
        t0 = time.perf_counter()
        try:
            if not self.store.exists(self.object_key):
                self.outcome = "cold (none saved yet)"
                return False
            blob = self.store.get_bytes(self.object_key)
        except Exception as err:  # noqa: BLE001 - a cache the store cannot serve is no cache
            self.outcome = f"cold (read failed: {type(err).__name__})"
            log.warning("compile cache %s could not be read (%s: %s); compiling from scratch", self.where,
                        type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            return False
        payload = unseal(blob, self.secret)
        if payload is None:
            self.outcome = "refused (signature does not verify)"
            log.warning("compile cache %s is not signed with this run's key (written by someone else, or "
                        "changed): it is not loaded; compiling from scratch", self.where)
            return False
        import torch

        try:
            torch.compiler.load_cache_artifacts(one_batch_per_kind(payload))
        except Exception as err:  # noqa: BLE001 - another torch's format, a corrupt entry
            self.outcome = f"cold (load failed: {type(err).__name__})"
            log.warning("compile cache %s could not be loaded (%s: %s); compiling from scratch", self.where,
                        type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            return False
        self.restored_bytes = len(payload)
        self.restore_seconds = round(time.perf_counter() - t0, 2)
        self.outcome = "warm"
        log.info("compile cache: %s of compiled graphs and kernels restored from %s in %.1fs",
                 size(len(payload)), self.where, self.restore_seconds)
        return True

    def save(self) -> int:
        """Write what this process compiled so far, when it is more than what is stored; returns bytes written."""
        if self.phases is None:
            self.phases = compile_phases()
            self.counters = compile_counters()
            if self.phases:
                log.info("compile time so far by phase (torch._dynamo's timers; nested, so they overlap): %s; %s",
                         ", ".join(f"{k} {v:.1f}s" for k, v in self.phases.items()),
                         ", ".join(f"{k} {v}" for k, v in self.counters.items()) or "no graph counters")
        if self.secret is None or not self.writer:
            return 0
        import torch

        try:
            got = torch.compiler.save_cache_artifacts()
        except Exception as err:  # noqa: BLE001
            log.warning("compile cache not saved (%s: %s)", type(err).__name__, str(err).splitlines()[0][:200])
            return 0
        if not got:
            return 0
        payload = one_batch_per_kind(got[0])
        if len(payload) <= max(self.saved_bytes, self.restored_bytes):
            return 0  # nothing new since the last save (or than what was restored)
        try:
            self.store.put_bytes(self.object_key, seal(payload, self.secret))
        except Exception as err:  # noqa: BLE001
            log.warning("compile cache not saved to %s (%s: %s)", self.where, type(err).__name__,
                        str(err).splitlines()[0][:200] if str(err) else "")
            return 0
        self.saved_bytes = len(payload)
        log.info("compile cache: %s saved to %s", size(len(payload)), self.where)
        return len(payload)
