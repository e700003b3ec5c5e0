"""Experiment tracking: an MLflow run per training run, and TensorBoard event files in each version.

MLflow is spoken to through its REST API (``/api/2.0/mlflow/...``, MLflow's documented public
contract), with the standard library: the official clients (``mlflow``, ``mlflow-skinny``) would
add dozens of packages to the trainer image for a handful of POSTs. The job logs

- params: the whole resolved spec, flattened (``lora.rank``, ``training.learning_rate``, ...);
- metrics: every numeric metric of a logged step (``loss``, ``lr``, ``tokens_per_s``, and what the objective
  adds: DPO's ``reward_accuracy``, ``reward_margin``; ORPO's ``nll``, ``odds_ratio_loss``,
  ``preference_accuracy``, ``log_odds``) and of an evaluation (``val_loss``, and the others prefixed as it is:
  ``val_preference_accuracy``, ...), ``val_loss_before``/``val_loss_after`` at the end;
- tags: ``lora-jobs.version_location`` (``s3://…/<run>/vN``), ``lora-jobs.spec_hash``, the run name;
- artifacts: the eval page (``eval_report.md``, ``eval_report.html`` when there is one), through
  the server's artifact proxy (``mlflow server --serve-artifacts``).

Like :mod:`jobs.progress`, every call the job makes returns at once: a background thread sends,
through a bounded queue. A tracker that is down or hangs is warned about once, retried with
backoff, and then skipped; it never fails or slows the run. Only rank 0 tracks.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from jobs.background import BackgroundSender
from jobs.retry import RetryPolicy

log = logging.getLogger("jobs")

#: MLflow's limits (mlflow/utils/validation.py): a param value, and how much one log-batch may carry.
PARAM_VALUE_LIMIT = 6000
BATCH_METRICS, BATCH_PARAMS = 1000, 100
TAG_LOCATION, TAG_SPEC_HASH, TAG_RUN_ID = "lora-jobs.version_location", "lora-jobs.spec_hash", "lora-jobs.run_id"
#: The bearer token, when the server wants one: from the pod's environment (a Secret), never the spec.
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
#: A send is tried 4 times over about 4-7 s (waits of 1, 2 and 4 s, half jittered), then tracking is skipped.
SEND_POLICY = RetryPolicy(attempts=4, base_delay=1.0)


#: What a progress event, a history entry or an evaluation carries that counts or places rather than measures: not
#: a metric (the step is the metric's x; tokens and examples are the batch's size; best_* repeat a val_loss).
NOT_METRICS = frozenset({"step", "total_steps", "epoch", "examples_seen", "tokens_seen", "eta_s", "tokens", "examples",
                         "best_val_loss", "best_step"})


def _metric_value(value) -> float | None:
    """A finite number as a float; None for anything else (None, text, a bool, NaN or inf: MLflow refuses a batch
    with a NaN in it, so one would cost the whole batch)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def step_metrics(fields: dict) -> dict[str, float]:
    """Every numeric metric of a logged step (a progress event or a history entry), by its name: ``loss``, ``lr``,
    ``tokens_per_s`` and whatever the objective adds (``Objective.summary``: ``reward_accuracy``, ``nll``, ...)."""
    out = {k: _metric_value(v) for k, v in fields.items() if k not in NOT_METRICS}
    return {k: v for k, v in out.items() if v is not None}


def validation_metrics(fields: dict) -> dict[str, float]:
    """Every numeric metric of a validation (a progress event or an evaluation), named as its loss is: ``val_loss``,
    and ``val_`` before the others (``preference_accuracy`` -> ``val_preference_accuracy``)."""
    return {(k if k.startswith("val_") else f"val_{k}"): v for k, v in step_metrics(fields).items()}


