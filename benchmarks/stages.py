"""What to do instead of a cooldown: a small GPT on tinyshakespeare trained at a constant LR,
then finished four ways at equal training steps N, per seed:

  constant      the constant-LR stage's own end (N updates): the reference the others improve on
  cooldown      a branch from the constant stage at 0.8 N, its LR decayed to 0 along 1-sqrt for the
                last 0.2 N updates (AdamW's state carried): the usual WSD recipe
  merge         a merge stage: the uniform mean of the constant stage's last K checkpoints (every
                0.2 N / (K - 1) updates, so over the same last 20%), no updates (WSM)
  merge_linear  the same checkpoints, the i-th oldest weighing i
  ema           the constant stage trained again with an EMA of its weights (`average: {ema}`),
                evaluated and ended on it
  schedulefree  schedule-free AdamW (`schedulefree_adamw`) at the same peak LR and warmup, no
                schedule, ended on its averaged weights

One plan per seed holds them all as branches, so the constant stage is trained once per seed and
the cooldown and the merges start from it (the stage cache); ema and schedulefree are stages of
their own (`from: init`: the same initial weights, but their own data order, which a stage's name
decides). Results go to benchmarks/results/stages.json: the final validation loss of each variant
per seed, their mean, the training steps, and the plan.

    .venv/bin/python benchmarks/stages.py                   # ~5 minutes on 1 thread
    .venv/bin/python benchmarks/stages.py --steps 300 --seeds 1  # shorter
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import write_results
from rich.console import Console
from rich.table import Table

from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_plan import train
from stagewise.plan.load import load_plan

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results" / "stages.json"
VARIANTS = ("constant", "cooldown", "merge", "merge_linear", "ema", "schedulefree")
MERGED = 5  # checkpoints a merge averages
EMA = 0.99  # an EMA horizon of ~100 updates: about the last 20-25% of the default 400

ADAMW = {"name": "adamw", "lr": 2e-3, "betas": [0.9, 0.99], "weight_decay": 0.1}
SCHEDULE = {"name": "warmup_constant", "warmup": 50}


def plan_for(seed: int, steps: int) -> dict[str, Any]:
    decay = steps // 5
    every = decay // (MERGED - 1)
    stable = {"optimizer": ADAMW, "schedule": SCHEDULE, "steps": steps}
    return {
        "name": f"stages-{seed}", "seed": seed, "precision": "fp32", "compile": False, "threads": 1,
        "model": {"arch": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64},
        "tokenizer": {"kind": "char"},
        "data": {"train": str(SHAKESPEARE), "val_fraction": 0.1},
        "defaults": {"batch": {"size": 16, "block_size": 64}, "eval": {"every": decay, "batches": 40}},
        "log": {"every": 50},
        "checkpoint": {"every": every, "keep": 2},
        "stages": [
            {"name": "constant", **copy.deepcopy(stable)},
            {"name": "cooldown", "from": f"constant@{steps - decay}", "optimizer": {"handoff": "carry"},
             "schedule": {"name": "decay", "shape": "1-sqrt"}, "steps": decay},
            {"name": "merge", "from": "constant", "merge": {"last": MERGED}},
            {"name": "merge_linear", "from": "constant", "merge": {"last": MERGED, "weights": "linear"}},
            {"name": "ema", "from": "init", **copy.deepcopy(stable), "average": {"ema": EMA}},
            {"name": "schedulefree", "from": "init", "optimizer": {**ADAMW, "name": "schedulefree_adamw"},
             "schedule": SCHEDULE, "steps": steps},
        ],
    }


def run_seed(seed: int, steps: int, work: Path) -> dict[str, Any]:
    path = work / f"stages-{seed}.yaml"
    path.write_text(yaml.safe_dump(plan_for(seed, steps), sort_keys=False), encoding="utf-8")
    prepared = prepare(load_plan(path), path, work / "cache")
    started = time.perf_counter()
    summaries = train(prepared, work / f"run-{seed}", console=Console(file=io.StringIO()))
    return {"val_loss": {s.stage: s.val_loss for s in summaries}, "seconds": round(time.perf_counter() - started, 1),
            "updates": {s.stage: s.steps for s in summaries}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training updates of every variant (default 400)")
    parser.add_argument("--seeds", type=int, default=2, help="plan seeds 1337, 1338, ... (default 2)")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs and the stage cache here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not SHAKESPEARE.is_file():
        parser.error(f"needs {SHAKESPEARE}")
    if args.steps < 100 or args.steps % 20:
        parser.error("--steps: a multiple of 20, at least 100")
    console = Console(width=max(Console().width, 100))
    seeds = [1337 + i for i in range(args.seeds)]
    runs: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="stagewise-stages-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            console.print(f"seed {seed} ...")
            runs[seed] = run_seed(seed, args.steps, work)
    val = {v: {str(seed): round(runs[seed]["val_loss"][v], 4) for seed in seeds} for v in VARIANTS}
    mean = {v: round(statistics.fmean(val[v].values()), 4) for v in VARIANTS}
    table = Table(title=f"val loss after {args.steps} training updates (tinyshakespeare, char-level)")
    for col in ("variant", *[f"seed {s}" for s in seeds], "mean", "vs constant"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in VARIANTS:
        table.add_row(v, *[f"{val[v][str(s)]:.4f}" for s in seeds], f"{mean[v]:.4f}", f"{mean[v] - mean['constant']:+.4f}")
    console.print(table)
    report = {
        "val_loss": val, "mean": mean,
        # along each variant's path: cooldown = 0.8 N constant + 0.2 N decay; a merge adds none
        "training_steps": {v: args.steps for v in VARIANTS},
        "updates_per_stage": runs[seeds[0]]["updates"],
        "seconds_per_seed": {str(s): runs[s]["seconds"] for s in seeds},
        "settings": {"steps": args.steps, "merged_checkpoints": MERGED, "ema": EMA, "plan": plan_for(seeds[0], args.steps)},
    }
    write_results(args.out, report, "stages.py", argv)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
