"""The report of a branched plan (`from: stable@10`): each path through the stage tree is its own
series, sharing its parent's curve up to the fork and never going back in step; stage bands in
lanes that never overlap; the console's summary table and the generated sample on the page. And
the planned LR, on a log scale in the terminal when the stages' LRs span decades."""

from __future__ import annotations

import json
import shutil
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_plan, write_plan
from matplotlib.figure import Figure
from rich.console import Console

from stagewise.cli import main
from stagewise.engine.prepare_run import prepare
from stagewise.engine.progress import StageSummary, summary_table
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.plan.load import load_plan
from stagewise.track.plan_view import lr_chart
from stagewise.track.plots import compare_figure, loss_figure, plan_lr_figure, series_figure
from stagewise.track.report import run_figures
from stagewise.track.runs import load_run

STAGES = [
    {"name": "stable", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 20, "eval": {"every": 5}},
    {"name": "cooldown", "optimizer": {"handoff": "carry"}, "schedule": {"name": "decay", "shape": "1-sqrt"},
     "steps": 10, "eval": {"every": 5}},
    {"name": "sgd", "from": "stable@10", "optimizer": {"name": "sgd", "lr": 0.3, "momentum": 0.9}, "steps": 15,
     "eval": {"every": 5}},
]
FORK = 10


@pytest.fixture(scope="module")
def branched(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, list[StageSummary]]:
    root = tmp_path_factory.mktemp("branched")
    path = write_plan(root, tiny_plan(corpus, STAGES, sample={"prompt": "ROMEO:", "max_tokens": 24}))
    summaries = train(prepare(load_plan(path), path, root / "cache"), root / "run", console=Console(quiet=True))
    return root / "run", summaries


def _series(fig: Figure) -> dict[str, Any]:
    """The plotted series (gid series:<path>) by label."""
    return {line.get_label(): line for ax in fig.axes for line in ax.get_lines()
            if (line.get_gid() or "").startswith("series:")}


def _metrics(run: Path, kind: str, stage: str, key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == kind and m["stage"] == stage]


def test_branch_series_never_go_back_in_step(branched: tuple[Path, list[StageSummary]]) -> None:
    run_dir, _ = branched
    run = load_run(run_dir)
    for name, fig in run_figures(run).items():
        series = _series(fig)
        assert len(series) == (4 if name == "loss" else 2), (name, list(series))
        for label, line in series.items():
            steps = list(line.get_xdata())
            assert steps == sorted(set(steps)), (name, label, steps)  # strictly increasing


def test_a_branch_shares_its_parents_curve_up_to_the_fork(branched: tuple[Path, list[StageSummary]]) -> None:
    run_dir, _ = branched
    series = _series(loss_figure(load_run(run_dir)))
    assert set(series) == {"stable → cooldown: train loss", "stable → cooldown: val loss",
                           "stable@10 → sgd: train loss", "stable@10 → sgd: val loss"}
    for kind, key, what in (("train", "loss", "train loss"), ("eval", "val_loss", "val loss")):
        stable, cooldown, sgd = (_metrics(run_dir, kind, s, key) for s in ("stable", "cooldown", "sgd"))
        main, branch = series[f"stable → cooldown: {what}"], series[f"stable@10 → sgd: {what}"]
        assert list(zip(main.get_xdata(), main.get_ydata())) == stable + cooldown
        assert list(zip(branch.get_xdata(), branch.get_ydata())) == [p for p in stable if p[0] <= FORK] + sgd
        assert min(s for s, _ in sgd) > FORK  # the branch's own points come after the fork
    lr = _series(series_figure(load_run(run_dir), "lr", "learning rate"))
    assert lr["stable@10 → sgd"].get_ydata()[-1] == pytest.approx(0.3)


def test_stage_bands_do_not_overlap(branched: tuple[Path, list[StageSummary]]) -> None:
    run_dir, _ = branched
    for fig in (*run_figures(load_run(run_dir)).values(),
                plan_lr_figure(prepare(load_plan(run_dir.parent / "plan.yaml"), run_dir.parent / "plan.yaml",
                                       run_dir.parent / "cache").resolved)):
        bands = {p.get_gid(): p.get_bbox() for ax in fig.axes for p in ax.patches
                 if (p.get_gid() or "").startswith("stage:")}
        assert set(bands) == {"stage:stable", "stage:cooldown", "stage:sgd"}
        assert (bands["stage:sgd"].x0, bands["stage:sgd"].x1) == (FORK, FORK + 15)
        for (a, p), (b, q) in combinations(bands.items(), 2):
            x_apart = p.x1 <= q.x0 or q.x1 <= p.x0
            y_apart = p.y1 <= q.y0 or q.y1 <= p.y0
            assert x_apart or y_apart, (a, p, b, q)


def test_planned_lr_is_a_line_per_branch(branched: tuple[Path, list[StageSummary]]) -> None:
    run_dir, _ = branched
    plan = run_dir.parent / "plan.yaml"
    series = _series(plan_lr_figure(prepare(load_plan(plan), plan, run_dir.parent / "cache").resolved))
    main, branch = series["stable → cooldown"], series["stable@10 → sgd"]
    assert list(main.get_xdata()) == list(range(1, 31))
    assert list(branch.get_xdata()) == list(range(1, FORK + 1)) + list(range(FORK + 1, FORK + 16))
    assert list(branch.get_ydata()[:FORK]) == list(main.get_ydata()[:FORK])
    assert set(branch.get_ydata()[FORK:]) == {0.3}


