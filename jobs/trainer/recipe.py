"""The job as one linear recipe: fetch → prepare → train → evaluate → merge → publish.

Each stage is a function with plain inputs and outputs, so a test can run one alone.
``run`` strings them together; ``jobs.trainer.main`` maps what it raises onto exit codes.
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

from jobs import __version__
from jobs.errors import DataError, Preempted, SpecError, Problem, StorageError
from jobs.progress import ProgressWriter, progress_key
from jobs.spec import TrainingRunSpec
from jobs.storage import TransferProgress, download_prefix, join, open_store, parse_uri

log = logging.getLogger("jobs")


class Stage:
    """The stage now running, for logs and the termination message; and what each stage cost."""

    name = "setup"
    started: float | None = None
    timings: dict[str, dict] = {}
    progress = None  # jobs.progress.ProgressWriter of rank 0 (None elsewhere, and in tests that call _stage)
    tracker = None  # jobs.trainer.tracking.MlflowTracker when the spec asks for tracking (rank 0 only)


def _peak_gib() -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


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
          tokens_per_s: float | None) -> dict:
    """metadata.json's ``cost``: this attempt's GPU-hours (its GPUs × its wall seconds), tokens, tokens/s/GPU and
    MFU. Queue wait, every attempt's GPU-hours and the price are the launcher's (`launcher status`): the job
    sees neither the Job's creation nor the namespace's price table."""
    from jobs.cost import job_cost

    nodes = spec.resources.nodes if facts["gpus"] and facts["gpus"] % spec.resources.nodes == 0 else 1
    return job_cost(gpus_per_node=facts["gpus"] // max(1, nodes), nodes=nodes, seconds=seconds, tokens=tokens,
                    tokens_per_s=tokens_per_s, params=facts["base_params"], card=facts["card"],
                    stages=Stage.timings)


def _stage(name: str | None) -> None:
    """Close the running stage (wall seconds, peak GPU memory) and start ``name`` (None: just close)."""
    now = time.perf_counter()
    if Stage.started is not None:
        Stage.timings[Stage.name] = {"seconds": round(now - Stage.started, 1), "peak_gpu_gib": _peak_gib()}
    if name is None:
        Stage.started = None
        return
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except ImportError:
        pass
    Stage.name, Stage.started = name, now
    if Stage.progress is not None:
        Stage.progress.update(stages=dict(Stage.timings))  # wall seconds of each stage so far (jobs/cost.py)
        Stage.progress.stage(name)
    log.info("── %s", name)


# ----------------------------------------------------------------------------- fetch

@dataclass
class Fetched:
    base_model_dir: str  # a local folder, or a hub id for hf:
    base_model_hash: str | None
    train_bytes: bytes
    validation_bytes: bytes | None
    eval_prompts_bytes: bytes | None


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

    uri = spec.base_model.uri
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
        _check_space(workdir, size, what)
        moved = TransferProgress(f"downloading the base model ({len(objs)} files)", size)
        try:
            download_prefix(store, prefix, dest, workers=16, progress=moved)
        except OSError as err:  # the volume filled up under us (another writer, a shared node disk)
            if err.errno != errno.ENOSPC:
                raise
            raise _no_space(workdir, size, what, shutil.disk_usage(workdir).free, during=True) from None
        moved.finish()
        base_dir, base_hash = str(dest), hash_dir(dest)
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
    return Fetched(base_dir, base_hash, train, val, prompts)


# --------------------------------------------------------------------------- prepare

@dataclass
class Prepared:
    train_rows: list
    val_rows: list
    report: dict


def prepare(spec: TrainingRunSpec, fetched: Fetched) -> Prepared:
    from jobs import dataprep

    try:
        prep = dataprep.prepare(fetched.train_bytes, spec.data, seed=spec.training.seed)
    except DataError as err:  # a rejected file's counts reach the run's status too
        if Stage.progress is not None and getattr(err, "report", None):
            Stage.progress.update(data=err.report["counts"])
        raise
    if Stage.progress is not None:  # where every line went (kept, dropped by reason, by format)
        Stage.progress.update(data=prep.report["counts"])
    report = {"train": prep.report}
    if fetched.validation_bytes is not None:
        vprep = dataprep.prepare(fetched.validation_bytes, spec.data.model_copy(update={"min_rows": 1}),
                                 seed=spec.training.seed)
        train_rows, val_rows = prep.rows, vprep.rows
        report["validation"] = vprep.report
    else:
        train_rows, val_rows = dataprep.split_validation(prep.rows, spec.dataset.validation_split,
                                                         spec.training.seed)
    report["split"] = {"train_rows": len(train_rows), "validation_rows": len(val_rows)}
    for line in dataprep.format_report(prep.report, max_problems=5).splitlines()[1:]:
        log.info("data %s", line.strip() if line.startswith("  OK") else line[2:])
    log.info("data: %d lines, %d valid, %d kept → %d train / %d validation", prep.report["total_lines"],
             prep.report["valid_rows"], prep.report["kept_rows"], len(train_rows), len(val_rows))
    return Prepared(train_rows, val_rows, report)


# ------------------------------------------------------------------------------ run

#: Fault injection for the GPU acceptance run: after the plan is made, cap this process's GPU
#: memory at this many GiB (torch.cuda.set_per_process_memory_fraction), as if another tenant had
#: taken the rest, so the planned micro-batch really fails and the back-off is exercised.
MEMORY_FAULT_ENV = "LORA_JOBS_FAULT_GPU_MEMORY_GIB"


def _apply_memory_fault(device) -> int | None:
    """Apply the fault-injection cap, if set; returns it in bytes."""
    cap = os.environ.get(MEMORY_FAULT_ENV)
    if not cap or device.type != "cuda":
        return None
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, float(cap) * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    log.warning("%s=%s: this process may now use only %.1f GiB of the GPU (fault injection)",
                MEMORY_FAULT_ENV, cap, fraction * total / 2**30)
    return int(fraction * total)


class _StopFlag:
    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


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


def run(spec: TrainingRunSpec, workdir: Path, *, run_id: str | None = None, image: str | None = None) -> dict | None:
    """Run every stage; return the summary that is also written as metadata.json (None on ranks > 0)."""
    import transformers

    from jobs.trainer import distributed
    from jobs.trainer.cpus import size_torch_threads

    workdir.mkdir(parents=True, exist_ok=True)
    transformers.utils.logging.set_verbosity_error()  # our log says what happens; no tqdm bars in pod logs
    transformers.utils.logging.disable_progress_bar()
    stop = _StopFlag()

    def on_sigterm(signum, frame):
        log.warning("SIGTERM received: finishing this step, then checkpointing and exiting for a retry")
        stop.requested = True
        if Stage.name != "train":
            raise Preempted(f"stopped by SIGTERM during {Stage.name}", hint="the Job retries this run")

    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.time()
    Stage.timings, Stage.started = {}, None

    world = distributed.from_env()
    size_torch_threads()  # the pod's CPU limit, not the node's cores (under torchrun: OMP_NUM_THREADS)
    out_store, out_prefix = open_store(spec.output)
    run_prefix = join(out_prefix, spec.name)
    if world.main:
        check_output_writable(out_store, run_prefix, run_id)
    Stage.progress = ProgressWriter(out_store, progress_key(run_prefix, spec.spec_hash()), enabled=world.main)
    Stage.progress.update(run=spec.name, run_id=run_id, world_size=world.size)
    Stage.tracker = _start_tracker(spec, run_id, world)
    try:
        metadata = _run(spec, workdir, world, run_id=run_id, image=image, stop=stop, started=started,
                        out_store=out_store, run_prefix=run_prefix)
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):  # Ctrl-C on a local run: the user's choice, not a failure
            Stage.progress.close("cancelled", error=f"interrupted during {Stage.name}", exit_code=EXIT_INTERRUPTED)
        else:
            Stage.progress.close("preempted" if isinstance(err, Preempted) else "failed",
                                 error=str(err).splitlines()[0] if str(err) else type(err).__name__,
                                 exit_code=int(getattr(err, "exit_code", 1)))
        if Stage.tracker is not None:  # KILLED: the retried pod carries on with the same MLflow run
            Stage.tracker.finish("KILLED" if isinstance(err, (Preempted, KeyboardInterrupt)) else "FAILED", wait_s=5.0)
        Stage.tracker = None
        raise
    if metadata is not None:
        Stage.progress.close("succeeded", stage="publish", version=metadata["version"],
                             location=metadata["location"], cost=metadata.get("cost"))
        if Stage.tracker is not None:
            from jobs.trainer.tracking import TAG_LOCATION

            page = workdir / "publish"
            Stage.tracker.finish("FINISHED", metrics=metadata["metrics"], tags={TAG_LOCATION: metadata["location"]},
                                 artifacts=[page / "eval_report.md", page / "eval_report.html"])
    Stage.progress = Stage.tracker = None
    return metadata


def _serving_ready(adapter_dir: Path, spec: TrainingRunSpec, config, tokenizer_size: int) -> dict:
    """The adapter folder as vLLM and KServe read it (its two files; the base named by its URI, not this job's
    folder), and vLLM's verdict on it (jobs/serving.py) for metadata.json and the eval report."""
    from jobs import serving

    removed = serving.make_serving_ready(adapter_dir, serving.base_model_name(spec.base_model.uri))
    if removed:
        log.info("adapter/: removed %s (vLLM and KServe read only %s)", ", ".join(removed),
                 " and ".join(serving.ADAPTER_FILES))
    try:
        verdict = serving.check_adapter_dir(adapter_dir, base_vocab_size=serving.vocab_size(config),
                                            tokenizer_size=tokenizer_size)
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
             "checkpointing": plan.gradient_checkpointing, "attention": plan.attn_implementation,
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


