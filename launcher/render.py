"""Spec + settings -> every object a run creates, as plain dicts: the Job (or, for a multi-node run, a JobSet),
the headless Service of a multi-node Indexed Job, and the spec ConfigMap. Pure: no I/O, no clock.

:func:`render_run` is the one renderer: ``submit`` creates what it returns, and ``submit --dry-run`` and
``launcher render`` print it.

Only the fields of ``spec.resources`` (and the run name, hash and labels) shape the
pod; everything else travels inside the ConfigMap as data, so a spec cannot inject
pod fields. The contracts are in docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.errors import PERMANENT_EXIT_CODES
from jobs.spec import PromotionSpec, TrainingRunSpec
from launcher.settings import LauncherSettings

APP = "lora-jobs"
COMPONENT = "training"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_RUN = "lora-jobs.io/run"
LABEL_HASH = "lora-jobs.io/spec-hash"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_OUTPUT = "lora-jobs.io/output"
ANNOTATION_BASE_MODEL = "lora-jobs.io/base-model"
ANNOTATION_SPEC = "lora-jobs.io/spec-configmap"
CONTAINER = "trainer"
SPEC_DIR = "/etc/lora-jobs"
SPEC_KEY = "spec.yaml"
SCRATCH = "/scratch"
#: memory-backed /dev/shm for multi-GPU pods (NCCL); counts against the pod's memory limit
SHM_SIZE = "16Gi"
#: torchrun's rendezvous port on node 0 (multi-node runs).
RENDEZVOUS_PORT = 29500
#: The Job controller's annotation on each pod of an Indexed Job: its completion index = node rank.
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
#: A multi-node run as a JobSet (settings.multinode_workload): its API, and the name of its one replicatedJob,
#: whose M pods are the nodes. One letter: JobSet's webhook refuses a JobSet whose pod names
#: (<jobset>-<replicatedJob>-<job index>-<pod index>-<5 random>) pass 63 characters, and a 40-character run
#: name leaves 2 for it.
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "n"
#: The label JobSet puts on its child Jobs and their pods: which JobSet they belong to.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
#: Time for the trainer to write a checkpoint after SIGTERM (preemption, cancel).
TERMINATION_GRACE_SECONDS = 120
#: uid/gid of the images (docker/*.Dockerfile): above 10000, so no user of the node shares it.
RUN_AS = 10001
#: Where the node's base-model cache (settings.model_cache_host_path) is mounted in the pod.
MODEL_CACHE_MOUNT = "/var/cache/lora-jobs/models"


def job_name(spec: TrainingRunSpec) -> str:
    """``<name>-<hash8>``: the same spec is the same Job."""
    return f"{spec.name}-{spec.spec_hash()[:8]}"


def run_labels(spec: TrainingRunSpec) -> dict[str, str]:
    """The user's extra labels, then ours (ours win: selectors depend on them)."""
    labels = dict(spec.labels)
    labels.update({
        LABEL_NAME: APP,
        LABEL_COMPONENT: COMPONENT,
        LABEL_RUN: spec.name,
        LABEL_HASH: spec.spec_hash(),
    })
    return labels


def spec_yaml(spec: TrainingRunSpec) -> str:
    """The spec the job reads (its ConfigMap): every field, except a section added later while it holds its
    default, so a trainer image older than the section still reads the spec (its model forbids unknown keys)."""
    import yaml

    fields = spec.model_dump(mode="json")
    if not fields["export"]["gguf"]:
        del fields["export"]
    if fields["promotion"] == PromotionSpec().model_dump(mode="json"):
        del fields["promotion"]
    if fields["training"]["method"] == "sft":  # preference tuning, added later: SFT specs read as before
        del fields["training"]["method"]
    if fields["training"]["beta"] is None:
        del fields["training"]["beta"]
    if fields["base_adapter"] is None:  # added later too
        del fields["base_adapter"]
    return yaml.safe_dump(fields, sort_keys=False, allow_unicode=True)


def render_configmap(spec: TrainingRunSpec, settings: LauncherSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": job_name(spec), "namespace": settings.namespace, "labels": run_labels(spec)},
        "data": {SPEC_KEY: spec_yaml(spec)},
    }


