"""What multi-step plans buy, measured: `make study` (or this script) trains, through stagewise
plans and the stage cache, a small character GPT on tinyshakespeare many ways per seed and
compares them at equal budgets; then the seeds' own translation and classification recipes against
their one-stage versions and nanoGPT's CPU baby GPT as a reference point.

  schedules   cosine to 10%, linear to zero, constant, multi-step, WSD (20% linear / 1-sqrt
              cooldown), schedule-free AdamW
  cooldowns   2.5 .. 40% cooldowns branched from one constant run
  sweep       one constant run with a 20% cooldown branched per budget (25 .. 100%) against a
              cosine run per budget: the loss of each and the tokens each approach trained
  averaging   the mean of the last 5 checkpoints (uniform, linear) and an EMA against the cooldown
  optimizers  Muon against AdamW (steps and seconds to AdamW's final loss); Adam -> SGD (SWATS)
  recipes     translation: Adam -> SGD -> cosine against Adam + cosine (BLEU, chrF);
              classification: LR halved on plateau against a fixed LR (accuracy, macro-F1)
  cache       what the stage cache saved here, and the search benchmark's figures restated

Every row: mean and std over the seeds, the per-seed difference to its baseline (paired through a
shared prefix where the two share one) and a verdict. Results go to benchmarks/results/study.json,
the tables and plots to docs/benchmarks.md (between its study markers) and docs/study/.

    make study                                              # the full study: README, "The study"
    .venv/bin/python benchmarks/study.py --quick --work /tmp/q --out /tmp/q/study.json --docs /tmp/q/b.md
    .venv/bin/python benchmarks/study.py --no-train         # tables again from the runs so far

Runs live under --work (runs/study/full by default) and resume there: run it again after an
interruption and every finished stage is taken from the stage cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import write_results
from study_docs import write_docs
from study_jobs import Job, StageResult, example, read_job, read_run, run_span
from study_plan import FULL, PEAK_LRS, QUICK, SWEEP, Size, cooldown_name, lr_name, lr_sweep_plan, plan_for, sweep_name
from study_stats import Comparison, compare, summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "study.json"
DOCS = ROOT / "docs" / "benchmarks.md"
SEARCH = ROOT / "benchmarks" / "results" / "search.json"
NANOGPT_PUBLISHED = 1.88  # nanoGPT's README: the CPU baby GPT's val loss at 2000 iterations
HEGELE, MINICPM = "Hägele et al. 2024", "MiniCPM (Hu et al. 2024)"

SECTIONS: list[tuple[str, str, list[Comparison]]] = [
    ("schedules", "Schedules at equal budget (each from the same initial weights; against cosine to 10%)", [
        Comparison("linear_to_zero", "cosine", "better", "Bergsma et al. 2025"),
        Comparison("constant", "cosine", "worse", HEGELE),
        Comparison("multistep", "cosine", "same", "DeepSeek LLM 2024"),
        Comparison("cooldown_20_linear", "cosine", "same", HEGELE),
        Comparison(cooldown_name(0.2), "cooldown_20_linear", "better", HEGELE),
        Comparison("schedulefree", "cosine", "same", "Defazio et al. 2024"),
    ]),
    ("cooldowns", "Cooldown length (1-sqrt, branched from one constant run; against the 20% cooldown)", [
        Comparison(cooldown_name(0.025), cooldown_name(0.2), "worse", MINICPM),
        Comparison(cooldown_name(0.05), cooldown_name(0.2), "worse", HEGELE),
        Comparison(cooldown_name(0.1), cooldown_name(0.2), "same", MINICPM),
        Comparison(cooldown_name(0.4), cooldown_name(0.2), "same", MINICPM),
        Comparison(cooldown_name(0.025), "constant", "better", MINICPM),
    ]),
    ("sweep", "A compute sweep for the price of one run (a 20% cooldown per budget against a cosine run of that length)", [
        Comparison(sweep_name("wsd", b) if b != 1.0 else cooldown_name(0.2),
                   sweep_name("cosine", b) if b != 1.0 else "cosine", "same", HEGELE) for b in SWEEP
    ]),
    ("averaging", "Averaging instead of decaying (at equal steps; against the 20% cooldown)", [
        Comparison("merge", cooldown_name(0.2), "same", "WSM 2026"),
        Comparison("merge_linear", cooldown_name(0.2), "same", "WSM 2026"),
        Comparison("ema", cooldown_name(0.2), "same", "WSM 2026"),
        Comparison("merge", "constant", "better", "WSM 2026"),
    ]),
    ("optimizers", "Optimizers (Muon and AdamW both cosine to 10%; Adam -> SGD at half the constant run)", [
        Comparison("muon", "cosine", "better", "Jordan et al. 2024"),
        Comparison("adam_to_sgd", "constant", "same", "SWATS (Keskar & Socher 2017)"),
    ]),
]
RECIPE_JOBS = ("classification", "classification_fixed", "translation")
# a recipe row's sides: (job kind, stage) of the run each is read from
RECIPE_SIDES = {"anneal": ("translation", "anneal"), "baseline": ("translation", "baseline"),
                "plateau_rule": ("classification", "adam"), "fixed_lr": ("classification_fixed", "adam")}
RECIPES: list[tuple[str, list[Comparison]]] = [
    ("translation", [Comparison("anneal", "baseline", "better", "the recipe", metric, higher_is_better=True)
                     for metric in ("val_bleu", "val_chrf")]),
    ("classification", [Comparison("plateau_rule", "fixed_lr", "better", "the recipe", metric, higher_is_better=True)
                        for metric in ("val_accuracy", "val_macro_f1")]),
]


def lm_job(seed: int, size: Size, data: Path, peak_lr: float) -> Job:
    return Job(f"lm-{seed}", plan_for(seed, size, data / "tinyshakespeare.txt", peak_lr))


def lr_job(seed: int, size: Size, data: Path) -> Job:
    return Job(f"lr-{seed}", lr_sweep_plan(seed, size, data / "tinyshakespeare.txt"))


def peak_lr(work: Path, job: Job) -> dict[str, Any] | None:
    """The sweep's final val loss per peak LR and the best of them (None until every LR finished)."""
    stages = read_run(job.folder(work) / "run")
    swept = {lr: r.final["val_loss"] for lr in PEAK_LRS if (r := stages.get(lr_name(lr))) and r.finished}
    if len(swept) < len(PEAK_LRS):
        return None
    return {"seed": job.plan["seed"], "swept": {f"{lr:g}": round(v, 4) for lr, v in swept.items()},
            "chosen": min(swept, key=lambda lr: swept[lr])}


