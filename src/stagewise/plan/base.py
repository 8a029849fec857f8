"""Building blocks shared by the plan's models."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
# Upper bounds: a plan from anyone must not make the tool allocate, loop or overflow without end.
MAX_STEPS = 10**9  # updates, and step counts and intervals within a stage
SEED_MAX = 2**63 - 1  # what torch's and numpy's generators take


def _path_like(value: str) -> str:
    """Within what file systems take (a longer name makes every stat() fail with ENAMETOOLONG)."""
    if any(len(part.encode()) > 255 for part in value.split("/")):
        raise PydanticCustomError("path", "a file or directory name is at most 255 bytes")
    return value


Path_ = Annotated[str, Field(max_length=4096), AfterValidator(_path_like)]
Name = Annotated[str, Field(max_length=256)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Count = Annotated[int, Field(ge=0, le=MAX_STEPS)]


class Strict(BaseModel):
    """Rejects unknown keys and non-finite numbers; frozen, so a validated plan cannot change
    under the engine. A field's docstring is its description, which the plan reference shows
    (docs/gen_reference.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)