def _env(spec: TrainingRunSpec, settings: LauncherSettings, master: str) -> list[dict[str, Any]]:
    def secret(name: str, key: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": settings.s3_secret_name, "key": key}}}

    env = [
        secret("AWS_ACCESS_KEY_ID", settings.s3_access_key_key),
        secret("AWS_SECRET_ACCESS_KEY", settings.s3_secret_key_key),
    ]
    if settings.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": settings.s3_endpoint})
    env += [
        {"name": "AWS_REGION", "value": settings.s3_region},
        {"name": "LORA_JOBS_WORKDIR", "value": SCRATCH},
        {"name": "LORA_JOBS_RUN_ID", "value": job_name(spec)},
        {"name": "LORA_JOBS_IMAGE", "value": settings.image},
        {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
    ]
    if spec.resources.nodes > 1:
        # torchrun reads its arguments from PET_* variables: static rendezvous on pod 0 (``master``, its DNS
        # name under the headless Service); the node rank is the pod's completion index.
        env += [
            {"name": "PET_NNODES", "value": str(spec.resources.nodes)},
            {"name": "PET_NPROC_PER_NODE", "value": str(max(1, spec.resources.gpus))},
            {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                "fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
            {"name": "PET_MASTER_ADDR", "value": master},
            {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        ]
    if settings.model_cache_host_path:  # jobs.model_cache reads these
        from jobs.model_cache import ENV_DIR, ENV_MAX_GIB

        env += [{"name": ENV_DIR, "value": MODEL_CACHE_MOUNT},
                {"name": ENV_MAX_GIB, "value": f"{settings.model_cache_max_gib:g}"}]
    mlflow = spec.tracking.mlflow if spec.tracking is not None else None
    if mlflow is not None and settings.mlflow_tracking_uri:
        env.append({"name": mlflow.uri_env, "value": settings.mlflow_tracking_uri})
    if mlflow is not None and settings.mlflow_token_secret:  # the token only ever from a Secret
        env.append({"name": "MLFLOW_TRACKING_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": settings.mlflow_token_secret, "key": "MLFLOW_TRACKING_TOKEN"}}})
    return env


def _resources(spec: TrainingRunSpec, settings: LauncherSettings) -> dict[str, Any]:
    r = spec.resources
    # Limits equal to requests: Guaranteed QoS, the last class evicted under node pressure, and
    # whole cores with the kubelet's static CPU manager.
    out: dict[str, Any] = {"requests": {"cpu": r.cpu, "memory": r.memory},
                           "limits": {"cpu": r.cpu, "memory": r.memory}}
    if r.gpus:
        # Extended resources are limits only; the request defaults to the limit.
        out["limits"][settings.gpu_resource] = r.gpus
    return out


def _pod_failure_policy(disruption: str = "Ignore") -> dict[str, Any]:
    # A rule-less failure (exit 1, 75) is counted against backoffLimit: that is "Count otherwise".
    # 137 (SIGKILL) once evictions and preemptions are ignored is the kernel's OOM killer at the memory
    # limit, or a kill after the grace period: a retry with the same limit is OOMKilled again.
    # The rules' order is a contract: a JobSet's failurePolicy (_jobset_failure_policy) reads the index of the
    # rule that failed its Job from the Job's condition message.
    return {"rules": [
        {"action": disruption, "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                              "values": sorted({*(int(c) for c in PERMANENT_EXIT_CODES), 137})}},
    ]}


def render_job(spec: TrainingRunSpec, settings: LauncherSettings, *, master: str | None = None) -> dict[str, Any]:
    """The Job of a run; a multi-node run's is Indexed. ``master`` is node 0's DNS name (default: the Indexed
    Job's ``<job>-0.<job>``; a JobSet's child Job has its own)."""
    name = job_name(spec)
    labels = run_labels(spec)
    r = spec.resources
    job_labels = dict(labels)
    if settings.queue:
        job_labels[LABEL_QUEUE] = settings.queue
    annotations = {
        ANNOTATION_OUTPUT: f"{spec.output}/{spec.name}",
        ANNOTATION_BASE_MODEL: spec.base_model.uri,
        ANNOTATION_SPEC: name,
    }
    container = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "jobs", "run", "--spec", f"{SPEC_DIR}/{SPEC_KEY}"],
        "env": _env(spec, settings, master or f"{name}-0.{name}"),
        "resources": _resources(spec, settings),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.service_account,
        # The trainer talks to S3, never to the API server.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "spec", "configMap": {"name": name, "items": [{"key": SPEC_KEY, "path": SPEC_KEY}]}},
            {"name": "scratch", "emptyDir": {"sizeLimit": r.scratch}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        ],
    }
    if settings.model_cache_host_path:
        # The node's base-model cache, shared by the node's training pods (docs/model-cache.md): a hostPath, so
        # the namespace must allow it (Pod Security "privileged"). DirectoryOrCreate: a node without the folder
        # still runs the pod (the kubelet makes it, root's: the job then downloads as without a cache, warned).
        container["volumeMounts"].append({"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT})
        pod_spec["volumes"].append({"name": "model-cache", "hostPath": {"path": settings.model_cache_host_path,
                                                                        "type": "DirectoryOrCreate"}})
    if r.nodes > 1:
        pod_spec["subdomain"] = name  # with the headless Service: <job>-<index>.<job> resolves to each pod
    if r.gpus > 1 or r.nodes > 1:
        # One training process per GPU (torchrun inside the container): NCCL moves data through
        # shared memory, and the runtime's default 64 MB /dev/shm breaks it.
        container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
        pod_spec["volumes"].append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}})
    if r.gpus:
        # The GPU node selector and tolerations steer GPU runs only; a CPU run may land anywhere.
        if settings.node_selector:
            pod_spec["nodeSelector"] = dict(settings.node_selector)
        if settings.tolerations:
            pod_spec["tolerations"] = [dict(t) for t in settings.tolerations]
    priority = r.priority_class or settings.priority_class
    if priority:
        pod_spec["priorityClassName"] = priority
    job_spec: dict[str, Any] = {
        # A multi-node run fails as a gang: the Job API has no "restart every index" action, so the pods do it
        # themselves (jobs/trainer/distributed.py: a dead or silent peer ends every rank within a bounded time, exit 75)
        # and the Job replaces each failed index. One gang failure costs up to `nodes` pod failures, hence
        # retries x nodes, counted across the whole Job rather than per index (backoffLimitPerIndex): a
        # restarted gang's pods can fail their rendezvous unevenly (a replacement that meets the old, dying
        # pod 0), and a per-index limit would end the run on one index's extra failures.
        "backoffLimit": r.retries * r.nodes,
        "activeDeadlineSeconds": max(1, int(r.timeout_hours * 3600)),
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        "completions": r.nodes,
        "parallelism": r.nodes,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": _pod_failure_policy(),
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if r.nodes > 1:
        job_spec["completionMode"] = "Indexed"
        # Done when node 0 is: its rank 0 publishes after every rank trained (and the other ranks wait for it,
        # jobs.trainer.distributed.shutdown), so a straggler of another index cannot keep a published run open, nor
        # a failure of one after the publish send that index alone into a retry that waits for a lost gang.
        job_spec["successPolicy"] = {"rules": [{"succeededIndexes": "0"}]}
    if settings.queue:
        job_spec["suspend"] = True  # Kueue admits (unsuspends) it, all `nodes` pods as one workload
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": job_labels,
                     "annotations": annotations},
        "spec": job_spec,
    }


