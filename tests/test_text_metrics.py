"""The metrics of decoded texts (ROUGE through rouge-score, SQuAD's exact match and token F1) and
`eval.metrics`: checked against what each task can compute, and readable by rules and `until`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import write_plan

from stagewise.cli import main
from stagewise.config.registry import TASKS
from stagewise.tasks.metrics import exact_match, normalize_answer, rouge, text_scores, token_f1


def test_rouge_is_rouge_scores_mean_f_measure_in_percent() -> None:
    # 4 reference and 3 prediction unigrams, 2 shared: P 2/3, R 1/2, F 4/7; one shared bigram of 3 and 2.
    scores = rouge(["the cat sat", "a b"], ["the cat was sitting", "a b"])
    assert scores["rouge1"] == pytest.approx(100 * (4 / 7 + 1) / 2)
    assert scores["rouge2"] == pytest.approx(100 * (2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3) + 1) / 2)
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == 100.0  # Porter stemming, as the package does


def test_exact_match_and_token_f1_follow_squads_script() -> None:
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match(["the Eiffel tower", "Paris"], ["Eiffel Tower.", "Lyon"]) == 50.0
    # "in paris france" vs "paris": 1 common token, P 1/3, R 1 -> F1 1/2.
    assert token_f1(["in Paris, France"], ["Paris"]) == pytest.approx(50.0)
    assert token_f1([""], ["the"]) == 100.0  # both empty after normalization
    assert set(text_scores(["rougeL", "token_f1"], ["a"], ["a"])) == {"val_rougeL", "val_token_f1"}


def _pairs(path: Path) -> Path:
    rows = [{"q": f"where is {n} ?", "a": n} for n in ("x", "y", "z") * 20]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _plan(tmp_path: Path, stage: dict[str, Any], task: str = "seq2seq") -> Path:
    plan = {"name": "m", "seed": 0, "precision": "fp32",
            "model": {"arch": "transformer", "d_model": 16, "nhead": 2, "num_encoder_layers": 1,
                      "num_decoder_layers": 1, "dim_feedforward": 32},
            "tokenizer": {"kind": "word"},
            "data": {"train": str(_pairs(tmp_path / "qa.jsonl")), "source": "q", "target": "a"},
            "stages": [{"name": "s", "task": task, "optimizer": {"name": "adam", "lr": 1e-3}, "batch": {"size": 8},
                        "steps": 2, **stage}]}
    return write_plan(tmp_path, plan)


@pytest.mark.parametrize(("stage", "message"), [
    ({"eval": {"metrics": ["rouge3"]}},
     "stages[0].eval.metrics[0]: task seq2seq cannot compute 'rouge3' (it can compute: bleu, chrf, rouge1, rouge2, "
     "rougeL, exact_match, token_f1)"),
    ({"eval": {"metrics": ["bleu", "bleu"]}}, "stages[0].eval.metrics[1]: 'bleu' is listed twice"),
    ({"until": {"target": {"metric": "val_exact_match", "value": 90.0, "mode": "max"}}},
     "stages[0].until.target.metric: task seq2seq does not report val_exact_match (it reports: val_loss, train_loss, "
     "val_bleu, val_chrf)"),
    ({"eval": {"metrics": ["exact_match"]}, "until": {"target": {"metric": "val_bleu", "value": 9.0, "mode": "max"}}},
     "stages[0].until.target.metric: task seq2seq does not report val_bleu (it reports: val_loss, train_loss, "
     "val_exact_match)"),
])
def test_eval_metrics_are_checked_against_the_task(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   stage: dict[str, Any], message: str) -> None:
    path = _plan(tmp_path, stage)
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == f"error: {path}: {message}\n"


def test_a_rule_reads_a_selected_metric_and_the_run_logs_only_those(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    stage = {"eval": {"metrics": ["exact_match", "token_f1"], "every": 1},
             "until": {"target": {"metric": "val_exact_match", "value": 0.0, "mode": "max"}}}
    path = _plan(tmp_path, stage)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]) == 0
    evals = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open() if '"eval"' in line]
    assert set(evals[0]) >= {"val_loss", "val_exact_match", "val_token_f1"} and "val_bleu" not in evals[0]
    assert evals[-1]["stage_step"] == 1  # the target (EM >= 0) holds at the first evaluation: the stage ends


def test_every_task_declares_what_eval_metrics_may_select() -> None:
    for spec in TASKS.values():
        assert set(spec.traits.decoded) <= set(spec.traits.selectable)
        assert all(f"val_{m}" in spec.traits.metrics for m in spec.traits.decoded)
    assert {"rouge1", "exact_match", "token_f1"} <= set(TASKS["sft"].traits.selectable) & set(TASKS["seq2seq"].traits.selectable)
