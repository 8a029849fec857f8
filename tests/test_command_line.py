"""The command line as a new user meets it: overrides anywhere after the plan, `check` reading the
stage cache the run uses, errors that name what the user typed (the command line, the plan key
that points at a bad data file), and `stagewise runs` by time with a metric of the user's choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_plan, write_plan

from stagewise.cli import main
from stagewise.engine.run_logs import read_jsonl
from stagewise.errors import UserError
from stagewise.plan.load import load_plan

STAGES = [
    {"name": "a", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 6, "eval": {"every": 3}},
    {"name": "b", "optimizer": {"name": "sgd", "lr": 0.1}, "steps": 6},
]


def _status(out: str) -> dict[str, str]:
    """Each stage's status in `check`'s table: its row's last cell."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 3 and cells[1] in ("a", "b"):
            rows[cells[1]] = cells[-2]
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, Path]:
    """The plan, trained with `--out` outside ./runs and an override after the option."""
    root = tmp_path_factory.mktemp("cli")
    plan = write_plan(root, tiny_plan(corpus, STAGES))
    out = root / "elsewhere" / "x"
    assert main(["train", str(plan), "--out", str(out), "stages.b.steps=4"]) == 0
    return plan, out


def test_an_override_after_an_option_is_applied(trained: tuple[Path, Path]) -> None:
    plan, out = trained
    assert yaml.safe_load((out / "plan.yaml").read_text())["stages"][1]["steps"] == 4
    assert max(m["stage_step"] for m in read_jsonl(out / "metrics.jsonl") if m["stage"] == "b") == 4
    assert (out.parent / ".cache" / "stages").is_dir()  # the cache beside the run directory


