"""The chart's NetworkPolicies: who may talk to training pods, to S3 and to the dev MinIO.

No CNI here enforces NetworkPolicy (kwok pods are simulated; the real node's bridge CNI enforces none),
so no packet is dropped in these tests. What is proved: the policies are what the docs say
(training pods accept only their peers and reach only DNS, S3 and peers; the dev MinIO accepts only its
clients and makes no connections), their selectors pick the pods that launcher/render.py and
the chart render, every pod the chart or the launcher makes is selected by one, and
`helm install` creates them in the real API server, whose own label-selector matching
finds the launcher's training pod.
"""
from __future__ import annotations

import time

import pytest
import yaml

from jobs.spec import TrainingRunSpec
from launcher.render import render_job
from tests.integration.test_chart import (CHART, EXAMPLE_SPEC, find, full_values, helm, install,  # noqa: F401
                                          run_helm, settings_from_chart, template)

pytestmark = pytest.mark.helm

DNS = [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]
PUBLIC_HTTPS = [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"]}}],
    "ports": [{"protocol": "TCP", "port": 443}]}]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []), "NotIn": not present or value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


def launcher_pod_labels(docs: list[dict]) -> dict[str, str]:
    """The labels of the training pod that `launcher submit` makes with this chart's settings."""
    spec = TrainingRunSpec.model_validate(yaml.safe_load(EXAMPLE_SPEC.read_text()))
    return render_job(spec, settings_from_chart(docs, "ns-test"))["spec"]["template"]["metadata"]["labels"]


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            out[f"{d['kind']}/{d['metadata']['name']}"] = d["spec"]["template"]["metadata"]["labels"]
        elif d["kind"] == "Pod":
            out[f"Pod/{d['metadata']['name']}"] = d["metadata"]["labels"]
    return out


def test_training_pods_accept_only_their_peers_and_reach_only_dns_s3_and_peers(helm):
    docs = template(helm)
    policy = find(docs, "NetworkPolicy", "lora-jobs-training")["spec"]
    trainer = launcher_pod_labels(docs)
    assert selects(policy["podSelector"], trainer)
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    # A multi-node run's pods rendezvous and exchange gradients: training pods, every port, both ways.
    assert len(policy["ingress"]) == 1 and "ports" not in policy["ingress"][0]
    assert [selects(p["podSelector"], trainer) for p in policy["ingress"][0]["from"]] == [True]
    assert not selects(policy["ingress"][0]["from"][0]["podSelector"],
                       {"app.kubernetes.io/name": "lora-jobs", "app.kubernetes.io/component": "launcher"})
    peers = policy["egress"][-1]
    assert "ports" not in peers and [selects(p["podSelector"], trainer) for p in peers["to"]] == [True]
    assert policy["egress"] == DNS + PUBLIC_HTTPS + [peers]
    narrowed = template(helm, values={"networkPolicy": {"s3Egress": [{"cidr": "10.20.0.0/16", "ports": [9000]}]}})
    assert find(narrowed, "NetworkPolicy", "lora-jobs-training")["spec"]["egress"] == DNS + [
        {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"protocol": "TCP", "port": 9000}]}, peers]


def test_with_the_dev_minio_training_pods_reach_its_pods_and_it_accepts_only_its_clients(helm):
    docs = template(helm, values={"minio": {"enabled": True, "port": 9100}, "networkPolicy": {"s3Egress": []}})
    pods = pod_templates(docs)
    minio_labels = pods["Deployment/lora-jobs-minio"]
    training = find(docs, "NetworkPolicy", "lora-jobs-training")["spec"]
    assert training["egress"][:1] == DNS and len(training["egress"]) == 3  # DNS, MinIO, peers
    to_minio = training["egress"][1]
    assert to_minio["ports"] == [{"protocol": "TCP", "port": 9100}]
    assert [selects(p["podSelector"], minio_labels) for p in to_minio["to"]] == [True]
    assert not selects(to_minio["to"][0]["podSelector"], pods["Job/lora-jobs-minio-buckets"])

    minio = find(docs, "NetworkPolicy", "lora-jobs-minio")["spec"]
    assert selects(minio["podSelector"], minio_labels) and minio["egress"] == []
    assert sorted(minio["policyTypes"]) == ["Egress", "Ingress"] and len(minio["ingress"]) == 1
    rule = minio["ingress"][0]
    assert rule["ports"] == [{"protocol": "TCP", "port": 9100}]
    allowed = lambda labels: any(selects(p["podSelector"], labels) for p in rule["from"])  # noqa: E731
    assert allowed(launcher_pod_labels(docs))
    assert allowed(pods["Job/lora-jobs-minio-buckets"]) and allowed(pods["Pod/lora-jobs-test-s3"])
    assert not allowed({"app.kubernetes.io/name": "something-else"})
    assert not allowed({"app.kubernetes.io/name": "lora-jobs", "app.kubernetes.io/component": "launcher"})


