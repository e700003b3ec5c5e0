"""``submit --local``: the job itself (``python -m jobs run``) in a subprocess here, no cluster."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from jobs.spec import TrainingRunSpec
from launcher.render import job_name, spec_yaml


def run_local(spec: TrainingRunSpec, base: Path, workdir: Path | None, *, on_output: Callable[[str], None],
              note: Callable[[str], None], env: dict[str, str] | None = None) -> int:
    """Run the job here, streaming each line of its output (newline kept) to ``on_output``; return its exit
    code. The working folder defaults to ``~/.cache/lora-jobs/runs/<job name>``. ``env`` adds variables
    (the launcher's settings for the job); the caller's own environment wins over them.

    The job runs in ``base`` (the spec file's folder), so relative local paths in the spec mean what they
    say there; the spec goes to the job as written, so its hash (the job name, the checkpoints' and the
    progress file's key) is the one ``validate`` printed, whatever the current folder."""
    name = job_name(spec)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    workdir = (workdir or cache / "lora-jobs" / "runs" / name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / "spec.yaml"
    spec_file.write_text(spec_yaml(spec), encoding="utf-8")
    # -P: the job runs in the user's folder, whose files (a jobs/ or torch.py of theirs) must not shadow ours
    cmd = [sys.executable, "-P", "-m", "jobs", "run", "--spec", str(spec_file), "--workdir", str(workdir)]
    env = {**(env or {}), **os.environ}
    env.setdefault("LORA_JOBS_RUN_ID", name)
    env.setdefault("PYTHONUNBUFFERED", "1")
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    note(f"running {name} locally in {workdir}")
    proc = subprocess.Popen(cmd, env=env, cwd=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
                            text=True, errors="replace")
    # A SIGTERM to us (a timeout, a CI runner, a terminal closing) goes to the job as well: it checkpoints
    # and exits 75, as in a pod, instead of training on as an orphan.
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    except ValueError:  # not the main thread (a library caller's worker): signals stay theirs
        previous = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_output(line)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
