"""The launcher as a library: every verb of the CLI as a typed method of :class:`Client`.

    from launcher.client import Client

    client = Client(namespace="ml")
    run = client.submit("spec.yaml")
    status = client.wait(run.job_name, timeout=3600)
    print(status.state, status.sentence)
    print([v.name for v in client.artifacts(status.run).versions])

Results are plain dataclasses (``to_dict()`` gives what ``-o json`` prints); every failure
is a :class:`launcher.errors.LoraJobError` with a message and a fix. ``launcher.cli`` only
parses flags, calls these methods and prints. Heavy modules (kubernetes, boto3) are
imported by the methods that need them.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Union

from launcher.errors import RunFailed, UsageError, WaitTimeout

LABEL_APP_SELECTOR = "app.kubernetes.io/name=lora-jobs"
POD_JOB_LABEL = "batch.kubernetes.io/job-name"

#: What the spec arguments accept: a YAML file, the spec's fields as a dict, or a parsed spec.
SpecLike = Union[str, Path, dict, Any]

_log = logging.getLogger("launcher")


def tracking_advice(spec, settings) -> list:
    """A warning, not an error, when the spec asks for MLflow tracking but the settings name no tracking
    server: the run trains and publishes as usual, untracked. ``validate`` works offline, so the namespace's
    ConfigMap (the chart's ``settings.mlflowTrackingUri``) is not read: the warning says so."""
    from jobs.errors import Problem

    mlflow = spec.tracking.mlflow if spec.tracking is not None else None
    if mlflow is None or settings.mlflow_tracking_uri:
        return []
    from launcher.settings import config_file_path

    return [Problem("tracking.mlflow", "no MLflow tracking URI is configured in the launcher settings, so the run "
                    f"will not be tracked (its pod gets no {mlflow.uri_env})",
                    f"set LAUNCHER_MLFLOW_TRACKING_URI or mlflow_tracking_uri in {config_file_path()}; on a "
                    "cluster the chart's settings.mlflowTrackingUri sets it for the namespace (not read by "
                    "validate); a --local run uses the same setting, else $" + mlflow.uri_env + " from your environment")]


def local_tracking_env(spec, settings) -> dict[str, str]:
    """What a ``--local`` run gets of the tracking settings: the URI setting in the variable the spec
    names, as a pod gets it (a token only ever comes from the caller's own environment)."""
    mlflow = spec.tracking.mlflow if spec.tracking is not None else None
    if mlflow is None or not settings.mlflow_tracking_uri:
        return {}
    return {mlflow.uri_env: settings.mlflow_tracking_uri}


# ------------------------------------------------------------------------------ results

@dataclass
class Validation:
    """A valid spec: what it will be called on the cluster, and the advice (values outside the guide's ranges)."""

    spec: Any  # jobs.spec.TrainingRunSpec
    job_name: str
    spec_hash: str
    advice: list[Any] = field(default_factory=list)  # jobs.errors.Problem, each with .render()


@dataclass
class Attempts:
    """A Job's pods (failed: those counted against retries), or for a JobSet run its current attempt's pods with
    ``failed`` the whole-run restarts counted against ``retries_allowed`` and ``restarts`` all of them (a
    disruption's are not counted)."""

    active: int
    succeeded: int
    failed: int
    retries_allowed: int | None
    restarts: int | None = None


@dataclass
class RunStatus:
    """Where a run is and why: ``state`` is Queued, Pending, Running, Succeeded, Failed or Deleting, and
    ``sentence`` says why. ``pods`` are the attempts, oldest first. ``to_dict()`` is ``launcher status -o
    json``; new fields (e.g. a ``progress`` read from the run's storage) are appended, never reordered."""

    run: str | None
    job: str
    namespace: str
    spec_hash: str | None
    state: str
    sentence: str
    exit_code: int | None
    blocked: bool
    details: list[str]
    created: str | None
    started: str | None
    completed: str | None
    attempts: Attempts
    output: str | None
    pods: list[Any]  # launcher.diagnose.Attempt
    # The job's live progress object (jobs.progress), read from the run's storage, with a one-line "summary";
    # None when it cannot be read (no credentials here, not written yet, a run from before progress existed).
    progress: dict | None = None
    kind: str = "Job"  # or "JobSet": what the run is on the cluster (settings.multinode_workload)
    # What the run cost so far, or in the end (jobs.cost.run_cost: GPU-hours over every pod, queue wait, tokens,
    # tokens/s/GPU, MFU, the price from setting gpu_prices, wall seconds per stage) with a one-line "summary";
    # None before any pod started.
    cost: dict | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("Succeeded", "Failed")

    @property
    def succeeded(self) -> bool:
        return self.state == "Succeeded"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunSummary:
    """One row of :meth:`Client.list`."""

    run: str | None
    job: str
    state: str
    sentence: str
    created: str | None
    progress: str | None = None  # jobs.progress.describe() of a running run's progress object
    cost: str | None = None  # jobs.cost.describe_cost() of what the run cost so far (RunStatus.cost's summary)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Cancelled:
    job: str
    waited: bool  # True: the Job and its pods are gone; False: deletion was asked for
    kind: str = "job"  # or "jobset" (its Jobs and headless Service went with it)

    @property
    def message(self) -> str:
        return f"cancelled: {self.kind} {self.job}" + (f" ({self.kind} and pods deleted)" if self.waited
                                                       else " (deleting)")


@dataclass
class Downloaded:
    run: str
    version: str
    path: Path

    @property
    def message(self) -> str:
        return f"downloaded {self.run} {self.version} to {self.path} (all files match the manifest)"


@dataclass
class PruneReport:
    run: str
    applied: bool  # False: a dry run, nothing was deleted
    orphans: list[Any]  # launcher.artifacts.Orphan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LogStream:
    """The trainer's log lines (``for line in client.logs(run)``); after the loop, ``outcome`` is the run's
    final :class:`RunStatus` when following, else None."""

    def __init__(self, lines: Iterator[str] | Any):
        self._lines = lines
        self.outcome: RunStatus | None = None

    def __iter__(self) -> Iterator[str]:
        self.outcome = yield from self._lines


@dataclass
class Snapshot:
    """One look at a run: its Job or JobSet (None once gone), its pods, the Warning events around it, and a
    JobSet's child Jobs (one per attempt, while JobSet keeps them)."""

    workload: dict | None
    pods: list[dict]
    events: list[dict]
    jobs: list[dict] = field(default_factory=list)

    def diagnose(self, **kw: Any):
        """:func:`launcher.diagnose.diagnose_run` of it (``kw``: gpu_resource, workload, nodes)."""
        from launcher.diagnose import diagnose_run

        return diagnose_run(self.workload, self.pods, self.events, jobs=self.jobs, **kw)

    def status(self, diag: Any, namespace: str) -> "RunStatus":
        return status_of(self.workload, self.pods, diag, namespace, self.jobs)


def _jobsets(kube: Any, selector: str) -> list[dict]:
    """The JobSets ``selector`` names; none where the cluster serves none, or the launcher may not list them (a
    Role from before JobSet runs: its Jobs still work)."""
    from launcher.errors import Forbidden

    try:
        return kube.list_jobsets(selector)
    except Forbidden:
        return []


def _jobset(kube: Any, name: str) -> dict | None:
    """The JobSet ``name``, or None (none served, none of that name, or not allowed to read it)."""
    from launcher.errors import Forbidden

    try:
        return kube.get_jobset(name)
    except Forbidden:
        return None


# ------------------------------------------------------------------------------ small pure helpers

_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int, what: str = "older_than") -> float:
    """'90m', '24h', '7d', '30s' (or a number of seconds) as seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(text))
    if not m:
        raise UsageError(f"{what} {text!r} is not a duration", hint="use e.g. 90m, 24h or 7d")
    return float(m.group(1)) * _DURATION[m.group(2)]


def check_seconds(what: str, value: float | None, flag: str) -> None:
    """A number of seconds that must be above 0 (None: not given)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise UsageError(f"{what} must be a number of seconds above 0; got {value!r}",
                         hint=f"pass {flag} SECONDS with SECONDS > 0, or leave it out")


