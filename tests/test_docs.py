"""The documentation says what the code does: the generated reference pages are what the schema
and the parser give now (every plan key described), the events and metrics pages list what runs
write, and every plan and Python snippet of the site and the README is run or validated."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import pytest
import yaml
from conftest import tiny_plan, write_plan
from pydantic import BaseModel, ConfigDict, Field

from stagewise.cli import main
from stagewise.config.registry import ARCHS, OPTIMIZERS, SCHEDULES, TASKS
from stagewise.engine.callbacks import CALLBACKS
from stagewise.engine.run_logs import read_jsonl
from stagewise.plan.load import deep_merge, load_plan, validate_plan
from stagewise.tuning.space import check_space, load_space

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _module(name: str) -> ModuleType:
    """A script of docs/ (not a package), imported by path; its neighbours importable."""
    sys.path.insert(0, str(DOCS))
    try:
        spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(DOCS))


gen = _module("gen_reference")
snippets = _module("snippets")


# --- generated reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("page", sorted(gen.PAGES))
def test_a_generated_page_is_what_the_code_gives_now(page: str) -> None:
    committed = (DOCS / page).read_text(encoding="utf-8")
    assert committed == gen.PAGES[page](), f"docs/{page} is stale: run `make docs` (docs/gen_reference.py)"


def test_every_plan_key_has_a_description_and_a_row_on_the_page() -> None:
    keys = list(gen.plan_keys())
    undescribed = [k.path for k in keys if not k.description]
    assert undescribed == [], f"plan keys without a description (a docstring under the field): {undescribed}"
    page = (DOCS / "reference" / "plan.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([^`]+)` \|", page, re.M))
    covered = [k.path for k in keys if k.path in rows]
    assert len(covered) == len(keys) == len(rows), f"{len(covered)} of {len(keys)} keys on the page"
    # the walk reaches every model the plan holds, down to the leaves
    for path in ("stages[].rules[].do.switch.to", "stages[].data.mix[].weight", "stages[].guard.reset.clip",
                 "stages[].merge.from", "stages[].adapter.lora.target_modules", "distributed.strategy"):
        assert path in rows


def test_a_key_without_a_description_is_found() -> None:
    class Inner(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)
        said: int = 1
        """Described."""
        silent: int = 2

    class Outer(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)
        inner: list[Inner] = []
        """A list of mappings."""

    keys = {k.path: k for k in gen.plan_keys(Outer)}
    assert list(keys) == ["inner", "inner[].said", "inner[].silent"]
    assert [p for p, k in keys.items() if not k.description] == ["inner[].silent"]
    assert keys["inner[].said"].default == "`1`" and keys["inner"].type == "list of mapping"


def test_mappings_picked_by_a_key_are_listed_under_their_names() -> None:
    class Loud(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)
        kind: Literal["loud"] = "loud"
        volume: int = 11
        """How loud."""

    class Quiet(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)
        kind: Literal["quiet"] = "quiet"
        volume: int = 1
        """How quiet."""

    class Holder(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)
        sinks: list[Annotated[Loud | Quiet, Field(discriminator="kind")]] = []
        """Where it goes."""

    keys = {k.path: k for k in gen.plan_keys(Holder)}
    assert list(keys) == ["sinks", "sinks[].loud.volume", "sinks[].quiet.volume"]
    assert keys["sinks[].quiet.volume"].description == "How quiet." and keys["sinks[].loud.volume"].parent == "sinks[].loud"
    page_order = [k.parent for k in sorted(keys.values(), key=lambda k: gen._order(list(keys.values()), k.parent))]
    assert page_order == ["", "sinks[].loud", "sinks[].quiet"]


def test_the_plan_page_states_types_defaults_and_allowed_values() -> None:
    rows = {k.path: k for k in gen.plan_keys()}
    assert rows["stages[].optimizer.handoff"].type == "`carry` | `reset` | `convert`"
    assert rows["stages[].optimizer.handoff"].default == "`reset`"
    assert rows["stages[].batch.size"].type == "int (>= 1, <= 1,000,000)"
    assert rows["stages[].batch.size"].default == "required"
    assert rows["stages[].schedule.warmup"].type == "int | float"
    assert rows["threads"].type == "int | `auto`"
    assert rows["seed"].type == "int (>= 0, <= 9,223,372,036,854,775,807)"


def test_the_cli_page_has_every_command_and_option() -> None:
    page = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    parser = gen.cli._parser()
    for action in parser._actions:
        for name, command in getattr(action, "choices", None).items() if action.dest == "command" else ():
            assert f"## `stagewise {name}`" in page
            for option in command._actions:
                for spelled in option.option_strings:
                    if spelled not in ("-h", "--help"):
                        assert f"`{spelled}" in page.split(f"## `stagewise {name}`")[1].split("## `")[0], spelled


# --- events, metrics, exit codes ----------------------------------------------------------------------

def _written_events() -> set[str]:
    """The first argument of every `.event(...)` call in the package (both sides of a conditional)."""
    names: set[str] = set()
    for path in (REPO / "src" / "stagewise").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "event" \
                    and node.args:
                names |= {c.value for c in ast.walk(node.args[0]) if isinstance(c, ast.Constant)
                          and isinstance(c.value, str)}
    return names


def _table_names(page: str) -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", (DOCS / "reference" / page).read_text(encoding="utf-8"), re.M))


def test_the_events_page_lists_every_event_the_code_writes() -> None:
    written = _written_events()
    assert {"plan_start", "plan_failed", "guard_rollback", "merge"} <= written  # the scan finds them
    assert _table_names("events.md") == written


def test_the_metrics_page_describes_every_key_a_run_writes(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "a", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 4, "eval": {"every": 2, "batches": 1}},
              {"name": "b", "optimizer": {"name": "sgd", "lr": 0.1}, "steps": 2}]
    plan = write_plan(tmp_path, tiny_plan(corpus, stages, log={"every": 1}))
    assert main(["train", str(plan), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]) == 0
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert {line["kind"] for line in lines} == {"train", "eval"}
    documented = _table_names("metrics.md")
    patterns = [re.compile("^" + re.escape(name).replace("<name>", "[^/]+").replace("<metric>", r"\w+") + "$")
                for name in documented]
    for key in {k for line in lines for k in line}:
        assert any(p.match(key) for p in patterns), f"metrics.jsonl key {key!r} is not on docs/reference/metrics.md"


def test_the_exit_codes_page_has_every_code_a_run_exits_with() -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "src" / "stagewise").rglob("*.py"))
    codes = {int(c) for c in re.findall(r"\bcode=(\d+)", source)} - {128} | {2, 4}  # code=128 + N: a signal
    page = (DOCS / "reference" / "exit-codes.md").read_text(encoding="utf-8")
    listed = {int(c) for c in re.findall(r"^\| (\d+) \|", page, re.M)}
    assert codes <= listed and "128 + N" in page


# --- snippets ---------------------------------------------------------------------------------------

def _all_blocks(lang: str) -> list[Any]:
    return [b for page in snippets.pages() for b in snippets.blocks(page, lang)]


def _page_plan(page: str) -> dict[str, Any]:
    """The first full plan of a page, else the first tutorial's: what a space file or fragment refers to."""
    for name in (page, "tutorials/first-plan.md"):
        path = DOCS / name if (DOCS / name).exists() else REPO / name
        for block in snippets.blocks(path, "yaml"):
            loaded = yaml.safe_load(block.text)
            if isinstance(loaded, dict) and "stages" in loaded:
                return loaded
    raise AssertionError("no plan")