def test_overrides_mix_with_options_in_order(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = write_plan(tmp_path, tiny_plan(corpus, STAGES))
    png = tmp_path / "lr.png"
    argv = ["check", str(plan), "stages.a.steps=9", "--plot", str(png), "stages.b.steps=5", "--cache",
            str(tmp_path / "cache"), "stages.a.steps=7"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "plan OK: 2 stages, 12 steps" in out  # 7 (the later override of a) + 5
    assert png.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(SystemExit) as caught:  # argparse's usage error, exit 2
        main(["check", str(plan), "--cache", str(tmp_path / "cache"), "nonsense"])
    assert caught.value.code == 2
    assert "unrecognized arguments: nonsense" in capsys.readouterr().err


def test_check_with_out_reads_the_runs_cache(trained: tuple[Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    plan, out = trained
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.chdir(tmp_path)  # ./runs/.cache is empty here
    assert main(["check", str(plan), "--out", str(out), "stages.b.steps=4"]) == 0
    assert _status(capsys.readouterr().out) == {"a": "reuse", "b": "reuse"}
    assert main(["check", str(plan), "--out", str(out)]) == 0  # b as planned (6 steps): not trained yet
    assert _status(capsys.readouterr().out) == {"a": "reuse", "b": "train"}
    assert main(["check", str(plan), "stages.b.steps=4"]) == 0  # the default cache, runs/.cache
    assert _status(capsys.readouterr().out) == {"a": "train", "b": "train"}
    assert main(["check", str(plan), "--cache", str(out.parent / ".cache"), "stages.b.steps=4"]) == 0
    assert _status(capsys.readouterr().out) == {"a": "reuse", "b": "reuse"}


# --- errors name what the user typed ------------------------------------------------------------


@pytest.mark.parametrize("override,where", [
    ("stages.b.stepz=3", "command line: stages.b.stepz: unknown key (did you mean 'steps'?)"),
    ("stages.1.optimizer={name: sgd, lrr: 1}", "command line: stages.1.optimizer.lrr: "),
    ("stages.bb.steps=3", "command line: stages.bb.steps=3: no stage 'bb' (did you mean 'b'?)"),
    ("seed", "command line: seed: expected key.path=value"),
    # a check of two keys, one the override set
    ("model.n_head=3", "command line: model.n_embd: gpt2 splits it over model.n_head: must be divisible by it"),
])
def test_override_errors_name_the_command_line(tmp_path: Path, corpus: Path, override: str, where: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    plan = write_plan(tmp_path, tiny_plan(corpus, STAGES))
    assert main(["check", str(plan), override, "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {where}") and len(err.strip().splitlines()) == 1, err
    assert str(plan) not in err


def test_a_plan_file_error_still_names_the_file(tmp_path: Path, corpus: Path) -> None:
    stages = [dict(STAGES[0], stepz=3), STAGES[1]]
    plan = write_plan(tmp_path, tiny_plan(corpus, stages))
    with pytest.raises(UserError) as caught:
        load_plan(plan, ["stages.b.steps=3"])  # an override elsewhere does not take the blame
    assert str(caught.value).startswith(f"{plan}: stages[0].stepz: unknown key")


def test_an_override_naming_a_bad_data_file_names_the_command_line(tmp_path: Path, corpus: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    plan = write_plan(tmp_path, tiny_plan(corpus, STAGES))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["check", str(plan), "--cache", str(tmp_path / "cache"), f"data.train={empty}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: command line: data.train: {empty}: empty file"


def test_data_file_errors_name_the_plan_key(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    plan = write_plan(tmp_path, tiny_plan(corpus, STAGES, data={"train": [str(corpus), "empty.txt"]}))
    assert main(["check", str(plan), "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {plan}: data.train: {empty}: empty file"

    # a classify stage's own data, a bad row on line 3 of its training file
    (tmp_path / "messages.tsv").write_text("ham\thome later dinner\nspam\twin cash now\nham\t \nspam\tfree prize\n")
    cls = {"name": "cls", "task": "classify", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 2,
           "data": {"train": "messages.tsv", "field": 1, "label": 0}}
    plan = write_plan(tmp_path, tiny_plan(corpus, [STAGES[0], cls]), "cls.yaml")
    assert main(["check", str(plan), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {plan}: stages[1].data.train: {tmp_path / 'messages.tsv'}:3: empty text in column 1", err


# --- stagewise runs ---------------------------------------------------------------------------------


def _fake_run(path: Path, time: float, evals: list[dict[str, Any]]) -> None:
    path.mkdir(parents=True)
    events = [{"event": "plan_start", "time": time - 10, "plan": "p", "stages": [{"name": "s"}]},
              {"event": "stage_start", "time": time - 9, "stage": "s", "step": 0, "steps": 10},
              *({"event": "eval", "time": time - 5, "stage": "s", "step": 5 * (i + 1), **e} for i, e in enumerate(evals)),
              {"event": "stage_end", "time": time - 1, "stage": "s", "step": 10},
              {"event": "plan_end", "time": time, "plan": "p"}]
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_runs_lists_the_latest_first_with_a_chosen_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    _fake_run(tmp_path / "a-old", 1_000_000.0, [{"val_loss": 0.5, "val_accuracy": 0.70},
                                                 {"val_loss": 0.4, "val_accuracy": 0.75}])
    _fake_run(tmp_path / "b-new", 3_000_000.0, [{"val_loss": 0.3, "val_accuracy": 0.91},
                                                 {"val_loss": 0.35, "val_accuracy": 0.88}])
    _fake_run(tmp_path / "c-mid", 2_000_000.0, [{"val_loss": 0.6}])
    assert main(["runs", str(tmp_path), "--metric", "val_accuracy"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "complete" in line]
    assert [r.split()[1] for r in rows] == ["b-new", "c-mid", "a-old"]
    assert "best val accuracy" in out
    # the highest accuracy, the lowest loss; a run that never evaluated it shows '-'
    assert "0.3000" in rows[0] and "0.9100" in rows[0] and "0.8800" not in rows[0]
    assert "0.4000" in rows[2] and "0.7500" in rows[2]
    assert rows[1].split("│")[5].strip() == "-"
    assert main(["runs", str(tmp_path), "--metric", "val_acc"]) == 2
    err = capsys.readouterr().err
    assert "--metric: no run" in err and "val_accuracy" in err
