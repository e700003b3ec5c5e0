"""The Kubernetes backend: a run is a Job (or a JobSet) in one namespace, found by its labels.

It holds the cluster's half of the verbs (submit, status, list, wait, logs, cancel) over the thin adaptor
:mod:`launcher.kube` (the only module that imports the ``kubernetes`` client), with :mod:`launcher.submit`
(preflight, idempotent create of what :func:`launcher.render.render_run` renders) and :mod:`launcher.diagnose`
(Job, pods, events → one sentence). Unit tests give it their own adaptor (``kube=``): one that implements
:class:`launcher.kube.ClusterReader` for the verbs that follow a run.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from jobs.retry import RetryPolicy
from launcher.backends import poll_until_finished
from launcher.errors import RunFailed, UsageError, WaitTimeout
from launcher.results import Attempts, Cancelled, LogStream, RunStatus, RunSummary, cost_of

LABEL_APP_SELECTOR = "app.kubernetes.io/name=lora-jobs"
#: The wait before reading a pod's log again after the n-th failed read.
LOG_READ_RETRY = RetryPolicy(base_delay=1.0, max_delay=10.0)
POD_JOB_LABEL = "batch.kubernetes.io/job-name"


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


class KubernetesBackend:
    """The verbs against one namespace of one cluster. ``offline`` are the settings without the cluster
    (flags, ``LAUNCHER_*``, the config file); the namespace's ``lora-jobs-launcher`` ConfigMap is read on the
    first verb that needs the cluster (``overrides``: the flags, which win over it). ``kube`` and ``settings``
    replace the connection (tests). Nothing connects until a verb needs the cluster."""

    name = "kubernetes"

    def __init__(self, offline: Any, *, note: Callable[[str], None], overrides: dict | None = None,
                 kube: Any = None, settings: Any = None):
        self.offline = offline
        self._note = note
        self._overrides = overrides or {}
        self._kube = kube
        self._settings = settings

    @property
    def settings(self) -> Any:
        """The settings known so far: the cluster's once connected, else the offline ones (no connection)."""
        return self._settings or self.offline

    @property
    def where(self) -> str:
        return f"namespace {self.settings.namespace}"

    def connect(self) -> tuple[Any, Any]:
        """(settings including the namespace's ConfigMap, the kube adaptor); connects once."""
        if self._kube is None or self._settings is None:
            from launcher.kube import Kube
            from launcher.settings import load_settings

            kube = self._kube or Kube.from_settings(self.offline)
            settings = self._settings or load_settings(kube, **self._overrides)
            kube.namespace = settings.namespace
            self._kube, self._settings = kube, settings
        return self._settings, self._kube

    def _outage(self):
        """A :class:`launcher.kube.Outage` for one verb: API-server failures in a row are retried, with progress
        notes, for up to the ``cluster_timeout`` setting, then stop with ``ClusterUnreachable``."""
        from launcher.kube import Outage

        return Outage(self.offline.cluster_timeout, self._note)

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
        return kube.job_workload(job)

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

    def submit(self, spec: Any, *, base_dir: Path, server_dry_run: bool = False, skip_preflight: bool = False,
               workdir: Path | None = None):
        """Preflight-check and create the run (the same spec twice is the same run: ``created`` False).
        With ``server_dry_run`` the API server admits it but nothing is created. Returns a
        ``launcher.submit.SubmitResult``; raises ``PreflightError`` listing every failed check."""
        from launcher.submit import submit as submit_run

        if workdir is not None:
            raise UsageError("--workdir is the working folder of a local run; a pod has its own (/scratch)",
                             hint="leave out --workdir, or run it here: launcher submit SPEC --local")
        settings, kube = self.connect()
        return submit_run(kube, spec, settings, server_dry_run=server_dry_run, skip_preflight=skip_preflight)

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
        st.cost = cost_of(st.progress, snap.pods, snap.workload["metadata"].get("creationTimestamp"), settings)
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
            cost = cost_of(p, by_run.get(j["metadata"]["name"], []), j["metadata"].get("creationTimestamp"), settings)
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

        started = time.monotonic()
        outage = self._outage()
        job = self._job_of(run, outlive_outages=True, timeout=timeout, outage=outage)
        if timeout is not None:
            timeout = max(1.0, timeout - (time.monotonic() - started))
        settings, kube = self.connect()
        name = job["metadata"]["name"]
        deadline = time.monotonic() + timeout if timeout else None

        def read() -> RunStatus:
            snap = with_retries(lambda: self._snapshot(kube, job), deadline=deadline, outage=outage)
            if snap.workload is None:
                raise RunFailed(f"job {name} no longer exists (cancelled, or deleted after its TTL)")
            diag = snap.diagnose(gpu_resource=settings.gpu_resource, workload=self._workload(kube, snap.workload),
                                 nodes=self._nodes(kube, snap.pods))
            return snap.status(diag, kube.namespace)

        def timed_out(st: RunStatus) -> WaitTimeout:
            return WaitTimeout(f"job {name} is still {st.state.lower()} after {timeout:g} s: {st.sentence}",
                               hint="wait again with a longer --timeout")

        return poll_until_finished(read, deadline=deadline, interval=interval, on_change=on_change,
                                   timed_out=timed_out)

    def logs(self, run: str, *, follow: bool = False, tail: int | None = None, poll: float = 1.0,
             rank: int | None = None) -> LogStream:
        """The trainer's log lines, pod after pod (retries included).

        With ``follow``: wait for each pod to start, stream until the run ends, reconnect (without repeating
        lines) when the API server goes away; ``outcome`` is then the final status. A container whose current
        log cannot be read falls back to its previous instance; one that cannot be read at all is noted.
        A multi-node run's pods are its node ranks: ``rank`` picks one (default 0, the rank that publishes)."""
        from launcher.render import job_spec_of

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
                    time.sleep(LOG_READ_RETRY.delay(errors[name]))
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

    def output_of(self, run: str) -> tuple[str, str]:
        """(run name, the spec's output prefix) of the run, from its Job's labels and annotation."""
        from launcher.render import ANNOTATION_OUTPUT, LABEL_RUN

        _, kube = self.connect()
        meta = self._resolve(kube, run)["metadata"]
        prefix = (meta.get("annotations") or {}).get(ANNOTATION_OUTPUT)
        if not prefix:
            raise UsageError(f"job {meta['name']} does not say where its output goes", hint="pass --output PREFIX")
        return (meta.get("labels") or {}).get(LABEL_RUN, run), prefix.rsplit("/", 1)[0]
