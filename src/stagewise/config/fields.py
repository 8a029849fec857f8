"""Building blocks shared by the plan's models."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)
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


def _duration(value: Any) -> int | float:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEPS:
        return value
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return value
    raise PydanticCustomError(
        "duration", "must be a step count (int >= 0) or a fraction of the stage in [0, 1]")


# A duration inside a stage: an int counts steps, a float in [0, 1] is a fraction of the stage.
Duration = Annotated[int | float, PlainValidator(_duration)]
def _threads(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096):
        return value
    raise PydanticCustomError("threads", "must be a positive integer (at most 4096) or auto")


Threads = Annotated[int | Literal["auto"], PlainValidator(_threads)]  # a count of threads or processes
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
StageName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Column = Annotated[int, Field(ge=0, le=10**6)]  # a 0-based column index


class DumpsAsBefore(Strict):
    """A config that gained keys after stage keys were first written: each of `LATER`, while at its
    default, stays out of the dump, so the data settings and stage keys of existing plans dump (and
    hash) as before. (StageConfig's own later keys are left out of its key in plan.resolve.)"""

    LATER: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_unset_later(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        for key in self.LATER:
            if getattr(self, key) == type(self).model_fields[key].default:
                dumped.pop(key, None)
        return dumped


def suggest(word: str, candidates: list[str]) -> str:
    """' (did you mean 'X'?)' for the closest of `candidates`, if one is close; else ''."""
    match = difflib.get_close_matches(word[:100], candidates, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def settings_error(e: ValidationError, settings: type[BaseModel], at: list[Any]) -> PydanticCustomError:
    """A plug-in's settings model refused the settings given (under key path `at`): its first
    problem, said as the plan's own errors say it."""
    first = e.errors()[0]
    loc = [*at, *first["loc"]]
    if first["type"] == "extra_forbidden":
        top = len(first["loc"]) == 1
        msg = "unknown key" + (suggest(str(first["loc"][0]), list(settings.model_fields)) if top else "")
    elif first["type"] == "missing":
        msg = "required"
    else:
        msg = f"{first['msg'][0].lower()}{first['msg'][1:]} (got {repr(first.get('input'))[:60]})"
    return PydanticCustomError("setting_error", "{msg}", {"key": loc, "msg": msg})
