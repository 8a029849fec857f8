"""`stagewise` command line: parses arguments and calls the packages; bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from stagewise.engine.cpu_load import start_window
from stagewise.errors import RunStopped, UserError
from stagewise.plan.plugins import load_plugins

if TYPE_CHECKING:
    from stagewise.api.user_plan import Plan


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
    check.add_argument("--out", type=Path, help="the run directory train will use (default: runs/<plan name>): "
                                                "its stage cache is the one checked")
    _cache_arg(check)

    lr_find = sub.add_parser("lr-find", help="LR range test of a stage: loss against an exponential LR sweep "
                                             "from the stage's starting weights; suggested LRs")
    lr_find.add_argument("plan", type=Path)
    lr_find.add_argument("overrides", nargs="*")
    lr_find.add_argument("--stage", required=True)
    lr_find.add_argument("--start", type=float, default=1e-7, help="first LR")
    lr_find.add_argument("--end", type=float, default=10.0, help="last LR")
    lr_find.add_argument("--steps", type=int, default=100, help="updates of the sweep")
    lr_find.add_argument("--write", type=Path, metavar="OUT.yaml",
                         help="also write the plan with the stage's optimizer.lr set to the suggestion")
    lr_find.add_argument("--suggestion", choices=("minimum", "steep"), default="minimum",
                         help="what --write puts in: the LR of the loss's minimum / 10, or of its steepest descent")
    lr_find.add_argument("--out", type=Path, help="where the plot goes (default: runs/<plan name>-lr-find)")
    _cache_arg(lr_find)

    search = sub.add_parser("search", help="hyperparameter search over plan keys (Optuna); trials share the "
                                           "stages they have in common through the stage cache")
    search.add_argument("plan", type=Path)
    search.add_argument("--space", type=Path, required=True, metavar="SPACE.yaml",
                        help="plan key paths -> {float: [lo, hi], log: true} | {int: [lo, hi]} | {choice: [...]}")
    search.add_argument("--trials", type=int, required=True, help="trials in the study (a resumed one counts its own)")
    search.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    search.add_argument("--storage", help="database URL (default: sqlite:///DIR/study.db)")
    search.add_argument("--study", help="study name (default: the plan's name)")
    search.add_argument("--out", type=Path, help="search directory (default: runs/<plan name>-search)")
    search.add_argument("--metric", help="STAGE.METRIC to optimize (default: the last stage's val_loss)")
    search.add_argument("--direction", choices=("minimize", "maximize"),
                        help="default: minimize a loss or perplexity, maximize anything else")
    search.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    search.add_argument("--sampler", choices=("tpe", "random"), default="tpe")
    search.add_argument("--cv", type=int, metavar="K", help="score each trial by K-fold stratified cross-validation "
                                                           "of the metric's stage")

    report = sub.add_parser("report", help="plots and an HTML page of a run (or a search); of several runs, compared")
    report.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    report.add_argument("--out", type=Path, help="output directory (default: the first run's directory)")

    runs = sub.add_parser("runs", help="list the runs in a directory")
    runs.add_argument("dir", type=Path, nargs="?", default=Path("runs"))
    runs.add_argument("--metric", metavar="NAME", help="also show each run's best value of this evaluation metric "
                                                       "(e.g. val_accuracy, val_bleu: the highest; *loss, *ppl: "
                                                       "the lowest)")

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
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="causal_lm, sft: end the continuation at TEXT (repeatable; EOS and the chat "
                               "template's end marker always end it)")
    generate.add_argument("--chat", nargs="?", const="", metavar="JSON",
                          help="causal_lm, sft: reply to a conversation, rendered with the stage's chat template: "
                               "the messages of a JSON file, or the --system/--user/--assistant turns")
    for role in ("system", "user", "assistant"):
        generate.add_argument(f"--{role}", dest="turns", action="append", metavar="TEXT", type=_turn(role),
                              help=f"a {role} turn of the conversation (repeatable, in order; implies --chat)")

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
    for name, command in sub.choices.items():
        if name not in ("report", "runs"):
            command.add_argument("--plugin", action="append", default=[], metavar="MODULE|FILE.py",
                                 help="import this module or file first: the tasks, optimizers, schedules, callbacks "
                                      "and trackers it registers can be named in the plan (repeatable; a plan never imports code)")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Overrides may stand anywhere after the plan (`train PLAN --out DIR key=v`). argparse takes the
    positionals only up to the first option, and its parse_intermixed_args refuses subcommands: the
    `key=value` words left over are the overrides that follow an option, in command-line order."""
    args, rest = parser.parse_known_args(argv)
    args.typed = list(sys.argv[1:] if argv is None else argv)  # the command line as typed (resume hints)
    if hasattr(args, "overrides"):
        moved = [word for word in rest if "=" in word and not word.startswith("-")]
        args.overrides += moved
        rest = [word for word in rest if word not in moved]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def _turn(role: str) -> Callable[[str], dict[str, str]]:
    """A --system/--user/--assistant argument as a chat message."""
    return lambda text: {"role": role, "content": text}


def _cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=Path, default=None,
                   help="token and stage cache (default: .cache beside the run directory)")


