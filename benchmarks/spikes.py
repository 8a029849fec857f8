"""What the divergence guard buys: a small GPT on tinyshakespeare with a loss spike injected,
trained four ways from the same seed, final validation loss of each.

  clean        no fault, no guard: the run the others try to match
  no_guard     an LR burst (x10 for 20 updates, as a bad schedule edit or a bad-node step would
               give) and nothing watching
  rollback     the same burst; the guard sees the loss spike before the next update, goes back to
               the last checkpoint before it and skips the next 50 batches (PaLM's recipe)
  rollback_lr  as rollback, and the LR x0.5 from then on

The fault is one-time (a rollback does not replay it), as a transient fault is. Results go to
benchmarks/results/spikes.json with the keys clean, no_guard, rollback, rollback_lr.

    .venv/bin/python benchmarks/spikes.py            # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/spikes.py --steps 300  # shorter
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import write_results
from rich.console import Console
from rich.table import Table

from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.plan.load import load_plan

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results" / "spikes.json"

# nanoGPT's CPU "baby GPT" shape (4 layers, 4 heads, 128 wide, block 64, batch 12).
BASE: dict[str, Any] = {
    "name": "spikes", "seed": 1337, "precision": "fp32",
    "model": {"arch": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 64},
    "tokenizer": {"kind": "char"},
    "data": {"train": str(SHAKESPEARE), "val_fraction": 0.1},
    "log": {"every": 10},
    "checkpoint": {"every": 50, "keep": 3},
}
GUARD = {"spike": {"metric": "loss", "factor": 1.3, "window": 50, "warmup": 100}, "action": "rollback",
         "max_retries": 3}
WAYS: dict[str, dict[str, Any]] = {
    "clean": {},
    "no_guard": {"fault": True},
    "rollback": {"fault": True, "guard": {**GUARD, "rollback": {"skip_batches": 50}}},
    "rollback_lr": {"fault": True, "guard": {**GUARD, "rollback": {"skip_batches": 50, "lr_scale": 0.5}}},
}


def plan_for(way: dict[str, Any], steps: int, burst_at: int) -> dict[str, Any]:
    stage: dict[str, Any] = {
        "name": "train", "optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1},
        "schedule": {"name": "warmup_cosine", "warmup": 100, "min_lr": 1e-4},
        "batch": {"size": 12, "block_size": 64}, "steps": steps, "eval": {"batches": 50},
    }
    if way.get("fault"):
        stage["inject"] = [{"at": burst_at, "kind": "lr_burst", "factor": 10.0, "steps": 20}]
    if "guard" in way:
        stage["guard"] = way["guard"]
    return {**copy.deepcopy(BASE), "stages": [stage]}


def run_way(name: str, way: dict[str, Any], steps: int, burst_at: int, work: Path) -> dict[str, Any]:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan_for(way, steps, burst_at), sort_keys=False), encoding="utf-8")
    prepared = prepare(load_plan(path), path, work / "cache")
    started = time.perf_counter()
    summary = train(prepared, work / name, console=Console(file=io.StringIO()))[-1]
    events = read_jsonl(work / name / "events.jsonl")
    train_losses = [m["loss"] for m in read_jsonl(work / name / "metrics.jsonl") if m["kind"] == "train"]
    return {"val_loss": summary.val_loss, "seconds": round(time.perf_counter() - started, 1),
            "peak_train_loss_after_fault": max(train_losses[burst_at // 10:], default=None),
            "rollbacks": [{k: e[k] for k in ("stage_step", "to_stage_step", "reason")}
                          for e in events if e["event"] == "guard_rollback"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="updates per run (default 600)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not SHAKESPEARE.is_file():
        parser.error(f"needs {SHAKESPEARE}")
    burst_at = args.steps // 2
    console = Console(width=max(Console().width, 100))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="stagewise-spikes-") as tmp:
        for name, way in WAYS.items():
            console.print(f"{name} ...")
            results[name] = run_way(name, way, args.steps, burst_at, Path(tmp))
    table = Table(title=f"LR burst x10 for 20 updates at update {burst_at} of {args.steps}")
    for col in ("run", "final val loss", "vs clean", "peak train loss after the fault", "rollbacks", "time"):
        table.add_column(col, justify="left" if col == "run" else "right")
    clean = results["clean"]["val_loss"]
    for name, r in results.items():
        table.add_row(name, f"{r['val_loss']:.4f}", f"{r['val_loss'] - clean:+.4f}",
                      f"{r['peak_train_loss_after_fault']:.3f}", str(len(r["rollbacks"])), f"{r['seconds']:.0f}s")
    console.print(table)
    report = {
        **{name: round(r["val_loss"], 4) for name, r in results.items()},
        "details": results,
        "settings": {"plan": plan_for(WAYS["rollback_lr"], args.steps, burst_at), "burst_at": burst_at},
    }
    write_results(args.out, report, "spikes.py", argv)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
