"""The launcher's one settings class.

Precedence, highest first: explicit arguments (CLI flags), ``LAUNCHER_*``
environment variables, the user's YAML file (``LAUNCHER_CONFIG`` or
``~/.config/lora-jobs/launcher.yaml``), the ``lora-jobs-launcher`` ConfigMap that
the Helm chart installs in the namespace (key ``settings.yaml``), then defaults.

The file is read by pydantic-settings' own ``YamlConfigSettingsSource``; unknown keys are
errors (``extra="forbid"``), with a "did you mean". The ConfigMap needs a cluster, so it
is read only by :func:`load_settings` when it is given a kube client; everything else
works offline (``--dry-run``).
"""
from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from launcher.errors import SettingsError

CLUSTER_CONFIGMAP = "lora-jobs-launcher"
CLUSTER_CONFIGMAP_KEY = "settings.yaml"
DEFAULT_CONFIG_FILE = "~/.config/lora-jobs/launcher.yaml"

#: Where the cluster is and who we are: the namespace's ConfigMap cannot decide these.
_LOCAL_ONLY = {"kubeconfig", "context", "namespace"}

_cluster_values: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("cluster_values", default={})


def _default_tolerations() -> list[dict[str, Any]]:
    return [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


class LauncherSettings(BaseSettings):
    """Where and how the launcher runs Jobs; every field is a ``LAUNCHER_<NAME>`` variable."""

    model_config = SettingsConfigDict(env_prefix="LAUNCHER_", extra="forbid", validate_default=True)

    kubeconfig: str | None = Field(None, description="Path of the kubeconfig; default: $KUBECONFIG, "
                                                     "~/.kube/config, or the in-cluster service account.")
    context: str | None = Field(None, description="kubeconfig context; default: the current context.")
    namespace: str = Field("default", description="Namespace the Jobs run in.")
    image: str = Field("lora-jobs/trainer:0.1.0", description="The trainer image.")
    image_pull_policy: str = Field("IfNotPresent", pattern=r"^(Always|IfNotPresent|Never)$",
                                   description="imagePullPolicy of the trainer container.")
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


def _problem(e: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in e["loc"]) or "(settings)"
    if e.get("type") == "extra_forbidden":
        import difflib

        close = difflib.get_close_matches(where, list(LauncherSettings.model_fields), n=1)
        return f"{where}: not a setting" + (f" (did you mean {close[0]}?)" if close else "")
    return f"{where}: {e['msg']}"


def make_settings(cluster: dict[str, Any] | None = None, **overrides: Any) -> LauncherSettings:
    """Settings from overrides, env, the config file and ``cluster`` values; invalid ones raise SettingsError."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    token = _cluster_values.set(cluster or {})
    try:
        return LauncherSettings(**overrides)
    except ValidationError as err:
        problems = "; ".join(_problem(e) for e in err.errors())
        raise SettingsError(f"invalid launcher settings: {problems}",
                            hint=f"check LAUNCHER_* variables and {config_file_path()}") from None
    finally:
        _cluster_values.reset(token)


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