BASE = {"name": "fragment", "model": {"arch": "gpt", "n_layer": 1, "n_head": 1, "n_embd": 8, "n_positions": 8},
        "tokenizer": {"kind": "char"}, "data": {"train": "x.txt"}, "defaults": {"batch": {"size": 4}},
        "stages": [{"name": "stable", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 10}]}


def _validate_yaml(block: Any, tmp: Path) -> str:
    """Validate one YAML block by what it is; the kind, for the test to count."""
    loaded = yaml.safe_load(block.text)
    where = str(block)
    if isinstance(loaded, dict) and "stages" in loaded:  # a whole plan
        path = tmp / "plan.yaml"
        path.write_text(snippets.with_shared_data(block.text), encoding="utf-8")
        load_plan(path)
        return "plan"
    if isinstance(loaded, dict) and all(re.fullmatch(r"stages\.[\w.-]+", k) for k in loaded):  # a search space
        plan, space = tmp / "plan.yaml", tmp / "space.yaml"
        raw = _page_plan(block.page)
        plan.write_text(yaml.safe_dump(raw), encoding="utf-8")
        space.write_text(block.text, encoding="utf-8")
        check_space(load_space(space), raw, plan, space)
        return "space"
    if isinstance(loaded, list):  # stages
        validate_plan({**BASE, "stages": BASE["stages"] + loaded}, where)
        return "stages"
    assert isinstance(loaded, dict), f"{where}: a YAML block the docs test cannot place"
    stage_keys = set(BASE["stages"][0]) | {"batch", "data", "adapter", "schedule", "eval", "until", "rules"}
    if set(loaded) <= stage_keys - {"name"}:  # keys of a stage
        validate_plan({**BASE, "stages": [deep_merge(BASE["stages"][0], loaded)]}, where)
        return "stage keys"
    validate_plan(deep_merge(BASE, loaded), where)  # plan keys
    return "plan keys"


