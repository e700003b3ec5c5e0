"""The launcher's environment: every bad LAUNCHER_* variable and kubeconfig is one error that names the variable
(or file) and the fix, exit 2, never a traceback; the namespace follows the kubeconfig context as kubectl's does."""
from __future__ import annotations

import time

import pytest
import yaml
from typer.testing import CliRunner

from launcher import cli
from launcher.errors import SettingsError
from launcher.settings import make_settings

pytestmark = pytest.mark.unit

SPEC = "name: r\nbase_model: {uri: s3://models/x/}\ndataset: {train: s3://data/t.jsonl}\noutput: s3://runs/p\n"


@pytest.fixture(autouse=True)
def no_kubeconfig(monkeypatch, tmp_path):
    """No kubeconfig, no pod: the namespace's last resort is `default` unless a test says otherwise."""
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def dry_run(tmp_path, *extra: str):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    return CliRunner().invoke(cli.app, [*extra, "submit", str(spec), "--dry-run"])


def kubeconfig(path, contexts: dict[str, str | None], current: str | None = "a", server="https://127.0.0.1:9"):
    """A kubeconfig file with one context per name (namespace or None), all on one (dead) server."""
    data = {"apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": server}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": n, "context": {"cluster": "c", "user": "u", **({"namespace": ns} if ns else {})}}
                         for n, ns in contexts.items()]}
    if current:
        data["current-context"] = current
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------ LAUNCHER_* variables

@pytest.mark.parametrize("var,value,says", [
    ("LAUNCHER_NODE_SELECTOR", "not json", "LAUNCHER_NODE_SELECTOR: not valid JSON"),
    ("LAUNCHER_TOLERATIONS", "[", "LAUNCHER_TOLERATIONS: not valid JSON"),
    ("LAUNCHER_TOLERATIONS", '[{"key": "gpu", "operator": "Sometimes"}]', "operator must be Equal or Exists"),
    ("LAUNCHER_NODE_SELECTOR", '{"pool": "a b"}', "not a label value"),
    ("LAUNCHER_NAMESPACE", "Bad_NS", "'Bad_NS' is not a namespace name"),
    ("LAUNCHER_S3_ENDPOINT", "minio:9000", "is not an http(s) URL"),
    ("LAUNCHER_S3_ENDPOINT", "not a url", "is not an http(s) URL"),
    ("LAUNCHER_GPU_RESOURCE", "gpu", "'gpu' is not an extended resource name"),
    ("LAUNCHER_GPU_RESOURCE", "kubernetes.io/gpu", "is not an extended resource name"),
    ("LAUNCHER_IMAGE", "Not An Image!", "is not an image reference"),
    ("LAUNCHER_IMAGE_PULL_POLICY", "Sometimes", "'Always', 'IfNotPresent' or 'Never'"),
    ("LAUNCHER_SERVICE_ACCOUNT", "Trainer_SA", "is not a Kubernetes object name"),
    ("LAUNCHER_CLUSTER_TIMEOUT", "soon", "is not a duration"),
    ("LAUNCHER_CLUSTER_TIMEOUT", "0", "greater than 0"),
    ("LAUNCHER_NAMESPCE", "ml", "LAUNCHER_NAMESPCE: not a launcher setting (did you mean LAUNCHER_NAMESPACE?)"),
])
def test_a_bad_variable_is_exit_2_naming_it_and_the_fix_without_a_traceback(tmp_path, monkeypatch, var, value, says):
    monkeypatch.setenv(var, value)
    r = dry_run(tmp_path)
    assert r.exit_code == 2, r.output
    assert var in r.output and says in r.output, r.output
    assert "fix:" in r.output and "Traceback" not in r.output


def test_every_bad_variable_is_listed_at_once(monkeypatch):
    monkeypatch.setenv("LAUNCHER_NAMESPACE", "Bad_NS")
    monkeypatch.setenv("LAUNCHER_IMAGE", "trainer:a tag with spaces")
    monkeypatch.setenv("LAUNCHER_IMAGGE", "x")
    with pytest.raises(SettingsError) as e:
        make_settings()
    assert e.value.message.startswith("3 invalid launcher settings:")
    for var in ("LAUNCHER_NAMESPACE", "LAUNCHER_IMAGE (image)", "LAUNCHER_IMAGGE"):
        assert var in e.value.message


def test_an_endpoint_with_credentials_is_refused_without_echoing_them(monkeypatch):
    monkeypatch.setenv("LAUNCHER_S3_ENDPOINT", "http://AKIAEXAMPLE:s3cr3tvalue@minio:9000")
    with pytest.raises(SettingsError) as e:
        make_settings()
    assert "LAUNCHER_S3_ENDPOINT" in str(e.value) and "user name or password" in str(e.value)
    assert "s3cr3tvalue" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)


