"""TrainingRunSpec, one training run: its sections, the checks across them, the places it reads and writes,
the advice against the guide's ranges and its hashes (spec_hash names the Job, training_hash keys the
checkpoints)."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any

from pydantic import Field, PrivateAttr, field_validator, model_validator

from jobs.errors import Problem
from jobs.spec.base import FieldPath, _Strict
from jobs.spec.places import _check_uri, _same_place
from jobs.spec.ranges import GUIDE_RANGES, PREFERENCE_RANGES
from jobs.spec.secret import Plain, _short
from jobs.spec.sections import (PREFERENCE_METHODS, BaseModelSpec, DataRules, DatasetSpec, EvalSpec, ExportSpec,
                                LoraSpec, MergeSpec, PromotionSpec, PromotionTolerance, Quantization,
                                ResourcesSpec, TrackingSpec, TrainingSpec)

#: A run name becomes a Job name, label values and an S3 key segment. 40 leaves
#: room for the "-<hash>" suffix inside the 63-character label limit.
RUN_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")


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
