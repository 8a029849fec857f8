"""The multi-stage engine end to end, on a slice of real text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_plan, write_plan
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import AutoModelForCausalLM, AutoTokenizer

from stagewise.cli import main
from stagewise.data.sampler import WindowSampler
from stagewise.engine.loop import micro_batches
from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.plan.load import load_plan


def _run(tmp_path: Path, plan: dict[str, Any], name: str = "run") -> tuple[Path, list]:
    """Train `plan` with a cache of its own, so nothing is reused from another test's run."""
    path = write_plan(tmp_path, plan, f"{name}.yaml")
    prepared = prepare(load_plan(path), path, tmp_path / f"cache-{name}")
    summaries = train(prepared, tmp_path / name)
    return tmp_path / name, summaries


THREE_STAGES = [
    {"name": "adam", "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
     "schedule": {"name": "warmup_constant", "warmup": 10}, "steps": 60, "eval": {"every": 20}},
    {"name": "sgd", "optimizer": {"name": "sgd", "lr": 0.3, "momentum": 0.9, "nesterov": True},
     "regularization": {"grad_clip": 1.0, "dropout": 0.3}, "steps": 30},
    {"name": "cool", "optimizer": {"handoff": "carry"}, "schedule": {"name": "decay", "shape": "1-sqrt"}, "steps": 30},
]


@pytest.fixture(scope="module")
def three_stage_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, list]:
    return _run(tmp_path_factory.mktemp("e2e"), tiny_plan(corpus, THREE_STAGES))


def test_plan_lowers_val_loss_across_stages(three_stage_run: tuple[Path, list]) -> None:
    run_dir, summaries = three_stage_run
    evals = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "eval"]
    assert [s.stage for s in summaries] == ["adam", "sgd", "cool"]
    assert evals[0]["stage"] == "adam" and evals[-1]["stage"] == "cool"
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # it learned, and kept learning
    assert summaries[-1].val_loss < summaries[0].val_loss
    # the first eval is at adam's step 20 of 60 (eval.every), the last at the plan's end
    assert evals[0]["step"] == 20 and evals[-1]["step"] == 120


def test_optimizer_switch_and_carry_are_logged(three_stage_run: tuple[Path, list]) -> None:
    run_dir, _ = three_stage_run
    events = read_jsonl(run_dir / "events.jsonl")
    hand_offs = [(e["event"], e["stage"], e["optimizer"]) for e in events
                 if e["event"] in ("optimizer_reset", "optimizer_carried")]
    assert hand_offs == [("optimizer_reset", "adam", "adamw"), ("optimizer_reset", "sgd", "sgd"),
                         ("optimizer_carried", "cool", "sgd")]
    starts = {e["stage"]: e for e in events if e["event"] == "stage_start"}
    # dropout is per stage: sgd's rate, then the model's own (GPT-2's 0.1) again
    assert [starts[s]["dropout"] for s in ("adam", "sgd", "cool")] == [[0.1], [0.3], [0.1]]
    assert starts["cool"]["settings"]["lr"] == pytest.approx(0.3)  # continues from sgd's constant LR


def test_metrics_lines_have_step_stage_lr_loss_throughput(three_stage_run: tuple[Path, list]) -> None:
    run_dir, _ = three_stage_run
    train_lines = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "train"]
    assert [m["step"] for m in train_lines] == list(range(5, 121, 5))
    first = train_lines[0]
    assert set(first) >= {"step", "stage", "lr", "loss", "tok_per_s", "tokens", "grad_norm"}
    assert first["lr"] == pytest.approx(3e-3 * 5 / 11)  # inside the warmup
    assert train_lines[-1]["tokens"] == 120 * 8 * 32


