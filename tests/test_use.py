"""Using a trained run: export, generate, evaluate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_plan, write_plan
from transformers import AutoModelForCausalLM, AutoTokenizer

from stagewise.cli import main
from stagewise.engine.prepare_run import Prepared, prepare
from stagewise.engine.run_plan import train
from stagewise.plan.load import load_plan


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Prepared, Path]:
    root = tmp_path_factory.mktemp("use")
    stages = [{"name": "lm", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 30},
              {"name": "cool", "schedule": {"name": "decay"}, "steps": 10}]
    path = write_plan(root, tiny_plan(corpus, stages))
    prepared = prepare(load_plan(path), path, root / "cache")
    train(prepared, root / "run")
    return prepared, root / "run"


def test_export_round_trips_through_from_pretrained(trained: tuple[Prepared, Path], tmp_path: Path) -> None:
    prepared, run = trained
    assert main(["export", str(run), "--stage", "cool", "--to", str(tmp_path / "out")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "ROMEO: what light"
    ids = tok.encode(text)
    assert ids == prepared.data.tokenizer.encode(text).ids
    x = torch.tensor([ids])
    with torch.no_grad():  # the model in memory ends on the last stage's weights
        assert torch.equal(model(input_ids=x).logits, prepared.root.eval()(input_ids=x).logits)


def test_export_defaults_to_the_last_finished_stage_like_generate(trained: tuple[Prepared, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, run = trained
    assert main(["export", str(run), "--to", str(tmp_path / "last")]) == 0
    assert f"stage 'cool' exported to {tmp_path / 'last'}" in capsys.readouterr().out
    exported = (tmp_path / "last" / "model.safetensors").read_bytes()
    assert exported == (run / "stages" / "cool" / "model.safetensors").read_bytes()


def test_export_refuses_to_overwrite_and_names_unknown_stages(trained: tuple[Prepared, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    _, run = trained
    (tmp_path / "taken").mkdir()
    assert main(["export", str(run), "--stage", "lm", "--to", str(tmp_path / "taken")]) == 2
    assert main(["export", str(run), "--stage", "lmm", "--to", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: --to: {tmp_path / 'taken'} already exists (exporting never overwrites)",
                   "error: --stage: 'lmm' is not a stage of this run (finished: lm, cool)"]


def test_generate_is_seeded_and_continues_the_prompt(trained: tuple[Prepared, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, run = trained
    outputs = []
    for seed in (3, 3, 4):
        assert main(["generate", str(run), "--prompt", "KING", "--max-tokens", "40", "--seed", str(seed)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2] and outputs[0].startswith("KING")
    assert main(["generate", str(run), "--top-p", "1.5"]) == 2


def test_evaluate_reports_loss_below_uniform_and_bad_files_in_one_line(
        trained: tuple[Prepared, Path], corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prepared, run = trained
    assert main(["evaluate", str(run), "--data", str(corpus), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["stage"] == "cool" and metrics["loss"] < math.log(prepared.data.vocab_size)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert main(["evaluate", str(run), "--data", str(corpus), "--stage", "lm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > metrics["loss"]  # the cooldown helped
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff")
    assert main(["evaluate", str(run), "--data", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: not UTF-8: byte 0xff at offset 3"
