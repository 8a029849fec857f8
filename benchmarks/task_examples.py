"""The task examples of examples/tasks/ on the data examples/tasks/make_data.py writes, run as
they are, against each task's trivial baseline on the same validation split:

  summarization  ROUGE-1/2/L of the summaries    vs the lead 1, 2 and 3 sentences
  qa             exact match, token F1            vs the most frequent training answer
  dialogue       exact match of greedy replies    vs the most frequent training reply
  srl            span F1 of the roles             vs each word's most frequent training role

Results go to benchmarks/results/task_examples.json.

    .venv/bin/python benchmarks/task_examples.py               # all four
    .venv/bin/python benchmarks/task_examples.py qa srl        # some
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from common import write_results
from rich.console import Console
from rich.table import Table

from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_plan import train
from stagewise.plan.load import load_plan
from stagewise.tasks.batches import split_records
from stagewise.tasks.chat import ChatTemplate
from stagewise.tasks.metrics import exact_match, rouge, span_f1, token_f1
from stagewise.tasks.readers import read_conll, read_pairs, read_prompt_completion
from stagewise.tasks.tag import most_frequent_tags

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "tasks"
NAMES = ("summarization", "qa", "dialogue", "srl")
RESULTS = ROOT / "benchmarks" / "results" / "task_examples.json"


def _lead(document: str, k: int) -> str:
    return " ".join(re.findall(r"[^.]+\.", document)[:k]).strip()


def baseline(name: str, data: Path) -> dict[str, float]:
    """The trivial baseline's scores on the validation split the plan holds out (seed 0, 10%)."""
    if name == "summarization":
        _, val = split_records(read_pairs(data / "summaries.jsonl", "document", "summary"), 0.1, 0)
        scores = {}
        for k in (1, 2, 3):
            scores |= {f"lead{k}_{m}": v for m, v in rouge([_lead(d, k) for d, _ in val], [s for _, s in val]).items()}
        return scores
    if name == "qa":
        train_rows, val = split_records(read_pairs(data / "answers.jsonl", "question", "answer"), 0.1, 0)
        frequent = Counter(a for _, a in train_rows).most_common(1)[0][0]
        answers = [a for _, a in val]
        return {"exact_match": exact_match([frequent] * len(val), answers),
                "token_f1": token_f1([frequent] * len(val), answers)}
    if name == "dialogue":
        train_rows, val = split_records(read_prompt_completion(data / "dialogues.jsonl"), 0.1, 0)
        reply = ChatTemplate().reply
        frequent = Counter(reply(c) for _, c in train_rows).most_common(1)[0][0]
        replies = [reply(c) for _, c in val[:64]]  # what the plan decodes: eval.batches 4 x batch 16
        return {"exact_match": exact_match([frequent] * len(replies), replies)}
    train_rows, val_rows = split_records(read_conll(data / "roles.conll"), 0.1, 0)
    guess = most_frequent_tags(train_rows, [words for words, _ in val_rows])
    return {"span_f1": span_f1(guess, [tags for _, tags in val_rows])}


def run(name: str, work: Path, data: Path) -> dict[str, Any]:
    plan = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))
    plan["data"]["train"] = str(data / plan["data"]["train"].removeprefix("data/"))
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
    prepared = prepare(load_plan(path), path, work / "cache")
    started = time.perf_counter()
    [summary] = train(prepared, work / name, console=Console(file=io.StringIO()))
    return {"wall_s": round(time.perf_counter() - started, 1), "steps": summary.steps,
            "metrics": {k: round(v, 4) for k, v in summary.metrics.items()},
            "baseline": {k: round(v, 4) for k, v in baseline(name, data).items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(NAMES), help=", ".join(NAMES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in NAMES:
            parser.error(f"no example '{name}' (known: {', '.join(NAMES)})")
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    assert spec is not None and spec.loader is not None
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    console = Console(width=max(Console().width, 100))
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="stagewise-tasks-") as tmp:
        data = make_data.write(Path(tmp) / "data")
        for name in args.names:
            console.print(f"{name} ...")
            report[name] = run(name, Path(tmp), data)
    table = Table(title="task examples (examples/tasks/), final validation vs the trivial baseline")
    for col in ("example", "steps", "time", "metrics", "baseline"):
        table.add_column(col, justify="right" if col in ("steps", "time") else "left")
    for name, r in report.items():
        shown = ", ".join(f"{k.removeprefix('val_')} {v:.2f}" for k, v in r["metrics"].items() if k != "val_loss")
        table.add_row(name, str(r["steps"]), f"{r['wall_s']:.0f}s", shown,
                      ", ".join(f"{k} {v:.2f}" for k, v in r["baseline"].items()))
    console.print(table)
    write_results(args.out, report, "task_examples.py", argv)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