def render_service(spec: TrainingRunSpec, settings: LauncherSettings) -> dict[str, Any] | None:
    """The headless Service of a multi-node run (the pods' ``subdomain``: stable DNS names for torchrun's
    rendezvous); None for a one-pod run. Owned by the Job once it exists, so it goes with the Job."""
    if spec.resources.nodes <= 1:
        return None
    name = job_name(spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": run_labels(spec)},
        "spec": {
            "clusterIP": "None",
            "selector": {"batch.kubernetes.io/job-name": name},
            # the rendezvous starts before anything is "ready": resolve the pods as soon as they have an IP
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def uses_jobset(spec: TrainingRunSpec, settings: LauncherSettings, jobsets_served: bool = False) -> bool:
    """Whether the run becomes a JobSet: a multi-node run where ``multinode_workload`` is jobset, or auto and
    the cluster serves JobSets (``jobsets_served``, which the caller looked up)."""
    choice = settings.multinode_workload
    return spec.resources.nodes > 1 and (choice == "jobset" or (choice == "auto" and jobsets_served))


def _jobset_failure_policy(retries: int) -> dict[str, Any]:
    """Gang semantics by the JobSet controller: any failed pod fails the one child Job (backoffLimit 0), and the
    JobSet recreates every pod, up to ``retries`` times, from the newest checkpoint. BlockingRecreate: the
    new pods start only once all old ones are gone, so no new pod meets a dying one under the same DNS name.

    The child Job's podFailurePolicy (:func:`_pod_failure_policy`) says why it failed, in the message of its
    Failed condition ("... matching FailJob rule at index N"): rule 1, a deterministic exit code, ends the run
    (as FailJob does for a one-pod run); rule 0, a disruption (preemption, eviction, node drain), restarts it
    without counting, as the Job controller ignores a disrupted pod. Past its time limit the run ends too."""
    return {
        "maxRestarts": retries,
        "restartStrategy": "BlockingRecreate",
        "rules": [
            {"name": "PermanentFailure", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"],
             "onJobFailureMessagePatterns": [r"failed with exit code \d+ matching FailJob rule at index 1$"]},
            {"name": "Disruption", "action": "RestartJobSetAndIgnoreMaxRestarts",
             "onJobFailureReasons": ["PodFailurePolicy"],
             "onJobFailureMessagePatterns": [r"has condition DisruptionTarget matching FailJob rule at index 0$"]},
            {"name": "TimeLimit", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]},
        ],
    }


def render_jobset(spec: TrainingRunSpec, settings: LauncherSettings) -> dict[str, Any]:
    """A multi-node run as a JobSet: one replicatedJob whose Indexed Job is the run's M pods (as
    :func:`render_job` renders them, rendezvous on ``<jobset>-n-0-0.<jobset>``), the JobSet's own headless
    Service as their subdomain, and the whole gang restarted by the JobSet controller."""
    name = job_name(spec)
    job = render_job(spec, settings, master=f"{name}-{REPLICATED_JOB}-0-0.{name}")
    child = dict(job["spec"])
    # The JobSet holds what concerns the whole run; a child Job lives for one attempt.
    for key in ("ttlSecondsAfterFinished", "suspend"):
        child.pop(key, None)
    child["backoffLimit"] = 0  # any failed pod fails the attempt: the JobSet restarts every pod
    child["podFailurePolicy"] = _pod_failure_policy(disruption="FailJob")
    jobset_spec: dict[str, Any] = {
        # JobSet's headless Service (named after the subdomain, selecting the JobSet's pods): stable DNS names
        # <jobset>-n-0-<index>.<jobset>, resolvable before the pods are ready (the rendezvous comes first).
        "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
        "successPolicy": {"operator": "All"},  # the child Job succeeds when index 0 does (its successPolicy)
        "failurePolicy": _jobset_failure_policy(spec.resources.retries),
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": child}}],
    }
    if settings.queue:
        jobset_spec["suspend"] = True  # Kueue admits the JobSet, all `nodes` pods as one workload
    return {"apiVersion": JOBSET_API, "kind": "JobSet", "metadata": job["metadata"], "spec": jobset_spec}


@dataclass(frozen=True)
class RunObjects:
    """Everything one run creates."""

    workload: dict[str, Any]  # the Job or the JobSet
    configmap: dict[str, Any]  # the spec, mounted by the pods
    service: dict[str, Any] | None = None  # an Indexed Job's headless Service (a JobSet makes its own)

    @property
    def objects(self) -> list[dict[str, Any]]:
        """The objects in the order manifests list them: workload, Service, ConfigMap."""
        return [self.workload, *([self.service] if self.service is not None else []), self.configmap]


def render_run(spec: TrainingRunSpec, settings: LauncherSettings, *, jobsets_served: bool = False) -> RunObjects:
    """Every object of one run: the Job or JobSet (:func:`uses_jobset` decides), the headless Service an
    Indexed Job of several nodes needs, and the spec ConfigMap."""
    if uses_jobset(spec, settings, jobsets_served):
        return RunObjects(render_jobset(spec, settings), render_configmap(spec, settings))
    return RunObjects(render_job(spec, settings), render_configmap(spec, settings), render_service(spec, settings))


def is_jobset(obj: dict[str, Any] | None) -> bool:
    """A JobSet, as rendered or read back (the API's JSON of a custom resource always names its kind)."""
    return bool(obj) and obj.get("kind") == "JobSet"


def job_spec_of(workload: dict[str, Any]) -> dict[str, Any]:
    """The Job spec of a run's workload: a Job's own, or that of a JobSet's one replicatedJob."""
    if is_jobset(workload):
        return workload["spec"]["replicatedJobs"][0]["template"]["spec"]
    return workload.get("spec") or {}


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """An ownerReference to a created Job or JobSet (needs its uid), so the ConfigMap goes with it."""
    meta = owner["metadata"]
    api, kind = (JOBSET_API, "JobSet") if is_jobset(owner) else ("batch/v1", "Job")
    return {"apiVersion": api, "kind": kind, "name": meta["name"], "uid": meta["uid"],
            "blockOwnerDeletion": False, "controller": False}


def to_yaml(*docs: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump_all(list(docs), sort_keys=False, allow_unicode=True)


def to_json(*docs: dict[str, Any]) -> str:
    """The objects as one ``v1`` ``List``: the JSON form ``kubectl apply -f -`` takes for several objects."""
    import json

    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}, indent=2, ensure_ascii=False) + "\n"