def _run(spec: TrainingRunSpec, workdir: Path, world, *, run_id, image, stop, started, out_store, run_prefix):
    import torch

    from jobs.trainer import distributed
    from jobs.trainer import evaluate as ev
    from jobs.trainer import fastpath
    from jobs.trainer.merge import merge_and_check, merge_dtype
    from jobs.trainer.modelio import load_config, load_model, load_tokenizer, model_context_length, resolve_precision
    from jobs.publish import publish_version
    from jobs.trainer.tracking import TENSORBOARD_DIR, write_tensorboard
    from jobs.trainer.train import Checkpoints, encode_rows, evaluate_loss, free_memory, train, wrap_lora

    device = torch.device(f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    distributed.init(world, device)

    _stage("fetch")
    if world.size == 1:
        fetched = fetch(spec, workdir)
    else:  # one download per pod (its local rank 0, into its own scratch); the pod's other ranks read it
        import torch.distributed as dist
        mine = fetch(spec, workdir) if world.local_rank == 0 else None
        world.barrier("every pod's base-model download")
        box = [mine if world.main else None]
        dist.broadcast_object_list(box, src=0)  # our own dataclass between our own processes
        fetched = mine or box[0]  # the same workdir path on every pod

    _stage("prepare")
    prepared = prepare(spec, fetched)

    _stage("load")
    precision = resolve_precision(spec.training.precision, device)
    free_before_load = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    tok = load_tokenizer(fetched.base_model_dir)
    # planned from config.json before the weights load: a base that cannot fit fails here, with the fix
    # (training.fsdp / resources.gpus), not as a CUDA out-of-memory error halfway through loading
    config = load_config(fetched.base_model_dir)
    plan = fastpath.plan(config, spec.training, device, quantization=spec.quantization.mode,
                         free_memory_bytes=free_before_load, world_size=world.size)
    cost_facts = _cost_facts(device, world, config)
    if Stage.progress is not None:
        Stage.progress.update(**cost_facts)
    if world.size > 1 and device.type == "cuda" and spec.training.fsdp == "auto":
        # each rank planned from its own free memory: near the threshold they could disagree, and a rank
        # that shards waits forever for one that does not; if any rank must shard, every rank does
        votes = distributed.all_gather_floats(world, [float(plan.fsdp)], device, "the plan's sharding decision")
        if float(votes.max()) > 0 and not plan.fsdp:
            plan = fastpath.plan(config, spec.training.model_copy(update={"fsdp": "on"}), device,
                                 quantization=spec.quantization.mode, free_memory_bytes=free_before_load,
                                 world_size=world.size)
    source = None  # rank 0's host copy of the base in an FSDP2 run (distributed.load_sharded)
    if plan.fsdp:
        model, source = distributed.load_sharded(
            world, fetched.base_model_dir, config, precision=precision, device=device, seed=spec.training.seed,
            wrap=lambda m: wrap_lora(m, spec), prepare=lambda m: fastpath.prepare_model(m, plan))
    else:
        model = load_model(fetched.base_model_dir, precision=precision, quantization=spec.quantization.mode,
                           device=device, double_quant=spec.quantization.double_quant)
    ctx = spec.base_model.max_context or model_context_length(config) or spec.training.max_seq_length
    max_len = min(spec.training.max_seq_length, ctx)
    if spec.training.gradient_checkpointing != "auto":
        plan.gradient_checkpointing = bool(spec.training.gradient_checkpointing)
    if device.type == "cpu":
        # No memory model to plan with on CPU: a micro-batch is per_device_batch_size full-length rows.
        plan.tokens_per_micro_batch = spec.training.per_device_batch_size * max_len
    tokens_per_mb = max(plan.tokens_per_micro_batch, max_len)
    plan.tokens_per_micro_batch = tokens_per_mb
    log.info("device %s, precision %s, quantization %s, max length %d, plan: %s", device, precision,
             spec.quantization.mode, max_len, "; ".join(plan.notes) or plan)
    memory_cap = _apply_memory_fault(device)
    train_ex, too_long = encode_rows(tok, prepared.train_rows, max_len)
    val_ex, _ = encode_rows(tok, prepared.val_rows, max_len)
    if too_long:
        prepared.report["train"]["prompt_too_long"] = {"count": len(too_long), "lines": too_long[:200]}
    if len(train_ex) < spec.data.min_rows:
        raise DataError(f"only {len(train_ex)} training rows fit in max_seq_length={max_len} tokens "
                        f"(need {spec.data.min_rows})", hint="raise training.max_seq_length or shorten prompts")

    if val_ex:
        log.info("validation loss of the base model on %d examples…", len(val_ex))
    # sharded, the model already carries the new adapter: lora_B is 0, so this is still the base's loss
    # (uncompiled: the compile cache is restored below, before anything compiles)
    with fastpath.eager_layers(model) if plan.fsdp else contextlib.nullcontext():
        val_before = evaluate_loss(model, val_ex, tokens_per_mb, device, world)
    prompts = ev.prompts_for(spec, prepared.val_rows,
                             ev.parse_prompts_jsonl(fetched.eval_prompts_bytes) if fetched.eval_prompts_bytes else None)
    if not spec.eval.enabled or not world.main:
        prompts = []  # generations, like everything after training, are rank 0's
    # the sharded model cannot generate on rank 0 alone: an FSDP2 run's base generates after training,
    # on rank 0's whole copy with the adapter switched off
    gen_before = ev.generate(model, tok, prompts, spec, device, "base model") if prompts and not plan.fsdp else []
    if val_before is not None:
        log.info("validation loss before training: %.4f", val_before)

    _stage("train")
    if not plan.fsdp:  # (sharded, load_sharded did this on rank 0's copy)
        torch.manual_seed(spec.training.seed)  # LoRA A is initialised randomly: the same seed, the same run
        model = fastpath.prepare_model(wrap_lora(model, spec), plan)
        distributed.broadcast_trainable(world, model)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    # keyed by what the run trains, not where: more memory or another number of GPUs resumes the run
    ckpts = Checkpoints(out_store, join(run_prefix, "checkpoints", spec.training_hash()),
                        workdir if world.main else workdir / f"rank-{world.rank}",
                        earlier_prefix=join(run_prefix, "checkpoints", spec.spec_hash()))
    tokens_per_s: dict[int, float] = {}  # per logged step, for the TensorBoard file

    def on_progress(**fields) -> None:
        if fields.get("tokens_per_s") is not None and "step" in fields:
            tokens_per_s[fields["step"]] = fields["tokens_per_s"]
        # the first step is written at once: `status` shows training has begun, with its speed, without
        # waiting out the write interval
        Stage.progress.update(urgent=fields.get("step") == 1, **fields)
        if Stage.tracker is not None:
            Stage.tracker.on_progress(**fields)

    cache = _compile_cache(spec, model, plan, out_store, run_prefix, world)
    result = train(model, spec, train_ex, val_ex, device=device, plan=plan, checkpoints=ckpts,
                   stop_requested=stop, world=world, on_progress=on_progress, compile_cache=cache)
    if cache is not None:
        cache.save()  # now with the validation graphs too
    if Stage.tracker is not None:
        Stage.tracker.evaluations(result.state.evals)  # the final validation is not a progress event
    if not world.main:  # rank 0 evaluates, merges and publishes
        log.info("rank %d: training done; rank 0 publishes", world.rank)
        distributed.shutdown(world)
        return None
    train_device = device
    if plan.fsdp:
        # The sharded model cannot run on rank 0 alone: what follows (generations, the adapter's files, the
        # merge) runs on the unsharded base with the whole adapter the ranks gathered, as on one GPU.
        from peft import set_peft_model_state_dict

        del model
        free_memory()
        end_plan = plan
        if not fastpath.whole_base_fits(config, plan):
            # a base that needed sharding to train may not fit one GPU even for generations: rank 0 then
            # evaluates, saves and merges on the CPU (slow for such a base, but the trained adapter is published)
            log.warning("FSDP2: the whole base (~%.0f GiB) does not fit one GPU's %.0f GiB budget: rank 0 "
                        "evaluates, saves and merges on the CPU, which is slow for a base this size",
                        fastpath.estimate_param_count(config) * torch.finfo(plan.dtype).bits / 8 / 2**30,
                        plan.memory_budget_bytes / 2**30)
            device = torch.device("cpu")
            end_plan = fastpath.plan(config, spec.training.model_copy(update={"fsdp": "off"}), device)
        model = fastpath.prepare_model(source.to(device), end_plan)  # the copy the shards came from
        source = None
        set_peft_model_state_dict(model, {k: v.to(device) for k, v in result.adapter.items()})
        log.info("FSDP2: rank 0 holds the whole base again (on %s) with the gathered adapter of step %d",
                 device, result.published_step)
        if prompts:
            with model.disable_adapter(), fastpath.eager_layers(model):
                gen_before = ev.generate(model, tok, prompts, spec, device, "base model")
    steady = result.tokens_per_second_steady
    log.info("trained %d steps in %.0fs: %.0f tokens/s (%s after warm-up), %d examples and ~%.0f tokens per "
             "step%s", result.state.step, result.seconds, result.tokens_per_second,
             "n/a" if steady is None else f"{steady:.0f}", result.examples_per_step, result.tokens_per_step,
             f", peak GPU memory {_peak_gib():.1f} GiB" if train_device.type == "cuda" else "")

    _stage("evaluate")
    if fastpath.remove_fp8(model):  # generations (and what is published) use the bf16 base, as the merge does
        log.info("FP8 projections swapped back to bf16 for evaluation")
    val_after = result.val_loss  # of the adapter about to be published (the best one)
    if val_after is not None:
        log.info("validation loss after training: %.4f (before %.4f)", val_after, val_before)
    with fastpath.eager_layers(model):
        gen_after = ev.generate(model, tok, prompts, spec, device, "with adapter") if prompts else []
    report = ev.build_report(spec, prompts=prompts, before=gen_before, after=gen_after,
                             val_loss_before=val_before, val_loss_after=val_after,
                             history=result.state.history, evals=result.state.evals,
                             train_outputs=[r.output for r in prepared.train_rows])
    report["training"]["published_step"] = result.published_step
    report["training"]["stopped_early"] = result.state.stopped_early
    out = workdir / "publish"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ev.plot_loss(result.state.history, result.state.evals, out / "loss_curve.png")
    write_tensorboard(out / TENSORBOARD_DIR, result.state.history, result.state.evals, tokens_per_s)

    _stage("merge")
    model.save_pretrained(out / "adapter", safe_serialization=True)
    tok.save_pretrained(out / "tokenizer")
    serving_verdict = _serving_ready(out / "adapter", spec, config, len(tok))
    merge_info = None
    if spec.merge.enabled:
        del model
        fastpath.undo_module_patches()  # the merge reloads the base: plain transformers classes, any device
        if device.type == "cuda":
            torch.cuda.empty_cache()
        m_dtype = merge_dtype(spec.merge.dtype, precision)
        merge_budget = plan.memory_budget_bytes
        if memory_cap is not None:
            merge_budget = min(memory_cap, merge_budget or memory_cap)
        merge_info = merge_and_check(fetched.base_model_dir, out / "adapter", out / "merged", dtype=m_dtype,
                                     tolerance=spec.merge.tolerance,
                                     prompts=[ev_prompt.prompt for ev_prompt in prompts] or
                                     [r.instruction for r in prepared.val_rows[:3]] or ["Hello"],
                                     tok=tok, device=device, memory_budget_bytes=merge_budget)
    report["merge"] = merge_info
    report["serving"] = serving_verdict

    _stage("publish")
    metadata = {
        "run": spec.name, "run_id": run_id, "spec_hash": spec.spec_hash(),
        "base_model": {"uri": spec.base_model.uri, "sha256": fetched.base_model_hash},
        "lora": {"rank": spec.lora.rank, "alpha": spec.lora.alpha, "dropout": spec.lora.dropout,
                 "target_modules": spec.lora.target_modules, "use_rslora": spec.lora.use_rslora,
                 "use_dora": spec.lora.use_dora},
        "quantization": spec.quantization.mode,
        "training": {"epochs": spec.training.epochs, "learning_rate": spec.training.learning_rate,
                     "weight_decay": spec.training.weight_decay, "optimizer": spec.training.optimizer,
                     "examples_per_step": result.examples_per_step, "world_size": world.size,
                     "tokens_per_step": round(result.tokens_per_step, 1),
                     "tokens_per_micro_batch": plan.tokens_per_micro_batch,
                     "max_seq_length": max_len, "precision": precision, "seed": spec.training.seed,
                     "loss_scaling": result.loss_scaling, "gradient_checkpointing": plan.gradient_checkpointing,
                     "fp8": plan.fp8, "fp8_recipe": fastpath.fp8_recipe() if plan.fp8 else None,
                     "first_step_seconds": result.first_step_seconds,
                     "compile_cache": cache.summary() if cache is not None else None,
                     "steps": result.state.step, "planned_steps": result.total_steps,
                     "published_step": result.published_step, "best_val_loss": result.state.best_val,
                     "stopped_early": result.state.stopped_early, "resumed_from_step": result.resumed_from,
                     "oom_backoffs": result.state.oom_backoffs,
                     "train_seconds": round(result.seconds, 1),
                     "tokens_per_second": round(result.tokens_per_second, 1),
                     "tokens_per_second_steady": None if steady is None else round(steady, 1),
                     "gpu_memory_budget_gib": None if plan.memory_budget_bytes is None
                     else round(plan.memory_budget_bytes / 2**30, 1),
                     "plan": result.plan_notes},
        "dataset": {"train": spec.dataset.train, "sha256": prepared.report["train"]["dataset_sha256"],
                    "rows_kept": prepared.report["train"]["kept_rows"]},
        "metrics": {"train_loss_first": report["training"]["first_loss"],
                    "train_loss_last": report["training"]["last_loss"],
                    "val_loss_before": report["validation"]["loss_before"],
                    "val_loss_after": report["validation"]["loss_after"],
                    "perplexity_after": report["validation"]["perplexity_after"]},
        "merged": spec.merge.enabled,
        "serving": serving_verdict,
        "code_version": os.environ.get("LORA_JOBS_CODE_VERSION", __version__),
        "image": image or os.environ.get("LORA_JOBS_IMAGE"),
        "device": str(device), "torch": torch.__version__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "stages": Stage.timings,
        "cost": _cost(cost_facts, spec, seconds=time.time() - started, tokens=result.state.tokens_seen,
                      tokens_per_s=result.tokens_per_second),
    }
    (out / "metadata.json").write_text(json.dumps(metadata, indent=1))
    (out / "data_report.json").write_text(json.dumps(prepared.report, indent=1))
    (out / "eval_report.json").write_text(json.dumps(report, indent=1))
    (out / "eval_report.md").write_text(ev.render_markdown(report, spec))
    (out / "eval_report.html").write_text(ev.render_html(report, spec, (out / "loss_curve.png").read_bytes()))
    _stage(None)  # what publishing costs is logged below; metadata.json is already written
    t_pub = time.perf_counter()
    version = publish_version(out_store, run_prefix, out)
    log.info("published %s in %.1fs", version, time.perf_counter() - t_pub)
    metadata["version"] = version
    metadata["location"] = f"{out_store.label}/{join(run_prefix, version)}"
    distributed.shutdown(world)
    return metadata
