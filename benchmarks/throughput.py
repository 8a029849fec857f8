"""Training throughput of stagewise against each peer at its best on this CPU, at two sizes, and
the time from `stagewise train` to the first update.

Two GPT-2 sizes (dropout 0, char vocabulary of tinyshakespeare, batch 16 x 128 tokens, AdamW at a
constant LR, no clipping): `3M` (4 layers x 256) and `10M` (6 layers x 384). At each, five
methods train the same token windows from the same initial weights, in one process:

  stagewise           a one-stage plan at its best: precision bf16, compile true, threads N
  stagewise_defaults  the same plan without the precision, compile and threads keys: what `auto`
                      picks (engine.device) is what is timed, and recorded
  loop                a nanoGPT-style loop at its best: bf16 autocast, torch.compile of model + loss,
                      fused AdamW, eager attention (inductor fuses it; SDPA's CPU kernels it cannot),
                      and stagewise's inductor options (tasks.lm.COMPILE_OPTIONS: decomposed tanh)
  trainer_compiled    transformers.Trainer at its best: torch_compile=True, eager attention, bf16,
                      adamw_torch_fused, and the same inductor options (set in torch._inductor.config
                      around trainer.train(), as a Trainer user would: Trainer has no argument for them)
  trainer             Trainer as most people run it: bf16, adamw_torch_fused, its default SDPA
                      attention, not compiled

Every method runs on the same N threads (--threads; default: what `threads: auto` picks at the
start), the defaults plan on the count its own auto picks. Both plans are 2000-update plans (what
`compile: auto` weighs) stopped after the timed steps.

How it is timed. A global optimizer-step post-hook sees every update. The methods train
*interleaved*: each in its own thread, a baton letting one compute at a time, handed on every
TURN updates. A method's step time runs from its previous update (or from getting the CPU back)
to its update: everything its loop does per step. On a shared machine the speed drifts by tens
of percent over tens of seconds; interleaved, a slow spell hits all methods alike, and the ratios
are per round (and per back-to-back turn pair: `turn_ratio_medians`). The first --warmup updates
of each method (compiling) are not timed.

MFU: tokens/s x (6 N + 12 L d T) FLOPs per token (PaLM appendix B, nanoGPT's estimate_mfu) over
the matmul peak of the method's precision on this machine (DESIGN.md: fp32 ~190, bf16 ~800
GFLOP/s on the 2 cores).

Start-up: `stagewise train examples/nanogpt.yaml` in a fresh process, cold (empty cache: the text
is read and tokenized) and warm (cache filled, --fresh run), from spawning the process to its first
update; next to it the same plan with transformers' GPT-2 for the model, and a hand script of the
same first update (torch and the model, nothing else); 3 interleaved rounds, medians.

    .venv/bin/python benchmarks/throughput.py                 # ~10 minutes on 2 idle cores
    .venv/bin/python benchmarks/throughput.py --sizes 3M --steps 20 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
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

from stagewise.config.plan_config import Plan
from stagewise.data.prepared_data import PreparedData
from stagewise.data.sampler import WindowSampler
from stagewise.data.tokenizers import eos_id
from stagewise.engine.cpu_load import busy_between, cpu_times
from stagewise.engine.device import derive_seed, flops_per_token, model_shape, resolve_threads, seed_everything
from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.errors import RunStopped
from stagewise.models.build import build_model
from stagewise.plan.load import load_plan
from stagewise.tasks.lm import COMPILE_OPTIONS

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_PLAN = ROOT / "examples" / "nanogpt.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "throughput.json"

DROPOUT_0 = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
SIZES = {"3M": {"arch": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 128, **DROPOUT_0},
         "10M": {"arch": "gpt2", "n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 128, **DROPOUT_0}}
BATCH, BLOCK = 16, 128
TOKENS_PER_STEP = BATCH * BLOCK
LR, BETAS, WEIGHT_DECAY = 1e-3, (0.9, 0.99), 0.1
SEED = 1337
STAGE = "train"
PLAN_STEPS = 2000  # the plans' length, as a user would write it; they are stopped after the timed steps
LOG_EVERY = 50  # both stagewise plans: a grad norm, a sync and two log writes every 50 updates
TURN = 10  # updates a method makes before passing the CPU on (also the unit of the paired ratios)
PEAK_FLOPS = {"fp32": 190e9, "bf16": 800e9}  # DESIGN.md: matmul peaks of this 2-core machine
METHODS = ("stagewise", "stagewise_defaults", "loop", "trainer_compiled", "trainer")
PRECISION = {"stagewise": "bf16", "loop": "bf16", "trainer_compiled": "bf16", "trainer": "bf16"}
DESCRIBED = {"stagewise": "plan: precision bf16, compile true, threads {threads}",
             "stagewise_defaults": "plan without precision/compile/threads: {auto}",
             "loop": "bf16 autocast, torch.compile, fused AdamW, eager attention, decomposed tanh",
             "trainer_compiled": "torch_compile=True, eager attention, bf16, adamw_torch_fused, decomposed tanh",
             "trainer": "bf16, adamw_torch_fused, sdpa attention, not compiled"}
RATIOS = {"ratio_vs_trainer_compiled": ("stagewise", "trainer_compiled"),
          "ratio_vs_trainer": ("stagewise", "trainer"),
          "ratio_vs_loop": ("stagewise", "loop"),
          "ratio_defaults_vs_best": ("stagewise_defaults", "stagewise")}
TARGET = {"ratio_vs_trainer_compiled": 1.15, "ratio_vs_loop": 1.0, "ratio_defaults_vs_best": 0.9,
          "mfu_10M": 0.35, "startup_to_first_step_s": 3.0}


# --------------------------------------------------------------------------------------- timing

def cpu_sample() -> tuple[float, int, int]:
    """(wall time, jiffies the machine was busy, jiffies of this process); 0 jiffies where /proc is absent."""
    return cpu_times() or (time.monotonic(), 0, 0)


def wait_until_quiet(console: Console, max_wait: float, threshold: float = 0.2) -> float:
    """Wait (at most max_wait seconds) until other processes use under `threshold` cores."""
    started, told = time.perf_counter(), False
    while True:
        a = cpu_sample()
        time.sleep(1.0)
        load = busy_between(a, cpu_sample())
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

    def __init__(self, name: str, warmup: int, steps: int, baton: Baton) -> None:
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
        # method keeps the CPU for its tail (stopping, saving), when nobody is being timed.
        if done >= self.warmup and (done - self.warmup) % TURN == 0 and done < self.warmup + self.steps:
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
                "turn_tokens_per_s": [round(len(t) * TOKENS_PER_STEP / sum(t), 1) for t in turns],
                "seconds_timed": round(sum(timed), 2),
                "foreign_cores": round(busy_between(self.samples[self.warmup - 1], self.samples[-1]), 3)}


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

def write_plan(path: Path, data: str, model: dict[str, Any], best: dict[str, Any] | None) -> Path:
    """The one-stage plan; `best`: its precision/compile/threads keys (None: left to auto)."""
    plan = {
        "name": path.stem, "seed": SEED, "device": "cpu", **(best or {}),
        "model": model, "tokenizer": {"kind": "char"},
        "data": {"train": data, "val_fraction": 0.1},
        "log": {"every": LOG_EVERY},
        "stages": [{
            "name": STAGE,
            "optimizer": {"name": "adamw", "lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY},
            "schedule": {"name": "constant"},
            "batch": {"size": BATCH, "block_size": BLOCK},
            "eval": {"batches": 1},
            "steps": PLAN_STEPS,
        }],
    }
    path.write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
    return path


def run_stagewise(clock: StepClock, plan_path: Path, run_dir: Path, cache: Path) -> dict[str, Any]:
    prepared = prepare(load_plan(plan_path), plan_path, cache)
    quiet = Console(file=io.StringIO(), force_terminal=False)  # plain log lines, discarded
    with contextlib.suppress(RunStopped):  # stopped (as a signal would) after the timed steps
        train(prepared, run_dir, fresh=True, console=quiet, stop_after=clock.warmup + clock.steps)
    start = next(e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "plan_start")
    losses = [m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "train"]
    return {"final_train_loss": losses[-1] if losses else None, "attention": start["attention"],
            "precision": {"bfloat16": "bf16"}.get(start["precision"], start["precision"]),
            "compiled": start["compiled"], "threads": start["threads"]}


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


def run_loop(clock: StepClock, plan: Plan, data: PreparedData, plan_dir: Path) -> dict[str, Any]:
    model = fresh_model(plan, data, plan_dir, "eager")
    model.train()
    optimizer = torch.optim.AdamW(adamw_groups(model), lr=LR, betas=BETAS, fused=True)
    step_loss = torch.compile(LossModel(model), options=COMPILE_OPTIONS)
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
                compiled: bool) -> dict[str, Any]:
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    sampler = same_windows(data, plan)
    rows = torch.cat([sampler.next_batch()[0] for _ in range(clock.warmup + clock.steps)])  # the stage's windows
    args = TrainingArguments(
        output_dir=str(out_dir), seed=plan.seed,
        use_cpu=True, bf16=True,  # bf16 autocast through accelerate
        torch_compile=compiled,
        optim="adamw_torch_fused",  # the default in transformers 5
        per_device_train_batch_size=BATCH, max_steps=clock.warmup + clock.steps,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=WEIGHT_DECAY,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,  # as the others: no clipping
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
    )
    # compiled: eager attention, which inductor fuses (what stagewise and the loop use compiled)
    model = fresh_model(plan, data, plan_dir, "eager" if compiled else "sdpa")
    trainer = Trainer(model=model, args=args, train_dataset=Windows(rows))
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training dict
    import torch._inductor.config as inductor_config

    # Global while Trainer runs; the other compiled methods pass the same options to torch.compile.
    with inductor_config.patch(COMPILE_OPTIONS) if compiled else contextlib.nullcontext():
        return {"final_train_loss": trainer.train().training_loss}


def measure_round(runners: dict[str, Callable[[StepClock], dict[str, Any]]], methods: list[str],
                  warmup: int, steps: int, threads: int) -> dict[str, dict[str, Any]]:
    """One round: the methods interleaved, TURN updates at a time, each in its own thread."""
    clocks = Clocks()
    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []
    baton = Baton(methods)

    def one(method: str) -> None:
        clock = StepClock(method, warmup, steps, baton)
        try:
            torch.set_num_threads(threads)  # per thread (OpenMP); stagewise's train sets its own
            baton.wait_turn(method)
            started = time.perf_counter()
            with clocks.timing(clock):
                extra = runners[method](clock)
            results[method] = {**clock.result(), **extra, "wall_s": round(time.perf_counter() - started, 1)}
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
        finally:
            baton.leave(method)

    with clocks.installed():
        workers = [threading.Thread(target=one, args=(m,), name=f"bench-{m}", daemon=True) for m in methods]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    if errors:
        raise errors[0]
    return results


# -------------------------------------------------------------------------------------- start-up

# Every start-up process exits at its first optimizer step, through a global post-hook.
_AT_FIRST_UPDATE = """
import sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook
def first(*_):
    print("FIRST_UPDATE", time.time(), file=sys.stderr, flush=True)
    raise SystemExit(0)
