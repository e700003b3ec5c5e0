"""The launcher as a library: every verb of the CLI as a typed method of :class:`Client`.

    from launcher.client import Client

    client = Client(namespace="ml")                # runs on a cluster; Client(backend="local"): on this machine
    run = client.submit("spec.yaml")
    status = client.wait(run.job_name, timeout=3600)
    print(status.state, status.sentence)
    print([v.name for v in client.artifacts(status.run).versions])

Results are plain dataclasses (:mod:`launcher.results`; ``to_dict()`` gives what ``-o json`` prints); every
failure is a :class:`launcher.errors.LoraJobError` with a message and a fix. ``launcher.cli`` only parses flags,
calls these methods and prints. The verbs that touch a run go to a :class:`launcher.backends.Backend`
(Kubernetes or local); the client checks their arguments first and holds what needs no backend: specs,
rendering, and published versions. Heavy modules (kubernetes, boto3) are imported by the methods that need them.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Literal, Union

from launcher.errors import UsageError
from launcher.results import (Attempts, Cancelled, Downloaded, LogStream, PruneReport, RunStatus,  # noqa: F401
                              RunSummary, Validation)

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


class Client:
    """The launcher's verbs, on one backend: ``kubernetes`` (one namespace of one cluster) or ``local`` (this
    machine); default: the ``backend`` setting (``LAUNCHER_BACKEND``), else ``kubernetes``. ``backend`` may also
    be a :class:`launcher.backends.Backend` object (tests give one their own adaptor).

    ``namespace``, ``context`` and ``kubeconfig`` override the settings (``LAUNCHER_*``, the config file and
    the namespace's ``lora-jobs-launcher`` ConfigMap; see :mod:`launcher.settings`); ``state_dir`` is where local
    runs keep their state (setting ``local_state_dir``). ``notes`` receives progress messages meant for a
    person (retries, "waiting for the pod", pod headers in a log); by default they go to the ``launcher``
    logger. ``settings`` replaces them all. Nothing connects until a verb needs the cluster.
    """

    def __init__(self, namespace: str | None = None, *, context: str | None = None, kubeconfig: str | None = None,
                 backend: str | Any = None, state_dir: str | Path | None = None,
                 notes: Callable[[str], None] | None = None, settings: Any = None):
        self._overrides = {"namespace": namespace, "context": context, "kubeconfig": kubeconfig}
        self._note = notes or _log.info
        self._offline = settings
        self._given_settings = settings  # used as they are: the namespace's ConfigMap is not read over them
        self._state_dir = state_dir
        if backend is not None and isinstance(backend, str):
            from launcher.backends import NAMES

            if backend not in NAMES:
                raise UsageError(f"backend {backend!r} is not one of: {', '.join(NAMES)}",
                                 hint="pass --backend kubernetes or --backend local (or set LAUNCHER_BACKEND)")
        self._backend_arg = backend
        self._backend: Any = None if isinstance(backend, (str, type(None))) else backend

    # ------------------------------------------------------------------ backends
    @property
    def offline_settings(self):
        """Settings without the cluster's ConfigMap (what ``--dry-run`` uses)."""
        if self._offline is None:
            from launcher.settings import make_settings
            self._offline = make_settings(**self._overrides)
        return self._offline

    @property
    def backend(self):
        """The :class:`launcher.backends.Backend` the run verbs go to; made on first use."""
        if self._backend is None:
            name = self._backend_arg or self.offline_settings.backend
            self._backend = self._make_backend(name)
        return self._backend

    def _make_backend(self, name: str):
        if name == "local":
            from launcher.backends.local import LocalBackend

            return LocalBackend(self.offline_settings, note=self._note, state_dir=self._state_dir)
        from launcher.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(self.offline_settings, note=self._note, overrides=self._overrides,
                                 settings=self._given_settings)

    def connect(self) -> tuple[Any, Any]:
        """(settings including the namespace's ConfigMap, the kube adaptor) of the Kubernetes backend."""
        if self.backend.name != "kubernetes":
            raise UsageError(f"connect() is the Kubernetes backend's; this client runs on {self.backend.name}",
                             hint="make a Client(backend=\"kubernetes\")")
        return self.backend.connect()

    @property
    def namespace(self) -> str:
        return self.backend.settings.namespace

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

    # ------------------------------------------------------------------ runs
    def submit(self, spec: SpecLike, overrides: list[str] | tuple[str, ...] = (), *, server_dry_run: bool = False,
               skip_preflight: bool = False, workdir: Path | None = None, base_dir: Path | None = None):
        """Start the run. On a cluster: preflight-check and create it (the same spec twice is the same run:
        ``created`` False), with ``server_dry_run`` only admitted by the API server (a
        ``launcher.submit.SubmitResult``; ``PreflightError`` lists every failed check). Locally: start the job
        detached and return at once (a ``launcher.backends.local.LocalSubmitResult``; ``workdir``: its working
        folder, default a scratch folder removed when it ends). Relative paths in the spec are against
        ``base_dir``: the spec file's folder, else the current one."""
        base_dir = self._base_dir(spec, base_dir)
        return self.backend.submit(self.load_spec(spec, overrides), base_dir=base_dir,
                                   server_dry_run=server_dry_run, skip_preflight=skip_preflight, workdir=workdir)

    def run_local(self, spec: SpecLike, overrides: list[str] | tuple[str, ...] = (), *, workdir: Path | None = None,
                  base_dir: Path | None = None, on_output: Callable[[str], None] | None = None) -> int:
        """Run the job here and follow it to its end: start it as :meth:`submit` does on the local backend (a
        run like any other: ``status``, ``logs``, ``cancel`` see it from elsewhere), stream each output line
        (newline kept) to ``on_output`` (default: the ``launcher`` logger), and return its exit code
        (docs/architecture.md). Stopping this process stops the run: SIGTERM is passed on (the job
        checkpoints, exit 75), Ctrl-C interrupts it (exit 130, nothing published)."""
        from launcher.backends.local import LocalBackend

        local = self.backend if self.backend.name == "local" else self._make_backend("local")
        assert isinstance(local, LocalBackend)
        started = local.submit(self.load_spec(spec, overrides), base_dir=self._base_dir(spec, base_dir),
                               workdir=workdir)
        flag = "" if self.offline_settings.backend == "local" else " --backend local"
        self._note(f"running {started.job_name} locally" + ("" if started.created else " (already running: "
                                                            "following it)") + f"; state in {started.run_dir}")
        self._note(f"elsewhere: launcher{flag} status {started.job_name}   |   launcher{flag} logs "
                   f"{started.job_name} -f   |   launcher{flag} cancel {started.job_name}")
        return local.attach(started.job_name, on_output or (lambda line: _log.info(line.rstrip("\n"))))

    @staticmethod
    def _base_dir(spec: SpecLike, base_dir: Path | None) -> Path:
        if base_dir is not None:
            return Path(base_dir).resolve()
        return Path(spec).resolve().parent if isinstance(spec, (str, Path)) else Path.cwd()

    def status(self, run: str) -> RunStatus:
        """Where a run (on a cluster its newest Job or JobSet) is, and why; ``UsageError`` if there is none."""
        return self.backend.status(run)

    def list(self) -> list[RunSummary]:
        """The runs (in the namespace, or in the local state folder), newest first."""
        return self.backend.list()

    def wait(self, run: str, *, timeout: float | None = None, interval: float = 2.0,
             on_change: Callable[[RunStatus], None] | None = None) -> RunStatus:
        """Poll until the run finishes and return its final status (whether it succeeded or failed: look at
        ``state``). On a cluster it outlives API-server restarts; an API server that does not answer for
        ``cluster_timeout`` seconds in a row (a setting, 2 minutes by default) raises ``ClusterUnreachable``,
        however long the run itself takes. ``on_change`` sees each new sentence. Raises ``WaitTimeout`` after
        ``timeout`` seconds, ``RunFailed`` if the Job disappears."""
        check_seconds("timeout", timeout, "--timeout")
        check_seconds("interval", interval, "--interval")
        return self.backend.wait(run, timeout=timeout, interval=interval, on_change=on_change)

    def logs(self, run: str, *, follow: bool = False, tail: int | None = None, poll: float = 1.0,
             rank: int | None = None) -> LogStream:
        """The trainer's log lines: on a cluster pod after pod (retries included), locally the job's log file.

        With ``follow``: until the run ends (on a cluster: wait for each pod to start, reconnect without
        repeating lines when the API server goes away); ``outcome`` is then the final status. A multi-node run's
        pods are its node ranks: ``rank`` picks one (default 0, the rank that publishes)."""
        if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 0):
            raise UsageError(f"tail must be a number of lines, 0 or more; got {tail!r}",
                             hint="pass --tail N with N >= 0, or leave it out for the whole log")
        return self.backend.logs(run, follow=follow, tail=tail, poll=poll, rank=rank)

    def cancel(self, run: str, *, wait: bool = True, timeout: float = 120) -> Cancelled:
        """Stop a run. On a cluster: delete its Job (or JobSet: its Jobs and headless Service with it), its pods
        and its spec ConfigMap. Locally: SIGTERM to its process group (it checkpoints and exits 75). With
        ``wait``, until it is gone (``WaitTimeout`` after ``timeout`` seconds)."""
        if wait:  # before anything is deleted: a bad flag must not cost the run
            check_seconds("timeout", timeout, "--timeout")
        return self.backend.cancel(run, wait=wait, timeout=timeout)

    # ------------------------------------------------------------------ published versions
    def _output_of(self, run: str, output: str | None) -> tuple[str, str]:
        """(run name, output prefix) from ``output``, else from the run (its Job, or its local state)."""
        if output is None:
            return self.backend.output_of(run)
        from jobs.spec import check_uri

        try:
            return run, check_uri(output, "--output")
        except ValueError as err:  # a near-miss like s3:/bucket would be read as a local folder
            raise UsageError(f"--output: {err}", hint="give s3://bucket/prefix or a local folder") from None

    @property
    def _s3_endpoint(self) -> str | None:
        """The settings' S3 endpoint, passed to each store explicitly (the environment's AWS_ENDPOINT_URL wins
        there); never written into ``os.environ``, which would change every later S3 call of the process."""
        return (self._backend.settings if self._backend is not None else self.offline_settings).s3_endpoint

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

    def promote(self, run: str, *, version: str | None = None, output: str | None = None,
                spec: SpecLike | None = None, force: bool = False):
        """Make a complete version (default: the newest) the run's champion if it passes the gate against the
        current one: the same held-out set, no metric significantly worse (paired bootstrap intervals), the
        primary metric not worse (docs/promotion.md). Returns a ``jobs.promotion.PromotionResult`` (``promoted``
        False with the ``reasons`` when the gate fails: the version stays published). ``force``: promote anyway,
        recorded as forced. ``spec``: take the gate settings (``promotion:``) and, for its own run, the output
        prefix from it. Raises ``GateRefused`` (different held-out sets), ``PromotionConflict`` (another promotion
        won the race) or ``StorageError``."""
        from jobs.promotion import promote
        from jobs.storage import join, open_store

        settings = None
        if spec is not None:
            s = self.load_spec(spec)
            settings = s.promotion
            if output is None and s.name == run:
                output = s.output
        if version is not None and not (version.isdigit() or (version[:1] == "v" and version[1:].isdigit())):
            raise UsageError(f"{version!r} is not a version", hint="name one as vN (or N): launcher promote RUN:v3")
        run_name, output = self._output_of(run, output)
        store, base = open_store(output, endpoint=self._s3_endpoint)
        return promote(store, join(base, run_name), version, settings=settings, force=force)

    def champion(self, run: str, *, output: str | None = None) -> dict | None:
        """The run's champion pointer (version, manifest_sha256, promoted_at, by, forced, gate), or None."""
        from launcher import artifacts as art

        run_name, output = self._output_of(run, output)
        return art.champion_of(f"{output.rstrip('/')}/{run_name}", endpoint=self._s3_endpoint)

    def serving_manifests(self, run: str, version: str | None = None, *, engine: str = "kserve", gpus: int = 1,
                          serve_as: str | None = None, name: str | None = None, vllm_image: str | None = None,
                          output: str | None = None):
        """The manifests that serve a complete version (default: latest) of ``run``: a KServe
        ``LLMInferenceService`` (``engine="kserve"``) or a vLLM Deployment and Service (``"vllm"``), as a
        ``launcher.serving.ServingManifests``. The adapter is served as a LoRA on its base where vLLM's verdict
        (metadata.json ``serving``) allows, else the merged model (``serve_as`` forces one). Reads only the
        version's manifest and metadata from the store; ``output`` (the spec's output prefix) is needed once the Job
        is gone. ``UsageError``/``StorageError`` say what is missing and what to do."""
        from launcher import serving

        serving.check_options(engine, gpus, serve_as)
        run_name, output = self._output_of(run, output)
        v = serving.read_version(output, run_name, version, endpoint=self._s3_endpoint)
        settings = self._backend.settings if self._backend is not None else self.offline_settings
        return serving.render(v, settings, engine=engine, gpus=gpus, serve_as=serve_as, name=name,
                              image=vllm_image)
