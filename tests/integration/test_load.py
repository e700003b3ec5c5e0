"""Load on the real control plane: 50 runs submitted back to back through the launcher CLI.

* every run is created exactly once (a second pass of the same 50 specs creates nothing);
* `launcher list` and `launcher status` latency (p50/p95/max) is printed, in-process (what
  the CLI code costs) and as cold subprocesses (what a user waits for);
* the launcher opens no watch and sets a finite timeout on every API request (a spy on the
  kubernetes client's REST layer records each request; it changes nothing), and repeated
  verbs do not grow memory.

The CLI runs in-process (``launcher.cli.main``) for the 50 submits so the test measures the
launcher and the API server, not 50 Python start-ups on a 2-core machine.
"""
from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
RUNS = 50


def report(fault: str, happened: str, lost: str) -> None:
    """One row of docs/reliability.md, to the terminal even when pytest captures output."""
    sys.__stderr__.write(f"\nFAULT| {fault} | {happened} | {lost}\n")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"{label}: n={len(ms)} p50={statistics.median(ms):.0f} ms p95={pct(ms, 0.95):.0f} ms "
            f"max={max(ms):.0f} ms")


class RestSpy:
    """Records (method, url, query, timeout) of every request the kubernetes client sends."""

    def __init__(self, monkeypatch):
        from kubernetes.client import rest

        self.calls: list[tuple[str, str, str, object]] = []
        self.on = False  # only the launcher's own requests count, not the test's checks
        real = rest.RESTClientObject.request
        spy = self

        def request(self_, method, url, query_params=None, headers=None, body=None, post_params=None,
                    _preload_content=True, _request_timeout=None):
            if spy.on:
                spy.calls.append((method, url, json.dumps(query_params or [], default=str), _request_timeout))
            return real(self_, method, url, query_params=query_params, headers=headers, body=body,
                        post_params=post_params, _preload_content=_preload_content,
                        _request_timeout=_request_timeout)

        monkeypatch.setattr(rest.RESTClientObject, "request", request)


@pytest.fixture()
def spy(monkeypatch):
    return RestSpy(monkeypatch)


@pytest.fixture()
def cli(stack, namespace, monkeypatch, tmp_path, capsys, spy):
    from launcher.cli import main

    for k in [k for k in __import__("os").environ if k.startswith("LAUNCHER_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LAUNCHER_KUBECONFIG", stack.kubeconfig)
    monkeypatch.setenv("LAUNCHER_NAMESPACE", namespace)
    monkeypatch.setenv("LAUNCHER_SERVICE_ACCOUNT", "default")
    monkeypatch.setenv("LAUNCHER_S3_ENDPOINT", stack.s3_endpoint)

    def run(*args: str) -> tuple[int, str, str, float]:
        capsys.readouterr()
        spy.on = True
        t0 = time.perf_counter()
        try:
            code = main(list(args))
        finally:
            took = time.perf_counter() - t0
            spy.on = False
        out = capsys.readouterr()
        return code, out.out, out.err, took

    return run


def test_fifty_runs_are_created_exactly_once_and_reads_stay_fast(stack, kube_api, namespace, cli, spy, tmp_path,
                                                                 launcher_env):
    from kubernetes import client

    specs = []
    for i in range(RUNS):
        path = tmp_path / f"load-{i:02d}.yaml"
        path.write_text(yaml.safe_dump({
            "name": f"load-{i:02d}", "base_model": {"uri": f"s3://{stack.bucket}/models/tiny/"},
            "dataset": {"train": f"s3://{stack.bucket}/data/train.jsonl"}, "output": f"s3://{stack.bucket}/runs",
            "resources": {"gpus": 0, "cpu": "100m", "memory": "64Mi", "scratch": "1Gi"}}))
        specs.append(path)

    submit_t = []
    for path in specs:
        code, out, err, took = cli("submit", str(path))
        assert code == 0 and out.startswith("submitted:"), (path.name, code, out, err)
        submit_t.append(took)
    again_t = []
    for path in specs:  # the same 50 specs again: nothing new
        code, out, err, took = cli("submit", str(path))
        assert code == 0 and out.startswith("already submitted:"), (path.name, code, out, err)
        again_t.append(took)

    batch, core = client.BatchV1Api(kube_api), client.CoreV1Api(kube_api)
    jobs = batch.list_namespaced_job(namespace, label_selector="app.kubernetes.io/name=lora-jobs").items
    assert sorted(j.metadata.labels["lora-jobs.io/run"] for j in jobs) == [f"load-{i:02d}" for i in range(RUNS)]
    cms = {c.metadata.name: c for c in core.list_namespaced_config_map(
        namespace, label_selector="app.kubernetes.io/name=lora-jobs").items}
    assert sorted(cms) == sorted(j.metadata.name for j in jobs)
    for j in jobs:
        assert [o.uid for o in cms[j.metadata.name].metadata.owner_references] == [j.metadata.uid]

    list_t, status_t = [], []
    for i in range(20):
        code, out, err, took = cli("list", "-o", "json")
        assert code == 0 and len(json.loads(out)) == RUNS, err
        list_t.append(took)
        code, out, err, took = cli("status", f"load-{(i * 7) % RUNS:02d}", "-o", "json")
        assert code in (0, 1) and json.loads(out)["run"] == f"load-{(i * 7) % RUNS:02d}", err
        status_t.append(took)
    code, out, err, took = cli("wait", "load-00", "--timeout", "60", "--interval", "1")
    assert code == 0, (out, err)

    # Requests: no watch, every one with a finite timeout.
    watches = [c for c in spy.calls if "watch" in c[2].lower() and "true" in c[2].lower()]
    unbounded = [c for c in spy.calls if c[3] is None]
    assert not watches, watches[:3]
    assert not unbounded, unbounded[:3]
    requests = len(spy.calls)

    # Memory: 30 more list + status rounds after warm-up add (almost) nothing.
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    for i in range(30):
        cli("list", "-o", "json")
        cli("status", f"load-{i % RUNS:02d}", "-o", "json")
    spy.calls.clear()
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    assert grown < 4 << 20, f"memory grew {grown / 2**20:.1f} MiB over 60 calls"

    # What a user waits for: cold processes (Python start-up and imports included).
    env = {**launcher_env, "LAUNCHER_SERVICE_ACCOUNT": "default"}
    cold_list, cold_status = [], []
    for i in range(3):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "launcher", "list", "-o", "json"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        cold_list.append(time.perf_counter() - t0)
        assert p.returncode == 0, p.stderr
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "launcher", "status", "load-01", "-o", "json"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        cold_status.append(time.perf_counter() - t0)
        assert p.returncode in (0, 1), p.stderr

    lines = [summary(f"submit x{RUNS} (new)", submit_t), summary(f"submit x{RUNS} (again)", again_t),
             summary(f"list ({RUNS} runs)", list_t), summary("status", status_t),
             summary("list, cold process", cold_list), summary("status, cold process", cold_status)]
    sys.__stderr__.write("\nLATENCY| " + "\nLATENCY| ".join(lines) + "\n")
    assert pct(list_t, 0.95) < 5 and pct(status_t, 0.95) < 5
    report(f"{RUNS} runs submitted back to back, then all {RUNS} again",
           f"{RUNS} Jobs and {RUNS} owned ConfigMaps, each created once; list p95 "
           f"{pct(list_t, .95) * 1000:.0f} ms, status p95 {pct(status_t, .95) * 1000:.0f} ms; "
           f"{requests} API requests, all with a timeout, no watch; memory +{grown / 2**20:.2f} MiB over 60 calls",
           "nothing")