def main(argv: list[str] | None = None) -> int:
    start_window()  # `threads: auto` measures the machine's load from here, before torch is imported
    args = _parse(_parser(), argv)
    # Off a terminal (CI logs, pipes) rich assumes 80 columns and would cut the tables.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    commands = {"train": _train, "check": _check, "verify-resume": _verify_resume, "report": _report, "runs": _runs,
                "generate": _generate, "evaluate": _evaluate, "export": _export, "lr-find": _lr_find,
                "search": _search}
    speaks = os.environ.get("RANK", "0") == "0"  # of the processes torchrun started, rank 0 tells what stopped them
    try:
        load_plugins(getattr(args, "plugin", []))
        return commands[args.command](args, console)
    except UserError as e:
        if speaks:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        if speaks:
            print(str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _plan(args: argparse.Namespace) -> Plan:
    """The plan file with the command line's overrides."""
    from stagewise.api.user_plan import Plan

    return Plan.from_yaml(args.plan, args.overrides)


def _train(args: argparse.Namespace, console: Console) -> int:
    import stagewise

    # A stopped run says to run this again, as typed, but without starting over.
    again = shlex.join(["stagewise", *(w for w in args.typed if not (w.startswith("--f") and "--fresh".startswith(w)))])
    run = stagewise.train(_plan(args), out=args.out, cache=args.cache, fresh=args.fresh, console=console,
                          command=again)
    console.print(f"run written to {run.path}")
    return 0


def _check(args: argparse.Namespace, console: Console) -> int:
    import stagewise
    from stagewise.track.plan_view import print_plan

    checked = stagewise.check(_plan(args), out=args.out, cache=args.cache)
    prepared = checked.prepared
    print_plan(console, prepared.plan.name, prepared.resolved, checked.status)
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

    if args.steps < 2:
        raise UserError("--steps", f"must be >= 2 (got {args.steps})")
    result = verify_resume(_plan(args).config, args.plan, steps=args.steps)
    where = f"stopped after plan step {result.stopped_at} of {result.total_steps}, then resumed"
    if result.identical:
        console.print(f"resume is exact: {where}; weights, optimizer state and logged losses are bit-identical")
        return 0
    console.print(f"resume differs: {where}; first difference: {result.difference}")
    return 1


def _report(args: argparse.Namespace, console: Console) -> int:
    import stagewise

    console.print(f"report written to {stagewise.report(args.runs, out=args.out)}")
    return 0


def _runs(args: argparse.Namespace, console: Console) -> int:
    import stagewise
    from stagewise.track.runs import print_runs

    print_runs(console, args.dir, stagewise.runs(args.dir), args.metric)
    return 0


def _generate(args: argparse.Namespace, console: Console) -> int:
    import stagewise

    text = stagewise.open_run(args.run).generate(
        args.prompt, stage=args.stage, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, beam=args.beam, stop=tuple(args.stop), messages=_conversation(args))
    console.print(text, markup=False, highlight=False)
    return 0


def _conversation(args: argparse.Namespace) -> list[dict[str, str]] | None:
    """generate's conversation: a JSON file's messages (--chat FILE) or the --system/--user/--assistant turns."""
    import json

    from stagewise.tasks.chat import read_messages

    if args.chat is None and args.turns is None:
        return None
    if args.prompt:
        raise UserError("--prompt", "a conversation (--chat, --user, ...) takes the place of the prompt")
    if args.chat and args.turns:
        raise UserError("--chat", "give a JSON file or --system/--user/--assistant turns, not both")
    if not args.chat:
        if not args.turns:
            raise UserError("--chat", "give a JSON file of messages or --user TEXT")
        return list(args.turns)
    path = Path(args.chat)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(str(path), f"cannot read: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(str(path), f"not a JSON file: {e}") from None
    return list(read_messages(value, str(path)))


def _evaluate(args: argparse.Namespace, console: Console) -> int:
    import json

    import stagewise
    from stagewise.track.trained import COUNTS

    result = stagewise.open_run(args.run).evaluate(args.data, stage=args.stage, format=args.format, beam=args.beam)
    if args.json:
        print(json.dumps(result))
        return 0
    metrics = {k: v for k, v in result.items() if k not in ("stage", "task")}
    unit = next(k for k in COUNTS if k in metrics)
    shown = ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in metrics.items() if k != unit)
    console.print(f"{result['stage']} on {args.data}: {shown} ({metrics[unit]:,} {unit})", markup=False,
                  highlight=False)
    return 0


def _export(args: argparse.Namespace, console: Console) -> int:
    import stagewise

    name, to = stagewise.open_run(args.run).export(args.to, stage=args.stage)
    console.print(f"stage '{name}' exported to {to}")
    return 0


def _lr_find(args: argparse.Namespace, console: Console) -> int:
    import stagewise

    found = stagewise.lr_find(_plan(args), args.stage, start=args.start, end=args.end, steps=args.steps,
                              out=args.out, cache=args.cache, write=args.write, suggestion=args.suggestion,
                              console=console)
    shown = {"steepest descent": found.steep, "minimum / 10": found.minimum}
    suggested = f"no suggested LR: {found.flat}" if found.flat else "suggested LR: " + ", ".join(
        f"{k} {'-' if v is None else f'{v:.2e}'}" for k, v in shown.items())
    console.print(f"lr-find of stage '{found.stage}': {len(found.lrs)} updates, {found.stopped}; {suggested}",
                  markup=False, highlight=False)
    written = f"; plan written to {found.written}" if found.written else (
        "; no plan written (no suggestion)" if args.write is not None else "")
    console.print(f"plot written to {found.plot}{written}", markup=False, highlight=False)
    return 0


def _search(args: argparse.Namespace, console: Console) -> int:
    import stagewise

    result = stagewise.search(stagewise.Plan.from_yaml(args.plan), args.space, trials=args.trials, workers=args.workers,
                    storage=args.storage, study=args.study, out=args.out, metric=args.metric,
                    direction=args.direction, pruner=args.pruner, sampler=args.sampler, cv=args.cv,
                    plugins=tuple(args.plugin), console=console)
    console.print(f"search written to {result.out}")
    return 0
