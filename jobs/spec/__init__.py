"""The training spec: defined once, shared by the launcher and the job.

Importable without torch or the Kubernetes client. Every field is typed, has a
default from ``docs/lora-training-guide.md`` where the guide gives one, and a
description that the docs are written from. Unknown keys are errors, and
:func:`load_spec` reports every problem at once, each with its field path and,
for YAML files, its line.

The package, one idea a module: ``base`` (the strict base model, ``FieldPath``), ``secret`` (what looks like a
secret, ``Plain``/``Prose``), ``places`` (the URI and path check), ``sections`` (the section models), ``ranges``
(the guide's ranges), ``run`` (``TrainingRunSpec``: its checks, places, advice and hashes), ``loading`` (YAML with
line numbers, ``--set``, ``parse_spec``/``load_spec``) and ``reference`` (``field_docs``, the reference doc that
``python -m jobs.spec`` prints). Every name other code uses is re-exported here, so ``jobs.spec.X`` resolves as
before.
"""
from __future__ import annotations

from jobs.errors import Problem, SpecError
from jobs.spec.base import REMOVED, FieldPath, _section_model
from jobs.spec.loading import (MAX_SPEC_BYTES, MAX_SPEC_DEPTH, MAX_SPEC_NODES, apply_overrides, load_spec,
                               load_spec_text, parse_spec, problems_from_validation)
from jobs.spec.places import check_uri
from jobs.spec.ranges import GUIDE_RANGES, PREFERENCE_RANGES
from jobs.spec.reference import field_docs, reference_markdown
from jobs.spec.run import RUN_NAME_RE, TrainingRunSpec
from jobs.spec.secret import Plain, Prose, _looks_random, secret_kind
from jobs.spec.sections import (ALL_LINEAR, PREFERENCE_BETA_DEFAULTS, PREFERENCE_METHODS, BaseModelSpec, DataRules,
                                DatasetSpec, EvalPrompt, EvalSpec, ExportSpec, LengthBands, LoraSpec, MergeSpec,
                                MlflowSpec, PromotionSpec, PromotionTolerance, Quantization, ResourcesSpec,
                                TrackingSpec, TrainingSpec)

__all__ = [
    "ALL_LINEAR", "GUIDE_RANGES", "MAX_SPEC_BYTES", "MAX_SPEC_DEPTH", "MAX_SPEC_NODES", "PREFERENCE_BETA_DEFAULTS",
    "PREFERENCE_METHODS", "PREFERENCE_RANGES", "REMOVED", "RUN_NAME_RE",
    "BaseModelSpec", "DataRules", "DatasetSpec", "EvalPrompt", "EvalSpec", "ExportSpec", "FieldPath", "LengthBands",
    "LoraSpec", "MergeSpec", "MlflowSpec", "Plain", "Problem", "PromotionSpec", "PromotionTolerance", "Prose",
    "Quantization", "ResourcesSpec", "SpecError", "TrackingSpec", "TrainingRunSpec", "TrainingSpec",
    "apply_overrides", "check_uri", "field_docs", "load_spec", "load_spec_text", "parse_spec",
    "problems_from_validation", "reference_markdown", "secret_kind",
    # private, for launcher/init_spec.py (_section_model) and tests/unit/test_spec.py (_looks_random)
    "_looks_random", "_section_model",
]
