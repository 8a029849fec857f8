"""What a plan may name: the registries of tasks, model architectures, optimizers, schedules,
callbacks and trackers. The plan's schema checks names (and each optimizer's, schedule's and
architecture's settings) against them; the modules that define the entries fill them.

Entries come from three places: stagewise's own (a registry loads its built-in ones on first use,
by the module name it is given, so this leaf package names what it checks without importing the
packages above it); installed packages, through entry points of the group `stagewise.plugins`
(each names a module whose import registers its entries: loaded on the first look-up in any
registry); and modules the user names on the command line (`--plugin`, plan.plugins). A plan
never imports code itself."""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")
BuildModel = TypeVar("BuildModel", bound=Callable[..., Any])  # a function or a class
PLUGIN_GROUP = "stagewise.plugins"
_plugins_loaded = False


def load_installed_plugins() -> None:
    """Import the module of every `stagewise.plugins` entry point of the installed packages (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            point.load()
        except Exception as e:  # a broken plug-in is named, not a traceback from inside it
            raise PluginError(f"plug-in '{point.name}' ({point.value}, entry point group {PLUGIN_GROUP}) failed "
                              f"to load: {type(e).__name__}: {e}") from e


class PluginError(ImportError):
    """An installed plug-in that does not import; the CLI prints it as one line."""


class Registry(MutableMapping[str, T], Generic[T]):
    """Entries by name, in the order they were added. `builtins`: the module whose import adds
    the built-in ones (None: they are added where the registry is made); it is imported, with the
    installed plug-ins, the first time an entry is looked up."""

    def __init__(self, kind: str, builtins: str | None = None) -> None:
        self.kind = kind
        self.builtins = builtins
        self._entries: dict[str, T] = {}
        self._loaded = False

    def _all(self) -> dict[str, T]:
        if not self._loaded:
            self._loaded = True
            if self.builtins is not None:
                importlib.import_module(self.builtins)
            load_installed_plugins()
        return self._entries

    def __getitem__(self, name: str) -> T:
        return self._all()[name]

    def __setitem__(self, name: str, entry: T) -> None:
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def registered(self, name: str) -> T | None:
        """The entry added under `name` so far, without loading any (for a decorator that adds
        to an entry, while the built-in ones load)."""
        return self._entries.get(name)

    def add(self, name: str) -> Callable[[T], T]:
        """A decorator that registers what it decorates under `name`."""
        def register(entry: T) -> T:
            self[name] = entry
            return entry
        return register


@dataclass(frozen=True)
class OptimizerEntry:
    """An optimizer: its settings model (config.optimizer_config.OptimizerSettings: each field a
    setting it takes, with its default) and, for a plug-in, `build(param_groups, settings)` ->
    a torch optimizer (the groups as optim.optimizers makes them: "decay" and "no_decay", each
    with its "lr_scale"; `settings` complete). None: one of stagewise's own (optim.optimizers)."""

    settings: type[BaseModel]
    build: Callable[[list[dict[str, Any]], dict[str, Any]], Any] | None = None


@dataclass(frozen=True)
class ScheduleEntry:
    """A learning-rate schedule: its settings model (config.optimizer_config.ScheduleSettings; a
    default of None: required) and, for a plug-in, `lr(settings, step, total, peak)` -> the LR of
    update `step` of a `total`-step stage (`step == total`: the LR it ends on), a pure function;
    `problems(settings, total)` -> (setting, message) of what cannot work in `total` steps. None:
    one of stagewise's own (optim.schedules)."""

    settings: type[BaseModel]
    lr: Callable[[dict[str, Any], int, int, float], float] | None = None
    problems: Callable[[dict[str, Any], int], list[tuple[str, str]]] | None = None


@dataclass(frozen=True)
class ArchModel:
    """An architecture's model of one kind: `build(**sizes, **settings)` -> the torch
    module, where `sizes` are what the stage's data sets (causal_lm: vocab_size; classify:
    num_classes, vocab_size; tag: num_tags, vocab_size; seq2seq: src_vocab_size, tgt_vocab_size)
    and `settings` the plan's `model` keys, each a field of the settings model (a pydantic model:
    its defaults are the build's, unknown keys are refused by name)."""

    settings: type[BaseModel]
    build: Callable[..., Any]


@dataclass(frozen=True)
class ArchEntry:
    """A model architecture stagewise builds itself (`model.arch`; any other arch is a transformers
    model type): its model of each kind a task may build (TaskTraits.arch_kind: causal_lm, a causal
    LM, trained by causal_lm and sft; classify, a sequence classifier; tag, a token classifier;
    seq2seq, an encoder-decoder)."""

    models: dict[str, ArchModel]


TASKS: Registry[Any] = Registry("task", builtins="stagewise.tasks.builtin_tasks")
ARCHS: Registry[ArchEntry] = Registry("arch", builtins="stagewise.models.builtin_archs")
OPTIMIZERS: Registry[OptimizerEntry] = Registry("optimizer", builtins="stagewise.config.builtin_settings")
SCHEDULES: Registry[ScheduleEntry] = Registry("schedule", builtins="stagewise.config.builtin_settings")
# Callback classes (engine.callbacks.register_callback) and trackers, by name.
CALLBACKS: Registry[Any] = Registry("callback")
TRACKERS: Registry[Any] = Registry("tracker")


def register_optimizer(name: str, settings: type[BaseModel]) -> Callable[[BuildOptimizer], BuildOptimizer]:
    """Decorate `build(param_groups, settings) -> torch optimizer` to add optimizer `name`, whose
    settings are `settings`' fields (a subclass of config.optimizer_config.OptimizerSettings)."""
    def register(build: BuildOptimizer) -> BuildOptimizer:
        OPTIMIZERS[name] = OptimizerEntry(settings, build)
        return build
    return register


def register_schedule(name: str, settings: type[BaseModel],
                      problems: Callable[[dict[str, Any], int], list[tuple[str, str]]] | None = None,
                      ) -> Callable[[ScheduleLr], ScheduleLr]:
    """Decorate `lr(settings, step, total, peak) -> float` to add schedule `name`, whose settings
    are `settings`' fields (a subclass of config.optimizer_config.ScheduleSettings)."""
    def register(lr: ScheduleLr) -> ScheduleLr:
        SCHEDULES[name] = ScheduleEntry(settings, lr, problems)
        return lr
    return register


def arch_model(arch: str | None, kind: str) -> ArchModel | None:
    """The model of `kind` registered as `arch`; None: not one stagewise builds (a transformers
    model type), or of another kind."""
    entry = ARCHS.get(arch) if arch is not None else None
    return entry.models.get(kind) if entry is not None else None


def register_arch(name: str, settings: type[BaseModel], kind: str = "causal_lm") -> Callable[[BuildModel], BuildModel]:
    """Decorate `build(**sizes, **settings) -> nn.Module` (a function or the module's class) to add
    architecture `name`, a model of `kind` (causal_lm, classify, tag, seq2seq or a plug-in task's
    arch_kind: see ArchEntry, ArchModel). One name may have a model of each kind (bigru: classify
    and tag)."""
    def register(build: BuildModel) -> BuildModel:
        known = ARCHS.registered(name)
        ARCHS[name] = ArchEntry({**(known.models if known is not None else {}), kind: ArchModel(settings, build)})
        return build
    return register


BuildOptimizer = Callable[[list[dict[str, Any]], dict[str, Any]], Any]
ScheduleLr = Callable[[dict[str, Any], int, int, float], float]
