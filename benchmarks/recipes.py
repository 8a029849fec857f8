"""The reference recipes of examples/, run as they are, with every stage's final metrics:

  classification.yaml  BiGRU on SMS spam: accuracy and macro-F1 (and the majority baseline)
  ulmfit.yaml          a small GPT pretrained on the SMS text, fine-tuned as a classifier with
                       gradual unfreezing and discriminative LRs: the same metrics, same split
  translation.yaml     a Transformer on English -> French, one-stage Adam + cosine against
                       Adam -> SGD (SWATS LR) -> cosine anneal: BLEU and chrF of both

Results go to benchmarks/results/recipes.json.

    .venv/bin/python benchmarks/recipes.py                    # all three, ~15 minutes on 2 cores
    .venv/bin/python benchmarks/recipes.py classification     # one of them
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import write_results
from rich.console import Console
from rich.table import Table

from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_plan import train
from stagewise.plan.load import load_plan
from stagewise.tasks.classify import majority_accuracy

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("classification", "ulmfit", "translation")
RESULTS = ROOT / "benchmarks" / "results" / "recipes.json"


def run_recipe(name: str, work: Path) -> dict[str, Any]:
    path = ROOT / "examples" / f"{name}.yaml"
    prepared = prepare(load_plan(path), path, work / "cache")
    started = time.perf_counter()
    summaries = train(prepared, work / name, console=Console(file=io.StringIO()))
    report: dict[str, Any] = {"wall_s": round(time.perf_counter() - started, 1), "stages": {}}
    for summary, setup in zip(summaries, [s.setup for s in prepared.stages], strict=True):
        report["stages"][summary.stage] = {"task": setup.task, "steps": summary.steps,
                                           "seconds": round(summary.seconds, 1),
                                           **{k: round(v, 4) for k, v in summary.metrics.items()}}
        if setup.task == "classify":
            report["majority_accuracy"] = round(majority_accuracy(setup.data), 4)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", default=list(RECIPES), help=", ".join(RECIPES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for name in args.recipes:
        if name not in RECIPES:
            parser.error(f"no recipe '{name}' (known: {', '.join(RECIPES)})")
    console = Console(width=max(Console().width, 100))
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="stagewise-recipes-") as tmp:
        for name in args.recipes:
            console.print(f"{name} ...")
            report[name] = run_recipe(name, Path(tmp))
    table = Table(title="reference recipes (examples/), final evaluation of each stage")
    for col in ("recipe", "stage", "task", "steps", "time", "val loss", "metrics"):
        table.add_column(col, justify="left" if col in ("recipe", "stage", "task", "metrics") else "right")
    for name, result in report.items():
        for stage, m in result["stages"].items():
            shown = ", ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in m.items()
                              if k.startswith("val_") and k not in ("val_loss", "val_ppl"))
            table.add_row(name, stage, m["task"], str(m["steps"]), f"{m['seconds']:.0f}s", f"{m['val_loss']:.4f}",
                          shown or "-")
        if "majority_accuracy" in result:
            table.add_row(name, "(majority class)", "", "", "", "", f"accuracy {result['majority_accuracy']:.4f}")
    console.print(table)
    write_results(args.out, report, "recipes.py", argv)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
