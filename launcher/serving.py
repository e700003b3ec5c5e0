"""A published version as serving manifests: a KServe ``LLMInferenceService``, or a plain vLLM Deployment and
Service (docs/serving.md, "Serving manifests").

:func:`read_version` is the only I/O: it reads one complete version's ``manifest.json`` (vouched for by its
``_COMPLETE`` marker, jobs.publish.read_manifest) and ``metadata.json`` (checked against the manifest), and checks
that every listed file is in the store with its size (jobs.publish.check_files). Everything else is pure:
:func:`plan` decides what is served (the adapter as a LoRA, or the merged model when vLLM's verdict says the
adapter is not servable as one), :func:`render_kserve` and :func:`render_vllm` turn that into objects.

Every S3 URI rendered ends with '/': KServe's storage initializer and S3 itself list by plain prefix, so
``s3://b/run/v1`` would also download ``s3://b/run/v10/*``. Credentials appear only by reference: the launcher
settings' S3 Secret, by name (KServe's ``serving.kserve.io/storageSecretName``) or ``secretKeyRef`` (vLLM).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from jobs import serving as verdicts
from jobs.errors import StorageError
from launcher.errors import UsageError
from launcher.render import APP, LABEL_COMPONENT, LABEL_NAME, LABEL_RUN, RUN_AS
from launcher.settings import LauncherSettings

Engine = Literal["kserve", "vllm"]
ENGINES = ("kserve", "vllm")
COMPONENT = "serving"
LABEL_VERSION = "lora-jobs.io/version"
ANNOTATION_VERSION_URI = "lora-jobs.io/version-uri"
ANNOTATION_BASE_SHA = "lora-jobs.io/base-model-sha256"
ANNOTATION_SERVE_AS = "lora-jobs.io/serve-as"
KSERVE_API = "serving.kserve.io/v1alpha1"
#: KServe's default ``storageSecretNameAnnotation`` (config/configmap/inferenceservice.yaml, credentials): the
#: storage initializer reads the S3 keys from the Secret it names
KSERVE_SECRET_ANNOTATION = "serving.kserve.io/storageSecretName"
#: the vLLM OpenAI server image of the plain Deployment (``--vllm-image`` sets another)
VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
VLLM_PORT = 8000
MODELS = "/models"


@dataclass(frozen=True)
class ServedVersion:
    """What the manifests need from one complete version (read by :func:`read_version`)."""

    run: str
    version: str  # "v3"
    uri: str  # the version's folder, ending with '/'
    base_model: str  # the spec's base_model.uri
    base_model_sha256: str | None
    serving: dict[str, Any]  # metadata.json's verdict (jobs/serving.py), or one made from adapter_config.json
    has_adapter: bool
    has_merged: bool

    @property
    def adapter_uri(self) -> str:
        return self.uri + "adapter/"

    @property
    def merged_uri(self) -> str:
        return self.uri + "merged/"


@dataclass(frozen=True)
class Plan:
    """What is served: ``model_uri`` (the base, or the merged model) with ``adapter_uri`` as a LoRA of rank up
    to ``max_lora_rank``, or ``model_uri`` alone; ``why`` says which and why, in one line."""

    serve_as: Literal["lora", "merged"]
    model_uri: str
    served_name: str  # the name clients send as "model"
    adapter_uri: str | None
    adapter_name: str | None
    max_lora_rank: int | None
    why: str


@dataclass
class ServingManifests:
    """:meth:`launcher.client.Client.serving_manifests`'s result: the objects, in apply order, and the plan."""

    run: str
    version: str
    engine: str
    plan: Plan
    objects: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)  # what to set up beside them (stderr in the CLI)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


# ------------------------------------------------------------------------------ the one read

def folder_uri(uri: str) -> str:
    """``uri`` as a folder: ending with '/', so no prefix listing reaches a sibling (v1 → v10)."""
    return uri if uri.endswith("/") else uri + "/"


