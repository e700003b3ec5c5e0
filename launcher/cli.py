"""``launcher``: validate, submit, follow and diagnose LoRA training Jobs.

Exit codes (every verb):

  0  ok (for submit --wait / wait: the run succeeded)
  1  the run failed (or `data check` found the data unusable)
  2  usage error or invalid spec / settings
  3  the cluster or object storage is unreachable or refused, or a preflight check failed
  4  timed out (wait --timeout)

``submit --local`` exits with the job's own exit code (docs/architecture.md).
Heavy imports (kubernetes, boto3, torch) happen inside the verbs that need them,
so ``launcher --help`` stays instant.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from jobs.errors import DataError, LoraJobError, SpecError, StorageError, TransientError

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_CLUSTER, EXIT_TIMEOUT = 0, 1, 2, 3, 4

LABEL_APP_SELECTOR = "app.kubernetes.io/name=lora-jobs"
POD_JOB_LABEL = "batch.kubernetes.io/job-name"


class Format(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


class RunFailed(LoraJobError):
    cli_exit_code = EXIT_RUN_FAILED


class WaitTimeout(LoraJobError):
    cli_exit_code = EXIT_TIMEOUT


class UsageError(LoraJobError):
    cli_exit_code = EXIT_USAGE


def exit_code_for(err: BaseException) -> int:
    """The CLI exit code of an error (documented in the module docstring)."""
    if isinstance(err, (SpecError, DataError)):
        return EXIT_USAGE
    if isinstance(err, (StorageError, TransientError)):
        return EXIT_CLUSTER
    return int(getattr(err, "cli_exit_code", EXIT_RUN_FAILED))


def _debug() -> bool:
    return os.environ.get("LAUNCHER_DEBUG", "") not in ("", "0", "false", "no")


def _err(text: str) -> None:
    typer.echo(text, err=True)


def _report(err: LoraJobError) -> int:
    _err(f"error: {err}")
    return exit_code_for(err)


def _handles_errors(fn: Callable) -> Callable:
    """User errors print one message (no traceback unless LAUNCHER_DEBUG=1) and exit with their code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LoraJobError as err:
            if _debug():
                raise
            raise typer.Exit(_report(err)) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None

    return wrapper


app = typer.Typer(
    name="launcher",
    help="Fine-tune LLMs with LoRA as Kubernetes Jobs.\n\n"
         "Exit codes: 0 ok, 1 run failed, 2 usage or spec error, 3 cluster/storage unreachable or preflight "
         "failed, 4 timeout. Set LAUNCHER_DEBUG=1 for tracebacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Check training data before you submit.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.callback()
def _root(
    ctx: typer.Context,
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="Namespace (LAUNCHER_NAMESPACE)."),
    context: Optional[str] = typer.Option(None, "--context", help="kubeconfig context (LAUNCHER_CONTEXT)."),
    kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", help="kubeconfig path (LAUNCHER_KUBECONFIG)."),
) -> None:
    ctx.obj = {"namespace": namespace, "context": context, "kubeconfig": kubeconfig}


# ------------------------------------------------------------------------------ plumbing

def _overrides(ctx: typer.Context) -> dict[str, Any]:
    root = ctx.find_root()
    return dict(root.obj or {})


def _offline_settings(ctx: typer.Context):
    from launcher.settings import make_settings
    return make_settings(**_overrides(ctx))


def _connect_to_run(ctx: typer.Context, run: str, *, wait: bool, timeout: float | None):
    """(settings, kube, the run's Job). With ``wait`` (``wait``, ``logs -f``) an API server that is
    down or restarting at start is waited out, within ``timeout``, as it is later on."""
    from launcher.kube import with_retries

    def attempt():
        settings, kube = _connect(ctx)
        return settings, kube, resolve_job(kube, run)

    if not wait:
        return attempt()
    notified = [False]

    def retrying(msg: str) -> None:
        if not notified[0]:
            _err(f"… {msg}; retrying")
            notified[0] = True

    deadline = time.monotonic() + timeout if timeout else None
    return with_retries(attempt, deadline=deadline, on_retry=retrying)


