"""``launcher``: validate, submit, follow and diagnose LoRA training Jobs.

Exit codes (every verb):

  0  ok (for submit --wait / wait: the run succeeded)
  1  the run failed (or `data check` found the data unusable)
  2  usage error or invalid spec / settings
  3  the cluster or object storage is unreachable or refused, or a preflight check failed
  4  timed out (wait --timeout)

``submit --local`` exits with the job's own exit code (docs/architecture.md).
Presentation only: flags become calls to :class:`launcher.client.Client`, its results
become tables, JSON or YAML, and its errors (:mod:`launcher.errors`) one message. Heavy imports (kubernetes, boto3, torch) happen inside the verbs that need them,
so ``launcher --help`` stays instant.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typer.core import TyperGroup

from jobs.formatting import duration, size
from launcher.errors import EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, LoraJobError, UsageError, exit_code_for


class Backend(str, Enum):
    kubernetes = "kubernetes"
    local = "local"


class Format(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


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
    # click's own help layout: typer's rich panels (0.29) print every option's type, so each flag showed a
    # stray `<bool>` (fastapi/typer#493, PR #1727); plain help prints flags as flags. Back to rich once a
    # typer release leaves flags untyped there.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Check training data before you submit.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        from jobs import __version__
        from launcher.settings import LauncherSettings

        image = LauncherSettings.model_fields["image"].default
        typer.echo(f"launcher {__version__} (trainer image by default: {image}; LAUNCHER_IMAGE sets another)")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and the trainer image it runs by default, and exit."),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", metavar="NAMESPACE",
                                             help="Namespace (LAUNCHER_NAMESPACE)."),
    context: Optional[str] = typer.Option(None, "--context", metavar="CONTEXT",
                                           help="kubeconfig context (LAUNCHER_CONTEXT)."),
    kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", metavar="PATH",
                                              help="kubeconfig path (LAUNCHER_KUBECONFIG)."),
    backend: Optional[Backend] = typer.Option(None, "--backend", help="Where runs run: kubernetes (default) or "
                                                                     "local, this machine (LAUNCHER_BACKEND)."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", metavar="PATH",
                                             help="Folder of the local runs' state (LAUNCHER_LOCAL_STATE_DIR; "
                                                  "default ~/.local/state/lora-jobs/runs)."),
) -> None:
    ctx.obj = {"namespace": namespace, "context": context, "kubeconfig": kubeconfig,
               "backend": backend.value if backend else None, "state_dir": state_dir}


# ------------------------------------------------------------------------------ plumbing

def _client(ctx: typer.Context, backend: Optional[str] = None):
    """The SDK client for the global flags (``backend`` wins over --backend); its notes (retries, waiting) go to
    stderr."""
    from launcher.client import Client

    root = ctx.find_root().obj or {}
    return Client(root.get("namespace"), context=root.get("context"), kubeconfig=root.get("kubeconfig"), notes=_err,
                  backend=backend or root.get("backend"), state_dir=root.get("state_dir"))


def _warn_advice(advice) -> None:
    """Values outside the guide's ranges are allowed: say so, with the range and why, on stderr."""
    for p in advice:
        typer.echo(f"warning: {p.render()}", err=True)


def _finish(status) -> None:
    """Exit by a finished run's outcome (its sentence is already printed)."""
    if not status.succeeded:
        raise typer.Exit(EXIT_RUN_FAILED)


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


def _console(stderr: bool = False):
    from rich.console import Console
    return Console(highlight=False, soft_wrap=True, stderr=stderr)


FORMAT_OPTION = typer.Option(Format.table, "--format", "-o", help="Output: table, json or yaml.")
# a metavar that says what to write (typer's own is the Python type, `<list[str]>`)
SET_OPTION = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a field: key.path=value (repeatable).")


# ------------------------------------------------------------------------------ verbs

@app.command(epilog="Example:  launcher init   |   launcher init runs/support.yaml --name support-bot   |   "
                    "launcher init spec.yaml --force")
