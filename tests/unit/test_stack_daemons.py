"""hack/lib.sh's start: a stack daemon keeps no file descriptor of the shell that started it but its log, so a
lock taken around a command that starts the stack (`flock LOCK make test`) is free when that command ends,
while the daemon runs on, its pid recorded."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_a_daemon_started_under_a_lock_does_not_hold_the_lock(tmp_path):
    lock = tmp_path / "lock"
    script = (f'. "{REPO}/hack/lib.sh"; start sleeper "{tmp_path}/sleeper.log" sleep 60')
    env = {**os.environ, "STACK_RUN": str(tmp_path / "run"), "STACK_CACHE": str(tmp_path / "cache")}
    subprocess.run(["flock", str(lock), "bash", "-c", script], env=env, check=True, timeout=30)
    pid = int((tmp_path / "run" / "pids" / "sleeper").read_text())
    try:
        # the recorded pid becomes the daemon: the subshell execs setsid, which execs sleep (under load, a moment on)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
        fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert fds == {"/dev/null", str(tmp_path / "sleeper.log")}, fds
        with open(lock, "w") as f:  # free: the daemon did not inherit flock's descriptor
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(pid, signal.SIGKILL)
