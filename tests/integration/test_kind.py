"""kind for real, opt-in (LORA_KIND=1; about 3.5 min and 4.5 GB of disk while it runs; docs/kind.md).

`hack/kind-up.sh` with KIND_SAMPLE_RUN=0 brings up kind-config.yaml's two nodes (from the node
image built here when no stock one can be pulled), installs the chart with the dev MinIO and passes
`helm test`; `hack/kind-down.sh` removes the cluster. Not in `make test`: the suite is at its time
limit. Run: LORA_KIND=1 python -m pytest -m kind tests/integration/test_kind.py
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = "lora-jobs-kind-test"

pytestmark = [
    pytest.mark.kind,
    pytest.mark.skipif(os.environ.get("LORA_KIND") != "1", reason="opt-in: LORA_KIND=1 (docs/kind.md)"),
]


def _kind() -> str:
    found = shutil.which("kind")
    if found:
        return found
    versions = dict(line.split("=", 1) for line in (REPO / "hack" / "versions.env").read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    cache = Path(os.environ.get("STACK_CACHE", Path.home() / ".cache" / "lora-jobs" / "stack"))
    return str(cache / f"kind-{versions['KIND_VERSION']}" / "bin" / "kind")


def test_kind_up_installs_the_chart_and_passes_helm_test_and_kind_down_removes_it():
    env = {**os.environ, "KIND_CLUSTER": CLUSTER, "KIND_SAMPLE_RUN": "0"}
    try:
        up = subprocess.run(["bash", str(REPO / "hack" / "kind-up.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1500)
        assert up.returncode == 0, up.stderr[-4000:]
        assert "Phase:          Succeeded" in up.stdout  # helm test: a pod reached the bucket with the jobs' credentials
        kubectl = shutil.which("kubectl")
        assert kubectl, "kubectl on PATH"
        nodes = json.loads(subprocess.run(
            [kubectl, "--kubeconfig", str(REPO / ".stack" / "kind" / "kubeconfig"), "get", "nodes", "-o", "json"],
            check=True, capture_output=True, text=True, timeout=60).stdout)["items"]
        assert len(nodes) == 2  # kind-config.yaml: a control plane and a worker
        for node in nodes:
            ready = [c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready"]
            assert ready == ["True"], node["metadata"]["name"]
    finally:
        down = subprocess.run(["bash", str(REPO / "hack" / "kind-down.sh")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr[-2000:]
    clusters = subprocess.run([_kind(), "get", "clusters"], capture_output=True, text=True, timeout=60).stdout.split()
    assert CLUSTER not in clusters
