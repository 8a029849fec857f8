"""Seeing a run: TensorBoard files, the HTML report and its plots, the runs list, `check --plot`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_plan, write_plan
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stagewise.cli import main
from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.plan.load import load_plan
from stagewise.track.plots import compare_figure, loss_figure, plan_lr_figure
from stagewise.track.runs import find_runs, load_run

STAGES = [
    {"name": "warm", "optimizer": {"name": "adamw", "lr": 3e-3},
     "schedule": {"name": "warmup_constant", "warmup": 5}, "steps": 20, "eval": {"every": 10}},
    {"name": "sgd", "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "steps": 20},
]
SPANS = [("warm", 0, 20), ("sgd", 20, 40)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    root = tmp_path_factory.mktemp("report")
    path = write_plan(root, tiny_plan(corpus, STAGES))
    train(prepare(load_plan(path), path, root / "cache"), root / "runs" / "two")
    return root / "runs" / "two"


def _copy(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("stages", "tensorboard", "*.png", "*.html"))
    return dest


def _rewrite(path: Path, records: list[dict[str, Any]], torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn, encoding="utf-8")


def _stopped_copy(run_dir: Path, dest: Path, at_step: int) -> Path:
    """The run as if killed at `at_step` of the second stage: logs cut there, a torn last line."""
    _copy(run_dir, dest)
    events = read_jsonl(dest / "events.jsonl")
    cut = next(i for i, e in enumerate(events) if e["event"] == "stage_start" and e["stage"] == "sgd")
    _rewrite(dest / "events.jsonl", events[:cut + 1])
    metrics = [m for m in read_jsonl(dest / "metrics.jsonl") if m["step"] <= at_step]
    _rewrite(dest / "metrics.jsonl", metrics, torn='{"kind": "train", "st')
    return dest


def test_tensorboard_scalars_match_metrics(run_dir: Path) -> None:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    train_lines = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tok_per_s", "val/loss", "val/ppl",
            "stage/warm/train/loss", "stage/sgd/val/loss"} <= tags
    loss = acc.Scalars("train/loss")
    assert [s.step for s in loss] == [m["step"] for m in train_lines]
    assert [s.value for s in loss] == pytest.approx([m["loss"] for m in train_lines], rel=1e-5)
    assert [s.step for s in acc.Scalars("val/loss")] == [m["step"] for m in evals]
    assert [s.step for s in acc.Scalars("stage/sgd/train/lr")] == [m["step"] for m in train_lines
                                                                    if m["stage"] == "sgd"]
    # events are text at their step: the hand-off into `sgd` sits at its first step
    resets = acc.Tensors("events/optimizer_reset/text_summary")
    assert [r.step for r in resets] == [0, 20]


def test_loss_plot_has_a_band_per_stage_and_a_marker_per_decision(run_dir: Path) -> None:
    ax = loss_figure(load_run(run_dir)).axes[0]
    bands = [p for p in ax.patches if (p.get_gid() or "").startswith("stage:")]
    assert [(p.get_gid(), p.get_bbox().x0, p.get_bbox().x1) for p in bands] == \
           [(f"stage:{n}", a, b) for n, a, b in SPANS]
    assert {"warm", "sgd"} <= {t.get_text() for t in ax.texts}
    markers = [line for line in ax.get_lines() if (line.get_gid() or "").startswith("event:")]
    assert [(m.get_gid(), m.get_xdata()[0]) for m in markers] == [("event:optimizer_reset", 0),
                                                                  ("event:optimizer_reset", 20)]
    lines = {line.get_label(): line for line in ax.get_lines()}
    evals = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "eval"]
    assert list(lines["val loss"].get_xdata()) == [m["step"] for m in evals] == [10, 20, 40]


def test_later_decisions_and_unknown_events_are_marked(run_dir: Path, tmp_path: Path) -> None:
    run = _copy(run_dir, tmp_path / "decided")
    with (run / "events.jsonl").open("a", encoding="utf-8") as f:
        for e in ({"event": "rule_fired", "stage": "sgd", "step": 25, "rule": "spike"},
                  {"event": "guard_rollback", "stage": "sgd", "step": 25, "to_step": 20},
                  {"event": "lr_probe", "stage": "sgd", "step": 30}):
            f.write(json.dumps({**e, "time": 0.0}) + "\n")
    ax = loss_figure(load_run(run)).axes[0]
    markers = [line.get_gid() for line in ax.get_lines() if (line.get_gid() or "").startswith("event:")]
    assert markers == ["event:optimizer_reset"] * 2 + ["event:rule_fired", "event:guard_rollback", "event:lr_probe"]
    assert len({line.get_marker() for line in ax.get_lines() if line.get_gid() in markers}) == 4
    assert " lr_probe" in {t.get_text() for t in ax.texts}  # an unknown event is named on the plot
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "rule_fired" in page and "to_step=20" in page


def test_reused_stage_is_marked_and_listed_as_reused(run_dir: Path, tmp_path: Path) -> None:
    """A run whose first stage came from the stage cache: no stage_start/end, one stage_reused."""
    run = _copy(run_dir, tmp_path / "reusing")
    events = read_jsonl(run / "events.jsonl")
    first_sgd = next(i for i, e in enumerate(events) if e.get("stage") == "sgd")
    reused = {"event": "stage_reused", "time": events[1]["time"], "stage": "warm", "step": 0, "steps": 20}
    _rewrite(run / "events.jsonl", events[:1] + [reused] + events[first_sgd:])
    _rewrite(run / "metrics.jsonl", [m for m in read_jsonl(run / "metrics.jsonl") if m["stage"] == "sgd"])
    loaded = load_run(run)
    assert [(r.name, r.status) for r in loaded.stage_rows()] == [("warm", "reused"), ("sgd", "trained")]
    assert loaded.done_stages == ["warm", "sgd"]
    ax = loss_figure(loaded).axes[0]
    assert [p.get_gid() for p in ax.patches] == ["stage:warm", "stage:sgd"]
    assert [line.get_gid() for line in ax.get_lines() if (line.get_gid() or "").startswith("event:")] == \
           ["event:stage_reused", "event:optimizer_reset"]


def test_report_page_is_self_contained_with_every_stage(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    for name in ("warm", "sgd"):
        assert f"<td>{name}</td>" in page
    assert page.count("<td>trained</td>") == 2 and "<td>adamw lr=3.00e-03</td>" in page and "<td>causal_lm</td>" in page
    assert page.count("src='data:image/png;base64,") == 4
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched: no link, script or stylesheet
    assert "name: tiny" in page  # the resolved plan
    for name in ("loss", "lr", "throughput", "grad_norm"):
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert "complete" in page and "stopped at" not in page


def test_report_of_several_runs_overlays_one_line_per_run(run_dir: Path, tmp_path: Path) -> None:
    other = _copy(run_dir, tmp_path / "variant")
    fig = compare_figure([load_run(run_dir), load_run(other)])
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines()] == ["two", "variant"]
    out = tmp_path / "cmp"
    assert main(["report", str(run_dir), str(other), "--out", str(out)]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "2 runs compared" in page and page.count("data:image/png;base64,") == 1
    assert "<td>two</td>" in page and "<td>variant</td>" in page
    assert (out / "compare.png").is_file()


def test_runs_lists_complete_interrupted_and_failed(run_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    _copy(run_dir, root / "done")
    events = read_jsonl(run_dir / "events.jsonl")
    assert events[-1]["event"] == "plan_end"
    _rewrite(_copy(run_dir, root / "killed") / "events.jsonl", events[:-1])
    failed = {"event": "plan_failed", "time": events[-1]["time"], "plan": "tiny", "error": "RuntimeError: boom"}
    _rewrite(_copy(run_dir, root / "broken") / "events.jsonl", events[:-1] + [failed])
    (root / ".cache").mkdir()  # not a run: skipped
    assert {r.name: r.state for r in find_runs(root)} == {"broken": "failed", "done": "complete",
                                                          "killed": "interrupted"}
    assert main(["runs", str(root)]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if "│" in line
            and line.split()[1] in ("done", "killed", "broken")}
    assert "complete" in rows["done"] and "2/2" in rows["done"]
    assert "interrupted" in rows["killed"] and "failed" in rows["broken"]
    best = min(m["val_loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "eval")
    last = datetime.fromtimestamp(events[-1]["time"])
    assert f"{best:.4f}" in rows["done"] and f"{last:%Y-%m-%d %H:%M} (just now)" in rows["done"]


def test_runs_tells_a_run_training_now_from_one_killed(tmp_path: Path, corpus: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # A process training holds the run's lock; a killed one's lock is freed by the OS, whatever
    # its logs say.
    path = write_plan(tmp_path, tiny_plan(corpus, [{"name": "long", "optimizer": {"name": "adamw", "lr": 1e-3},
                                                    "steps": 100000}], threads=1))
    run = tmp_path / "runs" / "live"
    child = subprocess.Popen([sys.executable, "-m", "stagewise", "train", str(path), "--out", str(run),
                              "--cache", str(tmp_path / "cache")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / "events.jsonl").is_file() or not any(
                e["event"] == "stage_start" for e in read_jsonl(run / "events.jsonl")):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert load_run(run).state == "running"
        assert main(["runs", str(tmp_path / "runs")]) == 0
        assert "running" in next(line for line in capsys.readouterr().out.splitlines() if "live" in line)
    finally:
        child.kill()
        child.wait()
    assert load_run(run).state == "interrupted"


def test_stopped_run_still_reports_where(run_dir: Path, tmp_path: Path) -> None:
    run = _stopped_copy(run_dir, tmp_path / "stopped", at_step=25)
    assert load_run(run).state == "interrupted"
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "stopped at step 25 in stage &#x27;sgd&#x27;" in page
    assert "<td>trained</td>" in page and "<td>stopped at step 25</td>" in page
    ax = loss_figure(load_run(run)).axes[0]
    assert len([p for p in ax.patches if (p.get_gid() or "").startswith("stage:")]) == 2


def test_failed_run_report_names_the_error(run_dir: Path, tmp_path: Path) -> None:
    run = _stopped_copy(run_dir, tmp_path / "failed", at_step=30)
    with (run / "events.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "plan_failed", "time": 1.0, "plan": "tiny", "error": "ValueError: <nan>"}) + "\n")
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "failed: stopped at step 30 in stage &#x27;sgd&#x27;: ValueError: &lt;nan&gt;" in page


def test_bad_input_is_one_line(tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    no_metrics = _copy(run_dir, tmp_path / "no_metrics")
    (no_metrics / "metrics.jsonl").unlink()
    for argv, message in ((["report", str(tmp_path / "empty")], "not a run directory"),
                          (["report", str(no_metrics)], "no metrics.jsonl"),
                          (["runs", str(tmp_path / "nowhere")], "no such directory")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_check_plot_writes_the_planned_lr_curve(tmp_path: Path, corpus: Path) -> None:
    plan = write_plan(tmp_path, tiny_plan(corpus, STAGES))
    png = tmp_path / "plots" / "lr.png"
    assert main(["check", str(plan), "--plot", str(png), "--cache", str(tmp_path / "cache")]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    ax = plan_lr_figure(prepare(load_plan(plan), plan, tmp_path / "cache").resolved).axes[0]
    assert [(p.get_gid(), p.get_bbox().x0, p.get_bbox().x1) for p in ax.patches] == \
           [(f"stage:{n}", a, b) for n, a, b in SPANS]
    (curve,) = ax.get_lines()
    assert list(curve.get_xdata()) == list(range(1, 41))  # update k at step k, as in metrics.jsonl
    assert curve.get_ydata()[0] == pytest.approx(3e-3 / 6) and curve.get_ydata()[-1] == pytest.approx(0.1)


def test_report_and_runs_from_python_are_what_the_commands_show(run_dir: Path, tmp_path: Path) -> None:
    import stagewise

    root = tmp_path / "runs"
    _copy(run_dir, root / "done")
    events = read_jsonl(run_dir / "events.jsonl")
    _rewrite(_copy(run_dir, root / "nested" / "killed") / "events.jsonl", events[:-1])
    listed = stagewise.runs(root)
    assert {(r.name, r.state, len(r.done_stages), len(r.planned_stages)) for r in listed} == \
        {("done", "complete", 2, 2), ("killed", "interrupted", 2, 2)}
    best = min(m["val_loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "eval")
    assert next(r for r in listed if r.name == "done").best("val_loss") == best
    page = stagewise.report(str(root / "done"), out=tmp_path / "page")
    assert page == tmp_path / "page" / "report.html" and "<td>warm</td>" in page.read_text(encoding="utf-8")
    compared = stagewise.report([root / "done", root / "nested" / "killed"])
    assert compared == root / "done" / "report.html" and "2 runs compared" in compared.read_text(encoding="utf-8")
    with pytest.raises(stagewise.UserError, match="no such directory"):
        stagewise.runs(tmp_path / "nowhere")


def test_the_page_is_titled_by_the_plan_and_shows_regularization_and_short_decisions(tmp_path: Path,
                                                                                     corpus: Path) -> None:
    stages = [{**STAGES[0], "regularization": {"l2": 0.01, "dropout": 0.1}},
              {**STAGES[1], "until": {"plateau": {"patience": 0, "min_delta": 100.0}}, "eval": {"every": 5}}]
    path = write_plan(tmp_path, tiny_plan(corpus, stages, name="shakespeare"))
    run = tmp_path / "runs" / "attempt-3"
    train(prepare(load_plan(path), path, tmp_path / "cache"), run)
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "<title>shakespeare</title>" in page and "<h1>shakespeare (attempt-3)</h1>" in page
    assert "<td>l2=0.01 dropout=0.1</td>" in page  # the first stage's; the second sets none
    assert page.count("<td>-</td>") >= 1
    # the decisions table (the plateau's early stop) prints its floats to 4 significant digits
    decisions = page.split("<h2>Decisions</h2>")[1].split("</table>")[0]
    floats = re.findall(r"\d+\.\d+", decisions)
    assert floats and all(len(f.replace(".", "").lstrip("0")) <= 4 for f in floats), decisions
