"""`check` on a stranger's plan: model keys typed and bounded before any model is built, bounded
numbers, YAML bombs refused within seconds and a bounded amount of memory, and a seeded fuzz of
the example plans: every mutation is accepted or refused with the project's one-line error."""

from __future__ import annotations

import copy
import random
import re
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_plan, write_plan

from stagewise.cli import main
from stagewise.engine.prepare_run import prepare
from stagewise.errors import UserError
from stagewise.plan.load import load_plan
from stagewise.plan.model_keys import check_model_keys
from stagewise.plan.tree import stage_tree

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ONE_STAGE = [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 4}]


def _check(path: Path, capsys: pytest.CaptureFixture[str], cache: Path) -> tuple[int, str]:
    code = main(["check", str(path), "--cache", str(cache)])
    return code, capsys.readouterr().err


MODEL_KEYS = [
    ({"n_embd": "64"}, "model.n_embd: must be an integer (got '64')"),
    ({"n_layer": 2.5}, "model.n_layer: must be an integer (got 2.5)"),
    ({"n_head": 3}, "model.n_embd: gpt2 splits it over model.n_head: must be divisible by it (got 32 and 3)"),
    ({"n_positions": 0}, "model.n_positions: must be in 1..16,777,216 (got 0)"),
    ({"n_layer": 10**100}, "model.n_layer: must be in 1..256 (got 100000000000000000...0000000000000000000)"),
    ({"resid_pdrop": 1.5}, "model.resid_pdrop: a rate: must be in [0, 1] (got 1.5)"),
    ({"layer_norm_epsilon": -1.0}, "model.layer_norm_epsilon: must be > 0 (got -1.0)"),
    ({"activation_function": "swoosh"}, "model.activation_function: 'swoosh' is not an activation of transformers"),
    ({"scale_attn_weights": "yes"}, "model.scale_attn_weights: must be true or false (got 'yes')"),
    ({"n_inner": [1] * 10**4}, "model.n_inner: must be a number, true/false or a short string (got [1, 1, 1, 1, ...])"),
    ({"n_embd": 2**14, "n_layer": 256, "n_head": 16}, "model: about 8.25e+11 parameters need"),
]