def _is_label_value(s: str) -> bool:
    return bool(re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?", s))


def _ts_key(ts: str) -> tuple[str, str]:
    """Order RFC 3339 timestamps with fractions of any length."""
    if "." in ts:
        head, frac = ts.split(".", 1)
        return head, frac.rstrip("Z").ljust(9, "0")
    return ts.rstrip("Z"), "0" * 9


def _by_age(pods: list[dict]) -> list[dict]:
    return sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))


def status_of(job: dict, pods: list[dict], diag: Any, namespace: str, jobs: list[dict] = ()) -> RunStatus:
    """A :class:`RunStatus` from the Job (or JobSet and its child ``jobs``), its pods and their diagnosis. Pure."""
    from launcher.diagnose import attempt_of, current_attempt
    from launcher.render import ANNOTATION_OUTPUT, LABEL_HASH, LABEL_RUN, is_jobset

    meta, st = job.get("metadata") or {}, job.get("status") or {}
    labels = meta.get("labels") or {}
    if is_jobset(job):
        child, pods = current_attempt(job, list(jobs), pods)
        cst = (child or {}).get("status") or {}
        attempts = Attempts(active=cst.get("active", 0), succeeded=cst.get("succeeded", 0),
                            failed=st.get("restartsCountTowardsMax", 0),
                            retries_allowed=((job.get("spec") or {}).get("failurePolicy") or {}).get("maxRestarts"),
                            restarts=st.get("restarts", 0))
        started, completed = cst.get("startTime"), cst.get("completionTime")
    else:
        attempts = Attempts(active=st.get("active", 0), succeeded=st.get("succeeded", 0), failed=st.get("failed", 0),
                            retries_allowed=(job.get("spec") or {}).get("backoffLimit"))
        started, completed = st.get("startTime"), st.get("completionTime")
    return RunStatus(
        run=labels.get(LABEL_RUN), job=meta.get("name"), namespace=meta.get("namespace", namespace),
        spec_hash=labels.get(LABEL_HASH), state=diag.state, sentence=diag.sentence, exit_code=diag.exit_code,
        blocked=diag.blocked, details=list(diag.details), created=meta.get("creationTimestamp"),
        started=started, completed=completed, attempts=attempts,
        output=(meta.get("annotations") or {}).get(ANNOTATION_OUTPUT),
        pods=[attempt_of(p) for p in _by_age(pods)], kind="JobSet" if is_jobset(job) else "Job")