def test_several_branched_runs_compared_stay_in_step(branched: tuple[Path, list[StageSummary]],
                                                     tmp_path: Path) -> None:
    run_dir, _ = branched
    other = shutil.copytree(run_dir, tmp_path / "other", ignore=shutil.ignore_patterns("stages", "tensorboard"))
    fig = compare_figure([load_run(run_dir), load_run(other)])
    for ax in fig.axes:  # train loss, val loss
        series = [line for line in ax.get_lines() if (line.get_gid() or "").startswith("series:")]
        assert sorted(line.get_label() for line in series) == ["other: stable → cooldown", "other: stable@10 → sgd",
                                                               "run: stable → cooldown", "run: stable@10 → sgd"]
        for line in series:
            assert list(line.get_xdata()) == sorted(set(line.get_xdata())), line.get_label()


def test_a_rollback_sets_the_steps_it_went_back_over_apart(branched: tuple[Path, list[StageSummary]],
                                                           tmp_path: Path) -> None:
    """Lines of a rollback's second attempt follow the first attempt's: the series keeps the
    trajectory the weights took, the abandoned stretch is drawn apart."""
    run_dir, _ = branched
    copy = shutil.copytree(run_dir, tmp_path / "rolled", ignore=shutil.ignore_patterns("stages", "tensorboard"))
    metrics = read_jsonl(copy / "metrics.jsonl")
    last = max(i for i, m in enumerate(metrics) if m["stage"] == "stable")
    again = [{**m, "attempt": 1, "loss": m["loss"] + 1.0} for m in metrics
             if m["stage"] == "stable" and m["kind"] == "train" and m["step"] > 5]
    metrics[last + 1:last + 1] = again
    (copy / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    fig = loss_figure(load_run(copy))
    main = _series(fig)["stable → cooldown: train loss"]
    assert list(main.get_xdata()) == sorted(set(main.get_xdata()))
    ys = dict(zip(main.get_xdata(), main.get_ydata()))
    assert all(ys[m["step"]] == m["loss"] for m in again)  # the second attempt's values
    abandoned = [line for line in fig.axes[0].get_lines() if line.get_gid() == "abandoned"]
    assert abandoned and list(abandoned[0].get_xdata()) == [5, 10, 15, 20]  # from where it was left


def test_report_shows_the_summary_table_and_the_sample(branched: tuple[Path, list[StageSummary]]) -> None:
    run_dir, summaries = branched
    sample = (run_dir / "sample.txt").read_text(encoding="utf-8")
    assert sample.startswith("ROMEO:") and len(sample) > len("ROMEO:")
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "<h2>Summary</h2>" in page and "<h2>Sample</h2>" in page
    assert sample.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;") \
        .replace('"', "&quot;") in page
    # the console's table, rebuilt from the logs: the same cells but the time (logged rounded)
    columns, console = summary_table(summaries)
    _, logged = summary_table(load_run(run_dir).summaries())
    time = columns.index("time")
    assert [row[:time] + row[time + 1:] for row in logged] == [row[:time] + row[time + 1:] for row in console]
    for row in console:
        assert f"<td>{row[0]}</td><td>{row[1]}</td><td class=n>{row[2]}</td><td class=n>{row[3]}</td>" in page


def test_terminal_lr_chart_is_log_scale_when_lrs_span_decades(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "adamw", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 40},
              {"name": "sgd", "optimizer": {"name": "sgd", "lr": 0.3}, "steps": 40}]
    path = write_plan(tmp_path, tiny_plan(corpus, stages))
    chart = lr_chart(prepare(load_plan(path), path, tmp_path / "cache").resolved, width=40, height=8)
    rows, labels = chart[:-1], [float(r.split()[0]) for r in chart[:-1]]
    assert labels[0] == pytest.approx(0.3, rel=0.01) and labels[-1] == pytest.approx(1e-3, rel=0.01)
    ratios = [a / b for a, b in zip(labels, labels[1:])]
    assert ratios == pytest.approx([ratios[0]] * 7, rel=0.02) and ratios[0] > 2  # geometric: a log axis
    bars = [r[10:] for r in rows]
    assert all(bars[-1][c] == "█" for c in range(20))  # AdamW at 1e-3 shows: the bottom row, not a blank
    assert all(bars[0][c] == "█" for c in range(20, 40)) and all(bars[0][c] != "█" for c in range(20))

    same = [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 40},
            {"name": "b", "optimizer": {"name": "adamw", "lr": 5e-4}, "steps": 40}]
    path = write_plan(tmp_path, tiny_plan(corpus, same), "same.yaml")
    linear = [float(r.split()[0]) for r in lr_chart(prepare(load_plan(path), path, tmp_path / "cache").resolved,
                                                      width=40, height=8)[:-1]]
    assert [a - b for a, b in zip(linear, linear[1:])] == pytest.approx([1e-3 / 8] * 7, rel=0.02)  # linear
