"""The trainer and launcher images, built by hack/build-images.sh on the real Docker engine.

Proves what the images promise the rest of the system: they run as uid 10001 (the Job's
runAsUser) with a read-only root filesystem, the trainer's entry point is `python -m jobs`
with its ML stack importable, the launcher image runs `launcher --help`, no secret or
credential file is baked in, and a rebuild with unchanged dependencies reuses every
dependency layer (the CI budget depends on it).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]


from images import DOCKER, LAUNCHER, TRAINER, VERSION  # noqa: E402


def docker(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", pytrace=False)
    return proc


def run_in(image: str, *args: str, entrypoint: str | None = None, timeout: float = 300,
           check: bool = True) -> subprocess.CompletedProcess:
    """As a Job runs it: non-root, read-only root, no capabilities, a writable /scratch and /tmp."""
    ep = ["--entrypoint", entrypoint] if entrypoint else []
    return docker("run", "--rm", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                  "--tmpfs", "/tmp:uid=10001,gid=10001", "--tmpfs", "/scratch:uid=10001,gid=10001", "--network", "none",
                  *ep, image, *args, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def images(request) -> dict[str, str]:
    """Both images, built (or found up to date in the layer cache) by the project's script."""
    if subprocess.run([DOCKER, "info"], capture_output=True).returncode != 0:
        request.getfixturevalue("stack")  # hack/stack.sh up starts dockerd
        if subprocess.run([DOCKER, "info"], capture_output=True).returncode != 0:
            pytest.fail("the Docker engine is not reachable, even after hack/stack.sh up", pytrace=False)
    proc = subprocess.run(["bash", str(REPO / "hack" / "build-images.sh")], capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"hack/build-images.sh failed:\n{proc.stderr[-4000:]}", pytrace=False)
    return {"trainer": TRAINER, "launcher": LAUNCHER}


def inspect(image: str) -> dict:
    return json.loads(docker("image", "inspect", image).stdout)[0]


@pytest.mark.parametrize("which", ["trainer", "launcher"])
def test_image_runs_as_uid_10001_not_root(images, which):
    config = inspect(images[which])["Config"]
    assert config["User"] == "10001:10001"
    out = docker("run", "--rm", "--entrypoint", "id", images[which]).stdout
    assert out.startswith("uid=10001(") and "gid=10001(" in out


@pytest.mark.parametrize("which", ["trainer", "launcher"])
def test_image_carries_oci_labels(images, which):
    labels = inspect(images[which])["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.title"] == f"lora-jobs {which}"
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")
    assert labels["org.opencontainers.image.created"]


@pytest.mark.parametrize("which", ["trainer", "launcher"])
def test_no_secrets_are_baked_in(images, which):
    image = images[which]
    env = "\n".join(inspect(image)["Config"]["Env"])
    for word in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PIP_CERT", "TOKEN", "PASSWORD"):
        assert word not in env, f"{word} in the image's environment"
    # The CA bundle was a build secret: mounted for pip, never written to a layer.
    # As root, so no folder is unreadable to the search.
    found = docker("run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c",
                   "ls -A /run/secrets 2>/dev/null; find / -xdev \\( -name '*.pem' -path '*secret*' -o -name "
                   "'credentials' -path '*.aws*' -o -name '.netrc' -o -name 'pip.conf' \\) 2>/dev/null; true").stdout
    assert found.strip() == "", found
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "ca-certificates.crt" not in history and "AWS_SECRET" not in history


def test_trainer_entry_point_is_python_m_jobs_and_its_help_runs(images):
    config = inspect(images["trainer"])["Config"]
    assert config["Entrypoint"] == ["python", "-m", "jobs"]
    proc = run_in(images["trainer"], "--help")
    assert "run" in proc.stdout and "--spec" in (proc.stdout + run_in(images["trainer"], "run", "--help").stdout)


def test_trainer_has_the_pinned_ml_stack_on_a_read_only_root(images):
    pins = {}
    for line in (REPO / "docker" / "requirements-trainer.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    probe = ("import json, importlib.metadata as m, torch, transformers, peft, accelerate, "
             "safetensors, matplotlib, boto3, yaml, datasketch, bitsandbytes, liger_kernel, torchao.float8\n"
             "names = ['torch', 'transformers', 'peft', 'accelerate', 'bitsandbytes', 'torchao', "
             "'safetensors', 'matplotlib', 'boto3', 'pydantic', 'pyyaml', 'datasketch', 'liger-kernel']\n"
             "print(json.dumps({n: m.version(n) for n in names} | {'cuda': torch.cuda.is_available()}))")
    proc = run_in(images["trainer"], "-c", probe, entrypoint="python", timeout=600)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.pop("cuda") is False  # a CPU machine; the same image uses the GPU where one is exposed
    assert got == {n: pins[n] for n in got}


def test_trainer_reports_a_bad_spec_with_exit_code_10(images, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: Not A Valid Name\noutput: s3://runs/x\n")
    spec.chmod(0o644)
    tmp_path.chmod(0o755)
    proc = docker("run", "--rm", "--read-only", "--cap-drop", "ALL", "--network", "none",
                  "--tmpfs", "/tmp:uid=10001,gid=10001", "--tmpfs", "/scratch:uid=10001,gid=10001",
                  "-v", f"{tmp_path}:/etc/lora-jobs:ro", images["trainer"], "run", "--spec", "/etc/lora-jobs/spec.yaml",
                  check=False)
    assert proc.returncode == 10, proc.stdout + proc.stderr
    assert "name" in (proc.stdout + proc.stderr)


def test_launcher_image_runs_launcher_help_without_torch(images):
    config = inspect(images["launcher"])["Config"]
    assert config["Entrypoint"] == ["launcher"]
    proc = run_in(images["launcher"], "--help")
    for verb in ("submit", "status", "logs", "validate"):
        assert verb in proc.stdout
    missing = run_in(images["launcher"], "-c", "import importlib.util as u; print(u.find_spec('torch'))",
                     entrypoint="python").stdout.strip()
    assert missing == "None"


def test_launcher_image_is_much_smaller_than_the_trainer(images):
    launcher, trainer = inspect(images["launcher"])["Size"], inspect(images["trainer"])["Size"]
    assert launcher < 800 * 2**20 and launcher * 5 < trainer


def test_a_rebuild_with_unchanged_dependencies_reuses_the_dependency_layers(images):
    """The second build (the fixture ran the first) must hit the cache for every dependency step."""
    proc = subprocess.run(["bash", str(REPO / "hack" / "build-images.sh")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for which in ("trainer", "launcher"):
        log = (REPO / ".stack" / "logs" / f"build-{which}.log").read_text()
        # BuildKit's plain progress: "#8 [stage-0 4/11] RUN ... pip install ... requirements", then "#8 CACHED".
        step_ids = {line.split()[0] for line in log.splitlines()
                    if line.startswith("#") and "pip install --no-deps" in line and "requirements" in line}
        assert step_ids, f"no dependency step in the {which} build log"
        assert all(f"{i} CACHED" in log for i in step_ids), f"the {which} dependency layer was rebuilt:\n{log[-2000:]}"
