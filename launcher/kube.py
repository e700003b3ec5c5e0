"""The one adaptor to the Kubernetes API. ``kubernetes`` is imported here only, and lazily.

Everything comes back as plain dicts (the API's JSON), which is what
:mod:`launcher.diagnose` and the tests read. Every failure becomes one sentence:
an unreachable server names the server and the fix; a 403 names the verb and
resource that RBAC lacks.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from jobs.formatting import duration
from jobs.retry import RetryPolicy
from launcher.errors import (AlreadyExists, ClusterError, ClusterUnreachable, Forbidden, Invalid,  # noqa: F401
                             NotFound, SettingsError, TransientClusterError)

#: (connect, read) seconds for ordinary calls; a restarting API server must not hang us.
TIMEOUT = (5, 30)
#: JobSet's API (sigs.k8s.io/jobset): group, version, plural.
JOBSET = ("jobset.x-k8s.io", "v1alpha2", "jobsets")
#: How long a "does the cluster serve JobSets" answer is reused.
DISCOVERY_TTL = 60.0
#: Where a pod's service account namespace is mounted: the namespace of a launcher that runs in the cluster.
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def yaml_error() -> type:
    import yaml
    return yaml.YAMLError


def parse_quantity(q: Any) -> float:
    """A Kubernetes quantity ('500m', '32Gi', '8', 2) as a number, by the client library's own parser."""
    from kubernetes.utils import parse_quantity as k8s_quantity

    return float(k8s_quantity(q))


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


# ------------------------------------------------------------------ the kubeconfig, read without a server

def kubeconfig_paths(kubeconfig: str | None) -> list[str]:
    """The kubeconfig files in use, as kubectl picks them: the setting, else $KUBECONFIG (a list of paths),
    else ~/.kube/config."""
    raw = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    return [os.path.expanduser(p) for p in raw.split(os.pathsep) if p]


def no_kubeconfig(where: str) -> ClusterError:
    return ClusterError(f"cannot load the Kubernetes configuration: no kubeconfig at {where}",
                        hint="set LAUNCHER_KUBECONFIG (or KUBECONFIG, or --kubeconfig) to your cluster's kubeconfig")


def uses_in_cluster_config(kubeconfig: str | None) -> bool:
    """Whether the launcher talks to the cluster through the pod's service account: it runs in a pod and no
    kubeconfig is set or present."""
    return not kubeconfig and not os.environ.get("KUBECONFIG") and \
        not os.path.exists(os.path.expanduser("~/.kube/config")) and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _read_kubeconfig(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else path
        raise SettingsError(f"the kubeconfig {where} is not valid YAML: {getattr(err, 'problem', None) or err}",
                            hint="fix it (`kubectl config view` shows what kubectl makes of it), or set "
                                 "LAUNCHER_KUBECONFIG to a valid kubeconfig") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"cannot read the kubeconfig {path}: {_first_line(err)}",
                            hint="make it readable, or set LAUNCHER_KUBECONFIG to a readable kubeconfig") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("contexts") or [], list):
        raise SettingsError(f"the kubeconfig {path} is not a kubeconfig (a YAML mapping with a contexts list)",
                            hint="fix it, or set LAUNCHER_KUBECONFIG to a valid kubeconfig")
    return data