def test_every_pod_the_chart_or_the_launcher_makes_is_selected_by_a_policy(helm):
    docs = template(helm, values=full_values())
    selectors = [d["spec"]["podSelector"] for d in docs if d["kind"] == "NetworkPolicy"]
    pods = pod_templates(docs) | {"launcher's training Job": launcher_pod_labels(docs)}
    assert len(pods) == 5, pods  # MinIO, its hook, the helm test, the GitOps Job, the launcher's Job
    unselected = [name for name, labels in pods.items() if not any(selects(s, labels) for s in selectors)]
    assert not unselected
    off = template(helm, values={**full_values(), "networkPolicy": {"enabled": False}})
    assert not [d for d in off if d["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize("values, named", [
    ({"networkPolicy": {"s3Egress": [{"cidr": "s3.amazonaws.com", "ports": [443]}]}}, "/networkPolicy/s3Egress/0/cidr"),
    ({"networkPolicy": {"s3Egress": [{"cidr": "10.0.0.0/8"}]}}, "/networkPolicy/s3Egress/0"),
    ({"networkPolicy": {"enable": True}}, "/networkPolicy"),
])
def test_bad_network_policy_values_fail_on_the_schema(helm, values, named):
    proc = run_helm(helm, "template", "x", str(CHART), values=values, check=False)
    assert proc.returncode != 0 and f"at '{named}'" in proc.stderr, proc.stderr


@pytest.mark.kube
def test_helm_install_creates_them_and_the_api_server_selects_the_launchers_training_pod(
        helm, stack, kube_api, namespace):
    from kubernetes import client

    install(helm, stack, namespace)
    try:
        net = client.NetworkingV1Api(kube_api)
        names = {p.metadata.name for p in net.list_namespaced_network_policy(namespace).items}
        assert names == {"lora-jobs-training", "lora-jobs-test"}
        policy = net.read_namespaced_network_policy("lora-jobs-training", namespace)
        assert len(policy.spec.ingress) == 1 and policy.spec.ingress[0].ports is None  # stored: peers only
        assert sorted(policy.spec.policy_types) == ["Egress", "Ingress"]
        # A training Job as the launcher renders it, with the installed chart's settings.
        cm = client.CoreV1Api(kube_api).read_namespaced_config_map("lora-jobs-launcher", namespace)
        docs = [{"kind": "ConfigMap", "metadata": {"name": "lora-jobs-launcher"}, "data": cm.data}]
        spec = TrainingRunSpec.model_validate({**yaml.safe_load(EXAMPLE_SPEC.read_text()), "resources": {"gpus": 0}})
        job = render_job(spec, settings_from_chart(docs, namespace))
        client.BatchV1Api(kube_api).create_namespaced_job(namespace, job)
        selector = ",".join(f"{k}={v}" for k, v in policy.spec.pod_selector.match_labels.items())
        deadline = time.time() + 60
        found = []
        while time.time() < deadline and not found:
            found = client.CoreV1Api(kube_api).list_namespaced_pod(namespace, label_selector=selector).items
            time.sleep(0.5)
        assert [p.metadata.labels["job-name"] for p in found] == [job["metadata"]["name"]]
    finally:
        run_helm(helm, "uninstall", "lora-jobs", "--namespace", namespace, kubeconfig=stack.kubeconfig, check=False)