register_optimizer_step_post_hook(first)
"""
_STAGEWISE = _AT_FIRST_UPDATE + """
from stagewise.cli import main
sys.exit(main(sys.argv[1:]))
"""
# nanoGPT's train.py for the baby GPT, cut to what precedes its first update: the text
# char-encoded (nanoGPT reads it prepared, as train.bin), the same model (models.gpt, bias off),
# its AdamW groups, one batch of 12 x 64, clipping. It imports torch and the model, nothing else.
_HAND = _AT_FIRST_UPDATE + """
import numpy as np
import torch
from torch.nn import functional as F
from stagewise.models.gpt import GPT
raw = np.frombuffer(open(sys.argv[1], "rb").read(), dtype=np.uint8)
chars = np.unique(raw)
lut = np.zeros(256, dtype=np.int64)
lut[chars] = np.arange(len(chars))
data = torch.from_numpy(lut[raw])
torch.manual_seed(1337)
model = GPT(vocab_size=len(chars), n_layer=4, n_head=4, n_embd=128, n_positions=64, bias=False)
params = [p for p in model.parameters()]
groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
          {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
ix = torch.randint(len(data) - 65, (12,))
x = torch.stack([data[i:i + 64] for i in ix])
y = torch.stack([data[i + 1:i + 65] for i in ix])
logits = model(input_ids=x).logits
loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
loss.backward()
torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
optimizer.step()
"""
# The start-ups, each run `rounds` times, interleaved: the plan cold (an empty token cache: the
# text is read and tokenized) and warm (cache filled, --fresh run); the same plan with
# transformers' GPT-2 as the model (the example's model before models.gpt); the hand script.
STARTUPS = ("cold", "warm", "warm_gpt2", "hand")
GPT2_BABY = {"arch": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 64,
             "activation_function": "gelu", **DROPOUT_0}


def startup(work: Path, data: str, rounds: int = 3) -> dict[str, Any]:
    """Seconds from spawning each start-up (STARTUPS) to its first update, the median of `rounds`;
    `*_cpu_s`: the CPU time the process used to get there (median), which other processes do not
    inflate; `*_peak_rss_mb`: its peak resident memory (the largest of the rounds). The hand script
    runs when the data is one text file."""
    plan = yaml.safe_load(NANOGPT_PLAN.read_text(encoding="utf-8"))
    plan["data"]["train"] = data
    paths = {"gpt": work / "nanogpt.yaml", "gpt2": work / "nanogpt-gpt2.yaml"}
    paths["gpt"].write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
    paths["gpt2"].write_text(yaml.safe_dump({**plan, "model": GPT2_BABY}, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    text = Path(data) if Path(data).is_file() else None

    def command(kind: str, n: int) -> list[str]:
        if kind == "hand":
            return [sys.executable, "-c", _HAND, str(text)]
        cache = work / (f"nanogpt-cold-{n}" if kind == "cold" else "nanogpt-cache")
        path = paths["gpt2" if kind == "warm_gpt2" else "gpt"]
        return [sys.executable, "-c", _STAGEWISE, "train", str(path), "--out", str(work / "nanogpt-run"),
                "--cache", str(cache), "--fresh"]

    subprocess.run(command("warm", 0), env=env, capture_output=True, check=False)  # fills the cache
    walls: dict[str, list[float]] = {k: [] for k in STARTUPS if k != "hand" or text is not None}
    cpus: dict[str, list[float]] = {k: [] for k in walls}
    rss: dict[str, list[float]] = {k: [] for k in walls}
    foreign: list[float] = []
    for n in range(rounds):
        for kind in walls:
            a = cpu_sample()
            spawned = time.time()
            proc = subprocess.Popen(command(kind, n), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            assert proc.stderr is not None
            err = proc.stderr.read()
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time and peak RSS
            proc.returncode = os.waitstatus_to_exitcode(status)
            marks = [line.split() for line in err.splitlines() if line.startswith("FIRST_UPDATE")]
            if not marks:
                raise RuntimeError(f"the {kind} start-up failed:\n{err[-2000:]}")
            used = usage.ru_utime + usage.ru_stime
            walls[kind].append(float(marks[0][1]) - spawned)
            cpus[kind].append(used)
            rss[kind].append(usage.ru_maxrss / 1024)
            b = cpu_sample()
            foreign.append(max(0.0, busy_between(a, b) - used / max(b[0] - a[0], 1e-9)))  # less the child's own
    out: dict[str, Any] = {}
    for kind in walls:
        out[kind] = round(statistics.median(walls[kind]), 2)
        out[f"{kind}_cpu_s"] = round(statistics.median(cpus[kind]), 2)
        out[f"{kind}_peak_rss_mb"] = round(max(rss[kind]), 1)
        out[f"{kind}_all_s"] = [round(w, 2) for w in walls[kind]]
    out["foreign_cores"] = round(statistics.median(foreign), 2)
    return out


# ------------------------------------------------------------------------------------------ main

def median_ratio(rounds: list[dict[str, dict[str, Any]]], a: str, b: str) -> float:
    return statistics.median(rd[a]["tokens_per_s"] / rd[b]["tokens_per_s"] for rd in rounds)


def paired_ratio(rounds: list[dict[str, dict[str, Any]]], a: str, b: str) -> float:
    """The median ratio of same-index turns: run one after the other, drift cannot decide it."""
    return statistics.median(x / y for rd in rounds for x, y in zip(rd[a]["turn_tokens_per_s"],
                                                                    rd[b]["turn_tokens_per_s"], strict=True))


def bench_size(console: Console, name: str, work: Path, data_spec: str, args: argparse.Namespace,
               threads: int) -> dict[str, Any]:
    model = SIZES[name]
    best = write_plan(work / f"best-{name}.yaml", data_spec,
                      model, {"precision": "bf16", "compile": True, "threads": threads})
    defaults = write_plan(work / f"defaults-{name}.yaml", data_spec, model, None)
    plan = load_plan(best)
    prepared = prepare(plan, best, work / "cache")  # the token stream every method trains on
    data = prepared.data
    assert data is not None
    params, n_layer, d_model = model_shape(prepared.root)
    per_token = flops_per_token(params, n_layer, d_model, BLOCK)
    del prepared
    console.print(f"[{name}] GPT-2 {n_layer}x{d_model}, {params / 1e6:.2f}M params, batch {BATCH}x{BLOCK}, "
                  f"{per_token * TOKENS_PER_STEP / 1e9:.1f} GFLOP a step; {args.warmup} warm-up + {args.steps} "
                  f"timed steps x {args.repeats} round(s), {threads} thread(s)")
    runners: dict[str, Callable[[StepClock], dict[str, Any]]] = {
        # own caches: the two plans' stages have the same key, and a fresh run clears its stages' store
        "stagewise": lambda c: run_stagewise(c, best, work / f"run-best-{name}", work / "cache-best"),
        "stagewise_defaults": lambda c: run_stagewise(c, defaults, work / f"run-defaults-{name}",
                                                      work / "cache-defaults"),
        "loop": lambda c: run_loop(c, plan, data, best.parent),
        "trainer_compiled": lambda c: run_trainer(c, plan, data, best.parent, work / f"trainer-c-{name}", True),
        "trainer": lambda c: run_trainer(c, plan, data, best.parent, work / f"trainer-{name}", False),
    }
    rounds = []
    for r in range(args.repeats):
        order = args.only[r % len(args.only):] + args.only[:r % len(args.only)]  # rotated each round
        waited = wait_until_quiet(console, args.max_wait)
        res = measure_round(runners, order, args.warmup, args.steps, threads)
        rounds.append(res)
        console.print(f"  round {r + 1}: " + ", ".join(f"{m} {res[m]['tokens_per_s']:,.0f}" for m in args.only)
                      + f" tok/s (waited {waited:.0f}s; other processes used up to "
                        f"{max(v['foreign_cores'] for v in res.values()):.2f} cores)")

    auto = rounds[-1].get("stagewise_defaults", {})
    precision = {**PRECISION, "stagewise_defaults": auto.get("precision", "?")}
    tps = {m: statistics.median(rd[m]["tokens_per_s"] for rd in rounds) for m in args.only}
    mfu = {m: {"mfu": round(v * per_token / PEAK_FLOPS[precision[m]], 4),
               "of_peak": precision[m],
               "mfu_vs_bf16_peak": round(v * per_token / PEAK_FLOPS["bf16"], 4),
               "gflop_per_s": round(v * per_token / 1e9, 1)} for m, v in tps.items()}
    ratios = {k: round(median_ratio(rounds, a, b), 4) for k, (a, b) in RATIOS.items() if a in tps and b in tps}
    paired = {k: round(paired_ratio(rounds, a, b), 4) for k, (a, b) in RATIOS.items() if a in tps and b in tps}
    described = {m: DESCRIBED[m].format(threads=threads, auto=(
        f"{auto.get('precision')}, {'compiled' if auto.get('compiled') else 'eager'}, {auto.get('threads')} thread(s)"))
        for m in args.only}

    table = Table(title=f"[{name}] training throughput, {args.steps} timed steps x {args.repeats}, interleaved")
    for col in ("method", "settings", "tokens/s", "median step", "MFU", "stagewise / this"):
        table.add_column(col, justify="left" if col in ("method", "settings") else "right")
    for m, v in tps.items():
        step_ms = statistics.median(rd[m]["median_step_ms"] for rd in rounds)
        table.add_row(m, described[m], f"{v:,.0f}", f"{step_ms:.0f} ms",
                      f"{mfu[m]['mfu']:.3f} of {precision[m]}",
                      f"{tps['stagewise'] / v:.2f}x" if "stagewise" in tps else "-")
    console.print(table)
    for key, value in ratios.items():
        target = TARGET.get(key)
        mark = "" if target is None else f"; target >= {target}: {'met' if value >= target else 'MISSED'}"
        console.print(f"  {key} = {value:.3f} (paired turns {paired[key]:.3f}){mark}")
    return {
        **ratios, "turn_ratio_medians": paired, "tokens_per_s": {m: round(v, 1) for m, v in tps.items()},
        "mfu": mfu, "methods": described,
        "model": {**model, "parameters": params, "vocab_size": data.vocab_size,
                  "flops_per_token": per_token, "flops_per_step": per_token * TOKENS_PER_STEP},
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30,
                        help=f"timed steps per method, size and round, a multiple of {TURN} (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first: compiling (default 5)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; the medians are reported (default 1)")
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES),
                        help="model sizes (default: both; none: only the start-up)")
    parser.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of every method (default: what stagewise's threads: auto picks now)")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    parser.add_argument("--max-wait", type=float, default=30.0,
                        help="seconds to wait for a quiet CPU before each round (default 30)")
    parser.add_argument("--data", type=str, default=None, help="a text file (default: tinyshakespeare)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output (default: benchmarks/results/throughput.json)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.steps < TURN or args.steps % TURN or args.warmup < 1 or args.repeats < 1:
        parser.error(f"need --steps a multiple of {TURN}, --warmup >= 1, --repeats >= 1")
    warnings.filterwarnings("ignore")
    console = Console(width=max(Console().width, 120))  # the table fits in a log file too

    if args.data:
        data_spec = str(Path(args.data).resolve())
    elif SHAKESPEARE.is_file():
        data_spec = str(SHAKESPEARE)
    else:
        data_spec = "{stdlib}/*.py"  # no shared data here: the interpreter's own sources
    threads = args.threads or resolve_threads("auto")  # also what the defaults plans' auto will give
    console.print(f"torch {torch.__version__}, {threads} thread(s), data {data_spec}")

    started = time.perf_counter()
    report: dict[str, Any] = {"sizes": {}}
    with tempfile.TemporaryDirectory(prefix="stagewise-bench-") as tmp:
        work = Path(tmp)
        if not args.no_startup:
            report["startup"] = startup(work, data_spec)
            s = report["startup"]
            table = Table(title="start-up to the first update (median)")
            for column in ("run", "wall s", "CPU s", "peak RSS MB"):
                table.add_column(column)
            for kind in STARTUPS:
                if kind in s:
                    table.add_row(kind, f"{s[kind]:.2f}", f"{s[f'{kind}_cpu_s']:.2f}", f"{s[f'{kind}_peak_rss_mb']:.0f}")
            console.print(table)
            console.print(f"other processes used {s['foreign_cores']:.2f} cores")
        for name in args.sizes:
            report["sizes"][name] = bench_size(console, name, work, data_spec, args, threads)
    wall = time.perf_counter() - started
    console.print(f"total wall time {wall:.0f}s")

    sizes = report["sizes"]
    summary = {key: {n: sizes[n][key] for n in sizes if key in sizes[n]} for key in RATIOS}
    summary["mfu"] = {n: sizes[n]["mfu"]["stagewise"]["mfu"] for n in sizes if "stagewise" in sizes[n]["mfu"]}
    if "startup" in report:
        summary["startup_to_first_step_s"] = report["startup"]["warm"]
        if "hand" in report["startup"]:
            summary["startup_vs_hand"] = round(report["startup"]["warm"] / report["startup"]["hand"], 2)
    met = {f"{k}_{n}": v >= TARGET[k] for k, by in summary.items() if k in TARGET and isinstance(by, dict)
           for n, v in by.items()}
    if "startup_to_first_step_s" in summary:  # a time: at most its target
        met["startup_to_first_step_s"] = summary["startup_to_first_step_s"] <= TARGET["startup_to_first_step_s"]
    if "10M" in summary["mfu"]:
        met["mfu_10M"] = summary["mfu"]["10M"] >= TARGET["mfu_10M"]
    if not args.no_write:
        import accelerate
        import transformers

        full = {
            **summary, "target": TARGET, "meets_target": met, **report,
            "settings": {
                "batch_size": BATCH, "block_size": BLOCK, "tokens_per_step": TOKENS_PER_STEP,
                "plan_steps": PLAN_STEPS, "warmup_steps": args.warmup, "timed_steps": args.steps,
                "repeats": args.repeats, "turn_steps": TURN, "threads": threads, "stagewise_log_every": LOG_EVERY,
                "optimizer": {"name": "adamw", "lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY,
                              "schedule": "constant", "grad_clip": None},
                "data": data_spec, "tokenizer": "char", "peak_flops": PEAK_FLOPS,
                "timing": ("global optimizer-step post-hook; a step is timed from the method getting the CPU or "
                           "from its previous update to its update; warm-up steps dropped; tokens_per_s = timed "
                           "steps x tokens per step / summed step time; ratios = median over rounds of the "
                           "per-round tokens/s ratios; turn_ratio_medians = median ratio of same-index turns"),
                "mfu": "tokens/s x (6 N + 12 L d T) / the matmul peak of the method's precision",
                "startup": "seconds from spawning each process to its first optimizer step, median of 3 "
                           "interleaved rounds: `stagewise train examples/nanogpt.yaml --fresh` cold (empty token "
                           "cache) and warm (cache filled); warm_gpt2: the same plan with transformers' GPT-2; "
                           "hand: a script of the same first update (torch and the model only)",
            },
            "wall_s": round(wall, 1),
        }
        write_results(args.out, full, "throughput.py", argv, transformers=transformers.__version__,
                      accelerate=accelerate.__version__)
        console.print(f"wrote {args.out}")
    console.print(json.dumps({k: v for k, v in summary.items()}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
