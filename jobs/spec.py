"""The training spec: defined once, shared by the launcher and the job.

Importable without torch or the Kubernetes client. Every field is typed, has a
default from ``docs/lora-training-guide.md`` where the guide gives one, and a
description that the docs are written from. Unknown keys are errors, and
:func:`load_spec` reports every problem at once, each with its field path and,
for YAML files, its line.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from jobs.errors import Problem, SpecError

#: A run name becomes a Job name, label values and an S3 key segment. 40 leaves
#: room for the "-<hash>" suffix inside the 63-character label limit.
#: The description of a field kept only to refuse or warn about it (field_docs leaves it out).
REMOVED = "(removed)"
RUN_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
ALL_LINEAR: Literal["all-linear"] = "all-linear"
#: Where a value sits in the spec: ("training", "learning_rate"), ("dataset", "train", 0).
FieldPath = tuple[str | int, ...]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads True as 1: `epochs: yes` (YAML 1.1's true) would train 1 epoch, unsaid
        if isinstance(v, bool) and info.field_name in cls.model_fields:
            kinds = _types_of(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"is a YAML boolean ({str(v).lower()}; yes/no/on/off read as one), not a number: "
                                 "write a number")
        return v


def _types_of(annotation: Any) -> set[Any]:
    """The plain types an annotation admits: int | None -> {int, NoneType}; Annotated[int, ...] -> {int}."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _types_of(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return set().union(*(_types_of(a) for a in typing.get_args(annotation)))
    return {annotation} if isinstance(annotation, type) else set()


def _short(value: str, limit: int = 60) -> str:
    """A user's value, cut short for an error message (a 10 MB value must not come back whole); a value that
    looks like a secret never comes back at all."""
    value = str(value)
    if secret_kind(value[: limit + 600]):  # only what is shown (and a key's length past it) can leak
        return "(a value hidden here: it looks like a secret)"
    return value if len(value) <= limit else value[:limit] + f"… ({len(value):,} characters)"


# ---------------------------------------------------------------------------- secrets
# A spec is copied into the Job's labels, annotations and ConfigMap, the run's logs and every published
# version: a secret in it leaks to whoever can read any of those. Credentials come from the cluster's Secrets.

#: Tokens with a published shape: (what it is, pattern). Anchored on what precedes them so "task-..." is not "sk-".
_TOKEN_SHAPES = [
    ("a Hugging Face token", re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}")),
    ("an AWS access key id", re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}(?![A-Za-z0-9])")),
    ("a GitHub token", re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})")),
    ("a GitLab token", re.compile(r"(?<![A-Za-z0-9])glpat-[A-Za-z0-9_-]{20,}")),
    ("a Slack token", re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}")),
    ("an API key (sk-…)", re.compile(r"(?<![A-Za-z0-9])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,}")),
    ("a JSON Web Token", re.compile(r"(?<![A-Za-z0-9])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.")),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
]
#: Query parameters of presigned URLs (S3, GCS, Azure SAS) and of tokens passed in a URL.
_SECRET_PARAMS = re.compile(
    r"[?&;](x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|sig|signature|"
    r"token|access_token|auth|api_key|apikey|key|password|passwd|secret|client_secret)=", re.IGNORECASE)
#: A long unbroken run of token characters; judged by _looks_random.
_TOKEN_RUN = re.compile(r"[A-Za-z0-9+/=_-]{32,}")


def _looks_random(run: str) -> bool:
    """A run of 32+ token characters that mixes upper case, lower case and digits the way random keys do.
    Names do not: hex digests (one case), 'customer-support-llama-3-8b' (words), 'Meta-Llama-3-70B-Instruct'
    (few switches between letter classes once the separators are dropped, low entropy)."""
    body = re.sub(r"[-_+/=]", "", run[:512])  # a key is far shorter; a 10 MB run costs no more
    if len(body) < 28 or not (re.search(r"[A-Z]", body) and re.search(r"[a-z]", body) and re.search(r"\d", body)):
        return False
    cls = ["u" if c.isupper() else "l" if c.islower() else "d" for c in body]
    switches = sum(a != b for a, b in zip(cls, cls[1:])) / (len(cls) - 1)
    counts = {c: body.count(c) for c in set(body)}
    entropy = -sum(n / len(body) * math.log2(n / len(body)) for n in counts.values())
    return switches >= 0.45 and entropy >= 4.2