def prefix_matches(uri: str, key: str) -> bool:
    """Whether KServe's storage initializer (kserve_storage.py ``_download_s3``: ``Prefix=path.lstrip('/')``) and
    S3 listing would download object ``key`` of the same bucket for ``uri``."""
    return key.startswith(urlparse(uri).path.lstrip("/"))


def read_version(output: str, run: str, version: str | None = None, *, endpoint: str | None = None
                 ) -> ServedVersion:
    """The complete version ``version`` (default: latest) of ``run`` under ``output``: its manifest must be the one
    its ``_COMPLETE`` marker vouches for, each listed file present with its size, and ``metadata.json`` (read) must
    match its sha256. Reads only the listing, ``manifest.json``, ``_COMPLETE`` and ``metadata.json`` (plus
    ``adapter/adapter_config.json`` for a version published before the serving check); the file contents are
    verified in full by ``launcher artifacts RUN --download``."""
    from jobs.publish import MARKER, check_files, open_version
    from jobs.storage import open_store
    from launcher.artifacts import list_versions

    listing = list_versions(output, run, endpoint=endpoint)
    if not listing.versions:
        if listing.incomplete:
            raise StorageError(f"run {run} has no complete version under {listing.prefix}/ (incomplete: "
                               f"{', '.join(listing.incomplete)})",
                               hint="wait for the run to finish publishing (launcher status RUN)")
        raise UsageError(f"run {run} has no versions under {listing.prefix}/",
                         hint="check the run name and --output (the spec's output prefix); `launcher list` "
                              "shows the runs")
    name = version or listing.latest
    if name and name.isdigit():
        name = f"v{name}"
    if name in listing.incomplete:
        raise StorageError(f"{listing.prefix}/{name}/ is incomplete (no {MARKER} marker): a publish in progress "
                           "or one that died", hint="wait for it, or pick a complete version: "
                           + ", ".join(v.name for v in listing.versions))
    if name not in {v.name for v in listing.versions}:
        raise UsageError(f"run {run} has no version {version}",
                         hint="pick one of: " + ", ".join(v.name for v in listing.versions))
    where = f"{listing.prefix}/{name}"
    store, base = open_store(where, endpoint=endpoint)
    opened = open_version(store, base, where)
    sizes, entries = opened.sizes, opened.entries
    read: dict[str, bytes] = {}

    def fetched(rel: str) -> bytes | None:
        if rel not in read and rel in sizes:
            read[rel] = store.get_bytes(opened.key(rel))
        return read.get(rel)

    fetched("metadata.json")

    def digest_of(rel: str) -> tuple[str, int] | None:
        if rel in read:
            return hashlib.sha256(read[rel]).hexdigest(), len(read[rel])
        if rel not in sizes:
            return None
        # present with its size; the content is checked in full by `launcher artifacts RUN --download`
        return (entries[rel]["sha256"] if sizes[rel] == entries[rel]["size"] else "?"), sizes[rel]

    found = check_files(entries, digest_of)
    if not found.ok:
        raise StorageError(f"{where}/ does not match its manifest: " + "; ".join(found.problems()),
                           hint="the stored version was damaged or altered after publishing: pick another version "
                                "(`launcher artifacts RUN`) or publish again")
    if "metadata.json" not in read:
        raise StorageError(f"{where}/ has no metadata.json", hint="pick another version, or publish again")
    meta = json.loads(read["metadata.json"])
    base_model = (meta.get("base_model") or {})
    verdict = meta.get("serving") if isinstance(meta.get("serving"), dict) else None
    has_adapter = all(f"adapter/{f}" in entries for f in verdicts.ADAPTER_FILES)
    if (verdict is None or "serve_as" not in verdict) and has_adapter:
        # published before the check (or it could not read the adapter): vLLM's rules on the config alone
        cfg = fetched("adapter/adapter_config.json")
        verdict = verdicts.check(json.loads(cfg or b"{}"), checked="adapter_config").to_dict()
    return ServedVersion(run=run, version=name, uri=folder_uri(where), base_model=str(base_model.get("uri") or ""),
                         base_model_sha256=(verdict or {}).get("base_model_sha256") or base_model.get("sha256"),
                         serving=verdict or {}, has_adapter=has_adapter,
                         has_merged=any(rel.startswith("merged/") for rel in entries))


