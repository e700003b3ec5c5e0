"""Data parallel through PyTorch's own launcher: the real job under ``torchrun --nproc-per-node 2``
(gloo on CPU) against the same job in one process. The subject is the ranks, not what they learn: the model is
conftest's tiny_model_dir (SmolLM2's architecture and vocabulary, randomly initialised, 13x fewer parameters
than its first 4 layers).

Same examples per optimizer step, the same loss curve (the gradients are summed across ranks
weighted by target tokens, so a step's loss is the same token mean), and exactly one version,
published by rank 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.train

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "demo"
#: Node 0 of a multi-node run waits 10 s after publishing so that the other pods end first and their logs stay
#: readable (jobs.trainer.distributed.relaunch); these "nodes" are local processes whose output the test already
#: holds, so they leave at once (the real node keeps it: test_real_pods and test_jobset read rank 1's log after)
NO_LEAVE_GRACE = {"LORA_JOBS_LEAVE_GRACE_S": "0"}


def _threads(nproc: int) -> dict[str, str]:
    """One torch thread per rank on these 2 cores; one process alone sizes its own (both cores)."""
    return {"OMP_NUM_THREADS": "1"} if nproc > 1 else {}


def _job(tmp_path: Path, name: str, model_dir: Path, nproc: int) -> tuple[subprocess.CompletedProcess, Path]:
    spec = {"name": name, "base_model": {"uri": str(model_dir)}, "dataset": {"train": str(DEMO / "train.jsonl")},
            "output": str(tmp_path / "store"), "training": {"max_steps": 4, "max_seq_length": 256},
            # no LoRA dropout: its masks come from each process's own random stream, so with it the
            # two runs could only agree statistically; without it they must agree to rounding
            "lora": {"dropout": 0.0},
            "eval": {"enabled": False}, "merge": {"enabled": False}, "resources": {"gpus": 0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    tmsg = tmp_path / f"{name}.termination"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERMINATION_MESSAGE_PATH": str(tmsg), **_threads(nproc)}
    job = ["-m", "jobs", "run", "--spec", str(path), "--workdir", str(tmp_path / f"work-{name}")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *job]
    else:
        cmd = [sys.executable, *job]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO), tmsg


def test_two_processes_train_like_one_and_publish_one_version(tmp_path, tiny_model_dir):
    from jobs.publish import existing_versions
    from jobs.storage import LocalStore

    one, _ = _job(tmp_path, "one", tiny_model_dir, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two, tmsg = _job(tmp_path, "two", tiny_model_dir, 2)
    assert two.returncode == 0, two.stderr[-4000:]
    assert json.loads(tmsg.read_text())["exit_code"] == 0
    assert "rank 1 of 2" in two.stderr and "rank 1: training done; rank 0 publishes" in two.stderr

    store = LocalStore(str(tmp_path / "store"))
    assert existing_versions(store, "two") == {1: True}, "rank 0 alone publishes, once"
    meta = json.loads(store.get_bytes("two/v1/metadata.json"))
    assert meta["training"]["world_size"] == 2 and meta["training"]["examples_per_step"] == 16

    def history(run):
        return json.loads(store.get_bytes(f"{run}/v1/eval_report.json"))["training"]["history"]

    h1, h2 = history("one"), history("two")
    assert [h["examples"] for h in h2] == [h["examples"] for h in h1] == [16] * 4
    assert [h["tokens"] for h in h2] == [h["tokens"] for h in h1], "the same examples in every step"
    for a, b in zip(h1, h2):  # the same token-mean loss; fp32 sums in another order
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (h1, h2)

    # Two "nodes" as a multi-node pod pair runs them: each its own `python -m jobs run` with the PET_*
    # variables the launcher renders, its own scratch folder, one torchrun each, rendezvous on node 0.
    nodes = _two_nodes(tmp_path, "nodes", tiny_model_dir)
    for rank, (proc, out) in enumerate(nodes):
        assert proc.returncode == 0, f"node {rank}:\n{out[-3000:]}"
    assert "node 1 of 2: starting 1 training process (torchrun --nnodes=2 --node-rank=1" in nodes[1][1]
    assert "rank 1 of 2" in nodes[1][1] and "rank 1: training done; rank 0 publishes" in nodes[1][1]
    assert existing_versions(store, "nodes") == {1: True}, "node 0's rank 0 alone publishes, once"
    hn = history("nodes")
    assert [h["tokens"] for h in hn] == [h["tokens"] for h in h1]
    for a, b in zip(h1, hn):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (h1, hn)


def _two_nodes(tmp_path: Path, name: str, model_dir: Path) -> list[tuple[subprocess.Popen, str]]:
    import socket

    spec = {"name": name, "base_model": {"uri": str(model_dir)}, "dataset": {"train": str(DEMO / "train.jsonl")},
            "output": str(tmp_path / "store"), "training": {"max_steps": 4, "max_seq_length": 256},
            "lora": {"dropout": 0.0}, "eval": {"enabled": False}, "merge": {"enabled": False},
            "resources": {"gpus": 0, "nodes": 2}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **NO_LEAVE_GRACE,
               "TERMINATION_MESSAGE_PATH": str(tmp_path / f"{name}-{rank}.termination"),
               "PET_NNODES": "2", "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1",
               "PET_MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "jobs", "run", "--spec", str(path), "--workdir",
                                       str(tmp_path / f"work-{name}-node{rank}")], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    return list(zip(procs, outs))


def test_under_torchrun_the_job_still_exits_with_its_own_code(tmp_path, tiny_model_dir, monkeypatch):
    """torchrun exits 1 whatever its workers did; the job's relaunch maps it back (11: bad data,
    never retried) from the termination message rank 0 wrote."""
    from jobs.trainer.distributed import relaunch

    spec = {"name": "too-few", "base_model": {"uri": str(tiny_model_dir)},
            "dataset": {"train": str(DEMO / "train.jsonl")}, "output": str(tmp_path / "store"),
            "data": {"min_rows": 100000}, "resources": {"gpus": 0}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    tmsg = tmp_path / "termination"
    tmsg.write_text('{"exit_code": 0}')  # a stale message from an earlier run must not count
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(tmsg))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(REPO)
    code = relaunch(2, ["run", "--spec", str(path), "--workdir", str(tmp_path / "work")])
    assert code == 11
    msg = json.loads(tmsg.read_text())
    assert msg["exit_code"] == 11 and msg["stage"] == "prepare"


def _children_with_rank(pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (read from /proc: their RANK variable)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                env = dict(kv.split("=", 1) for kv in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in kv)
            except OSError:
                continue
            if "RANK" in env:
                out[int(env["RANK"])] = int(child)
    return out


def test_sigterm_to_one_rank_checkpoints_all_and_the_retry_resumes_at_that_step_on_any_world_size(
        tmp_path, tiny_model_dir):
    """The kubelet's SIGTERM may reach one worker first: the stop flag travels with the step's all-reduce,
    so every rank stops after the same step, rank 0 checkpoints, the run exits 75, and the retry (a new
    pod: a fresh workdir) resumes from that step. A checkpoint is not tied to its world size: a run
    stopped in one process resumes in two (both ranks at the same step), and both runs train the
    same curve."""
    import re
    import signal
    import time

    from jobs.publish import existing_versions
    from jobs.storage import LocalStore

    def spec(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "base_model": {"uri": str(tiny_model_dir)}, "dataset": {"train": str(DEMO / "train.jsonl")},
            "output": str(tmp_path / "store"),
            "training": {"max_steps": 6, "max_seq_length": 256, "checkpoint_interval_steps": 100, "epochs": 3},
            "lora": {"dropout": 0.0}, "eval": {"enabled": False}, "merge": {"enabled": False},
            "resources": {"gpus": 0}}))
        return path

    def start(name: str, attempt: int, nproc: int):
        env = {**os.environ, "PYTHONPATH": str(REPO), **_threads(nproc),
               "TERMINATION_MESSAGE_PATH": str(tmp_path / f"{name}-{attempt}.termination")}
        job = ["-m", "jobs", "run", "--spec", str(spec(name)), "--workdir", str(tmp_path / f"work-{name}-{attempt}")]
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
        return subprocess.Popen([sys.executable, *launch, *job], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop_at_step_2(name: str, nproc: int) -> int:
        first = start(name, 1, nproc)
        log = []
        deadline = time.time() + 600
        for line in first.stdout:
            log.append(line)
            if "step 2/6" in line:
                target = _children_with_rank(first.pid)[1] if nproc > 1 else first.pid
                os.kill(target, signal.SIGTERM)  # rank 1 only
                break
            assert time.time() < deadline, "".join(log[-20:])
        log.append(first.stdout.read())
        first.wait(timeout=300)
        msg = json.loads((tmp_path / f"{name}-1.termination").read_text())
        assert msg["exit_code"] == 75 and msg["stage"] == "train", (msg, "".join(log)[-3000:])
        stopped = int(re.search(r"stopped by SIGTERM at step (\d+)/6", msg["message"]).group(1))
        assert stopped in (2, 3, 4), msg
        return stopped

    def resume(name: str, nproc: int, stopped: int) -> str:
        out = start(name, 2, nproc).communicate(timeout=900)[0]
        assert json.loads((tmp_path / f"{name}-2.termination").read_text())["exit_code"] == 0, out[-3000:]
        assert f"step {stopped + 1}/6" in out and "step 1/6 " not in out, out[-3000:]
        return out

    store = LocalStore(str(tmp_path / "store"))

    def history(name: str) -> list[dict]:
        assert existing_versions(store, name) == {1: True}, "published once"
        return json.loads(store.get_bytes(f"{name}/v1/eval_report.json"))["training"]["history"]

    # two ranks, SIGTERM to rank 1, the retry on two ranks
    stopped = stop_at_step_2("stop", 2)
    out = resume("stop", 2, stopped)
    assert f"resumed from checkpoint at step {stopped} of 6\n" in out, out[-3000:]
    same = history("stop")
    assert [h["step"] for h in same] == [1, 2, 3, 4, 5, 6]

    # one process stopped, the retry on two: every rank resumes at the step one process wrote
    stopped = stop_at_step_2("grow", 1)
    out = resume("grow", 2, stopped)
    assert out.count(f"resumed from checkpoint at step {stopped} of 6 (written by 1 training process, now 2)") == 2, \
        out[-3000:]
    grown = history("grow")
    assert [h["step"] for h in grown] == [1, 2, 3, 4, 5, 6] and [h["examples"] for h in grown] == [16] * 6
    assert [h["tokens"] for h in grown] == [h["tokens"] for h in same], "a step is the same examples on 1 or 2"
    for a, b in zip(same, grown):  # the same curve, whichever world size wrote or read the checkpoint
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (same, grown)


def _descendant_with_rank(pid: int, rank: int) -> int | None:
    """The pid of the training process with RANK=rank under ``pid`` (relaunch -> torchrun -> workers)."""
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").iterdir():
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                try:
                    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{child}/environ").read_text().split("\0")
                               if "=" in kv)
                except OSError:
                    continue
                if env.get("RANK") == str(rank):
                    return child
                todo.append(child)
    return None


class _Gang:
    """Two "nodes" as a 2-pod Indexed Job runs them (each its own ``python -m jobs run``, relaunched under
    torchrun with the rendered PET_* variables, its own scratch and termination message); one attempt."""

    def __init__(self, tmp_path: Path, spec_path: Path, attempt: int, **env):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.tmsg = [tmp_path / f"attempt{attempt}-node{r}.termination" for r in range(2)]
        self.procs = []
        for rank in range(2):
            e = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **NO_LEAVE_GRACE, **env,
                 "TERMINATION_MESSAGE_PATH": str(self.tmsg[rank]), "PET_NNODES": "2", "PET_NODE_RANK": str(rank),
                 "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "jobs", "run", "--spec", str(spec_path), "--workdir",
                 str(tmp_path / f"work-attempt{attempt}-node{rank}")],
                env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        self.log: list[str] = []

    def read_node0_until(self, *needles: str, timeout: float = 600) -> None:
        """Read node 0's log until every needle has been seen, in order."""
        import time

        deadline = time.time() + timeout
        want = list(needles)
        for line in self.procs[0].stdout:
            self.log.append(line)
            if want and want[0] in line:
                want.pop(0)
                if not want:
                    return
            assert time.time() < deadline, "".join(self.log[-30:])
        raise AssertionError(f"node 0 ended before {want}:\n" + "".join(self.log[-30:]))

    def message(self, node: int) -> dict:
        return json.loads(self.tmsg[node].read_text())

    def finish(self, timeout: float = 900) -> list[str]:
        out0 = "".join(self.log) + self.procs[0].communicate(timeout=timeout)[0]
        out1 = self.procs[1].communicate(timeout=timeout)[0]
        return [out0, out1]