@_handles_errors
def init(
    path: Path = typer.Argument(Path("spec.yaml"), help="Where to write it (a folder: spec.yaml in it)."),
    name: Optional[str] = typer.Option(None, "--name", help="The run's name (default: my-run)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the file if it exists."),
) -> None:
    """Write a starter spec: every field with its default and what it does, commented; it validates as is."""
    from launcher.init_spec import starter_spec

    if path.is_dir():
        path = path / "spec.yaml"
    if path.exists() and not force:
        raise UsageError(f"{path} exists; left as it is", hint=f"name another file, or overwrite it: launcher init "
                                                               f"{path} --force")
    text = starter_spec(name, file_name=str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror}", hint="choose a folder you can write to") from None
    typer.echo(f"wrote {path}: replace its placeholders, then `launcher validate {path}`")


@app.command(epilog="Example:  launcher validate spec.yaml --set training.epochs=2   |   launcher validate --explain")
@_handles_errors
def validate(
    spec: Optional[Path] = typer.Argument(None, help="The spec file (YAML)."),
    explain: bool = typer.Option(False, "--explain", help="Print every field with its default and meaning."),
    set_: list[str] = SET_OPTION,
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
    from launcher.client import Client

    v = Client().validate(spec, set_)
    typer.echo(f"ok: {spec} is valid — run {v.spec.name}, job {v.job_name}, spec hash {v.spec_hash}")
    _warn_advice(v.advice)


@app.command(epilog="Example:  launcher submit spec.yaml --wait   |   launcher submit spec.yaml --dry-run   |   "
                    "launcher submit spec.yaml --local")
@_handles_errors
def submit(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., help="The spec file (YAML)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every object the run creates (as `launcher "
                                                          "render`); touch no cluster."),
    server_dry_run: bool = typer.Option(False, "--server-dry-run", help="Run the preflight checks and a "
                                                                        "server-side dry-run; create nothing."),
    local: bool = typer.Option(False, "--local", help="Run here, without a cluster (python -m jobs run), and follow it "
                                                      "to its end: the same as --backend local."),
    detach: bool = typer.Option(False, "--detach", "-d", help="A local run: start it and return (follow it with "
                                                              "`launcher --backend local logs RUN -f`)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the run to finish; exit by its outcome."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream the logs until the run finishes."),
    set_: list[str] = SET_OPTION,
    skip_preflight: bool = typer.Option(False, "--skip-preflight",
                                        help="Skip the namespace/Secret/node checks (they need read access)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Working folder of a local run (default: "
                                                                   "~/.cache/lora-jobs/runs/<job name>, removed "
                                                                   "when it ends)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="With --wait: give up after this many seconds."),
    fmt: Format = typer.Option(Format.table, "--format", "-o", help="How to print what was submitted: table (one "
                                                                     "line), json or yaml."),
) -> None:
    """Validate a spec and submit it as a Job (the same spec twice is the same run), or run it here (--local)."""
    if wait:  # checked before the run is created, not after (Client.wait checks it too)
        from launcher.client import check_seconds

        check_seconds("timeout", timeout, "--timeout")
    client = _client(ctx, "local" if local else None)
    here = client.backend.name == "local"
    if here and dry_run:
        raise UsageError("--dry-run prints the objects a cluster run creates; a local run creates none",
                         hint="leave out --dry-run to run it here, or --local (--backend local) to render it")
    # a pod cannot read a local path: for the cluster (dry run included) that is an error, for a local run a
    # missing input is
    v = client.validate(spec, set_, target="local" if here else "cluster")
    _warn_advice(v.advice)
    if here and not detach:  # followed to its end: the job's own exit code
        raise typer.Exit(client.run_local(v.spec, workdir=workdir, base_dir=spec.resolve().parent,
                                          on_output=lambda line: typer.echo(line, nl=False)))
    if dry_run:
        _print_run(client, v.spec, ManifestFormat.yaml)
        return
    result = client.submit(v.spec, server_dry_run=server_dry_run, skip_preflight=skip_preflight, workdir=workdir,
                           base_dir=spec.resolve().parent)
    for w in result.warnings:
        _err(f"warning: {w}")
    _emit(result.to_dict(), fmt, lambda: typer.echo(result.message))
    if server_dry_run:
        return
    # with -o json/yaml stdout holds one document: what follows it goes to stderr
    say = typer.echo if fmt == Format.table else _err
    if follow:
        stream = client.logs(result.job_name, follow=True)
        for line in stream:
            say(line)
        say(f"{result.job_name}: {stream.outcome.sentence}")
        _finish(stream.outcome)
    elif wait:
        final = client.wait(result.job_name, timeout=timeout,
                            on_change=lambda st: _err(f"{result.job_name}: {st.sentence}"))
        say(f"{result.job_name}: {final.sentence}")
        _finish(final)
    else:
        cmd = "launcher" + (" --backend local" if here and client.offline_settings.backend != "local" else "")
        _err(f"follow it: {cmd} logs {v.spec.name} -f   |   {cmd} status {v.spec.name}   |   {cmd} cancel "
             f"{v.spec.name}")


class ManifestFormat(str, Enum):
    yaml = "yaml"
    json = "json"


class MultinodeWorkload(str, Enum):
    indexed_job = "indexed-job"
    jobset = "jobset"


def _print_run(client, spec, fmt: ManifestFormat, *, queue: Optional[str] = None,
               multinode_workload: Optional[str] = None) -> None:
    """Print every object the run creates, from render_run (what submit creates); nothing asks a cluster."""
    from launcher.render import to_json, to_yaml

    run = client.render(spec, queue=queue, multinode_workload=multinode_workload)
    if spec.resources.nodes > 1 and (multinode_workload or client.offline_settings.multinode_workload) == "auto":
        _err("note: multinode_workload is auto and rendering asks no cluster: shown as an Indexed Job; on a cluster "
             "that serves JobSets, submit makes a JobSet (`launcher render --multinode-workload jobset` shows it)")
    typer.echo(to_json(*run.objects) if fmt == ManifestFormat.json else to_yaml(*run.objects), nl=False)


@app.command(help="Print every object a run creates (Job or JobSet, headless Service, ConfigMap), offline.\n\n"
                  "For Argo CD, Flux and other GitOps tools: commit the output, or pipe it to `kubectl apply -f -`. "
                  "It is the renderer `submit` uses, with the settings from LAUNCHER_* variables and your config "
                  "file; it contacts no cluster, so it does not read the namespace's lora-jobs-launcher ConfigMap "
                  "(set what differs with LAUNCHER_*, -n, --queue, --multinode-workload) and runs no preflight "
                  "checks (`submit --server-dry-run` does). The same spec always prints the same objects.",
             epilog="Example:  launcher render spec.yaml | kubectl apply -f -   |   launcher render spec.yaml -o json "
                    "--queue team-a > run.json")
@_handles_errors
def render(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., help="The spec file (YAML)."),
    fmt: ManifestFormat = typer.Option(ManifestFormat.yaml, "--output", "-o",
                                       help="yaml (one document per object) or json (a v1 List)."),
    set_: list[str] = SET_OPTION,
    queue: Optional[str] = typer.Option(None, "--queue", metavar="QUEUE", help="Kueue LocalQueue: the run is labelled for it and "
                                                             "created suspended (default: LAUNCHER_QUEUE)."),
    multinode_workload: Optional[MultinodeWorkload] = typer.Option(
        None, "--multinode-workload", help="What a run of several nodes becomes: indexed-job (with a headless "
                                           "Service) or jobset, if your cluster serves JobSets (default: "
                                           "LAUNCHER_MULTINODE_WORKLOAD)."),
) -> None:
    """`launcher render` (its help is above: the docstring's line breaks would show in typer's panels)."""
    client = _client(ctx)
    v = client.validate(spec, set_, target="cluster")  # what it prints runs in a pod
    _warn_advice(v.advice)
    _print_run(client, v.spec, fmt, queue=queue,
               multinode_workload=multinode_workload.value if multinode_workload else None)


@app.command(epilog="Example:  launcher status my-run   |   launcher status my-run -o json")
@_handles_errors
def status(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
           fmt: Format = FORMAT_OPTION) -> None:
    """Where a run is, in one sentence, and why."""
    client = _client(ctx)
    st = client.status(run)
    data = st.to_dict()

    def table() -> None:
        c = _console()
        where = "local run" if data["kind"] == "local" else f"namespace {_esc(data['namespace'])}"
        c.print(f"[bold]{_esc(data['job'])}[/] (run {_esc(data['run'])}, {where})")
        c.print(f"  state:  [bold]{data['state']}[/] — {_esc(data['sentence'])}")
        if data.get("progress"):
            c.print(f"  progress: {data['progress']['summary']}", markup=False)
            if data["progress"].get("data"):
                from jobs.progress import describe_data

                c.print(f"  data:   {describe_data(data['progress']['data'])}", markup=False)
        if (data.get("cost") or {}).get("summary"):
            c.print(f"  cost: {data['cost']['summary']}", markup=False)
        if (data.get("cost") or {}).get("stages"):
            from jobs.cost import describe_stages

            c.print(f"  stages: {describe_stages(data['cost']['stages'])}", markup=False)
        if (data.get("progress") or {}).get("promotion"):  # what promotion.auto did, after the eval page
            c.print(f"  promotion: {data['progress']['promotion']['sentence']}", markup=False)
        if st.succeeded and data.get("progress") and data.get("output"):  # its storage answered just now
            champ = _champion_or_none(client, data["run"], data["output"])
            if champ:
                c.print(f"  champion: {_champion_line(champ)}", markup=False)
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
    if st.state == "Failed":
        raise typer.Exit(EXIT_RUN_FAILED)


@app.command(epilog="Example:  launcher logs my-run -f")
@_handles_errors
def logs(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Wait for the pod, stream across retries."),
         tail: Optional[int] = typer.Option(None, "--tail", help="Only the last N lines of each pod."),
         rank: Optional[int] = typer.Option(None, "--rank", help="A multi-node run's node rank (default 0, the "
                                                                  "one that publishes).")) -> None:
    """Print (or follow) the trainer's log."""
    stream = _client(ctx).logs(run, follow=follow, tail=tail, rank=rank)
    for line in stream:
        typer.echo(line)
    if stream.outcome is not None:
        _err(f"{stream.outcome.job}: {stream.outcome.sentence}")
        _finish(stream.outcome)


@app.command("list", epilog="Example:  launcher list   |   launcher list -o json")
@_handles_errors
def list_runs(ctx: typer.Context, fmt: Format = FORMAT_OPTION) -> None:
    """The runs (in the namespace, or local ones with --backend local), newest first."""
    client = _client(ctx)
    rows = [r.to_dict() for r in client.list()]

    def table() -> None:
        from rich.table import Table

        if not rows:
            _console().print(f"no runs in {client.backend.where}", markup=False)
            return
        t = Table("run", "job", "state", "created", "why / progress", "cost")
        for r in rows:
            t.add_row(r["run"] or "", r["job"], r["state"], r["created"] or "", _esc(r["progress"] or r["sentence"]),
                      _esc(r.get("cost") or ""))
        _console().print(t)

    _emit(rows, fmt, table)


@app.command(epilog="Example:  launcher cancel my-run")
@_handles_errors
def cancel(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
           wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the Job and its pods are gone (a "
                                                                    "local run: until its process ended)."),
           timeout: float = typer.Option(120, "--timeout", help="Seconds to wait for the deletion.")) -> None:
    """Stop a run: delete its Job, its pods and its spec ConfigMap; a local run: SIGTERM to its processes (it
    saves a checkpoint and exits 75)."""
    typer.echo(_client(ctx).cancel(run, wait=wait, timeout=timeout).message)


@app.command(epilog="Example:  launcher wait my-run --timeout 3600")
@_handles_errors
def wait(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
         timeout: Optional[float] = typer.Option(None, "--timeout", help="Give up (exit 4) after this many seconds "
                                                 "(default: as long as the run takes; an API server that does not "
                                                 "answer for LAUNCHER_CLUSTER_TIMEOUT, 2 min, is exit 3)."),
         interval: float = typer.Option(2.0, "--interval", help="Seconds between checks.")) -> None:
    """Wait for a run to finish; exit 0 if it succeeded, 1 if it failed, 4 on timeout."""
    final = _client(ctx).wait(run, timeout=timeout, interval=interval,
                              on_change=lambda st: _err(f"{st.job}: {st.sentence}"))
    typer.echo(f"{final.job}: {final.sentence}")
    _finish(final)


# ------------------------------------------------------------------------------ artifacts

class _ListByDefault(TyperGroup):
    """``launcher artifacts RUN …`` means ``launcher artifacts list RUN …`` (the form before subcommands)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["list", *args]
        return super().parse_args(ctx, args)


artifacts_app = typer.Typer(
    cls=_ListByDefault, no_args_is_help=True,
    help="A run's published versions: list or download them (the default), prune half-written ones.",
    epilog="Example:  launcher artifacts my-run   |   launcher artifacts my-run --download ./out   |   "
           "launcher artifacts prune my-run --yes")
app.add_typer(artifacts_app, name="artifacts")

OUTPUT_OPTION = typer.Option(None, "--output", help="The spec's output prefix; needed once the Job is gone.")


def _download_with_bar(client, run: str, dest: Path, version: Optional[str], output: Optional[str]):
    """The download, with a rich progress bar (bytes, MiB/s, ETA) when stderr is a terminal."""
    if not sys.stderr.isatty():
        return client.download(run, dest, version=version, output=output)
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn(f"downloading {run}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=_console(stderr=True), transient=True) as bar:
        task = bar.add_task("download", total=None)
        return client.download(run, dest, version=version, output=output,
                               on_progress=lambda done, total: bar.update(task, completed=done, total=total))


@artifacts_app.command("list", epilog="Example:  launcher artifacts my-run   |   launcher artifacts my-run --download "
                                      "./out   |   launcher artifacts my-run --output s3://bucket/runs")
@_handles_errors
def artifacts(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
              version: Optional[str] = typer.Option(None, "--version", help="A version (v3); default: latest."),
              download: Optional[Path] = typer.Option(None, "--download", help="Download the version here."),
              output: Optional[str] = OUTPUT_OPTION,
              fmt: Format = FORMAT_OPTION) -> None:
    """List a run's published versions, or download one (verified against its manifest)."""
    client = _client(ctx)
    if download is not None:
        typer.echo(_download_with_bar(client, run, download, version, output).message)
        return
    listing = client.artifacts(run, output=output)

    def table() -> None:
        c = _console()
        if not listing.versions:
            c.print(f"no complete versions under {listing.prefix}", markup=False)
        else:
            from rich.table import Table

            t = Table("version", "files", "size", "uri")
            for v in listing.versions:
                mark = "".join(f" ({what})" for what, name in (("latest", listing.latest),
                                                               ("champion", listing.champion)) if v.name == name)
                t.add_row(v.name + mark, str(v.files), size(v.bytes), _esc(v.uri))
            c.print(t)
            shown = next((v for v in listing.versions if v.name == listing.latest), listing.versions[-1])
            if shown.eval_page:
                c.print(f"eval page ({shown.name}): {shown.eval_page}", markup=False)
            if shown.serving:
                c.print(f"serving ({shown.name}): {shown.serving}", markup=False)
            if listing.champion:
                c.print(f"champion: {_champion_line({'version': listing.champion, **listing.champion_info})}",
                        markup=False)
        for name in listing.incomplete:
            c.print(f"{name}: incomplete (no _COMPLETE marker; publishing or abandoned) — not a version", markup=False)

    _emit(listing.to_dict(), fmt, table)


PRUNE_EPILOG = "Example:  launcher artifacts prune my-run   |   launcher artifacts prune my-run --older-than 7d --yes"


@artifacts_app.command("prune", epilog=PRUNE_EPILOG)
@_handles_errors
def prune(ctx: typer.Context, run: str = typer.Argument(..., help="Run name or Job name."),
          older_than: str = typer.Option("24h", "--older-than", help="Only folders untouched for this long "
                                                                     "(a publish in progress is younger)."),
          yes: bool = typer.Option(False, "--yes", help="Delete them; without it, only list what would go."),
          output: Optional[str] = OUTPUT_OPTION,
          fmt: Format = FORMAT_OPTION) -> None:
    """Remove half-written version folders (never a complete version); a dry run unless --yes."""
    from launcher.client import parse_duration

    seconds = parse_duration(older_than, "--older-than")
    report = _client(ctx).prune(run, older_than=seconds, apply=yes, output=output)

    def table() -> None:
        if not report.orphans:
            typer.echo(f"nothing to prune: no incomplete version of {report.run} is older than {older_than}")
        for o in report.orphans:
            verb = "removed" if o.removed else "would remove"
            typer.echo(f"{verb} {report.run}/{o.name}: {o.objects} objects, {size(o.bytes)}, untouched for "
                       f"{duration(o.age_seconds)}")
        if report.orphans and not yes:
            typer.echo("dry run: nothing was deleted; add --yes to delete")

    _emit(report.to_dict(), fmt, table)


# `launcher prune RUN` came first; it stays as a hidden alias of `launcher artifacts prune`.
app.command("prune", hidden=True, epilog=PRUNE_EPILOG)(prune)


# ------------------------------------------------------------------------------ promote (docs/promotion.md)

def _champion_line(p: dict) -> str:
    """'v3, promoted 2026-12-07T14:30:00Z by launcher promote (forced), replacing v2'."""
    return (f"{p['version']}, promoted {p.get('promoted_at')} by {p.get('by')}" + (" (forced)" if p.get("forced") else "")
            + (f", replacing {p['previous']}" if p.get("previous") else ""))


def _champion_or_none(client, run: str, run_uri: str) -> dict | None:
    try:
        return client.champion(run, output=run_uri.rsplit("/", 1)[0])
    except LoraJobError:
        return None


@app.command(epilog="Example:  launcher promote my-run:v4 --output s3://bucket/runs   |   launcher promote my-run "
                    "--spec spec.yaml   |   launcher promote my-run:v3 --force")
@_handles_errors
def promote(ctx: typer.Context,
            run: str = typer.Argument(..., metavar="RUN[:vN]", help="Run name or Job name, with :vN for a version "
                                                                   "(default: the newest complete one)."),
            force: bool = typer.Option(False, "--force", help="Promote even if the gate fails or cannot compare "
                                                              "(recorded as forced, with the reasons overridden)."),
            spec: Optional[Path] = typer.Option(None, "--spec", help="Gate settings (its promotion: section) and, "
                                                                     "for its own run, the output prefix."),
            output: Optional[str] = OUTPUT_OPTION,
            fmt: Format = FORMAT_OPTION) -> None:
    """Compare a version with the run's champion on the same held-out set (paired bootstrap intervals) and make it
    the champion if no metric is significantly worse and the primary one is not worse; exit 1 if the gate fails
    (the version stays published, unpromoted)."""
    from jobs.promotion import comparison_rows

    run_name, _, version = run.partition(":")
    result = _client(ctx).promote(run_name, version=version or None, output=output, spec=spec, force=force)

    def table() -> None:
        cmp = result.comparison
        if cmp is not None:
            pct = round(100 * cmp.confidence)
            typer.echo(f"{cmp.candidate} against the champion {cmp.champion} ({result.where}); difference = "
                       f"candidate − champion, {pct}% paired bootstrap interval ({cmp.resamples} resamples):")
            rows = comparison_rows(cmp.to_dict())
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for r in rows:
                typer.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
            typer.echo("verdict: pass" if cmp.passed else "verdict: fail")
            for reason in cmp.reasons:
                typer.echo(f"  - {reason}")
        elif result.reasons:
            typer.echo("gate: " + "; ".join(result.reasons))
        typer.echo(result.headline if cmp is not None else result.sentence)

    _emit(result.to_dict(), fmt, table)
    if not (result.promoted or result.already):
        raise typer.Exit(EXIT_RUN_FAILED)


# ------------------------------------------------------------------------------ serving

serving_app = typer.Typer(help="Serve a published version: the manifests of a KServe LLMInferenceService or a vLLM "
                               "Deployment.", no_args_is_help=True)
app.add_typer(serving_app, name="serving")


class Engine(str, Enum):
    kserve = "kserve"
    vllm = "vllm"


class ServeAs(str, Enum):
    lora = "lora"
    merged = "merged"


@serving_app.command("manifest", help="Print the manifests that serve a complete version (default: latest), "
                                      "offline: a KServe LLMInferenceService, or a vLLM Deployment and Service.\n\n"
                                      "The adapter is served as a LoRA on its base (with the smallest "
                                      "--max-lora-rank that serves its rank) where the version's serving verdict "
                                      "allows it, else the merged model; the choice is printed on stderr. S3 "
                                      "credentials appear only as references to the settings' Secret.",
                     epilog="Example:  launcher serving manifest my-run --output s3://bucket/runs | kubectl apply -f -"
                            "   |   launcher serving manifest my-run:v3 --engine vllm --gpus 2 -o json")
@_handles_errors
def serving_manifest(
    ctx: typer.Context,
    run: str = typer.Argument(..., metavar="RUN[:vN]", help="Run name or Job name, with :vN for a version."),
    engine: Engine = typer.Option(Engine.kserve, "--engine", help="kserve (an LLMInferenceService) or vllm (a "
                                                                  "Deployment and a Service)."),
    fmt: ManifestFormat = typer.Option(ManifestFormat.yaml, "--format", "-o",
                                       help="yaml (one document per object) or json (a v1 List)."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs of the serving pod (nvidia.com/gpu)."),
    serve_as: Optional[ServeAs] = typer.Option(None, "--serve-as", help="lora or merged (default: what the "
                                                                        "version's serving verdict allows)."),
    name: Optional[str] = typer.Option(None, "--name", help="Object name (default: RUN-vN)."),
    vllm_image: Optional[str] = typer.Option(None, "--vllm-image", metavar="IMAGE",
                                             help="The vLLM image of --engine vllm."),
    output: Optional[str] = OUTPUT_OPTION,
) -> None:
    """`launcher serving manifest` (its help is above)."""
    from launcher.render import to_json, to_yaml

    run_name, _, version = run.partition(":")
    result = _client(ctx).serving_manifests(run_name, version or None, engine=engine.value, gpus=gpus,
                                            serve_as=serve_as.value if serve_as else None, name=name,
                                            vllm_image=vllm_image, output=output)
    for line in result.notes:
        _err(f"note: {line}")
    typer.echo(to_json(*result.objects) if fmt == ManifestFormat.json else to_yaml(*result.objects), nl=False)


class Method(str, Enum):
    sft = "sft"
    dpo = "dpo"
    orpo = "orpo"


@data_app.command("check", epilog="Example:  launcher data check train.jsonl   |   launcher data check train.jsonl "
                                  "--json   |   launcher data check train.jsonl --spec spec.yaml   |   launcher "
                                  "data check pairs.jsonl --method dpo")
@_handles_errors
def data_check(file: Optional[Path] = typer.Argument(
                   None, help="A JSONL file, one JSON object per line, each row in one accepted format: "
                              "{instruction, input?, output}, chat {messages: [{role, content}]} or ShareGPT "
                              "{conversations: [{from, value}]}; a file may mix them. For dpo/orpo, preference "
                              "pairs {prompt, chosen, rejected} in TRL's formats (see --explain)."),
               as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
               spec: Optional[Path] = typer.Option(None, "--spec", help="Apply this spec's data rules, seed and "
                                                                        "training.method (default: the guide's "
                                                                        "rules)."),
               method: Optional[Method] = typer.Option(
                   None, "--method", help="Check the file as SFT rows (sft) or as preference pairs (dpo, orpo: the "
                                          "same data). Default: the spec's training.method with --spec, else pairs "
                                          "when the file's first row has 'chosen' or 'rejected', else rows."),
               explain: bool = typer.Option(False, "--explain", help="Print every accepted data format with an "
                                                                     "example, the limits and the rules.")) -> None:
    """Apply the data rules to a local file and report what a run would keep, by format and by reason; exit 1 if
    it would be rejected."""
    from jobs import dataprep, preference

    if explain:
        typer.echo(dataprep.explain_text())
        typer.echo("")
        typer.echo(preference.explain_text())
        if file is None:
            return
    if file is None:
        raise UsageError("name a JSONL file", hint="launcher data check train.jsonl (or --explain)")
    rules, seed = None, 42
    chosen_method = method.value if method else None
    if spec is not None:
        from launcher.client import Client

        s = Client().load_spec(spec)
        rules, seed = s.data, s.training.seed
        chosen_method = chosen_method or s.training.method
    data = dataprep.read_data_file(file)
    if chosen_method is None and preference.looks_like_pairs(data):
        chosen_method = "dpo"
        _err("note: read as preference pairs (the file's first row has 'chosen' or 'rejected'); --method sft "
             "checks it as SFT rows")
    if chosen_method in ("dpo", "orpo"):
        report = preference.check_pairs_file(file, rules, seed=seed, data=data)
    else:
        report = dataprep.check_file(file, rules, seed=seed, data=data)
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
