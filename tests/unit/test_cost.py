"""What a run cost (jobs/cost.py): GPU-hours, tokens/s/GPU, MFU at 4N FLOPs a token against the card's dense
bf16 peak, a price from the gpu_prices table; and how the launcher reads it from pods and progress."""
from __future__ import annotations

import json

import pytest

from jobs.cost import (PEAK_BF16_DENSE_TFLOPS, card_of, describe_cost, describe_stages, job_cost, pod_gpu_seconds,
                       price_for, queue_wait_seconds, run_cost)

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------ GPU-hours

@pytest.mark.parametrize("gpus, nodes, seconds, hours", [
    (1, 1, 3600, 1.0),     # one GPU, one hour
    (4, 1, 1800, 2.0),     # four GPUs, half an hour
    (4, 2, 900, 2.0),      # two nodes of four GPUs, a quarter of an hour: every pod's GPUs count
])
def test_gpu_hours_are_every_gpu_times_the_running_seconds(gpus, nodes, seconds, hours):
    c = job_cost(gpus_per_node=gpus, nodes=nodes, seconds=seconds)
    assert c["gpu_hours"] == pytest.approx(hours) and c["gpus"] == gpus * nodes and c["nodes"] == nodes


def test_measured_gpu_seconds_win_over_gpus_times_wall():
    # the launcher's sum over pods (a retried attempt included) is what was paid for
    c = job_cost(gpus_per_node=1, seconds=3600, gpu_seconds=5400)
    assert c["gpu_hours"] == pytest.approx(1.5)


# ------------------------------------------------------------------------------ throughput and MFU

def test_mfu_is_4n_flops_a_token_over_the_dense_bf16_peak():
    # the measured run: 15,299 tok/s on one H100 SXM, 7.42B parameters
    n, tps = 7_420_000_000, 15_299.0
    c = job_cost(gpus_per_node=1, seconds=600, tokens_per_s=tps, params=n, card="H100-SXM")
    assert c["tokens_per_s_per_gpu"] == pytest.approx(tps)
    assert c["flops_per_token"] == 4 * n and c["peak_tflops"] == 989.4
    assert c["mfu"] == pytest.approx(4 * n * tps / 989.4e12, abs=1e-4)
    assert 0.45 < c["mfu"] < 0.47


def test_tokens_per_second_per_gpu_divides_by_every_gpu_of_every_node():
    c = job_cost(gpus_per_node=4, nodes=2, seconds=100, tokens_per_s=80_000.0, params=1_000_000_000, card="A100")
    assert c["tokens_per_s_per_gpu"] == 10_000.0
    assert c["mfu"] == pytest.approx(4e9 * 10_000 / 312e12, abs=1e-4)


def test_a_cpu_run_has_no_mfu_and_says_so():
    c = job_cost(gpus_per_node=0, seconds=120, tokens=5000, tokens_per_s=40.0, params=1_000_000, card=None,
                 prices={"H100": 2.5})
    assert c["mfu"] is None and c["gpu_hours"] == 0 and c["cost"] is None and c["tokens_per_s_per_gpu"] is None
    assert "no MFU: a CPU run" in c["notes"]
    assert describe_cost(c) == "CPU run: no GPU-hours, no MFU"


def test_an_unknown_card_has_no_mfu_but_may_be_priced():
    c = job_cost(gpus_per_node=1, seconds=3600, tokens_per_s=1000.0, params=10**9, card="L4", prices={"L4": 0.8})
    assert c["mfu"] is None and any("no dense bf16 peak is known for L4" in n for n in c["notes"])
    assert c["cost"] == 0.8
    assert describe_cost(c) == "1.0 GPU-hours, 1.0k tok/s/GPU, MFU n/a (L4), $0.80"


def test_no_throughput_yet_no_mfu_yet():
    c = job_cost(gpus_per_node=1, seconds=60, params=10**9, card="H200")
    assert c["mfu"] is None and "no MFU yet: no training throughput" in c["notes"]


# ------------------------------------------------------------------------------ price

