"""What resuming and the stage cache cost, on the demo plan (examples/demo.yaml) and its model.

Measured through the command line, as a user runs it, with one token cache warmed first:

  full run        `stagewise train` of the whole plan into a new run directory
  edited rerun    the same run after editing only the last stage (its decay shape): the earlier
                  stages come from the stage cache, the last one trains again. Three different
                  edits, one after another (this machine's speed drifts by ~10% over minutes);
                  edit_last_stage_cost_ratio = median edited rerun wall time / full run wall time;
                  last_stage_share = the last stage's training time / full run wall time (from the
                  full run's own stage_end event). Target: ratio <= share + 0.05.
  restart         a run of another variant of the last stage, SIGKILLed right after its first
                  mid-stage checkpoint, then started again: seconds from the new process's start to
                  its first resumed update (python start-up, imports, data, checkpoint load, step)
  checkpoint      size on disk of a mid-stage checkpoint of the demo model with Muon's state, and
                  in-process save / load times (median of --repeats)

    .venv/bin/python benchmarks/resume.py            # the demo as is: ~8 minutes on 2 cores
    .venv/bin/python benchmarks/resume.py --scale 0.2  # every stage at a fifth of its steps
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import write_results
from rich.console import Console
from rich.table import Table

from stagewise.engine.checkpoint import load_checkpoint, save_checkpoint
from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.optim.optimizers import build_optimizer
from stagewise.plan.load import load_plan

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "examples" / "demo.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "resume.json"
STAGEWISE = [sys.executable, "-m", "stagewise"]
TOLERANCE = 0.05
EDITS = ("schedule.shape=linear", "schedule.shape=cosine", "schedule.min_lr=1.0e-5")  # each a new stage key


def train(run_dir: Path, cache: Path, overrides: list[str]) -> float:
    """Wall seconds of one `stagewise train` process."""
    started = time.perf_counter()
    subprocess.run([*STAGEWISE, "train", str(PLAN), *overrides, "--out", str(run_dir), "--cache", str(cache)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    return [e for e in read_jsonl(path) if e["event"] == name] if path.exists() else []


def restart_seconds(run_dir: Path, cache: Path, overrides: list[str], stage: str) -> tuple[float, int]:
    """Kill a run right after the last stage's first mid-stage checkpoint; time the restart to
    its first resumed update (log.every=1 makes every update a metrics line)."""
    args = [*STAGEWISE, "train", str(PLAN), *overrides, "--out", str(run_dir), "--cache", str(cache)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any(e["stage"] == stage and not e["final"] for e in events(run_dir, "checkpoint_saved")):
        if proc.poll() is not None:
            raise RuntimeError("the run ended before its first mid-stage checkpoint")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    started = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = None
    while resumed is None:
        found = [e for e in events(run_dir, "stage_resumed") if e["time"] >= started - 1]
        resumed = found[0]["stage_step"] if found else None
        time.sleep(0.02)
    while not any(m["kind"] == "train" and m["stage"] == stage and m["stage_step"] == resumed + 1
                  for m in read_jsonl(run_dir / "metrics.jsonl")):
        time.sleep(0.02)
    seconds = time.time() - started
    proc.kill()  # the rest of the stage is not measured
    proc.wait()
    return seconds, resumed


def checkpoint_costs(cache: Path, scale_overrides: list[str], repeats: int, tmp: Path) -> dict[str, Any]:
    """Size and save/load time of a mid-stage checkpoint of the demo model with Muon's state."""
    plan = load_plan(PLAN, scale_overrides)
    prepared = prepare(plan, PLAN, cache)
    stage = next(s for s in prepared.resolved if s.optimizer == "muon")
    model = prepared.root
    optimizer = build_optimizer(stage.optimizer, stage.optimizer_settings, model)
    for p in model.parameters():  # one update, so every moment buffer exists
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    saves, loads = [], []
    for i in range(repeats):
        directory = tmp / f"step-{i}"
        started = time.perf_counter()
        save_checkpoint(directory, model, state, {"key": "bench", "stage": stage.name, "step": i})
        saves.append(time.perf_counter() - started)
        started = time.perf_counter()
        load_checkpoint(directory, "bench", model)
        loads.append(time.perf_counter() - started)
    files = {f.name: f.stat().st_size for f in (tmp / "step-0").iterdir()}
    return {"bytes": sum(files.values()), "files": files, "parameters": sum(p.numel() for p in model.parameters()),
            "save_s": round(statistics.median(saves), 4), "load_s": round(statistics.median(loads), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (default 1: the demo)")
    parser.add_argument("--repeats", type=int, default=5, help="checkpoint save/load repeats (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 100))
    plan = load_plan(PLAN)
    scale = [f"stages.{s.name}.steps={max(2, round(s.steps * args.scale))}" for s in plan.stages if s.steps]
    last = plan.stages[-1].name
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stagewise-resume-") as tmp_name:
        tmp = Path(tmp_name)
        cache = tmp / "cache"
        subprocess.run([*STAGEWISE, "check", str(PLAN), *scale, "--cache", str(cache)], check=True,
                       stdout=subprocess.DEVNULL)  # the token cache, so no run below pays for it
        console.print(f"full run of {PLAN.name} ({', '.join(scale) or 'as is'}) ...")
        full = train(tmp / "run", cache, scale)
        ends = {e["stage"]: e["seconds"] for e in events(tmp / "run", "stage_end")}
        share = ends[last] / full
        reruns = []
        for edit in EDITS:
            console.print(f"edited rerun (stages.{last}.{edit}) ...")
            edit_started = time.time()
            seconds = train(tmp / "run", cache, [*scale, f"stages.{last}.{edit}"])
            reused = [e["stage"] for e in events(tmp / "run", "stage_reused") if e["time"] >= edit_started]
            trained = [e["seconds"] for e in events(tmp / "run", "stage_end") if e["time"] >= edit_started]
            reruns.append({"edit": edit, "wall_s": round(seconds, 2), "stage_s": trained[0], "reused": reused})
        edited = statistics.median(r["wall_s"] for r in reruns)
        console.print("kill and restart ...")
        variant = [*scale, f"stages.{last}.schedule.min_lr=2.0e-5", "log.every=1",
                   f"checkpoint.every={max(1, round(plan.stages[-1].steps * args.scale) // 3)}"]
        restart, resumed_at = restart_seconds(tmp / "restart", cache, variant, last)
        console.print("checkpoint save/load ...")
        ckpt = checkpoint_costs(cache, scale, args.repeats, tmp / "ckpt")
    wall = time.perf_counter() - started

    ratio = edited / full
    table = Table(title=f"resume and stage cache: {PLAN.name}, steps x{args.scale}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("full run", f"{full:.1f} s")
    table.add_row(f"last stage ('{last}') share of it", f"{share:.3f}")
    table.add_row("rerun after editing the last stage (median of 3)",
                  f"{edited:.1f} s ({', '.join(str(r['wall_s']) for r in reruns)})")
    table.add_row("edit_last_stage_cost_ratio", f"{ratio:.3f} (target <= {share + TOLERANCE:.3f})")
    table.add_row(f"restart to first resumed update (stage step {resumed_at + 1})", f"{restart:.2f} s")
    table.add_row(f"checkpoint size ({ckpt['parameters']:,} parameters + Muon state)", f"{ckpt['bytes'] / 1e6:.2f} MB")
    table.add_row("checkpoint save / load", f"{ckpt['save_s'] * 1000:.0f} / {ckpt['load_s'] * 1000:.0f} ms")
    console.print(table)
    meets = ratio <= share + TOLERANCE
    console.print(f"edit_last_stage_cost_ratio {ratio:.3f} vs last_stage_share {share:.3f} + {TOLERANCE}: "
                  + ("ok" if meets else "ABOVE TARGET"))
    report = {
        "edit_last_stage_cost_ratio": round(ratio, 4), "last_stage_share": round(share, 4),
        "target": f"edit_last_stage_cost_ratio <= last_stage_share + {TOLERANCE}", "meets_target": meets,
        "full_run_s": round(full, 2), "edited_rerun_s": round(edited, 2), "reruns": reruns,
        "stage_seconds_full_run": ends, "restart_to_first_step_s": round(restart, 3),
        "restart_resumed_at_stage_step": resumed_at, "checkpoint": ckpt,
        "settings": {"plan": str(PLAN.relative_to(ROOT)), "scale": args.scale, "overrides": scale,
                     "edits": [f"stages.{last}.{e}" for e in EDITS]},
        "wall_s": round(wall, 1),
    }
    write_results(args.out, report, "resume.py", argv)
    console.print(f"wrote {args.out} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
