"""Job + pods + events -> one sentence saying where a run is and why. Pure.

Inputs are plain dicts shaped like the API's JSON (what
``ApiClient.sanitize_for_serialization`` or a raw GET returns), so every case is a
unit test with a realistic dict and no cluster.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.errors import describe_exit_code

CONTAINER = "trainer"

#: States, in the order a run normally passes through them.
QUEUED, PENDING, RUNNING, SUCCEEDED, FAILED, DELETING = (
    "Queued", "Pending", "Running", "Succeeded", "Failed", "Deleting")
FINISHED = (SUCCEEDED, FAILED)

_IMAGE_ERRORS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                 "RegistryUnavailable"}
_CONFIG_ERRORS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


@dataclass
class Diagnosis:
    """``state`` is one of Queued, Pending, Running, Succeeded, Failed, Deleting.

    ``blocked`` marks a pending run that will not start by itself (bad image, missing Secret, quota).
    """

    state: str
    sentence: str
    details: list[str] = field(default_factory=list)
    exit_code: int | None = None
    blocked: bool = False

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- small readers

def _meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


def _status(obj: dict) -> dict:
    return obj.get("status") or {}


def _true_conditions(obj: dict) -> dict[str, dict]:
    return {c.get("type"): c for c in _status(obj).get("conditions") or [] if str(c.get("status")) == "True"}


def _condition(obj: dict, ctype: str) -> dict | None:
    for c in _status(obj).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None


def _created(obj: dict) -> str:
    return str(_meta(obj).get("creationTimestamp") or "")


def trainer_status(pod: dict) -> dict | None:
    statuses = _status(pod).get("containerStatuses") or []
    for s in statuses:
        if s.get("name") == CONTAINER:
            return s
    return statuses[0] if statuses else None


def _terminated(pod: dict) -> dict | None:
    s = trainer_status(pod)
    if not s:
        return None
    return (s.get("state") or {}).get("terminated") or (s.get("lastState") or {}).get("terminated")


def parse_termination_message(message: str | None) -> dict[str, Any]:
    """The job's one-line JSON (exit_code, reason, message, stage), or the log tail's last line."""
    if not message or not message.strip():
        return {}
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        ln = ln.strip()
        if ln.startswith("{"):
            try:
                data = json.loads(ln)
            except ValueError:
                continue
            if isinstance(data, dict):
                return data
    return {"message": lines[-1].strip()[:500]}


@dataclass
class Attempt:
    """One pod of the Job, reduced to what a user cares about."""

    pod: str
    phase: str
    node: str | None
    exit_code: int | None
    reason: str | None  # why it ended or waits
    message: str | None
    stage: str | None
    evicted: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attempt_of(pod: dict) -> Attempt:
    st = _status(pod)
    term = _terminated(pod)
    disruption = _condition(pod, "DisruptionTarget")
    evicted = bool(disruption and str(disruption.get("status")) == "True") or st.get("reason") == "Evicted"
    exit_code = reason = message = stage = None
    if term:
        exit_code = term.get("exitCode")
        reason = term.get("reason")
        tm = parse_termination_message(term.get("message"))
        message = tm.get("message")
        stage = tm.get("stage")
        if isinstance(tm.get("exit_code"), int) and exit_code is None:
            exit_code = tm["exit_code"]
    else:
        s = trainer_status(pod) or {}
        waiting = (s.get("state") or {}).get("waiting")
        if waiting:
            reason, message = waiting.get("reason"), waiting.get("message")
        sched = _condition(pod, "PodScheduled")
        if sched and str(sched.get("status")) == "False":
            reason, message = sched.get("reason") or "Unschedulable", sched.get("message")
    if reason == "OOMKilled" and not (term and "exit_code" in parse_termination_message(term.get("message"))):
        # The kernel killed it: no message of the job's own, only the log's last line (FallbackToLogsOnError).
        limit = ((next((c for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == CONTAINER),
                       {}).get("resources") or {}).get("limits") or {}).get("memory")
        message = f"it used more memory than its limit of {limit}" if limit else "it used more memory than its limit"
    if evicted:
        reason = (disruption or {}).get("reason") or st.get("reason") or "Evicted"
        message = (disruption or {}).get("message") or st.get("message") or message
    return Attempt(pod=_meta(pod).get("name", "?"), phase=st.get("phase") or "Unknown",
                   node=(pod.get("spec") or {}).get("nodeName"), exit_code=exit_code, reason=reason,
                   message=message, stage=stage, evicted=evicted)


def _explain_exit(a: Attempt) -> str:
    if a.reason == "OOMKilled":
        return (f"the kernel killed the trainer because {a.message or 'it used more memory than its limit'} "
                f"(OOMKilled, exit code {a.exit_code if a.exit_code is not None else 137}) — raise resources.memory, "
                "or lower training.max_seq_length or per_device_batch_size")
    if a.exit_code is None:
        return a.message or a.reason or "failed"
    text = describe_exit_code(a.exit_code)
    if a.message:
        text += f": {a.message}"
    where = f"stage {a.stage}, " if a.stage else ""
    return f"{text} ({where}exit code {a.exit_code})"


def _short_scheduler_message(msg: str) -> str:
    msg = msg.split(" preemption:", 1)[0].strip()
    msg = re.sub(r"\s*no new claims to deallocate,?", "", msg).strip()
    return msg.rstrip(".,") or msg


def _event_time(e: dict) -> str:
    return str(e.get("lastTimestamp") or e.get("eventTime") or _meta(e).get("creationTimestamp") or "")


# ----------------------------------------------------------------------------- the decision

def _node_trouble(node: dict | None) -> str | None:
    """Why a node is not Ready (its kubelet stopped reporting, or says it is not ready), or None."""
    if not node:
        return None
    ready = _condition(node, "Ready")
    if ready is None or str(ready.get("status")) == "True":
        return None
    since = ready.get("lastTransitionTime")
    why = (ready.get("message") or ready.get("reason") or "not ready").rstrip(".")
    return f"{why}" + (f" (since {since})" if since else "")


def diagnose(job: dict, pods: list[dict], events: list[dict], *, gpu_resource: str = "nvidia.com/gpu",
             workload: dict | None = None, nodes: dict[str, dict] | None = None) -> Diagnosis:
    """Where the run is, in one sentence, plus details and the trainer's exit code when it ended. ``workload``:
    Kueue's Workload of a suspended queued Job, when it could be read (why it waits, whether it was preempted).
    ``nodes``: the running pods' nodes by name, when they could be read (a node that stopped reporting)."""
    name = _meta(job).get("name", "?")
    spec = job.get("spec") or {}
    st = _status(job)
    conds = _true_conditions(job)
    pods = sorted(pods, key=lambda p: (_created(p), _meta(p).get("name", "")))
    attempts = [attempt_of(p) for p in pods]
    failed = [a for a in attempts if a.phase == "Failed"]
    evicted = [a for a in failed if a.evicted]
    counted = [a for a in failed if not a.evicted]
    backoff = spec.get("backoffLimit")

    details = [f"job {name}: active {st.get('active', 0)}, succeeded {st.get('succeeded', 0)}, "
               f"failed {st.get('failed', 0)}" + (f" (retries allowed: {backoff})" if backoff is not None else "")]
    for a in failed:
        if a.evicted:
            details.append(f"pod {a.pod} was evicted ({a.reason}): not counted against retries"
                           + (f" — {a.message}" if a.message else ""))
        else:
            details.append(f"pod {a.pod} failed: {_explain_exit(a)}")

    warnings = sorted((e for e in events if e.get("type") == "Warning"), key=_event_time)
    for e in warnings[-5:]:
        obj = e.get("involvedObject") or {}
        details.append(f"event {e.get('reason')} on {obj.get('kind', '?')} {obj.get('name', '?')}: "
                       f"{(e.get('message') or '').strip()}")

    if _meta(job).get("deletionTimestamp"):
        return Diagnosis(DELETING, "being deleted (cancelled)", details)

    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        done = [a for a in attempts if a.phase == "Succeeded"]
        return Diagnosis(SUCCEEDED, "succeeded" + (f" (pod {done[-1].pod})" if done else ""), details, exit_code=0)

    fail_cond = conds.get("Failed") or conds.get("FailureTarget")
    if fail_cond:
        return _failed(fail_cond, counted, evicted, spec, details)

    if "Suspended" in conds:
        queue = (_meta(job).get("labels") or {}).get("kueue.x-k8s.io/queue-name")
        where = f"Kueue queue {queue}" if queue else "its queue (the Job is suspended)"
        return Diagnosis(QUEUED, f"queued: waiting for {where} to admit it{_kueue_says(workload, details)}", details)

    live = [(p, a) for p, a in zip(pods, attempts) if a.phase in ("Pending", "Running", "Unknown")
            and not _meta(p).get("deletionTimestamp")]
    retry_note = ""
    if counted:
        retry_note = f" (attempt {len(counted) + 1}; the last one {_explain_exit(counted[-1])})"
    elif evicted:
        retry_note = f" (replacing evicted pod {evicted[-1].pod})"

    if not live:
        if attempts and attempts[-1].phase == "Succeeded":
            # The newest pod's trainer exited 0; the Job controller marks the Job Complete within seconds.
            return Diagnosis(RUNNING, f"finishing: pod {attempts[-1].pod} succeeded, the Job is being marked "
                             "complete", details)
        failed_create = [e for e in warnings if e.get("reason") == "FailedCreate"]
        if failed_create:
            msg = (failed_create[-1].get("message") or "").strip()
            fix = " — raise the ResourceQuota or lower resources" if "quota" in msg else ""
            return Diagnosis(PENDING, f"cannot create the pod: {msg}{fix}", details, blocked=True)
        return Diagnosis(PENDING, "waiting for the Job controller to create a pod" + retry_note, details)

    def one(pod: dict, a: Attempt) -> Diagnosis:
        if a.phase == "Running":
            node = f" on {a.node}" if a.node else ""
            trouble = _node_trouble((nodes or {}).get(a.node or ""))
            if trouble:
                details.append(f"node {a.node}: {trouble}")
                return Diagnosis(RUNNING, f"running{node}, but node {a.node} is not Ready: {trouble} — the pod "
                                 "keeps its place while the node comes back; if it stays away, Kubernetes evicts "
                                 "the pod (5 min by default) and the run retries from its newest checkpoint"
                                 + retry_note, details)
            return Diagnosis(RUNNING, f"running{node}" + retry_note, details)

        # Pending: not scheduled, or scheduled but the container cannot start.
        sched = _condition(pod, "PodScheduled")
        if sched and str(sched.get("status")) == "False":
            msg = _short_scheduler_message(sched.get("message") or sched.get("reason") or "unschedulable")
            details.append(f"scheduler: {sched.get('message')}")
            if f"Insufficient {gpu_resource}" in msg or re.search(r"Insufficient \S*gpu", msg):
                return Diagnosis(PENDING, f"waiting for GPUs: {msg}" + retry_note, details)
            return Diagnosis(PENDING, f"waiting for a node: {msg}" + retry_note, details)
        if a.reason in _IMAGE_ERRORS:
            image = ((pod.get("spec") or {}).get("containers") or [{}])[0].get("image", "?")
            return Diagnosis(PENDING, f"cannot pull the trainer image {image} ({a.reason}): {a.message or ''}".rstrip(": ")
                             + " — check the image name and tag (LAUNCHER_IMAGE) and the registry credentials",
                             details, blocked=True)
        if a.reason in _CONFIG_ERRORS:
            msg = a.message or a.reason
            fix = ""
            if "secret" in msg.lower():
                fix = " — create the S3 credentials Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            return Diagnosis(PENDING, f"cannot start the container: {msg}{fix}", details, blocked=True)
        if a.reason == "ContainerCreating" or (sched and str(sched.get("status")) == "True"):
            mount = [e for e in warnings if e.get("reason") == "FailedMount"
                     and (e.get("involvedObject") or {}).get("name") == a.pod]
            if mount:
                return Diagnosis(PENDING, f"cannot mount a volume: {(mount[-1].get('message') or '').strip()}",
                                 details, blocked=True)
            node = f" on {a.node}" if a.node else ""
            return Diagnosis(PENDING, f"starting{node}" + retry_note, details)
        return Diagnosis(PENDING, "waiting to be scheduled" + retry_note, details)

    total = int(spec.get("completions") or 1)
    if spec.get("completionMode") != "Indexed" or total <= 1:
        pod, a = live[-1]
        return one(pod, a)
    # A multi-node run: one pod per completion index (node rank); the newest of each index counts.
    by_index: dict[int, tuple[dict, Attempt]] = {}
    for p, att in live:
        idx = (_meta(p).get("annotations") or {}).get("batch.kubernetes.io/job-completion-index")
        if idx is not None and str(idx).isdigit():
            by_index[int(idx)] = (p, att)
    waiting = [(i, *by_index[i]) for i in sorted(by_index) if by_index[i][1].phase != "Running"]
    if not waiting:
        missing = [i for i in range(total) if i not in by_index]
        if not missing:
            nodes = sorted({att.node for _, att in by_index.values() if att.node})
            return Diagnosis(RUNNING, f"running: {total} pods on {', '.join(nodes) or 'their nodes'}" + retry_note,
                             details)
        return Diagnosis(PENDING, f"pod {missing[0]} of {total}: waiting for the Job controller to create it"
                         + retry_note, details)
    i, pod, a = waiting[0]
    d = one(pod, a)
    d.sentence = f"pod {i} of {total} is {a.phase}: {d.sentence}"
    return d


