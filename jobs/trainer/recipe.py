"""The job as one linear recipe: setup (fetch → prepare → load) → train → evaluate → merge → publish.

:class:`Recipe` reads top to bottom, one method a stage; fetch and prepare are functions with plain inputs and
outputs, so a test can run one alone. ``run`` sets up the run's context (progress, tracking, SIGTERM) and runs the
recipe; ``jobs.trainer.main`` maps what it raises onto exit codes, naming the context's stage.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import DataError, Preempted, SpecError, Problem, StorageError
from jobs.progress import ProgressWriter, progress_key
from jobs.spec import TrainingRunSpec
from jobs.storage import TransferProgress, download_prefix, join, open_store, parse_uri
from jobs.trainer.context import RunContext, peak_gpu_gib

log = logging.getLogger("jobs")


def _cost_facts(device, world, config) -> dict:
    """What the run's cost is computed from (jobs/cost.py), known once the base's config is read: the card,
    the run's GPUs and the base's parameter count; written to the progress object at once."""
    from jobs.cost import card_of
    from jobs.trainer.fastpath import estimate_param_count

    name = None
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
    return {"device_name": name, "card": card_of(name), "gpus": world.size if device.type == "cuda" else 0,
            "base_params": estimate_param_count(config)}


def _cost(facts: dict, spec: TrainingRunSpec, *, seconds: float, tokens: int | None,
          tokens_per_s: float | None, stages: dict) -> dict:
    """metadata.json's ``cost``: this attempt's GPU-hours (its GPUs × its wall seconds), tokens, tokens/s/GPU and
    MFU. Queue wait, every attempt's GPU-hours and the price are the launcher's (`launcher status`): the job
    sees neither the Job's creation nor the namespace's price table."""
    from jobs.cost import job_cost

    nodes = spec.resources.nodes if facts["gpus"] and facts["gpus"] % spec.resources.nodes == 0 else 1
    return job_cost(gpus_per_node=facts["gpus"] // max(1, nodes), nodes=nodes, seconds=seconds, tokens=tokens,
                    tokens_per_s=tokens_per_s, params=facts["base_params"], card=facts["card"],
                    stages=stages)


# ----------------------------------------------------------------------------- fetch

@dataclass
class Fetched:
    base_model_dir: str  # a local folder, or a hub id for hf:
    base_model_hash: str | None
    train_bytes: bytes
    validation_bytes: bytes | None
    eval_prompts_bytes: bytes | None
    base_model_fetch: dict | None = None  # an s3:// base: the node cache's hit|miss|off and the bytes fetched
    base_adapter: "BaseAdapter | None" = None  # spec.base_adapter, fetched and checked


#: the files of a published version that a run starting from it reads (the adapter as vLLM reads it, and the
#: version's metadata.json: the base it was trained on)
BASE_ADAPTER_FILES = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metadata.json"]


@dataclass
class BaseAdapter:
    """``base_adapter``: a published version's adapter, downloaded and checked against its manifest."""

    uri: str
    dir: Path  # holds adapter_config.json and adapter_model.safetensors
    manifest_sha256: str  # of the version's manifest.json (what its _COMPLETE marker holds)
    base_model_sha256: str | None  # of the base it was trained on (its metadata.json)
    config: dict  # its adapter_config.json

    def record(self) -> dict:
        """What metadata.json's ``base_adapter`` says: where the run started, and which bytes."""
        return {"uri": self.uri, "manifest_sha256": self.manifest_sha256,
                "base_model_sha256": self.base_model_sha256}


def fetch_base_adapter(spec: TrainingRunSpec, workdir: Path, base_hash: str | None) -> BaseAdapter:
    """``spec.base_adapter``'s adapter, checked file by file against the version's manifest
    (:func:`jobs.publish.fetch_version_files`), and checked against this run before any weights load: trained on
    the same base (the sha256 of the base's files, where both are known) and with this spec's LoRA shape."""
    from jobs.publish import MANIFEST, fetch_version_files

    uri = spec.base_adapter
    assert uri is not None
    store, prefix = open_store(uri)
    dest = workdir / "base-adapter"
    got = fetch_version_files(store, prefix.rstrip("/"), BASE_ADAPTER_FILES, dest, uri)
    import hashlib

    try:
        meta = json.loads((dest / "metadata.json").read_text())
        config = json.loads((dest / "adapter" / "adapter_config.json").read_text())
    except ValueError as err:
        raise StorageError(f"{uri}: its metadata.json or adapter_config.json is not JSON ({err})",
                           hint="name a version the job published") from None
    adapter = BaseAdapter(uri=uri, dir=dest / "adapter", manifest_sha256=hashlib.sha256(got[MANIFEST]).hexdigest(),
                          base_model_sha256=(meta.get("base_model") or {}).get("sha256"), config=config)
    line = spec.line_of("base_adapter")
    problems = []
    if adapter.base_model_sha256 and base_hash and adapter.base_model_sha256 != base_hash:
        trained_on = (meta.get("base_model") or {}).get("uri", "another base")
        problems.append(Problem("base_adapter", f"was trained on {trained_on} (files sha256 "
                                f"{adapter.base_model_sha256[:12]}), not on this run's base_model "
                                f"{spec.base_model.uri} (sha256 {base_hash[:12]}): its weights would not fit",
                                f"set base_model.uri to {trained_on}, or name a version trained on this base",
                                line=line))
    lora = spec.lora
    for field, theirs, ours in (("rank", config.get("r"), lora.rank), ("alpha", config.get("lora_alpha"), lora.alpha),
                                ("use_rslora", bool(config.get("use_rslora")), lora.use_rslora),
                                ("use_dora", bool(config.get("use_dora")), lora.use_dora)):
        if theirs != ours:
            problems.append(Problem(f"lora.{field}", f"is {ours}, but the base_adapter's is {theirs}: training "
                                    "starts from its weights, so the adapter's shape must be its own",
                                    f"set lora.{field}: {str(theirs).lower() if isinstance(theirs, bool) else theirs}",
                                    line=spec.line_of(f"lora.{field}")))
    if problems:
        raise SpecError(problems)
    log.info("base_adapter: %s (manifest sha256 %s), trained on %s", uri, adapter.manifest_sha256[:12],
             (meta.get("base_model") or {}).get("uri", "?"))
    return adapter


