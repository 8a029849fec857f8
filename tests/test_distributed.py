"""Data-parallel runs (engine.distributed): 2 processes on CPU with gloo, started by torchrun as a
user would, against the same plan in one process.

Tolerance: the 2-process run computes each micro-batch's mean loss as the mean of two half-batch
means, and its gradient as the all-reduced mean of two half-batch gradients: the same numbers
summed in another order, so fp32 results differ by rounding (~1e-7 relative per update), which
AdamW's normalized steps carry along without growing much over these few updates. Measured
differences are ~1e-6 relative; the tests allow 1e-4. Resuming at the same world size is exact.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import events, metrics, stage_weights, tiny_plan, write_plan

from stagewise.engine.distributed import World, check_split
from stagewise.errors import UserError

TOLERANCE = 1e-4
STAGES: list[dict[str, Any]] = [
    {"name": "a", "optimizer": {"name": "adamw", "lr": 3.0e-3}, "steps": 60, "eval": {"every": 20, "batches": 10}},
    {"name": "b", "optimizer": {"handoff": "carry"}, "schedule": {"name": "decay", "shape": "linear"}, "steps": 10},
]
TOP: dict[str, Any] = {"threads": 1, "log": {"every": 1}, "checkpoint": {"every": 4, "keep": 2},
                       "defaults": {"batch": {"size": 8, "accumulate": 2}, "regularization": {"dropout": 0.0}}}


def _plan(tmp: Path, corpus: Path, tag: str, stages: list[dict[str, Any]] = STAGES, **top: Any) -> Path:
    return write_plan(tmp, tiny_plan(corpus, stages, **{**TOP, **top}), f"{tag}.yaml")


def _torchrun(plan: Path, out: Path, cache: Path, **popen: Any) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "stagewise", "train", str(plan), "--out", str(out), "--cache", str(cache)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _two(plan: Path, out: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    proc = _torchrun(plan, out, cache)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _one(plan: Path, out: Path, cache: Path) -> None:
    from stagewise.engine.prepare_run import prepare
    from stagewise.engine.run_plan import train
    from stagewise.plan.load import load_plan

    train(prepare(load_plan(plan), plan, cache), out)


def _val(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["val_loss"]) for m in metrics(run, "eval")]


def _close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return [s for s, _ in a] == [s for s, _ in b] and all(x == pytest.approx(y, rel=TOLERANCE) for (_, x), (_, y) in
                                                          zip(a, b, strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Path]:
    """The plan trained once in one process and once in two (torchrun)."""
    tmp = tmp_path_factory.mktemp("dp")
    plan = _plan(tmp, corpus, "plan", track=["tensorboard", "mlflow"] if importlib.util.find_spec("mlflow") else [])
    _one(plan, tmp / "one", tmp / "cache-one")
    assert not torch.distributed.is_initialized()  # one process never starts a process group
    done = _two(plan, tmp / "two", tmp / "cache-two")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"plan": plan, "one": tmp / "one", "two": tmp / "two", "tmp": tmp, "stdout": Path(done.stdout)}


def test_two_processes_train_as_one_with_the_same_global_batch(runs: dict[str, Path]) -> None:
    one, two = _val(runs["one"]), _val(runs["two"])
    assert len(one) == 4 and _close(one, two), (one, two)
    assert one != two  # not the same run read twice: the sums are taken in another order
    start = events(runs["two"], "plan_start")
    assert len(start) == 1 and start[0]["world_size"] == 2  # rank 0 alone writes the logs
    assert [(s["batch_per_rank"], s["accumulate"]) for s in start[0]["stages"]] == [(4, 2), (4, 2)]
    assert events(runs["one"], "plan_start")[0]["world_size"] == 1
    assert len(metrics(runs["two"], "train")) == 70  # one line per update, not one per rank
    assert "data parallel: 2 processes (ddp)" in str(runs["stdout"])
    assert (runs["two"] / "stages" / "b" / "model.safetensors").is_file()
    if importlib.util.find_spec("mlflow"):  # only rank 0 logs to the trackers: one MLflow run, one point per update
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{runs['two'] / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 70


def _wait_for_step(proc: subprocess.Popen[str], run: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if (run / "metrics.jsonl").exists() and any(m["step"] >= step for m in metrics(run, "train")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_killed_two_process_run_resumes_on_two_exactly_and_on_one(runs: dict[str, Path], corpus: Path) -> None:
    tmp, plan = runs["tmp"], runs["plan"]
    out, cache = tmp / "killed", tmp / "cache-killed"
    proc = _torchrun(plan, out, cache)
    _wait_for_step(proc, out, 6)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both workers; they agree on one step to stop at
    proc.communicate(timeout=120)
    stopped = events(out, "plan_interrupted")
    assert stopped and "stopped by signal 15" in stopped[-1]["reason"], stopped
    assert events(out, "checkpoint_saved")
    shutil.copytree(out, tmp / "killed-copy")
    shutil.copytree(cache, tmp / "cache-killed-copy")

    done = _two(plan, out, cache)  # the same world size: exactly the uninterrupted run
    assert done.returncode == 0, done.stderr[-3000:]
    assert events(out, "stage_resumed") and not events(out, "world_size_changed")
    assert _val(out) == _val(runs["two"])

    _one(plan, tmp / "killed-copy", tmp / "cache-killed-copy")  # one process goes on from two's checkpoint
    changed = events(tmp / "killed-copy", "world_size_changed")
    assert changed and changed[0]["saved_by"] == 2 and changed[0]["world_size"] == 1
    assert _close(_val(tmp / "killed-copy"), _val(runs["two"]))


def test_nan_on_one_rank_is_seen_by_the_guard_of_both(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "a", "optimizer": {"name": "adamw", "lr": 3.0e-3}, "steps": 12,
               "guard": {"action": "skip"}, "inject": [{"kind": "nan", "at": 5, "rank": 1}]}]
    plan = _plan(tmp_path, corpus, "nan", stages)
    done = _two(plan, tmp_path / "two", tmp_path / "cache-two")
    # Had rank 0 stepped on NaN gradients, or rank 1 on its NaN loss, their weights would be NaN,
    # and every later update too: one skip, and a finite end, says both skipped that update.
    assert done.returncode == 0, done.stderr[-3000:]
    skips = events(tmp_path / "two", "guard_skip")
    assert [(e["step"], e["reason"]) for e in skips] == [(6, "non-finite loss")]
    # one process with the fault on its only rank decides the same, on the same numbers
    one_plan = _plan(tmp_path, corpus, "nan-one", [{**stages[0], "inject": [{"kind": "nan", "at": 5}]}])
    _one(one_plan, tmp_path / "one", tmp_path / "cache-one")
    assert [e["step"] for e in events(tmp_path / "one", "guard_skip")] == [6]
    assert _close(_val(tmp_path / "one"), _val(tmp_path / "two"))


def test_a_batch_that_does_not_split_is_one_line(tmp_path: Path, corpus: Path) -> None:
    from stagewise.engine.prepare_run import prepare
    from stagewise.plan.load import load_plan

    plan = _plan(tmp_path, corpus, "odd", [{**STAGES[0], "batch": {"size": 6}}])
    prepared = prepare(load_plan(plan), plan, tmp_path / "cache")
    check_split(World(rank=0, size=2), prepared.resolved, str(plan))  # 6 = 2 x 3
    with pytest.raises(UserError, match=r"odd.yaml: stages\[0\].batch.size: 6 sequences per micro-batch do not "
                                        r"split over 4 processes: make it a multiple of 4"):
        check_split(World(rank=0, size=4), prepared.resolved, str(plan))


# --- fsdp: sharded weights -------------------------------------------------------------------------

FSDP_STAGES: list[dict[str, Any]] = [
    {**STAGES[0], "regularization": {"grad_clip": 1.0}},  # the clip reads the norm of sharded gradients
    {"name": "b", "optimizer": {"name": "adamw", "lr": 1.0e-3}, "schedule": {"name": "decay", "shape": "linear"},
     "steps": 10},
]
FSDP = {"strategy": "fsdp"}


def test_fsdp_trains_as_one_process_and_its_checkpoints_load_in_one(tmp_path: Path, corpus: Path) -> None:
    plan = _plan(tmp_path, corpus, "fsdp", FSDP_STAGES, distributed=FSDP)
    _one(plan, tmp_path / "one", tmp_path / "cache-one")
    done = _two(plan, tmp_path / "two", tmp_path / "cache-two")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _val(tmp_path / "one"), _val(tmp_path / "two")
    assert len(one) == 4 and _close(one, two), (one, two)
    assert "data parallel: 2 processes (fsdp)" in done.stdout
    # the export is a plain model's: the same tensors, within the runs' rounding (which AdamW's
    # normalized steps make ~1e-4 on weights whose gradients are near 0: attention biases)
    a, b = stage_weights(tmp_path / "one", "b"), stage_weights(tmp_path / "two", "b")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)

    # one process reuses both stages fsdp trained (its final checkpoints read back)...
    _one(plan, tmp_path / "reuse", tmp_path / "cache-two")
    assert [e["stage"] for e in events(tmp_path / "reuse", "stage_reused")] == ["a", "b"]
    # ...and resumes stage a from one of its mid-stage checkpoints (weights and AdamW moments)
    keys = {e["stage"]: e["key"] for e in events(tmp_path / "two", "stage_start")}
    shutil.copytree(tmp_path / "cache-two", tmp_path / "cache-cut")
    for gone in ("final", "step-00000060"):
        shutil.rmtree(tmp_path / "cache-cut" / "stages" / keys["a"] / gone)
    shutil.rmtree(tmp_path / "cache-cut" / "stages" / keys["b"])
    _one(plan, tmp_path / "resumed", tmp_path / "cache-cut")
    resumed = events(tmp_path / "resumed", "stage_resumed")
    assert [e["stage"] for e in resumed] == ["a"] and resumed[0]["stage_step"] == 56, resumed
    assert events(tmp_path / "resumed", "world_size_changed")
    assert _close(_val(tmp_path / "resumed"), [v for v in one if v[0] > 56])


@pytest.mark.parametrize(("change", "line"), [
    ({1: {"optimizer": {"handoff": "carry"}}}, r"stages\[1\].optimizer.handoff: carry is not supported with "
                                               r"distributed.strategy fsdp yet"),
    ({0: {"average": {"ema": 0.9}}}, r"stages\[0\].average: weight averaging is not supported with "
                                     r"distributed.strategy fsdp yet"),
    ({1: {"optimizer": {"name": "muon", "lr": 0.02}}}, r"stages\[1\].optimizer.name: muon is not supported"),
])
def test_what_fsdp_does_not_do_yet_is_one_line_at_check(tmp_path: Path, corpus: Path, change: dict[int, Any],
                                                         line: str) -> None:
    from stagewise.engine.prepare_run import prepare
    from stagewise.plan.load import load_plan

    stages = [{**s, **change.get(i, {})} for i, s in enumerate(FSDP_STAGES)]
    plan = _plan(tmp_path, corpus, "refused", stages, distributed=FSDP)
    with pytest.raises(UserError, match=line):
        prepare(load_plan(plan), plan, tmp_path / "cache")
    ddp = _plan(tmp_path, corpus, "ddp", stages)
    prepare(load_plan(ddp), ddp, tmp_path / "cache")  # the same plan under ddp runs


def test_each_rank_trains_its_rows_weighted_as_one_process_would() -> None:
    """Row losses averaged as DDP averages ranks: the mean over the whole micro-batch, also when
    the rows do not split evenly (a full-batch pass's last batch) or leave a rank without any."""
    losses = torch.arange(1.0, 8.0)  # 7 rows
    for size, rows in ((2, 7), (3, 7), (4, 3)):
        batch = (losses[:rows],)
        total = 0.0
        for rank in range(size):
            part, share = World(rank=rank, size=size).shard(batch, 1.0)
            total += share * float(part[0].mean()) / size
        assert total == pytest.approx(float(batch[0].mean()))
    assert World().shard((losses,), 0.5) == ((losses,), 0.5)


def _sft_plan(tmp: Path, corpus: Path) -> Path:
    """An sft stage whose completions are 1 to 12 characters: the target tokens per row are uneven."""
    rng = random.Random(0)
    rows = []
    for _ in range(400):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.choice((1, 2, 12))))
        rows.append(json.dumps({"prompt": word[:3], "completion": word[::-1]}))
    (tmp / "sft.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    stages = [{"name": "sft", "task": "sft", "data": {"train": "sft.jsonl", "val_fraction": 0.1, "max_len": 24},
               "optimizer": {"name": "adamw", "lr": 3.0e-3}, "steps": 30, "eval": {"every": 10}}]
    return _plan(tmp, corpus, "sft", stages)


