"""What `auto` picks for precision, compile and threads (engine.device), and how the plan keys
are checked. Pure functions of their inputs: no speed is measured here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_plan, write_plan

from stagewise.cli import main
from stagewise.config.plan_config import ModelConfig
from stagewise.engine import device as dev
from stagewise.engine.device import (
    COMPILE_PAYS_AFTER_S,
    CPU_BF16_MIN_WIDTH,
    EAGER_FLOPS,
    flops_per_token,
    model_width,
    pick_compile,
    pick_precision,
    pick_threads,
    plan_lm_tokens,
)
from stagewise.models.build import build_model
from stagewise.plan.load import validate_plan

PRECISION = [
    # name, device type, model width, native bf16 -> picked
    ("auto", "cpu", 128, True, "fp32"),  # narrow: the casts cost more than bf16 matmuls save
    ("auto", "cpu", CPU_BF16_MIN_WIDTH - 1, True, "fp32"),
    ("auto", "cpu", CPU_BF16_MIN_WIDTH, True, "bf16"),
    ("auto", "cpu", 1024, False, "fp32"),  # no native bf16: emulated, never faster
    ("auto", "cuda", 128, True, "bf16"),
    ("auto", "cuda", 1024, False, "fp32"),
    ("fp32", "cuda", 1024, True, "fp32"),
    ("bf16", "cpu", 64, False, "bf16"),  # asked for: given, even where it is slow
]


@pytest.mark.parametrize("name,device_type,width,native,picked", PRECISION)
def test_precision_auto(name: str, device_type: str, width: int, native: bool, picked: str) -> None:
    assert pick_precision(name, device_type, width, native) == picked


def test_model_width_and_the_autocast_dtype() -> None:
    gpt2 = build_model(ModelConfig(arch="gpt2", n_layer=1, n_head=2, n_embd=CPU_BF16_MIN_WIDTH, n_positions=8),
                       vocab_size=16, eos_id=0, plan_dir=Path("."))
    narrow = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 4))
    assert (model_width(gpt2), model_width(narrow), model_width(torch.nn.ReLU())) == (CPU_BF16_MIN_WIDTH, 32, 0)
    cpu = torch.device("cpu")
    assert dev.resolve_precision("fp32", cpu, gpt2) is None
    assert dev.resolve_precision("bf16", cpu, narrow) is torch.bfloat16
    assert dev.resolve_precision("auto", cpu, narrow) is None
    assert dev.resolve_precision("auto", cpu, gpt2) is (torch.bfloat16 if dev.native_bf16(cpu) else None)


_PAYS = COMPILE_PAYS_AFTER_S * EAGER_FLOPS["cpu"]  # FLOPs of training at which CPU compiling pays
COMPILE = [
    # plan's compile, device type, training FLOPs -> compiled
    (True, "cpu", 0.0, True),
    (False, "cpu", 1e30, False),
    ("auto", "cpu", 0.0, False),  # nothing to compile (no causal LM)
    ("auto", "cpu", 0.5 * _PAYS, False),
    ("auto", "cpu", _PAYS, True),
    ("auto", "cuda", _PAYS, False),  # the same work is seconds on a GPU: compiling would not pay
    ("auto", "cuda", COMPILE_PAYS_AFTER_S * EAGER_FLOPS["cuda"], True),
    ("auto", "mps", 1e30, False),  # a device without an estimate: left eager
]


@pytest.mark.parametrize("value,device_type,flops,compiled", COMPILE)
def test_compile_auto(value: bool | str, device_type: str, flops: float, compiled: bool) -> None:
    assert pick_compile(value, device_type, flops) is compiled


THREADS = [
    # plan's threads, OMP_NUM_THREADS, physical cores, cores other processes keep busy -> threads
    (3, None, 2, 0.0, 3),  # explicit: as given, whatever the machine
    (1, "4", 8, 6.0, 1),
    ("auto", None, 2, 0.0, 2),
    ("auto", None, 2, 0.4, 2),  # under half a core busy: still ours
    ("auto", None, 2, 0.6, 1),
    ("auto", None, 2, 1.7, 1),
    ("auto", None, 2, 9.0, 1),  # never fewer than one
    ("auto", None, 8, 2.5, 5),
    ("auto", "3", 2, 9.0, 3),  # OMP_NUM_THREADS is the user's word: honoured as set
    ("auto", "1", 8, 0.0, 1),
    ("auto", "", 4, 0.0, 4),  # set but empty, or not a count: ignored
    ("auto", "x", 4, 1.0, 3),
    ("auto", "0", 4, 0.0, 4),
]


@pytest.mark.parametrize("value,omp,cores,busy,threads", THREADS)
def test_threads_auto(value: int | str, omp: str | None, cores: int, busy: float, threads: int) -> None:
    assert pick_threads(value, omp, cores, busy) == threads


def test_threads_auto_is_settled_once_per_process_and_a_resume_keeps_its_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "_PICKED", {})
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert dev.resolve_threads("auto") == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # later changes do not move this process's count
    assert dev.resolve_threads("auto") == 3
    assert dev.resolve_threads("auto", previous=2) == 2  # a resumed run: the count it started with
    assert dev.resolve_threads(4, previous=2) == 4  # an explicit count always wins


def test_physical_cores_and_busy_cores_are_plausible() -> None:
    assert 1 <= dev.physical_cores() <= (os.cpu_count() or 1)
    assert dev.busy_cores() >= 0.0


def _plan(corpus: Path, **top: Any) -> dict[str, Any]:
    return tiny_plan(corpus, [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 100},
                              {"name": "b", "batch": {"size": 4, "block_size": 16}, "tokens": 6400},
                              {"name": "c", "epochs": 2}], **top)


def test_plan_lm_tokens_estimates_each_duration(corpus: Path) -> None:
    plan = validate_plan(_plan(corpus), "plan.yaml")
    assert plan_lm_tokens(plan, train_tokens=50_000, context=32) == [(100 * 8 * 32, 32), (6400, 16), (100_000, 32)]
    ramped = _plan(corpus)
    ramped["stages"] = [{"name": "r", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 10,
                         "batch": {"size": 8, "ramp": {"to": 32, "over": 0.5}}}]
    # micro-batches per update 1, 1, 2, 2, 3 over the ramp's 5 steps, then 4 for 5 more
    assert plan_lm_tokens(validate_plan(ramped, "plan.yaml"), 50_000, 32) == [((1 + 1 + 2 + 2 + 3 + 5 * 4) * 8 * 32, 32)]
    assert flops_per_token(1000, 2, 32, 16) == 6 * 1000 + 12 * 2 * 32 * 16
    assert flops_per_token(1000, None, None, 16) == 6000


def test_plan_keys_default_to_auto(corpus: Path) -> None:
    plan = validate_plan(_plan(corpus), "plan.yaml")
    assert (plan.compile, plan.threads) == ("auto", "auto")
    plan = validate_plan(_plan(corpus, compile=True, threads=2), "plan.yaml")
    assert (plan.compile, plan.threads) == (True, 2)


@pytest.mark.parametrize("key,value,expected", [
    ("threads", 0, "threads: must be a positive integer (at most 4096) or auto (got 0)"),
    ("threads", "x", "threads: must be a positive integer (at most 4096) or auto (got 'x')"),
    ("threads", True, "threads: must be a positive integer (at most 4096) or auto (got True)"),
    ("threads", 1.5, "threads: must be a positive integer (at most 4096) or auto (got 1.5)"),
    ("compile", "yes", "compile: must be true, false or auto (got 'yes')"),
    ("compile", 1, "compile: must be true, false or auto (got 1)"),
])
def test_bad_settings_are_one_line_plan_errors(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str],
                                               key: str, value: Any, expected: str) -> None:
    path = write_plan(tmp_path, _plan(corpus, **{key: value}))
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: {expected}\n"


def test_the_run_prints_and_records_what_auto_picked(tmp_path: Path, corpus: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "_PICKED", {})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    plan = tiny_plan(corpus, [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 4}])
    del plan["precision"]  # every setting left to auto
    path = write_plan(tmp_path, plan)
    try:
        assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "settings: cpu (auto), fp32 (auto), eager (auto), 1 thread (auto)" in out
    start = next(json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "plan_start")
    assert (start["precision"], start["compiled"], start["threads"]) == ("fp32", False, 1)