def _connect(ctx: typer.Context):
    """(settings including the namespace's ConfigMap, kube)."""
    from launcher.kube import Kube
    from launcher.settings import load_settings

    base = _offline_settings(ctx)
    kube = Kube.from_settings(base)
    settings = load_settings(kube, **_overrides(ctx))
    kube.namespace = settings.namespace
    return settings, kube


def _read_spec(path: Path, overrides: list[str]):
    """Load and validate a spec file, applying ``--set`` overrides; every problem at once."""
    from jobs import spec as specmod

    return specmod.load_spec(path, overrides=overrides)


def _warn_advice(s) -> None:
    """Values outside the guide's ranges are allowed: say so, with the range and why, on stderr."""
    for p in s.advice():
        typer.echo(f"warning: {p.render()}", err=True)


def _emit(data: Any, fmt: Format, table: Callable[[], None]) -> None:
    if fmt == Format.json:
        typer.echo(json.dumps(data, indent=2, default=str))
    elif fmt == Format.yaml:
        import yaml
        typer.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)
    else:
        table()


def _esc(text: Any) -> str:
    from rich.markup import escape
    return escape(str(text))


def _console():
    from rich.console import Console
    return Console(highlight=False, soft_wrap=True)


FORMAT_OPTION = typer.Option(Format.table, "--format", "-o", help="Output: table, json or yaml.")


# ------------------------------------------------------------------------------ runs on the cluster

def resolve_job(kube, run: str) -> dict:
    """RUN is a run name (its newest Job) or a Job name."""
    from launcher.render import LABEL_RUN

    jobs = kube.list_jobs(f"{LABEL_RUN}={run}") if _is_label_value(run) else []
    if jobs:
        return max(jobs, key=lambda j: (j["metadata"].get("creationTimestamp") or "", j["metadata"]["name"]))
    job = kube.get_job(run)
    if job is not None:
        return job
    raise UsageError(f"no run or Job named {run} in namespace {kube.namespace}",
                     hint="see `launcher list`, or pass -n NAMESPACE")


def _is_label_value(s: str) -> bool:
    import re
    return bool(re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?", s))


def snapshot(kube, job_name: str) -> tuple[dict | None, list[dict], list[dict]]:
    """(Job or None, its pods, Warning events of the Job and its pods)."""
    job = kube.get_job(job_name)
    if job is None:
        return None, [], []
    pods = kube.list_pods(f"{POD_JOB_LABEL}={job_name}")
    events = kube.list_events(f"involvedObject.name={job_name},type=Warning")
    for p in pods[-3:]:
        events += kube.list_events(f"involvedObject.name={p['metadata']['name']},type=Warning")
    return job, pods, events


def status_dict(job: dict, pods: list[dict], diag, namespace: str) -> dict[str, Any]:
    from launcher.diagnose import attempt_of
    from launcher.render import LABEL_HASH, LABEL_RUN

    meta, st = job.get("metadata") or {}, job.get("status") or {}
    labels = meta.get("labels") or {}
    pods = sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
    return {
        "run": labels.get(LABEL_RUN),
        "job": meta.get("name"),
        "namespace": meta.get("namespace", namespace),
        "spec_hash": labels.get(LABEL_HASH),
        "state": diag.state,
        "sentence": diag.sentence,
        "exit_code": diag.exit_code,
        "blocked": diag.blocked,
        "details": diag.details,
        "created": meta.get("creationTimestamp"),
        "started": st.get("startTime"),
        "completed": st.get("completionTime"),
        "attempts": {"active": st.get("active", 0), "succeeded": st.get("succeeded", 0),
                     "failed": st.get("failed", 0), "retries_allowed": (job.get("spec") or {}).get("backoffLimit")},
        "output": (meta.get("annotations") or {}).get("lora-jobs.io/output"),
        "pods": [attempt_of(p).to_dict() for p in pods],
    }


def wait_for(kube, job_name: str, *, timeout: float | None, interval: float = 2.0,
             on_change: Callable[[Any], None] = lambda d: None):
    """Poll until the run finishes; outlives API-server restarts (reconnects with backoff)."""
    from launcher.diagnose import diagnose
    from launcher.kube import with_retries

    deadline = time.monotonic() + timeout if timeout else None
    last = None
    notified = [False]

    def retrying(msg: str) -> None:
        if not notified[0]:
            _err(f"… {msg}; retrying")
            notified[0] = True

    while True:
        job, pods, events = with_retries(lambda: snapshot(kube, job_name), deadline=deadline, on_retry=retrying)
        notified[0] = False
        if job is None:
            raise RunFailed(f"job {job_name} no longer exists (cancelled, or deleted after its TTL)")
        diag = diagnose(job, pods, events)
        if diag.sentence != last:
            on_change(diag)
            last = diag.sentence
        if diag.finished:
            return diag
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout(f"job {job_name} is still {diag.state.lower()} after {timeout:g} s: {diag.sentence}",
                              hint="wait again with a longer --timeout")
        time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))