def recipe_jobs(seed: int, quick: bool, data: Path) -> list[Job]:
    """The reference point and the two recipes (each needs its data file), shrunk in quick mode."""
    tiny_seq2seq = {"model": {"d_model": 32, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
                              "dim_feedforward": 64}, "tokenizer": {"vocab_size": 2000}, "data": {"max_len": 8}}
    translation = example("translation", data, {"seed": seed, "threads": 1, **(tiny_seq2seq if quick else {})})
    if quick:  # the same shape: a baseline as long as the three stages together
        for stage in translation["stages"]:
            stage["epochs"] = 3 if stage["name"] == "baseline" else 1
    classify = example("classification", data, {"seed": seed, "threads": 1, **(
        {"model": {"embed_dim": 16, "hidden": 8, "dense": 8}, "data": {"max_len": 16}} if quick else {})})
    stage = classify["stages"][0]
    if quick:
        stage["epochs"] = 1
    # the same stage name in both runs: the same data order, so they match until the LR is first halved
    fixed = {**classify, "stages": [{k: v for k, v in stage.items() if k != "on_plateau"}]}
    nanogpt = example("nanogpt", data, {"seed": seed, "threads": 1, **(
        {"model": {"n_layer": 1, "n_embd": 32, "n_head": 2}} if quick else {})})
    if quick:
        nanogpt["stages"][0] |= {"steps": 20, "schedule": {"name": "cosine", "warmup": 2, "min_lr": 1e-4}}
        del nanogpt["sample"]
    plans = {"nanogpt": nanogpt, "classification": classify, "classification_fixed": fixed, "translation": translation}
    assert tuple(plans) == ("nanogpt", *RECIPE_JOBS)
    jobs = [Job(f"{kind}-{seed}", plan) for kind, plan in plans.items()]
    return [j for j in jobs if Path(j.plan["data"]["train"]).is_file()]


def train_all(jobs: list[Job], work: Path, parallel: int) -> dict[str, dict[str, Any]]:
    """Run the jobs, `parallel` at a time, in the order given (the most important first)."""
    def one(job: Job) -> tuple[str, dict[str, Any]]:
        print(f"start {job.name}", flush=True)
        code, seconds = job.run(work)
        print(f"done {job.name}: exit {code}, {seconds:.0f} s", flush=True)
        return job.name, {"exit": code, "seconds": round(seconds, 1)}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return dict(pool.map(one, jobs))


def root_of(stage: str, stages: dict[str, StageResult]) -> str:
    """The stage a branch grew from, `from: init` runs being their own roots: two stages with one
    root share a prefix of training."""
    while (parent := stages[stage].parent) is not None:
        stage = parent
    return stage