def _read_object(uri: str, what: str) -> bytes:
    store, key = open_store(uri)
    if parse_uri(uri)[0] == "file":
        p = Path(parse_uri(uri)[2])
        if not p.is_file():
            raise StorageError(f"{what} {p} not found", hint=f"check {what} in the spec")
        return p.read_bytes()
    return store.get_bytes(key)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _no_space(folder: Path, need: int, what: str, free: int, during: bool = False) -> SpecError:
    state = f"filled up while downloading {what} ({_size(free)} free now)" if during else \
        f"has {_size(free)} free"
    return SpecError([Problem("resources.scratch",
                              f"the scratch volume at {folder} {state}, but {what} needs {_size(need)}",
                              f"raise resources.scratch to at least {int(need * 1.5 / 2**30) + 1}Gi")])


def _check_space(folder: Path, need: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free * 0.98:
        raise _no_space(folder, need, what, free)


def fetch(spec: TrainingRunSpec, workdir: Path) -> Fetched:
    from jobs.digest import hash_dir
    from jobs.model_cache import CacheConfig, fetch_base_model

    uri = spec.base_model.uri
    base_fetch = None
    if uri.startswith("hf:"):
        base_dir, base_hash = uri[3:], None
    elif uri.startswith("s3://"):
        store, prefix = open_store(uri)
        prefix = prefix.rstrip("/") + "/"
        dest = workdir / "base-model"
        objs = store.list(prefix)
        if not objs:
            raise StorageError(f"no base model under {uri}", hint="upload the model folder there or fix base_model.uri")
        size = sum(o.size for o in objs)
        what = f"the base model ({len(objs)} files)"

        def download(dest: Path) -> None:  # into this job's scratch: no node cache, or one that cannot serve it
            _check_space(workdir, size, what)
            moved = TransferProgress(f"downloading the base model ({len(objs)} files)", size)
            try:
                download_prefix(store, prefix, dest, workers=16, progress=moved)
            except OSError as err:  # the volume filled up under us (another writer, a shared node disk)
                if err.errno != errno.ENOSPC:
                    raise
                raise _no_space(workdir, size, what, shutil.disk_usage(workdir).free, during=True) from None
            moved.finish()
        got = fetch_base_model(store, prefix, objs, dest, download, CacheConfig.from_env())  # docs/model-cache.md
        base_dir, base_hash, base_fetch = str(got.path), got.sha256, got.record()
    else:
        p = Path(parse_uri(uri)[2])
        if not (p / "config.json").is_file():
            raise StorageError(f"base model folder {p} has no config.json", hint="point base_model.uri at a "
                               "transformers model folder")
        base_dir, base_hash = str(p), hash_dir(p)
    train = _read_object(spec.dataset.train, "dataset.train")
    val = _read_object(spec.dataset.validation, "dataset.validation") if spec.dataset.validation else None
    prompts = None
    if isinstance(spec.eval.prompts, str):
        prompts = _read_object(spec.eval.prompts, "eval.prompts")
    adapter = fetch_base_adapter(spec, workdir, base_hash) if spec.base_adapter else None
    return Fetched(base_dir, base_hash, train, val, prompts, base_fetch, adapter)


# --------------------------------------------------------------------------- prepare

@dataclass
class Prepared:
    train_rows: list  # dataprep.Row, or jobs.preference.Pair for a dpo/orpo run
    val_rows: list
    report: dict

    def chosen(self, rows: list) -> list:
        """SFT rows as they are; a pair's chosen side (what evaluation compares against and copies from)."""
        return [getattr(r, "chosen", r) for r in rows]

    def held_out_rows(self) -> list:
        """The validation rows as the held-out record hashes them: a pair's chosen and rejected side, in turn."""
        return [side for r in self.val_rows for side in ((r.chosen, r.rejected) if hasattr(r, "chosen") else (r,))]


def prepare(spec: TrainingRunSpec, fetched: Fetched, progress=None) -> Prepared:
    """The rows (or, for training.method dpo/orpo, the preference pairs) to train and validate on; ``progress`` (the
    run's ProgressWriter) gets where every line went."""
    from jobs import dataprep, preference

    def rows_of(data: bytes, rules) -> tuple[list, dict]:
        if spec.training.method == "sft":
            prep = dataprep.prepare(data, rules, seed=spec.training.seed)
            return prep.rows, prep.report
        pairs = preference.prepare_pairs(data, rules, seed=spec.training.seed)
        return pairs.pairs, pairs.report

    try:
        rows, train_report = rows_of(fetched.train_bytes, spec.data)
    except DataError as err:  # a rejected file's counts reach the run's status too
        if progress is not None and getattr(err, "report", None):
            progress.update(data={**err.report["counts"], "unit": err.report.get("unit", "rows")})
        raise
    if progress is not None:  # where every line went (kept, dropped by reason, by format), in rows or pairs
        progress.update(data={**train_report["counts"], "unit": train_report.get("unit", "rows")})
    report = {"train": train_report}
    if fetched.validation_bytes is not None:
        val_rows, report["validation"] = rows_of(fetched.validation_bytes,
                                                 spec.data.model_copy(update={"min_rows": 1}))
        train_rows = rows
    else:
        train_rows, val_rows = dataprep.split_validation(rows, spec.dataset.validation_split, spec.training.seed)
    report["split"] = {"train_rows": len(train_rows), "validation_rows": len(val_rows)}
    for line in dataprep.format_report(train_report, max_problems=5).splitlines()[1:]:
        log.info("data %s", line.strip() if line.startswith("  OK") else line[2:])
    log.info("data: %d lines, %d valid, %d kept → %d train / %d validation%s", train_report["total_lines"],
             train_report["valid_rows"], train_report["kept_rows"], len(train_rows), len(val_rows),
             "" if spec.training.method == "sft" else " pairs")
    return Prepared(train_rows, val_rows, report)


# ------------------------------------------------------------------------------ run

def _memory_cap(device) -> int | None:
    """The bytes this process may use of its GPU when something capped it below the whole card
    (``torch.cuda.set_per_process_memory_fraction``: a shared GPU, or a test forcing the out-of-memory
    back-off), else None. The planner sizes micro-batches from the free memory the driver reports, which
    such a cap does not change; the merge, which loads the base again, must stay under it."""
    if device.type != "cuda":
        return None
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = torch.cuda.get_per_process_memory_fraction(index)
    if fraction >= 1.0:
        return None
    return int(fraction * torch.cuda.get_device_properties(index).total_memory)


#: Exit code of a run stopped by Ctrl-C (SIGINT): 128 + 2, as a shell reports it. Only a person at a terminal
#: sends it (Kubernetes stops a pod with SIGTERM, which checkpoints and exits 75 for a retry).
EXIT_INTERRUPTED = 130


def check_output_writable(store, run_prefix: str, run_id: str | None) -> None:
    """Write and delete one small object under the run's prefix, before any data or model is fetched: an
    output that cannot be written (a file, a read-only folder, a denied or missing bucket) fails now, with
    the exit code that is never retried, not after hours of training at publish."""
    key = join(run_prefix, f".write-probe-{run_id or os.getpid()}")
    store.put_bytes(key, b"lora-jobs write probe\n", "text/plain")
    try:
        store.delete(key)
    except StorageError:  # may write but not delete (a write-once bucket policy): publish needs only writes
        log.warning("output: %s/%s written but not deleted; it is harmless and may be removed",
                    store.label, key)


def _serving_ready(adapter_dir: Path, spec: TrainingRunSpec, config, tokenizer_size: int,
                   base_model_sha256: str | None = None) -> dict:
    """The adapter folder as vLLM and KServe read it (its two files; the base named by its URI, not this job's
    folder), and vLLM's verdict on it (jobs/serving.py) for metadata.json and the eval report."""
    from jobs import serving

    removed = serving.make_serving_ready(adapter_dir, serving.base_model_name(spec.base_model.uri))
    if removed:
        log.info("adapter/: removed %s (vLLM and KServe read only %s)", ", ".join(removed),
                 " and ".join(serving.ADAPTER_FILES))
    try:
        verdict = serving.check_adapter_dir(adapter_dir, base_vocab_size=serving.vocab_size(config),
                                            tokenizer_size=tokenizer_size, base_model_sha256=base_model_sha256)
    except (OSError, ValueError) as err:  # a verdict is advice: it never stops a publish
        log.warning("serving check: could not read the adapter (%s)", err)
        return {"engine": "vllm", "error": str(err)}
    log.info("serving (vLLM): %s", verdict.summary())
    return verdict.to_dict()


def _compile_cache(spec: TrainingRunSpec, model, plan, store, run_prefix: str, world):
    """The run's compile cache (restored now, before anything compiles), or None when nothing compiles."""
    if not plan.compile:
        return None
    from jobs.trainer import fastpath
    from jobs.trainer.compile_cache import CompileCache, cache_key, signing_key

    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
    lora = spec.lora
    facts = {"dtype": str(plan.dtype), "fp8": fastpath.fp8_recipe() if plan.fp8 else None,
             "checkpointing": plan.gradient_checkpointing, "checkpoint_layers": plan.checkpoint_layers,
             "attention": plan.attn_implementation,
             "lora": [lora.rank, lora.alpha, lora.dropout > 0, lora.target_modules, lora.use_rslora, lora.use_dora],
             "world_size": world.size, "quantization": spec.quantization.mode}
    cache = CompileCache(store, run_prefix, cache_key(config, facts), signing_key(), writer=world.main)
    cache.restore()
    return cache


def _start_tracker(spec: TrainingRunSpec, run_id: str | None, world):
    """The MLflow run of this training run, when the spec asks for one: params and tags sent (off this thread)."""
    from jobs.trainer.tracking import TAG_RUN_ID, TAG_SPEC_HASH, flatten_params, open_tracker

    tracker = open_tracker(spec, run_name=run_id or spec.name, enabled=world.main)
    if tracker is not None:
        tracker.start(flatten_params(spec.model_dump(mode="json")),
                      {TAG_SPEC_HASH: spec.spec_hash(), TAG_RUN_ID: run_id or spec.name, "lora-jobs.run": spec.name})
    return tracker


def run(spec: TrainingRunSpec, workdir: Path, *, run_id: str | None = None, image: str | None = None,
        context: RunContext | None = None) -> dict | None:
    """Run every stage; return the summary that is also written as metadata.json, with the published version
    and its location (None on ranks > 0). ``context``: the run's (``jobs.trainer.main`` reads the stage from it)."""
    import transformers

    from jobs.trainer import distributed
    from jobs.trainer.cpus import size_torch_threads

    ctx = context or RunContext()
    workdir.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.set_verbosity_error()  # our log says what happens; no tqdm bars in pod logs
    transformers.utils.logging.disable_progress_bar()

    def on_sigterm(signum, frame):
        log.warning("SIGTERM received: finishing this step, then checkpointing and exiting for a retry")
        ctx.stop.requested = True
        if ctx.stage != "train":
            raise Preempted(f"stopped by SIGTERM during {ctx.stage}", hint="the Job retries this run")

    signal.signal(signal.SIGTERM, on_sigterm)
    ctx.started_at = time.time()

    world = distributed.from_env()
    size_torch_threads()  # the pod's CPU limit, not the node's cores (under torchrun: OMP_NUM_THREADS)
    out_store, out_prefix = open_store(spec.output)
    run_prefix = join(out_prefix, spec.name)
    world.on_main(lambda: check_output_writable(out_store, run_prefix, run_id))
    ctx.progress = ProgressWriter(out_store, progress_key(run_prefix, spec.spec_hash()), enabled=world.main)
    ctx.progress.update(run=spec.name, run_id=run_id, world_size=world.size)
    ctx.tracker = _start_tracker(spec, run_id, world)
    try:
        metadata = Recipe(spec, workdir, ctx, world, run_id=run_id, image=image, out_store=out_store,
                          run_prefix=run_prefix).run()
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):  # Ctrl-C on a local run: the user's choice, not a failure
            ctx.progress.close("cancelled", error=f"interrupted during {ctx.stage}", exit_code=EXIT_INTERRUPTED)
        else:
            ctx.progress.close("preempted" if isinstance(err, Preempted) else "failed",
                               error=str(err).splitlines()[0] if str(err) else type(err).__name__,
                               exit_code=int(getattr(err, "exit_code", 1)))
        if ctx.tracker is not None:  # KILLED: the retried pod carries on with the same MLflow run
            ctx.tracker.finish("KILLED" if isinstance(err, (Preempted, KeyboardInterrupt)) else "FAILED", wait_s=5.0)
        ctx.tracker = None
        raise
    if metadata is not None:
        ctx.progress.close("succeeded", stage="publish", version=metadata["version"],
                           location=metadata["location"], cost=metadata.get("cost"),
                           promotion=metadata.get("promotion"))
        if ctx.tracker is not None:
            from jobs.trainer.tracking import TAG_LOCATION

            page = workdir / "publish"
            ctx.tracker.finish("FINISHED", metrics=metadata["metrics"], tags={TAG_LOCATION: metadata["location"]},
                               artifacts=[page / "eval_report.md", page / "eval_report.html"])
    ctx.progress = ctx.tracker = None
    return metadata