def _ts_key(ts: str) -> tuple[str, str]:
    """Order RFC 3339 timestamps with fractions of any length."""
    if "." in ts:
        head, frac = ts.split(".", 1)
        return head, frac.rstrip("Z").ljust(9, "0")
    return ts.rstrip("Z"), "0" * 9


def follow_logs(kube, job_name: str, *, follow: bool, echo: Callable[[str], None] = typer.echo,
                note: Callable[[str], None] = _err, tail: int | None = None, poll: float = 1.0):
    """Print the trainer's log, pod after pod (retries included).

    With ``follow``: wait for each pod to start, stream until the run ends, and reconnect (without repeating
    lines) when the API server goes away. A container whose current log cannot be read falls back to its
    previous instance. Returns the final Diagnosis, or None without ``follow``.
    """
    from launcher.diagnose import diagnose, trainer_status
    from launcher.kube import ClusterError, ClusterUnreachable, with_retries

    done: set[str] = set()  # pods whose log is printed to the end
    no_log: set[str] = set()  # pods whose log cannot be read: wait for them to end
    headed: set[str] = set()
    last_ts: dict[str, tuple] = {}
    errors: dict[str, int] = {}
    said = None
    printed = False

    def retrying(msg: str) -> None:
        note(f"… {msg}; retrying")

    while True:
        job, pods, _ = with_retries(lambda: snapshot(kube, job_name), on_retry=retrying)
        if job is None:
            raise RunFailed(f"job {job_name} no longer exists (cancelled, or deleted after its TTL)")
        pods = sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
        diag = diagnose(job, pods, [])
        for pod in pods:
            name = pod["metadata"]["name"]
            if name in done:
                continue
            cs = trainer_status(pod) or {}
            state = cs.get("state") or {}
            ended = "terminated" in state or pod["status"].get("phase") in ("Succeeded", "Failed")
            started = "running" in state or "terminated" in state or bool(cs.get("restartCount"))
            if not started or name in no_log:
                if ended or (not follow and name in no_log):
                    done.add(name)
                    continue
                if follow and diag.sentence != said:
                    note(f"… {diag.sentence}")
                    said = diag.sentence
                break
            if name not in headed and (headed or len(pods) > 1):
                note(f"--- pod {name} ---")
            headed.add(name)
            previous = errors.get(name, 0) > 0 and bool(cs.get("restartCount"))
            try:
                for line in kube.pod_log(name, follow=follow and not ended, previous=previous, timestamps=True,
                                         tail_lines=tail if name not in last_ts else None):
                    ts, _, text = line.partition(" ")
                    key = _ts_key(ts)
                    if name in last_ts and key <= last_ts[name]:
                        continue  # printed before a reconnect
                    last_ts[name] = key
                    echo(text)
                    printed = True
                errors.pop(name, None)
            except ClusterUnreachable as err:
                if not follow:
                    raise
                retrying(err.message)
                time.sleep(2)
                break
            except ClusterError as err:
                errors[name] = errors.get(name, 0) + 1
                if errors[name] >= 3 or not follow:
                    note(f"(the log of pod {name} cannot be read: {err.message})")
                    (done if ended or not follow else no_log).add(name)
                    continue
                time.sleep(min(10.0, 0.5 * 2 ** errors[name]))
                break
            if ended or not follow:
                done.add(name)
                continue
            break  # the stream ended while the pod lived (API server restart, read timeout): look again
        if not follow:
            if not printed:
                note(f"no log yet: {diag.sentence}")
            return None
        if diag.finished and all(p["metadata"]["name"] in done for p in pods):
            return diag
        time.sleep(poll)


