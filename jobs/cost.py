"""What a run cost: GPU-hours, tokens, tokens/s/GPU, MFU and a price, from one pure function.

The job (``jobs.trainer.recipe``: metadata.json's ``cost`` and the progress object's) and the launcher (``launcher
status`` / ``list``, which adds what only the cluster knows: queue wait, every pod's running time, the price
table of setting ``gpu_prices``) both call :func:`job_cost`, so the arithmetic lives here once. Light: no
torch, no Kubernetes client; timestamps are RFC 3339 strings as the API server writes them.

* GPU-hours: GPUs × running seconds. Given ``gpu_seconds`` (the launcher's sum over every pod of its GPUs ×
  its running time, retries included) it is that; else ``gpus_per_node × nodes × seconds`` (the job's own
  wall time: one attempt).
* MFU: ``4 N`` FLOPs a token (forward 2N, backward through the frozen base 2N: no weight gradients; a
  recomputed forward under gradient checkpointing is not counted, as MFU does not count it) over the card's
  dense bf16 peak (:data:`PEAK_BF16_DENSE_TFLOPS`). N is the base model's parameter count. A card without a
  known peak (or a CPU run) has no MFU, and ``notes`` says why.
* Cost: GPU-hours × the price per GPU-hour of the card (:func:`price_for`); None when no price is set.
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from jobs.formatting import count, duration

#: Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s per GPU, by the card name :func:`card_of` gives.
#: NVIDIA's datasheets print the sparse figure; dense is half of it:
#: * H100-SXM 989.4 and H100-PCIe 756: NVIDIA H100 Tensor Core GPU datasheet, "BFLOAT16 Tensor Core 1,979 /
#:   1,513 teraFLOPS*, *with sparsity" (SXM / PCIe); the H100 whitepaper's table gives 989.4 dense at boost clock.
#: * H200 989.4: NVIDIA H200 product page, "BFLOAT16 Tensor Core 1,979 TFLOPS*" (H200 SXM, with sparsity); the
#:   same GH100 silicon and clocks as the H100 SXM.
#: * A100 312: NVIDIA A100 datasheet, "BFLOAT16 Tensor Core 312 TFLOPS | 624 TFLOPS*" (SXM and PCIe alike).
#: * L40S 362.05: NVIDIA L40S datasheet, "BFLOAT16 Tensor Core 362.05 | 733* TFLOPS".
#: Not listed on purpose (MFU None): the NVL boards (H100 NVL, H200 NVL: lower clocks), GH200, MIG slices (a
#: fraction of the card) and every other card; add one here with its datasheet line.
PEAK_BF16_DENSE_TFLOPS: dict[str, float] = {
    "H100-SXM": 989.4,
    "H100-PCIe": 756.0,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.05,
}

#: FLOPs per trained token per parameter of a frozen base under LoRA (the adapter's own FLOPs are ~0).
FLOPS_PER_TOKEN_PER_PARAM = 4


def card_of(device_name: str | None) -> str | None:
    """The card's short name from ``torch.cuda.get_device_name()``: "NVIDIA H100 80GB HBM3" → "H100-SXM",
    "NVIDIA H100 PCIe" → "H100-PCIe", "NVIDIA H200" → "H200", "NVIDIA A100-SXM4-80GB" → "A100", "NVIDIA L40S" →
    "L40S"; another card keeps its own name without the vendor ("NVIDIA L4" → "L4"); None: no GPU."""
    if not device_name or not device_name.strip():
        return None
    name = " ".join(device_name.split())
    up = name.upper()
    plain = re.sub(r"^NVIDIA\s+", "", name, flags=re.I).replace(" ", "-")
    if "MIG" in up.split():  # a slice: a fraction of the card's peak and price
        return plain
    if "GH200" in up or "NVL" in up:
        return plain
    if "H200" in up:
        return "H200"
    if "H100" in up:
        return "H100-PCIe" if "PCIE" in up else "H100-SXM"
    if "A100" in up:
        return "A100"
    if re.search(r"\bL40S\b", up):
        return "L40S"
    return plain


def family_of(card: str) -> str:
    """"H100-SXM" → "H100": the price table may name a card or its family."""
    return card.split("-", 1)[0]


def price_for(card: str | None, prices: Mapping[str, float] | None) -> float | None:
    """The price per GPU-hour of ``card`` in ``prices`` (keys compared without case): its own name first
    ("H100-SXM"), then its family ("H100"); None when neither is priced."""
    if not card or not prices:
        return None
    table = {str(k).lower(): v for k, v in prices.items()}
    for key in (card.lower(), family_of(card).lower()):
        if key in table and table[key] is not None:
            return float(table[key])
    return None


def _num(x: Any) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def job_cost(*, gpus_per_node: int, nodes: int = 1, seconds: float | None = None,
             gpu_seconds: float | None = None, tokens: int | None = None, tokens_per_s: float | None = None,
             params: int | None = None, card: str | None = None, prices: Mapping[str, float] | None = None,
             queue_wait_s: float | None = None, stages: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything a run cost, as one JSON-able dict (None where not known, and ``notes`` says why).

    ``gpus_per_node`` × ``nodes``: the run's GPUs (0: a CPU run). ``seconds``: wall seconds of the run (its
    GPUs' running time, when ``gpu_seconds`` is not given). ``gpu_seconds``: GPU-seconds measured over every pod
    (the launcher's). ``tokens``: trained tokens; ``tokens_per_s``: training throughput of the whole run (all
    GPUs). ``params``: the base model's parameter count. ``card``: :func:`card_of`. ``prices``: GPU type →
    price per GPU-hour. ``stages``: the job's ``{stage: {"seconds": ...}}`` (or ``{stage: seconds}``)."""
    gpus = max(0, int(gpus_per_node or 0)) * max(1, int(nodes or 1))
    notes: list[str] = []
    seconds, gpu_seconds = _num(seconds), _num(gpu_seconds)
    if gpu_seconds is None and seconds is not None:
        gpu_seconds = gpus * max(0.0, seconds)
    gpu_hours = None if gpu_seconds is None else gpu_seconds / 3600
    tps = _num(tokens_per_s)
    per_gpu = tps / gpus if tps is not None and gpus else None
    params = int(params) if params else None
    peak = PEAK_BF16_DENSE_TFLOPS.get(card or "") if gpus else None
    mfu = None
    flops_per_token = FLOPS_PER_TOKEN_PER_PARAM * params if params else None
    if not gpus:
        notes.append("no MFU: a CPU run")
    elif peak is None:
        notes.append(f"no MFU: no dense bf16 peak is known for {card}" if card else
                     "no MFU: the card is not known")
    elif per_gpu is None or flops_per_token is None:
        notes.append("no MFU yet: no training throughput" if per_gpu is None else
                     "no MFU: the base model's parameter count is not known")
    else:
        mfu = flops_per_token * per_gpu / (peak * 1e12)
    price = price_for(card, prices) if gpus else None
    cost = None
    if not gpus:
        pass  # a CPU run costs no GPU-hours; it is not priced
    elif price is None:
        notes.append("no cost: no price is set (launcher setting gpu_prices; metadata.json is never priced)"
                     if not prices else f"no cost: no price for {card or 'this card'} in gpu_prices "
                     f"({', '.join(sorted(map(str, prices)))})")
    elif gpu_hours is not None:
        cost = gpu_hours * price
    queue_wait = _num(queue_wait_s)
    stage_s = None
    if stages:
        stage_s = {k: (_num(v.get("seconds")) if isinstance(v, Mapping) else _num(v)) for k, v in _in_order(stages)}
    return {
        "card": card, "gpus": gpus, "nodes": max(1, int(nodes or 1)),
        "seconds": None if seconds is None else round(seconds, 1),
        "gpu_hours": None if gpu_hours is None else round(gpu_hours, 4),
        "queue_wait_s": None if queue_wait is None else round(max(0.0, queue_wait), 1),
        "tokens": int(tokens) if tokens is not None else None,
        "tokens_per_s_per_gpu": None if per_gpu is None else round(per_gpu, 1),
        "params": params, "flops_per_token": flops_per_token, "peak_tflops": peak,
        "mfu": None if mfu is None else round(mfu, 4),
        "price_per_gpu_hour": price, "cost": None if cost is None else round(cost, 2),
        "stages": stage_s, "notes": notes,
    }


