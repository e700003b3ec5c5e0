"""Preflight checks and idempotent creation of a run: exactly the objects :func:`launcher.render.render_run`
returns (ConfigMap, then Job or JobSet, then the ownerReferences and an Indexed Job's headless Service).

The Job (JobSet) name is derived from the spec hash, so the API server's name uniqueness
is our lock: two processes submitting the same spec race on ``create``, one gets
409 AlreadyExists and reports "already submitted".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from jobs.spec import TrainingRunSpec
from launcher import render
from launcher.errors import AlreadyExists, Forbidden, Invalid, NotFound, PreflightError, SubmitConflict
from launcher.kube import Kube, parse_quantity
from launcher.settings import LauncherSettings


@dataclass
class SubmitResult:
    job_name: str
    created: bool  # False: the same spec was already submitted
    job: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def kind(self) -> str:
        """What the run is on the cluster: ``job`` or ``jobset``."""
        return "jobset" if render.is_jobset(self.job) else "job"

    @property
    def message(self) -> str:
        if self.dry_run:
            return f"server-side dry-run passed: {self.kind} {self.job_name} would be created"
        return f"{'submitted' if self.created else 'already submitted'}: {self.kind} {self.job_name}"

    def to_dict(self) -> dict[str, Any]:
        """What ``submit -o json|yaml`` prints: the names to follow the run by, not the whole object."""
        meta = self.job.get("metadata") or {}
        labels = meta.get("labels") or {}
        return {"run": labels.get(render.LABEL_RUN), "job": self.job_name, "kind": self.kind,
                "namespace": meta.get("namespace"), "spec_hash": labels.get(render.LABEL_HASH),
                "created": self.created, "server_dry_run": self.dry_run, "message": self.message,
                "warnings": list(self.warnings)}


# ------------------------------------------------------------------------------ node fit (pure)

def _tolerates(taint: dict, tolerations: list[dict]) -> bool:
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        op = t.get("operator", "Equal")
        if not t.get("key") and op == "Exists":
            return True
        if t.get("key") != taint.get("key"):
            continue
        if op == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def node_fit_problem(node: dict, pod_spec: dict, requests: dict[str, Any]) -> str | None:
    """Why ``node`` can never run the pod (ignoring what already runs there), or None if it could."""
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    labels = meta.get("labels") or {}
    for k, v in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return f"lacks label {k}={v}"
    for taint in spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(taint, pod_spec.get("tolerations") or []):
            return f"has taint {taint.get('key')}={taint.get('value', '')}:{taint.get('effect')} the run does not tolerate"
    alloc = status.get("allocatable") or {}
    for res, want in requests.items():
        have = parse_quantity(alloc.get(res, 0))
        if have < parse_quantity(want):
            return f"has {alloc.get(res, 0)} {res} allocatable, the run asks for {want}"
    return None


def fit_failure(nodes: list[dict], job: dict, gpu_resource: str) -> str | None:
    """A sentence when no node can ever fit the pod (of a Job or a JobSet), else None."""
    job_spec = render.job_spec_of(job)
    pod_spec = job_spec["template"]["spec"]
    res = pod_spec["containers"][0].get("resources") or {}
    requests = dict(res.get("requests") or {})
    for k, v in (res.get("limits") or {}).items():
        requests.setdefault(k, v)
    if not nodes:
        return "the cluster has no nodes — add nodes (or check that you may list them)"
    reasons = []
    want = int(job_spec.get("completions") or 1)  # the pods of a multi-node run
    per_pod = parse_quantity(requests.get(gpu_resource, 0))
    room = 0  # how many of the run's pods the cluster could ever hold at once (GPUs are the scarce part)
    for node in nodes:
        why = node_fit_problem(node, pod_spec, requests)
        if why is None:
            alloc = parse_quantity(((node.get("status") or {}).get("allocatable") or {}).get(gpu_resource, 0))
            room += int(alloc // per_pod) if per_pod else want
            if room >= want:
                return None
            continue
        reasons.append(f"{(node.get('metadata') or {}).get('name', '?')} {why}")
    if room:
        return (f"the run's {want} pods (resources.nodes) need {int(per_pod)} {gpu_resource} each, and the "
                f"cluster's nodes can ever hold only {room} such pods at once — lower resources.nodes to {room} "
                "or add GPU nodes")
    gpus = requests.get(gpu_resource)
    best = max((parse_quantity(((n.get("status") or {}).get("allocatable") or {}).get(gpu_resource, 0))
                for n in nodes), default=0)
    if gpus and best < parse_quantity(gpus):
        fix = (f"lower resources.gpus to {int(best)} or add a node with more {gpu_resource}" if best
               else f"add GPU nodes that advertise {gpu_resource} (is the device plugin running?) "
                    "or set resources.gpus: 0")
        head = f"no node can ever fit {gpus} {gpu_resource} (the most any node has is {int(best)})"
    else:
        head = "no node can ever run this pod"
        fix = "adjust resources, LAUNCHER_NODE_SELECTOR / LAUNCHER_TOLERATIONS, or the nodes"
    return f"{head}: {'; '.join(reasons)} — {fix}"


def local_path_problems(spec: TrainingRunSpec) -> list[str]:
    """Paths a pod cannot read: the cluster only sees object storage (and hf: when it can reach a hub). Each
    sentence starts with the field it is about and puts the fix after ' — ' (``Client.validate`` splits it so)."""
    out = []
    for where, value in spec.places():
        if not value.startswith(("s3://", "hf:")):
            out.append(f"{where} is a local path ({value}) that a pod cannot read — upload it to S3 and use "
                       "s3://bucket/key, or run it here with --local")
    return out


# ------------------------------------------------------------------------------ preflight (I/O)

def preflight(kube: Kube, spec: TrainingRunSpec, settings: LauncherSettings, run: render.RunObjects, *,
              check_nodes: bool = True) -> list[str]:
    """Run every check, raise :class:`PreflightError` listing all failures; return warnings (checks skipped
    because RBAC does not let us look)."""
    job = run.workload
    failures: list[str] = local_path_problems(spec)
    warnings: list[str] = []
    ns = settings.namespace

    try:
        if kube.get_namespace(ns) is None:
            raise PreflightError(failures + [f"namespace {ns} does not exist — create it "
                                             f"(kubectl create namespace {ns}) or set LAUNCHER_NAMESPACE"])
    except Forbidden:
        warnings.append(f"could not check that namespace {ns} exists (not allowed to get namespaces)")

    try:
        secret = kube.get_secret(settings.s3_secret_name)
        if secret is None:
            failures.append(f"Secret {settings.s3_secret_name} with the S3 credentials is missing in namespace {ns} "
                            f"— create it with keys {settings.s3_access_key_key} and {settings.s3_secret_key_key} "
                            "(the Helm chart does), or set LAUNCHER_S3_SECRET_NAME")
        else:
            data = {**(secret.get("data") or {}), **(secret.get("stringData") or {})}
            for key in (settings.s3_access_key_key, settings.s3_secret_key_key):
                if key not in data:
                    failures.append(f"Secret {settings.s3_secret_name} has no key {key} — add it, or point "
                                    "LAUNCHER_S3_ACCESS_KEY_KEY / LAUNCHER_S3_SECRET_KEY_KEY at the right keys")
    except Forbidden:
        warnings.append(f"could not check Secret {settings.s3_secret_name} (not allowed to get secrets)")

    try:
        if kube.get_service_account(settings.service_account) is None:
            failures.append(f"ServiceAccount {settings.service_account} is missing in namespace {ns} — install the "
                            "Helm chart in this namespace, create it, or set LAUNCHER_SERVICE_ACCOUNT")
    except Forbidden:
        warnings.append(f"could not check ServiceAccount {settings.service_account} (not allowed to get it)")

    if check_nodes:
        try:
            problem = fit_failure(kube.list_nodes(), job, settings.gpu_resource)
            if problem:
                failures.append(problem)
        except Forbidden:
            warnings.append("could not check that a node fits the run (not allowed to list nodes)")

    get, create_workload = _api(kube, job)
    if not failures and get(job["metadata"]["name"]) is None:
        # Server-side dry-run: admission (Pod Security, quota, Kueue and JobSet webhooks) and schema, nothing
        # persisted.
        bodies = [(kube.create_configmap, run.configmap), (create_workload, job)]
        if run.service is not None:
            bodies.append((kube.create_service, run.service))
        for create, body in bodies:
            try:
                create(body, dry_run=True)
            except AlreadyExists:
                pass
            except (NotFound, Forbidden, Invalid) as err:
                failures.append(f"server-side dry-run of the {body['kind']} failed: {err.message}")
    if failures:
        raise PreflightError(failures)
    return warnings


# ------------------------------------------------------------------------------ create

def _api(kube: Kube, workload: dict) -> tuple[Any, Any]:
    """(get, create) of the run's kind: Job or JobSet."""
    if render.is_jobset(workload):
        return kube.get_jobset, kube.create_jobset
    return kube.get_job, kube.create_job