def _finish(diag) -> None:
    """Exit by a finished run's outcome (its sentence is already printed)."""
    if diag.state != "Succeeded":
        raise typer.Exit(EXIT_RUN_FAILED)


# ------------------------------------------------------------------------------ --local

def _resolve_local(spec, base: Path):
    """The spec with relative local paths made absolute against the spec file's folder."""
    from jobs.spec import parse_spec

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


def run_local(spec, spec_path: Path, workdir: Path | None) -> int:
    """Run the job here, in a subprocess, streaming its output; return its exit code."""
    import subprocess

    from launcher.render import job_name, spec_yaml

    spec = _resolve_local(spec, spec_path.resolve().parent)
    name = job_name(spec)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    workdir = (workdir or cache / "lora-jobs" / "runs" / name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec_file = workdir / "spec.yaml"
    spec_file.write_text(spec_yaml(spec), encoding="utf-8")
    cmd = [sys.executable, "-m", "jobs", "run", "--spec", str(spec_file), "--workdir", str(workdir)]
    env = dict(os.environ)
    env.setdefault("LORA_JOBS_RUN_ID", name)
    env.setdefault("PYTHONUNBUFFERED", "1")
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    _err(f"running {name} locally in {workdir}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1, text=True,
                            errors="replace")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            typer.echo(line, nl=False)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


# ------------------------------------------------------------------------------ verbs

@app.command(epilog="Example:  launcher validate spec.yaml --set training.epochs=2   |   launcher validate --explain")
@_handles_errors
def validate(
    spec: Optional[Path] = typer.Argument(None, help="The spec file (YAML)."),
    explain: bool = typer.Option(False, "--explain", help="Print every field with its default and meaning."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: key.path=value (repeatable)."),
) -> None:
    """Check a spec offline and report every problem at once."""
    if explain:
        from jobs.spec import field_docs
        from rich.table import Table

        table = Table("field", "default", "meaning", show_lines=False)
        for path, default, desc in field_docs():
            table.add_row(_esc(path), _esc(default), _esc(desc))
        _console().print(table)
        if spec is None:
            return
    if spec is None:
        raise UsageError("name a spec file", hint="launcher validate spec.yaml")
    from launcher.render import job_name

    s = _read_spec(spec, set_)
    typer.echo(f"ok: {spec} is valid — run {s.name}, job {job_name(s)}, spec hash {s.spec_hash()}")
    _warn_advice(s)


@app.command(epilog="Example:  launcher submit spec.yaml --wait   |   launcher submit spec.yaml --dry-run   |   "
                    "launcher submit spec.yaml --local")
@_handles_errors
def submit(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., help="The spec file (YAML)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the Job and ConfigMap; touch no cluster."),
    server_dry_run: bool = typer.Option(False, "--server-dry-run", help="Run the preflight checks and a "
                                                                        "server-side dry-run; create nothing."),
    local: bool = typer.Option(False, "--local", help="Run here, without a cluster (python -m jobs run)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the run to finish; exit by its outcome."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream the logs until the run finishes."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: key.path=value (repeatable)."),
    skip_preflight: bool = typer.Option(False, "--skip-preflight",
                                        help="Skip the namespace/Secret/node checks (they need read access)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Working folder of a --local run (default: "
                                                                   "~/.cache/lora-jobs/runs/<job name>)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="With --wait: give up after this many seconds."),
) -> None:
    """Validate a spec and submit it as a Job (the same spec twice is the same run)."""
    s = _read_spec(spec, set_)
    _warn_advice(s)
    if local:
        raise typer.Exit(run_local(s, spec, workdir))
    if dry_run:
        from launcher.render import render_run, to_yaml

        job, cm = render_run(s, _offline_settings(ctx))
        typer.echo(to_yaml(job, cm), nl=False)
        return
    from launcher.submit import submit as do_submit

    settings, kube = _connect(ctx)
    result = do_submit(kube, s, settings, server_dry_run=server_dry_run, skip_preflight=skip_preflight)
    for w in result.warnings:
        _err(f"warning: {w}")
    typer.echo(result.message)
    if server_dry_run:
        return
    if follow:
        diag = follow_logs(kube, result.job_name, follow=True)
        typer.echo(f"{result.job_name}: {diag.sentence}")
        _finish(diag)
    elif wait:
        diag = wait_for(kube, result.job_name, timeout=timeout,
                        on_change=lambda d: _err(f"{result.job_name}: {d.sentence}"))
        typer.echo(f"{result.job_name}: {diag.sentence}")
        _finish(diag)
    else:
        _err(f"follow it: launcher logs {s.name} -f   |   launcher status {s.name}")


@app.command(epilog="Example:  launcher status my-run   |   launcher status my-run -o json")
@_handles_errors
def status(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
           fmt: Format = FORMAT_OPTION) -> None:
    """Where a run is, in one sentence, and why."""
    from launcher.diagnose import diagnose

    settings, kube = _connect(ctx)
    job = resolve_job(kube, run)
    job, pods, events = snapshot(kube, job["metadata"]["name"])
    if job is None:
        raise UsageError(f"run {run} disappeared while we looked", hint="see `launcher list`")
    diag = diagnose(job, pods, events, gpu_resource=settings.gpu_resource)
    data = status_dict(job, pods, diag, kube.namespace)

    def table() -> None:
        c = _console()
        c.print(f"[bold]{_esc(data['job'])}[/] (run {_esc(data['run'])}, namespace {_esc(data['namespace'])})")
        c.print(f"  state:  [bold]{data['state']}[/] — {_esc(data['sentence'])}")
        if data["exit_code"] is not None:
            c.print(f"  exit code: {data['exit_code']}")
        for d in data["details"]:
            c.print(f"  · {d}", markup=False)
        if data["pods"]:
            from rich.table import Table

            t = Table("pod", "phase", "node", "exit", "reason")
            for p in data["pods"]:
                t.add_row(p["pod"], p["phase"], p["node"] or "", "" if p["exit_code"] is None else str(p["exit_code"]),
                          _esc(p["reason"] or ""))
            c.print(t)

    _emit(data, fmt, table)
    if diag.state == "Failed":
        raise typer.Exit(EXIT_RUN_FAILED)


@app.command(epilog="Example:  launcher logs my-run -f")
@_handles_errors
def logs(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Wait for the pod, stream across retries."),
         tail: Optional[int] = typer.Option(None, "--tail", help="Only the last N lines of each pod.")) -> None:
    """Print (or follow) the trainer's log."""
    _, kube, job = _connect_to_run(ctx, run, wait=follow, timeout=None)
    diag = follow_logs(kube, job["metadata"]["name"], follow=follow, tail=tail)
    if diag is not None:
        _err(f"{job['metadata']['name']}: {diag.sentence}")
        _finish(diag)


@app.command("list", epilog="Example:  launcher list   |   launcher list -o json")
@_handles_errors
def list_runs(ctx: typer.Context, fmt: Format = FORMAT_OPTION) -> None:
    """The runs in the namespace, newest first."""
    from launcher.diagnose import diagnose
    from launcher.render import LABEL_RUN

    settings, kube = _connect(ctx)
    jobs = kube.list_jobs(LABEL_APP_SELECTOR)
    pods = kube.list_pods(LABEL_APP_SELECTOR)
    by_job: dict[str, list[dict]] = {}
    for p in pods:
        by_job.setdefault((p["metadata"].get("labels") or {}).get(POD_JOB_LABEL, ""), []).append(p)
    rows = []
    for j in sorted(jobs, key=lambda j: j["metadata"].get("creationTimestamp") or "", reverse=True):
        name = j["metadata"]["name"]
        d = diagnose(j, by_job.get(name, []), [], gpu_resource=settings.gpu_resource)
        rows.append({"run": (j["metadata"].get("labels") or {}).get(LABEL_RUN), "job": name, "state": d.state,
                     "sentence": d.sentence, "created": j["metadata"].get("creationTimestamp")})

    def table() -> None:
        from rich.table import Table

        if not rows:
            _console().print(f"no runs in namespace {kube.namespace}", markup=False)
            return
        t = Table("run", "job", "state", "created", "why")
        for r in rows:
            t.add_row(r["run"] or "", r["job"], r["state"], r["created"] or "", _esc(r["sentence"]))
        _console().print(t)

    _emit(rows, fmt, table)


@app.command(epilog="Example:  launcher cancel my-run")
@_handles_errors
def cancel(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
           wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the Job and its pods are gone."),
           timeout: float = typer.Option(120, "--timeout", help="Seconds to wait for the deletion.")) -> None:
    """Stop a run: delete its Job, its pods and its spec ConfigMap."""
    _, kube = _connect(ctx)
    job = resolve_job(kube, run)
    name = job["metadata"]["name"]
    kube.delete_job(name, propagation="Foreground")
    kube.delete_configmap(name)
    if wait:
        deadline = time.monotonic() + timeout
        while True:
            gone = kube.get_job(name) is None and not kube.list_pods(f"{POD_JOB_LABEL}={name}")
            if gone:
                break
            if time.monotonic() > deadline:
                raise WaitTimeout(f"job {name} is still being deleted after {timeout:g} s",
                                  hint=f"check its pods: kubectl get pods -l {POD_JOB_LABEL}={name}")
            time.sleep(1)
    typer.echo(f"cancelled: job {name}" + (" (job and pods deleted)" if wait else " (deleting)"))


@app.command(epilog="Example:  launcher wait my-run --timeout 3600")
@_handles_errors
def wait(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
         timeout: Optional[float] = typer.Option(None, "--timeout", help="Give up (exit 4) after this many seconds."),
         interval: float = typer.Option(2.0, "--interval", help="Seconds between checks.")) -> None:
    """Wait for a run to finish; exit 0 if it succeeded, 1 if it failed, 4 on timeout."""
    started = time.monotonic()
    _, kube, job = _connect_to_run(ctx, run, wait=True, timeout=timeout)
    if timeout is not None:
        timeout = max(1.0, timeout - (time.monotonic() - started))
    name = job["metadata"]["name"]
    diag = wait_for(kube, name, timeout=timeout, interval=interval, on_change=lambda d: _err(f"{name}: {d.sentence}"))
    typer.echo(f"{name}: {diag.sentence}")
    _finish(diag)


@app.command(epilog="Example:  launcher artifacts my-run   |   launcher artifacts my-run --download ./out   |   "
                    "launcher artifacts my-run --output s3://bucket/runs")
@_handles_errors
def artifacts(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
              version: Optional[str] = typer.Option(None, "--version", help="A version (v3); default: latest."),
              download: Optional[Path] = typer.Option(None, "--download", help="Download the version here."),
              output: Optional[str] = typer.Option(None, "--output", help="The spec's output prefix; needed "
                                                                          "once the Job is gone."),
              fmt: Format = FORMAT_OPTION) -> None:
    """List a run's published versions, or download one (verified against its manifest)."""
    from launcher import artifacts as art

    run_name, output = _run_output(ctx, run, output)
    if download is not None:
        v, folder = art.download_version(output, run_name, version, download)
        typer.echo(f"downloaded {run_name} {v} to {folder} (all files match the manifest)")
        return
    listing = art.list_versions(output, run_name)

    def table() -> None:
        c = _console()
        if not listing.versions:
            c.print(f"no complete versions under {listing.prefix}", markup=False)
        else:
            from rich.table import Table

            t = Table("version", "files", "bytes", "uri")
            for v in listing.versions:
                mark = " (latest)" if v.name == listing.latest else ""
                t.add_row(v.name + mark, str(v.files), f"{v.bytes:,}", _esc(v.uri))
            c.print(t)
        for name in listing.incomplete:
            c.print(f"{name}: incomplete (no _COMPLETE marker; publishing or abandoned) — not a version", markup=False)

    _emit(listing.to_dict(), fmt, table)


def _run_output(ctx: typer.Context, run: str, output: str | None) -> tuple[str, str]:
    """(run name, output prefix) from --output, else from the run's Job; points S3 at the settings' endpoint."""
    settings = _offline_settings(ctx)
    run_name = run
    if output is None:
        from launcher.render import ANNOTATION_OUTPUT, LABEL_RUN

        settings, kube = _connect(ctx)
        job = resolve_job(kube, run)
        meta = job["metadata"]
        run_name = (meta.get("labels") or {}).get(LABEL_RUN, run)
        prefix = (meta.get("annotations") or {}).get(ANNOTATION_OUTPUT)
        if not prefix:
            raise UsageError(f"job {meta['name']} does not say where its output goes", hint="pass --output PREFIX")
        output = prefix.rsplit("/", 1)[0]
    if settings.s3_endpoint and not os.environ.get("AWS_ENDPOINT_URL"):
        os.environ["AWS_ENDPOINT_URL"] = settings.s3_endpoint
    return run_name, output


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> float:
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not m:
        raise UsageError(f"--older-than {text!r} is not a duration", hint="use e.g. 90m, 24h or 7d")
    return float(m.group(1)) * _DURATION[m.group(2)]


@app.command(epilog="Example:  launcher prune my-run   |   launcher prune my-run --older-than 7d --yes")
@_handles_errors
def prune(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
          older_than: str = typer.Option("24h", "--older-than", help="Only folders untouched for this long "
                                                                     "(a publish in progress is younger)."),
          yes: bool = typer.Option(False, "--yes", help="Delete them; without it, only list what would go."),
          output: Optional[str] = typer.Option(None, "--output", help="The spec's output prefix; needed once the "
                                                                      "Job is gone."),
          fmt: Format = FORMAT_OPTION) -> None:
    """Remove incomplete version folders (publishes that died half-way); never a complete version."""
    from launcher import artifacts as art

    run_name, output = _run_output(ctx, run, output)
    orphans = art.prune_incomplete(output, run_name, older_than_seconds=_seconds(older_than), apply=yes)

    def table() -> None:
        if not orphans:
            typer.echo(f"nothing to prune: no incomplete version of {run_name} is older than {older_than}")
        for o in orphans:
            verb = "removed" if o.removed else "would remove"
            typer.echo(f"{verb} {run_name}/{o.name}: {o.objects} objects, {o.bytes:,} bytes, untouched for "
                       f"{o.age_seconds / 3600:.1f} h")
        if orphans and not yes:
            typer.echo("dry run: nothing was deleted; add --yes to delete")

    _emit({"run": run_name, "applied": yes, "orphans": [o.__dict__ for o in orphans]}, fmt, table)


@data_app.command("check", epilog="Example:  launcher data check train.jsonl   |   launcher data check train.jsonl "
                                  "--json   |   launcher data check train.jsonl --spec spec.yaml")
@_handles_errors
def data_check(file: Path = typer.Argument(..., help="A JSONL file of {instruction, output} rows."),
               as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
               spec: Optional[Path] = typer.Option(None, "--spec", help="Apply this spec's data rules and seed "
                                                                        "(default: the guide's rules).")) -> None:
    """Apply the data rules to a local file and report what a run would keep; exit 1 if it would be rejected."""
    from jobs import dataprep

    if spec is not None:
        s = _read_spec(spec, [])
        report = dataprep.check_file(file, s.data, seed=s.training.seed)
    else:
        report = dataprep.check_file(file)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        typer.echo(dataprep.format_report(report))
    if not report.get("ok", True):
        raise typer.Exit(EXIT_RUN_FAILED)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: errors a user caused print without a traceback (LAUNCHER_DEBUG=1 shows it)."""
    try:
        app(args=argv, prog_name="launcher")
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    except LoraJobError as err:
        if _debug():
            raise
        return _report(err)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