def test_good_values_are_accepted(monkeypatch):
    monkeypatch.setenv("LAUNCHER_S3_ENDPOINT", "")
    monkeypatch.setenv("LAUNCHER_CLUSTER_TIMEOUT", "5m")
    monkeypatch.setenv("LAUNCHER_IMAGE", "registry.example.com:5000/team/trainer:1.2@sha256:" + "a" * 64)
    monkeypatch.setenv("LAUNCHER_GPU_RESOURCE", "amd.com/gpu")
    monkeypatch.setenv("LAUNCHER_DEBUG", "0")  # the launcher's own, not a setting
    s = make_settings()
    assert s.s3_endpoint is None and s.cluster_timeout == 300 and s.gpu_resource == "amd.com/gpu"
    assert make_settings(s3_endpoint="https://s3.us-east-1.amazonaws.com").s3_endpoint


def test_a_value_from_the_config_file_names_the_file(monkeypatch, tmp_path):
    cfg = tmp_path / "l.yaml"
    cfg.write_text("namespace: Bad_NS\n")
    monkeypatch.setenv("LAUNCHER_CONFIG", str(cfg))
    with pytest.raises(SettingsError, match=f"{cfg}: namespace: 'Bad_NS' is not a namespace name"):
        make_settings()


# ------------------------------------------------------------------------------ the namespace

def test_the_kubeconfig_contexts_namespace_is_the_default(tmp_path, monkeypatch):
    path = kubeconfig(tmp_path / "kc", {"a": "ml", "b": "team-b", "c": None})
    s = make_settings(kubeconfig=str(path))
    assert s.namespace == "ml" and s.namespace_from == f"kubeconfig context a ({path})"
    assert make_settings(kubeconfig=str(path), context="b").namespace == "team-b", "LAUNCHER_CONTEXT's namespace"
    assert make_settings(kubeconfig=str(path), context="c").namespace == "default", "a context without one"
    monkeypatch.setenv("LAUNCHER_NAMESPACE", "from-env")
    assert make_settings(kubeconfig=str(path)).namespace == "from-env", "the variable wins over the context"
    assert make_settings(kubeconfig=str(path), namespace="from-flag").namespace == "from-flag", "the flag wins"


def test_kubeconfig_from_the_environment_as_kubectl_reads_it(tmp_path, monkeypatch):
    first = kubeconfig(tmp_path / "first", {"x": None}, current=None)  # no current context here
    second = kubeconfig(tmp_path / "second", {"a": "ml"})
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{first}:{second}")
    assert make_settings().namespace == "ml"


def test_dry_run_renders_into_the_contexts_namespace(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kc", {"a": "ml"})))
    r = dry_run(tmp_path)
    assert r.exit_code == 0, r.output
    docs = list(yaml.safe_load_all(r.output))
    assert {d["metadata"]["namespace"] for d in docs if d} == {"ml"}
    r = dry_run(tmp_path, "-n", "other")
    assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(r.output) if d} == {"other"}


def test_a_service_account_namespace_is_used_in_a_pod(tmp_path, monkeypatch):
    from launcher import kube

    sa = tmp_path / "namespace"
    sa.write_text("ml-system\n")
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_NAMESPACE", str(sa))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    s = make_settings()
    assert s.namespace == "ml-system" and s.namespace_from == "the pod's service account"


def test_no_kubeconfig_and_no_pod_is_default():
    s = make_settings()
    assert s.namespace == "default" and s.namespace_from == "the default"


@pytest.mark.parametrize("text,says", [
    ("clusters: [\n", "is not valid YAML"),
    ("- just\n- a list\n", "is not a kubeconfig"),
    ("contexts: 7\n", "is not a kubeconfig"),
    ("contexts:\n- name: a\n  context: {namespace: Bad_NS}\ncurrent-context: a\n", "not a namespace name"),
])
def test_a_garbage_kubeconfig_is_exit_2_naming_the_file(tmp_path, monkeypatch, text, says):
    path = tmp_path / "kc"
    path.write_text(text)
    monkeypatch.setenv("LAUNCHER_KUBECONFIG", str(path))
    r = dry_run(tmp_path)
    assert r.exit_code == 2, r.output
    assert str(path) in r.output and says in r.output and "fix:" in r.output and "Traceback" not in r.output


def test_a_context_that_is_not_there_names_the_ones_that_are(tmp_path):
    path = kubeconfig(tmp_path / "kc", {"a": "ml", "b": None})
    with pytest.raises(SettingsError) as e:
        make_settings(kubeconfig=str(path), context="prod")
    assert "no context 'prod'" in e.value.message and e.value.hint == "pick one of: a, b"