def _as_the_other_kind(kube: Kube, job: dict, spec: TrainingRunSpec) -> dict | None:
    """The same spec submitted before as the other kind (multinode_workload changed since): the same run. A
    launcher that may not read JobSets has made none."""
    if render.is_jobset(job):
        return kube.get_job(job["metadata"]["name"])
    if spec.resources.nodes <= 1:
        return None
    try:
        return kube.get_jobset(job["metadata"]["name"])
    except Forbidden:
        return None


def _wait_gone(kube: Kube, get: Any, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while get(name) is not None:
        if time.monotonic() > deadline:
            raise SubmitConflict(f"job {name} from an earlier, cancelled submission is still being deleted",
                                 hint="wait a minute and submit again")
        time.sleep(1)


def create_run(kube: Kube, run: render.RunObjects) -> SubmitResult:
    """Create the rendered run: ConfigMap then Job (or JobSet), then make it own the ConfigMap and create an
    Indexed Job's headless Service, owned by the Job. Idempotent and race-safe."""
    job, configmap, service = run.workload, run.configmap, run.service
    name = job["metadata"]["name"]
    want_hash = job["metadata"]["labels"][render.LABEL_HASH]
    get, create = _api(kube, job)

    existing = get(name)
    if existing is not None and (existing.get("metadata") or {}).get("deletionTimestamp"):
        _wait_gone(kube, get, name)
        existing = None
    if existing is not None:
        return _already(existing, want_hash)

    created_cm = False
    try:
        kube.create_configmap(configmap)
        created_cm = True
    except AlreadyExists:
        cm = kube.get_configmap(name) or {}
        owners = (cm.get("metadata") or {}).get("ownerReferences") or []
        if owners:
            live = get(name)
            if live is not None and any(o.get("uid") == live["metadata"].get("uid") for o in owners):
                return _already(live, want_hash)  # another submitter finished first
            # Left behind by a deleted Job and about to be garbage-collected: replace it.
            kube.delete_configmap(name, uid=(cm.get("metadata") or {}).get("uid"))
            _wait_configmap_gone(kube, name)
            try:
                kube.create_configmap(configmap)
                created_cm = True
            except AlreadyExists:
                pass  # a concurrent submitter recreated it; the Job create below decides
        elif (cm.get("metadata") or {}).get("labels", {}).get(render.LABEL_HASH) != want_hash:
            raise SubmitConflict(f"ConfigMap {name} exists but holds a different spec",
                                 hint=f"delete it (kubectl delete configmap {name}) and submit again")

    try:
        created = create(job)
    except AlreadyExists:
        live = get(name)
        if live is None:
            raise SubmitConflict(f"job {name} was created and deleted while we submitted",
                                 hint="submit again") from None
        _own(kube, name, live)
        _create_service(kube, service, live)
        return _already(live, want_hash)
    except Exception:
        if created_cm:
            kube.delete_configmap(name)
        raise
    _own(kube, name, created)
    _create_service(kube, service, created)
    return SubmitResult(name, True, created)


def _create_service(kube: Kube, service: dict | None, job: dict) -> None:
    """The headless Service, owned by the Job: the garbage collector deletes it with the Job (cancel, TTL)."""
    if service is None or not (job.get("metadata") or {}).get("uid"):
        return
    body = {**service, "metadata": {**service["metadata"], "ownerReferences": [render.owner_reference(job)]}}
    try:
        kube.create_service(body)
    except AlreadyExists:
        pass


def _wait_configmap_gone(kube: Kube, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while kube.get_configmap(name) is not None and time.monotonic() < deadline:
        time.sleep(0.5)


def _own(kube: Kube, name: str, job: dict) -> None:
    if not (job.get("metadata") or {}).get("uid"):
        return
    kube.patch_configmap(name, {"metadata": {"ownerReferences": [render.owner_reference(job)]}})


def _already(job: dict, want_hash: str) -> SubmitResult:
    name = job["metadata"]["name"]
    have = (job["metadata"].get("labels") or {}).get(render.LABEL_HASH)
    if have != want_hash:
        raise SubmitConflict(f"job {name} exists with a different spec hash ({have}, this spec is {want_hash})",
                             hint=f"rename the run (spec name) or delete the old Job: launcher cancel {name}")
    return SubmitResult(name, False, job)


def jobsets_served(kube: Kube, spec: TrainingRunSpec, settings: LauncherSettings) -> bool:
    """Whether the cluster serves JobSets, asked only where it decides what the run becomes; a run that must be
    a JobSet (``multinode_workload: jobset``) on a cluster without them is a PreflightError."""
    if spec.resources.nodes <= 1 or settings.multinode_workload == "indexed-job":
        return False
    served = kube.serves_jobsets()
    if not served and settings.multinode_workload == "jobset":
        raise PreflightError([
            "the launcher setting multinode_workload is jobset, but the cluster does not serve "
            "jobsets.jobset.x-k8s.io (JobSet is not installed) — install JobSet (https://jobset.sigs.k8s.io), or "
            "set multinode_workload to indexed-job or auto (LAUNCHER_MULTINODE_WORKLOAD)"])
    return served


def submit(kube: Kube, spec: TrainingRunSpec, settings: LauncherSettings, *, server_dry_run: bool = False,
           skip_preflight: bool = False) -> SubmitResult:
    """Validate against the cluster, then create the run (or find it already there)."""
    run = render.render_run(spec, settings, jobsets_served=jobsets_served(kube, spec, settings))
    job = run.workload
    name = job["metadata"]["name"]
    get, create = _api(kube, job)
    existing = get(name) or _as_the_other_kind(kube, job, spec)
    if existing is not None and not (existing.get("metadata") or {}).get("deletionTimestamp"):
        return _already(existing, job["metadata"]["labels"][render.LABEL_HASH])
    if skip_preflight and (unreadable := local_path_problems(spec)):
        # the one preflight check that needs no cluster access, so skipping the others never skips it
        raise PreflightError(unreadable)
    warnings = [] if skip_preflight else preflight(kube, spec, settings, run)
    if server_dry_run:
        if skip_preflight:
            kube.create_configmap(run.configmap, dry_run=True)
            create(job, dry_run=True)
            if run.service is not None:
                kube.create_service(run.service, dry_run=True)
        return SubmitResult(name, False, job, warnings, dry_run=True)
    result = create_run(kube, run)
    result.warnings = warnings
    return result