#: The recipe's stages in the order they run (a JSON object read back may come sorted by name).
STAGE_ORDER = ("fetch", "prepare", "load", "train", "evaluate", "merge", "publish")


def _in_order(stages: Mapping[str, Any]) -> list[tuple[str, Any]]:
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    return sorted(stages.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


# ------------------------------------------------------------------------------ words

def describe_cost(c: Mapping[str, Any] | None) -> str | None:
    """One line: "1.9 GPU-hours, 14.2k tok/s/GPU, MFU 41%, $4.75, queued 2m10s"; None when nothing is known."""
    if not c:
        return None
    parts = []
    gh = c.get("gpu_hours")
    if gh is not None and c.get("gpus"):
        parts.append(f"{gh:.1f} GPU-hours" if gh >= 1 else f"{gh:.2g} GPU-hours")
    elif not c.get("gpus"):
        parts.append("CPU run: no GPU-hours, no MFU")
    if c.get("tokens_per_s_per_gpu") is not None:
        parts.append(f"{count(c['tokens_per_s_per_gpu'])} tok/s/GPU")
    if c.get("mfu") is not None:
        parts.append(f"MFU {100 * c['mfu']:.0f}%")
    elif c.get("gpus") and c.get("card") and c.get("peak_tflops") is None:
        parts.append(f"MFU n/a ({c['card']})")
    if c.get("cost") is not None:
        parts.append(f"${c['cost']:.2f}")
    if c.get("queue_wait_s") is not None:
        parts.append(f"queued {duration(c['queue_wait_s'])}")
    return ", ".join(parts) or None


def describe_stages(stages: Mapping[str, Any] | None) -> str | None:
    """ "fetch 40s, prepare 3s, load 21s, train 1h02m, evaluate 30s, merge 1m10s"."""
    if not stages:
        return None
    out = []
    for name, v in _in_order(stages):
        s = _num(v.get("seconds")) if isinstance(v, Mapping) else _num(v)
        if s is not None:
            out.append(f"{name} {s:.1f}s" if s < 10 else f"{name} {duration(s)}")
    return ", ".join(out) or None


# ------------------------------------------------------------------------------ from the cluster's objects

def parse_time(ts: str | None) -> float | None:
    """An RFC 3339 timestamp ("2026-12-07T11:00:00Z", fractions allowed) as epoch seconds; None if unreadable."""
    if not ts or not isinstance(ts, str):
        return None
    text = ts.strip().replace("Z", "+00:00")
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", text)
    if m:  # Python < 3.11 reads at most 6 fraction digits
        text = m.group(1) + (m.group(2)[:7] if m.group(2) else "") + m.group(3)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _pod_gpus(pod: Mapping[str, Any], gpu_resource: str) -> int:
    n = 0
    for c in ((pod.get("spec") or {}).get("containers") or []):
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(gpu_resource) or (res.get("requests") or {}).get(gpu_resource)
        try:
            n += int(str(value)) if value is not None else 0
        except ValueError:
            pass
    return n


def pod_gpu_seconds(pods: Sequence[Mapping[str, Any]], gpu_resource: str = "nvidia.com/gpu",
                    now: float | None = None) -> tuple[float | None, float | None]:
    """(GPU-seconds, pod-seconds) of ``pods``: each pod from its ``status.startTime`` (bound to its node, before
    the image pull) to its last container's end (``finishedAt``), or ``now`` while it runs. A pod that never
    started counts 0; None, None when no pod started."""
    import time as _time

    now = _time.time() if now is None else now
    gpu_s = pod_s = 0.0
    started_any = False
    for pod in pods:
        st = pod.get("status") or {}
        start = parse_time(st.get("startTime"))
        if start is None:
            continue
        started_any = True
        ends = []
        running = False
        for cs in st.get("containerStatuses") or []:
            state = cs.get("state") or {}
            if "running" in state or "waiting" in state:
                running = True
            term = state.get("terminated") or {}
            end = parse_time(term.get("finishedAt"))
            if end is not None:
                ends.append(end)
        running = running and st.get("phase") not in ("Succeeded", "Failed")
        if running or (not ends and st.get("phase") in ("Pending", "Running", None)):
            end = now
        elif ends:
            end = max(ends)
        else:  # ended with no container end recorded (evicted before it started): its last condition change
            changes = [parse_time(c.get("lastTransitionTime")) for c in st.get("conditions") or []]
            end = max([t for t in changes if t is not None], default=start)
        secs = max(0.0, end - start)
        pod_s += secs
        gpu_s += secs * _pod_gpus(pod, gpu_resource)
    return (gpu_s, pod_s) if started_any else (None, None)


def queue_wait_seconds(created: str | None, pods: Sequence[Mapping[str, Any]]) -> float | None:
    """From the Job's (or JobSet's) creation to its first pod's ``status.startTime`` (the pod bound to a node: a
    Kueue queue, a scheduler waiting for GPUs, both count); None until a pod started."""
    t0 = parse_time(created)
    starts = [s for s in (parse_time((p.get("status") or {}).get("startTime")) for p in pods) if s is not None]
    if t0 is None or not starts:
        return None
    return max(0.0, min(starts) - t0)


def run_cost(progress: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]] = (), created: str | None = None, *,
             prices: Mapping[str, float] | None = None, gpu_resource: str = "nvidia.com/gpu",
             now: float | None = None) -> dict[str, Any] | None:
    """:func:`job_cost` of a run as the launcher sees it, so far or in the end: the job's progress object (its
    card, GPUs, base size, tokens, throughput, stages), the run's pods (every attempt's GPU-seconds, the queue
    wait from ``created``, the Job's or JobSet's creationTimestamp) and the price table. Without pods (gone, or
    a local run) the GPUs' time is the job's own, from its start to its last progress write. None: nothing to
    say (no progress and no pod started yet)."""
    import time as _time

    p = progress or {}
    now = _time.time() if now is None else now
    gpu_s, _ = pod_gpu_seconds(list(pods), gpu_resource, now)
    per_pod = max((_pod_gpus(x, gpu_resource) for x in pods), default=0)
    gpus = p.get("gpus") if isinstance(p.get("gpus"), int) else None
    if gpus is None:  # the job has not said yet (or its progress is unreadable): one pod's GPUs
        gpus = per_pod
    nodes = max(1, gpus // per_pod) if per_pod and gpus and gpus % per_pod == 0 else 1
    seconds = None
    started, updated = _num(p.get("started_at")), _num(p.get("updated_at"))
    if p.get("state") in (None, "running") and started is not None:
        seconds = max(0.0, now - started)
    elif started is not None and updated is not None:
        seconds = max(0.0, updated - started)
    if gpu_s is None and seconds is None:
        return None
    card = p.get("card")
    c = job_cost(gpus_per_node=gpus // nodes if gpus else 0, nodes=nodes, seconds=seconds, gpu_seconds=gpu_s,
                 tokens=p.get("tokens_seen"), tokens_per_s=p.get("tokens_per_s"), params=p.get("base_params"),
                 card=card, prices=prices, queue_wait_s=queue_wait_seconds(created, list(pods)),
                 stages=p.get("stages"))
    if not card and gpus and not progress:
        c["notes"].append("the card is not known: the job's progress object could not be read")
    return c


__all__ = ["PEAK_BF16_DENSE_TFLOPS", "card_of", "describe_cost", "describe_stages", "job_cost", "pod_gpu_seconds",
           "price_for", "queue_wait_seconds", "run_cost"]
