"""The public Python API: a plan as an object, the user's own model, rows and loss (their
fingerprints in the stage keys), callbacks (every hook, a veto, exact resume of their state), and
examples/python_api.py run as a user would."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import transformers
import yaml
from conftest import tiny_plan, write_plan
from rich.console import Console

import stagewise
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train as train_prepared
from stagewise.engine.verify import metrics_difference
from stagewise.errors import RunStopped, UserError

ROOT = Path(__file__).resolve().parents[1]
QUIET = Console(quiet=True)


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("python_api_example", ROOT / "examples" / "python_api.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example()
SHORT = {**EXAMPLE.PLAN, "stages": [{**s, "steps": 6} for s in EXAMPLE.PLAN["stages"]],
         "defaults": {"batch": {"size": 16}, "eval": {"every": 3}}, "log": {"every": 1}}


def _keys(**parts: Any) -> dict[str, str]:
    base = {"model": EXAMPLE.make_model(), "data": {"train": EXAMPLE.make_rows()}, "loss": EXAMPLE.next_token_loss}
    checked = stagewise.check(SHORT, cache=Path("/nonexistent-stagewise-cache"), **{**base, **parts})
    return {s.name: s.key for s in checked.stages}


def test_the_example_trains_its_own_parts_through_three_stages_and_reuses_them(tmp_path: Path) -> None:
    run, recorder = EXAMPLE.main(tmp_path / "run")
    assert list(run.stages) == ["adam", "sgd", "cosine"]
    for name, stage in run.stages.items():
        assert stage.export is not None and (stage.export / "config.json").is_file(), name
        assert stage.summary is not None and not stage.summary.reused
    evals = [m["val_loss"] for m in run.metrics if m["kind"] == "eval"]
    assert evals[-1] < evals[0] - 0.3  # the user's loss on the user's rows went down
    starts = [e for e in run.events if e["event"] == "stage_start"]
    assert [(e["stage"], e["task"], e["optimizer"]) for e in starts] == \
        [("adam", "python", "adam"), ("sgd", "python", "sgd"), ("cosine", "python", "sgd")]
    assert {c[0] for c in recorder.calls} == {"stage_start", "before_step", "before_optimizer_step", "after_update",
                                             "after_evaluation", "on_checkpoint", "stage_end"}
    # The veto: update 4 of sgd (index 3) never reached the weights, and it counts as spent.
    assert recorder.unchanged_by_veto is True
    counted = [step for hook, stage, step in recorder.calls if hook == "after_update" and stage == "sgd"]
    assert counted == [s for s in range(1, 21) if s != 4]
    drawn = [step for hook, stage, step in recorder.calls if hook == "before_step" and stage == "sgd"]
    assert drawn == list(range(20))  # update 4 drew its batches once; the stage still ends at step 20
    assert [(h, s) for h, s, _ in recorder.calls[:4]] == [("stage_start", "adam"), ("before_step", "adam"),
                                                          ("before_optimizer_step", "adam"), ("after_update", "adam")]
    # Fresh objects equal to the first: the same stage keys, every stage reused, no hook called.
    again, second = EXAMPLE.main(tmp_path / "run")
    assert [e["stage"] for e in again.events if e["event"] == "stage_reused"][-3:] == ["adam", "sgd", "cosine"]
    assert second.calls == []


def test_a_changed_model_rows_or_loss_gives_new_stage_keys_and_unchanged_ones_the_same() -> None:
    keys = _keys()
    assert _keys() == keys  # fresh, equal objects

    def other_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return EXAMPLE.next_token_loss(model, batch) * 1.0

    config = EXAMPLE.make_model().config
    torch.manual_seed(1)
    reseeded = transformers.GPT2LMHeadModel(config)  # the same class and config, other initial weights
    wider = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=48,
                                                                 n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    rows = EXAMPLE.make_rows()
    for changed in ({"model": reseeded}, {"model": wider}, {"loss": other_loss},
                    {"data": {"train": rows.select(range(len(rows) - 1))}},
                    {"data": {"train": [{"input_ids": r} for r in rows["input_ids"]][::-1]}}):
        new = _keys(**changed)
        assert all(new[s] != keys[s] for s in keys), changed
    # A list of dicts with the same content as the dataset: hashed by content, not by `_fingerprint`.
    as_list = _keys(data={"train": [{"input_ids": r} for r in rows["input_ids"]]})
    assert as_list == _keys(data={"train": [{"input_ids": r} for r in rows["input_ids"]]}) != keys

    def versioned(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return EXAMPLE.next_token_loss(model, batch)

    versioned.version = "1"  # type: ignore[attr-defined]
    first = _keys(loss=versioned)

    def versioned(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[no-redef]  # noqa: F811
        return EXAMPLE.next_token_loss(model, batch) * 2.0  # changed source, same declared version

    versioned.version = "1"  # type: ignore[attr-defined]
    assert _keys(loss=versioned) == first


def test_plans_without_objects_keep_their_stage_keys(tmp_path: Path, corpus: Path) -> None:
    path = write_plan(tmp_path, tiny_plan(corpus, [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3},
                                                    "steps": 4}]))
    from stagewise.engine.prepare_run import prepare
    from stagewise.plan.load import load_plan

    direct = prepare(load_plan(path), path, tmp_path / "cache").resolved[0].key
    assert stagewise.check(path, cache=tmp_path / "cache").stages[0].key == direct
    assert stagewise.check(stagewise.Plan.from_yaml(path), cache=tmp_path / "cache").stages[0].key == direct


def test_a_transformers_model_object_trains_the_plans_text_in_place_of_its_model(tmp_path: Path, corpus: Path) -> None:
    plan = tiny_plan(corpus, [{"name": "a", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 6}])

    def lm() -> transformers.GPT2LMHeadModel:
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32,
                                                                    n_layer=1, n_head=2, bos_token_id=0,
                                                                    eos_token_id=0))

    built = stagewise.check(plan, cache=tmp_path / "cache").stages[0].key
    model = lm()
    run = stagewise.train(plan, out=tmp_path / "run", cache=tmp_path / "cache", model=model, console=QUIET)
    key = run.events[0]["stages"][0]["key"]
    assert key != built and run.stages["a"].summary is not None
    assert run.stages["a"].evals[-1]["val_loss"] < run.stages["a"].metrics[0]["loss"]
    assert not torch.equal(model.transformer.wte.weight, lm().transformer.wte.weight)  # trained in place
    assert stagewise.check(plan, cache=tmp_path / "cache", model=lm()).status == {"a": "reuse"}
    with pytest.raises(UserError, match=r"^model=: the plan's \d+-token streams train a transformers causal LM"):
        stagewise.check(plan, cache=tmp_path / "cache", model=torch.nn.Linear(2, 2))


class Losses(stagewise.Callback):
    """Remembers each applied update's loss: its state must come back exactly on resume."""

    def __init__(self) -> None:
        self.seen: list[list[Any]] = []

    def after_update(self, trainer: Any, update: stagewise.StepState) -> None:
        assert update.loss is not None
        self.seen.append([trainer.stage.name, trainer.progress.step, float(update.loss)])

    def state_dict(self) -> dict[str, Any]:
        return {"seen": [list(s) for s in self.seen]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = [list(s) for s in state["seen"]]


def test_a_resumed_run_gives_a_user_callback_its_state_back_exactly(tmp_path: Path) -> None:
    parts = {"data": {"train": EXAMPLE.make_rows()}, "loss": EXAMPLE.next_token_loss}
    plan = {**SHORT, "checkpoint": {"every": 2}}
    whole = Losses()
    stagewise.train(plan, out=tmp_path / "whole", cache=tmp_path / "c1", model=EXAMPLE.make_model(),
                    callbacks=[whole], console=QUIET, **parts)
    cut = Losses()
    checked = stagewise.check(plan, cache=tmp_path / "c2", model=EXAMPLE.make_model(), **parts)
    with pytest.raises(RunStopped):  # stopped in the middle of stage sgd, after a checkpoint
        train_prepared(checked.prepared, tmp_path / "cut", console=QUIET, stop_after=10, callbacks=[cut])
    resumed = Losses()
    stagewise.train(plan, out=tmp_path / "cut", cache=tmp_path / "c2", model=EXAMPLE.make_model(),
                    callbacks=[resumed], console=QUIET, **parts)
    assert any(e["event"] == "stage_resumed" for e in read_jsonl(tmp_path / "cut" / "events.jsonl"))
    assert resumed.seen == whole.seen and len(whole.seen) == 18
    assert metrics_difference(tmp_path / "whole", tmp_path / "cut") is None


def test_bad_objects_are_one_line_errors(tmp_path: Path) -> None:
    rows = {"train": EXAMPLE.make_rows()}
    parts = {"model": EXAMPLE.make_model(), "data": rows, "loss": EXAMPLE.next_token_loss}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**parts, "callbacks": [object()]}, "callbacks[0]: not a stagewise.Callback: object"),
        ({**parts, "callbacks": [Losses(), Losses()]}, "callbacks[1]: a second callback with key 'Losses'"),
        ({"model": EXAMPLE.make_model(), "data": rows}, "loss=: datasets and a loss come together"),
        ({"model": EXAMPLE.make_model(), "data": rows, "loss": len}, "loss=: cannot read the source of len"),
        ({"model": EXAMPLE.make_model(), "data": {"train": [{"input_ids": [1, 2]}, {"input_ids": [1]}]},
          "loss": EXAMPLE.next_token_loss}, "data=['train']['input_ids']: every row's value must be numbers"),
        ({"model": EXAMPLE.make_model(), "data": {"train": rows["train"], "nope": {}}, "loss": EXAMPLE.next_token_loss},
         "data=['nope']: neither train, val nor a stage (stages: adam, sgd, cosine)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError) as e:
            stagewise.train(SHORT, out=tmp_path / "run", cache=tmp_path / "cache", console=QUIET, **kwargs)
        assert str(e.value).startswith(message), str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_plan_object_reads_yaml_overrides_and_writes_it_back(tmp_path: Path, corpus: Path) -> None:
    path = write_plan(tmp_path, tiny_plan(corpus, [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3},
                                                    "steps": 4}]))
    plan = stagewise.Plan.from_yaml(path)
    assert plan.to_yaml() == path.read_text(encoding="utf-8") and plan.name == "tiny"
    longer = plan.with_overrides("stages.a.steps=9")
    assert longer.config.stages[0].steps == 9 and plan.config.stages[0].steps == 4
    again = stagewise.Plan.from_dict(yaml.safe_load(longer.to_yaml()), base_dir=tmp_path)
    assert again.config == longer.config
    assert stagewise.Plan.from_config(again.config).config == again.config
    with pytest.raises(UserError) as e:
        plan.with_overrides("stages.a.stepz=9")
    assert str(e.value).startswith("command line: stages.a.stepz: unknown key")