def _kueue_says(workload: dict | None, details: list[str]) -> str:
    """What Kueue's Workload adds to "queued": why it is not admitted, and a preemption (which suspends the Job:
    the Job controller deletes its pods without counting a failure, so it costs no retry)."""
    if not workload:
        return ""
    conds = {c.get("type"): c for c in _status(workload).get("conditions") or []}
    tail = ""
    reserved = conds.get("QuotaReserved") or {}
    if str(reserved.get("status")) == "False" and reserved.get("message"):
        tail += f": {reserved['message'].rstrip('.')}"
    evicted = conds.get("Evicted") or {}
    if str(evicted.get("status")) == "True":  # until Kueue admits it again
        what = "preempted by Kueue" if evicted.get("reason") == "Preempted" else f"evicted by Kueue ({evicted.get('reason')})"
        tail += f" ({what}: {(evicted.get('message') or '').rstrip('.')}; not counted against retries)"
    details.append(f"Kueue workload {_meta(workload).get('name', '?')}: " + "; ".join(
        f"{t} {c.get('status')} ({c.get('reason')}): {c.get('message')}" for t, c in conds.items()))
    return tail


def _failed(cond: dict, counted: list[Attempt], evicted: list[Attempt], spec: dict,
            details: list[str]) -> Diagnosis:
    reason = cond.get("reason") or ""
    message = cond.get("message") or ""
    last = counted[-1] if counted else None
    if reason == "PodFailurePolicy":
        m = re.search(r"for pod \S+?/(\S+) failed with exit code (\d+)", message)
        if m:
            match = [a for a in counted if a.pod == m.group(1)]
            last = match[-1] if match else last
            if last is not None and last.exit_code is None:
                last.exit_code = int(m.group(2))
            elif last is None:
                code = int(m.group(2))
                return Diagnosis(FAILED, f"failed: {describe_exit_code(code)} (exit code {code})",
                                 details, exit_code=code)
        text = _explain_exit(last) if last else message
        return Diagnosis(FAILED, f"failed: {text}", details, exit_code=last.exit_code if last else None)
    if reason == "BackoffLimitExceeded":
        n = len(counted)
        tail = f"; the last one {_explain_exit(last)}" if last else ""
        return Diagnosis(FAILED, f"failed after {n} attempt{'s' if n != 1 else ''}{tail}", details,
                         exit_code=last.exit_code if last else None)
    if reason == "DeadlineExceeded":
        secs = spec.get("activeDeadlineSeconds")
        limit = f" of {secs / 3600:g} h" if secs else ""
        return Diagnosis(FAILED, f"failed: ran past its time limit{limit} — raise resources.timeout_hours "
                                 "or shorten the run", details, exit_code=last.exit_code if last else None)
    text = message or reason or "failed"
    return Diagnosis(FAILED, f"failed: {text}", details, exit_code=last.exit_code if last else None)


