"""Using a trained run: find a finished stage, copy its export, run it on a prompt, evaluate it on
a file. These read only the stage's export (tasks.export) and the run's `plan.yaml`, for the
stage's data settings (columns, max_len, batch size, beam); what a task does with them is its
spec's (config.registry), so evaluating the stage's validation file gives its own final metrics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stagewise.config.data_config import DataConfig
from stagewise.config.registry import TASKS
from stagewise.errors import UserError
from stagewise.tasks.export import MARKER, TrainedStage
from stagewise.tasks.labels import LabelMap
from stagewise.tasks.spec import GenerateOptions, task_spec
from stagewise.tasks.traits import EvaluatesFiles, Generates

COUNTS = tuple(dict.fromkeys(spec.traits.counts for spec in TASKS.values()))  # what `evaluate` counts, by task


def _plan(run: Path) -> dict[str, Any]:
    plan_file = run / "plan.yaml"
    if not plan_file.is_file():
        raise UserError(str(run), "not a run directory (no plan.yaml)")
    return yaml.safe_load(plan_file.read_text(encoding="utf-8"))


def stage_dir(run: Path, stage: str | None) -> Path:
    """The export of `stage` (default: the plan's last stage that has one)."""
    names = [s["name"] for s in _plan(run)["stages"]]
    done = [n for n in names if (run / "stages" / n / MARKER).is_file()]
    if stage is None:
        if not done:
            raise UserError(str(run), "no stage has finished yet")
        return run / "stages" / done[-1]
    if stage not in done:
        what = "has not finished" if stage in names else "is not a stage of this run"
        raise UserError("--stage", f"'{stage}' {what} (finished: {', '.join(done) or 'none'})")
    return run / "stages" / stage


def open_stage(run: Path, stage: str | None) -> TrainedStage:
    """The finished `stage` (default: the last), with its task and labels from its export's
    marker and its data settings from the run's plan."""
    directory = stage_dir(run, stage)
    plan = _plan(run)
    # Only the data part is validated (for its defaults): the rest of the plan is not needed, and
    # its data paths are relative to the original plan's directory, not the run's.
    config = next(s for s in plan["stages"] if s["name"] == directory.name)
    try:
        data = DataConfig.model_validate(config.get("data") or plan["data"])
    except ValidationError as e:
        raise UserError(str(run / "plan.yaml"), f"stage '{directory.name}': data: {e.errors()[0]['msg']}") from None
    marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    spec = task_spec(marker["task"], str(directory / MARKER))
    labels = None
    if marker.get("labels") is not None:
        labels = LabelMap.from_state_dict({"labels": marker["labels"], "kind": spec.traits.label_kind}, str(directory / MARKER))
    return TrainedStage(directory, spec, labels, data, config["batch"]["size"], config["eval"]["beam"],
                        tuple(config["eval"].get("metrics") or ()))


def export(run: Path, stage: str | None, to: Path) -> tuple[str, Path]:
    """Copy the stage's export (default: the last finished stage) to `to`, which must not exist
    yet, without stagewise's marker; returns the stage's name and `to`."""
    source = stage_dir(run, stage)
    if to.exists():
        raise UserError("--to", f"{to} already exists (exporting never overwrites)")
    shutil.copytree(source, to, ignore=shutil.ignore_patterns(MARKER))
    return source.name, to


def _check_beam(stage: TrainedStage, given: bool) -> None:
    if given and not stage.spec.traits.beam_search:
        which = " and ".join(t.name for t in TASKS.values() if t.traits.beam_search)
        raise UserError("--beam", f"only {which} stages decode with a beam ('{stage.name}' is {stage.task})")


def generate(stage: TrainedStage, prompt: str, opts: GenerateOptions = GenerateOptions()) -> str:
    """What the stage's model makes of `prompt`: a sampled continuation (causal_lm, sft), the
    predicted label and its probability (classify), a translation (seq2seq, greedy when beam is
    1) or word/TAG pairs (tag)."""
    _check_beam(stage, opts.beam != 1)
    if not stage.spec.traits.samples and (opts.messages is not None or opts.stop):
        which = " and ".join(t.name for t in TASKS.values() if t.traits.samples)
        raise UserError("--chat" if opts.messages is not None else "--stop",
                        f"only {which} stages continue text ('{stage.name}' is {stage.task})")
    if not stage.spec.traits.samples and not prompt.strip():
        raise UserError("--prompt", f"a {stage.task} stage needs a text to work on")
    if not isinstance(stage.spec, Generates):
        raise UserError("generate", f"task {stage.task} generates nothing (stage '{stage.name}'): use its model")
    return stage.spec.generate(stage, prompt, opts)


def evaluate(stage: TrainedStage, data: Path, fmt: str | None = None, beam: int | None = None) -> dict[str, Any]:
    """The task's metrics on `data`, a file like the stage's own (its columns as the plan names
    them), named as in the run's logs without `val_` (loss, accuracy, bleu, ...), and how many
    tokens / examples / sentences were scored. `fmt`: csv, tsv or jsonl for table files (default:
    told by the extension, as training tells it); `beam`: seq2seq's decoding (default: the
    stage's eval.beam)."""
    if fmt is not None and not stage.spec.traits.table_files:
        which = " and ".join(t.name for t in TASKS.values() if t.traits.table_files)
        raise UserError("--format", f"only for {which} files ({stage.task} files have one format)")
    _check_beam(stage, beam is not None)
    if not isinstance(stage.spec, EvaluatesFiles):
        raise UserError("evaluate", f"task {stage.task} evaluates no files (stage '{stage.name}'): use its model")
    metrics, count = stage.spec.evaluate_file(stage, data, fmt, beam or stage.beam)
    names = {"val_ppl": "perplexity"}
    return {**{names.get(k, k.removeprefix("val_")): v for k, v in metrics.items()}, stage.spec.traits.counts: count}
