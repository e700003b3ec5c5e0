"""The launcher's one settings class.

Precedence, highest first: explicit arguments (CLI flags), ``LAUNCHER_*``
environment variables, the user's YAML file (``LAUNCHER_CONFIG`` or
``~/.config/lora-jobs/launcher.yaml``), the ``lora-jobs-launcher`` ConfigMap that
the Helm chart installs in the namespace (key ``settings.yaml``), then defaults.

The file is read by pydantic-settings' own ``YamlConfigSettingsSource``; unknown keys are
errors (``extra="forbid"``), with a "did you mean". So is a ``LAUNCHER_*`` variable that is not
a setting (nor ``LAUNCHER_CONFIG``/``LAUNCHER_DEBUG``): a typo silently ignored would run with
the default. Every invalid value is listed in one :class:`SettingsError` naming where it was
set (the variable, the file, the ConfigMap) and the fix. The ConfigMap needs a cluster, so it
is read only by :func:`load_settings` when it is given a kube client; everything else
works offline (``--dry-run``).

The namespace, when none is set (flag, variable or file), is the kubeconfig context's (as
kubectl's), else in a pod its service account's, else ``default``; the ConfigMap cannot set it.
"""
from __future__ import annotations

import contextvars
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from launcher.errors import SettingsError

CLUSTER_CONFIGMAP = "lora-jobs-launcher"
CLUSTER_CONFIGMAP_KEY = "settings.yaml"
DEFAULT_CONFIG_FILE = "~/.config/lora-jobs/launcher.yaml"

#: Where the cluster is and who we are (and how long to wait for it to answer), and whether runs go to it at all:
#: the namespace's ConfigMap cannot decide these.
_LOCAL_ONLY = {"kubeconfig", "context", "namespace", "cluster_timeout", "backend", "local_state_dir"}
#: LAUNCHER_* variables that are not settings: any other LAUNCHER_* name is refused as a likely typo.
ENV_NOT_SETTINGS = {"LAUNCHER_CONFIG": "the config file", "LAUNCHER_DEBUG": "tracebacks on errors"}
#: The settings whose variables hold JSON, with an example of each.
_JSON_EXAMPLES = {"node_selector": '{"pool": "gpu"}', "gpu_prices": '{"H100": 2.49, "A100": 1.2}',
                  "tolerations": '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]'}

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
# distribution/reference's grammar: [registry[:port]/]path[:tag][@digest], path components lowercase
_IMAGE = re.compile(r"^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*"
                    r"[a-zA-Z0-9]))*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)"
                    r"[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:"
                    r"[0-9a-fA-F]{32,})?$")
_GPU_TYPE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def _qualified_name(text: str) -> bool:
    """A Kubernetes qualified name (a label key, an extended resource): [DNS-subdomain prefix/]name."""
    prefix, _, name = text.rpartition("/")
    return bool(_QUALIFIED_NAME.match(name)) and (not prefix or (len(prefix) <= 253
                                                                  and bool(_DNS1123_SUBDOMAIN.match(prefix))))

_cluster_values: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("cluster_values", default={})


