"""The one adaptor to the Kubernetes API. ``kubernetes`` is imported here only, and lazily.

Everything comes back as plain dicts (the API's JSON), which is what
:mod:`launcher.diagnose` and the tests read. Every failure becomes one sentence:
an unreachable server names the server and the fix; a 403 names the verb and
resource that RBAC lacks.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterator

from launcher.errors import (AlreadyExists, ClusterError, ClusterUnreachable, Forbidden, Invalid,  # noqa: F401
                             NotFound, TransientClusterError)

#: (connect, read) seconds for ordinary calls; a restarting API server must not hang us.
TIMEOUT = (5, 30)
#: JobSet's API (sigs.k8s.io/jobset): group, version, plural.
JOBSET = ("jobset.x-k8s.io", "v1alpha2", "jobsets")
#: How long a "does the cluster serve JobSets" answer is reused.
DISCOVERY_TTL = 60.0


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
        self.server = getattr(getattr(api_client, "configuration", None), "host", None)
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
        import os

        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        cfg = client.Configuration()
        where = self.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        try:
            in_cluster = not self.kubeconfig and not os.environ.get("KUBECONFIG") and \
                not os.path.exists(os.path.expanduser("~/.kube/config")) and \
                bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
            if in_cluster:
                config.load_incluster_config(client_configuration=cfg)
            else:
                config.load_kube_config(config_file=self.kubeconfig, context=self.context,
                                        client_configuration=cfg)
        except ConfigException as err:
            raise ClusterUnreachable(f"cannot load the Kubernetes configuration from {where}"
                                     + (f" (context {self.context})" if self.context else "") + f": {err}",
                                     hint="set LAUNCHER_KUBECONFIG (or KUBECONFIG) to a valid kubeconfig, "
                                          "and LAUNCHER_CONTEXT to one of its contexts") from None
        except (OSError, TypeError, ValueError) as err:
            raise ClusterUnreachable(f"cannot read the kubeconfig {where}: {err}",
                                     hint="set LAUNCHER_KUBECONFIG to a readable kubeconfig") from None
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
        data = resp.data if hasattr(resp, "data") else resp
        return json.loads(data) if data else {}

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


def with_retries(fn: Callable[[], Any], *, deadline: float | None = None, on_retry: Callable[[str], None] | None = None,
                 max_delay: float = 15.0) -> Any:
    """Call ``fn`` until it stops raising unreachable/transient errors (exponential backoff), or ``deadline``
    (a time.monotonic() value) passes, then re-raise. Used by ``wait`` and ``logs -f`` to outlive an API
    server restart."""
    delay = 0.5
    while True:
        try:
            return fn()
        except (ClusterUnreachable, TransientClusterError) as err:
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            if on_retry:
                on_retry(err.message)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