def secret_kind(value: Any, *, free_text: bool = False) -> str | None:
    """What secret ``value`` appears to hold ("an AWS access key id", "a presigned URL signature
    (X-Amz-Signature)", ...), or None. ``free_text`` (prompts, references) checks only the published token
    shapes and URLs with a signature or user:secret@ (prose may hold any word). Never returns the secret itself."""
    if not isinstance(value, str) or not value:
        return None
    for what, pattern in _TOKEN_SHAPES:
        if pattern.search(value):
            return what
    param = _SECRET_PARAMS.search(value)
    if param:
        return f"a signature or token in the URL (its {param.group(1)} parameter)"
    # a URI's user:secret@ part; in prose only with the ':' (ssh://git@host names no secret)
    # bounded repeats: a 10 MB value is scanned in linear time
    if re.search(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,30}://[^/?#\s@]{0,512}:[^/?#\s@]{0,512}@", value) or (
            not free_text and re.match(r"^[A-Za-z][A-Za-z0-9+.-]{0,30}://[^/?#@]{0,1024}@", value)):
        return "credentials in the URL (user:secret@)"
    if not free_text and any(_looks_random(run) for run in _TOKEN_RUN.findall(value)):
        return "a long random token"
    return None


def _refuse_secret(value: Any, *, free_text: bool = False) -> None:
    what = secret_kind(value, free_text=free_text)
    if what:
        raise ValueError(f"holds what looks like {what} (not shown here). A spec is copied into the Job's labels, "
                         "annotations and ConfigMap and into every published version, so it must hold no secret: "
                         "remove it; credentials come from the cluster's Secrets (the S3 Secret, "
                         "mlflow_token_secret), never from the spec")


def _no_secret(value: Any) -> Any:
    _refuse_secret(value)
    return value


def _no_secret_in_text(value: Any) -> Any:
    _refuse_secret(value, free_text=True)
    return value


#: A string that must hold no secret (names, paths, label values).
Plain = Annotated[str, AfterValidator(_no_secret)]
#: Prose (prompts, references): refused only for the published token shapes.
Prose = Annotated[str, AfterValidator(_no_secret_in_text)]


# ---------------------------------------------------------------------------- places (URIs and paths)