def test_cost_with_a_price_by_family_and_without_one():
    base = dict(gpus_per_node=1, seconds=1.9 * 3600, tokens_per_s=14_200.0, params=8_030_000_000, card="H100-SXM")
    priced = job_cost(**base, prices={"h100": 2.5})  # a family, compared without case
    assert priced["price_per_gpu_hour"] == 2.5 and priced["cost"] == pytest.approx(4.75)
    assert describe_cost(priced) == "1.9 GPU-hours, 14.2k tok/s/GPU, MFU 46%, $4.75"
    unpriced = job_cost(**base)
    assert unpriced["cost"] is None and unpriced["price_per_gpu_hour"] is None
    assert any(n.startswith("no cost: no price is set") for n in unpriced["notes"])
    assert "$" not in describe_cost(unpriced)
    other = job_cost(**base, prices={"A100": 1.2})
    assert other["cost"] is None and any("no price for H100-SXM in gpu_prices (A100)" in n for n in other["notes"])


def test_price_for_prefers_the_card_then_its_family():
    prices = {"H100": 2.0, "H100-PCIe": 1.5}
    assert price_for("H100-PCIe", prices) == 1.5
    assert price_for("H100-SXM", prices) == 2.0
    assert price_for("H200", prices) is None and price_for(None, prices) is None and price_for("H100-SXM", {}) is None


# ------------------------------------------------------------------------------ cards

@pytest.mark.parametrize("name, card, peak", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM", 989.4),
    ("NVIDIA H100 PCIe", "H100-PCIe", 756.0),
    ("NVIDIA H200", "H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA L40S", "L40S", 362.05),
    ("NVIDIA L40", "L40", None),
    ("NVIDIA L4", "L4", None),
    ("NVIDIA H100 NVL", "H100-NVL", None),          # lower clocks than the SXM: not guessed
    ("NVIDIA GH200 480GB", "GH200-480GB", None),    # not an "H200"
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "H100-80GB-HBM3-MIG-1g.10gb", None),  # a slice of the card
    (None, None, None),
    ("", None, None),
])
def test_card_names_from_the_device_name(name, card, peak):
    assert card_of(name) == card
    assert PEAK_BF16_DENSE_TFLOPS.get(card or "") == peak


# ------------------------------------------------------------------------------ from the cluster's objects