def test_every_yaml_snippet_of_the_site_and_readme_is_valid(tmp_path: Path) -> None:
    kinds = [_validate_yaml(block, tmp_path) for block in _all_blocks("yaml")]
    assert kinds.count("plan") >= 5 and "space" in kinds and "stages" in kinds and "stage keys" in kinds


def test_the_sites_plans_on_shared_data_check_with_their_data(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    if not (snippets.SHARED / "data" / "tinyshakespeare.txt").is_file():
        pytest.skip("shared/data is not beside the repository")
    checked = 0
    for block in _all_blocks("yaml"):
        if "../shared/data/" in block.text and "stages:" in block.text:
            path = tmp_path / f"plan{checked}.yaml"
            path.write_text(snippets.with_shared_data(block.text), encoding="utf-8")
            assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 0, (block, capsys.readouterr())
            checked += 1
    assert checked >= 3


def test_the_first_tutorials_plan_trains_and_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    if not (snippets.SHARED / "data" / "tinyshakespeare.txt").is_file():
        pytest.skip("shared/data is not beside the repository")
    (block,) = [b for b in snippets.blocks(DOCS / "tutorials" / "first-plan.md", "yaml")]
    path = tmp_path / "first.yaml"
    path.write_text(snippets.with_shared_data(block.text), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["verify-resume", str(path), "--steps", "3"]) == 0
    assert "resume is exact" in capsys.readouterr().out


@pytest.mark.parametrize("page", sorted({b.page for b in _all_blocks("python")}))
def test_the_python_snippets_of_a_page_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           request: pytest.FixtureRequest) -> None:
    """A page's Python blocks run in order in one directory beside a `shared/` (its plans read
    ../shared/data); a block after `<!-- validate-only -->` is compiled and its imports run."""
    if not (snippets.SHARED / "data" / "tinyshakespeare.txt").is_file():
        pytest.skip("shared/data is not beside the repository")
    root = tmp_path / "repo"
    root.mkdir()
    (tmp_path / "shared").symlink_to(snippets.SHARED)
    monkeypatch.chdir(root)
    for registry in (TASKS, ARCHS, OPTIMIZERS, SCHEDULES, CALLBACKS):  # what a page registers stays on that page
        saved = dict(registry)
        request.addfinalizer(lambda registry=registry, saved=saved: (registry.clear(), registry.update(saved)))
    text = (DOCS / page).read_text(encoding="utf-8")
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for block in snippets.blocks(DOCS / page, "python"):
        code = compile(block.text, str(block), "exec", dont_inherit=True)  # not this file's __future__ imports
        before = text.split("\n")[max(block.line - 3, 0):block.line - 1]
        if any("validate-only" in line for line in before):
            imports = [n for n in ast.parse(block.text).body if isinstance(n, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(imports, []), str(block), "exec"), {})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)


def test_the_readme_is_at_most_10_kb_and_links_into_the_site() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 10 * 1024
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (REPO / link).is_file(), link


def test_no_page_fetches_anything_at_build_time() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["theme"]["font"] is False
    plugins = [p if isinstance(p, str) else next(iter(p)) for p in config["plugins"]]
    assert "privacy" not in plugins and "social" not in plugins
    assert os.path.isfile(DOCS / "images" / "lr-curve.png")


def test_a_plan_shown_as_an_example_file_is_that_file() -> None:
    shown = 0
    for page in snippets.pages():
        text = page.read_text(encoding="utf-8")
        for name, body in re.findall(r"`(examples/[\w/.-]+\.yaml)`:\n\n```yaml\n(.*?)^```", text, re.M | re.S):
            assert yaml.safe_load(body) == yaml.safe_load((REPO / name).read_text(encoding="utf-8")), (page, name)
            shown += 1
    assert shown >= 1
