"""The spec's reference: every field's path, default and description (field_docs), and
docs/spec-reference.md made from them (``python -m jobs.spec``)."""
from __future__ import annotations

from pydantic import BaseModel

from jobs.spec.base import REMOVED, _section_model
from jobs.spec.run import TrainingRunSpec


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
             "Generated from `jobs/spec/` (`python -m jobs.spec > docs/spec-reference.md`). Unknown keys are "
             "errors; `launcher validate --explain` prints the same table.", "",
             "| field | default | meaning |", "| --- | --- | --- |"]
    for path, default, desc in field_docs():
        lines.append(f"| `{path}` | `{default}` | {desc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