def test_a_garbage_kubeconfig_is_not_retried_by_wait(tmp_path, monkeypatch):
    """Even with the namespace given (no kubeconfig read for it), loading the kubeconfig to connect fails once,
    with exit 2: retrying a file that cannot be parsed gives the same answer."""
    pytest.importorskip("kubernetes")
    path = tmp_path / "kc"
    path.write_text("apiVersion: v1\nclusters: 7\n")
    monkeypatch.setenv("LAUNCHER_KUBECONFIG", str(path))
    t0 = time.monotonic()
    r = CliRunner().invoke(cli.app, ["-n", "ml", "wait", "r"])
    assert r.exit_code == 2, r.output
    assert str(path) in r.output and "retrying" not in r.output and "Traceback" not in r.output
    assert time.monotonic() - t0 < 10


# ------------------------------------------------------------------------------ bounded waits

@pytest.mark.parametrize("verb", [["wait", "r"], ["logs", "r", "-f"]])
def test_wait_and_follow_give_up_on_a_cluster_that_never_answers(tmp_path, monkeypatch, verb):
    """A real kubeconfig whose server is the discard port (nothing listens): connection refused on every try."""
    pytest.importorskip("kubernetes")
    monkeypatch.setenv("LAUNCHER_KUBECONFIG", str(kubeconfig(tmp_path / "kc", {"a": "ml"})))
    monkeypatch.setenv("LAUNCHER_CLUSTER_TIMEOUT", "2")
    t0 = time.monotonic()
    r = CliRunner().invoke(cli.app, verb)
    took = time.monotonic() - t0
    assert r.exit_code == 3, r.output
    assert "retrying for up to 2s (LAUNCHER_CLUSTER_TIMEOUT)" in r.output
    assert "gave up: the Kubernetes API server has not answered for" in r.output
    assert "LAUNCHER_CLUSTER_TIMEOUT" in r.output.split("fix:")[1] and "Traceback" not in r.output
    assert took < 30, took


@pytest.mark.parametrize("args,says", [
    (["wait", "r", "--timeout", "-5"], "timeout must be a number of seconds above 0"),
    (["wait", "r", "--timeout", "0"], "timeout must be a number of seconds above 0"),
    (["wait", "r", "--interval", "-1"], "interval must be a number of seconds above 0"),
    (["logs", "r", "--tail", "-3"], "tail must be a number of lines, 0 or more"),
])
def test_negative_numbers_are_usage_errors_before_any_cluster_call(args, says):
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 2 and says in r.output and "fix:" in r.output and "Traceback" not in r.output, r.output


def test_an_outage_is_retried_with_progress_lines_then_stops_at_its_limit():
    from launcher.errors import ClusterUnreachable
    from launcher.kube import Outage

    now = [0.0]
    notes: list[str] = []
    outage = Outage(120, notes.append, every=30, clock=lambda: now[0])
    err = ClusterUnreachable("cannot reach the Kubernetes API server at https://x (connection refused)")
    for t in range(0, 120, 10):
        now[0] = t
        assert outage.failed(err) == 120 - t
    assert notes[0].endswith("(connection refused); retrying for up to 2m00s (LAUNCHER_CLUSTER_TIMEOUT)")
    assert [n for n in notes[1:]] == [f"… still retrying: no answer from the API server for {a}; giving up in {b}"
                                      for a, b in (("30s", "1m30s"), ("1m00s", "1m00s"), ("1m30s", "30s"))]
    now[0] = 125
    outage.recovered()  # one answer: the count starts again
    assert notes[-1] == "… the API server answers again (after 2m05s)"
    now[0] = 1000
    outage.failed(err)
    now[0] = 1119
    outage.failed(err)
    now[0] = 1120
    with pytest.raises(ClusterUnreachable) as e:
        outage.failed(err)
    assert "has not answered for 2m00s" in e.value.message and "LAUNCHER_CLUSTER_TIMEOUT (now 2m00s" in e.value.hint


def test_a_long_run_is_not_bounded_by_the_outage_limit(monkeypatch):
    """Hours of answers, each after a short blip: never 120 s in a row, so the wait goes on."""
    from launcher.errors import TransientClusterError
    from launcher.kube import Outage, with_retries

    now = [0.0]
    monkeypatch.setattr(time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    outage = Outage(120, clock=lambda: now[0])
    for _ in range(500):  # 500 polls, each failing 3 times (at most 0.5 + 1 + 2 s of jittered backoff) before it answers
        fails = iter([True, True, True, False])

        def poll():
            now[0] += 30
            if next(fails):
                raise TransientClusterError("the API server at x answered 503")
            return "Running"

        assert with_retries(poll, outage=outage) == "Running"
    assert now[0] > 10 * 3600


def test_deterministic_cluster_errors_are_not_retried():
    from launcher.errors import Forbidden
    from launcher.kube import Outage, with_retries

    calls = []

    def forbidden():
        calls.append(1)
        raise Forbidden("not allowed to list jobs in namespace ml")

    with pytest.raises(Forbidden):
        with_retries(forbidden, outage=Outage(120))
    assert len(calls) == 1
