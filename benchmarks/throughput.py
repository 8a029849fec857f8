"""Training throughput of a stagewise stage against a hand-written PyTorch loop and HF `Trainer`.

The same GPT-2 (n_layer 4, n_embd 256, n_head 4: 3.2M parameters with the char vocabulary), batch
(16 x 128 tokens), data (tinyshakespeare, char tokenizer, prepared once by stagewise; the loop and
Trainer get exactly the stage's windows) and optimizer (AdamW, constant LR, no clipping) are
trained three ways in one process:

  stagewise  a one-stage plan (precision: bf16, compile: true) through the Python API; the plan's
             `attention: auto` picks eager attention, which inductor fuses
  loop       a nanoGPT-style loop: bf16 autocast, torch.compile (model + loss), fused AdamW, and the
             attention kernel that is fastest under compile on CPU (eager; `--loop-attn`)
  trainer    transformers.Trainer with its best CPU settings (bf16=True, use_cpu=True) and the
             model's default SDPA attention (`--trainer-attn`). Trainer's own `torch_compile=True`
             is slower with SDPA on this CPU (its backward kernel is opaque to inductor), so it is off.

How it is timed. A global optimizer-step post-hook sees every update of the three. By default the
three train *interleaved*: each runs in its own thread (stagewise in the main one) and a baton lets
exactly one of them compute at a time, handed on every TURN updates: stagewise 20 steps, loop 20,
Trainer 20, stagewise 20, ... A method's step time runs from its previous update (or from getting
the CPU back) to its update, so it holds everything its loop does per step (data, forward,
backward, optimizer, zero_grad, logging). On a shared machine the speed drifts by 10-20% over tens
of seconds (other processes, other VMs on the host); interleaved, a slow spell hits all three
alike instead of whichever happened to be running. The first `--warmup` updates of each method
(torch.compile, allocator warm-up) are dropped; tokens/s is timed steps x tokens per step / their
summed step time. `--sequential` runs the three one after another instead (same clock).

    .venv/bin/python benchmarks/throughput.py               # ~3.5 minutes on 2 cores
    .venv/bin/python benchmarks/throughput.py --quick       # a smoke run: a few steps each
    .venv/bin/python benchmarks/throughput.py --trainer-attn eager  # Trainer with eager attention
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from common import write_results
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from stagewise.data.prepare import PreparedData
from stagewise.data.sampler import WindowSampler
from stagewise.data.tokenizers import eos_id
from stagewise.engine.device import derive_seed, seed_everything
from stagewise.engine.prepare import prepare
from stagewise.engine.run import train
from stagewise.models.build import build_model
from stagewise.plan.load import load_plan
from stagewise.plan.schema import Plan
from stagewise.track.logs import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results" / "throughput.json"

# Dropout 0: nanoGPT's setting for pretraining. (At GPT-2's default 0.1, drawing the dropout masks
# costs ~100 ms of a ~330 ms step on this CPU, eager or compiled alike.)
MODEL = {"arch": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 128,
         "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
BATCH, BLOCK = 16, 128
TOKENS_PER_STEP = BATCH * BLOCK
LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.99), 0.1
SEED = 1337
STAGE = "train"
LOG_EVERY = 50  # stagewise's metrics interval: a grad-norm, a sync and two log writes per 50 steps
TURN = 20  # interleaved: updates a method makes before passing the CPU on (also the spread's unit)
TARGET = {"ratio_vs_trainer": 1.3, "ratio_vs_loop": 0.95}
METHODS = ("stagewise", "loop", "trainer")
DESCRIBED = {"stagewise": "plan: precision bf16, compile true, attention auto, adamw",
             "loop": "bf16 autocast, torch.compile, fused AdamW, {attn} attention",
             "trainer": "bf16=True, use_cpu=True, adamw_torch_fused, {attn} attention"}
HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --------------------------------------------------------------------------------------- timing

def cpu_sample() -> tuple[float, int, int]:
    """(wall time, jiffies the machine was busy, jiffies of this process); 0 where /proc is absent."""
    now = time.perf_counter()
    try:
        with open("/proc/stat", encoding="ascii") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return now, user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return now, 0, 0


def foreign_cores(a: tuple[float, int, int], b: tuple[float, int, int]) -> float:
    """CPU cores other processes kept busy, on average, between two samples."""
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / HZ / max(b[0] - a[0], 1e-9))


def wait_until_quiet(console: Console, max_wait: float, threshold: float = 0.2) -> float:
    """Wait (at most max_wait seconds) until other processes use under `threshold` cores."""
    started, told = time.perf_counter(), False
    while True:
        a = cpu_sample()
        time.sleep(1.0)
        load = foreign_cores(a, cpu_sample())
        waited = time.perf_counter() - started
        if load < threshold or waited >= max_wait:
            return waited
        if not told:
            console.print(f"  (other processes use {load:.2f} cores: waiting up to {max_wait:.0f}s for a quiet CPU)")
            told = True


class Baton:
    """Lets the methods' threads compute one at a time, in turn."""

    def __init__(self, names: list[str]) -> None:
        self._cond = threading.Condition()
        self._queue = list(names)  # whose turn it is: the first

    def wait_turn(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._queue[0] == name)

    def pass_on(self, name: str) -> None:
        with self._cond:
            if len(self._queue) > 1:
                self._queue.remove(name)
                self._queue.append(name)
                self._cond.notify_all()

    def leave(self, name: str) -> None:
        with self._cond:
            self._queue.remove(name)
            self._cond.notify_all()


