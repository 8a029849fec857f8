"""`stagewise search`: trials are plans that share their common stages through the stage cache
(within one worker and across concurrent ones), pruning through the evaluation hook, resume,
cross-validation folds, the report, and bad input refused before any trial."""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import tiny_plan, write_plan
from rich.console import Console

from stagewise.cli import main
from stagewise.data.split import held_out, stratified_folds
from stagewise.engine.prepare_run import prepare
from stagewise.engine.reactions import EvalReporter
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.errors import RunStopped
from stagewise.plan.load import load_plan
from stagewise.tuning import study as study_module
from stagewise.tuning.results import edge_notes, trial_rows
from stagewise.tuning.run_search import SearchOptions, prepare_search, search
from stagewise.tuning.space import Param
from stagewise.tuning.trial import Pruned, run_trial

TWO_STAGES = [
    {"name": "stable", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 16},
    {"name": "cooldown", "optimizer": {"handoff": "carry"}, "schedule": {"name": "decay", "shape": "linear"},
     "steps": 6, "eval": {"every": 3}},
]



SPACE = {"stages.cooldown.optimizer.lr": {"float": [1e-4, 1e-2], "log": True},
         "stages.cooldown.schedule.shape": {"choice": ["linear", "cosine", "1-sqrt"]}}


def _plan(tmp_path: Path, corpus: Path) -> Path:
    plan = tiny_plan(corpus, TWO_STAGES)
    plan["defaults"]["eval"]["batches"] = 3
    return write_plan(tmp_path, plan)


def _space(tmp_path: Path, space: dict[str, Any], name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(space), encoding="utf-8")
    return path


def _events(out: Path) -> list[dict[str, Any]]:
    return [e for log in sorted(out.glob("trials/*/events.jsonl")) for e in read_jsonl(log)]


def _trained(events: list[dict[str, Any]], stage: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "stage_start" and (stage is None or e["stage"] == stage)]


def test_a_search_trains_the_shared_first_stage_once(tmp_path: Path, corpus: Path) -> None:
    plan, out = _plan(tmp_path, corpus), tmp_path / "search"
    result = search(plan, SearchOptions(space=_space(tmp_path, SPACE), trials=3, out=out, sampler="random"),
                    Console(width=200, file=open(tmp_path / "console.txt", "w")))
    assert [r.state for r in result.rows] == ["complete"] * 3
    events = _events(out)
    assert len(_trained(events, "stable")) == 1  # trained by the first trial, reused by the others
    assert len([e for e in events if e["event"] == "stage_reused" and e["stage"] == "stable"]) == 2
    assert len(_trained(events, "cooldown")) == 3
    assert [r.reused for r in result.rows] == [[], ["stable"], ["stable"]]
    # the value of each trial is its cooldown's final val_loss, as its own metrics.jsonl says
    for row in result.rows:
        final = [m for m in read_jsonl(out / f"trials/{row.number:04d}/metrics.jsonl")
                 if m["kind"] == "eval" and m["stage"] == "cooldown"][-1]
        assert row.value == pytest.approx(final["val_loss"])
    best = min(result.rows, key=lambda r: r.value)  # type: ignore[arg-type, return-value]
    assert result.best == out / "best.yaml"
    written = load_plan(out / "best.yaml")  # a plan, with the best trial's values in it
    cooldown = next(s for s in written.stages if s.name == "cooldown")
    assert cooldown.optimizer.lr == pytest.approx(best.params["stages.cooldown.optimizer.lr"])
    assert cooldown.schedule.shape == best.params["stages.cooldown.schedule.shape"]
    assert set(result.plots) == {"history", "importance"}
    assert all(p.stat().st_size > 1000 for p in result.plots.values())

    # `stagewise report` of the search directory: the table, the best plan and the plots in one page
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert page.count("<tr>") == 4 and "stages.cooldown.optimizer.lr" in page and page.count("<img") == 2
    assert "best of search" in page


def test_a_search_run_again_goes_on_with_its_study(tmp_path: Path, corpus: Path) -> None:
    plan, out = _plan(tmp_path, corpus), tmp_path / "search"
    space = _space(tmp_path, {"stages.cooldown.optimizer.lr": {"float": [1e-4, 1e-2], "log": True}})
    console = Console(width=200, file=open(tmp_path / "console.txt", "w"))
    first = search(plan, SearchOptions(space=space, trials=1, out=out), console)
    assert len(first.rows) == 1 and first.best is not None
    second = search(plan, SearchOptions(space=space, trials=3, out=out), console)
    assert [r.number for r in second.rows] == [0, 1, 2]  # the study held one trial: two more ran
    assert len(_trained(_events(out), "stable")) == 1
    assert "no importance" not in " ".join(second.notes)
    # another search in the same directory is refused, not mixed into it
    with pytest.raises(Exception, match="holds a search with another metric"):
        search(plan, SearchOptions(space=space, trials=3, out=out, metric="stable.val_loss"), console)