@dataclass
class Trained:
    """What training leaves for evaluation, merge and publish: the model holding the adapter to publish (only
    here, so that a stage can let it go), where it runs, and the loop's result."""

    model: Any
    device: Any
    result: Any  # jobs.trainer.train.TrainResult


class Recipe:
    """One run, top to bottom: setup (fetch, prepare, load) → train → evaluate → merge → publish.

    How the work is spread over the training processes is the strategy's (``jobs.trainer.strategies``),
    chosen once the plan is made; after training only the main process evaluates, merges and publishes."""

    def __init__(self, spec: TrainingRunSpec, workdir: Path, ctx: RunContext, world, *, run_id, image, out_store,
                 run_prefix: str):
        self.spec, self.workdir, self.ctx, self.world = spec, workdir, ctx, world
        self.run_id, self.image, self.out_store, self.run_prefix = run_id, image, out_store, run_prefix

    def run(self) -> dict | None:
        self.setup()
        trained = self.train()
        metadata = self.strategy.on_main(lambda: self.publish(self.merge(self.evaluate(trained))))
        self.strategy.shutdown()
        return metadata

    # ------------------------------------------------------------------------ setup

    def setup(self) -> None:
        import torch

        from jobs.trainer import distributed

        spec, ctx, world = self.spec, self.ctx, self.world
        device = torch.device(f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        distributed.init(world, device)

        ctx.enter("fetch")
        # one download per pod (its local rank 0, into its own scratch); the pod's other ranks read it
        self.fetched = world.once_per_pod(lambda: fetch(spec, self.workdir), "every pod's base-model download")
        if self.fetched.base_model_fetch is not None and ctx.progress is not None:
            ctx.progress.update(base_model=self.fetched.base_model_fetch)

        ctx.enter("prepare")
        self.prepared = prepare(spec, self.fetched, ctx.progress)

        ctx.enter("load")
        self.model = self._setup_model(device)
        self._setup_data()
        self._measure_base()

    def _setup_model(self, device):
        """The plan (from config.json), the strategy it implies, and the base loaded the strategy's way."""
        import torch

        from jobs.trainer import fastpath, strategies
        from jobs.trainer.modelio import load_config, load_tokenizer, model_context_length, resolve_precision

        spec, world = self.spec, self.world
        self.precision = resolve_precision(spec.training.precision, device)
        free_before_load = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        self.tok = load_tokenizer(self.fetched.base_model_dir)
        # planned from config.json before the weights load: a base that cannot fit fails here, with the fix
        # (training.fsdp / resources.gpus), not as a CUDA out-of-memory error halfway through loading
        self.config = config = load_config(self.fetched.base_model_dir)
        if spec.export.gguf:  # refused now, not after training: architecture, rope scaling, tokenizer
            from jobs.trainer.gguf_export import check_exportable

            check_exportable(config.to_dict(), self.tok, use_dora=spec.lora.use_dora)
        plan = fastpath.plan(config, spec.training, device, quantization=spec.quantization.mode,
                             free_memory_bytes=free_before_load, world_size=world.size)
        self.cost_facts = _cost_facts(device, world, config)
        if self.ctx.progress is not None:
            self.ctx.progress.update(**self.cost_facts)
        # each rank planned from its own free memory: near the threshold they could disagree, and a rank
        # that shards waits forever for one that does not; if any rank must shard, every rank does
        if device.type == "cuda" and spec.training.fsdp == "auto" and \
                world.any_rank(plan.fsdp, device, "the plan's sharding decision") and not plan.fsdp:
            plan = fastpath.plan(config, spec.training.model_copy(update={"fsdp": "on"}), device,
                                 quantization=spec.quantization.mode, free_memory_bytes=free_before_load,
                                 world_size=world.size)
        from jobs.trainer.preference import Objective

        self.strategy = strategies.choose(world, plan, device)
        self.objective = Objective.for_spec(spec)  # SFT, DPO or ORPO: what a step minimises, chosen once
        self.adapter_dir = self.fetched.base_adapter.dir if self.fetched.base_adapter else None
        model = self.strategy.load(self.fetched.base_model_dir, config, spec=spec, plan=plan,
                                   precision=self.precision, adapter=self.adapter_dir)
        ctx_len = spec.base_model.max_context or model_context_length(config) or spec.training.max_seq_length
        self.max_len = max_len = min(spec.training.max_seq_length, ctx_len)
        if max_len < spec.training.max_seq_length:
            log.warning("training.max_seq_length %d is above the base model's context length %d (%s): rows are "
                        "cut at %d tokens; set base_model.max_context: %d if the model was extended to it, or "
                        "lower training.max_seq_length", spec.training.max_seq_length, ctx_len,
                        "base_model.max_context" if spec.base_model.max_context else "its config", max_len,
                        spec.training.max_seq_length)
        if spec.training.gradient_checkpointing != "auto":
            plan.gradient_checkpointing = bool(spec.training.gradient_checkpointing)
            plan.checkpoint_layers = None  # asked for by hand: every layer, or none
        # the unit a micro-batch must hold whole: a row, or a preference pair's two sides
        unit_len = max_len * (2 if spec.training.method != "sft" else 1)
        if device.type == "cpu":
            # No memory model to plan with on CPU: a micro-batch is per_device_batch_size full-length rows (pairs).
            plan.tokens_per_micro_batch = spec.training.per_device_batch_size * unit_len
        plan.tokens_per_micro_batch = max(plan.tokens_per_micro_batch, unit_len)
        self.plan = plan
        log.info("device %s, precision %s, quantization %s, max length %d, plan: %s", device, self.precision,
                 spec.quantization.mode, max_len, "; ".join(plan.notes) or plan)
        self.memory_cap = _memory_cap(device)
        return model

    def _setup_data(self) -> None:
        """The prepared rows as token ids, cut to the run's max length."""
        from jobs.trainer.preference import encode_pairs
        from jobs.trainer.train import encode_rows

        spec, prepared = self.spec, self.prepared
        encode = encode_pairs if self.objective.preference else encode_rows
        cut: list[int] = []
        val_cut: list[int] = []
        self.train_ex, too_long = encode(self.tok, prepared.train_rows, self.max_len, cut)
        self.val_ex, val_too_long = encode(self.tok, prepared.val_rows, self.max_len, val_cut)
        # the general-ability set, encoded like training rows (loss on the answer only); with the eval only
        self.regression_ex: list[dict] = []
        if spec.eval.enabled:
            from jobs.regression import general_set

            self.regression_ex, _ = encode_rows(self.tok, general_set(), self.max_len)
        self._report_length_losses(too_long, cut, val_too_long, val_cut)
        if len(self.train_ex) < spec.data.min_rows:
            raise DataError(f"only {len(self.train_ex)} training rows fit in max_seq_length={self.max_len} tokens "
                            f"(need {spec.data.min_rows})", hint="raise training.max_seq_length or shorten prompts")

    def _report_length_losses(self, too_long: list[int], cut: list[int], val_too_long: list[int],
                              val_cut: list[int]) -> None:
        """Rows that max length changed, each named by line: dropped (the prompt alone does not fit) or kept with
        the answer cut there. A warning in the log; the lines in the data report (``prompt_too_long`` and
        ``answer_cut`` of the train section, or of the validation file's; ``validation_…`` for held-out rows split
        from the training file), the first 200 of each."""
        from jobs.dataprep.report import counted

        report, noun = self.prepared.report, "pair" if self.objective.preference else "row"
        # held-out rows split from the training file are named by its lines, in its section
        val_section, val_key = ("validation", "") if "validation" in report else ("train", "validation_")
        for section, key, dropped, kept_cut in (("train", "", too_long, cut),
                                                 (val_section, val_key, val_too_long, val_cut)):
            where = "validation" if key or section == "validation" else "training"
            if dropped:
                report[section][key + "prompt_too_long"] = {"count": len(dropped), "lines": dropped[:200]}
                log.warning("%s %s dropped: the prompt alone is longer than max length %d tokens (%s); raise "
                            "training.max_seq_length or shorten the prompts", counted(len(dropped), f"{where} {noun}"),
                            "was" if len(dropped) == 1 else "were", self.max_len, _lines(dropped))
            if kept_cut:
                report[section][key + "answer_cut"] = {"count": len(kept_cut), "lines": kept_cut[:200]}
                log.warning("%s longer than max length %d tokens: kept, with the answer cut there (%s); raise "
                            "training.max_seq_length to keep %s whole",
                            counted(len(kept_cut), f"{where} {noun}"), self.max_len, _lines(kept_cut),
                            "it" if len(kept_cut) == 1 else "them")

    def _measure_base(self) -> None:
        """The base's validation loss and its loss on the general-ability set, and its generations where the
        strategy can make them before training."""
        from jobs.trainer import evaluate as ev
        from jobs.trainer.train import evaluate_loss

        spec, strategy, model = self.spec, self.strategy, self.model
        if self.val_ex:
            log.info("validation loss of the base model on %d %s…", len(self.val_ex),
                     "pairs" if self.objective.preference else "examples")
        # (uncompiled: the compile cache is restored below, before anything compiles)
        # the base: an FSDP2 model is wrapped at load, with a base_adapter's weights in it then
        bare = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with strategy.uncompiled(model), bare:
            before = self.objective.measure_base(model, self.val_ex, self.plan.tokens_per_micro_batch, strategy)
            self.pairs_before = self.objective.validation_metrics(before)
            regression = evaluate_loss(model, self.regression_ex, self.plan.tokens_per_micro_batch, strategy)
        self.val_before = None if before is None else before.mean
        self.regression_before = None if regression is None else \
            strategy.gather_per_example(regression.mine, len(self.regression_ex))
        prompts = ev.prompts_for(spec, self.prepared.chosen(self.prepared.val_rows),
                                 ev.parse_prompts_jsonl(self.fetched.eval_prompts_bytes)
                                 if self.fetched.eval_prompts_bytes else None)
        # generations, like everything after training, are the main process's
        self.prompts = self.world.on_main(lambda: prompts if spec.eval.enabled else []) or []
        self.gen_before = []
        if self.prompts and strategy.generates_base_before_training:
            self.gen_before = ev.generate(model, self.tok, self.prompts, spec, strategy.device, "base model")
        if self.val_before is not None:
            log.info("validation loss before training: %.4f%s", self.val_before,
                     "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in self.pairs_before.items()))

    # ------------------------------------------------------------------------ train

    def train(self) -> Trained:
        from jobs.trainer.checkpoints import Checkpoints
        from jobs.trainer.train import train

        spec, ctx, strategy, world = self.spec, self.ctx, self.strategy, self.world
        ctx.enter("train")
        model = strategy.wrap(self.model, spec, self.plan, self.adapter_dir)
        self.model = None  # from here on the model lives in what train returns
        trainable, total = model.get_nb_trainable_parameters()
        log.info("LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
        # keyed by what the run trains, not where: more memory or another number of GPUs resumes the run
        ckpts = Checkpoints(self.out_store, join(self.run_prefix, "checkpoints", spec.training_hash()),
                            world.scratch(self.workdir),
                            earlier_prefix=join(self.run_prefix, "checkpoints", spec.spec_hash()))
        self.tokens_per_s: dict[int, float] = {}  # per logged step, for the TensorBoard file

        def on_progress(**fields) -> None:
            if fields.get("tokens_per_s") is not None and "step" in fields:
                self.tokens_per_s[fields["step"]] = fields["tokens_per_s"]
            # the first step is written at once: `status` shows training has begun, with its speed, without
            # waiting out the write interval
            ctx.progress.update(urgent=fields.get("step") == 1, **fields)
            if ctx.tracker is not None:
                ctx.tracker.on_progress(**fields)

        self.cache = _compile_cache(spec, model, self.plan, self.out_store, self.run_prefix, world)
        result = train(model, spec, self.train_ex, self.val_ex, strategy=strategy, plan=self.plan, checkpoints=ckpts,
                       stop_requested=ctx.stop, on_progress=on_progress, compile_cache=self.cache,
                       objective=self.objective)
        if self.cache is not None:
            self.cache.save()  # now with the validation graphs too
        if ctx.tracker is not None:
            ctx.tracker.evaluations(result.state.evals)  # the final validation is not a progress event
        return Trained(model, strategy.device, result)

    # --------------------------------------------------------------------- evaluate

    def evaluate(self, trained: Trained) -> Trained:
        """The main process's: the adapter's validation loss and generations against the base's; the report, the
        loss curve and the TensorBoard file in the folder to publish."""
        from jobs.trainer import evaluate as ev
        from jobs.trainer import fastpath
        from jobs.trainer.tracking import TENSORBOARD_DIR, write_tensorboard

        spec, strategy, result, prompts = self.spec, self.strategy, trained.result, self.prompts
        strategy.finish_training(trained, spec, self.config, self.plan)
        if prompts and not strategy.generates_base_before_training:
            with trained.model.disable_adapter(), fastpath.eager_layers(trained.model):
                self.gen_before = ev.generate(trained.model, self.tok, prompts, spec, trained.device, "base model")
        steady = result.tokens_per_second_steady
        log.info("trained %d steps in %.0fs: %.0f tokens/s (%s after warm-up), %d examples and ~%.0f tokens per "
                 "step%s", result.state.step, result.seconds, result.tokens_per_second,
                 "n/a" if steady is None else f"{steady:.0f}", result.examples_per_step, result.tokens_per_step,
                 f", peak GPU memory {peak_gpu_gib():.1f} GiB" if strategy.device.type == "cuda" else "")

        self.ctx.enter("evaluate")
        model, device = trained.model, trained.device
        if fastpath.remove_fp8(model):  # generations (and what is published) use the bf16 base, as the merge does
            log.info("FP8 projections swapped back to bf16 for evaluation")
        val_after = result.val_loss  # of the adapter about to be published (the best one)
        if val_after is not None:
            log.info("validation loss after training: %.4f (before %.4f)", val_after, self.val_before)
        with fastpath.eager_layers(model):
            gen_after = ev.generate(model, self.tok, prompts, spec, device, "with adapter") if prompts else []
            regression = self._measure_regression(model, device)
        pairs = self._pairs_section(result)
        report = ev.build_report(spec, prompts=prompts, before=self.gen_before, after=gen_after,
                                 val_loss_before=self.val_before, val_loss_after=val_after,
                                 history=result.state.history, evals=result.state.evals,
                                 train_outputs=[r.output for r in self.prepared.chosen(self.prepared.train_rows)],
                                 val_losses_after=result.val_losses, regression=regression, preference=pairs)
        report["training"]["published_step"] = result.published_step
        report["training"]["stopped_early"] = result.state.stopped_early
        self.report = report
        self.out = out = self.workdir / "publish"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        ev.plot_loss(result.state.history, result.state.evals, out / "loss_curve.png")
        write_tensorboard(out / TENSORBOARD_DIR, result.state.history, result.state.evals, self.tokens_per_s)
        return trained

    def _measure_regression(self, model, device) -> dict | None:
        """The adapter's loss on the general-ability set against the base's (measured before training), on the
        main process alone; None without the eval."""
        from jobs.regression import general_set_sha256
        from jobs.trainer import evaluate as ev
        from jobs.trainer.strategies import SingleDevice
        from jobs.trainer.train import evaluate_loss

        if self.regression_before is None:
            return None
        after = evaluate_loss(model, self.regression_ex, self.plan.tokens_per_micro_batch,
                              SingleDevice(device=device))
        assert after is not None  # measured before training: the set is not empty
        section = ev.regression_section(self.regression_before, after.mine, general_set_sha256())
        log.info("%s", ev.regression_line(section))
        return section

    def _pairs_section(self, result) -> dict | None:
        """DPO/ORPO runs: on the held-out pairs, preference accuracy (and DPO's reward accuracy and margin) of the
        base (measured before training) and of the adapter published (its step's validation)."""
        from jobs.trainer import evaluate as ev

        if not self.objective.preference or not self.val_ex:
            return None
        after = next((e for e in reversed(result.state.evals) if e["step"] == result.published_step), None)
        if after is None:
            return None
        section = ev.preference_section(self.objective.method, self.objective.beta, len(self.val_ex),
                                        self.pairs_before, after, base_adapter=self.spec.base_adapter,
                                        reference_accuracy=self.objective.reference_accuracy)
        log.info("%s", ev.preference_line(section))
        return section

    # ------------------------------------------------------------------------ merge

    def merge(self, trained: Trained) -> Trained:
        """The adapter's and tokenizer's files, their serving verdict, and (merge.enabled) base + adapter merged
        and checked against the adapter's own outputs."""
        import torch

        from jobs.trainer import fastpath
        from jobs.trainer.merge import merge_and_check, merge_dtype

        spec, out, device = self.spec, self.out, trained.device
        self.ctx.enter("merge")
        trained.model.save_pretrained(out / "adapter", safe_serialization=True)
        self.tok.save_pretrained(out / "tokenizer")
        self.serving = _serving_ready(out / "adapter", spec, self.config, len(self.tok),
                                      self.fetched.base_model_hash)
        merge_info = None
        if spec.merge.enabled:
            trained.model = None
            fastpath.undo_module_patches()  # the merge reloads the base: plain transformers classes, any device
            if device.type == "cuda":
                torch.cuda.empty_cache()
            merge_budget = self.plan.memory_budget_bytes
            if self.memory_cap is not None:
                merge_budget = min(self.memory_cap, merge_budget or self.memory_cap)
            merge_info = merge_and_check(self.fetched.base_model_dir, out / "adapter", out / "merged",
                                         dtype=merge_dtype(spec.merge.dtype, self.precision),
                                         tolerance=spec.merge.tolerance,
                                         prompts=[ev_prompt.prompt for ev_prompt in self.prompts] or
                                         [r.instruction for r in self.prepared.chosen(self.prepared.val_rows[:3])] or ["Hello"],
                                         tok=self.tok, device=device, memory_budget_bytes=merge_budget)
            if spec.export.gguf:
                from jobs.trainer.gguf_export import export_gguf

                self.report["gguf"] = export_gguf(out / "merged", out / "adapter", spec.export.gguf, out / "gguf",
                                                  name=spec.name)
        self.report["merge"] = merge_info
        self.report["serving"] = self.serving
        return trained

    # ---------------------------------------------------------------------- publish

    def publish(self, trained: Trained) -> dict:
        """metadata.json and the reports next to the adapter; with promotion.auto, the gate's verdict against the
        current champion in the eval report and page; the folder published as the next version; then the champion
        pointer moved if the gate passed (docs/promotion.md)."""
        from jobs.promotion import held_out_record, judge_before_publish, promote_judged, read_folder_evidence
        from jobs.publish import publish_version
        from jobs.trainer import evaluate as ev
        from jobs.trainer.metadata import run_metadata

        spec, ctx, out, result, report = self.spec, self.ctx, self.out, trained.result, self.report
        ctx.enter("publish")
        metadata = run_metadata(
            spec, run_id=self.run_id, image=self.image, base_model_hash=self.fetched.base_model_hash,
            report=report, data_report=self.prepared.report, result=result, plan=self.plan, max_len=self.max_len,
            precision=self.precision, world_size=self.world.size,
            compile_cache=self.cache.summary() if self.cache is not None else None, serving=self.serving,
            device=trained.device, started_at=ctx.started_at, stages=ctx.timings,
            cost=lambda seconds: _cost(self.cost_facts, spec, seconds=seconds, tokens=result.state.tokens_seen,
                                       tokens_per_s=result.tokens_per_second, stages=ctx.timings),
            held_out=held_out_record(self.prepared.held_out_rows(), self.prompts),
            base_model_fetch=self.fetched.base_model_fetch,
            base_adapter=self.fetched.base_adapter.record() if self.fetched.base_adapter else None)
        (out / "metadata.json").write_text(metadata.to_json())
        (out / "data_report.json").write_text(json.dumps(self.prepared.report, indent=1))
        (out / "eval_report.json").write_text(json.dumps(report, indent=1))
        verdict = None
        if spec.promotion.auto:  # judged on the reports just written, before they are published (never raises)
            verdict = judge_before_publish(self.out_store, self.run_prefix, out, spec.promotion)
            log.info("promotion gate before publishing: %s", verdict.summary)
            report["promotion"] = verdict.section()
            (out / "eval_report.json").write_text(json.dumps(report, indent=1))
        (out / "eval_report.md").write_text(ev.render_markdown(report, spec))
        (out / "eval_report.html").write_text(ev.render_html(report, spec, (out / "loss_curve.png").read_bytes()))
        ctx.enter(None)  # what publishing costs is logged below; metadata.json is already written
        t_pub = time.perf_counter()
        version = publish_version(self.out_store, self.run_prefix, out)
        log.info("published %s in %.1fs", version, time.perf_counter() - t_pub)
        promotion = None
        if verdict is not None:  # a failed gate, a lost race or an unreachable store never fails the run
            p = promote_judged(self.out_store, self.run_prefix, read_folder_evidence(out, version), verdict,
                               spec.promotion)
            (log.info if p.promoted else log.warning)("promotion: %s", p.sentence)
            promotion = p.progress()
        return {**metadata.to_dict(), "version": version, "promotion": promotion,
                "location": f"{self.out_store.label}/{join(self.run_prefix, version)}"}


def _lines(lines: list[int], shown: int = 8) -> str:
    """"line 3", "lines 3, 7 and 9", "lines 3, 7, … (12 in all; the data report lists them)"."""
    if len(lines) == 1:
        return f"line {lines[0]}"
    if len(lines) <= shown:
        return "lines " + ", ".join(map(str, lines[:-1])) + f" and {lines[-1]}"
    return "lines " + ", ".join(map(str, lines[:shown])) + f", … ({len(lines)} in all; the data report lists them)"