class StepClock:
    """One method's step times: from its previous update, or from getting the CPU back, to its update."""

    def __init__(self, name: str, warmup: int, steps: int, baton: Baton | None) -> None:
        self.name, self.warmup, self.steps, self.baton = name, warmup, steps, baton
        self.durations: list[float] = []
        self.samples: list[tuple[float, int, int]] = []
        self.resumed: float | None = None

    def on_update(self) -> None:
        now = time.perf_counter()
        if self.resumed is not None:
            self.durations.append(now - self.resumed)
        self.samples.append(cpu_sample())
        done = len(self.samples)
        # The turn ends after the warm-up and then every TURN updates; after its last update a
        # method keeps the CPU for its tail (final eval, saving), when nobody is being timed.
        if (self.baton is not None and done >= self.warmup and (done - self.warmup) % TURN == 0
                and done < self.warmup + self.steps):
            self.baton.pass_on(self.name)
            self.baton.wait_turn(self.name)
        self.resumed = time.perf_counter()

    def result(self) -> dict[str, Any]:
        if len(self.samples) != self.warmup + self.steps:
            raise RuntimeError(f"{self.name}: expected {self.warmup + self.steps} optimizer steps, "
                               f"counted {len(self.samples)}")
        timed = self.durations[self.warmup - 1:]  # durations[i] is update i + 2's
        turns = [timed[i:i + TURN] for i in range(0, len(timed), TURN)]
        return {"tokens_per_s": len(timed) * TOKENS_PER_STEP / sum(timed),
                "median_step_ms": round(1000 * statistics.median(timed), 2),
                # the first step of a turn pays for the switch (caches, thread pools): its cost
                "first_of_turn_extra_ms": round(1000 * (statistics.median(t[0] for t in turns)
                                                        - statistics.median(timed)), 2),
                "turn_tokens_per_s": [round(len(t) * TOKENS_PER_STEP / sum(t), 1) for t in turns],
                "seconds_timed": round(sum(timed), 2)}


class Clocks:
    """The global optimizer-step post-hook, routed to the clock of the thread that stepped."""

    def __init__(self) -> None:
        self._by_thread: dict[int, StepClock] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[Clocks]:
        handle = register_optimizer_step_post_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()

    @contextlib.contextmanager
    def timing(self, clock: StepClock) -> Iterator[StepClock]:
        self._by_thread[threading.get_ident()] = clock
        try:
            yield clock
        finally:
            del self._by_thread[threading.get_ident()]

    def _hook(self, *_: Any) -> None:
        clock = self._by_thread.get(threading.get_ident())
        if clock is not None:
            clock.on_update()


# ----------------------------------------------------------------------------------- the methods

