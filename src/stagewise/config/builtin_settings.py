"""The settings of stagewise's own optimizers (optim.optimizers builds them) and learning-rate
schedules (optim.schedules computes them): each a settings model whose fields are the settings
it takes, with their defaults (None: inherited from the parent stage or required), added to the
registries (config.registry) in the order the plan's errors list them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from stagewise.config.fields import MAX_STEPS, Duration, NonNegativeFloat, PositiveFloat
from stagewise.config.optimizer_config import Betas, Fraction, Momentum, OptimizerSettings, ScheduleSettings
from stagewise.config.registry import OPTIMIZERS, SCHEDULES, OptimizerEntry, ScheduleEntry


class SgdSettings(OptimizerSettings):  # gd: the same update on the whole training set
    momentum: Momentum = 0.0
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 0.0


class SgdL1Settings(OptimizerSettings):  # its proximal step applies the stage's regularization.l1
    momentum: Momentum = 0.0


class AdamSettings(OptimizerSettings):
    betas: Betas = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.0


class AdamWSettings(OptimizerSettings):
    betas: Betas = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.01


class MuonSettings(OptimizerSettings):  # betas/eps are for the AdamW that Muon uses on non-matrix parameters
    momentum: Momentum = 0.95
    nesterov: bool = True
    weight_decay: NonNegativeFloat = 0.1
    betas: Betas = (0.9, 0.95)
    eps: PositiveFloat = 1e-8


class ScheduleFreeSgdSettings(OptimizerSettings):  # momentum: SGD's averaging beta (optim.schedule_free)
    momentum: Momentum = 0.9
    weight_decay: NonNegativeFloat = 0.0


for _name, _settings in (("gd", SgdSettings), ("sgd", SgdSettings), ("sgd_l1", SgdL1Settings), ("adam", AdamSettings),
                         ("adamw", AdamWSettings), ("muon", MuonSettings), ("schedulefree_adamw", AdamSettings),
                         ("schedulefree_sgd", ScheduleFreeSgdSettings)):
    OPTIMIZERS[_name] = OptimizerEntry(_settings)


class WarmupSettings(ScheduleSettings):  # constant: peak after the warmup
    warmup: Duration = 0


class StepSettings(WarmupSettings):
    step_size: Duration | None = None
    gamma: PositiveFloat = 0.1


class MultistepSettings(WarmupSettings):
    milestones: Annotated[list[Duration], Field(max_length=1000)] | None = None
    gamma: PositiveFloat = 0.1


class ExponentialSettings(WarmupSettings):
    gamma: PositiveFloat | None = None


class CosineSettings(WarmupSettings):
    min_lr: NonNegativeFloat = 0.0


class DecaySettings(WarmupSettings):
    shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    min_lr: NonNegativeFloat = 0.0


class WsdSettings(WarmupSettings):
    decay: Duration = 0.2
    shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    min_lr: NonNegativeFloat = 0.0


class OneCycleSettings(ScheduleSettings):
    pct_start: Fraction = 0.3
    div_factor: PositiveFloat = 25.0
    final_div_factor: PositiveFloat = 1e4
    anneal: Literal["cos", "linear"] = "cos"


class StlrSettings(ScheduleSettings):
    cut_frac: Fraction = 0.1
    ratio: Annotated[float, Field(ge=1.0)] = 32.0


class PlateauSettings(WarmupSettings):
    """ReduceLROnPlateau (threshold_mode abs): plan.resolve turns it into `constant` + an
    `on_plateau` lr_scale rule, so there is one plateau mechanism (train.control)."""

    factor: Fraction = 0.1
    patience: Annotated[int, Field(ge=0, le=MAX_STEPS)] = 2
    threshold: NonNegativeFloat = 0.0
    min_lr: NonNegativeFloat = 0.0


for _name, _schedule in (("constant", WarmupSettings), ("step", StepSettings), ("multistep", MultistepSettings),
                         ("exponential", ExponentialSettings), ("cosine", CosineSettings), ("decay", DecaySettings),
                         ("wsd", WsdSettings), ("onecycle", OneCycleSettings), ("stlr", StlrSettings),
                         ("plateau", PlateauSettings)):
    SCHEDULES[_name] = ScheduleEntry(_schedule)
