"""The spec's common model machinery: the strict base every section and the run build on, the path of a
value in the spec, and the model of a section field."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

#: The description of a field kept only to refuse or warn about it (field_docs leaves it out).
REMOVED = "(removed)"
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


def _section_model(ann: Any) -> type[BaseModel] | None:
    """The model of a section field: ``LoraSpec``, or ``TrackingSpec`` of an optional ``TrackingSpec | None``."""
    args = [a for a in getattr(ann, "__args__", ()) if a is not type(None)] if type(None) in getattr(
        ann, "__args__", ()) else [ann]
    sub = args[0] if len(args) == 1 else None
    return sub if isinstance(sub, type) and issubclass(sub, BaseModel) else None