def test_an_interrupted_trial_runs_again_with_the_same_values(tmp_path: Path, corpus: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import stagewise.tuning.trial as trial_module

    plan, out = _plan(tmp_path, corpus), tmp_path / "search"
    options = SearchOptions(space=_space(tmp_path, SPACE), trials=2, out=out)
    console = Console(width=200, file=open(tmp_path / "console.txt", "w"))
    train_plan = trial_module._train

    def interrupted(*args: Any) -> float:
        raise KeyboardInterrupt

    monkeypatch.setattr(trial_module, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search(plan, options, console)
    monkeypatch.setattr(trial_module, "_train", train_plan)
    rows = search(plan, options, console).rows
    assert [(r.state, r.note) for r in rows] == [("fail", "interrupted"), ("complete", "retry of 0"),
                                                 ("complete", "")]
    assert rows[1].params == rows[0].params and rows[2].params != rows[0].params


def test_two_workers_share_one_study_and_train_each_stage_once(tmp_path: Path, corpus: Path) -> None:
    plan, out = _plan(tmp_path, corpus), tmp_path / "search"
    result = search(plan, SearchOptions(space=_space(tmp_path, SPACE), trials=4, workers=2, out=out),
                    Console(width=200, file=open(tmp_path / "console.txt", "w")))
    assert sorted(r.number for r in result.rows) == [0, 1, 2, 3]
    assert all(r.state == "complete" for r in result.rows)
    events = _events(out)
    trained = Counter(e["key"] for e in _trained(events))
    assert trained and max(trained.values()) == 1  # no stage key trained twice, across both workers
    assert len(_trained(events, "stable")) == 1
    assert len({e["key"] for e in _trained(events, "cooldown")}) == 4


def test_a_worker_that_checked_before_another_began_the_last_trial_runs_no_extra_one(
        tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The race CI met: two workers finish together, both see one trial left, both begin one.
    # Here the other worker has begun the last trial (running) and this one's view is stale.
    setup = prepare_search(_plan(tmp_path, corpus), SearchOptions(space=_space(tmp_path, SPACE), trials=2,
                                                                  out=tmp_path / "search"))
    study = study_module.open_study(setup)
    study.enqueue_trial({"stages.cooldown.optimizer.lr": 1e-3, "stages.cooldown.schedule.shape": "linear"})
    first = study.ask()
    study.tell(first, 1.0)
    study.ask()  # the other worker's trial, still running
    monkeypatch.setattr(study_module, "remaining", lambda study, trials: 1)  # checked before it began
    study_module.work(setup)
    study = study_module.open_study(setup)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING", "FAIL"]
    assert study.trials[2].user_attrs == {"surplus": True} and not study.trials[2].params
    assert not (tmp_path / "search/trials").exists()  # nothing trained
    assert [r.number for r in trial_rows(study)] == [0, 1]  # and the table leaves it out


def test_machines_sharing_a_database_draw_their_own_trials(tmp_path: Path, corpus: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def first_draw(storage: str | None, host: str) -> float:
        out = tmp_path / f"search-{storage is None}"
        setup = prepare_search(_plan(tmp_path, corpus), SearchOptions(space=_space(tmp_path, SPACE), trials=2,
                                                                      out=out, storage=storage))
        monkeypatch.setattr(study_module.socket, "gethostname", lambda: host)
        study = optuna.create_study(sampler=study_module._sampler(setup, worker=0, seen=0))
        return study.ask().suggest_float("x", 0.0, 1.0)

    shared = f"sqlite:///{tmp_path / 'shared.db'}"  # workers on several machines: worker 0 on each
    assert first_draw(shared, "node-a") != first_draw(shared, "node-b")
    assert first_draw(None, "node-a") == first_draw(None, "node-b")  # one machine's search: its seed alone


def test_the_eval_hook_sees_each_evaluation_and_can_stop_the_run(tmp_path: Path, corpus: Path) -> None:
    path = _plan(tmp_path, corpus)
    seen: list[tuple[str, int, float]] = []

    def hook(stage: str, step: int, metrics: dict[str, float]) -> None:
        seen.append((stage, step, metrics["val_loss"]))
        if stage == "cooldown":
            raise Pruned("pruned here", code=0)

    prepared = prepare(load_plan(path), path, tmp_path / "cache")
    with pytest.raises(RunStopped, match="pruned here"):
        train(prepared, tmp_path / "run", callbacks=[EvalReporter(hook)])
    evals = [(m["stage"], m["stage_step"], m["val_loss"]) for m in read_jsonl(tmp_path / "run/metrics.jsonl")
             if m["kind"] == "eval"]
    assert [e[:2] for e in evals] == [("stable", 16), ("cooldown", 3)]
    assert seen == evals[1:]  # the mid-stage evaluations (a stage's final one is its result)
    assert read_jsonl(tmp_path / "run/events.jsonl")[-1]["event"] == "plan_interrupted"
    # without the callback, runs call no hook
    train(prepare(load_plan(path), path, tmp_path / "cache"), tmp_path / "run2")
    assert len(seen) == 1


def test_the_pruner_prunes_a_trial_at_an_evaluation(tmp_path: Path, corpus: Path) -> None:
    plan = _plan(tmp_path, corpus)
    setup = prepare_search(plan, SearchOptions(space=_space(tmp_path, SPACE), trials=1, out=tmp_path / "search"))
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # any loss is over it
    study.optimize(lambda trial: run_trial(setup, trial, print), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [3]  # the cooldown's first evaluation, at its step 3
    events = read_jsonl(tmp_path / "search/trials/0000/events.jsonl")
    assert events[-1]["event"] == "plan_interrupted" and "pruned at step 3" in events[-1]["reason"]


def _labeled(path: Path, n: int) -> Path:
    rng = random.Random(1)
    cue = {"pos": "good great fine nice".split(), "neg": "bad awful poor sad".split()}
    lines = []
    for i in range(n):
        label = "pos" if i % 3 else "neg"  # 2:1, so stratification shows
        words = rng.sample("the a movie film was it is very".split(), 3) + [rng.choice(cue[label])]
        lines.append(f"{label}\t{' '.join(rng.sample(words, len(words)))}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cross_validation_scores_the_mean_over_stratified_folds(tmp_path: Path) -> None:
    data = _labeled(tmp_path / "reviews.tsv", 60)
    plan = write_plan(tmp_path, {
        "name": "cls", "seed": 3, "precision": "fp32", "model": {"arch": "bigru", "embed_dim": 8, "hidden": 8,
                                                                   "dense": 8},
        "tokenizer": {"kind": "word", "vocab_size": 300},
        "data": {"train": str(data), "field": 1, "label": 0, "max_len": 8},
        "stages": [{"name": "fit", "task": "classify", "optimizer": {"name": "adam", "lr": 1e-2},
                    "batch": {"size": 16}, "epochs": 2}],
        "log": {"every": 2}})
    out = tmp_path / "search"
    space = _space(tmp_path, {"stages.fit.optimizer.lr": {"float": [1e-3, 3e-2], "log": True}})
    result = search(plan, SearchOptions(space=space, trials=1, out=out, cv=3, metric="fit.val_accuracy"),
                    Console(width=200, file=open(tmp_path / "console.txt", "w")))
    row = result.rows[0]
    assert row.state == "complete" and row.trained == ["fold-0/fit", "fold-1/fit", "fold-2/fit"]
    finals = [[m for m in read_jsonl(out / f"trials/0000/fold-{k}/metrics.jsonl") if m["kind"] == "eval"][-1]
              for k in range(3)]
    accuracies = [f["val_accuracy"] for f in finals]
    assert row.value == pytest.approx(statistics.fmean(accuracies))
    assert row.cv_std == pytest.approx(statistics.pstdev(accuracies))
    # the folds: disjoint validation sets covering every record, each with the file's 1:2 labels
    rows = data.read_text().splitlines()
    vals = [[json.loads(line) for line in (out / f"folds/fit/fold-{k}-val.jsonl").read_text().splitlines()]
            for k in range(3)]
    assert sorted(f"{r['label']}\t{r['text']}" for v in vals for r in v) == sorted(rows)
    for v in vals:  # 20 negative and 40 positive records: a third of each in every fold
        assert len(v) == 20 and Counter(r["label"] for r in v)["neg"] in (6, 7)
    for k in range(3):
        train_rows = (out / f"folds/fit/fold-{k}-train.jsonl").read_text().splitlines()
        assert len(train_rows) + len(vals[k]) == 60
    # each fold trained the stage under its own key: fold k's plan reads fold k
    fold_plan = load_plan(out / "trials/0000/fold-1/plan.yaml")
    assert fold_plan.data.val == str((out / "folds/fit/fold-1-val.jsonl").resolve())


def test_stratified_folds_keep_each_label_share() -> None:
    labels = ["a"] * 30 + ["b"] * 12 + ["c"] * 3
    folds = stratified_folds(labels, 3, seed=5)
    assert sorted(i for f in folds for i in f) == list(range(45))
    for fold in folds:
        counts = Counter(labels[i] for i in fold)
        assert counts == {"a": 10, "b": 4, "c": 1}
    assert stratified_folds(labels, 3, seed=5) == folds and stratified_folds(labels, 3, seed=6) != folds
    # the default split is the one it always was
    assert held_out(10, 0.2, 0) == held_out(10, 0.2, 0) and len(held_out(10, 0.2, 0)[1]) == 2


@pytest.mark.parametrize(("space", "args", "line"), [
    ({"stages.cooldwn.optimizer.lr": {"float": [1e-4, 1e-2]}}, [],
     "error: SPACE: stages.cooldwn.optimizer.lr: not a key of PLAN: no stage 'cooldwn' (did you mean 'cooldown'?)"),
    ({"stages.cooldown.schedule.shpe": {"choice": ["linear", "cosine"]}}, [],
     "error: SPACE: stages.cooldown.schedule.shpe: not a key of PLAN: stages[1].schedule.shpe: unknown key "
     "(did you mean 'shape'?)"),
    ({"stages.cooldown.optimizer.lr": {"float": [1e-2, 1e-4]}}, [],
     "error: SPACE: stages.cooldown.optimizer.lr.float: empty range [0.01, 0.0001]: need lo < hi"),
    ({"stages.cooldown.steps": {"int": [5, 5]}}, [], "error: SPACE: stages.cooldown.steps.int: empty range [5, 5]: "
                                                     "need lo < hi"),
    ({"stages.cooldown.steps": {"int": [0, 5]}}, [], "error: SPACE: stages.cooldown.steps: 0 makes PLAN invalid: "
                                                     "stages[1].steps: input should be greater than or equal to 1 "
                                                     "(got 0)"),
    ({"stages.cooldown.optimizer.name": {"choice": ["sgd", "adamm"]}}, [],
     "error: SPACE: stages.cooldown.optimizer.name: 'adamm' makes PLAN invalid: stages[1].optimizer.name: input "
     "should be 'gd', 'sgd', 'sgd_l1', 'adam', 'adamw', 'muon', 'schedulefree_adamw' or 'schedulefree_sgd' (got 'adamm')"),
    ({"stages.cooldown.optimizer.lr": {"float": [1e-4, 1e-2], "when": {1e-3: {"stages.cooldown.steps": {"int": [2, 4]}}}}},
     [], "error: SPACE: stages.cooldown.optimizer.lr.when: only a choice has `when` (a distribution per value of "
         "the choice)"),
    ({"stages.cooldown.optimizer.name": {"choice": ["adamw", "sgd"], "when": {"adam": {"stages.cooldown.steps":
                                                                                     {"int": [2, 4]}}}}}, [],
     "error: SPACE: stages.cooldown.optimizer.name.when.adam: not one of the choices ['adamw', 'sgd']"),
    ({"stages.cooldown.optimizer.name": {"choice": ["adamw", "sgd"], "when": {"sgd": {"stages.cooldown.optimizer.lr":
                                                                                    {"float": [1.0, 0.1]}}}}}, [],
     "error: SPACE: stages.cooldown.optimizer.name.when.sgd.stages.cooldown.optimizer.lr.float: empty range "
     "[1.0, 0.1]: need lo < hi"),
    ({"stages.cooldown.optimizer.name": {"choice": ["adamw", "sgd"], "when": {"sgd": {"stages.cooldown.steps":
                                                                                    {"int": [0, 4]}}}}}, [],
     "error: SPACE: stages.cooldown.steps|sgd: 0 makes PLAN invalid: stages[1].steps: input should be greater than "
     "or equal to 1 (got 0)"),
    ({"stages.cooldown.steps": {"int": [2, 4]},
      "stages.cooldown.optimizer.name": {"choice": ["adamw", "sgd"], "when": {"sgd": {"stages.cooldown.steps":
                                                                                    {"int": [5, 9]}}}}}, [],
     "error: SPACE: stages.cooldown.steps: sampled twice in one trial (a key either has one distribution, or one "
     "per value of a single choice)"),
    (SPACE, ["--metric", "cooldown.val_accuracy"],
     "error: --metric: stage 'cooldown' (causal_lm) never logs 'val_accuracy' (it logs val_loss, val_ppl, "
     "train_loss)"),
    (SPACE, ["--metric", "cool.val_loss"], "error: --metric: no stage 'cool' in the plan (stages: stable, cooldown)"),
    (SPACE, ["--cv", "3"], "error: --cv: stage 'cooldown' (causal_lm) has no labeled table to stratify folds by "
                           "(cross-validation is for stages of labeled records, e.g. classify)"),
])
def test_bad_input_is_one_line_before_any_trial(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str],
                                                space: dict[str, Any], args: list[str], line: str) -> None:
    plan, space_path, out = _plan(tmp_path, corpus), _space(tmp_path, space), tmp_path / "search"
    code = main(["search", str(plan), "--space", str(space_path), "--trials", "2", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err == line.replace("SPACE", str(space_path)).replace("PLAN", str(plan)) + "\n"
    assert not (out / "trials").exists()


def test_trials_of_a_search_killed_hard_run_again_with_their_values(tmp_path: Path, corpus: Path) -> None:
    """kill -9 of the search mid-trial leaves that trial RUNNING in study.db (its worker could not
    say otherwise); the search run again sees its worker is gone, runs it again with the same
    values and ends with every trial done (none counted done while it was running)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    plan, out = _plan(tmp_path, corpus), tmp_path / "search"
    space = _space(tmp_path, SPACE)
    proc = subprocess.Popen([sys.executable, "-m", "stagewise", "search", str(plan), "--space", str(space),
                             "--trials", "2", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "trials" / "0000" / "events.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and any(e["event"] == "checkpoint_saved" for e in read_jsonl(log))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"]
    console = Console(width=200, file=open(tmp_path / "console.txt", "w"))
    rows = search(plan, SearchOptions(space=space, trials=2, out=out), console).rows
    assert [(r.state, r.note) for r in rows] == [
        ("fail", f"its worker (process {proc.pid}) is gone"), ("complete", "retry of 0"), ("complete", "")]
    assert rows[1].params == rows[0].params
    assert "trials done" not in (tmp_path / "console.txt").read_text()  # all two are


def test_a_search_says_how_many_trials_are_done_when_one_still_runs(tmp_path: Path, corpus: Path) -> None:
    """A trial another worker is running (alive: here, this very test's parent process) is not done."""
    import os

    plan, out = _plan(tmp_path, corpus), tmp_path / "search"
    options = SearchOptions(space=_space(tmp_path, SPACE), trials=1, out=out)
    setup = prepare_search(plan, options)
    study = study_module.open_study(setup)
    with pytest.warns(UserWarning, match="Heartbeat of storage is supposed to be used with Study.optimize"):
        running = study.ask()  # as another worker's optimize does
    running.set_user_attr("worker", {"host": __import__("socket").gethostname(), "pid": os.getppid()})
    console = Console(width=200, file=open(tmp_path / "console.txt", "w"))
    result = search(plan, options, console)
    assert [r.state for r in result.rows] == ["running"]
    assert "0 of 1 trials done, 1 running" in (tmp_path / "console.txt").read_text()


def test_best_yaml_checks_and_trains_where_it_is_written(tmp_path: Path, corpus: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan names its data relative to its own folder; best.yaml lies in another one."""
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "text").mkdir()
    (plans / "text" / "corpus.txt").write_bytes(corpus.read_bytes())
    mix = {"mix": [{"name": "text", "train": "text/*.txt", "weight": 1.0}]}
    plan = write_plan(plans, tiny_plan(Path("text/corpus.txt"), [TWO_STAGES[0], {**TWO_STAGES[1], "data": mix}]))
    out = tmp_path / "elsewhere" / "search"
    search(plan, SearchOptions(space=_space(tmp_path, SPACE), trials=1, out=out),
           Console(width=200, file=open(tmp_path / "console.txt", "w")))
    monkeypatch.chdir(tmp_path / "elsewhere")  # neither the plan's folder nor best.yaml's
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["data"]["train"] == "../../plans/text/corpus.txt"
    assert best["stages"][1]["data"]["mix"][0]["train"] == "../../plans/text/*.txt"
    assert main(["check", str(out / "best.yaml")]) == 0
    assert main(["train", str(out / "best.yaml"), "--out", "best-run", "--cache", str(out / ".cache")]) == 0
    # the same files and values as the best trial: the same stage keys, so both stages are reused
    assert [e["stage"] for e in read_jsonl(Path("best-run/events.jsonl")) if e["event"] == "stage_reused"] \
        == ["stable", "cooldown"]


LR_PER_OPTIMIZER = {"stages.cooldown.optimizer.name": {"choice": ["adamw", "sgd"], "when": {
    "adamw": {"stages.cooldown.optimizer.lr": {"float": [1e-4, 3e-3], "log": True}},
    "sgd": {"stages.cooldown.optimizer.lr": {"float": [0.03, 1.0], "log": True},
            "stages.cooldown.optimizer.momentum": {"choice": [0.0, 0.9]}}}}}


def test_a_choice_gives_each_value_its_own_ranges(tmp_path: Path, corpus: Path) -> None:
    stages = [TWO_STAGES[0], {**TWO_STAGES[1], "optimizer": {"name": "adamw", "lr": 1e-3, "handoff": "reset"}}]
    raw = tiny_plan(corpus, stages)
    raw["defaults"]["eval"]["batches"] = 3
    plan, out = write_plan(tmp_path, raw), tmp_path / "search"
    console = tmp_path / "console.txt"
    result = search(plan, SearchOptions(space=_space(tmp_path, LR_PER_OPTIMIZER), trials=6, out=out, sampler="random",
                                        pruner="none"),
                    Console(width=200, file=open(console, "w")))
    assert [r.state for r in result.rows] == ["complete"] * 6
    names = {r.params["stages.cooldown.optimizer.name"] for r in result.rows}
    assert names == {"adamw", "sgd"}  # the seed draws both
    for row in result.rows:
        chosen = row.params["stages.cooldown.optimizer.name"]
        lr = row.params[f"stages.cooldown.optimizer.lr|{chosen}"]  # each optimizer's range, by its own name
        assert set(row.params) == {"stages.cooldown.optimizer.name", f"stages.cooldown.optimizer.lr|{chosen}"} | (
            {"stages.cooldown.optimizer.momentum|sgd"} if chosen == "sgd" else set())
        assert (1e-4 <= lr <= 3e-3) if chosen == "adamw" else (0.03 <= lr <= 1.0)
        trained = yaml.safe_load((out / f"trials/{row.number:04d}/plan.yaml").read_text())["stages"][1]["optimizer"]
        assert trained["name"] == chosen and trained["lr"] == pytest.approx(lr)
    text = " ".join(console.read_text().split())
    # the plain key in the best plan and in the command that reproduces it
    best = min(result.rows, key=lambda r: r.value)  # type: ignore[arg-type, return-value]
    chosen = best.params["stages.cooldown.optimizer.name"]
    lr = best.params[f"stages.cooldown.optimizer.lr|{chosen}"]
    assert load_plan(out / "best.yaml").stages[1].optimizer.lr == pytest.approx(lr)
    assert f"stages.cooldown.optimizer.name={chosen} stages.cooldown.optimizer.lr={lr}" in text
    # the running trial's progress in the terminal: each stage's start, its quarters, its evaluations
    assert "trial 0: stage 'stable' starts (16 updates)" in text and "trial 0: stage 'stable' step 4/16, loss" in text
    assert "trial 0: stage 'cooldown' step 3/6: val_loss" in text
    # 6 trials are too few for importances to mean anything, and the notes say so
    assert "parameter importances from 6 completed trials mean little (they need 10)" in " ".join(result.notes)


def test_a_best_value_at_the_end_of_its_range_is_noted() -> None:
    space = [Param("a", "float", 1e-4, 1e-2, log=True, name="a"), Param("b", "int", 8, 32, name="b")]
    assert edge_notes({"a": 1.2e-4, "b": 20}, space) == [
        "the best a = 0.00012 is at the low end of its range [0.0001, 0.01] (in its outer 5%, log scale): the best "
        "value may lie beyond it; widen the range"]
    assert edge_notes({"a": 1e-3, "b": 31}, space) == [
        "the best b = 31 is at the high end of its range [8, 32] (in its outer 5%): the best value may lie beyond "
        "it; widen the range"]
    assert edge_notes({"a": 1e-3, "b": 20}, space) == []
