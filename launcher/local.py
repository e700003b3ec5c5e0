"""``submit --local``: the job itself (``python -m jobs run``) in a subprocess here, no cluster."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
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
    ours = workdir is None  # a folder the caller named is theirs to keep; ours is scratch
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
        try:
            for line in proc.stdout:
                on_output(line)
            code = proc.wait()
        except KeyboardInterrupt:
            code = _stop(proc, on_output)
            note(f"interrupted: {name} stopped; nothing was published. The same command resumes it from its "
                 "last checkpoint in the output, if it saved one")
            code = EXIT_INTERRUPTED if code < 0 else code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if ours:
        # the base model's copy, the data, the publish folder (a merged model): hundreds of MB a run. What a
        # resume needs (checkpoints) and what the run made (the version) are in the output, not here.
        shutil.rmtree(workdir, ignore_errors=True)
    return code


#: Ctrl-C: 128 + SIGINT, as a shell reports it (jobs.trainer.recipe.EXIT_INTERRUPTED is the job's own).
EXIT_INTERRUPTED = 130


def _stop(proc: subprocess.Popen, on_output: Callable[[str], None]) -> int:
    """After Ctrl-C. The job, in our terminal's process group, got the SIGINT too and stops by itself (exit 130;
    no half version stays); if the signal was ours alone (a caller's), it is passed on after 10 s; a job still
    running after 70 s is terminated, after 150 s killed. Its last lines are shown meanwhile."""
    done = threading.Event()

    def escalate() -> None:
        for sig, at in ((signal.SIGINT, 10.0), (signal.SIGTERM, 70.0), (signal.SIGKILL, 150.0)):
            if done.wait(max(0.0, at - (time.monotonic() - started))) or proc.poll() is not None:
                return
            proc.send_signal(sig)

    started = time.monotonic()
    threading.Thread(target=escalate, name="local-run-stop", daemon=True).start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_output(line)
        return proc.wait()
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
        proc.kill()
        return proc.wait()
    finally:
        done.set()
