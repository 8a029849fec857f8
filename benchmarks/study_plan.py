"""The study's language-model plan: one plan per seed whose stages are every variant the study
compares, as branches of one constant-LR run where the variant is a way to finish that run (the
stage cache and the branch points let that prefix train once) and as `from: init` runs where it
is a schedule or an optimizer of its own (the same initial weights; a stage's name decides its
data order). The stages are listed in the order they should finish if time runs out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Size:
    """A model and a budget: `steps` is N, the length every full-length variant trains."""

    n_layer: int
    n_embd: int
    n_head: int
    block: int
    batch: int
    steps: int
    warmup: int
    eval_batches: int
    curve_every: int  # evaluations along the curves that need them (steps to a target)


# nanoGPT's CPU baby GPT (4 x 128, block 64, batch 12) for 1000 updates: README, "The study"
FULL = Size(n_layer=4, n_embd=128, n_head=4, block=64, batch=12, steps=1000, warmup=50, eval_batches=40,
            curve_every=100)
QUICK = Size(n_layer=1, n_embd=32, n_head=2, block=32, batch=8, steps=40, warmup=4, eval_batches=2,
             curve_every=10)

# peak LRs the cosine baseline is swept over first (one seed); every variant then runs at the best of
# them: comparing schedules at an untuned peak measures which one holds a too-low LR up longest
PEAK_LRS = (1e-3, 3e-3, 6e-3, 1.2e-2)
MERGED = 5  # checkpoints a merge averages: the last 20% of the constant run
EMA = 0.995  # an EMA horizon of ~200 updates: the 20% cooldown's
COOLDOWNS = (0.025, 0.05, 0.1, 0.2, 0.4)  # of N, branched from the constant run
SWEEP = (0.25, 0.5, 0.75, 1.0)  # budgets, in N: a 20% cooldown branched per budget vs a cosine run each


def cooldown_name(fraction: float) -> str:
    return f"cooldown_{fraction * 100:g}".replace(".", "_")


def sweep_name(kind: str, budget: float) -> str:
    return f"{kind}_{round(budget * 100)}"


def lr_name(lr: float) -> str:
    return f"cosine_lr_{lr:g}".replace(".", "_")


def _adamw(lr: float) -> dict[str, Any]:
    return {"name": "adamw", "lr": lr, "betas": [0.9, 0.99], "weight_decay": 0.1}


def _cosine(size: Size, lr: float) -> dict[str, Any]:
    return {"name": "cosine", "warmup": size.warmup, "min_lr": lr / 10}


def lr_sweep_plan(seed: int, size: Size, corpus: Path) -> dict[str, Any]:
    """The cosine baseline once per peak LR of PEAK_LRS, each from the same initial weights."""
    stages = [{"name": lr_name(lr), "from": "init", "optimizer": _adamw(lr), "schedule": _cosine(size, lr),
               "regularization": {"grad_clip": 1.0}, "steps": size.steps} for lr in PEAK_LRS]
    return {**_common(seed, size, corpus), "name": f"study-lr-{seed}", "stages": stages}


def plan_for(seed: int, size: Size, corpus: Path, peak_lr: float) -> dict[str, Any]:
    n, w = size.steps, size.warmup
    adamw = _adamw(peak_lr)
    clip = {"grad_clip": 1.0}
    curve = {"every": size.curve_every, "batches": size.eval_batches}

    def from_init(name: str, schedule: dict[str, Any], steps: int = n, optimizer: dict[str, Any] | None = None,
                  **extra: Any) -> dict[str, Any]:
        return {"name": name, "from": "init", "optimizer": optimizer or adamw, "schedule": schedule,
                "regularization": clip, "steps": steps, **extra}

    def cooldown(name: str, at: int, steps: int, shape: str = "1-sqrt") -> dict[str, Any]:
        # AdamW's moments kept; the LR decays from the constant run's to 0
        return {"name": name, "from": f"constant@{at}", "optimizer": {"handoff": "carry"},
                "schedule": {"name": "decay", "shape": shape}, "regularization": clip, "steps": steps}

    cosine = _cosine(size, peak_lr)
    # the constant run and its branches first (the cheapest rows: a merge trains nothing), then the
    # runs of their own, the cosine baseline first
    stages: list[dict[str, Any]] = [
        {"name": "constant", "optimizer": adamw, "schedule": {"name": "warmup_constant", "warmup": w},
         "regularization": clip, "steps": n, "eval": curve},
        {"name": "merge", "from": "constant", "merge": {"last": MERGED}},
        {"name": "merge_linear", "from": "constant", "merge": {"last": MERGED, "weights": "linear"}},
        *(cooldown(cooldown_name(f), n - round(f * n), round(f * n)) for f in COOLDOWNS if f != 0.4),
        cooldown("cooldown_20_linear", n - n // 5, n // 5, shape="linear"),
        from_init("cosine", cosine, eval=curve),
        cooldown(cooldown_name(0.4), n - round(0.4 * n), round(0.4 * n)),
        *(cooldown(sweep_name("wsd", b), round(0.8 * b * n), round(0.2 * b * n)) for b in SWEEP if b != 1.0),
        # SWATS' switch at half the run: SGD at the LR estimated from Adam's steps, momentum from Adam's
        {"name": "adam_to_sgd", "from": f"constant@{n // 2}",
         "optimizer": {"name": "sgd", "lr": "auto", "momentum": 0.9, "handoff": "convert"},
         "schedule": {"name": "constant"}, "regularization": clip, "steps": n - n // 2},
        from_init("linear_to_zero", {"name": "decay", "shape": "linear", "warmup": w}),
        *(from_init(sweep_name("cosine", b), cosine, round(b * n)) for b in SWEEP if b != 1.0),
        from_init("muon", cosine, optimizer={**adamw, "name": "muon"}, eval=curve),
        from_init("multistep", {"name": "multistep", "milestones": [0.8, 0.9], "gamma": 0.316, "warmup": w}),
        from_init("schedulefree", {"name": "warmup_constant", "warmup": w},
                  optimizer={**adamw, "name": "schedulefree_adamw"}),
        from_init("ema", {"name": "warmup_constant", "warmup": w}, average={"ema": EMA}),
    ]
    return {**_common(seed, size, corpus), "name": f"study-{seed}",
            "checkpoint": {"every": n // 5 // (MERGED - 1), "keep": 2}, "stages": stages}


def _common(seed: int, size: Size, corpus: Path) -> dict[str, Any]:
    n = size.steps
    return {
        "seed": seed, "precision": "fp32", "compile": False, "threads": 1,
        "model": {"arch": "gpt", "n_layer": size.n_layer, "n_head": size.n_head, "n_embd": size.n_embd,
                  "n_positions": size.block, "bias": False, "dropout": 0.0},
        "tokenizer": {"kind": "char"},
        "data": {"train": str(corpus), "val_fraction": 0.1},
        "defaults": {"batch": {"size": size.batch, "block_size": size.block},
                     "eval": {"every": n, "batches": size.eval_batches}},
        "log": {"every": max(n // 10, 1)},
    }