def test_run_files_and_exports_load_with_transformers(three_stage_run: tuple[Path, list]) -> None:
    run_dir, _ = three_stage_run
    for name in ("plan.yaml", "tokenizer.json", "metrics.jsonl", "events.jsonl"):
        assert (run_dir / name).is_file()
    # the resolved plan the run keeps is a plan: it loads back as the one that was run
    assert load_plan(run_dir / "plan.yaml") == load_plan(run_dir.parent / "run.yaml")
    for stage in ("adam", "sgd", "cool"):
        assert (run_dir / "stages" / stage / "model.safetensors").is_file()
    # stage weights differ from stage to stage, and the export reproduces the final weights
    adam = load_file(run_dir / "stages/adam/model.safetensors")
    cool = load_file(run_dir / "stages/cool/model.safetensors")
    assert not torch.equal(adam["transformer.h.0.mlp.c_fc.weight"], cool["transformer.h.0.mlp.c_fc.weight"])
    model = AutoModelForCausalLM.from_pretrained(run_dir / "stages/cool")
    tok = AutoTokenizer.from_pretrained(run_dir / "stages/cool")
    ids = tok("To be, or not", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "To be, or not"
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    # the stage's config builds the model its weights fit: every tensor is loaded, none left at
    # its random init (only the output head may be missing: it is tied to the embeddings)
    loaded = model.state_dict()
    assert set(loaded) - set(cool) <= {"lm_head.weight"} and set(cool) <= set(loaded)
    assert all(torch.equal(loaded[name], weight) for name, weight in cool.items())


def test_same_plan_and_seed_give_identical_losses(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "a", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 15,
               "regularization": {"dropout": 0.1}},
              {"name": "b", "optimizer": {"name": "muon", "lr": 1e-2}, "steps": 10}]
    first, _ = _run(tmp_path, tiny_plan(corpus, stages), "one")
    second, _ = _run(tmp_path, tiny_plan(corpus, stages), "two")
    losses = [[(m["step"], m.get("loss"), m.get("val_loss")) for m in read_jsonl(d / "metrics.jsonl")]
              for d in (first, second)]
    assert losses[0] == losses[1]
    other, _ = _run(tmp_path, tiny_plan(corpus, stages, seed=8), "three")
    assert [m.get("loss") for m in read_jsonl(other / "metrics.jsonl")] != [loss for _, loss, _ in losses[0]]


def test_gd_makes_exactly_one_update_per_pass(tmp_path: Path, corpus: Path) -> None:
    plan = tiny_plan(corpus, [{"name": "gd", "optimizer": {"name": "gd", "lr": 0.5}, "steps": 3}])
    path = write_plan(tmp_path, plan)
    prepared = prepare(load_plan(path), path, tmp_path / "cache")
    stage = prepared.stages[0].resolved
    assert stage.full_batch and stage.steps == 3
    sampler = WindowSampler(prepared.data.train, stage.block_size, stage.batch_size, seed=1)
    for update in range(1, 3):
        batches = list(micro_batches(sampler, stage))
        assert sum(batch[0].size(0) for batch, _ in batches) == stage.windows_per_epoch  # every window, once
        assert sum(share for _, share in batches) == pytest.approx(1.0)
        assert sampler.epoch == update and sampler.position == 0
    # and the run itself makes one optimizer step per pass
    steps: list[int] = []
    handle = register_optimizer_step_post_hook(lambda *_: steps.append(1))
    run_dir = tmp_path / "gd-run"
    try:
        train(prepared, run_dir)
    finally:
        handle.remove()
    assert len(steps) == 3
    losses = [m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "train"]
    assert len(losses) == 1


def test_cli_train_again_reuses_every_stage_and_fresh_retrains(tmp_path: Path, corpus: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    plan = tiny_plan(corpus, [{"name": "a", "optimizer": {"name": "adam", "lr": 1e-3}, "steps": 5}],
                     sample={"prompt": "ROMEO", "max_tokens": 20})
    path = write_plan(tmp_path, plan)
    args = ["train", str(path), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "c")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "sample:" in printed and "ROMEO" in printed and "val loss" in printed
    assert main(args) == 0
    assert "[a] reused from the stage cache" in capsys.readouterr().out
    events = [e["event"] for e in read_jsonl(tmp_path / "out" / "events.jsonl")]
    assert events.count("stage_end") == 1 and events.count("stage_reused") == 1
    assert main([*args, "--fresh"]) == 0
    events = [e["event"] for e in read_jsonl(tmp_path / "out" / "events.jsonl")]
    assert events[0] == "plan_start" and "stage_reused" not in events and "stage_end" in events