def test_token_losses_weigh_each_rank_by_its_target_tokens(tmp_path: Path, corpus: Path) -> None:
    """An sft micro-batch split over 2 ranks: each rank's token mean weighted by its part of the
    target tokens is the micro-batch's token mean; weighted by rows (the way before) it is not."""
    from stagewise.engine.device import autocast_factory
    from stagewise.engine.prepare_run import prepare
    from stagewise.plan.load import load_plan

    plan = _sft_plan(tmp_path, corpus)
    prepared = prepare(load_plan(plan), plan, tmp_path / "cache")
    setup, cfg = prepared.stages[0].setup, prepared.stages[0].resolved.config
    task = setup.spec.bind(setup, cfg, cfg.data, torch.device("cpu"), autocast_factory(torch.device("cpu"), None), False)
    task.model.eval()  # no dropout: the same numbers each forward
    batch = task.sampler(32, 8, 0).next_batch()
    counts = task.targets(batch)
    assert counts is not None and len(set(counts.tolist())) > 1  # uneven, or the test shows nothing
    with torch.no_grad():
        whole = float(task.loss(batch))
        exact, by_rows = 0.0, 0.0
        for rank in range(2):
            world = World(rank=rank, size=2)
            part, share = world.shard(batch, 1.0, counts)
            rows, row_share = world.shard(batch, 1.0)
            assert torch.equal(part[0], rows[0])  # the same rows, another weight
            exact += share * float(task.loss(part)) / 2  # DDP's mean over the ranks
            by_rows += row_share * float(task.loss(rows)) / 2
    assert exact == pytest.approx(whole, rel=1e-6)
    assert abs(by_rows - whole) > TOLERANCE * whole, (by_rows, whole)  # the row weighting would fail the test below


def test_two_processes_train_sft_as_one(tmp_path: Path, corpus: Path) -> None:
    plan = _sft_plan(tmp_path, corpus)
    _one(plan, tmp_path / "one", tmp_path / "cache-one")
    done = _two(plan, tmp_path / "two", tmp_path / "cache-two")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _val(tmp_path / "one"), _val(tmp_path / "two")
    assert len(one) == 3 and _close(one, two), (one, two)
    first = [metrics(run, "train")[0]["loss"] for run in (tmp_path / "one", tmp_path / "two")]
    assert first[1] == pytest.approx(first[0], rel=1e-6)  # the first update's loss: the token mean of both ranks
