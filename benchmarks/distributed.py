"""Data-parallel throughput: the same plan (same global batch) trained by 1 process and by 2
(torchrun, gloo), one thread each, tokens/s of the whole run as rank 0 logs it.

Rounds alternate 1 and 2 processes so that the machine's other load falls on both alike; the
figure per round is the median tokens/s of the metrics lines after the first (which includes
start-up and the first allocations). Results: benchmarks/results/distributed.json.

    .venv/bin/python benchmarks/distributed.py                 # ~8 minutes on 2 busy cores
    .venv/bin/python benchmarks/distributed.py --rounds 1 --steps 60

On a multi-GPU node, the same plan at N processes (NCCL; the plan's device: auto picks CUDA):
    torchrun --nproc-per-node 8 --standalone -m stagewise train PLAN.yaml --out runs/dp8
and the metrics lines' tok_per_s against a 1-process run of the same plan.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from common import write_results
from rich.console import Console
from rich.table import Table

from stagewise.track.logs import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results" / "distributed.json"


def plan(steps: int, width: int) -> dict[str, Any]:
    """A GPT-2 of 4 layers and `width`, batch 16 x 128 tokens (8 per rank at 2 processes)."""
    return {
        "name": "distributed", "seed": 1337, "precision": "fp32", "compile": False, "threads": 1,
        "model": {"arch": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": width, "n_positions": 128},
        "tokenizer": {"kind": "char"},
        "data": {"train": str(SHAKESPEARE), "val_fraction": 0.1},
        "log": {"every": 10},
        "stages": [{"name": "adamw", "optimizer": {"name": "adamw", "lr": 1.0e-3}, "steps": steps,
                    "batch": {"size": 16}, "eval": {"batches": 1}}],
    }


def run(plan_path: Path, out: Path, processes: int) -> float:
    """Median tokens/s of one run (`processes` 1: no torchrun, as a user runs one process)."""
    launch = (["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--standalone"]
              if processes > 1 else [])
    command = [sys.executable, *launch, "-m", "stagewise", "train", str(plan_path), "--out", str(out), "--fresh",
               "--cache", str(out.parent / ".cache")]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    rates = [m["tok_per_s"] for m in read_jsonl(out / "metrics.jsonl") if m["kind"] == "train"]
    return statistics.median(rates[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args(argv)

    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.yaml"
        path.write_text(yaml.safe_dump(plan(args.steps, args.width), sort_keys=False))
        for _ in range(args.rounds):
            for processes in (1, 2):
                rates[processes].append(run(path, Path(tmp) / f"p{processes}", processes))
    median = {p: statistics.median(r) for p, r in rates.items()}
    table = Table(title=f"data parallel on this machine: GPT-2 4x{args.width}, batch 16 x 128 tokens, "
                        f"{args.steps} steps, 1 thread per process")
    for col in ("processes", "tokens/s (median)", "rounds", "speed-up"):
        table.add_column(col, justify="right")
    for p in (1, 2):
        table.add_row(str(p), f"{median[p]:,.0f}", ", ".join(f"{r:,.0f}" for r in rates[p]),
                      f"{median[p] / median[1]:.2f}x")
    Console().print(table)
    write_results(RESULTS, {"model": f"gpt2 4x{args.width}", "batch": "16 x 128 tokens (8 per rank at 2)",
                            "steps": args.steps, "rounds": {str(p): r for p, r in rates.items()},
                            "tokens_per_s": {str(p): m for p, m in median.items()},
                            "speedup_2": median[2] / median[1]}, "distributed.py", argv)


if __name__ == "__main__":
    main()