# ------------------------------------------------------------------------------ the decision

def served_base_uri(uri: str, engine: str) -> str:
    """The base model as the engine downloads it: an S3 folder (ending with '/'); a hub model ``hf:org/name`` as
    KServe's ``hf://org/name`` (a repository id, not a prefix) or vLLM's ``org/name``."""
    if uri.startswith("s3://"):
        return folder_uri(uri)
    if uri.startswith("hf:"):
        return ("hf://" if engine == "kserve" else "") + verdicts.base_model_name(uri)
    raise UsageError(f"the base model {uri} is a local path: a serving pod cannot read it",
                     hint="serve the merged model (--serve-as merged), or train on a base in s3:// or hf:")


def plan(v: ServedVersion, engine: str = "kserve", serve_as: str | None = None) -> Plan:
    """Serve the adapter as a LoRA on its base when vLLM's verdict allows it (with the smallest
    ``--max-lora-rank`` that serves its rank, jobs.serving.needed_max_lora_rank), else the merged model;
    ``serve_as`` forces one. Raises :class:`UsageError` naming what is missing and what to do."""
    if not v.uri.startswith("s3://"):
        raise UsageError(f"{v.uri} is a local folder: a serving pod cannot read it",
                         hint="publish to s3:// (the spec's output), or serve it yourself: vllm serve BASE "
                              f"--enable-lora --lora-modules {v.run}={v.uri}adapter")
    lora_ok = bool(v.serving.get("servable_as_lora")) and v.has_adapter
    why_not = "; ".join(v.serving.get("why_merged") or []) or (
        "the version has no adapter" if not v.has_adapter else "it has no serving verdict")
    if serve_as == "lora" and not lora_ok:
        raise UsageError(f"{v.run} {v.version}: vLLM will not serve its adapter as a LoRA ({why_not})",
                         hint="serve the merged model: leave out --serve-as, or pass --serve-as merged")
    if serve_as == "merged" or not lora_ok:
        if not v.has_merged:
            raise UsageError(f"{v.run} {v.version} has no merged model to serve"
                             + ("" if serve_as == "merged" else f", and vLLM will not serve its adapter as a LoRA "
                                                                f"({why_not})"),
                             hint="train again with merge.enabled: true (the default)"
                                  + (", or serve the adapter as a LoRA (leave out --serve-as)" if lora_ok else ""))
        why = "served merged: " + (why_not if not lora_ok else "as asked (--serve-as merged)")
        return Plan("merged", v.merged_uri, v.run, None, None, None, why)
    rank = int(v.serving.get("rank") or 0)
    need = v.serving.get("vllm_max_lora_rank") or verdicts.needed_max_lora_rank(rank)
    base = served_base_uri(v.base_model, engine)
    # the base's served name: the hub id, or the S3 folder's name; never the adapter's (KServe refuses that)
    base_name = verdicts.base_model_name(v.base_model) if v.base_model.startswith("hf:") else \
        v.base_model.rstrip("/").rsplit("/", 1)[-1]
    base_name = base_name + "-base" if base_name == v.run else base_name
    return Plan("lora", base, base_name, v.adapter_uri, v.run, int(need),
                f"served as a LoRA of rank {rank} on {v.base_model} (--max-lora-rank {need})")


# ------------------------------------------------------------------------------ the objects

def object_name(v: ServedVersion) -> str:
    """``<run>-<version>``, cut to a DNS label (63 characters)."""
    return f"{v.run}-{v.version}"[:63].rstrip("-")


def _labels(v: ServedVersion) -> dict[str, str]:
    return {LABEL_NAME: APP, LABEL_COMPONENT: COMPONENT, LABEL_RUN: v.run, LABEL_VERSION: v.version}


def _annotations(v: ServedVersion, p: Plan) -> dict[str, str]:
    out = {ANNOTATION_VERSION_URI: v.uri, ANNOTATION_SERVE_AS: p.serve_as}
    if v.base_model_sha256 and p.serve_as == "lora":
        out[ANNOTATION_BASE_SHA] = v.base_model_sha256
    return out


