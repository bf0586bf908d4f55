"""The strict base every config section derives from."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Strict base: unknown keys and silent type coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)