#: A Hugging Face repo id: [org/]name of letters, digits, '-', '_', '.', no '..' or '--' (the hub's own rule).
_HF_ID = re.compile(r"^(?!.*(\.\.|--))[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
#: Schemes someone may write that the job does not read (they would be taken for a local folder named "gs:").
_OTHER_SCHEMES = {"gs", "gcs", "az", "abfs", "abfss", "wasb", "wasbs", "http", "https", "ftp", "sftp", "ssh",
                  "hdfs", "s3a", "s3n", "minio", "r2"}


def _check_uri(value: str, what: str, *, allow_hub: bool = False) -> str:
    """An s3:// URI, an hf: model id (``allow_hub``) or a local path (``file://`` is one too); a near-miss of
    a scheme ('s3:/b/x', 'S3://', 'hf://') is an error with the spelling meant, never read as a local folder."""
    _refuse_secret(value)
    value = value.strip()
    if not value:
        raise ValueError(f"{what} is empty")
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):(/*)", value)  # 2+ letters: 'C:' is a Windows drive
    if scheme:
        name, slashes, rest = scheme.group(1), scheme.group(2), value[scheme.end():]
        low = name.lower()
        if low == "s3" and (name != "s3" or slashes != "//"):
            raise ValueError(f"'{_short(value)}' is not an S3 URI (it would be read as a local path): did you mean "
                             f"'{_short('s3://' + rest.lstrip('/'))}'?")
        if low == "hf" and (name != "hf" or slashes):
            raise ValueError(f"'{_short(value)}' is not a model id: write hf:org/name, did you mean "
                             f"'{_short('hf:' + rest)}'?")
        if low == "file" and (name != "file" or slashes not in ("//", "///")):
            raise ValueError(f"'{_short(value)}' is not a file URI: write file:///absolute/path or just the path")
        if low in _OTHER_SCHEMES and "://" not in value:
            raise ValueError(f"unsupported scheme '{_short(name)}:'; use s3://bucket/key or a local path")
    elif re.match(r"^s3//", value, re.IGNORECASE):
        raise ValueError(f"'{_short(value)}' is not an S3 URI (it would be read as a local path): did you mean "
                         f"'{_short('s3://' + value[4:].lstrip('/'))}'?")
    if value.startswith("s3://"):
        rest = value[5:]
        bucket = rest.split("/", 1)[0]
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"'{_short(bucket)}' is not a valid bucket name (3-63 lowercase letters, digits, '.', '-')")
        if ".." in rest.split("/"):
            raise ValueError("'..' is not allowed in an S3 key")
        return value
    if "://" in value and not value.startswith("file://"):
        scheme_name = value.split("://", 1)[0]
        raise ValueError(f"unsupported scheme '{_short(scheme_name)}://'; use s3://bucket/key or a local path")
    if value.startswith("hf:"):
        if not allow_hub:
            raise ValueError("hf: names a model on a hub, and only base_model.uri reads one; use s3://bucket/key "
                             "or a local path")
        if not _HF_ID.match(value[3:]):
            raise ValueError(f"'{_short(value)}' is not a model id: write hf:org/name (letters, digits, '-', '_', "
                             "'.'; no '..', no path): a path would be read from the pod's disk")
    return value


#: The one check of a place (URI or path) for whatever names one outside a spec (`artifacts --output`).
check_uri = _check_uri


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
    gradient_checkpointing: bool | Literal["auto"] = Field("auto", description="auto: on when memory is tight.")
    gpu_memory_gib: float | Literal["auto"] = Field(
        "auto", description="GPU memory the run plans for, per GPU. auto: all free memory for 16-bit LoRA; "
                            "12 GiB for QLoRA/8-bit (the guide's 4-12 GB), so the run also fits a small card.")
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


class TrainingRunSpec(_Strict):
    """One training run: the whole of a spec file."""

    name: str = Field(description="Run name: lowercase letters, digits and '-', at most 40 characters.")
    base_model: BaseModelSpec
    dataset: DatasetSpec
    output: str = Field(description="Prefix under which versions are published: s3://bucket/prefix or a folder.")
    base_adapter: str | None = Field(
        None, description="Start from a published adapter: the URI of one complete version, <output>/<run>/v<N> "
        "(`launcher artifacts RUN` lists them). Its adapter, checked against the version's manifest, is what "
        "training starts from, and with training.method: dpo it is also the frozen reference (else the base is). "
        "It must have been trained on this base_model, and lora.rank, alpha, target_modules, use_rslora and "
        "use_dora must be its own. What the run publishes is a whole adapter of the base.")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantization: Quantization = Field(default_factory=Quantization)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    data: DataRules = Field(default_factory=DataRules)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec | None = Field(None, description="Optional experiment tracking (MLflow). TensorBoard "
                                          "event files are published in every version regardless.")
    labels: dict[Annotated[Plain, Field(pattern=r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$")],
                 Annotated[Plain, Field(pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")]] = Field(
        default_factory=dict, description="Extra labels for the Job (team, project).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not RUN_NAME_RE.match(v):
            raise ValueError(f"'{_short(v)}' is not a valid run name: use lowercase letters, digits and '-', "
                             "start and end with a letter or digit, at most 40 characters")
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        return _check_uri(v, "output").rstrip("/")

    @field_validator("base_adapter")
    @classmethod
    def _base_adapter(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = _check_uri(v, "base_adapter").rstrip("/")
        if v.startswith("hf:") or not re.fullmatch(r"v[1-9][0-9]*", v.rsplit("/", 1)[-1]):
            raise ValueError(f"'{_short(v)}' names no version: write the URI of one published version, ending in "
                             "/v<N> (e.g. s3://bucket/runs/my-sft/v3; `launcher artifacts RUN` lists them)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TrainingRunSpec":
        if self.quantization.mode == "4bit" and self.lora.use_dora:
            raise ValueError("lora.use_dora cannot be combined with quantization.mode 4bit; turn one off")
        if self.quantization.mode != "none" and self.resources.gpus == 0:
            raise ValueError("quantization needs a GPU: set resources.gpus >= 1 or quantization.mode: none")
        if self.training.fp8 == "on" and self.quantization.mode != "none":
            raise ValueError("training.fp8: on needs a 16-bit base model; quantization.mode 4bit/8bit already "
                             "replaces its projections: turn one off")
        if self.export.gguf and not self.merge.enabled:
            raise ValueError("export.gguf writes the merged model: set merge.enabled: true or export.gguf: []")
        if self.export.gguf and self.lora.use_dora:
            raise ValueError("export.gguf cannot write a DoRA adapter (llama.cpp's LoRA format has no magnitude "
                             "vector): set lora.use_dora: false or export.gguf: []")
        if self.training.fp8 == "on" and self.resources.gpus == 0:
            raise ValueError("training.fp8: on needs a GPU: set resources.gpus >= 1 or training.fp8: off")
        if self.training.method in PREFERENCE_METHODS and self.data.format != "auto":
            raise ValueError(f"data.format '{self.data.format}' names a format of SFT rows, but training.method "
                             f"{self.training.method} reads preference pairs ({{prompt, chosen, rejected}}, in any of "
                             "TRL's three forms, each row by its own keys): set data.format: auto or delete the line")
        if self.training.fsdp == "on" and self.quantization.mode != "none":
            raise ValueError("training.fsdp: on shards a 16-bit base; quantization.mode 4bit/8bit is not sharded: "
                             "turn one off (a quantised base usually fits one GPU)")
        return self

    _lines: dict[FieldPath, int] = PrivateAttr(default_factory=dict)  # field path -> YAML line, when loaded from text

    def places(self) -> list[tuple[str, str]]:
        """(field path, value) of every field naming where the run reads or writes: an s3:// URI, an hf: model id
        (base_model.uri only) or a local path. The one list the launcher's local-path checks walk."""
        out = [("base_model.uri", self.base_model.uri), ("dataset.train", self.dataset.train)]
        if self.dataset.validation is not None:
            out.append(("dataset.validation", self.dataset.validation))
        out.append(("output", self.output))
        if self.base_adapter is not None:
            out.append(("base_adapter", self.base_adapter))
        if isinstance(self.eval.prompts, str):
            out.append(("eval.prompts", self.eval.prompts))
        return out

    def line_of(self, path: str) -> int | None:
        """The YAML line of a field path ('dataset.train'), when the spec was loaded from text."""
        return self._lines.get(tuple(path.split(".")))

    def advice(self) -> list[Problem]:
        """Values outside the guide's ranges: valid, but worth a warning that names the range and why."""
        out = []
        method = self.training.method
        ranges = [(*r, "the guide's") for r in GUIDE_RANGES] + [(*r, f"the range advised for {method}")
                                                                for r in PREFERENCE_RANGES.get(method, [])]
        for path, lo, hi, why, source in ranges:
            if method in PREFERENCE_METHODS and path == "training.learning_rate" and source == "the guide's":
                continue  # the SFT range; a preference method has its own (PREFERENCE_RANGES)
            value: Any = self
            for part in path.split("."):
                value = getattr(value, part)
            if path == "training.beta":
                value = self.training.preference_beta()
            if not lo <= value <= hi:
                out.append(Problem(path, f"{value:g} is outside {source} {lo:g}-{hi:g}", why,
                                   line=self._lines.get(tuple(path.split(".")))))
        if self.training.packing:
            out.append(Problem("training.packing", "was removed: the job always packs examples (attention stays per "
                                                   "example), so `packing: true` changes nothing",
                               "delete the line", line=self._lines.get(("training", "packing"))))
        val, train = self.dataset.validation, self.dataset.train
        if val is not None and _same_place(val, train):
            out.append(Problem("dataset.validation", "is the training file: validation loss would be measured on "
                                                     "rows the model trains on (leakage), so early stopping and the "
                                                     "evaluation would judge memorisation",
                               "point it at a held-out file, or delete the line to hold out "
                               "dataset.validation_split of the training rows",
                               line=self._lines.get(("dataset", "validation"))))
        if self.training.fsdp == "on" and self.resources.gpus == 1 and self.resources.nodes == 1:
            out.append(Problem("training.fsdp", "fsdp: on has no effect with one training process (resources.gpus: "
                                                "1): a single process cannot shard the base",
                               "set resources.gpus above 1 to shard the base over several GPUs, or leave fsdp: auto",
                               line=self._lines.get(("training", "fsdp"))))
        from jobs.serving import spec_advice  # vLLM's verdict on the adapter this spec will produce

        out += spec_advice(self, self._lines)
        return out

    def spec_hash(self) -> str:
        """Content hash of the spec (defaults filled in): same spec, same run. It names the Job."""
        return self._hash(exclude={"tracking"})

    def training_hash(self) -> str:
        """Content hash of what the run trains: the spec without ``tracking`` and ``resources``. It keys
        the checkpoints, so a run resubmitted with more memory, other GPUs or another number of them or
        of nodes resumes where it stopped (a step is the same examples on any world size; the job
        refuses a checkpoint whose steps were another number of examples)."""
        return self._hash(exclude={"tracking", "resources", "promotion"})

    def _hash(self, exclude: set[str]) -> str:
        # Where a run is reported is not what it trains: a tracking change must not restart a run from
        # step 0 nor rename its Job.
        fields = self.model_dump(mode="json", exclude=exclude)
        # training.packing was removed (always on); every hash before held its `true`, so keep it there
        fields["training"]["packing"] = True
        if not fields["export"]["gguf"]:  # added later: the default keeps every earlier run's hash
            del fields["export"]
        # added later too; which version becomes champion is not what the run trains (never in training_hash)
        if "promotion" in fields and fields["promotion"] == PromotionSpec().model_dump(mode="json"):
            del fields["promotion"]
        elif "promotion" in fields and fields["promotion"]["tolerance"]["regression"] == \
                PromotionTolerance().regression:  # added later still: the default keeps earlier hashes
            del fields["promotion"]["tolerance"]["regression"]
        # added later: an SFT run keeps every earlier run's hash; a preference run hashes the beta it trains with,
        # so `beta: 0.1` and no beta line (the default) are one run
        if fields["training"]["method"] == "sft":
            del fields["training"]["method"], fields["training"]["beta"]
        else:
            fields["training"]["beta"] = self.training.preference_beta()
        if fields["base_adapter"] is None:  # added later: a run from the base keeps every earlier run's hash
            del fields["base_adapter"]
        if fields["data"]["format"] == "auto":  # added later: the default keeps every earlier run's hash
            del fields["data"]["format"]
        if "resources" in fields and fields["resources"]["nodes"] == 1:  # likewise
            del fields["resources"]["nodes"]
        if fields["training"]["fp8"] == "off":  # likewise
            del fields["training"]["fp8"]
        # how the base is laid out over the GPUs, not what the run trains: a checkpoint written sharded
        # resumes unsharded and back (the checkpoints' key leaves it out, as it leaves out resources)
        if fields["training"]["fsdp"] == "auto" or "resources" not in fields:
            del fields["training"]["fsdp"]
        # whether the layers are compiled is how the run computes, not what it trains (added later too)
        if fields["training"]["compile"] == "auto" or "resources" not in fields:
            del fields["training"]["compile"]
        canon = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:10]


#: Advice for the preference methods, in GUIDE_RANGES' shape; a method's learning-rate range replaces the SFT one.
PREFERENCE_RANGES: dict[str, list[tuple[str, float, float, str]]] = {
    "dpo": [
        ("training.beta", 0.01, 0.5, "DPO's beta (Rafailov et al. 2023, 'Direct Preference Optimization'; TRL's "
                                     "default 0.1): much lower lets the adapter drift far from the reference and "
                                     "over-optimise the pairs, much higher barely moves it"),
        ("training.learning_rate", 5e-6, 5e-5, "DPO moves a model with far smaller steps than SFT: TRL's DPOConfig "
                                               "defaults to 1e-6 for full weights, and LoRA adapters commonly train at "
                                               "5e-6 to 5e-5 (the SFT default, 2e-4, is above it)"),
    ],
    "orpo": [
        ("training.beta", 0.05, 1.0, "ORPO's lambda (Hong et al. 2024, 'ORPO: Monolithic Preference Optimization "
                                     "without Reference Model', uses 0.1 and studies up to 1.0; TRL's "
                                     "default 0.1), the weight of the odds-ratio term against the chosen side's "
                                     "loss: much lower is plain SFT on the chosen answers"),
        ("training.learning_rate", 5e-6, 5e-5, "like DPO: TRL's ORPOConfig defaults to 1e-6 for full weights, "
                                               "and LoRA adapters commonly train at 5e-6 to 5e-5"),
    ],
}


def _same_place(a: str, b: str) -> bool:
    """Whether two dataset URIs or paths name the same file (``file://`` and ``./`` spelled away)."""
    import posixpath

    def canon(v: str) -> str:
        v = v[7:] if v.startswith("file://") else v
        return v.rstrip("/") if v.startswith("s3://") else posixpath.normpath(v)

    return canon(a) == canon(b)


#: The guide's ranges (docs/data-rules.md): advice, not limits. (field, low, high, why it matters)
GUIDE_RANGES = [
    ("lora.rank", 16, 64, "lower ranks may underfit a new domain or tone, higher ones cost memory and "
                          "overfit small data"),
    ("lora.alpha", 16, 64, "alpha/rank scales the adapter's update: far outside the range it is too weak or "
                           "unstable"),
    ("training.learning_rate", 1e-4, 2e-4, "above it LoRA training often diverges or copies the data; below it, "
                                           "it learns slowly"),
    ("training.epochs", 1, 3, "more passes over small data mostly teach verbatim copying (watch validation loss)"),
    ("training.weight_decay", 0.0, 0.1, "the guide uses 0.01"),
    ("lora.dropout", 0.0, 0.2, "the guide uses 0.05; much more slows learning"),
    ("eval.temperature", 0.2, 0.4, "the guide evaluates at 0.2-0.4, where answers are stable enough to compare"),
]


# ---------------------------------------------------------------------------- loading

_FIXES = {
    "extra_forbidden": "remove it, or check its spelling against `launcher validate --explain`",
    "missing": "add it",
    "greater_than_equal": None,
    "less_than_equal": None,
}


#: A spec is a few hundred values; anything past this is a mistake or a YAML alias bomb.
MAX_SPEC_NODES = 20_000
MAX_SPEC_DEPTH = 64


def _yaml_lines(text: str) -> dict[FieldPath, int]:
    """Map field paths to 1-based line numbers in a YAML document.

    Each node is visited once (aliases are not followed twice) and the walk is bounded,
    so a 'billion laughs' document costs no more than its own size.
    """
    import yaml

    try:
        root = yaml.compose(text, Loader=_safe_loader_class())
    except (yaml.YAMLError, RecursionError):
        return {}
    out: dict[FieldPath, int] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, FieldPath]] = [(root, ())] if root is not None else []
    while stack and len(out) < MAX_SPEC_NODES:
        node, path = stack.pop()
        out.setdefault(path, node.start_mark.line + 1)
        if id(node) in seen or len(path) > MAX_SPEC_DEPTH:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else str(k.start_mark.line)
                out.setdefault(path + (key,), k.start_mark.line + 1)
                stack.append((v, path + (key,)))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                stack.append((v, path + (i,)))
    return out


def _deep_line(text: str) -> int:
    """The first line where flow brackets nest past MAX_SPEC_DEPTH (1 if none does)."""
    depth = 0
    for n, line in enumerate(text.splitlines(), 1):
        for ch in line:
            depth += ch in "[{"
            depth -= ch in "]}"
            if depth > MAX_SPEC_DEPTH:
                return n
    return 1


def _too_big(data: Any) -> str | None:
    """Why a parsed spec is too large or too deep to validate, or None. Bounded work."""
    budget = MAX_SPEC_NODES
    stack = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            return f"it expands to more than {MAX_SPEC_NODES:,} values (YAML aliases?)"
        if depth > MAX_SPEC_DEPTH:
            return f"it is nested more than {MAX_SPEC_DEPTH} levels deep"
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return None


def _did_you_mean(loc: tuple[str | int, ...]) -> str | None:
    """The field name closest to an unknown key, among the fields of the section it sits in."""
    import difflib

    if not loc:
        return None
    model: Any = TrainingRunSpec
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _section_model(field.annotation)
        if model is None:
            return None
    names = list(getattr(model, "model_fields", {}))
    match = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return match[0] if match else None


def problems_from_validation(err: ValidationError, lines: dict[FieldPath, int] | None = None) -> list[Problem]:
    lines = lines or {}
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("function-after", "literal")))
        # pydantic puts union branches in the location ("str", "list[...]"): drop them.
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "bool"))))
        # a key of the user's (a label name) can be the secret: the line still says where it is
        where = ".".join("(a key hidden: it looks like a secret)" if secret_kind(str(p)) else str(p)
                         for p in loc) or "(spec)"
        msg = e["msg"].removeprefix("Value error, ")
        fix = _FIXES.get(e["type"])
        given = e.get("input")
        if e["type"] == "literal_error" and isinstance(given, bool):
            word = "on" if given else "off"
            fix = f"YAML reads a bare {word}/{'yes' if given else 'no'} as {str(given).lower()}: "
            fix += (f"quote it ({loc[-1]}: \"{word}\")" if f"'{word}'" in str((e.get("ctx") or {}).get("expected"))
                    else "write one of the values above")
        elif e["type"] == "string_type" and isinstance(given, (int, float)) and not isinstance(given, bool):
            fix = f"quote it: \"{given}\""
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
            guess = _did_you_mean(loc)
            if guess:
                fix = f"did you mean '{guess}'? Otherwise remove it (see `launcher validate --explain`)"
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        problems.append(Problem(where=where, message=msg, fix=fix, line=line))
    # The same location can fail in several union branches; keep the first.
    seen, unique = set(), []
    for p in problems:
        if p.where not in seen:
            seen.add(p.where)
            unique.append(p)
    return unique


def parse_spec(data: Any, *, source: str | None = None, lines: dict[FieldPath, int] | None = None) -> TrainingRunSpec:
    """Validate a parsed spec; raise :class:`SpecError` listing every problem."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError([Problem("(spec)", f"expected a mapping of fields, got {got}",
                                 "start from examples/spec.yaml")], source)
    try:
        return TrainingRunSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(problems_from_validation(err, lines), source) from None


def _safe_loader_class() -> Any:
    """PyYAML's SafeLoader on libyaml where PyYAML was built with it (the same documents, ~20x faster: a
    10 MB scalar took 11 s in the pure-Python scanner), else the pure-Python one."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _unique_key_loader() -> Any:
    """A SafeLoader that refuses duplicate keys: with plain YAML the last one silently wins."""
    import yaml

    UniqueKeyLoader: Any = type("UniqueKeyLoader", (_safe_loader_class(),), {})

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: construct_mapping reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{_short(key)}' (first on line {first})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def load_spec_text(text: str, source: str | None = None, overrides: list[str] | None = None) -> TrainingRunSpec:
    """Parse and validate a YAML spec; ``overrides`` are ``key.path=value`` items (``--set``)."""
    import yaml

    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except (RecursionError, yaml.YAMLError) as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        # too deep: the pure-Python parser recurses out, libyaml stops at its own nesting bound
        if isinstance(err, RecursionError) or "nesting depth" in str(problem):
            line = line or _deep_line(text)
            raise SpecError([Problem(f"line {line}", "nested more deeply than the YAML parser can follow",
                                     "a spec is a few levels deep; check for runaway brackets", line=line)],
                            source) from None
        fix = "keep one of them" if "duplicate key" in str(problem) else "check indentation and quoting on that line"
        source_line = text.splitlines()[line - 1] if line and line <= len(text.splitlines()) else ""
        if "'\\t'" in str(problem) or "\t" in source_line[: len(source_line) - len(source_line.lstrip())]:
            problem, fix = "a tab character", "YAML indents with spaces only: replace the tab with spaces"
        raise SpecError([Problem(f"line {line}" if line else "(yaml)", f"not valid YAML: {problem}", fix)],
                        source) from None
    why = _too_big(data)
    if why:
        raise SpecError([Problem("(spec)", f"too large to be a spec: {why}",
                                 "write the values out; a spec needs no anchors or deep nesting")], source)
    if overrides:
        data = apply_overrides(data, overrides)
    lines = _yaml_lines(text)
    spec = parse_spec(data, source=source, lines=lines)
    spec._lines = lines
    return spec


#: A spec is a page of YAML; anything this large is another file named by mistake (or /dev/zero).
MAX_SPEC_BYTES = 16 * 2**20


def load_spec(path: str | Path, overrides: list[str] | None = None) -> TrainingRunSpec:
    import stat

    p = Path(path)
    try:
        st = p.stat()  # before opening: opening a FIFO would block until someone writes to it
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else \
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file"
            raise SpecError([Problem(str(p), f"is {kind}, not a spec file", "name the spec's YAML file")])
        with open(p, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError([Problem(str(p), f"is larger than {MAX_SPEC_BYTES // 2**20} MiB: not a spec",
                                     "name the spec's YAML file (a spec is a page of YAML)")])
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise SpecError([Problem(str(p), "file not found", "check the path")]) from None
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise SpecError([Problem(f"line {line}", f"not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x})",
                                 "save the spec as UTF-8", line=line)], source=str(p)) from None
    except OSError as err:
        raise SpecError([Problem(str(p), f"cannot be read: {err.strerror}", "check permissions")]) from None
    return load_spec_text(text, source=str(p), overrides=overrides)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars) to a raw spec mapping."""
    import copy

    import yaml

    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(f"--set {_short(item)}", "expected key.path=value",
                                    "e.g. --set training.epochs=2"))
            continue
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            problems.append(Problem(f"--set {item}", "empty key", "e.g. --set training.epochs=2"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    if problems:
        raise SpecError(problems)
    return data


def _section_model(ann: Any) -> type[BaseModel] | None:
    """The model of a section field: ``LoraSpec``, or ``TrackingSpec`` of an optional ``TrackingSpec | None``."""
    args = [a for a in getattr(ann, "__args__", ()) if a is not type(None)] if type(None) in getattr(
        ann, "__args__", ()) else [ann]
    sub = args[0] if len(args) == 1 else None
    return sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None


def field_docs(model: type[BaseModel] = TrainingRunSpec, prefix: str = "") -> list[tuple[str, str, str]]:
    """(path, default, description) for every field: the reference that docs and --explain print."""
    rows = []
    for name, f in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _section_model(f.annotation)
        if sub is not None:
            rows.extend(field_docs(sub, path + "."))
            continue
        if f.description == REMOVED:
            continue
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        rows.append((path, default, f.description or ""))
    return rows


def reference_markdown() -> str:
    """docs/spec-reference.md, generated from the fields (a test keeps the file in sync)."""
    lines = ["# Spec reference", "",
             "Generated from `jobs/spec.py` (`python -m jobs.spec > docs/spec-reference.md`). Unknown keys are "
             "errors; `launcher validate --explain` prints the same table.", "",
             "| field | default | meaning |", "| --- | --- | --- |"]
    for path, default, desc in field_docs():
        lines.append(f"| `{path}` | `{default}` | {desc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
