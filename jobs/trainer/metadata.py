"""metadata.json: what a published version says about its run, as typed fields.

Users and tests read these keys: a field added, renamed or moved here changes the published file
(tests/unit/test_run_metadata.py holds the list).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field


@dataclass
class BaseModelInfo:
    uri: str
    sha256: str | None  # of the downloaded folder (None for hf: ids)
    #: how the files came: the node cache's hit|miss|off and the bytes fetched (jobs/model_cache.py; an s3:// base)
    fetch: dict | None = None


@dataclass
class LoraInfo:
    rank: int
    alpha: float
    dropout: float
    target_modules: object  # a list of module names, or "all-linear"
    use_rslora: bool
    use_dora: bool


@dataclass
class TrainingInfo:
    epochs: int
    learning_rate: float
    weight_decay: float
    optimizer: str
    examples_per_step: int
    world_size: int
    tokens_per_step: float
    tokens_per_micro_batch: int
    max_seq_length: int
    precision: str
    seed: int
    loss_scaling: bool
    gradient_checkpointing: bool
    fp8: bool
    fp8_recipe: object
    first_step_seconds: float | None
    compile_cache: dict | None
    steps: int
    planned_steps: int
    published_step: int
    best_val_loss: float | None
    stopped_early: bool
    resumed_from_step: int | None
    oom_backoffs: list
    train_seconds: float
    tokens_per_second: float
    tokens_per_second_steady: float | None
    gpu_memory_budget_gib: float | None
    plan: list


@dataclass
class DatasetInfo:
    train: str
    sha256: str
    rows_kept: int


@dataclass
class Metrics:
    train_loss_first: float | None
    train_loss_last: float | None
    val_loss_before: float | None
    val_loss_after: float | None
    perplexity_after: float | None


@dataclass
class RunMetadata:
    run: str
    run_id: str | None
    spec_hash: str
    base_model: BaseModelInfo
    lora: LoraInfo
    quantization: str
    training: TrainingInfo
    dataset: DatasetInfo
    metrics: Metrics
    merged: bool
    serving: dict
    code_version: str
    image: str | None
    device: str
    torch: str
    started_at: str
    seconds: float
    stages: dict
    cost: dict
    #: the held-out set the eval measured (jobs.promotion.held_out_record): the promotion gate compares two
    #: versions only on the same one
    held_out: dict | None = None
    #: the GGUF files of export.gguf (jobs/trainer/gguf_export.py: file, kind, type, bytes, sha256, checks)
    gguf: list = field(default_factory=list)
    #: spec.base_adapter: the published version the run started from (uri, its manifest's sha256, the sha256 of the
    #: base it was trained on); None for a run that starts from a new adapter
    base_adapter: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def run_metadata(spec, *, run_id, image, base_model_hash, report: dict, data_report: dict, result, plan,
                 max_len: int, precision: str, world_size: int, compile_cache: dict | None, serving: dict,
                 device, started_at: float, stages: dict, cost, held_out: dict | None = None,
                 base_model_fetch: dict | None = None, base_adapter: dict | None = None) -> RunMetadata:
    """The run's metadata from the spec and what each stage returned. ``cost``: ``seconds -> metadata's cost``
    (measured on the same clock reading as ``seconds``)."""
    import torch

    from jobs import __version__
    from jobs.trainer import fastpath

    steady = result.tokens_per_second_steady
    seconds = time.time() - started_at
    t, lora = spec.training, spec.lora
    return RunMetadata(
        run=spec.name, run_id=run_id, spec_hash=spec.spec_hash(),
        base_model=BaseModelInfo(uri=spec.base_model.uri, sha256=base_model_hash, fetch=base_model_fetch),
        lora=LoraInfo(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                      use_rslora=lora.use_rslora, use_dora=lora.use_dora),
        quantization=spec.quantization.mode,
        training=TrainingInfo(
            epochs=t.epochs, learning_rate=t.learning_rate, weight_decay=t.weight_decay, optimizer=t.optimizer,
            examples_per_step=result.examples_per_step, world_size=world_size,
            tokens_per_step=round(result.tokens_per_step, 1), tokens_per_micro_batch=plan.tokens_per_micro_batch,
            max_seq_length=max_len, precision=precision, seed=t.seed, loss_scaling=result.loss_scaling,
            gradient_checkpointing=plan.gradient_checkpointing, fp8=plan.fp8,
            fp8_recipe=fastpath.fp8_recipe() if plan.fp8 else None, first_step_seconds=result.first_step_seconds,
            compile_cache=compile_cache, steps=result.state.step, planned_steps=result.total_steps,
            published_step=result.published_step, best_val_loss=result.state.best_val,
            stopped_early=result.state.stopped_early, resumed_from_step=result.resumed_from,
            oom_backoffs=result.state.oom_backoffs, train_seconds=round(result.seconds, 1),
            tokens_per_second=round(result.tokens_per_second, 1),
            tokens_per_second_steady=None if steady is None else round(steady, 1),
            gpu_memory_budget_gib=None if plan.memory_budget_bytes is None
            else round(plan.memory_budget_bytes / 2**30, 1),
            plan=result.plan_notes),
        dataset=DatasetInfo(train=spec.dataset.train, sha256=data_report["train"]["dataset_sha256"],
                            rows_kept=data_report["train"]["kept_rows"]),
        metrics=Metrics(train_loss_first=report["training"]["first_loss"],
                        train_loss_last=report["training"]["last_loss"],
                        val_loss_before=report["validation"]["loss_before"],
                        val_loss_after=report["validation"]["loss_after"],
                        perplexity_after=report["validation"]["perplexity_after"]),
        merged=spec.merge.enabled, serving=serving,
        code_version=os.environ.get("LORA_JOBS_CODE_VERSION", __version__),
        image=image or os.environ.get("LORA_JOBS_IMAGE"),
        device=str(device), torch=torch.__version__,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        seconds=round(seconds, 1), stages=stages, cost=cost(seconds), held_out=held_out,
        gguf=report.get("gguf") or [], base_adapter=base_adapter)
