"""Whole-process wall time of `stagewise train examples/nanogpt.yaml` against nanoGPT's own
`train.py` (benchmarks/nanogpt, unchanged) at the same settings, at a short run: 300 updates by
default, where what surrounds the training (start-up, evaluation, checkpoint, export, sample,
summary) weighs most.

Both train nanoGPT's CPU baby GPT (4 layers, 4 heads, 128 wide, block 64, batch 12, no biases,
dropout 0; AdamW 1e-3, betas (0.9, 0.99), weight decay 0.1, 100 warmup steps then cosine to 1e-4
over the run, grad clip 1.0) on tinyshakespeare's characters in fp32, eager, on the same number
of threads (--threads: OMP_NUM_THREADS for both). Each does what it does by itself:

  stagewise  the plan with stages.train.steps=N: validation on 20 windows at 250 and at the end,
             the final checkpoint, the export (RUN/stages/train), a 200-character sample, the
             summary table; its token cache is filled by the warm-up run (nanoGPT's data is
             prepared beforehand too)
  nanoGPT    train.py with max_iters N-1 (N updates), eval_interval 250, eval_iters 20 (train and
             val at 0 and at 250), its checkpoint at 250, a loss line per iteration

The two alternate (A B A B ...) after one warm-up run each, and the ratio is taken pair by pair,
so a slow spell of a shared machine hits both. Recorded per run: wall and CPU seconds, the
training part with its evaluations (stagewise: its stage_end `seconds`; nanoGPT: the sum of its
iteration times) and so the fixed part, and the load: the cores other processes kept busy during the run (/proc/stat)
and the load average at its start.

    .venv/bin/python benchmarks/nanogpt_wall.py                      # 5 pairs, ~4 minutes on 2 idle cores
    .venv/bin/python benchmarks/nanogpt_wall.py --steps 2000 --pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import write_results
from gpu_check import NANOGPT, char_data
from rich.console import Console
from rich.table import Table

from stagewise.engine.cpu_load import cpu_times

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "examples" / "nanogpt.yaml"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results" / "nanogpt_wall.json"
ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")
# nanoGPT's baby GPT as examples/nanogpt.yaml declares it, in train.py's arguments
NANOGPT_SETTINGS = {"dataset": "shakespeare_char", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64,
                    "batch_size": 12, "bias": False, "dropout": 0.0, "learning_rate": 1e-3, "min_lr": 1e-4,
                    "beta2": 0.99, "weight_decay": 0.1, "warmup_iters": 100, "grad_clip": 1.0,
                    "gradient_accumulation_steps": 1, "eval_interval": 250, "eval_iters": 20, "log_interval": 1,
                    "always_save_checkpoint": False, "device": "cpu", "dtype": "float32", "compile": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="updates of each run (default 300)")
    parser.add_argument("--pairs", type=int, default=5, help="timed pairs after one warm-up run each (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both (default 1)")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="tinyshakespeare.txt")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    console = Console(width=140)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="nanogpt-wall-") as tmp:
        work = Path(tmp)
        for name in ("train.py", "model.py", "configurator.py"):
            shutil.copy(NANOGPT / name, work / name)
        vocab = char_data(args.data, work / "data" / "shakespeare_char")
        commands = {"stagewise": lambda: stagewise_run(work, args.data, args.steps, env),
                    "nanogpt": lambda: nanogpt_run(work, args.steps, env)}
        for name, run in commands.items():
            console.print(f"warm-up: {name} ({run()['wall_s']} s)")
        pairs = []
        for i in range(args.pairs):
            pair = {name: run() for name, run in commands.items()}
            pair["ratio"] = round(pair["stagewise"]["wall_s"] / pair["nanogpt"]["wall_s"], 4)
            pair["ratio_cpu"] = round(pair["stagewise"]["cpu_s"] / pair["nanogpt"]["cpu_s"], 4)
            pairs.append(pair)
            console.print(f"pair {i + 1}: stagewise {pair['stagewise']['wall_s']} s, nanoGPT {pair['nanogpt']['wall_s']} s, "
                          f"ratio {pair['ratio']} (CPU {pair['ratio_cpu']}); other processes {pair['stagewise']['foreign_cores']} / "
                          f"{pair['nanogpt']['foreign_cores']} cores")
    report = summarize(pairs, args, vocab["vocab_size"])
    print_table(console, report)
    write_results(args.out, report, "nanogpt_wall.py", argv)
    console.print(f"written to {args.out}")
    return 0


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run `command` to its end: its wall and CPU seconds, and the load around it."""
    load = os.getloadavg()[0]
    before, usage = cpu_times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after, used = cpu_times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (used.ru_utime - usage.ru_utime) + (used.ru_stime - usage.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{command[1]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    busy = (after[1] - before[1]) / os.sysconf("SC_CLK_TCK") / max(after[0] - before[0], 1e-9) if before and after else None
    return done, {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load_average_at_start": round(load, 2),
                  "foreign_cores": round(max(0.0, busy - cpu / wall), 2) if busy is not None else None}


def stagewise_run(work: Path, data: Path, steps: int, env: dict[str, str]) -> dict[str, Any]:
    out = work / "run"
    _, times = timed([sys.executable, "-m", "stagewise", "train", str(PLAN), f"stages.train.steps={steps}",
                      f"data.train={data}", "--out", str(out), "--cache", str(work / "cache"), "--fresh"], ROOT, env)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    start = next(e for e in events if e["event"] == "plan_start")
    end = next(e for e in events if e["event"] == "stage_end")
    assert end["step"] == steps and start["threads"] == int(env["OMP_NUM_THREADS"]), (end, start)
    return {**times, "training_s": round(end["seconds"], 2), "fixed_s": round(times["wall_s"] - end["seconds"], 2),
            "train_loss": end["train_loss"], "val_loss": end["val_loss"]}


def nanogpt_run(work: Path, steps: int, env: dict[str, str]) -> dict[str, Any]:
    settings = {**NANOGPT_SETTINGS, "out_dir": str(work / "out"), "max_iters": steps - 1, "lr_decay_iters": steps}
    done, times = timed([sys.executable, "train.py", *(f"--{k}={v}" for k, v in settings.items())], work, env)
    iters = [(int(m[1]), float(m[2])) for m in map(ITER.match, done.stdout.splitlines()) if m]
    assert len(iters) == steps, f"nanoGPT made {len(iters)} updates, not {steps}"
    training = sum(ms for _, ms in iters) / 1000
    return {**times, "training_s": round(training, 2), "fixed_s": round(times["wall_s"] - training, 2)}


def summarize(pairs: list[dict[str, Any]], args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    def median(side: str, key: str) -> float:
        return round(statistics.median(p[side][key] for p in pairs), 2)

    def spread(key: str) -> dict[str, float]:
        ratios = [p[key] for p in pairs]
        return {"median": round(statistics.median(ratios), 4), "min": min(ratios), "max": max(ratios)}

    wall = spread("ratio")
    return {"steps": args.steps, "threads": args.threads, "pairs": pairs, "nanogpt_vocab_size": vocab_size,
            "ratio_wall": wall, "ratio_cpu": spread("ratio_cpu"),
            "median": {side: {key: median(side, key) for key in ("wall_s", "cpu_s", "training_s", "fixed_s")}
                       for side in ("stagewise", "nanogpt")},
            "foreign_cores": {"median": median("stagewise", "foreign_cores"),
                              "max": max(p[s]["foreign_cores"] or 0 for p in pairs for s in ("stagewise", "nanogpt"))},
            "goal": {"ratio_wall": 1.0, "met": wall["median"] <= 1.0}}


def print_table(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=f"{report['steps']} updates, {report['threads']} thread(s), {len(report['pairs'])} pairs (medians)")
    for column in ("", "wall s", "CPU s", "training s", "fixed s"):
        table.add_column(column, justify="right")
    for side in ("stagewise", "nanogpt"):
        m = report["median"][side]
        table.add_row(side, *(f"{m[k]:.2f}" for k in ("wall_s", "cpu_s", "training_s", "fixed_s")))
    console.print(table)
    r, c = report["ratio_wall"], report["ratio_cpu"]
    console.print(f"wall ratio stagewise / nanoGPT: median {r['median']:.3f} (pairs {r['min']:.3f}-{r['max']:.3f}), "
                  f"CPU {c['median']:.3f} ({c['min']:.3f}-{c['max']:.3f}); "
                  f"other processes kept {report['foreign_cores']['median']} cores busy (median, max "
                  f"{report['foreign_cores']['max']})")


if __name__ == "__main__":
    sys.exit(main())