def _pod(start, *, end=None, gpus=1, phase=None, index=None):
    state = {"terminated": {"finishedAt": end, "exitCode": 0}} if end else {"running": {"startedAt": start}}
    meta = {"name": f"p-{start}"}
    if index is not None:
        meta["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    return {"metadata": meta,
            "spec": {"containers": [{"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
            "status": {"phase": phase or ("Succeeded" if end else "Running"), "startTime": start,
                       "containerStatuses": [{"name": "trainer", "state": state}]}}


T0 = "2026-12-07T10:00:00Z"


def test_pod_gpu_seconds_count_every_attempt_and_a_running_one_until_now():
    from jobs.cost import parse_time

    failed = _pod("2026-12-07T10:02:00Z", end="2026-12-07T10:12:00Z", gpus=4, phase="Failed")  # 600 s
    running = _pod("2026-12-07T10:13:00Z", gpus=4)  # 300 s by "now"
    waiting = {"metadata": {"name": "w"}, "status": {"phase": "Pending"}}  # never bound: costs nothing
    now = parse_time("2026-12-07T10:18:00Z")
    gpu_s, pod_s = pod_gpu_seconds([failed, running, waiting], now=now)
    assert pod_s == 900 and gpu_s == 3600
    assert pod_gpu_seconds([waiting]) == (None, None)
    assert queue_wait_seconds(T0, [running, failed, waiting]) == 120, "creation to the first pod's start"
    assert queue_wait_seconds(T0, [waiting]) is None


def test_parse_time_reads_nanosecond_fractions():
    from jobs.cost import parse_time

    assert parse_time("2026-12-07T10:00:01.123456789Z") == pytest.approx(parse_time(T0) + 1.123456, abs=1e-5)
    assert parse_time("yesterday") is None and parse_time(None) is None


def test_run_cost_of_a_running_two_node_run_is_what_is_known_so_far():
    from jobs.cost import parse_time

    pods = [_pod("2026-12-07T10:01:00Z", gpus=4, index=0), _pod("2026-12-07T10:01:00Z", gpus=4, index=1)]
    progress = {"state": "running", "stage": "train", "card": "H200", "gpus": 8, "base_params": 8_030_000_000,
                "tokens_seen": 10_000_000, "tokens_per_s": 120_000.0, "started_at": parse_time("2026-12-07T10:02:00Z"),
                "stages": {"prepare": {"seconds": 3.0}, "fetch": {"seconds": 40.0, "peak_gpu_gib": None},
                           "train": {"seconds": 3000.0}}}
    now = parse_time("2026-12-07T11:01:00Z")
    c = run_cost(progress, pods, T0, prices={"H200": 3.5}, now=now)
    assert c["gpus"] == 8 and c["nodes"] == 2
    assert c["gpu_hours"] == pytest.approx(8.0), "two pods × 4 GPUs × 1 hour"
    assert c["queue_wait_s"] == 60 and c["tokens"] == 10_000_000 and c["tokens_per_s_per_gpu"] == 15_000
    assert c["cost"] == pytest.approx(28.0) and c["mfu"] == pytest.approx(4 * 8.03e9 * 15_000 / 989.4e12, abs=1e-4)
    assert describe_cost(c) == "8.0 GPU-hours, 15.0k tok/s/GPU, MFU 49%, $28.00, queued 1m00s"
    assert describe_stages(c["stages"]) == "fetch 40s, prepare 3.0s, train 50m00s", "in the recipe's order"


def test_run_cost_without_pods_is_the_jobs_own_time_and_none_before_anything_ran():
    p = {"state": "succeeded", "card": "A100", "gpus": 1, "base_params": 10**9, "tokens_seen": 1000,
         "tokens_per_s": 500.0, "started_at": 1000.0, "updated_at": 4600.0}
    c = run_cost(p, [], None, prices={"A100": 1.0})
    assert c["gpu_hours"] == pytest.approx(1.0) and c["cost"] == 1.0 and c["queue_wait_s"] is None
    assert run_cost(None, [], T0) is None
    bare = run_cost(None, [_pod("2026-12-07T10:01:00Z", end="2026-12-07T10:31:00Z", gpus=2)], T0,
                    prices={"H100": 2.0})
    assert bare["gpu_hours"] == pytest.approx(1.0) and bare["cost"] is None and bare["mfu"] is None
    assert any("progress object could not be read" in n for n in bare["notes"])


def test_the_cost_dict_is_json():
    c = run_cost({"state": "running", "gpus": 1, "card": "H100-SXM", "started_at": 0.0}, [], None, now=60.0)
    assert json.loads(json.dumps(c)) == c


# ------------------------------------------------------------------------------ progress of many runs

def test_read_runs_progress_reads_each_and_tolerates_missing_ones(tmp_path):
    from jobs.progress import progress_key, read_runs_progress

    run = tmp_path / "out" / "r1"
    key = run / progress_key("", "abc")
    key.parent.mkdir(parents=True)
    key.write_text(json.dumps({"state": "running", "stage": "train", "step": 3, "total_steps": 10}))
    got = read_runs_progress([(str(run), "abc"), (str(run), "nope"), (None, "abc"), (str(run), None)])
    assert got[0]["step"] == 3 and got[0]["summary"].startswith("training step 3/10")
    assert got[1:] == [None, None, None]


# ------------------------------------------------------------------------------ the setting

def test_gpu_prices_setting_is_validated(monkeypatch):
    from launcher.settings import SettingsError, make_settings

    assert make_settings(namespace="n").gpu_prices == {}, "default: no prices, no cost"
    assert make_settings(namespace="n", gpu_prices={"H100": 2.49, "L40S": 1}).gpu_prices == {"H100": 2.49,
                                                                                            "L40S": 1.0}
    monkeypatch.setenv("LAUNCHER_GPU_PRICES", '{"A100": 1.2}')
    assert make_settings(namespace="n").gpu_prices == {"A100": 1.2}
    monkeypatch.delenv("LAUNCHER_GPU_PRICES")
    for bad, said in [({"H 100": 1.0}, "is not a GPU type"), ({"H100": -1.0}, "at least 0"),
                      ({"H100": float("inf")}, "at least 0"), ({"h100": 1.0, "H100": 2.0}, "priced twice")]:
        with pytest.raises(SettingsError) as e:
            make_settings(namespace="n", gpu_prices=bad)
        assert "gpu_prices" in str(e.value) and said in str(e.value), str(e.value)
    monkeypatch.setenv("LAUNCHER_GPU_PRICES", "{H100: 2}")
    with pytest.raises(SettingsError) as e:
        make_settings(namespace="n")
    assert "LAUNCHER_GPU_PRICES: not valid JSON" in str(e.value)


def test_the_launcher_status_and_list_records_only_grow():
    """status -o json and list -o json gain `cost` at the end; nothing before it moves."""
    from dataclasses import fields

    from launcher.client import RunStatus, RunSummary

    assert [f.name for f in fields(RunStatus)][-3:] == ["progress", "kind", "cost"]
    assert [f.name for f in fields(RunSummary)][-2:] == ["progress", "cost"]


# ------------------------------------------------------------------------------ launcher status and list

class _Kube:
    """A finished one-GPU run: its Job, one pod that ran 1.9 hours after a 2-minute wait, no events."""

    namespace = "ml"

    def __init__(self, output):
        self.job = {"metadata": {"name": "r-abc", "namespace": "ml", "creationTimestamp": "2026-12-07T08:00:00Z",
                                 "labels": {"lora-jobs.io/run": "r", "lora-jobs.io/spec-hash": "abc"},
                                 "annotations": {"lora-jobs.io/output": output}},
                    "spec": {"backoffLimit": 2},
                    "status": {"succeeded": 1, "startTime": "2026-12-07T08:00:01Z",
                               "completionTime": "2026-12-07T09:56:00Z",
                               "conditions": [{"type": "Complete", "status": "True"}]}}
        pod = _pod("2026-12-07T08:02:00Z", end="2026-12-07T09:56:00Z", gpus=1)
        pod["metadata"].update({"name": "r-abc-x", "creationTimestamp": "2026-12-07T08:00:01Z",
                                "labels": {"batch.kubernetes.io/job-name": "r-abc"}})
        self.pods = [pod]

    def get_job(self, name):
        return self.job if name == "r-abc" else None

    def list_jobs(self, selector):
        return [self.job] if "job-set" not in selector else []

    def list_jobsets(self, selector):
        return []

    def get_jobset(self, name):
        return None

    def job_workload(self, job):
        return None  # a cluster without Kueue

    def pod_log(self, pod, **kw):
        return iter(())  # the log is not this test's subject

    def list_pods(self, selector):
        return self.pods

    def list_events(self, selector):
        return []

    def get_node(self, name):
        return None


def test_launcher_status_and_list_show_what_a_finished_run_cost(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from jobs.progress import progress_key
    from launcher import cli
    from launcher.backends.kubernetes import KubernetesBackend
    from launcher.client import Client
    from launcher.kube import ClusterReader
    from launcher.settings import make_settings

    run = tmp_path / "out" / "r"
    key = run / progress_key("", "abc")
    key.parent.mkdir(parents=True)
    key.write_text(json.dumps({"state": "succeeded", "stage": "publish", "version": "v1", "card": "H100-SXM",
                               "gpus": 1, "base_params": 8_030_000_000, "tokens_seen": 97_000_000,
                               "tokens_per_s": 14_200.0, "started_at": 0.0, "updated_at": 6800.0,
                               "stages": {"fetch": {"seconds": 40.0}, "train": {"seconds": 6600.0}}}))
    settings = make_settings(namespace="ml", gpu_prices={"H100": 2.5})
    assert isinstance(_Kube(str(run)), ClusterReader)  # what the backend reads: the real adaptor's methods
    sdk = Client(backend=KubernetesBackend(settings, note=print, kube=_Kube(str(run)), settings=settings),
                 settings=settings)
    st = sdk.status("r")
    assert st.state == "Succeeded" and st.cost["gpu_hours"] == pytest.approx(1.9), st.cost
    assert st.cost["summary"] == "1.9 GPU-hours, 14.2k tok/s/GPU, MFU 46%, $4.75, queued 2m00s"
    assert st.to_dict()["cost"]["queue_wait_s"] == 120
    (row,) = sdk.list()
    assert row.cost == st.cost["summary"] and row.progress is None, "a finished run's progress is its sentence"

    monkeypatch.setattr(cli, "_client", lambda ctx: sdk)
    out = CliRunner().invoke(cli.app, ["status", "r"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "cost: 1.9 GPU-hours, 14.2k tok/s/GPU, MFU 46%, $4.75, queued 2m00s" in out.output, out.output
    assert "stages: fetch 40s, train 1h50m" in out.output, out.output
    js = CliRunner().invoke(cli.app, ["status", "r", "-o", "json"])
    assert json.loads(js.output)["cost"]["cost"] == 4.75
    listed = CliRunner().invoke(cli.app, ["list", "-o", "json"])
    assert json.loads(listed.output)[0]["cost"].endswith("$4.75, queued 2m00s")
    table = CliRunner().invoke(cli.app, ["list"], env={"COLUMNS": "250"})
    assert "$4.75" in table.output, table.output
