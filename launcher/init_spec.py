"""``launcher init``: a starter spec with every field, its default and what it does, the way
``helm create`` writes a chart whose every value is commented.

Everything written comes from the spec model (:mod:`jobs.spec`): the fields, their order, defaults,
descriptions and allowed values. The only values kept here are placeholders for the fields that have
no default, so the file validates as written and cannot drift from the model.
"""
from __future__ import annotations

import textwrap
import typing
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from jobs.spec import GUIDE_RANGES, TrainingRunSpec, _section_model

#: Values for the fields without a default: what a user replaces first.
PLACEHOLDERS: dict[str, Any] = {
    "name": "my-run",
    "base_model.uri": "s3://models/my-base-model/",
    "dataset.train": "s3://datasets/my-data/train.jsonl",
    "output": "s3://runs/lora",
    "tracking.mlflow.experiment": "my-experiment",
}

WIDTH = 100


def starter_spec(name: str | None = None, *, file_name: str = "spec.yaml") -> str:
    """The commented starter spec (YAML text) for a run called ``name`` (default: the placeholder).
    Raises ``SpecError`` when ``name`` is not a valid run name."""
    from jobs import __version__
    from jobs.spec import parse_spec

    values = _example(TrainingRunSpec, "", optional_sections=False)
    if name is not None:
        values["name"] = name
        parse_spec(values, source="--name")  # a bad name: the model's own error, with its fix
    required = [p for p in PLACEHOLDERS if not p.startswith("tracking.")]
    head = [
        f"A LoRA training run, written by `launcher init` (lora-jobs {__version__}).",
        f"Replace the placeholders ({', '.join(required)}), change what you need and delete the rest: every "
        "field below shows its default. Local paths are relative to this file.",
        f"Check it: launcher validate {file_name}   Run it: launcher submit {file_name}  (--local: here, no "
        "cluster)",
        "Every field: launcher validate --explain (docs/spec-reference.md).",
    ]
    lines = [line for text in head for line in _wrap(text, "")]
    lines.append("")
    lines += _render(TrainingRunSpec, values, "", 0, top=True)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- values

def _fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """The fields a spec is written with: not those the model keeps only to refuse (excluded from dumps)."""
    return [(name, f) for name, f in model.model_fields.items() if not f.exclude]


def _example(model: type[BaseModel], prefix: str, *, optional_sections: bool) -> dict:
    """Every field of ``model`` with its default, placeholders for the required ones; sections that
    default to null are filled in too where ``optional_sections`` (the commented-out example of one)."""
    data: dict[str, Any] = {}
    for name, f in _fields(model):
        path = prefix + name
        sub = _section_model(f.annotation)
        if sub is not None and (f.is_required() or (optional_sections and f.get_default() is None)):
            data[name] = _example(sub, path + ".", optional_sections=optional_sections)
        elif f.is_required():
            if path not in PLACEHOLDERS:
                raise KeyError(f"{path} has no default and no placeholder in launcher/init_spec.py: add one")
            data[name] = PLACEHOLDERS[path]
    return model.model_validate(data).model_dump(mode="json")


def _scalar(value: Any) -> str:
    """A value as one line of YAML (quoted where YAML would read it otherwise, e.g. 'off', '4')."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


# ---------------------------------------------------------------------------- comments

def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - len(indent) - 2, initial_indent=f"{indent}# ",
                         subsequent_indent=f"{indent}# ", break_on_hyphens=False) or [f"{indent}#"]


def _choices(annotation: Any) -> list[Any]:
    """The Literal values a field accepts (``int | Literal['auto']`` -> ['auto'])."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    out = []
    for arg in typing.get_args(annotation):
        out += _choices(arg)
    return out


def _bounds(f: FieldInfo) -> str:
    """A field's numeric limits: '1-1024', '>= 0', '> 0 and <= 1'."""
    limits = {type(m): m for m in f.metadata
              if isinstance(m, (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt))}
    ge, le = limits.get(annotated_types.Ge), limits.get(annotated_types.Le)
    if ge is not None and le is not None:
        return f"{ge.ge:g}-{le.le:g}"
    words = {annotated_types.Ge: (">=", "ge"), annotated_types.Gt: (">", "gt"), annotated_types.Le: ("<=", "le"),
             annotated_types.Lt: ("<", "lt")}
    return " and ".join(f"{words[t][0]} {getattr(m, words[t][1]):g}" for t, m in limits.items())


def _comment(f: FieldInfo, path: str) -> str:
    """What a field does (its description), then its default, allowed values and the guide's range."""
    parts = [f.description.rstrip(".") + "." if f.description else ""]
    facts = []
    if f.is_required():
        facts.append("required: replace the placeholder")
    else:
        facts.append(f"default: {_scalar(f.get_default(call_default_factory=True))}")
    choices = _choices(f.annotation)
    if choices:
        others = [a for a in typing.get_args(f.annotation) if typing.get_origin(a) is not Literal]
        kinds = {int: "a number", float: "a number", bool: "true/false"}
        extra = ["a list" if typing.get_origin(a) is list else kinds[a] for a in others
                 if a in kinds or typing.get_origin(a) is list]
        facts.append("one of: " + ", ".join(extra + [_scalar(c) for c in choices]))
    bounds = _bounds(f)
    if bounds:
        facts.append(f"allowed: {bounds}")
    guide = next((g for g in GUIDE_RANGES if g[0] == path), None)
    if guide and "guide" not in (f.description or "").lower():
        facts.append(f"guide: {guide[1]:g}-{guide[2]:g}")
    return " ".join(p for p in parts if p) + (" " if f.description else "") + "(" + "; ".join(facts) + ")"


# ---------------------------------------------------------------------------- rendering

def _render(model: type[BaseModel], values: dict, prefix: str, depth: int, *, top: bool = False) -> list[str]:
    indent = "  " * depth
    lines: list[str] = []
    for name, f in _fields(model):
        path = prefix + name
        value = values[name]
        sub = _section_model(f.annotation)
        if top and lines:
            lines.append("")  # a blank line between the top-level sections, as in a values.yaml
        if sub is not None and isinstance(value, dict):
            doc = f.description or (sub.__doc__ or "").strip()
            if doc:
                lines += _wrap(doc, indent)
            lines.append(f"{indent}{name}:")
            lines += _render(sub, value, path + ".", depth + 1)
            continue
        lines += _wrap(_comment(f, path), indent)
        if sub is not None and value is None:
            # An optional section that is off: show what turning it on looks like, commented out.
            example = _render(sub, _example(sub, path + ".", optional_sections=True), path + ".", 1)
            lines.append(f"{indent}# to turn it on, replace null with:")
            lines += [f"{indent}# {line}" for line in example]
        lines.append(f"{indent}{name}: {_scalar(value)}")
    return lines
