"""Code the user opts in to on the command line (`--plugin MODULE` or `--plugin FILE.py`): its
import registers tasks, optimizers, schedules, ... (config.registry) that a plan may then name.
A plan itself never makes stagewise import anything."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from stagewise.config.registry import PluginError, load_installed_plugins
from stagewise.errors import UserError


def load_plugins(names: list[str]) -> None:
    """The installed plug-ins (entry points), then each module (a dotted name) or Python file (a
    path ending in .py) named, in order."""
    try:
        load_installed_plugins()
    except PluginError as e:
        raise UserError("", str(e)) from None
    for name in names:
        where = f"--plugin {name}"
        try:
            if name.endswith(".py"):
                _load_file(Path(name), where)
            else:
                importlib.import_module(name)
        except UserError:
            raise
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                raise UserError(where, f"no module named '{e.name}'") from None
            raise UserError(where, f"ModuleNotFoundError: {e}") from None
        except Exception as e:  # the user's code: one line saying what it raised
            raise UserError(where, f"{type(e).__name__}: {e}") from None


def _load_file(path: Path, where: str) -> None:
    if not path.is_file():
        raise UserError(where, "no such file")
    module_name = f"stagewise_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(where, "not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look classes up by module
    spec.loader.exec_module(module)