def test_importing_stagewise_is_cheap_and_lists_its_api() -> None:
    code = "import sys, stagewise; print(sorted(m for m in ('torch', 'transformers', 'pydantic') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert {"Plan", "check", "train", "lr_find", "search", "open_run", "Run", "Callback"} <= set(stagewise.__all__)
    for name in stagewise.__all__:
        assert getattr(stagewise, name) is not None


def test_the_api_names_stay_the_calls_whatever_else_is_imported() -> None:
    # The search package was once named stagewise.search: importing any of its modules replaced
    # the function of that name with the package ('module' object is not callable).
    code = ("import stagewise, stagewise.tuning.study, stagewise.engine.run_plan; "
            "print(all(callable(getattr(stagewise, n)) for n in ('search', 'train', 'check', 'lr_find', 'open_run')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_paths_may_be_given_as_strings(tmp_path: Path, corpus: Path) -> None:
    plan = tiny_plan(corpus, [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 2}])
    run = stagewise.train(plan, out=str(tmp_path / "run"), cache=str(tmp_path / "cache"), console=QUIET)
    assert run.stages["a"].summary is not None and (tmp_path / "cache").is_dir()
    assert stagewise.check(plan, out=str(tmp_path / "run"), cache=str(tmp_path / "cache")).out == tmp_path / "run"