def _meta(v: ServedVersion, p: Plan, name: str, namespace: str | None, extra: dict[str, str] | None = None
          ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": _labels(v), "annotations": {**_annotations(v, p), **(extra or {})}}
    if namespace:
        meta["namespace"] = namespace
    return meta


def render_kserve(v: ServedVersion, p: Plan, settings: LauncherSettings, *, gpus: int = 1,
                  name: str | None = None) -> list[dict[str, Any]]:
    """A KServe ``LLMInferenceService`` (serving.kserve.io/v1alpha1): ``spec.model.uri`` the base (or the merged
    model), its adapter in ``spec.model.lora.adapters[]`` with ``maxRank`` (vLLM's ``--max-lora-rank``); the S3
    Secret named by KServe's storage-secret annotation; ``gpus`` GPUs for KServe's ``main`` container."""
    name = name or object_name(v)
    model: dict[str, Any] = {"uri": p.model_uri, "name": p.served_name}
    if p.serve_as == "lora":
        model["lora"] = {"adapters": [{"name": p.adapter_name, "uri": p.adapter_uri}], "maxRank": p.max_lora_rank}
    gpu = {settings.gpu_resource: gpus}
    spec: dict[str, Any] = {"model": model, "replicas": 1,
                            "template": {"containers": [{"name": "main",
                                                         "resources": {"requests": gpu, "limits": dict(gpu)}}]}}
    return [{"apiVersion": KSERVE_API, "kind": "LLMInferenceService",
             "metadata": _meta(v, p, name, settings.namespace, {KSERVE_SECRET_ANNOTATION: settings.s3_secret_name}),
             "spec": spec}]


def _security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def render_vllm(v: ServedVersion, p: Plan, settings: LauncherSettings, *, gpus: int = 1, name: str | None = None,
                image: str = VLLM_IMAGE) -> list[dict[str, Any]]:
    """A vLLM Deployment and its Service. An init container (the trainer image: ``python -m jobs.serving fetch``)
    downloads the base and the adapter (or the merged model) with the settings' S3 Secret by ``secretKeyRef``,
    and checks the base against the hash the version recorded; then ``vllm serve`` runs as a non-root user with
    ``--enable-lora --lora-modules <run>=<adapter> --max-lora-rank N`` and ``gpus`` GPUs."""
    name = name or object_name(v)
    sources, sha = {}, []
    if p.serve_as == "lora":
        if p.model_uri.startswith("s3://"):
            sources["base"] = p.model_uri
            if v.base_model_sha256:
                sha.append(f"base={v.base_model_sha256}")
        sources["adapter"] = str(p.adapter_uri)
        model = f"{MODELS}/base" if "base" in sources else p.model_uri
        args = ["vllm", "serve", model, "--served-model-name", p.served_name, "--port", str(VLLM_PORT),
                "--enable-lora", "--lora-modules", f"{p.adapter_name}={MODELS}/adapter",
                "--max-lora-rank", str(p.max_lora_rank)]
    else:
        sources["merged"] = p.model_uri
        args = ["vllm", "serve", f"{MODELS}/merged", "--served-model-name", p.served_name, "--port", str(VLLM_PORT)]
    if gpus > 1:
        args += ["--tensor-parallel-size", str(gpus)]

    def secret(env: str, key: str) -> dict[str, Any]:
        return {"name": env, "valueFrom": {"secretKeyRef": {"name": settings.s3_secret_name, "key": key}}}

    s3_env = [secret("AWS_ACCESS_KEY_ID", settings.s3_access_key_key),
              secret("AWS_SECRET_ACCESS_KEY", settings.s3_secret_key_key),
              {"name": "AWS_REGION", "value": settings.s3_region}]
    if settings.s3_endpoint:
        s3_env.append({"name": "AWS_ENDPOINT_URL", "value": settings.s3_endpoint})
    fetch = {"name": "fetch", "image": settings.image, "imagePullPolicy": settings.image_pull_policy,
             "command": ["python", "-m", "jobs.serving", "fetch", MODELS,
                         *(f"{k}={u}" for k, u in sources.items()), *(a for s in sha for a in ("--sha256", s))],
             "env": s3_env, "securityContext": _security_context(),
             "volumeMounts": [{"name": "models", "mountPath": MODELS}, {"name": "tmp", "mountPath": "/tmp"}]}
    gpu = {settings.gpu_resource: gpus}
    server = {"name": "vllm", "image": image, "command": args,
              # vLLM, torch and triton write their caches under $HOME: a writable emptyDir, the root stays read-only
              "env": [{"name": "HOME", "value": "/tmp"}, {"name": "HF_HOME", "value": f"{MODELS}/hf"}],
              "ports": [{"name": "http", "containerPort": VLLM_PORT}],
              "resources": {"requests": gpu, "limits": dict(gpu)},
              "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
              "securityContext": _security_context(),
              "volumeMounts": [{"name": "models", "mountPath": MODELS}, {"name": "tmp", "mountPath": "/tmp"},
                               {"name": "dshm", "mountPath": "/dev/shm"}]}
    labels = _labels(v)
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False, "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [fetch], "containers": [server],
        "volumes": [{"name": "models", "emptyDir": {}}, {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]}
    if settings.node_selector:
        pod["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod["tolerations"] = [dict(t) for t in settings.tolerations]
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(v, p, name, settings.namespace),
                  "spec": {"replicas": 1, "selector": {"matchLabels": dict(labels)},
                           "template": {"metadata": {"labels": dict(labels)}, "spec": pod}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(v, p, name, settings.namespace),
               "spec": {"selector": dict(labels), "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": "http"}]}}
    return [deployment, service]