# ----------------------------------------------------------------------------- JobSet runs

#: JobSet's label on its child Jobs and their pods: the whole-run restart they belong to.
RESTART_LABEL = "jobset.sigs.k8s.io/restart-attempt"


def diagnose_run(run: dict, pods: list[dict], events: list[dict], *, jobs: list[dict] = (),
                 **kw: Any) -> Diagnosis:
    """:func:`diagnose` of a Job, or :func:`diagnose_jobset` of a JobSet and its child ``jobs``."""
    if run.get("kind") == "JobSet":
        return diagnose_jobset(run, list(jobs), pods, events, **kw)
    return diagnose(run, pods, events, **kw)


def current_attempt(jobset: dict, jobs: list[dict], pods: list[dict]) -> tuple[dict | None, list[dict]]:
    """The child Job of a JobSet's current attempt (its ``status.restarts``), or None before JobSet made it, and
    that attempt's pods."""
    attempt = str(_status(jobset).get("restarts") or 0)
    mine = [j for j in jobs if (_meta(j).get("labels") or {}).get(RESTART_LABEL) == attempt]
    job = max(mine, key=_created) if mine else None
    return job, [p for p in pods if (_meta(p).get("labels") or {}).get(RESTART_LABEL) == attempt]


def diagnose_jobset(jobset: dict, jobs: list[dict], pods: list[dict], events: list[dict], *,
                    gpu_resource: str = "nvidia.com/gpu", workload: dict | None = None,
                    nodes: dict[str, dict] | None = None) -> Diagnosis:
    """A multi-node run rendered as a JobSet (launcher/render.py): the JobSet's own conditions first (done,
    failed, queued), then its current attempt, read as :func:`diagnose` reads an Indexed Job. Each whole-run
    restart (status.restarts; those of disruptions are not counted against maxRestarts) is named, since the
    restart deletes the failed attempt's pods and with them its exit codes."""
    name = _meta(jobset).get("name", "?")
    st = _status(jobset)
    conds = _true_conditions(jobset)
    allowed = ((jobset.get("spec") or {}).get("failurePolicy") or {}).get("maxRestarts", 0)
    restarts, counted = int(st.get("restarts") or 0), int(st.get("restartsCountTowardsMax") or 0)
    job, attempt_pods = current_attempt(jobset, jobs, pods)

    free = restarts - counted
    details = [f"jobset {name}: restart {restarts}, {counted} counted of the {allowed} allowed"
               + (f", {free} after disruptions (not counted)" if free else "")]
    restarting = _condition(jobset, "Restarting")
    if restarting and restarting.get("message"):
        details.append(f"jobset {name}: last restart: {restarting.get('reason')}: {restarting['message']}")
    note = ""
    if restarts:
        note = (f" (restart {restarts} of the whole run; {counted} of {allowed} allowed used"
                + (f", {free} after disruptions, not counted" if free else "") + ")")

    def inner() -> Diagnosis | None:
        if job is None:
            return None
        d = diagnose(job, attempt_pods, events, gpu_resource=gpu_resource, nodes=nodes)
        d.details = details + d.details[1:]  # the child Job's own line says "retries allowed: 0"
        return d

    def why(d: Diagnosis) -> str:
        """What ended the attempt: with backoffLimit 0 its one counted pod failure; else (a podFailurePolicy
        rule, the time limit) the child Job's own sentence."""
        failed = [a for a in (attempt_of(p) for p in sorted(attempt_pods, key=_created))
                  if a.phase == "Failed" and not a.evicted]
        if (_true_conditions(job).get("Failed") or {}).get("reason") == "BackoffLimitExceeded" and failed:
            return f"pod {failed[0].pod} {_explain_exit(failed[0])}"
        return d.sentence.removeprefix("failed: ")

    if _meta(jobset).get("deletionTimestamp"):
        return Diagnosis(DELETING, "being deleted (cancelled)", details)
    if "Completed" in conds:
        d = inner()
        return Diagnosis(SUCCEEDED, (d.sentence if d and d.state == SUCCEEDED else "succeeded") + note,
                         d.details if d else details, exit_code=0)
    if "Failed" in conds:
        failed = conds["Failed"]
        d = inner()
        reason = why(d) if d and d.state == FAILED else (failed.get("message") or "")
        if failed.get("reason") == "ReachedMaxRestarts":
            sentence = f"failed after {restarts + 1} attempts of the whole run ({counted} counted restarts of " \
                       f"{allowed} allowed); the last one: {reason}"
        else:
            sentence = f"failed: {reason}" + note
        return Diagnosis(FAILED, sentence, d.details if d else details, exit_code=d.exit_code if d else None)
    if (jobset.get("spec") or {}).get("suspend"):
        queue = (_meta(jobset).get("labels") or {}).get("kueue.x-k8s.io/queue-name")
        where = f"Kueue queue {queue}" if queue else "its queue (the JobSet is suspended)"
        return Diagnosis(QUEUED, f"queued: waiting for {where} to admit it{_kueue_says(workload, details)}"
                         + note, details)
    d = inner()
    if d is None:
        refused = [e for e in events if e.get("reason") in ("JobCreationFailed", "HeadlessServiceCreationFailed")
                   and (e.get("involvedObject") or {}).get("name") == name]
        if refused:  # its webhooks, a quota or RBAC said no: nothing starts by itself
            msg = (sorted(refused, key=_event_time)[-1].get("message") or "").strip()
            return Diagnosis(PENDING, f"the JobSet controller cannot create the run's Job or Service: {msg}",
                             details, blocked=True)
        old = [p for p in pods if p not in attempt_pods]
        if old:
            return Diagnosis(PENDING, f"restarting every pod: waiting for the {len(old)} pods of the last attempt "
                             f"to go{note}", details)
        return Diagnosis(PENDING, "waiting for the JobSet controller to create the run's Job" + note, details)
    if d.state == FAILED:  # until the JobSet controller applies its failurePolicy
        return Diagnosis(PENDING, f"attempt {restarts + 1} failed ({why(d)}); the JobSet controller restarts every "
                         "pod or ends the run" + note, d.details, exit_code=d.exit_code)
    if d.state == SUCCEEDED:  # the child Job is done, the JobSet is marked Completed within seconds
        d.state, d.sentence = RUNNING, "finishing: the run's Job succeeded, the JobSet is being marked complete"
    d.sentence += note
    return d
