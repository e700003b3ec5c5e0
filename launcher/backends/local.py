"""The local backend: a run is the job itself (``python -m jobs run``) as a process group on this machine.

``submit`` starts it detached (its own session, so closing the terminal does not stop it) under a small
supervisor (:mod:`launcher.backends.local_supervisor`) and returns; the run's state is one folder,
``<state dir>/<job name>/`` (the ``local_state_dir`` setting, default ``$XDG_STATE_HOME/lora-jobs/runs``):

  ``run.json``          the run: name, job name, spec hash, output, its folders, the process group, created
  ``spec.yaml``         the spec as written (its hash is the job name's, whatever the current folder)
  ``log``               everything the job printed
  ``lock``              held (``flock``) by the supervisor and the job while either lives: the run is live
  ``termination.json``  the job's one-line reason, as a pod's termination message
  ``exit_code``         written by the supervisor when the job has ended
  ``cancelled``         ``launcher cancel`` asked it to stop

``status``, ``logs``, ``wait``, ``cancel`` and ``list`` read that folder and the job's progress object in its
output (:mod:`jobs.progress`), as they read a Job and its progress on a cluster. ``cancel`` sends SIGTERM to
the process group: the job checkpoints and stops with exit code 75, as a preempted pod does. The same spec
submitted while its run is live is the same run; submitted after it ended, it runs again (and resumes from
its newest checkpoint in the output).
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from launcher.backends import poll_until_finished
from launcher.errors import UsageError, WaitTimeout
from launcher.results import Attempts, Cancelled, LogStream, RunStatus, RunSummary, cost_of

RUN_FILE, SPEC_FILE, LOG_FILE, LOCK_FILE = "run.json", "spec.yaml", "log", "lock"
TERMINATION_FILE, EXIT_FILE, CANCELLED_FILE = "termination.json", "exit_code", "cancelled"
#: Ctrl-C: 128 + SIGINT, as a shell reports it (jobs.trainer.recipe.EXIT_INTERRUPTED is the job's own).
EXIT_INTERRUPTED = 130
#: The launcher's own checkout: the job imports ``jobs`` from it, whatever folder it runs in.
_HERE = str(Path(__file__).resolve().parents[2])


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/lora-jobs/runs`` (``~/.local/state/lora-jobs/runs``)."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "lora-jobs" / "runs"


def local_tracking_env(spec: Any, settings: Any) -> dict[str, str]:
    """What a local run gets of the tracking settings: the URI setting in the variable the spec names, as a pod
    gets it (a token only ever comes from the caller's own environment)."""
    mlflow = spec.tracking.mlflow if spec.tracking is not None else None
    if mlflow is None or not settings.mlflow_tracking_uri:
        return {}
    return {mlflow.uri_env: settings.mlflow_tracking_uri}


def output_here(output: str, base_dir: Path) -> str:
    """The spec's ``output`` as the job, running in ``base_dir``, reads it: s3:// as it is, a folder absolute."""
    if output.startswith("s3://"):
        return output.rstrip("/")
    path = Path(output[7:] if output.startswith("file://") else output).expanduser()
    return os.path.normpath(path if path.is_absolute() else base_dir / path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class LocalSubmitResult:
    """A local run started (``created``) or found live (the same spec, still running)."""

    job_name: str
    created: bool
    run: str
    spec_hash: str
    run_dir: Path
    pid: int | None
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    kind: str = "local run"

    @property
    def message(self) -> str:
        verb = "started" if self.created else "already running"
        return f"{verb}: local run {self.job_name} (process group {self.pid}; state in {self.run_dir})"

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "job": self.job_name, "kind": "local", "namespace": None,
                "spec_hash": self.spec_hash, "created": self.created, "server_dry_run": False,
                "message": self.message, "warnings": list(self.warnings), "state_dir": str(self.run_dir),
                "pid": self.pid}


@dataclass
class _Run:
    """What a run's folder says now."""

    dir: Path
    record: dict
    alive: bool
    exit_code: int | None
    ended_at: float | None

    @property
    def job(self) -> str:
        return self.record["job"]

    @property
    def finished(self) -> bool:
        return not self.alive


class LocalBackend:
    """Runs on this machine, their state under ``state_dir`` (default: the ``local_state_dir`` setting, else
    :func:`default_state_dir`)."""

    name = "local"

    def __init__(self, settings: Any, *, note: Callable[[str], None], state_dir: str | Path | None = None):
        self.settings = settings
        self._note = note
        self.root = Path(state_dir or settings.local_state_dir or default_state_dir()).expanduser().resolve()

    @property
    def where(self) -> str:
        return f"{self.root} (local runs)"

    # ------------------------------------------------------------------ reading a run's folder
    def _dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [d for d in self.root.iterdir() if (d / RUN_FILE).is_file()]

    @staticmethod
    def _read(run_dir: Path) -> _Run:
        record = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        alive = _held(run_dir / LOCK_FILE)
        code, ended = None, None
        exit_file = run_dir / EXIT_FILE
        if exit_file.is_file():
            code, ended = int(exit_file.read_text().strip()), exit_file.stat().st_mtime
        return _Run(run_dir, record, alive, code, ended)

    def _find(self, run: str) -> _Run:
        """The run ``run`` names: a job name, else the newest run of that name."""
        if (self.root / run / RUN_FILE).is_file():
            return self._read(self.root / run)
        mine = [r for r in (self._read(d) for d in self._dirs()) if r.record.get("run") == run]
        if not mine:
            raise UsageError(f"no local run named {run} in {self.root}",
                             hint="see `launcher --backend local list`, or pass --state-dir where it was started")
        return max(mine, key=lambda r: (r.record.get("created") or "", r.job))

    def _status(self, r: _Run, *, with_progress: bool = True, progress: dict | None = None) -> RunStatus:
        """The run's status; its progress object read from its output (``with_progress``), or ``progress``."""
        from jobs.errors import describe_exit_code
        from jobs.progress import read_run_progress

        rec = r.record
        if with_progress:
            progress = read_run_progress(rec["output"], rec["spec_hash"], endpoint=self.settings.s3_endpoint)
        cancelled = (r.dir / CANCELLED_FILE).exists()
        reason = _termination(r.dir)
        details = [f"state: {r.dir}", f"log: {r.dir / LOG_FILE}"]
        if r.alive and r.exit_code is None:
            state = "Running"
            sentence = f"running here (process group {rec.get('pid')})" + ("; cancelling" if cancelled else "")
        elif r.exit_code is None:
            state, sentence = "Failed", ("its process ended without recording an exit code (killed with SIGKILL, or "
                                         "the machine restarted); submitting the spec again resumes it from its "
                                         "newest checkpoint")
        elif r.exit_code == 0:
            version = (progress or {}).get("version")
            state, sentence = "Succeeded", "succeeded" + (f": published {version}" if version else "")
        else:
            state = "Failed"
            why = describe_exit_code(r.exit_code)
            sentence = (f"cancelled (launcher cancel), exit code {r.exit_code}: {why}" if cancelled
                        else f"failed with exit code {r.exit_code}: {why}")
            if reason.get("message"):
                details.insert(0, f"the job said: {reason['message'].splitlines()[0][:300]}")
        cost = cost_of(progress, [], rec.get("created"), self.settings) if progress else None
        finished = state in ("Succeeded", "Failed")
        return RunStatus(
            run=rec.get("run"), job=r.job, namespace="local", spec_hash=rec.get("spec_hash"), state=state,
            sentence=sentence, exit_code=r.exit_code, blocked=False, details=details, created=rec.get("created"),
            started=rec.get("created"), completed=_iso(r.ended_at) if r.ended_at else None,
            attempts=Attempts(active=0 if finished else 1, succeeded=int(state == "Succeeded"),
                              failed=int(state == "Failed"), retries_allowed=0),
            output=rec.get("output"), pods=[], progress=progress, kind="local", cost=cost)

    # ------------------------------------------------------------------ the verbs
    def submit(self, spec: Any, *, base_dir: Path, server_dry_run: bool = False, skip_preflight: bool = False,
               workdir: Path | None = None) -> LocalSubmitResult:
        """Start the job here, detached, and return at once (``created`` False: the same spec is running)."""
        from launcher.render import job_name, spec_yaml

        if server_dry_run:
            raise UsageError("--server-dry-run asks a cluster's API server; a local run has none",
                             hint="leave out --server-dry-run, or submit to the cluster (leave out --local)")
        name = job_name(spec)
        run_dir = self.root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live = self._read(run_dir)
                return LocalSubmitResult(name, False, spec.name, spec.spec_hash(), run_dir, live.record.get("pid"))
            for stale in (EXIT_FILE, CANCELLED_FILE, TERMINATION_FILE):
                (run_dir / stale).unlink(missing_ok=True)
            scratch = workdir is None  # a folder the caller named is theirs to keep; ours is scratch
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            work = (workdir or cache / "lora-jobs" / "runs" / name).expanduser().resolve()
            (run_dir / SPEC_FILE).write_text(spec_yaml(spec), encoding="utf-8")
            record = {"run": spec.name, "job": name, "spec_hash": spec.spec_hash(),
                      "output": f"{output_here(spec.output, base_dir)}/{spec.name}", "base_dir": str(base_dir),
                      "workdir": str(work), "scratch": scratch, "created": _now(), "pid": None,
                      # -P: the job runs in the user's folder, whose files (a jobs/ or torch.py) must not shadow ours
                      "command": [sys.executable, "-P", "-m", "jobs", "run", "--spec", str(run_dir / SPEC_FILE),
                                  "--workdir", str(work)]}
            _write_atomic(run_dir / RUN_FILE, json.dumps(record, indent=1))
            env = {**local_tracking_env(spec, self.settings),
                   **({"AWS_ENDPOINT_URL": self.settings.s3_endpoint} if self.settings.s3_endpoint else {}),
                   "LORA_JOBS_RUN_ID": name, **os.environ,  # the caller's own environment wins, as before
                   "PYTHONUNBUFFERED": "1", "TERMINATION_MESSAGE_PATH": str(run_dir / TERMINATION_FILE)}
            env["PYTHONPATH"] = _HERE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            with open(run_dir / LOG_FILE, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-P", "-m", "launcher.backends.local_supervisor", str(run_dir), str(lock_fd)],
                    env=env, cwd=base_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, pass_fds=(lock_fd,))
            record["pid"] = proc.pid  # its process group, the job's too
            _write_atomic(run_dir / RUN_FILE, json.dumps(record, indent=1))
            return LocalSubmitResult(name, True, spec.name, spec.spec_hash(), run_dir, proc.pid)
        finally:
            os.close(lock_fd)  # the supervisor holds the lock from here on

    def status(self, run: str) -> RunStatus:
        return self._status(self._find(run))

    def list(self) -> list[RunSummary]:
        """The runs in the state folder, newest first."""
        from jobs.progress import read_runs_progress

        runs = sorted((self._read(d) for d in self._dirs()), key=lambda r: r.record.get("created") or "", reverse=True)
        # one S3 client for all, and no more tries once the store does not answer (as a cluster's list)
        progress = read_runs_progress([(r.record["output"], r.record["spec_hash"]) for r in runs],
                                      endpoint=self.settings.s3_endpoint)
        rows = []
        for r, p in zip(runs, progress):
            st = self._status(r, with_progress=False, progress=p)
            rows.append(RunSummary(run=st.run, job=st.job, state=st.state, sentence=st.sentence, created=st.created,
                                   progress=(st.progress or {}).get("summary") if st.state == "Running" else None,
                                   cost=(st.cost or {}).get("summary")))
        return rows

    def wait(self, run: str, *, timeout: float | None = None, interval: float = 2.0,
             on_change: Callable[[RunStatus], None] | None = None) -> RunStatus:
        deadline = time.monotonic() + timeout if timeout else None
        job = self._find(run).job

        def read() -> RunStatus:
            r = self._read(self.root / job)
            return self._status(r, with_progress=r.finished)

        return poll_until_finished(read, deadline=deadline, interval=interval, on_change=on_change,
                                   timed_out=lambda st: WaitTimeout(f"local run {job} is still running after "
                                                                    f"{timeout:g} s",
                                                                    hint="wait again with a longer --timeout"))

    def logs(self, run: str, *, follow: bool = False, tail: int | None = None, poll: float = 1.0,
             rank: int | None = None) -> LogStream:
        """The job's log (every rank of a multi-GPU run is in it); with ``follow``, until the run ends."""
        if rank:
            raise UsageError(f"a local run is one process group: its log holds every rank's lines; there is no "
                             f"rank {rank} to pick", hint="leave out --rank")
        r = self._find(run)
        return LogStream(self._lines(r, follow=follow, tail=tail, poll=poll))

    def _lines(self, r: _Run, *, follow: bool, tail: int | None, poll: float) -> Iterator[str]:
        log = _LogTail(r.dir / LOG_FILE)
        if tail is not None:
            log.skip_to_last(tail)
        while True:
            ended = self._read(r.dir).finished  # read before the file: no line written before the end is lost
            yield from log.new_lines(final=ended)
            if not follow:
                return None
            if ended:
                return self._status(self._read(r.dir))
            time.sleep(poll)

    def cancel(self, run: str, *, wait: bool = True, timeout: float = 120) -> Cancelled:
        """SIGTERM to the run's process group (the job checkpoints and exits 75); with ``wait``, until it ended."""
        r = self._find(run)
        if r.finished:
            raise UsageError(f"local run {r.job} has already ended: {self._status(r, with_progress=False).sentence}",
                             hint="nothing to cancel")
        (r.dir / CANCELLED_FILE).write_text(_now())
        _signal_group(r.record.get("pid"), signal.SIGTERM)
        if not wait:
            return Cancelled(r.job, False, "local run")
        deadline = time.monotonic() + timeout
        while not (r := self._read(r.dir)).finished:
            if time.monotonic() > deadline:
                raise WaitTimeout(f"local run {r.job} is still stopping after {timeout:g} s (saving a checkpoint?)",
                                  hint=f"wait longer, or stop it at once: kill -KILL -- -{r.record.get('pid')}")
            time.sleep(0.5)
        return Cancelled(r.job, True, "local run", r.exit_code)

    def output_of(self, run: str) -> tuple[str, str]:
        rec = self._find(run).record
        return rec["run"], rec["output"].rsplit("/", 1)[0]

    # ------------------------------------------------------------------ a run followed from this terminal
    def attach(self, job: str, on_output: Callable[[str], None]) -> int:
        """Stream the run's log (each line with its newline) until it ends and return its exit code. Whoever
        stops us stops the run: a SIGTERM to this process is passed on to the job (it checkpoints and exits 75,
        as in a pod); Ctrl-C sends it SIGINT (it stops and publishes nothing, exit 130), then SIGTERM after 60 s,
        SIGKILL after 140 s; a second Ctrl-C kills it at once."""
        r = self._find(job)
        pgid = r.record.get("pid")
        ctrl_c: list[threading.Event] = []  # one per Ctrl-C: the first stops the job, a second kills it

        def on_sigint(signum, frame) -> None:
            # Forwarded from the handler itself, not through a KeyboardInterrupt that code between here and the
            # loop could swallow: the job must hear of every Ctrl-C.
            if ctrl_c:
                _signal_group(pgid, signal.SIGKILL)
                return
            ctrl_c.append(_escalate(pgid))
            _signal_group(pgid, signal.SIGINT)

        try:
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: _signal_group(pgid, signal.SIGTERM))
            previous_int = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread (a library caller's worker): signals stay theirs
            previous = previous_int = None
        log = _LogTail(r.dir / LOG_FILE)
        try:
            while True:
                ended = self._read(r.dir).finished
                for line in log.new_lines(final=ended):
                    on_output(line + "\n")
                if ended:
                    break
                time.sleep(0.2)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
                signal.signal(signal.SIGINT, previous_int)
            for stopper in ctrl_c[:1]:
                stopper.set()
        interrupted = bool(ctrl_c)
        r = self._read(r.dir)
        code = r.exit_code if r.exit_code is not None else 1
        if interrupted:
            self._note(f"interrupted: {r.job} stopped; nothing was published. The same command resumes it from its "
                       "last checkpoint in the output, if it saved one")
            code = EXIT_INTERRUPTED if code in (1, 128 + signal.SIGKILL) else code
        elif r.exit_code is None:
            self._note(f"{r.job}: {self._status(r, with_progress=False).sentence}")
        return code


def _held(lock: Path) -> bool:
    """Whether a live supervisor or job holds the run's lock (a dead one's lock is free: no stale pid file)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _termination(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / TERMINATION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _signal_group(pgid: int | None, sig: int) -> None:
    if pgid:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:  # ended meanwhile
            pass


def _escalate(pgid: int | None) -> threading.Event:
    """After a Ctrl-C: SIGTERM at 60 s, SIGKILL at 140 s, unless the returned event is set first (it ended)."""
    done = threading.Event()

    def run() -> None:
        for sig, wait in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 80.0)):
            if done.wait(wait):
                return
            _signal_group(pgid, sig)

    threading.Thread(target=run, name="local-run-stop", daemon=True).start()
    return done


class _LogTail:
    """A growing log file read line by line from where the last read stopped."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self._partial = b""

    def skip_to_last(self, n: int) -> None:
        """Start at the last ``n`` lines."""
        data = self.path.read_bytes() if self.path.exists() else b""
        keep = data.splitlines(keepends=True)[-n:] if n else []
        self.pos = len(data) - sum(len(line) for line in keep)

    def new_lines(self, *, final: bool = False) -> list[str]:
        """The complete lines written since the last call; with ``final``, an unterminated last line too."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        if final and self._partial:
            lines.append(self._partial)
            self._partial = b""
        return [line.decode("utf-8", "replace") for line in lines]
