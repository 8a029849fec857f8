"""One example plan per task the project is for (examples/tasks/): each passes `stagewise check`
and trains, shortened, on the data examples/tasks/make_data.py writes or a slice of ../shared/data;
each reports its metric, and beats the task's trivial baseline: ROUGE of the lead sentences,
exact match of the most frequent answer or reply, span F1 of each word's most frequent role,
perplexity of a uniform guess."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from stagewise.cli import main
from stagewise.tasks.batches import split_records
from stagewise.tasks.metrics import exact_match, rouge, span_f1
from stagewise.tasks.readers import read_conll, read_pairs, read_prompt_completion
from stagewise.tasks.tag import most_frequent_tags

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tasks"
TASKS = {"translation": "seq2seq", "summarization": "seq2seq", "qa": "seq2seq", "dialogue": "sft",
         "classification": "classify", "srl": "tag", "generation": "causal_lm"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write(tmp_path_factory.mktemp("examples") / "data", scale=0.5)


def _plan(name: str, data: Path, tmp_path: Path, lines: int | None = None, **stage: Any) -> Path:
    """The example with its data paths made absolute (a slice of `lines` lines of a shared file) and
    the stage's keys replaced by `stage`."""
    plan = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8"))
    train = plan["data"]["train"]
    if train.startswith("data/"):
        path = data / train.removeprefix("data/")
    else:
        path = (EXAMPLES / train).resolve()
        if not path.is_file():
            pytest.skip(f"{path} is not here")
        if lines is not None:
            sliced = tmp_path / path.name
            sliced.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]),
                              encoding="utf-8")
            path = sliced
    plan["data"]["train"] = str(path)
    plan["stages"][0].update(stage)
    plan["sample"] = None
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
    return out


def _train(path: Path, tmp_path: Path) -> dict[str, float]:
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--cache", str(tmp_path / "cache")]) == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").open() if '"eval"' in line][-1]


@pytest.mark.parametrize("name", list(TASKS))
def test_every_example_plan_checks(name: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _plan(name, data, tmp_path, lines=400)
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 0
    assert "plan OK" in capsys.readouterr().out
    assert yaml.safe_load(path.read_text())["stages"][0].get("task", "causal_lm") == TASKS[name]
    readme = (EXAMPLES.parents[1] / "docs" / "reference" / "tasks.md").read_text(encoding="utf-8")
    assert f"examples/tasks/{name}.yaml" in readme


def _lead(document: str, k: int) -> str:
    return " ".join(re.findall(r"[^.]+\.", document)[:k]).strip()


def test_summarization_beats_the_lead_sentences(data: Path, tmp_path: Path) -> None:
    path = _plan("summarization", data, tmp_path, epochs=6)
    final = _train(path, tmp_path)
    _, val = split_records(read_pairs(data / "summaries.jsonl", "document", "summary"), 0.1, 0)
    for k in (1, 2, 3):
        lead = rouge([_lead(d, k) for d, _ in val], [s for _, s in val])
        for kind in ("rouge1", "rouge2", "rougeL"):
            assert final[f"val_{kind}"] > lead[kind] + 5.0, (k, kind, final, lead)


def test_qa_beats_the_most_frequent_answer(data: Path, tmp_path: Path) -> None:
    path = _plan("qa", data, tmp_path, epochs=4)
    final = _train(path, tmp_path)
    train, val = split_records(read_pairs(data / "answers.jsonl", "question", "answer"), 0.1, 0)
    frequent = Counter(a for _, a in train).most_common(1)[0][0]
    baseline = exact_match([frequent] * len(val), [a for _, a in val])
    assert final["val_exact_match"] > baseline + 10.0 and final["val_token_f1"] >= final["val_exact_match"], \
        (final, baseline)


def test_dialogue_beats_the_most_frequent_reply(data: Path, tmp_path: Path) -> None:
    path = _plan("dialogue", data, tmp_path, steps=200, eval={"batches": 2, "metrics": ["exact_match"]})
    final = _train(path, tmp_path)
    train, val = split_records(read_prompt_completion(data / "dialogues.jsonl"), 0.1, 0)
    frequent = Counter(c for _, c in train).most_common(1)[0][0].removesuffix("<|end|>\n")
    replies = [c.removesuffix("<|end|>\n") for _, c in val[:32]]  # the ones decoded: eval.batches x batch.size
    baseline = exact_match([frequent] * len(replies), replies)
    assert final["val_exact_match"] > baseline + 20.0, (final, baseline)


def test_srl_beats_each_words_most_frequent_role(data: Path, tmp_path: Path) -> None:
    final = _train(_plan("srl", data, tmp_path), tmp_path)
    train, val = split_records(read_conll(data / "roles.conll"), 0.1, 0)
    baseline = span_f1(most_frequent_tags(train, [words for words, _ in val]), [tags for _, tags in val])
    assert final["val_span_f1"] > baseline + 0.1, (final, baseline)


@pytest.mark.parametrize(("name", "lines", "stage", "metric"), [
    ("translation", 600, {"epochs": 2}, "val_bleu"),
    ("classification", 600, {"epochs": 1}, "val_macro_f1"),
    ("generation", None, {"steps": 40, "schedule": {"name": "cosine", "warmup": 5}, "eval": {"batches": 4}},
     "val_ppl"),
])
def test_the_shared_data_examples_train_and_report_their_metrics(name: str, lines: int | None, stage: dict[str, Any],
                                                                 metric: str, data: Path, tmp_path: Path) -> None:
    final = _train(_plan(name, data, tmp_path, lines=lines, **stage), tmp_path)
    assert metric in final
    if name == "generation":  # well below a uniform guess over the characters
        tokenizer = json.loads((tmp_path / "run/tokenizer.json").read_text(encoding="utf-8"))
        assert final["val_ppl"] < len(tokenizer["model"]["vocab"]) / 2, final
    else:  # below a uniform guess over the classes / the target vocabulary's words
        assert final["val_loss"] < math.log(2 if name == "classification" else 1000), final