def context_namespace(kubeconfig: str | None, context: str | None) -> tuple[str | None, str]:
    """(namespace, where it was found) of the kubeconfig's context ``context`` (default: its current context),
    as kubectl reads it: the first file of the list that names a current context or holds the context wins;
    files that do not exist are skipped. (None, "") when no context sets a namespace. A context named but not
    found, or a file that is not a kubeconfig, is a SettingsError."""
    paths = kubeconfig_paths(kubeconfig)
    files = [(p, _read_kubeconfig(p)) for p in paths if os.path.isfile(p)]
    if not files:
        if kubeconfig:  # one the user named, as kubectl --kubeconfig does; the default ~/.kube/config may be absent
            raise no_kubeconfig(os.pathsep.join(paths))
        return None, ""
    name = context or next((d["current-context"] for _, d in files if d.get("current-context")), None)
    if not name:
        return None, ""
    for path, data in files:
        for entry in data.get("contexts") or []:
            if isinstance(entry, dict) and entry.get("name") == name:
                ns = (entry.get("context") or {}).get("namespace") if isinstance(entry.get("context"), dict) \
                    else None
                if ns and not (isinstance(ns, str) and _DNS1123_LABEL.match(ns)):
                    raise SettingsError(f"the kubeconfig {path}: context {name} has namespace {ns!r}, which is not "
                                        "a namespace name (a DNS-1123 label)",
                                        hint=f"fix it (kubectl config set-context {name} --namespace=NAME), or "
                                             "pass --namespace / LAUNCHER_NAMESPACE")
                return (ns or None), (f"kubeconfig context {name} ({path})" if ns else "")
    if context:
        have = sorted({e.get("name") for _, d in files for e in d.get("contexts") or []
                       if isinstance(e, dict) and e.get("name")})
        raise SettingsError(f"LAUNCHER_CONTEXT / --context: no context {context!r} in the kubeconfig "
                            f"{os.pathsep.join(p for p, _ in files)}",
                            hint=f"pick one of: {', '.join(have)}" if have else "add the context to the kubeconfig")
    return None, ""


def default_namespace(kubeconfig: str | None, context: str | None) -> tuple[str, str]:
    """(namespace, where it came from) when none is set: the kubeconfig context's namespace; a launcher that
    runs in a pod (no kubeconfig), its service account's namespace; else ``default`` (what kubectl does)."""
    if uses_in_cluster_config(kubeconfig):
        try:
            with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
                ns = f.read().strip()
        except OSError:
            ns = ""
        if _DNS1123_LABEL.match(ns):
            return ns, "the pod's service account"
        return "default", "the default"
    ns, where = context_namespace(kubeconfig, context)
    return (ns, where) if ns else ("default", "the default")


@runtime_checkable
class ClusterReader(Protocol):
    """What the Kubernetes backend reads of a cluster to follow its runs (status, list, wait, logs): :class:`Kube`
    does it against an API server; a unit test's stand-in implements the same methods."""

    namespace: str

    def get_job(self, name: str) -> dict | None: ...

    def list_jobs(self, label_selector: str | None = None) -> list[dict]: ...

    def get_jobset(self, name: str) -> dict | None: ...

    def list_jobsets(self, label_selector: str | None = None) -> list[dict]: ...

    def list_pods(self, label_selector: str | None = None) -> list[dict]: ...

    def list_events(self, field_selector: str | None = None) -> list[dict]: ...

    def get_node(self, name: str) -> dict | None: ...

    def job_workload(self, job: dict) -> dict | None: ...

    def pod_log(self, pod: str, *, follow: bool = False, previous: bool = False, timestamps: bool = False,
                tail_lines: int | None = None) -> Iterator[str]: ...


def _plural(kind: str) -> str:
    return {"job": "jobs", "pod": "pods", "configmap": "configmaps", "secret": "secrets", "event": "events",
            "node": "nodes", "namespace": "namespaces", "serviceaccount": "serviceaccounts", "pods/log": "pods/log",
            "jobset": "jobsets"}.get(kind, kind)


