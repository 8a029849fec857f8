"""Checkpoints, exact resume, the stage cache and branching plans."""

from __future__ import annotations

import errno
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_plan, write_plan
from safetensors.torch import load_file

from stagewise.cli import main
from stagewise.engine import checkpoint as checkpoint_module
from stagewise.engine.checkpoint import InvalidCheckpoint, StageStore, load_checkpoint, verify
from stagewise.engine.prepare_run import Prepared, prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.engine.status import stage_status
from stagewise.engine.verify import metrics_difference, state_difference
from stagewise.errors import RunStopped
from stagewise.plan.load import load_plan
from stagewise.track.runs import load_run

STAGES = [
    {"name": "warm", "optimizer": {"name": "adamw", "lr": 3e-3}, "schedule": {"name": "warmup_constant", "warmup": 5},
     "steps": 24, "regularization": {"dropout": 0.1}, "eval": {"every": 7}},
    {"name": "accum", "optimizer": {"handoff": "carry"}, "batch": {"size": 4, "accumulate": 3},
     "schedule": {"name": "cosine", "min_lr": 1e-4}, "steps": 16},
    {"name": "sgd", "from": "warm@12", "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9}, "steps": 14},
]


def _plan(corpus: Path, stages: list[dict[str, Any]] = STAGES, **top: Any) -> dict[str, Any]:
    # threads pinned: processes started side by side would otherwise pick different thread counts
    # (threads: auto counts the busy cores), and sums over other thread counts round differently
    return tiny_plan(corpus, stages, checkpoint={"every": 2, "keep": 2}, log={"every": 3}, threads=1, **top)


def _prepared(path: Path, cache: Path) -> Prepared:
    return prepare(load_plan(path), path, cache)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, Prepared, Path]:
    """The plan trained once, never interrupted."""
    root = tmp_path_factory.mktemp("reference")
    path = write_plan(root, _plan(corpus))
    prepared = _prepared(path, root / "cache")
    train(prepared, root / "run")
    return path, prepared, root / "run"


def _assert_identical(reference: tuple[Path, Prepared, Path], cache: Path, run_dir: Path | None) -> None:
    """Final weights and optimizer state of every stage, and (given a run dir) every logged number."""
    path, ref, ref_run = reference
    assert state_difference(ref, _prepared(path, cache)) is None
    if run_dir is not None:
        assert metrics_difference(ref_run, run_dir) is None


def _spawn(path: Path, out: Path, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "stagewise", "train", str(path), "--out", str(out),
                             "--cache", str(cache)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _count(run_dir: Path, event: str) -> int:
    events = run_dir / "events.jsonl"
    return sum(e["event"] == event for e in read_jsonl(events)) if events.exists() else 0


def _wait_for(proc: subprocess.Popen[str], run_dir: Path, event: str, count: int, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _count(run_dir, event) >= count:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError(f"no {count} x {event} in {timeout}s")


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path: Path, reference: Any) -> None:
    path = reference[0]
    out, cache = tmp_path / "run", tmp_path / "cache"
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):  # killed with SIGKILL four times, at random points across the three stages
        proc = _spawn(path, out, cache)
        target = _count(out, "checkpoint_saved") + rng.randint(1, 6)
        if not _wait_for(proc, out, "checkpoint_saved", target):
            break  # it finished before the kill came
        time.sleep(rng.uniform(0.0, 0.05))  # sometimes in a step, sometimes in the next checkpoint write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 3
    proc = _spawn(path, out, cache)
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    assert _count(out, "stage_resumed") >= 1
    _assert_identical(reference, cache, out)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path, reference: Any) -> None:
    path = reference[0]
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = _spawn(path, out, cache)
    assert _wait_for(proc, out, "checkpoint_saved", 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    message = proc.stderr.read() if proc.stderr else ""
    assert message.count("\n") == 1 and "Traceback" not in message
    assert "stopped by signal 15" in message and f"Resume with: stagewise train {path} --out {out}" in message
    events = read_jsonl(out / "events.jsonl")
    assert events[-1]["event"] == "plan_interrupted"
    stopped = [e for e in events if e["event"] == "checkpoint_saved"][-1]
    assert main(["train", str(path), "--out", str(out), "--cache", str(cache)]) == 0
    resumed = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "stage_resumed"]
    assert resumed[0]["step"] == stopped["step"]
    _assert_identical(reference, cache, out)