def test_a_rank_killed_hard_or_gone_silent_ends_every_node_and_the_gang_resumes_from_the_newest_checkpoint(
        tmp_path, tiny_model_dir):
    """An Indexed Job replaces only the pod that failed, so a multi-node run is a gang only if every surviving
    pod ends too, promptly, with the transient code. SIGKILL of node 1's rank (its socket closes): node 0 exits
    75 within seconds. Node 1's rank frozen (SIGSTOP: a lost node, nothing closes the socket): node 0 exits 75
    once the collective timeout passes (here 20 s; torch's gloo default is 30 minutes). Each new gang resumes
    from the newest checkpoint, and the run publishes exactly one version with every step once."""
    import re
    import signal
    import time

    from jobs.publish import existing_versions
    from jobs.storage import LocalStore

    spec = {"name": "gang", "base_model": {"uri": str(tiny_model_dir)}, "dataset": {"train": str(DEMO / "train.jsonl")},
            "output": str(tmp_path / "store"),
            # 4 examples a step (2 per rank) and short rows: what is proved is the gang's end, not the training.
            # 12 steps: each fault lands after step 3 or 5, and the tiny model's steps are quick: the steps left
            # after it keep the gang from reaching its end before the fault does
            "training": {"max_steps": 12, "max_seq_length": 128, "checkpoint_interval_steps": 2,
                         "per_device_batch_size": 2, "gradient_accumulation_steps": 1},
            "lora": {"dropout": 0.0}, "eval": {"enabled": False}, "merge": {"enabled": False},
            "resources": {"gpus": 0, "nodes": 2}}
    path = tmp_path / "gang.yaml"
    path.write_text(yaml.safe_dump(spec))
    timeout_s = 20

    # attempt 1: a hard death of node 1's rank after the step-2 checkpoint
    first = _Gang(tmp_path, path, 1, LORA_JOBS_COLLECTIVE_TIMEOUT_S=str(timeout_s))
    first.read_node0_until("checkpoint saved at step 2", "step 3/12")
    victim = _descendant_with_rank(first.procs[1].pid, 1)
    assert victim, "node 1's training process"
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    out0, out1 = first.finish(timeout=300)
    noticed = time.monotonic() - killed
    assert first.procs[0].returncode == 75, out0[-3000:]
    msg = first.message(0)
    assert msg["exit_code"] == 75 and msg["stage"] == "train", msg
    assert msg["message"].startswith("rank 0 of 2 lost a peer during the "), msg  # the step's or validation's
    # the dead rank's socket closed: a FIN ("closed") or, with bytes of the step's all-reduce still unread when the
    # kernel closed it, a RST ("reset"): either way not the collective timeout of the silent peer below
    assert re.search(r"Connection (closed|reset) by peer", msg["message"]), msg
    assert noticed < 60, f"node 0 took {noticed:.0f} s to notice a dead peer"
    assert first.procs[1].returncode not in (0, *range(10, 16)), "node 1 failed, and not as 'never retry'"

    # attempt 2 (the Job replaced both pods): resumes at step 2; node 1's rank goes silent after the step-4 one
    second = _Gang(tmp_path, path, 2, LORA_JOBS_COLLECTIVE_TIMEOUT_S=str(timeout_s))
    second.read_node0_until("resumed from checkpoint at step 2 of 12", "checkpoint saved at step 4", "step 5/12")
    frozen = _descendant_with_rank(second.procs[1].pid, 1)
    assert frozen
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        second.procs[0].wait(timeout=timeout_s + 120)
        noticed = time.monotonic() - stopped
    finally:
        os.kill(frozen, signal.SIGKILL)  # what the kubelet of a lost node never gets to do
    out0, out1 = second.finish(timeout=300)
    assert second.procs[0].returncode == 75, out0[-3000:]
    msg = second.message(0)
    assert msg["exit_code"] == 75 and "lost a peer" in msg["message"] and "Timed out" in msg["message"], msg
    assert timeout_s - 5 <= noticed < timeout_s + 90, f"node 0 noticed a silent peer after {noticed:.0f} s"

    # attempt 3: resumes at step 4 and publishes once
    third = _Gang(tmp_path, path, 3, LORA_JOBS_COLLECTIVE_TIMEOUT_S=str(timeout_s))
    out0, out1 = third.finish()
    assert third.procs[0].returncode == 0 and third.procs[1].returncode == 0, out0[-3000:] + out1[-2000:]
    assert third.message(0)["exit_code"] == 0
    for out in (out0, out1):
        assert "resumed from checkpoint at step 4 of 12" in out and "step 5/12" in out and "step 3/12" not in out
    store = LocalStore(str(tmp_path / "store"))
    assert existing_versions(store, "gang") == {1: True}, "one version, published once by node 0's rank 0"
    report = json.loads(store.get_bytes("gang/v1/eval_report.json"))
    assert [h["step"] for h in report["training"]["history"]] == list(range(1, 13))
