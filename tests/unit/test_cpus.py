"""jobs.trainer.cpus: the CPU budget comes from the cgroup's quota (a pod's limits.cpu), in both cgroup versions."""
from __future__ import annotations

import os

import pytest

from jobs.trainer import cpus

pytestmark = pytest.mark.unit


def _proc(tmp_path, text: str):
    p = tmp_path / "proc-self-cgroup"
    p.write_text(text)
    return p


def test_cgroup_v2_quota_in_the_containers_own_root(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # limits.cpu: 1500m
    assert cpus.cgroup_cpu_limit(tmp_path, _proc(tmp_path, "0::/\n")) == 1.5


def test_cgroup_v2_without_a_limit(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path, _proc(tmp_path, "0::/\n")) is None


def test_cgroup_v2_on_a_host_reads_the_path_proc_names(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    pod = tmp_path / "kubepods.slice" / "pod-a"
    pod.mkdir(parents=True)
    (pod / "cpu.max").write_text("400000 100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path, _proc(tmp_path, "0::/kubepods.slice/pod-a\n")) == 4.0


def test_cgroup_v1_quota_and_no_quota(tmp_path):
    cpu = tmp_path / "cpu,cpuacct"
    cpu.mkdir()
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    proc = _proc(tmp_path, "4:cpu,cpuacct:/\n3:memory:/\n")
    assert cpus.cgroup_cpu_limit(tmp_path, proc) is None
    (cpu / "cpu.cfs_quota_us").write_text("100000\n")  # limits.cpu: 1
    assert cpus.cgroup_cpu_limit(tmp_path, proc) == 1.0


def test_nothing_readable_means_no_limit(tmp_path):
    assert cpus.cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent-proc") is None


@pytest.mark.parametrize("budget,processes,threads", [(1.0, 1, 1), (1.8, 1, 2), (1.4, 1, 1), (4.0, 8, 1),
                                                      (32.0, 8, 4), (0.5, 1, 1), (96.0, 1, 96)])
def test_threads_per_process_share_the_budget(budget, processes, threads):
    assert cpus.threads_per_process(processes, budget) == threads


def test_this_machine_budget_is_at_most_its_affinity():
    assert 0 < cpus.cpu_budget() <= len(os.sched_getaffinity(0))