def test_kill_during_checkpoint_write_leaves_no_checkpoint_and_resume_is_exact(
        tmp_path: Path, reference: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = reference[0]
    out, cache = tmp_path / "run", tmp_path / "cache"
    real_save = torch.save
    calls = {"n": 0}

    def dies_on_the_fifth(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            Path(f).write_bytes(b"half a file")
            raise KeyboardInterrupt  # the process dies here, mid-write
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        train(_prepared(path, cache), out)
    monkeypatch.undo()
    store = StageStore(cache, _prepared(path, cache).stages[0].key)
    assert list(store.dir.glob(".tmp-*"))  # the torn write is there, without a manifest ...
    assert store.steps() == [6, 8]  # ... and is not a checkpoint (keep: 2)
    train(_prepared(path, cache), out)
    assert not list(store.dir.glob(".tmp-*"))
    _assert_identical(reference, cache, out)


def test_corrupted_checkpoint_is_reported_and_the_one_before_is_used(
        tmp_path: Path, reference: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = reference[0]
    out, cache = tmp_path / "run", tmp_path / "cache"
    with pytest.raises(RunStopped):
        train(_prepared(path, cache), out, stop_after=9)
    store = StageStore(cache, _prepared(path, cache).stages[0].key)
    assert store.steps() == [8, 9]
    weights = store.step_dir(9) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    capsys.readouterr()
    train(_prepared(path, cache), out)
    printed = capsys.readouterr().out
    assert "model.safetensors does not match its sha256 (corrupted or truncated); using the checkpoint before it" in printed
    invalid = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "checkpoint_invalid"]
    assert [e["step"] for e in invalid] == [9]
    resumed = [e for e in read_jsonl(out / "events.jsonl") if e["event"] == "stage_resumed"]
    assert resumed[0]["stage_step"] == 8
    _assert_identical(reference, cache, out)


def test_full_disk_keeps_the_previous_checkpoint_and_stops_clearly(
        tmp_path: Path, reference: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = reference[0]
    out, cache = tmp_path / "run", tmp_path / "cache"
    real_save_model = checkpoint_module.save_model
    calls = {"n": 0}

    def fills_the_disk(model: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save_model(model, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_model", fills_the_disk)
    with pytest.raises(RunStopped) as stopped:
        train(_prepared(path, cache), out)
    monkeypatch.undo()
    assert stopped.value.code == 4
    assert "No space left on device (" in str(stopped.value)
    assert " free there); the checkpoints saved before it are intact. Free space, then resume with" in str(stopped.value)
    key = _prepared(path, cache).stages[0].key
    store = StageStore(cache, key)
    assert store.steps() == [4, 6]
    verify(store.step_dir(6), key)  # intact
    assert not list(store.dir.glob(".tmp-*"))
    train(_prepared(path, cache), out)
    _assert_identical(reference, cache, out)


def test_incompatible_checkpoint_is_refused_with_the_reason(tmp_path: Path, reference: Any) -> None:
    _, prepared, _ = reference
    warm, accum = prepared.stages[0], prepared.stages[1]
    foreign = StageStore(prepared.cache_root, warm.key).final_dir
    with pytest.raises(InvalidCheckpoint, match=f"belongs to stage key {warm.key}, not {accum.key} "
                                                r"\(the plan, model or data changed\)"):
        load_checkpoint(foreign, accum.key, prepared.root)
    other = prepare(load_plan(write_plan(tmp_path, tiny_plan(
        Path(prepared.plan.data.train), STAGES, model={"arch": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32,
                                                     "n_positions": 32}))), tmp_path / "plan.yaml", tmp_path / "c")
    with pytest.raises(InvalidCheckpoint, match="weights do not fit the model"):
        load_checkpoint(foreign, warm.key, other.root)


def test_editing_a_stage_retrains_it_and_what_follows_nothing_before(
        tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    stages = [
        {"name": "one", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 8},
        {"name": "two", "steps": 8},
        {"name": "three", "optimizer": {"name": "sgd", "lr": 0.1}, "steps": 8},
    ]
    path = write_plan(tmp_path, _plan(corpus, stages))
    cache, out = tmp_path / "cache", tmp_path / "run"
    train(_prepared(path, cache), out)
    stages[1]["optimizer"] = {"lr": 1e-3}
    edited = write_plan(tmp_path, _plan(corpus, stages), "edited.yaml")
    assert stage_status(_prepared(edited, cache)) == {"one": "reuse", "two": "train", "three": "train"}
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["check", str(edited), "--cache", str(cache)]) == 0
    assert "reuse" in capsys.readouterr().out
    train(_prepared(edited, cache), tmp_path / "edited")
    events = read_jsonl(tmp_path / "edited" / "events.jsonl")
    assert [e["stage"] for e in events if e["event"] == "stage_reused"] == ["one"]
    assert [e["stage"] for e in events if e["event"] == "stage_end"] == ["two", "three"]
    # the reused stage's export is its trained weights
    a = load_file(out / "stages/one/model.safetensors")
    b = load_file(tmp_path / "edited/stages/one/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_branch_from_a_step_starts_from_that_steps_weights(tmp_path: Path, corpus: Path) -> None:
    """`from: stable@10` of a 20-step constant-LR stage must equal branching from the end of the
    same stage trained for 10 steps (same seeds, same batches)."""
    def plan(stable_steps: int, parent: str) -> dict[str, Any]:
        return _plan(corpus, [
            {"name": "stable", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": stable_steps},
            {"name": "cool", "from": parent, "optimizer": {"handoff": "carry"}, "schedule": {"name": "decay"}, "steps": 6},
        ])
    branched = write_plan(tmp_path, plan(20, "stable@10"), "branched.yaml")
    straight = write_plan(tmp_path, plan(10, "stable"), "straight.yaml")
    a, b = _prepared(branched, tmp_path / "ca"), _prepared(straight, tmp_path / "cb")
    assert a.resolved[1].start_step == 10 and a.resolved[1].parent_step == 10
    train(a, tmp_path / "ra")
    train(b, tmp_path / "rb")
    wa = load_file(tmp_path / "ra/stages/cool/model.safetensors")
    wb = load_file(tmp_path / "rb/stages/cool/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert 10 in StageStore(a.cache_root, a.stages[0].key).steps()  # the branch point is kept


def test_two_processes_share_the_cache_and_train_each_stage_once(tmp_path: Path, reference: Any) -> None:
    path = reference[0]
    cache = tmp_path / "cache"
    procs = [_spawn(path, tmp_path / f"run{i}", cache) for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    trained = sum(_count(tmp_path / f"run{i}", "stage_end") for i in range(2))
    reused = sum(_count(tmp_path / f"run{i}", "stage_reused") for i in range(2))
    assert (trained, reused) == (3, 3)
    _assert_identical(reference, cache, None)


def test_verify_resume_command(tmp_path: Path, reference: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify-resume", str(reference[0]), "--steps", "6"]) == 0
    assert "resume is exact: stopped after plan step" in capsys.readouterr().out


def test_bad_from_is_one_line(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stages = [dict(s) for s in STAGES]
    stages[2] = {**stages[2], "from": "warm@99"}
    path = write_plan(tmp_path, _plan(corpus, stages))
    assert main(["check", str(path), "--cache", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == f"error: {path}: stages[2].from: stage 'warm' has steps 1..24 (got @99)\n"
    stages[2] = {**stages[2], "from": "later"}
    path = write_plan(tmp_path, _plan(corpus, stages))
    assert main(["check", str(path), "--cache", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == f"error: {path}: stages[2].from: no stage 'later'\n"


def test_a_reused_stage_brings_its_history_into_a_new_run_dir(tmp_path: Path, reference: Any) -> None:
    """The run directory deleted (here: another one) and the plan trained again: every stage comes
    back from the cache, and so do its metric lines and evaluations (the report's plots, the best
    loss `runs` shows); training once more into the same directory adds nothing twice."""
    path, prepared, ref_run = reference
    again = tmp_path / "again"
    for _ in range(2):
        train(_prepared(path, prepared.cache_root), again)
        assert [e["stage"] for e in read_jsonl(again / "events.jsonl") if e["event"] == "stage_reused"][-3:] == [
            "warm", "accum", "sgd"]
        assert read_jsonl(again / "metrics.jsonl") == read_jsonl(ref_run / "metrics.jsonl")
    evals = [e for e in read_jsonl(again / "events.jsonl") if e["event"] == "eval"]
    assert evals == [e for e in read_jsonl(ref_run / "events.jsonl") if e["event"] == "eval"] and evals
    listed = load_run(again, with_metrics=False)
    assert listed.best_val_loss is not None and listed.best_val_loss == load_run(ref_run).best_val_loss