def lm_rows(runs: dict[int, dict[str, StageResult]], comparisons: list[Comparison]) -> list[dict[str, Any]]:
    rows = []
    for c in comparisons:
        values = {side: {s: r[side].final[c.metric] for s, r in runs.items() if side in r} for side in (c.variant, c.baseline)}
        shared = any(c.variant in r and c.baseline in r and root_of(c.variant, r) == root_of(c.baseline, r)
                     for r in runs.values())
        rows.append(compare(c, values[c.variant], values[c.baseline], shared))
    return rows


def sweep_tokens(runs: dict[int, dict[str, StageResult]]) -> dict[str, Any]:
    """What each way to get the four budgets trained, from the runs' own logs: the branched way is
    the constant run plus a cooldown per budget; the other a cosine run per budget. The identity
    checked: every branch's path (its last train metric) = the constant run's tokens at the branch
    point + the cooldown's own."""
    out: dict[str, Any] = {}
    for seed, r in runs.items():
        wsd = [sweep_name("wsd", b) if b != 1.0 else cooldown_name(0.2) for b in SWEEP]
        cos = [sweep_name("cosine", b) if b != 1.0 else "cosine" for b in SWEEP]
        if not all(s in r for s in ["constant", *wsd, *cos]):
            continue
        per_step = r["constant"].tokens // r["constant"].steps
        out[str(seed)] = {
            "branched": {"prefix": r["constant"].tokens, "cooldowns": sum(r[s].tokens for s in wsd),
                         "trained": r["constant"].trained_tokens + sum(r[s].trained_tokens for s in wsd)},
            "separate": {"runs": sum(r[s].tokens for s in cos), "trained": sum(r[s].trained_tokens for s in cos)},
            "paths_add_up": all(r[s].path_tokens == r[s].start_step * per_step + r[s].tokens for s in wsd),
        }
        out[str(seed)]["branched"]["total"] = out[str(seed)]["branched"]["prefix"] + out[str(seed)]["branched"]["cooldowns"]
    return out


def muon_to_target(runs: dict[int, dict[str, StageResult]]) -> dict[str, Any]:
    """Steps and seconds each optimizer took to reach AdamW cosine's final val loss (the first
    evaluation at or under it; seconds = steps x the stage's mean seconds per step)."""
    per_seed: dict[str, Any] = {}
    for seed, r in runs.items():
        if "muon" not in r or "cosine" not in r:
            continue
        target = r["cosine"].final["val_loss"]
        row: dict[str, Any] = {"target": round(target, 4)}
        for name in ("cosine", "muon"):
            hit = next((step for step, m in r[name].evals if m["val_loss"] <= target + 1e-9), None)
            per_step = r[name].seconds / r[name].steps
            row[name] = {"steps": hit, "seconds": None if hit is None else round(hit * per_step, 1),
                         "seconds_per_step": round(per_step, 4)}
        per_seed[str(seed)] = row
    return per_seed


def cache_savings(runs: dict[int, dict[str, StageResult]]) -> dict[str, Any]:
    """Tokens the study trained per seed against every variant trained as a run of its own from the
    initial weights (a merge as its parent's run)."""
    out = {}
    for seed, r in runs.items():
        alone = sum((res.path_tokens if res.path_tokens is not None else r[res.parent].path_tokens or 0)
                    if res.parent else res.tokens for res in r.values())
        out[str(seed)] = {"trained": sum(res.trained_tokens for res in r.values()), "as_separate_runs": alone,
                          "stages": len(r)}
    search = json.loads(SEARCH.read_text(encoding="utf-8")) if SEARCH.is_file() else {}
    keep = ("steps_spent", "steps_ideal", "steps_naive", "trials", "measured_at")
    return {"study": out, "search_benchmark": {k: search[k] for k in keep if k in search}}


