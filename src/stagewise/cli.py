"""`stagewise` command line: parses arguments and calls the packages; bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from stagewise.errors import RunStopped, UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagewise", description="Train language models with multi-stage plans.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run the whole plan")
    train.add_argument("plan", type=Path)
    train.add_argument("overrides", nargs="*", help="key.path=value, e.g. stages.cooldown.steps=800")
    train.add_argument("--out", type=Path, help="run directory (default: runs/<plan name>)")
    train.add_argument("--fresh", action="store_true",
                       help="start over: empty the run directory (only a stagewise run) and forget this plan's stages in "
                            "the stage cache")
    _cache_arg(train)

    verify = sub.add_parser("verify-resume", help="train a shortened copy twice, once interrupted; compare")
    verify.add_argument("plan", type=Path)
    verify.add_argument("overrides", nargs="*")
    verify.add_argument("--steps", type=int, default=12, help="updates per stage in the shortened copy")

    check = sub.add_parser("check", help="validate a plan; print its stages and LR curve")
    check.add_argument("plan", type=Path)
    check.add_argument("overrides", nargs="*")
    check.add_argument("--plot", type=Path, metavar="PNG", help="also write the planned LR curve as a PNG")
    _cache_arg(check)

    report = sub.add_parser("report", help="plots and an HTML page of a run; of several runs, compared")
    report.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    report.add_argument("--out", type=Path, help="output directory (default: the first run's directory)")

    runs = sub.add_parser("runs", help="list the runs in a directory")
    runs.add_argument("dir", type=Path, nargs="?", default=Path("runs"))

    generate = sub.add_parser("generate", help="run a trained stage on a prompt: continue it (causal_lm, sft), "
                                               "classify, translate (seq2seq) or tag it")
    generate.add_argument("run", type=Path)
    generate.add_argument("--stage", help="default: the plan's last finished stage")
    generate.add_argument("--prompt", default="")
    generate.add_argument("--max-tokens", type=int,
                          help="tokens to generate (default: 200; seq2seq: the stage's data max_len)")
    generate.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--beam", type=int, default=1, help="seq2seq: beam width (1: greedy)")

    evaluate = sub.add_parser("evaluate", help="a trained stage's metrics on a file like its data (columns as "
                                               "the plan names them)")
    evaluate.add_argument("run", type=Path)
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--stage", help="default: the plan's last finished stage")
    evaluate.add_argument("--format", choices=("csv", "tsv", "jsonl"),
                          help="classify, seq2seq: the file's format (default: told by its extension)")
    evaluate.add_argument("--beam", type=int, help="seq2seq: beam width (default: the stage's eval.beam)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")

    export = sub.add_parser("export", help="copy a stage's export: transformers models as a directory the Auto "
                                           "classes load; built-in ones as weights, model.json and tokenizers")
    export.add_argument("run", type=Path)
    export.add_argument("--stage", help="default: the plan's last finished stage")
    export.add_argument("--to", type=Path, required=True)
    return parser


def _cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=Path, default=None,
                   help="token/tokenizer cache (default: .cache beside the runs directory)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Off a terminal (CI logs, pipes) rich assumes 80 columns and would cut the tables.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    commands = {"train": _train, "check": _check, "verify-resume": _verify_resume, "report": _report, "runs": _runs,
                "generate": _generate, "evaluate": _evaluate, "export": _export}
    try:
        return commands[args.command](args, console)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace, console: Console) -> int:
    from stagewise.engine.prepare import prepare
    from stagewise.engine.run import train
    from stagewise.engine.rundir import check_run_directory
    from stagewise.plan.load import load_plan

    plan = load_plan(args.plan, args.overrides)
    out = args.out or Path("runs") / plan.name
    check_run_directory(out, args.fresh)  # before the slow part; train checks again under its lock
    prepared = prepare(plan, args.plan, args.cache or out.parent / ".cache")
    train(prepared, out, fresh=args.fresh, console=console)
    console.print(f"run written to {out}")
    return 0


def _check(args: argparse.Namespace, console: Console) -> int:
    from stagewise.engine.prepare import prepare
    from stagewise.engine.status import stage_status
    from stagewise.plan.load import load_plan
    from stagewise.track.plan_view import print_plan

    prepared = prepare(load_plan(args.plan, args.overrides), args.plan, args.cache or Path("runs/.cache"))
    print_plan(console, prepared.plan.name, prepared.resolved, stage_status(prepared))
    if args.plot is not None:
        from stagewise.track.plots import plan_lr_figure, save_png

        save_png(plan_lr_figure(prepared.resolved), args.plot)
        console.print(f"LR curve written to {args.plot}")
    models = {id(s.model): s.model for s in prepared.stages}.values()
    data = {id(s.setup.data): s.setup for s in prepared.stages}.values()
    console.print(f"plan OK: {len(prepared.stages)} stages, {prepared.total_steps} steps, "
                  f"{' + '.join(f'{sum(p.numel() for p in m.parameters()):,}' for m in models)} parameters, "
                  + ", ".join(f"{s.n_train:,} training {s.unit}" for s in data))
    return 0


def _verify_resume(args: argparse.Namespace, console: Console) -> int:
    from stagewise.engine.verify import verify_resume
    from stagewise.plan.load import load_plan

    if args.steps < 2:
        raise UserError("--steps", f"must be >= 2 (got {args.steps})")
    result = verify_resume(load_plan(args.plan, args.overrides), args.plan, steps=args.steps)
    where = f"stopped after plan step {result.stopped_at} of {result.total_steps}, then resumed"
    if result.identical:
        console.print(f"resume is exact: {where}; weights, optimizer state and logged losses are bit-identical")
        return 0
    console.print(f"resume differs: {where}; first difference: {result.difference}")
    return 1


def _report(args: argparse.Namespace, console: Console) -> int:
    from stagewise.track.report import write_report

    console.print(f"report written to {write_report(args.runs, args.out)}")
    return 0


def _runs(args: argparse.Namespace, console: Console) -> int:
    from stagewise.track.runs import find_runs, print_runs

    print_runs(console, args.dir, find_runs(args.dir))
    return 0


def _generate(args: argparse.Namespace, console: Console) -> int:
    from stagewise.tasks.spec import GenerateOptions
    from stagewise.trained import generate, open_stage

    if (args.max_tokens is not None and args.max_tokens < 1) or args.temperature < 0 \
            or (args.top_k is not None and args.top_k < 1) or (args.top_p is not None and not 0 < args.top_p <= 1) \
            or args.beam < 1:
        raise UserError("generate", "need --max-tokens >= 1, --temperature >= 0, --top-k >= 1, 0 < --top-p <= 1, "
                                    "--beam >= 1")
    options = GenerateOptions(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, beam=args.beam)
    text = generate(open_stage(args.run, args.stage), args.prompt, options)
    console.print(text, markup=False, highlight=False)
    return 0


def _evaluate(args: argparse.Namespace, console: Console) -> int:
    import json

    from stagewise.trained import COUNTS, evaluate, open_stage

    if args.beam is not None and args.beam < 1:
        raise UserError("--beam", f"must be >= 1 (got {args.beam})")
    stage = open_stage(args.run, args.stage)
    metrics = evaluate(stage, args.data, args.format, args.beam)
    if args.json:
        print(json.dumps({"stage": stage.name, "task": stage.task, **metrics}))
        return 0
    unit = next(k for k in COUNTS if k in metrics)
    shown = ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in metrics.items() if k != unit)
    console.print(f"{stage.name} on {args.data}: {shown} ({metrics[unit]:,} {unit})", markup=False, highlight=False)
    return 0


def _export(args: argparse.Namespace, console: Console) -> int:
    from stagewise.trained import export

    name, to = export(args.run, args.stage, args.to)
    console.print(f"stage '{name}' exported to {to}")
    return 0