def notes(v: ServedVersion, p: Plan, engine: str, settings: LauncherSettings) -> list[str]:
    """What the manifests rely on beside themselves, and what was decided."""
    out = [f"{v.run} {v.version}: {p.why}"]
    if engine == "kserve":
        out.append(f"KServe reads the S3 keys from the Secret {settings.s3_secret_name} (annotation "
                   f"{KSERVE_SECRET_ANNOTATION}) under the key names of its inferenceservice-config "
                   f"(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY by default)")
        if settings.s3_endpoint:
            out.append(f"KServe takes the S3 endpoint from the Secret's annotation serving.kserve.io/s3-endpoint: "
                       f"kubectl annotate secret {settings.s3_secret_name} serving.kserve.io/s3-endpoint="
                       f"{urlparse(settings.s3_endpoint).netloc or settings.s3_endpoint} "
                       f"serving.kserve.io/s3-usehttps={'1' if settings.s3_endpoint.startswith('https') else '0'}")
    return out


def render(v: ServedVersion, settings: LauncherSettings, *, engine: str = "kserve", gpus: int = 1,
           serve_as: str | None = None, name: str | None = None, image: str | None = None) -> ServingManifests:
    """The manifests of ``engine`` for ``v``: :func:`plan`, then the engine's renderer."""
    check_options(engine, gpus, serve_as)
    p = plan(v, engine, serve_as)
    objects = (render_kserve(v, p, settings, gpus=gpus, name=name) if engine == "kserve"
               else render_vllm(v, p, settings, gpus=gpus, name=name, image=image or VLLM_IMAGE))
    return ServingManifests(v.run, v.version, engine, p, objects, notes(v, p, engine, settings))


def check_options(engine: str, gpus: int, serve_as: str | None) -> None:
    """The caller's choices, checked before anything is read."""
    if engine not in ENGINES:
        raise UsageError(f"engine {engine!r} is not one of {', '.join(ENGINES)}", hint="pass --engine kserve or vllm")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise UsageError(f"gpus must be a whole number, 1 or more; got {gpus!r}", hint="pass --gpus N, N >= 1")
    if serve_as not in (None, "lora", "merged"):
        raise UsageError(f"serve_as {serve_as!r} is not lora or merged", hint="pass --serve-as lora or merged")
