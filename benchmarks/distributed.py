"""Data-parallel throughput: the same plan (same global batch) trained by 1 process and by 2
(torchrun, gloo; DDP and FSDP2), one thread each, tokens/s of the whole run as rank 0 logs it,
and the peak resident memory of the largest process.

Rounds alternate the methods so that the machine's other load falls on all alike; the figure per
round is the median tokens/s of the metrics lines after the first (which includes start-up and the
first allocations). Results: benchmarks/results/distributed.json.

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

from stagewise.engine.run_logs import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results" / "distributed.json"
METHODS = {"1": (1, "ddp"), "2 ddp": (2, "ddp"), "2 fsdp": (2, "fsdp")}  # name: (processes, strategy)
# Runs a command and prints the peak RSS (KiB) of its largest descendant: torchrun's workers.
PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


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


def run(plan_path: Path, out: Path, processes: int) -> tuple[float, float]:
    """Median tokens/s of one run and its largest process's peak RSS in MB (`processes` 1: no
    torchrun, as a user runs one process)."""
    launch = (["-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--standalone"]
              if processes > 1 else [])
    command = [sys.executable, *launch, "-m", "stagewise", "train", str(plan_path), "--out", str(out), "--fresh",
               "--cache", str(out.parent / ".cache")]
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], check=True, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak_mb = int(done.stdout.split()[-1]) / 1024
    rates = [m["tok_per_s"] for m in read_jsonl(out / "metrics.jsonl") if m["kind"] == "train"]
    return statistics.median(rates[1:]), peak_mb


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args(argv)

    rates: dict[str, list[float]] = {m: [] for m in METHODS}
    peaks: dict[str, list[float]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for strategy in ("ddp", "fsdp"):
            planned = plan(args.steps, args.width)
            if strategy == "fsdp":
                planned["distributed"] = {"strategy": "fsdp"}
            paths[strategy] = Path(tmp) / f"{strategy}.yaml"
            paths[strategy].write_text(yaml.safe_dump(planned, sort_keys=False))
        for _ in range(args.rounds):
            for method, (processes, strategy) in METHODS.items():
                rate, peak = run(paths[strategy], Path(tmp) / method.replace(" ", "-"), processes)
                rates[method].append(rate)
                peaks[method].append(peak)
    median = {m: statistics.median(r) for m, r in rates.items()}
    peak = {m: statistics.median(p) for m, p in peaks.items()}  # the first round also tokenizes the corpus
    table = Table(title=f"data parallel on this machine: GPT-2 4x{args.width}, batch 16 x 128 tokens, "
                        f"{args.steps} steps, 1 thread per process")
    for col in ("processes", "tokens/s (median)", "rounds", "speed-up", "peak RSS per process"):
        table.add_column(col, justify="right")
    for m in METHODS:
        table.add_row(m, f"{median[m]:,.0f}", ", ".join(f"{r:,.0f}" for r in rates[m]),
                      f"{median[m] / median['1']:.2f}x", f"{peak[m]:,.0f} MB")
    Console().print(table)
    write_results(RESULTS, {"model": f"gpt2 4x{args.width}", "batch": "16 x 128 tokens (8 per rank at 2)",
                            "steps": args.steps, "rounds": rates, "tokens_per_s": median,
                            "speedup_2": median["2 ddp"] / median["1"], "speedup_2_fsdp": median["2 fsdp"] / median["1"],
                            "peak_rss_mb": peak}, "distributed.py", argv)

if __name__ == "__main__":
    main()
