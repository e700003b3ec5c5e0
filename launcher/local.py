"""``submit --local``: the job itself (``python -m jobs run``) in a subprocess here, no cluster."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from jobs.spec import TrainingRunSpec, parse_spec
from launcher.render import job_name, spec_yaml


def resolve_local_paths(spec: TrainingRunSpec, base: Path) -> TrainingRunSpec:
    """The spec with relative local paths made absolute against ``base`` (the spec file's folder)."""

    def fix(value: str | None) -> str | None:
        if value is None or value.startswith(("s3://", "hf:")):
            return value
        raw = value[7:] if value.startswith("file://") else value
        p = Path(raw).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    data = spec.model_dump(mode="json")
    data["base_model"]["uri"] = fix(data["base_model"]["uri"])
    data["dataset"]["train"] = fix(data["dataset"]["train"])
    data["dataset"]["validation"] = fix(data["dataset"]["validation"])
    data["output"] = fix(data["output"])
    if isinstance(data["eval"].get("prompts"), str):
        data["eval"]["prompts"] = fix(data["eval"]["prompts"])
    return parse_spec(data, source="(resolved spec)")


def run_local(spec: TrainingRunSpec, base: Path, workdir: Path | None, *, on_output: Callable[[str], None],
              note: Callable[[str], None], env: dict[str, str] | None = None) -> int:
    """Run the job here, streaming each line of its output (newline kept) to ``on_output``; return its exit
    code. The working folder defaults to ``~/.cache/lora-jobs/runs/<job name>``. ``env`` adds variables
    (the launcher's settings for the job); the caller's own environment wins over them."""
    spec = resolve_local_paths(spec, base)
    name = job_name(spec)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    workdir = (workdir or cache / "lora-jobs" / "runs" / name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / "spec.yaml"
    spec_file.write_text(spec_yaml(spec), encoding="utf-8")
    cmd = [sys.executable, "-m", "jobs", "run", "--spec", str(spec_file), "--workdir", str(workdir)]
    env = {**(env or {}), **os.environ}
    env.setdefault("LORA_JOBS_RUN_ID", name)
    env.setdefault("PYTHONUNBUFFERED", "1")
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    note(f"running {name} locally in {workdir}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1, text=True,
                            errors="replace")
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