def write_plan(directory: Path, data: str, warmup: int, steps: int) -> Path:
    plan = {
        "name": "throughput", "seed": SEED, "device": "cpu", "precision": "bf16", "compile": True,
        "model": MODEL, "tokenizer": {"kind": "char"},
        "data": {"train": data, "val_fraction": 0.1},
        "log": {"every": LOG_EVERY},
        "stages": [{
            "name": STAGE,
            "optimizer": {"name": "adamw", "lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY},
            "schedule": {"name": "constant"},
            "batch": {"size": BATCH, "block_size": BLOCK},
            "eval": {"batches": 1},  # once, at the end of the stage, after the timed steps
            "steps": warmup + steps,
        }],
    }
    path = directory / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
    return path


def run_stagewise(clock: StepClock, plan_path: Path, run_dir: Path, cache: Path) -> dict[str, Any]:
    prepared = prepare(load_plan(plan_path), plan_path, cache)
    quiet = Console(file=io.StringIO(), force_terminal=False)  # plain log lines, discarded
    summaries = train(prepared, run_dir, fresh=True, console=quiet)
    # The engine's own tok_per_s of its log windows after the warm-up (wall clock: in interleaved
    # mode it includes the other methods' turns, so only a sequential run can compare it).
    lines = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "train"]
    windows = [(m["stage_step"] - p["stage_step"], m["tok_per_s"]) for p, m in zip(lines, lines[1:])
               if p["stage_step"] >= clock.warmup]
    logged = sum(n for n, _ in windows) / sum(n / v for n, v in windows) if windows else None
    return {"metrics_jsonl_tokens_per_s": logged and round(logged, 1), "final_train_loss": summaries[-1].train_loss,
            "attention": prepared.root.config._attn_implementation}


def fresh_model(plan: Plan, data: PreparedData, plan_dir: Path, attn: str) -> torch.nn.Module:
    """The model stagewise starts from: same config, same seed, same initial weights."""
    seed_everything(plan.seed)
    model = build_model(plan.model, data.vocab_size, eos_id(data.tokenizer), plan_dir)
    model.set_attn_implementation(attn)
    return model


def same_windows(data: PreparedData, plan: Plan) -> WindowSampler:
    """The sampler of the stage: the loop and Trainer see exactly stagewise's windows."""
    return WindowSampler(data.train, BLOCK, BATCH, seed=derive_seed(plan.seed, STAGE, "data"))


