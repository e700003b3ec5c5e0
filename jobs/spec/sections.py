"""The spec's sections: base_model, dataset, lora, training, data, eval, merge, export, promotion,
resources, tracking and quantization, each a strict model with its own checks."""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from jobs.spec.base import REMOVED, _Strict
from jobs.spec.places import _check_uri
from jobs.spec.secret import Plain, Prose, _short

ALL_LINEAR: Literal["all-linear"] = "all-linear"


class BaseModelSpec(_Strict):
    uri: str = Field(description="Where the base model is: s3://bucket/prefix/ (a folder of safetensors + config + "
                                 "tokenizer), a local path, or hf:org/name for clusters that can reach a model hub.")
    max_context: int | None = Field(None, ge=16, description="Override the model's context length (rarely needed).")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _check_uri(v, "base_model.uri", allow_hub=True)


class DatasetSpec(_Strict):
    train: str = Field(description="JSONL, one row a line, in any of the accepted formats (a file may mix them): "
                                   "{instruction, input?, output} (optional 'persona'/'tone'), chat "
                                   "{messages: [{role, content}]}, or ShareGPT {conversations: [{from, value}]}; "
                                   "with training.method dpo or orpo, preference pairs {prompt, chosen, "
                                   "rejected} in TRL's formats. `launcher data check --explain` shows each.")
    validation: str | None = Field(None, description="Optional validation JSONL; else validation_split is used.")
    validation_split: float = Field(0.1, ge=0.0, le=0.5, description="Fraction held out when no validation file.")

    @field_validator("train", "validation")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return None if v is None else _check_uri(v, "dataset path")


class LoraSpec(_Strict):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r (guide: 16-64; outside it, a warning).")
    alpha: int = Field(16, ge=1, le=4096, description="LoRA alpha (guide: 16-64; outside it, a warning).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout (guide: 0.05).")
    target_modules: Literal["all-linear"] | list[Annotated[Plain, Field(min_length=1)]] = Field(
        ALL_LINEAR, description="'all-linear' or a list of module names such as [q_proj, v_proj].")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (slower; not with 4-bit).")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("is empty; use 'all-linear' or name at least one module")
        return v


#: Each preference method's beta when training.beta is unset: DPO's beta (Rafailov et al. 2023; TRL's DPOConfig
#: default) and ORPO's lambda, which TRL's ORPOConfig calls beta (Hong et al. 2024; TRL's default).
PREFERENCE_BETA_DEFAULTS = {"dpo": 0.1, "orpo": 0.1}
#: The methods that train on preference pairs ({prompt, chosen, rejected}; jobs/preference.py).
PREFERENCE_METHODS = tuple(PREFERENCE_BETA_DEFAULTS)


