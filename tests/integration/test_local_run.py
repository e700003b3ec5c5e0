"""A local run is a run: `launcher --backend local` starts it detached and `status`, `logs`, `list`, `wait` and
`cancel` work on it, from another process, as on a cluster. `launcher submit --local` follows it to its end;
stopped by SIGTERM (a timeout, a CI runner), the job gets the signal too, checkpoints and exits 75 like a
preempted pod; no training process is left behind. The launcher's tracking setting reaches a local run as it
reaches a pod. The subject is the processes and signals, not what is learned: the signal tests train conftest's
tiny_model_dir (SmolLM2's architecture and vocabulary, randomly initialised)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.train

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"


def _processes_mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def test_sigterm_to_a_local_run_reaches_the_job_which_checkpoints_and_exits_75(tmp_path, tiny_model_dir,
                                                                               mlflow_server):
    import uuid

    from published import find_run

    experiment = f"local-{uuid.uuid4().hex[:8]}"
    spec = {"name": "local-stop", "base_model": {"uri": str(tiny_model_dir)},
            "tracking": {"mlflow": {"experiment": experiment}},
            "dataset": {"train": str(DEMO / "train.jsonl")}, "output": str(tmp_path / "store"),
            "training": {"epochs": 3, "max_seq_length": 256}, "eval": {"enabled": False},
            "merge": {"enabled": False}, "resources": {"gpus": 0}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "XDG_STATE_HOME": str(tmp_path / "state"),
           "LAUNCHER_MLFLOW_TRACKING_URI": mlflow_server.uri}  # the setting, not the job's own variable
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "submit", str(path), "--local", "--workdir", str(work)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.time() + 600
    for line in proc.stdout:
        seen.append(line)
        if " step 1/" in line:
            proc.send_signal(signal.SIGTERM)  # to the launcher only, as `timeout` does
            break
        assert time.time() < deadline, "".join(seen[-20:])
    rest = proc.communicate(timeout=300)[0]
    text = "".join(seen) + rest
    assert proc.returncode == 75, text[-3000:]
    assert "SIGTERM received" in text and "stopped by SIGTERM at step" in text, text[-3000:]
    assert _processes_mentioning(str(work)) == [], "a training process outlived the launcher"
    assert list((tmp_path / "store" / "local-stop" / "checkpoints").rglob("_COMPLETE")), "a checkpoint was saved"
    run = find_run(mlflow_server.uri, experiment)  # tracked through the setting; stopped, to be carried on
    assert run["info"]["status"] == "KILLED", run["info"]


def test_ctrl_c_on_a_local_run_stops_it_cancelled_with_130_leaving_no_version_and_no_scratch(tmp_path,
                                                                                           tiny_model_dir):
    import json

    spec = {"name": "local-ctrl-c", "base_model": {"uri": str(tiny_model_dir)},
            "dataset": {"train": str(DEMO / "train.jsonl")}, "output": str(tmp_path / "store"),
            "training": {"epochs": 3, "max_seq_length": 256}, "eval": {"enabled": False},
            "merge": {"enabled": False}, "resources": {"gpus": 0}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    cache = tmp_path / "cache"  # the default working folder: ~/.cache/lora-jobs/runs/<job>, here under it
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "XDG_CACHE_HOME": str(cache),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    # its own process group, as a terminal's foreground job: Ctrl-C sends SIGINT to the launcher and the job alike
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "submit", str(path), "--local"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    deadline = time.time() + 600
    for line in proc.stdout:
        seen.append(line)
        if " step 1/" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
        assert time.time() < deadline, "".join(seen[-20:])
    rest = proc.communicate(timeout=300)[0]
    text = "".join(seen) + rest
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted: local-ctrl-c-" in text and "nothing was published" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    run = tmp_path / "store" / "local-ctrl-c"
    assert not any(run.glob("v*/_COMPLETE")) and not (run / "latest").exists(), "no version"
    (progress,) = (run / "progress").glob("*.json")
    p = json.loads(progress.read_text())
    assert p["state"] == "cancelled" and p["exit_code"] == 130, p
    assert not any((cache / "lora-jobs" / "runs").iterdir()), "the run's scratch folder is gone"
    assert _processes_mentioning(str(cache)) == [], "a training process outlived the launcher"


def test_a_detached_local_run_is_followed_listed_and_cancelled_from_other_processes_like_a_cluster_run(
        tmp_path, short_model_dir):
    import json

    # the 4-layer model, not the tiny one: between step 1 and the cancel come ~10 launcher processes (status,
    # list, logs, ...), and the run must still be training then; the tiny model's 30 steps can be over by then
    spec = {"name": "local-detached", "base_model": {"uri": str(short_model_dir)},
            "dataset": {"train": str(DEMO / "train.jsonl")}, "output": "out",  # relative: the spec file's folder
            "training": {"epochs": 3, "max_seq_length": 256}, "eval": {"enabled": False},
            "merge": {"enabled": False}, "resources": {"gpus": 0}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "LAUNCHER_BACKEND": "local",
           "LAUNCHER_LOCAL_STATE_DIR": str(state)}

    def launcher(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launcher", *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)

    started = launcher("submit", str(path), "--detach", "-o", "json")
    assert started.returncode == 0, started.stderr
    job = json.loads(started.stdout)["job"]
    assert "follow it: launcher logs local-detached -f" in started.stderr, started.stderr
    again = launcher("submit", str(path), "--detach")  # the same spec, still running: the same run
    assert again.returncode == 0 and again.stdout.startswith(f"already running: local run {job}"), again.stdout
    deadline = time.time() + 600
    while " step 1/" not in (log := (state / job / "log").read_text()):
        assert time.time() < deadline and not (state / job / "exit_code").exists(), log[-3000:]
        time.sleep(2)
    assert (tmp_path / "out" / "local-detached" / "progress").is_dir(), "relative output: beside the spec"
    while not (st := json.loads(launcher("status", "local-detached", "-o", "json").stdout)).get("progress"):
        assert time.time() < deadline, st  # the job's progress writer: at most every 10 s
        time.sleep(2)
    assert st["state"] == "Running" and st["job"] == job and st["kind"] == "local", st
    shown = launcher("status", "local-detached")
    assert shown.returncode == 0 and "state:  Running" in shown.stdout, shown.stdout
    assert "progress: " in shown.stdout and "step " in shown.stdout, shown.stdout  # the line a cluster run shows
    (row,) = json.loads(launcher("list", "-o", "json").stdout)
    assert row["job"] == job and row["state"] == "Running", row
    logs = launcher("logs", "local-detached", "--tail", "3")
    assert logs.returncode == 0 and 0 < len(logs.stdout.splitlines()) <= 3, logs.stdout

    follower = subprocess.Popen([sys.executable, "-m", "launcher", "logs", job, "-f"], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cancelled = launcher("cancel", "local-detached", timeout=300)
    assert cancelled.returncode == 0 and cancelled.stdout.startswith(f"cancelled: local run {job}"), cancelled
    assert "exit code 75" in cancelled.stdout, cancelled.stdout
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 1 and "stopped by SIGTERM at step" in out, (out[-2000:], err)
    assert f"{job}: cancelled (launcher cancel), exit code 75" in err, err
    waited = launcher("wait", "local-detached")
    assert waited.returncode == 1 and "cancelled" in waited.stdout, waited.stdout
    final = json.loads(launcher("status", "local-detached", "-o", "json").stdout)
    assert final["state"] == "Failed" and final["exit_code"] == 75 and final["completed"], final
    assert list((tmp_path / "out" / "local-detached" / "checkpoints").rglob("_COMPLETE")), "it saved a checkpoint"
    assert _processes_mentioning(str(state / job)) == [], "no process of the run is left"
    again = launcher("cancel", "local-detached")
    assert again.returncode == 2 and "has already ended" in again.stderr, again.stderr