def _default_tolerations() -> list[dict[str, Any]]:
    return [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


class LauncherSettings(BaseSettings):
    """Where and how the launcher runs Jobs; every field is a ``LAUNCHER_<NAME>`` variable."""

    model_config = SettingsConfigDict(env_prefix="LAUNCHER_", extra="forbid", validate_default=True)

    kubeconfig: str | None = Field(None, description="Path of the kubeconfig; default: $KUBECONFIG, "
                                                     "~/.kube/config, or the in-cluster service account.")
    context: str | None = Field(None, description="kubeconfig context; default: the current context.")
    namespace: str | None = Field(None, description="Namespace the Jobs run in; default: the kubeconfig context's "
                                                     "namespace, else (in a pod) its service account's, else "
                                                     "default.")
    image: str = Field("lora-jobs/trainer:0.1.0", description="The trainer image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="imagePullPolicy of the trainer container.")
    s3_endpoint: str | None = Field(None, description="S3 endpoint URL given to the job as AWS_ENDPOINT_URL "
                                                      "(empty: the AWS default).")
    s3_region: str = Field("us-east-1", description="AWS_REGION of the job.")
    s3_secret_name: str = Field("lora-jobs-s3", description="Secret holding the S3 credentials.")
    s3_access_key_key: str = Field("AWS_ACCESS_KEY_ID", description="Key of the access key id in that Secret.")
    s3_secret_key_key: str = Field("AWS_SECRET_ACCESS_KEY", description="Key of the secret key in that Secret.")
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU.")
    node_selector: dict[str, str] = Field(default_factory=dict,
                                          description="nodeSelector for runs that ask for GPUs.")
    tolerations: list[dict[str, Any]] = Field(default_factory=_default_tolerations,
                                              description="Tolerations for runs that ask for GPUs.")
    service_account: str = Field("lora-jobs-trainer", description="ServiceAccount of the training pod.")
    queue: str | None = Field(None, description="Kueue LocalQueue; set: Jobs are created suspended and labelled.")
    multinode_workload: Literal["indexed-job", "jobset", "auto"] = Field(
        "indexed-job", description="What a run with resources.nodes > 1 becomes: indexed-job (an Indexed Job and a "
                                   "headless Service), jobset (a JobSet: the cluster must serve "
                                   "jobsets.jobset.x-k8s.io), or auto (a JobSet where the cluster serves JobSets, "
                                   "else an Indexed Job). One-node runs are always plain Jobs.")
    ttl_seconds_after_finished: int = Field(7 * 24 * 3600, ge=0,
                                            description="Finished Jobs (and their spec) are deleted after this.")
    priority_class: str | None = Field(None, description="Default PriorityClass (a spec's resources.priority_class "
                                                         "wins).")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking server URL, given to jobs whose spec "
                                                              "has tracking.mlflow, in the variable it names.")
    mlflow_token_secret: str | None = Field(None, description="Secret whose key MLFLOW_TRACKING_TOKEN is the "
                                                              "tracking server's bearer token (none: no auth).")
    gpu_prices: dict[str, float] = Field(default_factory=dict,
                                         description="Price of one GPU-hour by GPU type, for the cost `launcher "
                                                     "status` and `list` show, e.g. {\"H100\": 2.49, \"A100\": 1.2}: "
                                                     "a card (H100-SXM, H100-PCIe, H200, A100, L40S, or another "
                                                     "card's name without NVIDIA, e.g. L4) or its family (H100). "
                                                     "Empty: no cost is shown.")
    model_cache_host_path: str | None = Field(
        None, description="A folder on each node where training pods keep the base models they download, so that "
                          "the node's next jobs read them from its disk (a hostPath volume; docs/model-cache.md). "
                          "The namespace must allow hostPath volumes (Pod Security 'privileged': 'baseline' and "
                          "'restricted' refuse them), and the folder must be writable by uid 10001 (a folder the "
                          "kubelet creates is root's: the jobs then download as without it, with a warning). "
                          "Empty: off, every job downloads its base model.")
    model_cache_max_gib: float = Field(200.0, gt=0, description="Bound of that cache on each node, in GiB: the least "
                                                                "recently used models that no job is using are "
                                                                "evicted to stay within it.")
    backend: Literal["kubernetes", "local"] = Field(
        "kubernetes", description="Where runs run: kubernetes (Jobs in the namespace) or local (the job as a process "
                                  "on this machine, its state under local_state_dir). --backend and submit --local "
                                  "choose one for a command.")
    local_state_dir: str | None = Field(None, description="Folder of the local runs' state (a folder per run: its "
                                                          "spec, process, log and exit code); default: "
                                                          "$XDG_STATE_HOME/lora-jobs/runs, else "
                                                          "~/.local/state/lora-jobs/runs.")
    cluster_timeout: float = Field(120.0, gt=0, description="Seconds in a row that wait, logs -f and submit --wait "
                                                            "keep retrying an API server that does not answer before "
                                                            "they stop with an error (a run may take as long as it "
                                                            "takes: this bounds only the outage). Also 90s, 5m, 1h.")

    #: Where the namespace came from (a flag, LAUNCHER_NAMESPACE, the kubeconfig context, ...), for messages.
    _namespace_from: str = PrivateAttr("")

    def model_post_init(self, context: Any) -> None:
        if self.namespace is None:
            from launcher.kube import default_namespace

            self.namespace, self._namespace_from = default_namespace(self.kubeconfig, self.context)
        else:
            self._namespace_from = "the settings"

    @property
    def namespace_from(self) -> str:
        """Where :attr:`namespace` came from: "the settings" (a flag, a variable, the config file), a kubeconfig
        context, the pod's service account, or "the default"."""
        return self._namespace_from

    @field_validator("namespace")
    @classmethod
    def _namespace_is_a_label(cls, v: str | None) -> str | None:
        if v is not None and not _DNS1123_LABEL.match(v):
            raise ValueError(f"{v!r} is not a namespace name: use lowercase letters, digits and '-', starting and "
                             "ending with a letter or digit, at most 63 characters (e.g. ml)")
        return v

    @field_validator("service_account", "s3_secret_name", "mlflow_token_secret", "queue", "priority_class")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        if v is not None and not (len(v) <= 253 and _DNS1123_SUBDOMAIN.match(v)):
            raise ValueError(f"{v!r} is not a Kubernetes object name: use lowercase letters, digits, '-' and '.', "
                             "starting and ending with a letter or digit")
        return v

    @field_validator("image")
    @classmethod
    def _image_reference(cls, v: str) -> str:
        if len(v) > 255 or not _IMAGE.match(v):
            raise ValueError(f"{v!r} is not an image reference: use [registry[:port]/]name[:tag][@sha256:digest] "
                             "with a lowercase name, e.g. registry.example.com/lora-jobs/trainer:0.1.0")
        return v

    @field_validator("s3_endpoint", mode="before")
    @classmethod
    def _endpoint_url(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None  # empty: the AWS default
        if not isinstance(v, str):
            return v
        from urllib.parse import urlsplit

        try:
            url = urlsplit(v)
            url.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            url = None
        if url is not None and (url.username or url.password):
            # never echoed: the value holds a credential
            raise ValueError("holds a user name or password: S3 credentials come from the Secret "
                             "(s3_secret_name), never the URL; give only scheme://host[:port]")
        if url is None or url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"{v!r} is not an http(s) URL: give scheme://host[:port], e.g. http://minio.storage:9000 "
                             "(empty: the AWS default)")
        return v

    @field_validator("mlflow_tracking_uri", mode="before")
    @classmethod
    def _tracking_url(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        if not isinstance(v, str):
            return v
        from jobs.spec import secret_kind

        what = secret_kind(v)
        if what:  # it would be rendered into every tracked Job's env in plain text: never echoed
            raise ValueError(f"holds what looks like {what} (not shown here); it would be written into every "
                             "tracked Job in plain text: give only the server's URL, and its token through "
                             "mlflow_token_secret (a Secret with the key MLFLOW_TRACKING_TOKEN)")
        if not re.match(r"^(https?://[^/\s]+|file:/)", v):
            raise ValueError(f"{v[:80]!r} is not an http(s) URL (or file:/path): e.g. http://mlflow.ml:5000")
        return v

    @field_validator("s3_access_key_key", "s3_secret_key_key")
    @classmethod
    def _secret_key_name(cls, v: str) -> str:
        # a Secret's data key: what the Job's secretKeyRef names (the API server refuses '' only at submit)
        if not re.fullmatch(r"[-._a-zA-Z0-9]{1,253}", v):
            raise ValueError(f"{v!r} is not a key of a Secret: letters, digits, '-', '_', '.', e.g. "
                             "AWS_SECRET_ACCESS_KEY")
        return v

    @field_validator("gpu_resource")
    @classmethod
    def _extended_resource(cls, v: str) -> str:
        domain = v.rpartition("/")[0]
        if not domain or not _qualified_name(v) or domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
            raise ValueError(f"{v!r} is not an extended resource name: use domain/name outside kubernetes.io, e.g. "
                             "nvidia.com/gpu or amd.com/gpu")
        return v

    @field_validator("node_selector")
    @classmethod
    def _node_labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _qualified_name(key):
                raise ValueError(f"{key!r} is not a label key: use [prefix/]name, e.g. "
                                 "cloud.google.com/gke-accelerator")
            if not _LABEL_VALUE.match(value):
                raise ValueError(f"the value of {key} is not a label value: at most 63 letters, digits, '-', '_' "
                                 "and '.', starting and ending with a letter or digit")
        return v

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, t in enumerate(v):
            unknown = sorted(set(t) - _TOLERATION_KEYS)
            if unknown:
                raise ValueError(f"toleration {i}: unknown key {unknown[0]!r}; a toleration has "
                                 f"{', '.join(sorted(_TOLERATION_KEYS))}")
            if t.get("operator", "Equal") not in ("Equal", "Exists"):
                raise ValueError(f"toleration {i}: operator must be Equal or Exists")
            if t.get("effect", "") not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
                raise ValueError(f"toleration {i}: effect must be NoSchedule, PreferNoSchedule or NoExecute")
            if t.get("operator") == "Exists" and t.get("value"):
                raise ValueError(f"toleration {i}: operator Exists takes no value")
            if not t.get("key") and t.get("operator") != "Exists":
                raise ValueError(f"toleration {i}: without a key the operator must be Exists")
        return v

    @field_validator("gpu_prices")
    @classmethod
    def _prices(cls, v: dict[str, float]) -> dict[str, float]:
        import math

        for key, price in v.items():
            if not _GPU_TYPE.match(key):
                raise ValueError(f"{key!r} is not a GPU type: use letters, digits, '.', '_' and '-', e.g. H100, "
                                 "H100-SXM, A100 or L40S")
            if not math.isfinite(price) or price < 0:
                raise ValueError(f"the price of {key} must be a number of at least 0 (per GPU-hour), e.g. 2.49")
        lowered = [k.lower() for k in v]
        twice = sorted({k for k in lowered if lowered.count(k) > 1})
        if twice:
            raise ValueError(f"{twice[0]} is priced twice (GPU types are compared without case)")
        return v

    @field_validator("model_cache_host_path", mode="before")
    @classmethod
    def _host_folder(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None  # empty: off
        if not isinstance(v, str):
            return v
        import posixpath

        if not v.startswith("/") or "//" in v or posixpath.normpath(v) != v.rstrip("/") or v.rstrip("/") == "" \
                or any(c in v for c in "\n\r\0:"):
            raise ValueError(f"{v[:80]!r} is not a node folder: give an absolute path without '..', '.', '//' or "
                             "':', not / itself, e.g. /var/cache/lora-jobs/models (empty: off)")
        return v.rstrip("/")

    @field_validator("cluster_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", v)
            if not m:
                raise ValueError(f"{v!r} is not a duration: give seconds (120) or 90s, 5m, 1h")
            return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
        return v

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings, env_settings,
                                   dotenv_settings, file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        # The namespace's ConfigMap values (set by load_settings for this one call) are a plain dict source.
        return (init_settings, env_settings, _config_file_source(settings_cls),
                InitSettingsSource(settings_cls, init_kwargs=_cluster_values.get()))


def config_file_path() -> Path:
    return Path(os.environ.get("LAUNCHER_CONFIG") or DEFAULT_CONFIG_FILE).expanduser()


def _config_file_source(settings_cls: type[BaseSettings]) -> PydanticBaseSettingsSource:
    """The user's config file through pydantic-settings' own YAML source; a file that is missing although
    LAUNCHER_CONFIG names it, or that is not a YAML mapping, is one SettingsError (unknown keys are caught
    by ``extra="forbid"`` like any other field)."""
    import yaml
    from pydantic_settings import YamlConfigSettingsSource

    path = config_file_path()
    if not path.is_file():
        if os.environ.get("LAUNCHER_CONFIG"):
            raise SettingsError(f"LAUNCHER_CONFIG names {path}, which does not exist",
                                hint="fix the path or unset LAUNCHER_CONFIG")
        return YamlConfigSettingsSource(settings_cls, yaml_file=None)
    try:
        source = YamlConfigSettingsSource(settings_cls, yaml_file=path, yaml_file_encoding="utf-8-sig")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise SettingsError(f"{where} is not valid YAML: {getattr(err, 'problem', None) or err}",
                            hint="check indentation and quoting") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{path} is not UTF-8 text", hint="save it as UTF-8") from None
    except (AttributeError, TypeError, ValueError):  # a list or a scalar, not `key: value` lines
        raise SettingsError(f"{path} must be a mapping of settings",
                            hint="write `key: value` lines, e.g. `namespace: ml`") from None
    return source


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SettingsError(f"{where} is not valid YAML: {getattr(err, 'problem', None) or err}",
                            hint="check indentation and quoting") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{where} must be a mapping of settings, got a {type(data).__name__}",
                            hint="write `key: value` lines, e.g. `namespace: ml`")
    return data


def cluster_values_from_configmap(configmap: dict | None) -> dict[str, Any]:
    """The settings a ConfigMap provides; keys this launcher does not know are ignored, because a newer chart
    may carry settings for a newer launcher."""
    if not configmap:
        return {}
    text = (configmap.get("data") or {}).get(CLUSTER_CONFIGMAP_KEY)
    if not text:
        return {}
    name = (configmap.get("metadata") or {}).get("name", CLUSTER_CONFIGMAP)
    data = _parse_yaml(text, f"ConfigMap {name} (key {CLUSTER_CONFIGMAP_KEY})")
    return {k: v for k, v in data.items() if k in LauncherSettings.model_fields and k not in _LOCAL_ONLY}


def _where(name: str, overrides: dict[str, Any], cluster: dict[str, Any]) -> str:
    """Where the value of setting ``name`` came from, as the user would fix it: an argument (a flag), the
    LAUNCHER_* variable, the config file or the namespace's ConfigMap."""
    if name in overrides:
        return name
    var = f"LAUNCHER_{name.upper()}"
    if any(k.upper() == var for k in os.environ):
        return f"{var} ({name})"
    if name in cluster and name not in _file_keys():
        return f"ConfigMap {CLUSTER_CONFIGMAP}: {name}"
    return f"{config_file_path()}: {name}" if name in _file_keys() else name


def _file_keys() -> set[str]:
    try:
        data = _parse_yaml(config_file_path().read_text(encoding="utf-8-sig"), str(config_file_path()))
    except (OSError, UnicodeDecodeError, SettingsError):
        return set()
    return set(data)


def _problem(e: dict[str, Any], overrides: dict[str, Any], cluster: dict[str, Any]) -> str:
    name = str(e["loc"][0]) if e["loc"] else ""
    if e.get("type") == "extra_forbidden":
        import difflib

        close = difflib.get_close_matches(name, list(LauncherSettings.model_fields), n=1)
        where = name if name in overrides else f"{config_file_path()}: {name}"
        return f"{where}: not a setting" + (f" (did you mean {close[0]}?)" if close else "")
    msg = e["msg"].removeprefix("Value error, ")
    inner = ".".join(str(p) for p in e["loc"][1:])
    return f"{_where(name, overrides, cluster) if name else '(settings)'}: " + (f"{inner}: " if inner else "") + msg


def environment_problems() -> list[str]:
    """LAUNCHER_* variables that are not settings (a typo would otherwise be ignored), and JSON settings whose
    variable is not JSON; each names the variable and the fix."""
    import difflib

    known = {f"LAUNCHER_{f.upper()}" for f in LauncherSettings.model_fields} | set(ENV_NOT_SETTINGS)
    out = []
    for var in sorted(os.environ):
        up = var.upper()
        if up.startswith("LAUNCHER_") and up not in known:
            close = difflib.get_close_matches(up, sorted(known), n=1)
            out.append(f"{var}: not a launcher setting" + (f" (did you mean {close[0]}?)" if close else "")
                       + "; rename it or unset it")
    for name, example in _JSON_EXAMPLES.items():
        var = f"LAUNCHER_{name.upper()}"
        text = next((v for k, v in os.environ.items() if k.upper() == var), None)
        if text is None or not text.strip():
            continue
        try:
            json.loads(text)
        except ValueError as err:
            out.append(f"{var}: not valid JSON ({getattr(err, 'msg', err)} at character {getattr(err, 'pos', 0) + 1});"
                       f" write it as JSON, e.g. {var}='{example}'")
    return out


def make_settings(cluster: dict[str, Any] | None = None, **overrides: Any) -> LauncherSettings:
    """Settings from overrides, env, the config file and ``cluster`` values; every invalid one (a value, a
    LAUNCHER_* variable that is not a setting, a JSON variable that is not JSON) is listed in one SettingsError
    that names where it was set and how to fix it."""
    from pydantic_settings import SettingsError as SourceError

    overrides = {k: v for k, v in overrides.items() if v is not None}
    cluster = cluster or {}
    hint = f"fix each setting named above (LAUNCHER_* variables, {config_file_path()}, or the flag)"
    problems = environment_problems()
    if any(": not valid JSON" in p for p in problems):  # pydantic-settings would stop at the first one
        raise SettingsError(_listing(problems), hint=hint)
    token = _cluster_values.set(cluster)
    try:
        return _checked(LauncherSettings(**overrides), problems, hint)
    except ValidationError as err:
        problems += [_problem(e, overrides, cluster) for e in err.errors()]
        raise SettingsError(_listing(problems), hint=hint) from None
    except SourceError as err:  # a source that could not be decoded; the variables are checked above
        raise SettingsError(_listing(problems + [str(err)]), hint=hint) from None
    finally:
        _cluster_values.reset(token)


def _checked(settings: LauncherSettings, problems: list[str], hint: str) -> LauncherSettings:
    if problems:
        raise SettingsError(_listing(problems), hint=hint)
    return settings


def _listing(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"invalid launcher settings: {problems[0]}"
    return f"{len(problems)} invalid launcher settings:\n" + "\n".join(f"  - {p}" for p in problems)


def load_settings(kube: Any = None, **overrides: Any) -> LauncherSettings:
    """Settings, including the namespace's ``lora-jobs-launcher`` ConfigMap when ``kube`` is given.

    ``kube`` needs one method, ``get_configmap(name, namespace) -> dict | None``. A ConfigMap we may not read
    (403) is skipped: it only holds defaults.
    """
    base = make_settings(**overrides)
    if kube is None:
        return base
    from launcher.kube import Forbidden

    try:
        cm = kube.get_configmap(CLUSTER_CONFIGMAP, namespace=base.namespace)
    except Forbidden:
        cm = None
    values = cluster_values_from_configmap(cm)
    return make_settings(values, **overrides) if values else base
