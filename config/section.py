"""The strict base every config section derives from."""
from __future__ import annotations

import math
import reprlib
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Section(BaseModel):
    """Strict base: unknown keys, a boolean where a number belongs (``true`` is not 1) and
    non-finite numbers (``.inf``, ``.nan``) are errors in every section."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
        if bool not in kinds and kinds & {int, float} and _holds_bool(value):
            raise ValueError("expected a number, not a boolean")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        numbers = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError("must be finite (not inf or nan)")
        return value


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 6, 6, 6, 60, 60


def short_repr(value: Any) -> str:
    """A bounded repr for error messages: a crafted value (an alias bomb) prints in a line, not forever."""
    return _SHORT.repr(value)


def _leaf_types(annotation: Any) -> set:
    """The scalar types an annotation admits, through Optional/Union, Annotated and containers;
    a nested section or a Literal adds none."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(get_args(annotation)[0])
    if origin is Literal:
        return {type(v) for v in get_args(annotation)}
    if origin in (Union, types.UnionType, list, tuple, dict, set):
        return set().union(*(_leaf_types(a) for a in get_args(annotation) if a is not Ellipsis))
    if isinstance(annotation, type) and not issubclass(annotation, BaseModel):
        return {annotation}
    return set()


def _holds_bool(value: Any) -> bool:
    """A boolean as the value or as an element of it (config containers are one level deep)."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return isinstance(value, bool) or any(isinstance(v, bool) for v in items)
