"""What prefix sharing saves a search: 8 variants of a cooldown stage (its LR, sampled log-uniform)
under one shared stable stage, searched with `stagewise search`, against 8 independent full runs
(what a flat hyperparameter search of the whole plan would train). Compute is counted in training
steps, from the trials' events.jsonl (stage_start: the steps each trained stage ran).

  steps_spent  what the search trained
  steps_ideal  the stable stage once + 8 cooldowns
  steps_naive  8 x (stable + cooldown)

Target: steps_spent within 10% of steps_ideal. Results go to benchmarks/results/search.json.

    .venv/bin/python benchmarks/search.py               # ~2 minutes on 2 cores
    .venv/bin/python benchmarks/search.py --workers 2   # two worker processes on one study
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from common import write_results
from rich.console import Console
from rich.table import Table

from stagewise.engine.run_logs import read_jsonl
from stagewise.tuning.run_search import SearchOptions, search

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results" / "search.json"
TRIALS = 8


def plan_for(corpus: Path, stable: int, cooldown: int) -> dict[str, Any]:
    """A tiny GPT (2 x 64) on characters: warmup-stable, then a cooldown that keeps AdamW's moments."""
    return {
        "name": "search-bench", "seed": 1337, "precision": "fp32",
        "model": {"arch": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64},
        "tokenizer": {"kind": "char"}, "data": {"train": str(corpus), "val_fraction": 0.1},
        "defaults": {"batch": {"size": 12}, "eval": {"batches": 10}}, "log": {"every": 50},
        "stages": [
            {"name": "stable", "optimizer": {"name": "adamw", "lr": 2e-3},
             "schedule": {"name": "warmup_constant", "warmup": 20}, "steps": stable},
            {"name": "cooldown", "optimizer": {"handoff": "carry"}, "schedule": {"name": "decay", "shape": "1-sqrt"},
             "steps": cooldown},
        ],
    }


def trained_steps(out: Path) -> dict[str, int]:
    """Steps trained per stage name over every trial (a resumed stage counts only what it ran)."""
    steps: dict[str, int] = {}
    for log in sorted(out.glob("trials/*/events.jsonl")):
        for e in read_jsonl(log):
            if e["event"] == "stage_start":
                steps[e["stage"]] = steps.get(e["stage"], 0) + e["steps"] - e["stage_step"]
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stable", type=int, default=300, help="steps of the shared stage (default 300)")
    parser.add_argument("--cooldown", type=int, default=60, help="steps of each cooldown (default 60)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not SHAKESPEARE.is_file():
        parser.error(f"needs {SHAKESPEARE}")
    console = Console(width=max(Console().width, 100))
    with tempfile.TemporaryDirectory(prefix="stagewise-search-") as tmp:
        work = Path(tmp)
        plan = work / "plan.yaml"
        plan.write_text(yaml.safe_dump(plan_for(SHAKESPEARE, args.stable, args.cooldown), sort_keys=False))
        space = work / "space.yaml"
        space.write_text(yaml.safe_dump({"stages.cooldown.optimizer.lr": {"float": [1e-4, 3e-3], "log": True}}))
        started = time.perf_counter()
        result = search(plan, SearchOptions(space=space, trials=TRIALS, workers=args.workers, out=work / "search",
                                            pruner="none", sampler="random"), Console(file=io.StringIO()))
        seconds = time.perf_counter() - started
        per_stage = trained_steps(work / "search")
    spent = sum(per_stage.values())
    ideal = args.stable + TRIALS * args.cooldown
    naive = TRIALS * (args.stable + args.cooldown)
    table = Table(title=f"{TRIALS} cooldown variants under one stable stage ({args.workers} worker(s))")
    for col in ("", "training steps", "vs ideal"):
        table.add_column(col, justify="left" if not col else "right")
    for name, steps in (("search (spent)", spent), ("ideal: stable + 8 cooldowns", ideal),
                        ("8 independent full runs", naive)):
        table.add_row(name, f"{steps:,}", f"{steps / ideal:.2f}x")
    console.print(table)
    states = [r.state for r in result.rows]
    console.print(f"{len(states)} trials ({states.count('complete')} complete) in {seconds:.0f}s; stages trained: "
                  + ", ".join(f"{k} {v}" for k, v in per_stage.items()))
    report = {"steps_spent": spent, "steps_ideal": ideal, "steps_naive": naive,
              "spent_over_ideal": round(spent / ideal, 4), "within_10_percent_of_ideal": spent <= 1.1 * ideal,
              "steps_by_stage": per_stage, "trials": len(states), "completed": states.count("complete"),
              "seconds": round(seconds, 1), "workers": args.workers,
              "values": [r.value for r in result.rows],
              "settings": {"stable": args.stable, "cooldown": args.cooldown, "trials": TRIALS}}
    write_results(args.out, report, "search.py", argv, optuna=optuna.__version__)
    console.print(f"wrote {args.out}")
    return 0 if report["within_10_percent_of_ideal"] else 1


if __name__ == "__main__":
    sys.exit(main())
