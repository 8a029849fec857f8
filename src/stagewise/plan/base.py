"""Building blocks shared by the plan's models."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]


class Strict(BaseModel):
    """Rejects unknown keys; frozen, so a validated plan cannot change under the engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)
