"""A Client given its settings uses them as they are: the namespace (and everything else) is the caller's, not
re-read from this process's LAUNCHER_* variables or the cluster's ConfigMap (a test's or a program's settings
for another namespace must not fall back to `default`)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_a_client_given_settings_connects_with_them(tmp_path, monkeypatch):
    from launcher.client import Client
    from launcher.settings import make_settings

    monkeypatch.delenv("LAUNCHER_NAMESPACE", raising=False)
    settings = make_settings(namespace="team-a", kubeconfig=str(tmp_path / "no-such-kubeconfig"))
    client = Client(settings=settings)
    got, kube = client.connect()  # no cluster is asked: the settings are the caller's
    assert got is settings and got.namespace == "team-a" and kube.namespace == "team-a"
    assert client.namespace == "team-a"