def adamw_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class LossModel(torch.nn.Module):
    """Model + loss as one module, so torch.compile sees the cross-entropy too (nanoGPT's shape)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def run_loop(clock: StepClock, plan: Plan, data: PreparedData, plan_dir: Path, attn: str) -> dict[str, Any]:
    model = fresh_model(plan, data, plan_dir, attn)
    model.train()
    optimizer = torch.optim.AdamW(adamw_groups(model), lr=LR, betas=BETAS, fused=True)
    step_loss = torch.compile(LossModel(model))
    sampler = same_windows(data, plan)
    for _ in range(clock.warmup + clock.steps):
        x, y = sampler.next_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step_loss(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"final_train_loss": loss.item()}


class Windows(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}  # the model shifts the labels


def run_trainer(clock: StepClock, plan: Plan, data: PreparedData, plan_dir: Path, out_dir: Path,
                attn: str) -> dict[str, Any]:
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    sampler = same_windows(data, plan)
    rows = torch.cat([sampler.next_batch()[0] for _ in range(clock.warmup + clock.steps)])  # the stage's windows
    args = TrainingArguments(
        output_dir=str(out_dir), seed=plan.seed,
        use_cpu=True, bf16=True,  # bf16 autocast through accelerate: the Trainer's best on CPU
        optim="adamw_torch_fused",  # the default in transformers 5
        per_device_train_batch_size=BATCH, max_steps=clock.warmup + clock.steps,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,  # as the others: no clipping
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
    )
    trainer = Trainer(model=fresh_model(plan, data, plan_dir, attn), args=args, train_dataset=Windows(rows))
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training dict
    return {"final_train_loss": trainer.train().training_loss}


# ------------------------------------------------------------------------------------------ main

def measure_round(runners: dict[str, Callable[[StepClock], dict[str, Any]]], methods: list[str],
                  warmup: int, steps: int, interleaved: bool) -> dict[str, dict[str, Any]]:
    """One round of the methods: interleaved step by step, or one after another."""
    clocks = Clocks()
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []
    baton = Baton(methods) if interleaved else None

    def one(method: str) -> None:
        clock = StepClock(method, warmup, steps, baton)
        try:
            if baton is not None:
                baton.wait_turn(method)
            sample = cpu_sample()
            with clocks.timing(clock):
                extra = runners[method](clock)
            results[method] = {**clock.result(), **extra,
                               "wall_s": round(time.perf_counter() - sample[0], 1)}
            if clock.samples:
                results[method]["foreign_cores"] = round(foreign_cores(clock.samples[warmup - 1], clock.samples[-1]), 3)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
        finally:
            if baton is not None:
                baton.leave(method)

    with clocks.installed():
        if interleaved:  # stagewise installs signal handlers: it has to be the main thread
            threads = [threading.Thread(target=one, args=(m,), name=f"bench-{m}", daemon=True)
                       for m in methods if m != "stagewise"]
            for t in threads:
                t.start()
            if "stagewise" in methods:
                one("stagewise")
            for t in threads:
                t.join()
        else:
            for m in methods:
                one(m)
    if errors:
        raise errors[0]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help=f"timed steps per method and round, a multiple of {TURN} (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; the medians are reported (default 1)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: 5 warm-up + {2 * TURN} timed steps")
    parser.add_argument("--sequential", action="store_true", help="run the methods one after another, "
                                                                  "not interleaved step by step")
    parser.add_argument("--loop-attn", choices=("sdpa", "eager"), default="eager",
                        help="the hand-written loop's attention (default eager: its fastest under compile)")
    parser.add_argument("--trainer-attn", choices=("sdpa", "eager"), default="sdpa",
                        help="Trainer's attention (default sdpa: the model's default)")
    parser.add_argument("--max-wait", type=float, default=30.0,
                        help="seconds to wait for a quiet CPU before each round (default 30)")
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--data", type=str, default=None, help="a text file (default: tinyshakespeare)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output (default: benchmarks/results/throughput.json)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 2 * TURN, 5, 1
    if args.steps < TURN or args.steps % TURN or args.warmup < 1 or args.repeats < 1:
        parser.error(f"need --steps a multiple of {TURN}, --warmup >= 1, --repeats >= 1")
    warnings.filterwarnings("ignore")
    console = Console(width=max(Console().width, 112))  # the table fits in a log file too

    if args.data:
        data_spec = str(Path(args.data).resolve())
    elif SHAKESPEARE.is_file():
        data_spec = str(SHAKESPEARE)
    else:
        data_spec = "{stdlib}/*.py"  # no shared data here: the interpreter's own sources
    mode = "sequential" if args.sequential else "interleaved"

    started = time.perf_counter()
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="stagewise-bench-") as tmp:
        work = Path(tmp)
        plan_path = write_plan(work, data_spec, args.warmup, args.steps)
        plan = load_plan(plan_path)
        prepared = prepare(plan, plan_path, work / "cache")  # the token stream all three train on
        data, params = prepared.data, sum(p.numel() for p in prepared.root.parameters())
        del prepared
        console.print(f"GPT-2 {params / 1e6:.2f}M params, vocab {data.vocab_size}, "
                      f"batch {BATCH}x{BLOCK}; {len(data.train):,} train tokens of {data_spec}; "
                      f"{args.warmup} warm-up + {args.steps} timed steps, {mode}, x {args.repeats}; "
                      f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for r in range(args.repeats):
            runners: dict[str, Callable[[StepClock], dict[str, Any]]] = {
                "stagewise": lambda c, r=r: run_stagewise(c, plan_path, work / f"stagewise-{r}", work / "cache"),
                "loop": lambda c: run_loop(c, plan, data, plan_path.parent, args.loop_attn),
                "trainer": lambda c, r=r: run_trainer(c, plan, data, plan_path.parent, work / f"trainer-{r}",
                                                      args.trainer_attn),
            }
            order = args.only[r % len(args.only):] + args.only[:r % len(args.only)]  # rotated each round
            waited = wait_until_quiet(console, args.max_wait)
            res = measure_round(runners, order, args.warmup, args.steps, interleaved=not args.sequential)
            rounds.append(res)
            line = ", ".join(f"{m} {res[m]['tokens_per_s']:,.0f}" for m in args.only)
            console.print(f"  round {r + 1}: {line} tok/s (waited {waited:.0f}s for quiet; other processes "
                          f"used {max(v.get('foreign_cores', 0) for v in res.values()):.2f} cores)")

    tps = {m: statistics.median(rd[m]["tokens_per_s"] for rd in rounds) for m in args.only}
    ratios = {}
    for key, other in (("ratio_vs_trainer", "trainer"), ("ratio_vs_loop", "loop")):
        if "stagewise" in tps and other in tps:
            ratios[key] = statistics.median(rd["stagewise"]["tokens_per_s"] / rd[other]["tokens_per_s"]
                                            for rd in rounds)

    # A check that drift did not decide it: the ratio of each pair of turns run back to back.
    paired = {}
    for key, other in (("ratio_vs_trainer", "trainer"), ("ratio_vs_loop", "loop")):
        if key in ratios:
            paired[key] = statistics.median(a / b for rd in rounds for a, b in zip(
                rd["stagewise"]["turn_tokens_per_s"], rd[other]["turn_tokens_per_s"], strict=True))

    described = {m: d.format(attn={"loop": args.loop_attn, "trainer": args.trainer_attn}.get(m))
                 for m, d in DESCRIBED.items()}
    table = Table(title=f"training throughput: {args.steps} timed steps after "
                        f"{args.warmup} warm-up, {mode}, {args.repeats} round(s)")
    for col in ("method", "settings", "tokens/s", "median step", f"{TURN}-step turns (min-max)", "stagewise / this"):
        table.add_column(col, justify="left" if col in ("method", "settings") else "right")
    for m, v in tps.items():
        chunks = [c for rd in rounds for c in rd[m]["turn_tokens_per_s"]]
        steps_ms = statistics.median(rd[m]["median_step_ms"] for rd in rounds)
        table.add_row(m, described[m], f"{v:,.0f}", f"{steps_ms:.1f} ms", f"{min(chunks):,.0f}-{max(chunks):,.0f}",
                      f"{tps['stagewise'] / v:.2f}x" if "stagewise" in tps else "-")
    console.print(table)
    for key, target in TARGET.items():
        if key in ratios:
            mark = "ok" if ratios[key] >= target else "BELOW TARGET"
            console.print(f"{key} = {ratios[key]:.3f} (median of the per-turn ratios {paired[key]:.3f}); "
                          f"target >= {target}: {mark}")
    wall = time.perf_counter() - started
    console.print(f"total wall time {wall:.0f}s")

    if not args.no_write:
        import accelerate
        import transformers

        report = {
            **{k: round(v, 4) for k, v in ratios.items()},
            "tokens_per_s": {m: round(v, 1) for m, v in tps.items()},
            "turn_ratio_medians": {k: round(v, 4) for k, v in paired.items()},
            "target": TARGET,
            "meets_target": {k: ratios[k] >= TARGET[k] for k in ratios},
            "settings": {
                "model": {**MODEL, "parameters": params,
                          "vocab_size": data.vocab_size},
                "batch_size": BATCH, "block_size": BLOCK, "tokens_per_step": TOKENS_PER_STEP,
                "warmup_steps": args.warmup, "timed_steps": args.steps, "repeats": args.repeats,
                "mode": mode, "turn_steps": TURN, "stagewise_log_every": LOG_EVERY,
                "optimizer": {"name": "adamw", "lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY,
                              "schedule": "constant", "grad_clip": None},
                "data": data_spec, "tokenizer": "char",
                "methods": described,
                "timing": ("global optimizer-step post-hook; a step is timed from the method getting the CPU "
                           "(interleaved) or from its previous update (sequential) to its update; warm-up "
                           "steps dropped; tokens_per_s = timed steps x tokens per step / summed step time; "
                           "ratios = median over rounds of the per-round tokens/s ratios; turn_ratio_medians = "
                           "median ratio of same-index turns (run back to back when interleaved)"),
            },
            "rounds": rounds,
            "wall_s": round(wall, 1),
        }
        write_results(args.out, report, "throughput.py", argv, transformers=transformers.__version__,
                      accelerate=accelerate.__version__)
        console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
