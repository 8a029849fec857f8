"""The package layout follows the data flow (DESIGN.md "Architecture"), read from the source:
each package imports only those below it, no two modules import each other at load time, an
import inside a function is one listed for start-up time (stagewise._lazy), no module is over 400
lines, and file names are unique. `threads: auto` does not depend on when a module was imported."""

from __future__ import annotations

import ast
import importlib
import time
from collections import Counter
from pathlib import Path

import pytest

import stagewise
from stagewise._lazy import LAZY_IMPORTS
from stagewise.engine import cpu_load

ROOT = Path(stagewise.__file__).parent
# Bottom to top: a package imports only packages of lower layers (and itself); packages in one
# layer are independent of each other. The root package `stagewise` (its __init__) is the API.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "_lazy"),
    ("config",),  # the typed plan schema: imports nothing of stagewise (checked below)
    ("data", "models", "optim"),
    ("tasks",),
    ("plan",),  # plan resolution: the stage tree, each stage's settings and key
    ("engine",),  # training, by job: loop, checkpoints, distributed, device, ... (`stagewise.train` is the API call)
    ("tuning",),  # search over plans, lr-find, cross-validation (`stagewise.search` is the API call)
    ("track",),  # runs read back: logs, report, trained stages
    ("api",),  # the public API's modules
    ("__init__",),  # the package's face: the API's names
    ("cli",),
    ("__main__",),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


MODULES = {_module(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(module: str) -> list[tuple[str, int, str]]:
    """(imported stagewise module, line, where: "top" | "typing" | "function") of each import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where: dict[int, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in ast.walk(node):
                where[id(inner)] = "typing"
        else:
            where[id(node)] = "top"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                names = [".".join([*base, node.module] if node.module else base)]
            else:
                names = [node.module or ""]
            # `from stagewise.x import y` where y is a module imports that module
            names = [f"{names[0]}.{a.name}" if f"{names[0]}.{a.name}" in MODULES else names[0] for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "stagewise" or name.startswith("stagewise."):
                found.append((name, node.lineno, where.get(id(node), "function")))
    return found


def _place(module: str) -> str:
    package = _package(module)
    assert package in LAYER, f"{module}: package '{package}' has no place in the layers (tests/test_layout.py)"
    return package


def test_every_import_goes_down_the_layers() -> None:
    upward = []
    for module in MODULES:
        own = _place(module)
        for target, line, _ in _imports(module):
            other = _place(target)
            if other != own and LAYER[other] >= LAYER[own]:
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}")
    assert upward == []


def test_config_imports_nothing_of_stagewise() -> None:
    outside = [f"{m}: {t}" for m in MODULES if _package(m) == "config" for t, _, _ in _imports(m)
               if _package(t) != "config"]
    assert outside == []


def test_no_two_modules_import_each_other_at_load_time() -> None:
    graph = {m: {t for t, _, where in _imports(m) if where == "top" and t in MODULES} for m in MODULES}
    cycles = []
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*path[path.index(t):], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_imports_inside_functions_are_the_listed_ones() -> None:
    found = {(m, t) for m in MODULES for t, _, where in _imports(m) if where == "function"}
    listed = {(m, t) for m, targets in LAZY_IMPORTS.items() for t in targets}
    assert sorted(found - listed) == []  # an import deferred without being listed in stagewise._lazy
    assert sorted(listed - found) == []  # a listed one no longer deferred: take it off the list


def test_no_module_is_over_400_lines() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES.values()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_file_names_are_unique() -> None:
    names = Counter(p.name for p in MODULES.values() if p.name not in ("__init__.py", "__main__.py"))
    assert {n: c for n, c in names.items() if c > 1} == {}


def test_the_load_window_opens_when_asked_not_at_import() -> None:
    """`threads: auto` measures other processes' CPU use over a window; importing the module long
    before must not make that window cover what happened since then."""
    fresh = importlib.reload(cpu_load)
    time.sleep(fresh._MIN_WINDOW_S + 0.1)
    started = time.monotonic()
    assert fresh.busy_cores() >= 0.0
    if fresh.cpu_times() is None:
        pytest.skip("no /proc: the load average is read instead")
    assert time.monotonic() - started >= fresh._MIN_WINDOW_S * 0.9  # a window of its own, opened by the call
    fresh.start_window()
    time.sleep(fresh._MIN_WINDOW_S + 0.1)
    started = time.monotonic()
    fresh.busy_cores()
    assert time.monotonic() - started < fresh._MIN_WINDOW_S / 2  # the window start_window opened