def _cost_of(progress: dict | None, pods: list[dict], workload: dict | None, settings: Any) -> dict | None:
    """What a run cost so far (jobs.cost.run_cost, priced by setting gpu_prices), with its one-line "summary"."""
    from jobs.cost import describe_cost, run_cost

    cost = run_cost(progress, pods, ((workload or {}).get("metadata") or {}).get("creationTimestamp"),
                    prices=settings.gpu_prices, gpu_resource=settings.gpu_resource)
    if cost is not None:
        cost["summary"] = describe_cost(cost)
    return cost


# ------------------------------------------------------------------------------ the client

class Client:
    """The launcher's verbs against one namespace of one cluster (and the object storage its runs publish to).

    ``namespace``, ``context`` and ``kubeconfig`` override the settings (``LAUNCHER_*``, the config file and
    the namespace's ``lora-jobs-launcher`` ConfigMap; see :mod:`launcher.settings`). ``notes`` receives
    progress messages meant for a person (retries, "waiting for the pod", pod headers in a log); by default
    they go to the ``launcher`` logger. ``kube`` and ``settings`` replace the connection, for tests.
    Nothing connects until a verb needs the cluster.
    """

    def __init__(self, namespace: str | None = None, *, context: str | None = None, kubeconfig: str | None = None,
                 notes: Callable[[str], None] | None = None, kube: Any = None, settings: Any = None):
        self._overrides = {"namespace": namespace, "context": context, "kubeconfig": kubeconfig}
        self._note = notes or _log.info
        self._kube = kube
        self._settings = settings
        self._offline = settings

    # ------------------------------------------------------------------ connection
    @property
    def offline_settings(self):
        """Settings without the cluster's ConfigMap (what ``--dry-run`` uses)."""
        if self._offline is None:
            from launcher.settings import make_settings
            self._offline = make_settings(**self._overrides)
        return self._offline

    def connect(self) -> tuple[Any, Any]:
        """(settings including the namespace's ConfigMap, the kube adaptor); connects once."""
        if self._kube is None or self._settings is None:
            from launcher.kube import Kube
            from launcher.settings import load_settings

            kube = self._kube or Kube.from_settings(self.offline_settings)
            settings = self._settings or load_settings(kube, **self._overrides)
            kube.namespace = settings.namespace
            self._kube, self._settings = kube, settings
        return self._settings, self._kube

    @property
    def namespace(self) -> str:
        return self._settings.namespace if self._settings is not None else self.offline_settings.namespace

    def _outage(self):
        """A :class:`launcher.kube.Outage` for one verb: API-server failures in a row are retried, with progress
        notes, for up to the ``cluster_timeout`` setting, then stop with ``ClusterUnreachable``."""
        from launcher.kube import Outage

        return Outage(self.offline_settings.cluster_timeout, self._note)

    def _job_of(self, run: str, *, outlive_outages: bool = False, timeout: float | None = None,
                outage: Any = None) -> dict:
        """The run's newest Job (RUN is a run name or a Job name). With ``outlive_outages`` an API server that
        is down or restarting is waited out, within ``timeout`` and ``outage``'s limit, as :meth:`wait` does
        later on."""
        from launcher.kube import with_retries

        def attempt() -> dict:
            _, kube = self.connect()
            return self._resolve(kube, run)

        if not outlive_outages:
            return attempt()
        deadline = time.monotonic() + timeout if timeout else None
        return with_retries(attempt, deadline=deadline, outage=outage or self._outage())

    @staticmethod
    def _resolve(kube: Any, run: str) -> dict:
        """The run's newest Job or JobSet (RUN is a run name, a Job name or a JobSet name)."""
        from launcher.render import LABEL_RUN

        selector = f"{LABEL_RUN}={run}"
        jobs = kube.list_jobs(selector) + _jobsets(kube, selector) if _is_label_value(run) else []
        if jobs:
            return max(jobs, key=lambda j: (j["metadata"].get("creationTimestamp") or "", j["metadata"]["name"]))
        job = kube.get_job(run) or _jobset(kube, run)
        if job is not None:
            return job
        raise UsageError(f"no run or Job named {run} in namespace {kube.namespace}",
                         hint="see `launcher list`, or pass -n NAMESPACE")

    @staticmethod
    def _snapshot(kube: Any, run: dict) -> "Snapshot":
        """The resolved ``run`` (Job or JobSet) read again: None once gone, its pods, the Warning events of it,
        a JobSet's child Jobs and the newest pods, and a JobSet's child Jobs."""
        from launcher.render import JOBSET_NAME_LABEL, is_jobset

        name = run["metadata"]["name"]
        if is_jobset(run):
            jobset = kube.get_jobset(name)
            if jobset is None:
                return Snapshot(None, [], [])
            jobs = kube.list_jobs(f"{JOBSET_NAME_LABEL}={name}")
            snap = Snapshot(jobset, kube.list_pods(f"{JOBSET_NAME_LABEL}={name}"), [], jobs)
            objects = [name] + [j["metadata"]["name"] for j in jobs]
        else:
            job = kube.get_job(name)
            if job is None:
                return Snapshot(None, [], [])
            snap = Snapshot(job, kube.list_pods(f"{POD_JOB_LABEL}={name}"), [])
            objects = [name]
        for obj in objects + [p["metadata"]["name"] for p in snap.pods[-3:]]:
            snap.events += kube.list_events(f"involvedObject.name={obj},type=Warning")
        return snap

    @staticmethod
    def _workload(kube: Any, job: dict | None) -> dict | None:
        """Kueue's Workload of a suspended Job that names a queue (why it waits; whether Kueue preempted it)."""
        from launcher.render import LABEL_QUEUE

        if not job or not (job.get("spec") or {}).get("suspend") or \
                LABEL_QUEUE not in (job["metadata"].get("labels") or {}):
            return None
        read = getattr(kube, "job_workload", None)  # an adaptor without it (a test's fake): the queue alone
        return read(job) if read else None

    # ------------------------------------------------------------------ specs
    @staticmethod
    def _nodes(kube: Any, pods: list[dict]) -> dict[str, dict]:
        """The nodes of the run's running pods, to tell a node that stopped reporting. Best effort: a user
        whose Role cannot read nodes (cluster-scoped) gets the diagnosis without them."""
        from launcher.errors import LoraJobError

        names = {(p.get("spec") or {}).get("nodeName") for p in pods
                 if (p.get("status") or {}).get("phase") == "Running"} - {None}
        out: dict[str, dict] = {}
        for name in sorted(names):
            try:
                node = kube.get_node(name)
            except LoraJobError:
                return out
            if node:
                out[name] = node
        return out

    def load_spec(self, spec: SpecLike, overrides: list[str] | tuple[str, ...] = ()):
        """A validated ``TrainingRunSpec`` from a YAML file, a dict or a spec; ``overrides`` are ``--set``
        items (``key.path=value``). Raises ``SpecError`` listing every problem."""
        from jobs import spec as specmod

        if isinstance(spec, specmod.TrainingRunSpec):
            if not overrides:
                return spec
            spec = spec.model_dump(mode="json")
        if isinstance(spec, dict):
            data = specmod.apply_overrides(spec, list(overrides)) if overrides else spec
            return specmod.parse_spec(data)
        return specmod.load_spec(spec, overrides=list(overrides))

    def validate(self, spec: SpecLike, overrides: list[str] | tuple[str, ...] = (), *,
                 target: Literal["cluster", "local"] | None = None) -> Validation:
        """Check a spec offline: every problem at once (``SpecError``), or the names it will run under,
        with advice: values outside the guide's ranges, and a tracking section no server is configured for.

        Local paths are judged by where the run goes. ``target="cluster"``: a local path is an error (a pod
        cannot read it, --skip-preflight or not). ``target="local"`` (``submit --local``): a local input that does
        not exist is an error. No target (``launcher validate``, which cannot know): both are warnings, since the
        same spec is right for one target and wrong for the other. Relative paths are read from the spec file's
        folder (the current one for a dict or a spec object), as ``submit --local`` reads them."""
        from jobs.errors import Problem, SpecError
        from launcher.render import job_name
        from launcher.submit import local_path_problems

        s = self.load_spec(spec, overrides)
        base = Path(spec).resolve().parent if isinstance(spec, (str, Path)) else Path.cwd()
        unreadable = []  # in a pod: "<field> is a local path (...) that a pod cannot read — <fix>"
        for sentence in local_path_problems(s):
            where, rest = sentence.split(" ", 1)
            message, _, fix = rest.partition(" — ")
            unreadable.append(Problem(where, message, fix or None, line=s.line_of(where)))
        missing = []  # here: the inputs a local run reads (not the output, which it makes)
        for where, value in s.places():
            if where == "output" or value.startswith(("s3://", "hf:")):
                continue
            path = Path(value[7:] if value.startswith("file://") else value).expanduser()
            path = path if path.is_absolute() else Path(os.path.normpath(base / path))
            if not path.exists():
                missing.append(Problem(where, f"{value} does not exist" + (f" ({path})" if str(path) != value else ""),
                                       "check the path (a relative one is read from the spec file's folder), or "
                                       "create it before the run", line=s.line_of(where)))
        source = str(spec) if isinstance(spec, (str, Path)) else None
        if target == "cluster" and unreadable:
            raise SpecError(unreadable, source)
        if target == "local" and missing:
            raise SpecError(missing, source)
        advice = list(s.advice()) + tracking_advice(s, self.offline_settings)
        if target is None:
            advice += [Problem(p.where, p.message + " (fine for `launcher submit --local`)", p.fix, p.line)
                       for p in unreadable] + missing
        return Validation(spec=s, job_name=job_name(s), spec_hash=s.spec_hash(), advice=advice)

    def render(self, spec: SpecLike, overrides: list[str] | tuple[str, ...] = (), *, queue: str | None = None,
               multinode_workload: str | None = None):
        """Every object the run would create (a ``launcher.render.RunObjects``; ``.objects`` lists them), by the
        renderer ``submit`` uses, from the offline settings with ``queue`` / ``multinode_workload`` over them.
        Touches no cluster, so it never asks whether the cluster serves JobSets: ``multinode_workload: auto``
        renders the Indexed Job (the CLI says so)."""
        from launcher.render import render_run
        from launcher.settings import make_settings

        settings = self.offline_settings
        chosen = {k: v for k, v in {"queue": queue, "multinode_workload": multinode_workload}.items() if v}
        if chosen:  # every field given explicitly, so only the choices made here differ from the offline settings
            settings = make_settings(**{**settings.model_dump(), **chosen})
        return render_run(self.load_spec(spec, overrides), settings)

    # ------------------------------------------------------------------ runs on the cluster
    def submit(self, spec: SpecLike, overrides: list[str] | tuple[str, ...] = (), *, server_dry_run: bool = False,
               skip_preflight: bool = False):
        """Preflight-check and create the run (the same spec twice is the same run: ``created`` False).
        With ``server_dry_run`` the API server admits it but nothing is created. Returns a
        ``launcher.submit.SubmitResult``; raises ``PreflightError`` listing every failed check."""
        from launcher.submit import submit as submit_run

        s = self.load_spec(spec, overrides)
        settings, kube = self.connect()
        return submit_run(kube, s, settings, server_dry_run=server_dry_run, skip_preflight=skip_preflight)

    def run_local(self, spec: SpecLike, overrides: list[str] | tuple[str, ...] = (), *, workdir: Path | None = None,
                  base_dir: Path | None = None, on_output: Callable[[str], None] | None = None) -> int:
        """Run the job here (``python -m jobs run``) and return its exit code (docs/architecture.md).
        Relative paths in the spec are against ``base_dir``: the spec file's folder, else the current one.
        Each output line (newline kept) goes to ``on_output`` (default: the ``launcher`` logger)."""
        from launcher.local import run_local

        if base_dir is None:
            base_dir = Path(spec).resolve().parent if isinstance(spec, (str, Path)) else Path.cwd()
        s = self.load_spec(spec, overrides)
        return run_local(s, base_dir, workdir, on_output=on_output or (lambda line: _log.info(line.rstrip("\n"))),
                         note=self._note, env=local_tracking_env(s, self.offline_settings))

    def status(self, run: str) -> RunStatus:
        """Where a run (its newest Job or JobSet) is, and why; ``UsageError`` if there is no such run."""
        settings, kube = self.connect()
        snap = self._snapshot(kube, self._resolve(kube, run))
        if snap.workload is None:
            raise UsageError(f"run {run} disappeared while we looked", hint="see `launcher list`")
        from jobs.progress import read_run_progress

        st = snap.status(snap.diagnose(gpu_resource=settings.gpu_resource, workload=self._workload(kube, snap.workload),
                                       nodes=self._nodes(kube, snap.pods)), kube.namespace)
        st.progress = read_run_progress(st.output, st.spec_hash, endpoint=settings.s3_endpoint)
        st.cost = _cost_of(st.progress, snap.pods, snap.workload, settings)
        return st

    def list(self) -> list[RunSummary]:
        """The runs in the namespace, newest first."""
        from jobs.progress import read_runs_progress
        from launcher.render import ANNOTATION_OUTPUT, JOBSET_NAME_LABEL, LABEL_HASH, LABEL_RUN

        settings, kube = self.connect()
        jobsets = _jobsets(kube, LABEL_APP_SELECTOR)
        jobs = kube.list_jobs(LABEL_APP_SELECTOR) + jobsets
        # pods and child Jobs by the run they belong to: a JobSet's by its name, a Job's pods by the Job's
        by_run: dict[str, list[dict]] = {}
        for p in kube.list_pods(LABEL_APP_SELECTOR):
            labels = p["metadata"].get("labels") or {}
            by_run.setdefault(labels.get(JOBSET_NAME_LABEL) or labels.get(POD_JOB_LABEL, ""), []).append(p)
        children: dict[str, list[dict]] = {}
        for j in kube.list_jobs(JOBSET_NAME_LABEL) if jobsets else []:
            children.setdefault(j["metadata"]["labels"][JOBSET_NAME_LABEL], []).append(j)
        runs = []
        for j in sorted(jobs, key=lambda j: j["metadata"].get("creationTimestamp") or "", reverse=True):
            name = j["metadata"]["name"]
            d = Snapshot(j, by_run.get(name, []), [], children.get(name, [])).diagnose(
                gpu_resource=settings.gpu_resource)
            runs.append((j, d))
        # one small read per run that ran (its progress, and what it cost); one S3 client for all, and none more
        # once the store does not answer
        ran = [d.state in ("Running", "Succeeded", "Failed") for _, d in runs]
        read = iter(read_runs_progress(
            [((j["metadata"].get("annotations") or {}).get(ANNOTATION_OUTPUT),
              (j["metadata"].get("labels") or {}).get(LABEL_HASH)) for (j, _), r in zip(runs, ran) if r],
            endpoint=settings.s3_endpoint))
        rows = []
        for (j, d), r in zip(runs, ran):
            labels = j["metadata"].get("labels") or {}
            p = next(read) if r else None
            cost = _cost_of(p, by_run.get(j["metadata"]["name"], []), j, settings)
            rows.append(RunSummary(run=labels.get(LABEL_RUN), job=j["metadata"]["name"], state=d.state,
                                   sentence=d.sentence, created=j["metadata"].get("creationTimestamp"),
                                   # finished runs say it in their sentence
                                   progress=p["summary"] if p and d.state == "Running" else None,
                                   cost=(cost or {}).get("summary")))
        return rows

    def wait(self, run: str, *, timeout: float | None = None, interval: float = 2.0,
             on_change: Callable[[RunStatus], None] | None = None) -> RunStatus:
        """Poll until the run finishes and return its final status (whether it succeeded or failed: look at
        ``state``). Outlives API-server restarts; an API server that does not answer for ``cluster_timeout``
        seconds in a row (a setting, 2 minutes by default) raises ``ClusterUnreachable``, however long the run
        itself takes. ``on_change`` sees each new sentence. Raises ``WaitTimeout`` after ``timeout`` seconds,
        ``RunFailed`` if the Job disappears."""
        from launcher.kube import with_retries

        check_seconds("timeout", timeout, "--timeout")
        check_seconds("interval", interval, "--interval")
        started = time.monotonic()
        outage = self._outage()
        job = self._job_of(run, outlive_outages=True, timeout=timeout, outage=outage)
        if timeout is not None:
            timeout = max(1.0, timeout - (time.monotonic() - started))
        settings, kube = self.connect()
        name = job["metadata"]["name"]
        deadline = time.monotonic() + timeout if timeout else None
        last = None
        while True:
            snap = with_retries(lambda: self._snapshot(kube, job), deadline=deadline, outage=outage)
            if snap.workload is None:
                raise RunFailed(f"job {name} no longer exists (cancelled, or deleted after its TTL)")
            diag = snap.diagnose(gpu_resource=settings.gpu_resource, workload=self._workload(kube, snap.workload),
                                 nodes=self._nodes(kube, snap.pods))
            status = snap.status(diag, kube.namespace)
            if diag.sentence != last:
                if on_change:
                    on_change(status)
                last = diag.sentence
            if diag.finished:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {name} is still {diag.state.lower()} after {timeout:g} s: {diag.sentence}",
                                  hint="wait again with a longer --timeout")
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))

    def logs(self, run: str, *, follow: bool = False, tail: int | None = None, poll: float = 1.0,
             rank: int | None = None) -> LogStream:
        """The trainer's log lines, pod after pod (retries included).

        With ``follow``: wait for each pod to start, stream until the run ends, reconnect (without repeating
        lines) when the API server goes away; ``outcome`` is then the final status. A container whose current
        log cannot be read falls back to its previous instance; one that cannot be read at all is noted.
        A multi-node run's pods are its node ranks: ``rank`` picks one (default 0, the rank that publishes)."""
        from launcher.render import job_spec_of

        if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 0):
            raise UsageError(f"tail must be a number of lines, 0 or more; got {tail!r}",
                             hint="pass --tail N with N >= 0, or leave it out for the whole log")
        outage = self._outage()
        job = self._job_of(run, outlive_outages=follow, outage=outage)
        spec = job_spec_of(job)
        nodes = int(spec.get("completions") or 1) if spec.get("completionMode") == "Indexed" else 1
        if rank is not None and not 0 <= rank < nodes:
            raise UsageError(f"run {run} has {nodes} pod{'s' if nodes > 1 else ''} (node ranks 0-{nodes - 1}); "
                             f"there is no rank {rank}", hint=f"pick --rank between 0 and {nodes - 1}")
        index = (rank or 0) if nodes > 1 else None
        _, kube = self.connect()
        return LogStream(self._log_lines(kube, job, follow=follow, tail=tail, poll=poll, index=index, outage=outage))

    def _log_lines(self, kube: Any, run: dict, *, follow: bool, tail: int | None, poll: float,
                   index: int | None = None, outage: Any = None):
        from launcher.diagnose import trainer_status
        from launcher.kube import ClusterError, ClusterUnreachable, with_retries

        note = self._note
        done: set[str] = set()  # pods whose log is printed to the end
        no_log: set[str] = set()  # pods whose log cannot be read: wait for them to end
        headed: set[str] = set()
        last_ts: dict[str, tuple] = {}
        errors: dict[str, int] = {}
        said = None
        printed = False

        outage = outage or self._outage()
        job_name = run["metadata"]["name"]
        while True:
            snap = with_retries(lambda: self._snapshot(kube, run), outage=outage)
            if snap.workload is None:
                raise RunFailed(f"job {job_name} no longer exists (cancelled, or deleted after its TTL)")
            diag = snap.diagnose()
            pods = _by_age(snap.pods)
            if index is not None:  # one node rank of a multi-node run: its pods, retries included
                pods = [p for p in pods if ((p.get("metadata") or {}).get("annotations") or {}).get(
                    "batch.kubernetes.io/job-completion-index") == str(index)]
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
                        yield text
                        printed = True
                    errors.pop(name, None)
                except ClusterUnreachable as err:
                    if not follow:
                        raise
                    outage.failed(err)  # raises ClusterUnreachable once the outage has lasted its limit
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
            if index is not None and not pods and diag.finished:
                # successPolicy (index 0) ends the run with node 0: the Job controller deletes a pod still running
                note(f"the pod of node rank {index} is gone: the Job controller deletes the other ranks' pods once "
                     f"rank 0's pod has ended, and its log went with it ({diag.sentence}). Follow it while the run "
                     f"runs (`launcher logs {job_name} --rank {index} -f`) or read it in your cluster's log store")
                return snap.status(diag, kube.namespace) if follow else None
            if not follow:
                if not printed:
                    note(f"no log yet: {diag.sentence}")
                return None
            if diag.finished and all(p["metadata"]["name"] in done for p in pods):
                return snap.status(diag, kube.namespace)
            time.sleep(poll)

    def cancel(self, run: str, *, wait: bool = True, timeout: float = 120) -> Cancelled:
        """Stop a run: delete its Job (or JobSet: its Jobs and headless Service with it), its pods and its spec
        ConfigMap; with ``wait``, until they are gone (``WaitTimeout`` after ``timeout`` seconds)."""
        from launcher.render import JOBSET_NAME_LABEL, is_jobset

        if wait:  # before anything is deleted: a bad flag must not cost the run
            check_seconds("timeout", timeout, "--timeout")
        _, kube = self.connect()
        resolved = self._resolve(kube, run)
        name = resolved["metadata"]["name"]
        if is_jobset(resolved):
            kube.delete_jobset(name, propagation="Foreground")
            get, pods_label = kube.get_jobset, JOBSET_NAME_LABEL
        else:
            kube.delete_job(name, propagation="Foreground")
            get, pods_label = kube.get_job, POD_JOB_LABEL
        kube.delete_configmap(name)
        if wait:
            deadline = time.monotonic() + timeout
            while get(name) is not None or kube.list_pods(f"{pods_label}={name}"):
                if time.monotonic() > deadline:
                    raise WaitTimeout(f"{resolved.get('kind', 'Job').lower()} {name} is still being deleted after "
                                      f"{timeout:g} s", hint=f"check its pods: kubectl get pods -l {pods_label}={name}")
                time.sleep(1)
        return Cancelled(name, wait, "jobset" if is_jobset(resolved) else "job")

    # ------------------------------------------------------------------ published versions
    def _output_of(self, run: str, output: str | None) -> tuple[str, str]:
        """(run name, output prefix) from ``output``, else from the run's Job."""
        run_name = run
        if output is not None:
            from jobs.spec import check_uri

            try:
                output = check_uri(output, "--output")
            except ValueError as err:  # a near-miss like s3:/bucket would be read as a local folder
                raise UsageError(f"--output: {err}", hint="give s3://bucket/prefix or a local folder") from None
        if output is None:
            from launcher.render import ANNOTATION_OUTPUT, LABEL_RUN

            _, kube = self.connect()
            meta = self._resolve(kube, run)["metadata"]
            run_name = (meta.get("labels") or {}).get(LABEL_RUN, run)
            prefix = (meta.get("annotations") or {}).get(ANNOTATION_OUTPUT)
            if not prefix:
                raise UsageError(f"job {meta['name']} does not say where its output goes", hint="pass --output PREFIX")
            output = prefix.rsplit("/", 1)[0]
        return run_name, output

    @property
    def _s3_endpoint(self) -> str | None:
        """The settings' S3 endpoint, passed to each store explicitly (the environment's AWS_ENDPOINT_URL wins
        there); never written into ``os.environ``, which would change every later S3 call of the process."""
        return (self._settings or self.offline_settings).s3_endpoint

    def artifacts(self, run: str, *, output: str | None = None):
        """The run's complete versions (oldest first), its incomplete folders and ``latest``, as a
        ``launcher.artifacts.Listing``. ``output`` (the spec's output prefix) is needed once the Job is gone."""
        from launcher import artifacts as art

        run_name, output = self._output_of(run, output)
        return art.list_versions(output, run_name, endpoint=self._s3_endpoint)

    def download(self, run: str, dest: str | Path, *, version: str | None = None,
                 output: str | None = None, on_progress: Callable[[int, int], None] | None = None) -> Downloaded:
        """Download a complete version (default: latest) to ``dest/<version>``, every file verified against the
        manifest; ``StorageError`` otherwise. ``on_progress(bytes_done, bytes_total)`` follows the transfer."""
        from launcher import artifacts as art

        run_name, output = self._output_of(run, output)
        v, folder = art.download_version(output, run_name, version, dest, on_progress=on_progress,
                                         endpoint=self._s3_endpoint)
        return Downloaded(run_name, v, folder)

    def prune(self, run: str, *, older_than: str | float = "24h", apply: bool = False,
              output: str | None = None) -> PruneReport:
        """Incomplete version folders (publishes that died half-way) untouched for ``older_than`` ('24h', '7d'
        or seconds); deleted only with ``apply``. A complete version is never touched."""
        from launcher import artifacts as art

        seconds = parse_duration(older_than)
        run_name, output = self._output_of(run, output)
        return PruneReport(run_name, apply, art.prune_incomplete(output, run_name, older_than_seconds=seconds,
                                                                 apply=apply, endpoint=self._s3_endpoint))