def analyse(work: Path, seeds: list[int], size: Size, quick: bool, data: Path, lr: dict[str, Any]) -> dict[str, Any]:
    logged = {s: read_job(work / lm_job(s, size, data, lr["chosen"]).name) for s in seeds}
    runs = {s: done for s, r in logged.items() if (done := {k: v for k, v in r.items() if v.finished})}
    variants = sorted({v for r in runs.values() for v in r})
    report: dict[str, Any] = {
        "mode": "quick" if quick else "full", "size": size.__dict__, "seeds": seeds, "peak_lr": lr,
        "variants": {v: {**summary([r[v].final["val_loss"] for r in runs.values() if v in r]),
                         "per_seed": {str(s): round(r[v].final["val_loss"], 4) for s, r in runs.items() if v in r},
                         "tokens": next(r[v].tokens for r in runs.values() if v in r)} for v in variants},
        "sections": [{"key": key, "title": title, "rows": lm_rows(runs, rows)} for key, title, rows in SECTIONS],
        "sweep_tokens": sweep_tokens(runs), "muon_to_target": muon_to_target(runs), "cache": cache_savings(runs),
        "curves": {v: {str(s): [[step, round(m["val_loss"], 4)] for step, m in r[v].evals] for s, r in runs.items() if v in r}
                   for v in ("constant", "cosine", "muon")},
        "spread_along": {v: _spread(logged, v) for v in ("constant", "cosine")},
        "planned_stages": [s["name"] for s in plan_for(seeds[0], size, data / "tinyshakespeare.txt", lr["chosen"])["stages"]],
        "finished": {str(s): sorted(r) for s, r in runs.items()},
    }
    recipes = {}
    for name, comparisons in RECIPES:
        recipes[name] = []
        for c in comparisons:
            sides = []
            for side in (c.variant, c.baseline):
                kind, stage = RECIPE_SIDES[side]
                results = {s: read_run(work / f"{kind}-{s}" / "run").get(stage) for s in seeds}
                sides.append({s: r.final[c.metric] for s, r in results.items() if r and r.finished and c.metric in r.final})
            recipes[name].append(compare(c, *sides, shares_prefix=False))
    report["recipes"] = recipes
    nanogpt = [read_run(work / f"nanogpt-{s}" / "run").get("train") for s in seeds]
    values = [r.final["val_loss"] for r in nanogpt if r and r.finished]
    report["reference"] = {"published": NANOGPT_PUBLISHED, **summary(values), "per_seed": [round(v, 4) for v in values]}
    names = [f"lr-{seeds[0]}"] + [f"{kind}-{s}" for s in seeds for kind in ("lm", "nanogpt", *RECIPE_JOBS)]
    spans = {f"{name}/{run.name}": span for name in names for run in sorted((work / name).glob("*run"))
             if (span := run_span(run)) is not None}
    report["runs_span"] = {name: {"from": _iso(a), "to": _iso(b), "minutes": round((b - a) / 60, 1)}
                           for name, (a, b) in spans.items()}
    return report


def _spread(runs: dict[int, dict[str, StageResult]], stage: str) -> dict[str, Any]:
    """The std over seeds of the stage's val loss at each evaluation step all of them reached
    (finished or not: a stage in progress has evaluated too)."""
    curves = [dict((step, m["val_loss"]) for step, m in r[stage].evals) for r in runs.values() if stage in r]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if len(curves) > 1 else []
    return {str(step): summary([c[step] for c in curves]) for step in steps}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two seeds: a few minutes (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 1337, 1338, ... (default 3; quick 2)")
    parser.add_argument("--parallel", type=int, default=2, help="plans trained at once (default 2)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="the folder of tinyshakespeare.txt, eng_fra.tsv and sms_spam.tsv")
    parser.add_argument("--work", type=Path, default=None, help="the runs and their caches (default runs/study/full or quick)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=DOCS, help="the page whose study section is (re)written")
    parser.add_argument("--no-train", action="store_true", help="only read the runs in --work and write the results")
    args = parser.parse_args(argv)
    if not (args.data / "tinyshakespeare.txt").is_file():
        parser.error(f"--data: {args.data / 'tinyshakespeare.txt'}: no such file")
    if args.parallel < 1:
        parser.error("--parallel: at least 1")
    size = QUICK if args.quick else FULL
    seeds = [1337 + i for i in range(args.seeds or (2 if args.quick else 3))]
    if len(seeds) < 2:
        parser.error("--seeds: at least 2 (a std needs two)")
    work = (args.work or ROOT / "runs" / "study" / ("quick" if args.quick else "full")).resolve()
    data = args.data.resolve()
    started, load_before = time.time(), os.getloadavg()
    # the peak LR first (the cosine baseline swept on one seed), then every variant at the best one
    sweep = lr_job(seeds[0], size, data)
    exits = {} if args.no_train else train_all([sweep], work, 1)
    lr = peak_lr(work, sweep)
    if lr is None:
        print(f"study.py: the peak-LR sweep in {sweep.folder(work)} has not finished: run without --no-train",
              file=sys.stderr)
        return 1
    jobs = [lm_job(s, size, data, lr["chosen"]) for s in seeds] + [j for s in seeds for j in recipe_jobs(s, args.quick, data)]
    if not args.no_train:
        exits |= train_all(jobs, work, args.parallel)
    report = analyse(work, seeds, size, args.quick, data, lr)
    report["wall"] = {"seconds": round(time.time() - started, 1), "trained": not args.no_train, "jobs": exits,
                      "load_average_before": [round(x, 2) for x in load_before],
                      "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds")}
    write_results(args.out, report, "study.py", argv)
    write_docs(json.loads(args.out.read_text(encoding="utf-8")), args.docs)
    print(f"wrote {args.out} and {args.docs}")
    return 1 if any(e["exit"] for e in exits.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