@pytest.mark.parametrize(("keys", "message"), MODEL_KEYS)
def test_model_keys_are_typed_before_anything_is_built(
        tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str], keys: dict[str, Any], message: str) -> None:
    plan = tiny_plan(corpus, ONE_STAGE)
    plan["model"].update(keys)
    path = write_plan(tmp_path, plan)
    code, err = _check(path, capsys, tmp_path / "cache")
    assert code == 2 and err.startswith(f"error: {path}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "cache").exists()  # refused before the data was read


def test_builtin_model_keys_and_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = "".join(f"{'spam' if i % 3 else 'ham'}\tmessage number {i} here\n" for i in range(60))
    (tmp_path / "sms.tsv").write_text(rows)
    plan = yaml.safe_load((EXAMPLES / "classification.yaml").read_text())
    plan["data"]["train"] = str(tmp_path / "sms.tsv")
    for keys, message in [({"dense": 64_000_000_000_000}, "model.dense: must be in 1..16,777,216"),
                          ({"hidden": 0}, "model.hidden: must be in 1..16,777,216 (got 0)"),
                          ({"dense": 2**24, "hidden": 2**13}, "model: about "),
                          ({"dropout": ".nan"}, "model.dropout: must be a finite number")]:
        case = copy.deepcopy(plan)
        case["model"].update(keys)
        path = write_plan(tmp_path, case)
        code, err = _check(path, capsys, tmp_path / "cache")
        assert code == 2 and err.startswith(f"error: {path}: {message}"), err


def test_numbers_are_bounded(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for change, message in [({"seed": 10**20}, "seed: input should be less than or equal to 9223372036854775807"),
                            ({"seed": -1}, "seed: input should be greater than or equal to 0"),
                            ({"log": {"every": 10**100}}, "log.every: input should be less than or equal to"),
                            ({"checkpoint": {"minutes": float("inf")}},
                             "checkpoint.minutes: input should be a finite number")]:
        path = write_plan(tmp_path, tiny_plan(corpus, ONE_STAGE, **change))
        code, err = _check(path, capsys, tmp_path / "cache")
        assert code == 2 and err.startswith(f"error: {path}: {message}"), err
    stages = [{**ONE_STAGE[0], "steps": 10**12}]
    path = write_plan(tmp_path, tiny_plan(corpus, stages))
    code, err = _check(path, capsys, tmp_path / "cache")
    assert code == 2 and "stages[0].steps: input should be less than or equal to 1000000000" in err


def _laughs(levels: int = 9) -> str:
    """The billion laughs: 10 aliases per level, 10**levels values, a few hundred bytes."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def _bombs(corpus: Path) -> dict[str, tuple[str, str]]:
    plan = yaml.safe_dump(tiny_plan(corpus, ONE_STAGE), sort_keys=False)
    defaults_bomb = tiny_plan(corpus, [{**ONE_STAGE[0], "name": f"s{i}"} for i in range(900)])
    defaults_bomb["defaults"]["layers"] = {"freeze": [f"x{i}" for i in range(200)]}
    return {
        "billion laughs in seed": (_laughs() + plan.replace("seed: 7", "seed: *a9"),
                                   "more than 20,000 values once its aliases are expanded"),
        "alias to itself": ("loop: &loop [*loop]\n" + plan, "line 1: the alias *loop is inside its own anchor"),
        "400 levels of flow YAML": (plan + "x: " + "[" * 400 + "]" * 400 + "\n", "nested deeper than 32 levels"),
        "deep through aliases": ("d0: &d0 [1]\n" + "".join(f"d{i}: &d{i} [*d{i - 1}]\n" for i in range(1, 60)) + plan,
                                 "nested deeper than 32 levels once its aliases are expanded"),
        "100k-item list under a model key": (plan.replace("n_layer: 2", f"n_layer: [{', '.join(['1'] * 100_000)}]"),
                                             "more than 20,000 values"),
        "48 MB list": (plan + "junk: [" + "1, " * 16_000_000 + "1]\n", "bytes: a plan file is at most 1,000,000"),
        "2.5M freeze globs": (plan + "x: [" + "'*', " * 2_500_000 + "]\n", "bytes: a plan file is at most 1,000,000"),
        "10**100 steps": (plan.replace("steps: 4", "steps: " + "9" * 100),
                          "stages[0].steps: input should be less than or equal to 1000000000"),
        "10**100 model size": (plan.replace("n_embd: 32", "n_embd: " + "9" * 100), "model.n_embd: must be in 1.."),
        "defaults copied into 900 stages": (yaml.safe_dump(defaults_bomb), "defaults: merged into 900 stages"),
        "a date for a seed": (plan.replace("seed: 7", "seed: 2024-13-45"), "invalid YAML: a value cannot be read"),
    }


@pytest.mark.parametrize("name", list(_bombs(Path("x"))))
def test_bombs_are_refused_fast_in_bounded_memory(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str],
                                                  name: str) -> None:
    text, message = _bombs(corpus)[name]
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    import stagewise.plan.model_keys  # noqa: F401 - transformers' import is not the bomb's cost
    warm = write_plan(tmp_path, tiny_plan(corpus, ONE_STAGE), "warm.yaml")
    main(["check", str(warm), "--cache", str(tmp_path / "c")])
    capsys.readouterr()
    started = time.monotonic()
    code, err = _check(path, capsys, tmp_path / "c")
    seconds = time.monotonic() - started
    tracemalloc.start()  # measured apart: tracing makes Python's allocations several times slower
    _check(path, capsys, tmp_path / "c")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert code == 2 and err.startswith(f"error: {path}: ") and message in err and err.count("\n") == 1, err
    assert len(err) < 300  # the input is never echoed whole
    assert seconds < 5, f"{name}: {seconds:.1f} s"
    assert peak < 150e6, f"{name}: {peak / 1e6:.0f} MB"


# ------------------------------------------------------------------------------------------- fuzz

HOSTILE = [None, True, False, -1, 0, 1, 3, 2.5, -1e-3, 1e308, float("nan"), float("inf"), 10**100, -(10**20),
           2**63, "", "64", "auto", "x" * 300, "../../etc/passwd", [], {}, [1, 2, 3], ["a"], {"a": 1},
           {"name": "sgd"}, [[[[]]]], "2024-01-01"]
KEY_PATH = re.compile(r"^(line \d+: |[A-Za-z_][\w-]*(\[\d+\])*(\.[^\s:]+)*(\[\d+\])*: |defaults[.:])")


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(plan: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One to three random edits: a value replaced by a hostile one, a key deleted, renamed or
    added, a list entry duplicated, a number scaled far out."""
    plan = copy.deepcopy(plan)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(plan))
        *parents, last = path
        node: Any = plan
        for part in parents:
            node = node[part]
        op = rng.randrange(6)
        current = node[last]
        if op == 0 or (op == 5 and not isinstance(current, (int, float))):
            node[last] = copy.deepcopy(rng.choice(HOSTILE))
        elif op == 1:
            del node[last]
        elif op == 2 and isinstance(node, dict):
            node[str(last)[:-1] or "x"] = node.pop(last)
        elif op == 3 and isinstance(node, dict):
            node[rng.choice(["extra", "lr", "steps", "n_head", "from", "task", "guard"])] = rng.choice(HOSTILE)
        elif op == 4 and isinstance(node, list):
            node.insert(last, copy.deepcopy(current))
        elif isinstance(current, (int, float)) and not isinstance(current, bool):
            node[last] = current * rng.choice([-1, 0, 1000, 10**12, 0.5])
    return plan


def _examples(data: Path) -> list[dict[str, Any]]:
    """The example plans, their data pointed at small files of the same shapes."""
    plans = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        plan = yaml.safe_load(path.read_text())
        suffix = Path(str(plan["data"]["train"])).suffix
        plan["data"]["train"] = str(data / (f"table{suffix}" if suffix in (".tsv", ".csv") else "text.txt"))
        plans.append(plan)
    return plans


def _accepted_or_one_line(plan: dict[str, Any], path: Path, full: Path | None) -> str:
    """Load and check `plan` (with `full`: prepare it too, with that cache); 'ok' or 'refused'.
    Anything but the project's error is a test failure, as is an error without a key path."""
    text = yaml.safe_dump(plan, sort_keys=False, allow_unicode=True)
    path.write_text(text)
    try:
        loaded = load_plan(path)
        stage_tree(loaded)
        check_model_keys(loaded)
        if full is not None:
            prepare(loaded, path, full)
    except UserError as e:
        line = str(e)
        assert "\n" not in line and len(line) < 600, line
        rest = line.removeprefix(f"{path}: ")
        assert rest != line or e.where, line  # the plan file, or the data file the plan names
        if rest != line and not rest.startswith(("more than", "a plan", "invalid YAML")):
            assert KEY_PATH.match(rest), f"no key path: {line}"
        return "refused"
    return "ok"


def test_fuzzed_example_plans_are_accepted_or_refused_in_one_line(tmp_path: Path, corpus: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "text.txt").write_text(corpus.read_text()[:20_000])
    (data / "table.tsv").write_text("".join(f"{'spam' if i % 4 else 'ham'}\tgo to the sea now {i}\tla mer {i}\n"
                                            for i in range(200)))
    bases = _examples(data)
    rng = random.Random(14)
    outcomes: dict[str, int] = {"ok": 0, "refused": 0}
    started = time.monotonic()
    for _ in range(600):
        plan = _mutate(rng.choice(bases), rng)
        outcome = _accepted_or_one_line(plan, tmp_path / "plan.yaml", None)
        outcomes[outcome] += 1
    fast = time.monotonic() - started
    # A seeded sample of the accepted ones goes through `check`'s whole preparation: data read,
    # models built, stages resolved.
    full = {"ok": 0, "refused": 0}
    rng = random.Random(15)
    while sum(full.values()) < 40:
        plan = _mutate(rng.choice(bases), rng)
        if _accepted_or_one_line(plan, tmp_path / "plan.yaml", None) == "ok":
            full[_accepted_or_one_line(plan, tmp_path / "plan.yaml", tmp_path / "cache")] += 1
    print(f"600 mutations: {outcomes} in {fast:.1f} s; 40 prepared: {full}")
    assert outcomes["ok"] > 30 and outcomes["refused"] > 300  # the mutations do reach both sides