class TrainingSpec(_Strict):
    method: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description="sft: supervised fine-tuning on rows (instruction/chat). dpo: Direct Preference "
                           "Optimization on preference pairs {prompt, chosen, rejected}; the reference model is the "
                           "base with the adapter disabled, so no second model is loaded. orpo: Odds-Ratio "
                           "Preference Optimization on the same pairs (the chosen side's loss plus an odds-ratio "
                           "term), no reference. dpo/orpo read dataset files as pairs (`launcher data check "
                           "--explain`).")
    beta: float | None = Field(
        None, allow_inf_nan=False,
        description="dpo: beta, how far the adapter may move from the reference (higher: less; guide 0.01-0.5, "
                    "outside it a warning). orpo: lambda, the weight of the odds-ratio term (TRL calls it beta; "
                    "guide 0.05-1.0). null: the method's default, 0.1 for both. Only for dpo and orpo.")
    epochs: int = Field(1, ge=1, le=100, description="Passes over the training data (guide: 1-3; outside it, "
                                                     "a warning).")
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="AdamW learning rate (guide: 1e-4 to 2e-4; "
                                                                   "dpo/orpo: 5e-6 to 5e-5; outside it, a "
                                                                   "warning).")
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay (guide: 0.01).")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"] = Field(
        "adamw_torch", description="An AdamW variant (guide: AdamW).")
    per_device_batch_size: int = Field(4, ge=1, le=256, description="Examples per GPU per accumulation "
                                       "step; sets the examples per optimizer step with the accumulation. On a GPU "
                                       "they are packed into micro-batches by tokens (the same examples per step).")
    gradient_accumulation_steps: int | Literal["auto"] = Field(
        "auto", description="'auto' aims at 16 examples per optimizer step (guide: 4-16). An optimizer step sees "
                            "per_device_batch_size x accumulation x GPUs examples, however they are packed.")
    max_seq_length: int = Field(1024, ge=32, le=131072, description="Token cap per example; capped again by the "
                                                                     "model's context length.")
    # Removed: the job always packs (jobs/trainer/fastpath/packing.py) and nothing read the field. Kept only to say so: `true`
    # (what every ConfigMap rendered before carries) is a warning, `false` an error. Never dumped, so neither the
    # ConfigMap nor `--explain` shows it; the hashes add back the `true` they always held (see _hash).
    packing: bool | None = Field(None, exclude=True, description=REMOVED)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 where the GPU "
                                                                                   "supports it, else fp16, fp32 on CPU.")
    seed: int = Field(42, ge=0, description="Seed for shuffling, splits and initialisation.")
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5, description="Linear warm-up as a fraction of steps.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (for smoke runs).")
    eval_interval_steps: int | Literal["auto"] = Field(
        "auto", description="Validation loss every N optimizer steps; auto: 4 times per epoch (at most 50 steps "
                            "apart), so early stopping can act on small data.")
    early_stopping_patience: int | None = Field(3, ge=1, description="Stop after N evaluations without a better "
                                                                      "validation loss; null turns it off.")
    checkpoint_interval_steps: int = Field(50, ge=1, description="Checkpoint to object storage every N steps.")
    gradient_checkpointing: bool | Literal["auto"] = Field("auto", description="auto: off while a micro-batch of 4,096 tokens (or two rows) fits without it; else on for the fewest decoder layers that make it fit (16-bit bases), or every layer. true/false: every layer, or none.")
    gpu_memory_gib: float | Literal["auto"] = Field(
        "auto", description="GPU memory the run plans for, per GPU. auto: all free memory for 16-bit LoRA; "
                            "12 GiB for QLoRA/8-bit (the guide's 4-12 GB), so the run also fits a small card. The "
                            "plan keeps one chunk of the loss's fp32 logits free (2,048 tokens: 1.96 GiB for a 128k "
                            "vocabulary); where that leaves no room for one row (pair) with checkpointing, the loss "
                            "runs 1,024, 512 or 256 tokens at a time (same values; the plan's notes say so).")
    logging_interval_steps: int = Field(1, ge=1, description="Progress line every N optimizer steps.")
    fp8: Literal["auto", "on", "off"] = Field(
        "off", description="FP8 matmuls (torchao float8, dynamic tensorwise scaling) for the frozen base model's "
                           "projections on GPUs that have them (compute capability >= 8.9: Ada, Hopper and newer): "
                           "their forward and input-gradient GEMMs run in FP8; LoRA A/B, norms, attention, the "
                           "lm_head, the optimizer and the merge stay in bf16/fp32, and evaluation after training "
                           "runs the bf16 base. off (default); auto: on where the GPU and torchao allow it; on: "
                           "the run fails where they do not. Not with quantization.")
    compile: Literal["auto", "off"] = Field(
        "auto", description="torch.compile of each decoder layer on a GPU (fuses the norms, RoPE, SwiGLU and LoRA "
                            "dropout; the first step pays ~1 minute of compilation, which the compile cache saves "
                            "for a retry or a rerun of the same shape). auto (default): for Llama-type models in "
                            "16-bit LoRA and 4-bit QLoRA, not when the base is FSDP2-sharded; off: never (Liger's "
                            "kernels where installed), e.g. for a short run or when compilation fails.")
    fsdp: Literal["auto", "on", "off"] = Field(
        "auto", description="FSDP2 sharding of the frozen base model across the training processes (PyTorch's "
                            "fully_shard over every rank): each GPU holds 1/N of the weights, so a base that does "
                            "not fit one GPU (e.g. 70B in bf16) trains on N of them. auto (default): shard when the "
                            "run has more than one training process and the weights, the LoRA state and headroom "
                            "do not fit one GPU's memory budget; otherwise data parallel with the whole base on "
                            "every GPU. on: shard whenever there is more than one process (no effect with one); "
                            "off: never (a base that does not fit one GPU then fails at planning). Sharded runs "
                            "skip torch.compile and FP8; not with quantization. Checkpoints are the same either "
                            "way: a run resumes with or without sharding.")

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("sft", *PREFERENCE_METHODS):
            known = v.strip().lower() in ("sft", *PREFERENCE_METHODS)
            raise ValueError(f"'{_short(v)}' is not a training method: write sft, dpo or orpo"
                             + (" (lowercase)" if known else " (others, such as KTO, IPO or GRPO, "
                                                             "are not supported)"))
        return v

    @field_validator("beta")
    @classmethod
    def _beta_needs_a_preference_method(cls, v: float | None, info: ValidationInfo) -> float | None:
        method = info.data.get("method", "sft")
        if v is not None and v <= 0:
            raise ValueError(f"{v:g} is not above 0: beta scales the preference term and must be positive; write "
                             "e.g. 0.1 (the default of dpo and orpo), or delete the line for the default")
        if v is not None and method == "sft":
            raise ValueError("is only read by training.method dpo or orpo, and the method is sft: set "
                             "training.method: dpo (or orpo), or delete the beta line")
        return v

    def preference_beta(self) -> float:
        """The beta a dpo/orpo run trains with: training.beta, or the method's default (PREFERENCE_BETA_DEFAULTS).
        Raises ValueError for method sft, which has no beta. The spec keeps ``beta`` as written (None stays
        None), so the spec hash and the rendered ConfigMap do not change for specs that leave it out."""
        if self.method not in PREFERENCE_BETA_DEFAULTS:
            raise ValueError(f"training.method {self.method} has no preference beta")
        return self.beta if self.beta is not None else PREFERENCE_BETA_DEFAULTS[self.method]

    @field_validator("packing")
    @classmethod
    def _packing(cls, v: bool | None) -> bool | None:
        if v is False:
            raise ValueError("was removed: the job always packs examples (attention stays per "
                             "example, so packing does not change what is learned); delete the line")
        return v

    @field_validator("gradient_accumulation_steps")
    @classmethod
    def _ga(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("must be between 1 and 256, or 'auto'")
        return v

    @field_validator("eval_interval_steps")
    @classmethod
    def _eval_interval(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1, or 'auto'")
        return v

    @field_validator("fp8", "fsdp", mode="before")
    @classmethod
    def _fp8_yaml_booleans(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `fp8: on` / `fsdp: off` as a boolean
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_yaml_booleans(cls, v: Any) -> Any:
        # `compile: true` asks for what auto does (compile wherever it works); `compile: false` is off
        return {True: "auto", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("gpu_memory_gib")
    @classmethod
    def _gpu_memory(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not 1 <= v <= 4096:
            raise ValueError("must be between 1 and 4096 GiB, or 'auto'")
        return v

    def examples_per_step(self, world_size: int = 1) -> int:
        """Examples in one optimizer step. With accumulation 'auto': 16 (or per_device_batch_size if
        larger) on any number of GPUs, so a run means the same on 1 GPU or 8; with an explicit
        accumulation: per_device_batch_size x accumulation x world size."""
        if self.gradient_accumulation_steps == "auto":
            return max(16, self.per_device_batch_size)
        return self.per_device_batch_size * int(self.gradient_accumulation_steps) * max(1, world_size)

    def eval_interval_for(self, steps_per_epoch: int) -> int:
        """Optimizer steps between validations: the spec's number, or 4 times an epoch (at most every 50)."""
        if self.eval_interval_steps != "auto":
            return int(self.eval_interval_steps)
        return max(1, min(50, math.ceil(steps_per_epoch / 4)))

    def warmup_steps_for(self, total_steps: int) -> int:
        """Warm-up steps: warmup_ratio of the run, but at least a few steps on short runs (not 0 of 14)."""
        if self.warmup_ratio <= 0 or total_steps < 2:
            return 0
        return max(int(round(self.warmup_ratio * total_steps)), min(10, total_steps // 10))

    def accumulation_for(self, world_size: int = 1) -> int:
        """Gradient accumulation steps: the spec's, or what 'auto' needs for examples_per_step."""
        if self.gradient_accumulation_steps != "auto":
            return int(self.gradient_accumulation_steps)
        per_step = self.per_device_batch_size * max(1, world_size)
        return max(1, math.ceil(self.examples_per_step(world_size) / per_step))


class DataRules(_Strict):
    """The golden rules of data preparation; each switchable."""

    format: Literal["auto", "instruction", "messages", "sharegpt"] = Field(
        "auto", description="Rows: {instruction, input?, output} (alpaca), {messages: [{role, content}]} (system/"
                            "user/assistant, multi-turn) or ShareGPT {conversations: [{from, value}]}; auto: by the "
                            "file's first row. The rules apply to every assistant turn; loss is on assistant turns only.")
    strip_boilerplate: bool = Field(True, description="Remove 'As an AI…' boilerplate and disclaimers.")
    remove_urls: bool = Field(True, description="Remove URLs from outputs (kept when a row is about the URL).")
    long_sentences: Literal["flag", "trim", "drop", "off"] = Field(
        "flag", description="Sentences over max_sentence_words: flag in the report, trim them, or drop the row.")
    max_sentence_words: int = Field(28, ge=5, le=200, description="Guide: sentences of at most 28 words.")
    dedup_exact: bool = Field(True, description="Drop exact duplicates (after normalising case and spaces).")
    dedup_near: bool = Field(True, description="Drop near-duplicates (MinHash LSH).")
    near_dup_threshold: float = Field(0.85, gt=0.0, le=1.0, description="Jaccard similarity counted as near-dup.")
    pii: Literal["redact", "drop", "off"] = Field("redact", description="Emails, phones, card and ID numbers in "
                                                                        "outputs: redact, drop the row, or off.")
    balance: bool = Field(True, description="Cap each persona/tone at max_group_share of the rows.")
    balance_field: Plain = Field("persona", description="Row field naming the persona or tone ('tone' also read).")
    max_group_share: float = Field(0.5, gt=0.0, le=1.0, description="Largest share one persona may keep.")
    min_rows: int = Field(8, ge=1, description="Fewer valid rows than this fails the run (bad data).")
    max_output_words: int | None = Field(None, ge=1, description="Drop rows whose output is longer (concise outputs).")

    @field_validator("pii", "long_sentences", mode="before")
    @classmethod
    def _off_yaml_boolean(cls, v: Any, info: Any) -> Any:
        # YAML 1.1 reads a bare `pii: off` as false, and that is what it says. `pii: true` asks for the rule:
        # its default, redact; long_sentences has no single "on", so true stays an error listing the choices.
        if v is False:
            return "off"
        return "redact" if v is True and info.field_name == "pii" else v


class LengthBands(_Strict):
    short: tuple[int, int] = Field((1, 40), description="Word range of a short answer.")
    medium: tuple[int, int] = Field((41, 120), description="Word range of a medium answer.")
    long: tuple[int, int] = Field((121, 400), description="Word range of a long answer.")

    @field_validator("short", "medium", "long")
    @classmethod
    def _band(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if lo < 0 or lo > hi:
            raise ValueError(f"[{lo}, {hi}] is not a word range: write [low, high] with 0 <= low <= high")
        return v


class EvalPrompt(_Strict):
    prompt: Prose = Field(min_length=1)
    band: Literal["short", "medium", "long"] | None = Field(None, description="Expected length band.")
    reference: Prose | None = Field(None, description="Expected facts, compared for faithfulness.")


class EvalSpec(_Strict):
    enabled: bool = True
    prompts: str | list[EvalPrompt] | None = Field(
        None, description="A JSONL file of {prompt, band?, reference?} or an inline list; default: the first "
                          "validation instructions.")
    num_prompts: int = Field(8, ge=0, le=512, description="How many prompts to generate for when none are given.")
    temperature: float = Field(0.3, ge=0.0, le=2.0, description="Guide: 0.2-0.4.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Guide: 0.9.")
    top_k: int = Field(40, ge=0, description="Guide: 40.")
    max_new_tokens: int = Field(128, ge=1, le=4096)
    length_bands: LengthBands = Field(default_factory=LengthBands)

    @field_validator("prompts")
    @classmethod
    def _prompts_path(cls, v: Any) -> Any:
        return _check_uri(v, "eval.prompts") if isinstance(v, str) else v


class ExportSpec(_Strict):
    gguf: list[Literal["f16", "bf16", "q8_0"]] = Field(
        default_factory=list, description="Also publish GGUF files (llama.cpp, Ollama) of the merged model and of "
        "the adapter in these types, for Llama- and Qwen-family bases; read back and checked before publishing. "
        "Needs merge.enabled.")

    @field_validator("gguf")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"{v} names a type twice: list each of f16, bf16, q8_0 at most once")
        return v


class PromotionTolerance(_Strict):
    """How much worse than the champion a metric may be before the gate calls it significantly worse: the
    whole confidence interval of the difference must lie beyond this (docs/promotion.md)."""

    val_loss: float = Field(0.02, ge=0.0, description="Validation loss, nats per token (lower is better).")
    rouge_l: float = Field(0.02, ge=0.0, le=1.0, description="Mean ROUGE-L of the eval prompts' answers against "
                                                             "their references.")
    facts: float = Field(0.02, ge=0.0, le=1.0, description="Mean share of the references' facts found.")
    fluent: float = Field(0.05, ge=0.0, le=1.0, description="Share of answers without a fluency flag (not "
                                                            "degenerate: no repetition, cut-off or scaffolding).")
    regression: float = Field(0.05, ge=0.0, description="Mean loss of the general-ability regression set's "
                                                        "reference answers (jobs/regression/general.jsonl), nats "
                                                        "per token (lower is better): what the adapter forgot.")


class PromotionSpec(_Strict):
    """The eval gate that moves the run's ``champion`` pointer (jobs/promotion.py, docs/promotion.md)."""

    auto: bool = Field(False, description="At the end of the run, promote the new version to the run's champion "
                                          "if it passes the gate against the current one (the first complete "
                                          "version becomes champion). A failed gate leaves it published, "
                                          "unpromoted; `launcher promote` can still force it.")
    primary: Literal["val_loss", "rouge_l", "facts", "fluent"] = Field(
        "val_loss", description="The metric whose mean must not be worse than the champion's.")
    tolerance: PromotionTolerance = Field(default_factory=PromotionTolerance)
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Of the paired bootstrap intervals.")
    resamples: int = Field(2000, ge=100, le=100_000, description="Paired bootstrap resamples of the per-prompt "
                                                                 "differences.")
    seed: int = Field(0, ge=0, description="Seed of the bootstrap: the same two versions always get the same "
                                           "verdict.")


class MergeSpec(_Strict):
    enabled: bool = Field(True, description="Also publish the adapter merged into the base model.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="dtype of the merged weights.")
    tolerance: float = Field(1e-3, gt=0.0, lt=1.0, description="The merge check, done in fp32 before the merged "
                             "weights are cast to merge.dtype: largest relative error allowed in each merged "
                             "weight's change (against scale x B x A) and in the logits (against base+adapter).")


_CPU_RE = re.compile(r"^\d+(\.\d+)?m?$")
_BYTES_RE = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")


class ResourcesSpec(_Strict):
    """What the Job asks of the cluster. The only pod settings a spec controls."""

    gpus: int = Field(1, ge=0, le=16, description="GPUs of the training pod. Above 1 the job runs one training "
                                                  "process per GPU (torchrun, data parallel): every optimizer step's "
                                                  "examples are split across them, rank 0 publishes.")
    nodes: int = Field(1, ge=1, le=64, description="Pods (nodes) of the run, each with `gpus` GPUs. Above 1 the "
                                                   "launcher renders an Indexed Job (one pod per node, completion "
                                                   "index = node rank) and a headless Service for torchrun's "
                                                   "rendezvous, or a JobSet of those pods where the launcher "
                                                   "setting multinode_workload says so (jobset, or auto on a "
                                                   "cluster that serves JobSets); the world is nodes x gpus "
                                                   "processes.")
    cpu: str = Field("4",
                     description="CPU request and limit, e.g. '8' or '500m'. torch's CPU threads follow it "
                                 "(shared by a pod's GPU processes), not the node's core count.")
    memory: str = Field("32Gi",
                        description="Memory request and limit of each pod. A run that shards the base "
                                    "(training.fsdp) holds the whole base in pod 0's host memory: ~2 bytes a "
                                    "parameter in bf16 (a 70B base: ~140Gi), plus the data and the job.")
    scratch: str = Field("100Gi",
                         description="Scratch volume size (data, base model, checkpoints).")
    timeout_hours: float = Field(24, gt=0, le=720, description="activeDeadlineSeconds of the Job.")
    retries: int = Field(3, ge=0, le=20, description="backoffLimit: retries of transient failures.")
    priority_class: str | None = Field(None, description="PriorityClass name for the pod (`kubectl get "
                                                         "priorityclass` lists them).")

    @field_validator("cpu", "memory", "scratch", mode="before")
    @classmethod
    def _quantity_numbers(cls, v: Any) -> Any:
        # Kubernetes takes a bare number (cpu: 4, memory: 34359738368) as well as a string; so do we, as the
        # same string the number would be written as.
        if isinstance(v, bool):
            return v
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float) and math.isfinite(v):
            return format(v, "g") if "e" not in format(v, "g") else str(v)
        return v

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: str) -> str:
        if not _CPU_RE.match(v):
            raise ValueError(f"'{_short(v)}' is not a CPU quantity: write cores ('8', '0.5') or millicores ('500m')")
        if float(v.rstrip("m")) == 0:
            raise ValueError("0 CPUs: the pod would get a zero CPU limit and never run; ask for at least '100m'")
        return v

    @field_validator("memory", "scratch")
    @classmethod
    def _bytes(cls, v: str, info: Any) -> str:
        m = _BYTES_RE.match(v)
        if not m:
            close = re.match(r"^(\d+(?:\.\d+)?)\s*([KMGTkmgt])i?[Bb]?$", v.strip())
            hint = (f"write {close.group(1)}{close.group(2).upper()}i (Kubernetes: Ki, Mi, Gi, Ti are powers of 2; "
                    f"k, M, G, T of 10; there is no 'B')") if close else "write e.g. 32Gi (Ki, Mi, Gi, Ti)"
            raise ValueError(f"'{_short(v)}' is not a Kubernetes quantity: {hint}")
        if float(m.group(1)) == 0:
            raise ValueError(f"0 bytes: the pod would get a zero {info.field_name} limit; ask for e.g. "
                             f"{'32Gi' if info.field_name == 'memory' else '100Gi'}")
        return v

    @field_validator("priority_class")
    @classmethod
    def _priority_class(cls, v: str | None) -> str | None:
        if v is not None and not (len(v) <= 253 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", v)):
            raise ValueError(f"'{_short(v)}' is not a PriorityClass name: lowercase letters, digits, '-' and '.', "
                             "starting and ending with a letter or digit (kubectl get priorityclass lists them)")
        return v


class MlflowSpec(_Strict):
    uri_env: Plain = Field("MLFLOW_TRACKING_URI", pattern=r"^[A-Z_][A-Z0-9_]*$",
                         description="Name of the pod's environment variable holding the tracking URI (the "
                                     "launcher sets it from its mlflow_tracking_uri setting; a token comes only "
                                     "from the Secret named by mlflow_token_secret, never from the spec).")
    experiment: Plain = Field(min_length=1, max_length=500, description="MLflow experiment; created when missing.")


class TrackingSpec(_Strict):
    mlflow: MlflowSpec | None = Field(None, description="Log params (the whole spec), metrics per step and "
                                      "evaluation, the version's location and the eval page to an MLflow "
                                      "server. A tracker that is down never fails the run.")


class Quantization(_Strict):
    mode: Literal["none", "8bit", "4bit"] = Field("none", description="4bit = QLoRA with NF4 via bitsandbytes.")
    double_quant: bool = Field(True, description="Nested quantisation of the 4-bit scales.")