def flatten_params(data: dict, prefix: str = "") -> dict[str, str]:
    """``{"lora": {"rank": 16}}`` → ``{"lora.rank": "16"}``; lists as JSON; values cut to MLflow's limit with a note."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, name + "."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if len(text) > PARAM_VALUE_LIMIT:
            note = f"… (truncated: {len(text):,} characters)"
            text = text[:PARAM_VALUE_LIMIT - len(note)] + note
        out[name] = text
    return out


class MlflowError(Exception):
    def __init__(self, message: str, *, retry: bool):
        super().__init__(message)
        self.retry = retry


class MlflowClient:
    """The few REST calls the job needs; one request at a time, each with a timeout."""

    def __init__(self, uri: str, *, token: str | None = None, timeout: float = 5.0):
        self.uri, self.token, self.timeout = uri.rstrip("/"), token, timeout

    def call(self, method: str, path: str, body: dict | None = None, *, data: bytes | None = None,
             query: dict | None = None, content_type: str = "application/json") -> dict:
        url = f"{self.uri}/api/2.0/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        payload = json.dumps(body).encode() if body is not None else data
        req = urllib.request.Request(url, data=payload, method=method, headers={"Content-Type": content_type})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode(errors="replace")
            # 429 and 5xx may pass; any other answer will be the same next time
            raise MlflowError(f"HTTP {err.code} from {path}: {detail}", retry=err.code == 429 or err.code >= 500)
        except (OSError, ValueError) as err:  # refused, reset, timed out, bad URL
            raise MlflowError(f"{type(err).__name__}: {err}", retry=True) from None
        return json.loads(raw) if raw.strip() else {}

    def experiment_id(self, name: str) -> str:
        try:
            return self.call("GET", "mlflow/experiments/get-by-name",
                             query={"experiment_name": name})["experiment"]["experiment_id"]
        except MlflowError as err:
            if "RESOURCE_DOES_NOT_EXIST" not in str(err):
                raise
        try:
            return self.call("POST", "mlflow/experiments/create", {"name": name})["experiment_id"]
        except MlflowError as err:  # another run created it in between
            if "RESOURCE_ALREADY_EXISTS" not in str(err):
                raise
            return self.call("GET", "mlflow/experiments/get-by-name",
                             query={"experiment_name": name})["experiment"]["experiment_id"]

    def open_run(self, experiment_id: str, run_name: str, spec_hash: str, tags: dict[str, str]) -> dict:
        """The unfinished run of this spec (a retried pod carries on with it), else a new one; its ``info``."""
        found = self.call("POST", "mlflow/runs/search", {
            "experiment_ids": [experiment_id], "max_results": 1, "order_by": ["attributes.start_time DESC"],
            "filter": f"tags.`{TAG_SPEC_HASH}` = '{spec_hash}' and attributes.status != 'FINISHED'"}).get("runs")
        if found:
            info = found[0]["info"]
            self.call("POST", "mlflow/runs/update", {"run_id": info["run_id"], "status": "RUNNING"})
            return info
        return self.call("POST", "mlflow/runs/create", {
            "experiment_id": experiment_id, "run_name": run_name, "start_time": int(time.time() * 1000),
            "tags": [{"key": k, "value": v} for k, v in tags.items()]})["run"]["info"]

    def upload(self, artifact_uri: str, name: str, data: bytes, content_type: str) -> None:
        scheme = "mlflow-artifacts:"
        if not artifact_uri.startswith(scheme):
            raise MlflowError(f"the run's artifact root {artifact_uri} is not served by the tracking server "
                              "(start it with --serve-artifacts)", retry=False)
        path = urllib.parse.quote(artifact_uri[len(scheme):].lstrip("/").rstrip("/") + "/" + name)
        self.call("PUT", f"mlflow-artifacts/artifacts/{path}", data=data, content_type=content_type)


class MlflowTracker:
    """One MLflow run for this training run, fed from a background thread; every method returns at once."""

    def __init__(self, client: MlflowClient, experiment: str, *, run_name: str, spec_hash: str,
                 policy: RetryPolicy = SEND_POLICY, max_queue: int = 10_000):
        self.client, self.experiment, self.run_name, self.spec_hash = client, experiment, run_name, spec_hash
        self.policy = policy
        self._sender: BackgroundSender[tuple] = BackgroundSender(self._send_all, name="mlflow-tracker",
                                                                 max_queue=max_queue)
        self._run: dict | None = None
        self._skipped = False  # the tracker gave up: everything after is dropped
        self._warned = False
        self._step = 0
        self._val_sent: set[tuple[int, str]] = set()  # (step, metric) of the validations sent

    # -- what the job calls
    def start(self, params: dict[str, str], tags: dict[str, str]) -> None:
        self._put(("start", params, tags))

    def on_progress(self, **fields) -> None:
        """Shaped like ``jobs.trainer.train.train``'s ``on_progress``: a logged step, or a validation; every
        numeric metric it carries is sent (:func:`step_metrics`, :func:`validation_metrics`)."""
        now = int(time.time() * 1000)
        if "loss" in fields and "step" in fields:
            self._step = int(fields["step"])
            self._put(("metrics", [{"key": k, "value": v, "timestamp": now, "step": self._step}
                                   for k, v in step_metrics(fields).items()]))
        elif fields.get("val_loss") is not None:
            metrics = validation_metrics(fields)
            self._val_sent.update((self._step, k) for k in metrics)
            self._put(("metrics", [{"key": k, "value": v, "timestamp": now, "step": self._step}
                                   for k, v in metrics.items()]))

    def evaluations(self, evals: list[dict]) -> None:
        """Every metric of the run's evaluations (``{"step", "val_loss", ...}``: ``TrainState.evals``) not sent
        through ``on_progress``: the final validation, and what a validation's progress event does not carry (the
        objective's ``validation_metrics``: a DPO run's preference and reward accuracy, reward margin)."""
        now = int(time.time() * 1000)
        new = [(e["step"], k, v) for e in evals for k, v in validation_metrics(e).items()
               if (e["step"], k) not in self._val_sent]
        self._val_sent.update((step, k) for step, k, _ in new)
        if new:
            self._put(("metrics", [{"key": k, "value": v, "timestamp": now, "step": step} for step, k, v in new]))

    def finish(self, status: str, *, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
               artifacts: list[Path] = (), wait_s: float = 20.0) -> None:
        """The last word (``FINISHED``, ``FAILED``, ``KILLED``): sent now, waited for up to ``wait_s``."""
        now = int(time.time() * 1000)
        if metrics:
            self._put(("metrics", [{"key": k, "value": float(v), "timestamp": now, "step": self._step}
                                   for k, v in metrics.items() if v is not None]))
        for key, value in (tags or {}).items():
            self._put(("tag", key, value))
        for path in artifacts:
            if path.is_file():
                self._put(("artifact", path.name, path.read_bytes()))
        self._put(("end", status))
        if not self._sender.close(0 if self._skipped else wait_s) and not self._skipped:
            self._warn_once(f"still sending after {wait_s:.0f}s; the rest is dropped")

    @property
    def dropped(self) -> int:
        """Items dropped because the queue was full (a tracker that hangs must not grow the job's memory)."""
        return self._sender.dropped

    # -- the sender thread
    def _put(self, item: tuple) -> None:
        if not self._skipped:
            self._sender.put(item)

    def _send_all(self, items: list[tuple]) -> None:
        """What queued up meanwhile, in order; consecutive metrics go as one batch (up to BATCH_METRICS)."""
        i = 0
        while i < len(items) and not self._skipped:
            item = items[i]
            i += 1
            if item[0] == "metrics":
                batch = list(item[1])
                while i < len(items) and items[i][0] == "metrics" and len(batch) + len(items[i][1]) <= BATCH_METRICS:
                    batch += items[i][1]
                    i += 1
                item = ("metrics", batch)
            self._send(item)

    def _send(self, item) -> None:
        if item[0] != "start" and self._run is None:
            return  # the run was never created: nothing to log to
        try:
            self.policy.call(lambda: self._do(item), retryable=lambda err: isinstance(err, MlflowError) and err.retry,
                             on_retry=lambda err, _n: self._warn_once(f"{err}; retrying"))
        except MlflowError as err:
            if not err.retry:
                self._warn_once(str(err))
                if item[0] == "start":
                    self._skipped = True
                return
            self._skipped = True  # down through every retry: this run goes on untracked
            log.warning("MLflow at %s did not answer after %d attempts: tracking is skipped for the rest of this "
                        "run (the run itself goes on)", self.client.uri, self.policy.attempts)

    def _do(self, item) -> None:
        kind, c = item[0], self.client
        if kind == "start":
            params, tags = item[1], item[2]
            exp = c.experiment_id(self.experiment)
            self._run = c.open_run(exp, self.run_name, self.spec_hash, tags)
            log.info("MLflow run %s in experiment %r (%s)", self._run["run_id"], self.experiment, c.uri)
            pairs = [{"key": k, "value": v} for k, v in params.items()]
            for i in range(0, len(pairs), BATCH_PARAMS):
                c.call("POST", "mlflow/runs/log-batch", {"run_id": self._run["run_id"],
                                                         "params": pairs[i:i + BATCH_PARAMS]})
        elif kind == "metrics":
            c.call("POST", "mlflow/runs/log-batch", {"run_id": self._run["run_id"], "metrics": item[1]})
        elif kind == "tag":
            c.call("POST", "mlflow/runs/set-tag", {"run_id": self._run["run_id"], "key": item[1], "value": item[2]})
        elif kind == "artifact":
            ctype = "text/html" if item[1].endswith(".html") else "text/markdown"
            c.upload(self._run["artifact_uri"], item[1], item[2], ctype)
        elif kind == "end":
            c.call("POST", "mlflow/runs/update", {"run_id": self._run["run_id"], "status": item[1],
                                                  "end_time": int(time.time() * 1000)})

    def _warn_once(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("MLflow tracking at %s: %s; training goes on", self.client.uri, why.splitlines()[0][:300])


def open_tracker(spec, *, run_name: str, enabled: bool = True, env=os.environ) -> MlflowTracker | None:
    """The tracker the spec asks for (``tracking.mlflow``), or None: not asked, not rank 0, or no URI in the pod."""
    cfg = spec.tracking.mlflow if spec.tracking is not None else None
    if cfg is None or not enabled:
        return None
    uri = env.get(cfg.uri_env, "").strip()
    if not uri:
        log.warning("tracking.mlflow asks for the tracking URI from $%s, which is not set in this pod: the run "
                    "is not tracked (set the launcher's mlflow_tracking_uri setting)", cfg.uri_env)
        return None
    return MlflowTracker(MlflowClient(uri, token=env.get(TOKEN_ENV) or None), cfg.experiment,
                         run_name=run_name, spec_hash=spec.spec_hash())


# ------------------------------------------------------------------------ TensorBoard

TENSORBOARD_DIR = "tensorboard"


def write_tensorboard(folder: Path, history: list[dict], evals: list[dict],
                      tokens_per_s: dict[int, float] | None = None) -> Path | None:
    """Event files of the run's scalars in ``folder``: every numeric metric of each step of ``history``
    (:func:`step_metrics`: ``loss``, ``lr``, the objective's own) and ``tokens_per_s``, and of each evaluation
    (:func:`validation_metrics`: ``val_loss``, ``val_preference_accuracy``, ...); `tensorboard --logdir` reads
    them. Returns the folder.

    Best effort, like the MLflow tracker: the event files are a convenience beside ``metadata.json`` and
    the eval report, so a missing ``tensorboardX`` (an image built without it) or a writer that fails is
    one warning and None, never the end of a run that trained (GPU call 7 lost a trained QLoRA run so)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        log.warning("TensorBoard event files are not written (%s); the version is published without "
                    "tensorboard/", err)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    try:
        _write_scalars(SummaryWriter, folder, history, evals, tokens_per_s)
    except Exception as err:  # noqa: BLE001 - a convenience file must not fail the run
        log.warning("TensorBoard event files could not be written (%s: %s); the version is published "
                    "without them", type(err).__name__, err)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return folder


def _write_scalars(SummaryWriter, folder: Path, history, evals, tokens_per_s) -> None:
    writer = SummaryWriter(logdir=str(folder), flush_secs=3600)
    try:
        for h in history:
            for key, value in step_metrics(h).items():
                writer.add_scalar(key, value, h["step"])
            if tokens_per_s and h["step"] in tokens_per_s:
                writer.add_scalar("tokens_per_s", tokens_per_s[h["step"]], h["step"])
        for e in evals:
            for key, value in validation_metrics(e).items():
                writer.add_scalar(key, value, e["step"])
    finally:
        writer.close()


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the event files in ``folder`` as ``{tag: [(step, value), ...]}`` (what TensorBoard shows)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):  # a TFRecord: u64 length, u32 crc of it, the Event, u32 crc of that
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
