"""How many CPU threads the job's torch may use: the pod's CPU limit, not the node's core count.

torch sizes its intra-op pool by the cores it sees, and in a container it sees the node's: a pod with
``limits.cpu: 4`` on a 96-core GPU node would run 48 threads in a 4-CPU quota, and the kernel's CFS
throttling then stalls every parallel op (a CPU run, the merge and its check on the CPU, collation).
The quota is read from the cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), as the JVM and Go's
automaxprocs do; an ``OMP_NUM_THREADS`` the user set always wins.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5 for ``limits.cpu: 1500m``), or None without one.

    Inside a container the cgroup's own folder is mounted at the root; on a host it is the path that
    /proc/self/cgroup names. Both are read, and the smallest quota found counts."""
    paths: dict[str, str] = {}
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path.lstrip("/")
    except (OSError, ValueError):
        pass
    found = []
    for folder in {root, root / paths.get("", "")}:  # v2: one unified hierarchy
        found.append(_v2_quota(folder))
    for name in ("cpu", "cpu,cpuacct"):
        base = root / name
        for folder in {base, base / paths.get("cpu", "")}:
            found.append(_v1_quota(folder))
    quotas = [q for q in found if q]
    return min(quotas) if quotas else None


def cpu_budget() -> float:
    """CPUs this process may use: its CPU affinity, capped by its cgroup's quota."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = float(os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def threads_per_process(processes: int = 1, budget: float | None = None) -> int:
    """Threads for each of ``processes`` training processes sharing the budget (at least one)."""
    budget = cpu_budget() if budget is None else budget
    return max(1, math.floor(budget / max(1, processes) + 0.5))


def size_torch_threads() -> int:
    """Set torch's intra-op threads to this process's CPU budget, unless OMP_NUM_THREADS says (torchrun's
    workers get their share of it that way, from jobs.trainer.distributed.relaunch)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    budget = cpu_budget()
    threads = threads_per_process(1, budget)
    if threads != torch.get_num_threads():
        log.info("CPU: %d torch thread%s for a budget of %g CPUs (torch saw %d cores)", threads,
                 "s" if threads > 1 else "", round(budget, 2), torch.get_num_threads())
        torch.set_num_threads(threads)
    return threads