class Kube:
    """A namespaced view of one cluster. Construct cheaply; connects on first use."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None, namespace: str = "default",
                 api_client: Any = None):
        self.kubeconfig = kubeconfig
        self.context = context
        self.namespace = namespace
        self._api = api_client
        self.server = api_client.configuration.host if api_client is not None else None
        self._jobsets_served: tuple[float, bool] | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> "Kube":
        return cls(settings.kubeconfig, settings.context, settings.namespace)

    # ------------------------------------------------------------------ connection
    @property
    def api(self):
        if self._api is None:
            self._api = self._connect()
            self.server = self._api.configuration.host
        return self._api

    def _connect(self):
        """An API client from the kubeconfig (or the pod's service account). No kubeconfig at all is a
        ClusterError (exit 3: we do not know where the cluster is); one that exists but cannot be used is a
        SettingsError (exit 2). Neither is retried: loading it again gives the same answer."""
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        cfg = client.Configuration()
        paths = kubeconfig_paths(self.kubeconfig)
        where = os.pathsep.join(paths)
        what = f"the kubeconfig {where}" + (f" (context {self.context})" if self.context else "")
        try:
            if uses_in_cluster_config(self.kubeconfig):
                config.load_incluster_config(client_configuration=cfg)
            elif not any(os.path.isfile(p) for p in paths):
                raise no_kubeconfig(where)
            else:
                config.load_kube_config(config_file=where, context=self.context, client_configuration=cfg)
        except ConfigException as err:
            raise SettingsError(f"cannot load the Kubernetes configuration from {what}: {err}",
                                hint="fix that kubeconfig, or set LAUNCHER_KUBECONFIG (or KUBECONFIG) to a valid "
                                     "one, and LAUNCHER_CONTEXT (--context) to one of its contexts") from None
        except (OSError, TypeError, ValueError, AttributeError, KeyError, yaml_error()) as err:
            raise SettingsError(f"cannot read {what}: {_first_line(err)}",
                                hint="fix that kubeconfig (it must be a YAML mapping, as `kubectl config view` "
                                     "prints), or set LAUNCHER_KUBECONFIG to a valid one") from None
        cfg.retries = 1
        return client.ApiClient(cfg)

    # ------------------------------------------------------------------ error mapping
    def call(self, verb: str, kind: str, name: str | None, ns: str | None, fn: Callable, *args: Any,
             **kwargs: Any) -> Any:
        """Run one API call; map failures to :class:`ClusterError` subclasses with one sentence."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        what = f"{kind} {name}" if name else _plural(kind)
        in_ns = f" in namespace {ns}" if ns and kind not in ("node", "namespace") else ""
        try:
            return fn(*args, **kwargs)
        except ApiException as err:
            raise self._api_error(err, verb, kind, what, in_ns) from None
        except (Urllib3Error, ConnectionError, TimeoutError) as err:
            reason = _connection_reason(err)
            raise ClusterUnreachable(
                f"cannot reach the Kubernetes API server at {self.server or '?'} ({reason})",
                hint="check that the cluster is running and that LAUNCHER_KUBECONFIG / LAUNCHER_CONTEXT "
                     f"point at it (kubeconfig: {self.kubeconfig or 'default'}, "
                     f"context: {self.context or 'current'})") from None

    def _api_error(self, err: Any, verb: str, kind: str, what: str, in_ns: str) -> ClusterError:
        status = int(getattr(err, "status", 0) or 0)
        body: dict[str, Any] = {}
        try:
            body = json.loads(err.body) if err.body else {}
        except (TypeError, ValueError):
            pass
        message = (body.get("message") if isinstance(body, dict) else None) or err.reason or str(status)
        if status == 0:
            return ClusterUnreachable(f"cannot reach the Kubernetes API server at {self.server or '?'} ({message})",
                                      hint="check that the cluster is running and the kubeconfig points at it")
        if status == 401:
            return ClusterError(f"the API server at {self.server} rejected our credentials (401 Unauthorized)",
                                hint="refresh the kubeconfig's token or certificate")
        if status == 403:
            return Forbidden(f"not allowed to {verb} {_plural(kind)}{in_ns}: {message}",
                             hint=f"ask a cluster admin to grant '{verb}' on '{_plural(kind)}'{in_ns} (the Helm "
                                  "chart's launcher Role does)")
        if status == 404:
            if not (isinstance(body, dict) and body.get("kind") == "Status"):
                # A bare 404 page, not a Status: the route is not served (yet), as while an API server starts.
                # Saying "not found" here would make `wait` believe the Job was deleted.
                return TransientClusterError(f"the API server at {self.server} does not serve {_plural(kind)} "
                                             "right now (404 page)", hint="retry in a moment")
            return NotFound(f"{what} not found{in_ns}: {message}", hint="check the name and namespace")
        if status == 409:
            return AlreadyExists(f"{what} already exists{in_ns}", hint="")
        if status == 422 or status == 400:
            return Invalid(f"the API server rejected {what}{in_ns}: {message}",
                           hint="this is a launcher bug or a cluster policy; rerun with LAUNCHER_DEBUG=1 and report it")
        if status == 429 or status >= 500:
            return TransientClusterError(f"the API server at {self.server} answered {status} to {verb} {what}: "
                                         f"{message}", hint="retry in a moment")
        return ClusterError(f"cannot {verb} {what}{in_ns}: {status} {message}")

    # ------------------------------------------------------------------ helpers
    def _json(self, resp: Any) -> Any:
        return json.loads(resp.data) if resp.data else {}  # every call here asks for the raw response

    def _batch(self):
        from kubernetes import client
        return client.BatchV1Api(self.api)

    def _core(self):
        from kubernetes import client
        return client.CoreV1Api(self.api)

    def _get_or_none(self, verb: str, kind: str, name: str, ns: str | None, fn: Callable, *args: Any,
                     **kw: Any) -> dict | None:
        try:
            return self._json(self.call(verb, kind, name, ns, fn, *args, _preload_content=False,
                                        _request_timeout=TIMEOUT, **kw))
        except NotFound:
            return None

    def _ns(self, namespace: str | None) -> str:
        return namespace or self.namespace

    # Jobs
    def create_job(self, body: dict, *, dry_run: bool = False, namespace: str | None = None) -> dict:
        ns = self._ns(namespace)
        kw = {"dry_run": "All"} if dry_run else {}
        return self._json(self.call("create", "job", body["metadata"]["name"], ns,
                                    self._batch().create_namespaced_job, ns, body,
                                    _preload_content=False, _request_timeout=TIMEOUT, **kw))

    def get_job(self, name: str, namespace: str | None = None) -> dict | None:
        ns = self._ns(namespace)
        return self._get_or_none("get", "job", name, ns, self._batch().read_namespaced_job, name, ns)

    def job_workload(self, job: dict) -> dict | None:
        """Kueue's Workload of a queued Job (it says why the Job waits, or that Kueue preempted it); None where
        Kueue is not installed or the launcher may not read Workloads: the status then names only the queue."""
        from kubernetes import client

        ns = self._ns(job["metadata"].get("namespace"))
        try:
            data = self._json(self.call("list", "workload", None, ns, client.CustomObjectsApi(self.api)
                                        .list_namespaced_custom_object, "kueue.x-k8s.io", "v1beta2", ns, "workloads",
                                        label_selector=f"kueue.x-k8s.io/job-uid={job['metadata'].get('uid')}",
                                        _preload_content=False, _request_timeout=TIMEOUT))
        except ClusterError:
            return None
        items = data.get("items") or []
        return max(items, key=lambda w: w["metadata"].get("creationTimestamp") or "") if items else None

    def list_jobs(self, label_selector: str | None = None, namespace: str | None = None) -> list[dict]:
        ns = self._ns(namespace)
        kw = {"label_selector": label_selector} if label_selector else {}
        data = self._json(self.call("list", "job", None, ns, self._batch().list_namespaced_job, ns,
                                    _preload_content=False, _request_timeout=TIMEOUT, **kw))
        return data.get("items") or []

    def delete_job(self, name: str, *, propagation: str = "Foreground", namespace: str | None = None) -> bool:
        """Delete a Job and (by propagation) its pods; False when it was already gone."""
        ns = self._ns(namespace)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            self.call("delete", "job", name, ns, self._batch().delete_namespaced_job, name, ns, body=body,
                      _preload_content=False, _request_timeout=TIMEOUT)
            return True
        except NotFound:
            return False

    # JobSets (sigs.k8s.io/jobset): a multi-node run where settings.multinode_workload asks for them
    def _custom(self):
        from kubernetes import client
        return client.CustomObjectsApi(self.api)

    def serves_jobsets(self) -> bool:
        """Whether the cluster serves JobSet's API group and version (API discovery of /apis, which every
        authenticated user may read; the group holds only ``jobsets``); the answer is kept for a minute."""
        from kubernetes import client

        now = time.monotonic()
        if self._jobsets_served is None or now - self._jobsets_served[0] > DISCOVERY_TTL:
            data = self._json(self.call("get", "API group", None, None, client.ApisApi(self.api).get_api_versions,
                                        _preload_content=False, _request_timeout=TIMEOUT))
            served = any(g.get("name") == JOBSET[0] and any(v.get("version") == JOBSET[1]
                                                            for v in g.get("versions") or [])
                         for g in data.get("groups") or [])
            self._jobsets_served = (now, served)
        return self._jobsets_served[1]

    def create_jobset(self, body: dict, *, dry_run: bool = False, namespace: str | None = None) -> dict:
        ns = self._ns(namespace)
        kw = {"dry_run": "All"} if dry_run else {}
        return self._json(self.call("create", "jobset", body["metadata"]["name"], ns,
                                    self._custom().create_namespaced_custom_object, *JOBSET[:2], ns, JOBSET[2], body,
                                    _preload_content=False, _request_timeout=TIMEOUT, **kw))

    def get_jobset(self, name: str, namespace: str | None = None) -> dict | None:
        """The JobSet, or None when there is none (or the cluster serves no JobSets)."""
        if not self.serves_jobsets():
            return None
        ns = self._ns(namespace)
        return self._get_or_none("get", "jobset", name, ns, self._custom().get_namespaced_custom_object,
                                 *JOBSET[:2], ns, JOBSET[2], name)

    def list_jobsets(self, label_selector: str | None = None, namespace: str | None = None) -> list[dict]:
        """The namespace's JobSets; none where the cluster serves no JobSets."""
        if not self.serves_jobsets():
            return []
        ns = self._ns(namespace)
        kw = {"label_selector": label_selector} if label_selector else {}
        data = self._json(self.call("list", "jobset", None, ns, self._custom().list_namespaced_custom_object,
                                    *JOBSET[:2], ns, JOBSET[2], _preload_content=False, _request_timeout=TIMEOUT,
                                    **kw))
        return data.get("items") or []

    def delete_jobset(self, name: str, *, propagation: str = "Foreground", namespace: str | None = None) -> bool:
        """Delete a JobSet and (by propagation) its Jobs, pods and Service; False when it was already gone."""
        ns = self._ns(namespace)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            self.call("delete", "jobset", name, ns, self._custom().delete_namespaced_custom_object, *JOBSET[:2], ns,
                      JOBSET[2], name, body=body, _preload_content=False, _request_timeout=TIMEOUT)
            return True
        except NotFound:
            return False

    # ConfigMaps
    def create_configmap(self, body: dict, *, dry_run: bool = False, namespace: str | None = None) -> dict:
        ns = self._ns(namespace)
        kw = {"dry_run": "All"} if dry_run else {}
        return self._json(self.call("create", "configmap", body["metadata"]["name"], ns,
                                    self._core().create_namespaced_config_map, ns, body,
                                    _preload_content=False, _request_timeout=TIMEOUT, **kw))

    def get_configmap(self, name: str, namespace: str | None = None) -> dict | None:
        ns = self._ns(namespace)
        return self._get_or_none("get", "configmap", name, ns, self._core().read_namespaced_config_map, name, ns)

    def patch_configmap(self, name: str, patch: dict, namespace: str | None = None) -> dict:
        ns = self._ns(namespace)
        return self._json(self.call("patch", "configmap", name, ns, self._core().patch_namespaced_config_map,
                                    name, ns, patch, _preload_content=False, _request_timeout=TIMEOUT))

    def delete_configmap(self, name: str, *, uid: str | None = None, namespace: str | None = None) -> bool:
        """Delete a ConfigMap (only if it still has ``uid``, when given); False when gone or replaced."""
        ns = self._ns(namespace)
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.call("delete", "configmap", name, ns, self._core().delete_namespaced_config_map, name, ns,
                      body=body, _preload_content=False, _request_timeout=TIMEOUT)
            return True
        except (NotFound, AlreadyExists):  # 409: the uid precondition failed, someone replaced it
            return False

    # Services (the headless Service of a multi-node run)
    def create_service(self, body: dict, *, dry_run: bool = False, namespace: str | None = None) -> dict:
        ns = self._ns(namespace)
        kw = {"dry_run": "All"} if dry_run else {}
        return self._json(self.call("create", "service", body["metadata"]["name"], ns,
                                    self._core().create_namespaced_service, ns, body,
                                    _preload_content=False, _request_timeout=TIMEOUT, **kw))

    def get_service(self, name: str, namespace: str | None = None) -> dict | None:
        ns = self._ns(namespace)
        return self._get_or_none("get", "service", name, ns, self._core().read_namespaced_service, name, ns)

    # Read-only lookups
    def get_namespace(self, name: str | None = None) -> dict | None:
        ns = self._ns(name)
        return self._get_or_none("get", "namespace", ns, None, self._core().read_namespace, ns)

    def get_secret(self, name: str, namespace: str | None = None) -> dict | None:
        ns = self._ns(namespace)
        return self._get_or_none("get", "secret", name, ns, self._core().read_namespaced_secret, name, ns)

    def get_service_account(self, name: str, namespace: str | None = None) -> dict | None:
        ns = self._ns(namespace)
        return self._get_or_none("get", "serviceaccount", name, ns, self._core().read_namespaced_service_account,
                                 name, ns)

    def get_node(self, name: str) -> dict | None:
        return self._get_or_none("get", "node", name, None, self._core().read_node, name)

    def list_nodes(self) -> list[dict]:
        data = self._json(self.call("list", "node", None, None, self._core().list_node, _preload_content=False,
                                    _request_timeout=TIMEOUT))
        return data.get("items") or []

    def list_pods(self, label_selector: str | None = None, namespace: str | None = None) -> list[dict]:
        ns = self._ns(namespace)
        kw = {"label_selector": label_selector} if label_selector else {}
        data = self._json(self.call("list", "pod", None, ns, self._core().list_namespaced_pod, ns,
                                    _preload_content=False, _request_timeout=TIMEOUT, **kw))
        return data.get("items") or []

    def list_events(self, field_selector: str | None = None, namespace: str | None = None) -> list[dict]:
        ns = self._ns(namespace)
        kw = {"field_selector": field_selector} if field_selector else {}
        data = self._json(self.call("list", "event", None, ns, self._core().list_namespaced_event, ns,
                                    _preload_content=False, _request_timeout=TIMEOUT, **kw))
        return data.get("items") or []

    def pod_log(self, pod: str, *, container: str = "trainer", follow: bool = False, previous: bool = False,
                timestamps: bool = False, tail_lines: int | None = None, read_timeout: float = 120,
                namespace: str | None = None) -> Iterator[str]:
        """Lines of a container's log (without newline); follows when asked.

        A dropped connection raises :class:`TransientClusterError` from the iterator, so a caller can reconnect.
        """
        from urllib3.exceptions import HTTPError as Urllib3Error

        ns = self._ns(namespace)
        kw: dict[str, Any] = {"container": container, "follow": follow, "previous": previous,
                              "timestamps": timestamps}
        if tail_lines is not None:
            kw["tail_lines"] = tail_lines
        resp = self.call("get", "pods/log", pod, ns, self._core().read_namespaced_pod_log, pod, ns,
                         _preload_content=False, _request_timeout=(5, read_timeout), **kw)
        buf = b""
        try:
            for chunk in resp.stream(4096, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    yield line.decode("utf-8", "replace")
            if buf:
                yield buf.decode("utf-8", "replace")
        except (Urllib3Error, ConnectionError, TimeoutError) as err:
            raise TransientClusterError(f"the log stream of pod {pod} was cut ({_connection_reason(err)})") from None
        finally:
            resp.release_conn()


def _connection_reason(err: BaseException) -> str:
    text = str(getattr(err, "reason", None) or err)
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return "timed out"
    if "name or service not known" in low or "nodename nor servname" in low or "resolve" in low:
        return "host name not found"
    if "certificate" in low or "ssl" in low:
        return "TLS error: " + text[:160]
    return type(err).__name__ + (f": {text[:160]}" if text else "")


class Outage:
    """Consecutive failures to reach the API server (unreachable, 5xx, 429), counted across calls until one
    succeeds: ``wait`` and ``logs -f`` outlive an API server restart, but not a cluster that never answers.
    The first failure is noted ("… ; retrying for up to 2m"), then a progress line every ``every`` seconds;
    after ``limit`` seconds in a row it raises :class:`ClusterUnreachable` naming the limit and how to raise
    it. ``limit`` None: retry for ever (only where the caller bounds the wait itself)."""

    def __init__(self, limit: float | None, note: Callable[[str], None] | None = None, *, every: float = 30.0,
                 clock: Callable[[], float] | None = None):
        self.limit = limit
        self.note = note or (lambda msg: None)
        self.every = every
        self.clock = clock or (lambda: time.monotonic())
        self.since: float | None = None  # when the current outage began
        self._said_at = 0.0

    def failed(self, err: ClusterError) -> float:
        """Count one failure; raise once the outage has lasted ``limit``; else the seconds left before it has."""
        now = self.clock()
        if self.since is None:
            self.since, self._said_at = now, now
            bound = f" for up to {_seconds(self.limit)} (LAUNCHER_CLUSTER_TIMEOUT)" if self.limit else ""
            self.note(f"… {err.message}; retrying{bound}")
        lasted = now - self.since
        if self.limit is not None and lasted >= self.limit:
            raise ClusterUnreachable(
                f"gave up: the Kubernetes API server has not answered for {_seconds(lasted)} ({err.message})",
                hint="check that the cluster is up and that LAUNCHER_KUBECONFIG / LAUNCHER_CONTEXT point at it; to "
                     f"wait longer for it, set LAUNCHER_CLUSTER_TIMEOUT (now {_seconds(self.limit)}, e.g. 10m). The "
                     "run itself is not affected: wait for it again once the cluster answers") from None
        if now - self._said_at >= self.every:
            self._said_at = now
            left = f"; giving up in {_seconds(self.limit - lasted)}" if self.limit else ""
            self.note(f"… still retrying: no answer from the API server for {_seconds(lasted)}{left}")
        return float("inf") if self.limit is None else self.limit - lasted

    def recovered(self) -> None:
        """A call succeeded: the outage (if any) is over, and the next one is news."""
        if self.since is not None:
            self.note(f"… the API server answers again (after {_seconds(self.clock() - self.since)})")
        self.since = None


def _seconds(s: float | None) -> str:
    return "ever" if s is None else duration(max(0.0, s))


def with_retries(fn: Callable[[], Any], *, deadline: float | None = None, outage: Outage | None = None,
                 max_delay: float = 15.0) -> Any:
    """Call ``fn`` until it stops raising unreachable/transient errors (exponential backoff); re-raise when
    ``deadline`` (a time.monotonic() value) passes, and stop with :class:`ClusterUnreachable` once ``outage``
    says the API server has not answered for its limit. Other errors (403, 404, a bad kubeconfig) are
    deterministic and raised at once. Used by ``wait`` and ``logs -f`` to outlive an API server restart."""
    outage = outage or Outage(None)
    policy = RetryPolicy(base_delay=0.5, max_delay=max_delay)
    failures = 0
    while True:
        try:
            result = fn()
        except (ClusterUnreachable, TransientClusterError) as err:
            failures += 1
            delay = policy.delay(failures)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            left = outage.failed(err)
            time.sleep(max(0.0, min(delay, left)))
            continue
        outage.recovered()
        return result
