"""The parent of a local run's job: ``python -m launcher.backends.local_supervisor RUN_DIR LOCK_FD``.

Started detached by :meth:`launcher.backends.local.LocalBackend.submit`, with the run's log as its output and
the run's lock held on ``LOCK_FD``. It runs the job (``run.json``'s command) in its own process group, which it
shares with the job, so that ``cancel``'s SIGTERM to the group reaches the job; it outlives those signals
itself, to write the job's exit code (128 + N when signal N killed it) to ``exit_code`` once the job has ended,
after removing a scratch working folder. The job inherits the lock too: the run counts as live while either
process lives.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    run_dir, lock_fd = Path(argv[0]), int(argv[1])
    record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    # A handler, not SIG_IGN: the job must not inherit an ignored SIGTERM/SIGINT (handlers reset on exec).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: None)
    try:
        proc = subprocess.Popen(record["command"], cwd=record["base_dir"], stdin=subprocess.DEVNULL,
                                pass_fds=(lock_fd,))
        code = proc.wait()
    except OSError as err:  # the interpreter or the working folder went away
        print(f"cannot start the job: {err}", flush=True)
        code = 1
    if code < 0:
        code = 128 - code
    if record.get("scratch"):
        # the base model's copy, the data, the publish folder: hundreds of MB a run. What a resume needs
        # (checkpoints) and what the run made (the version) are in the output, not here.
        shutil.rmtree(record["workdir"], ignore_errors=True)
    tmp = run_dir / ".exit_code.tmp"
    tmp.write_text(f"{code}\n", encoding="utf-8")
    os.replace(tmp, run_dir / "exit_code")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
