"""Failure paths: nothing lost, nothing run by mistake, no traceback. The run directory (--fresh,
--out, its lock), every way a checkpoint can fail to read back, full disks and unwritable paths
at every writer, and non-finite values."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import events, tiny_plan, write_plan
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stagewise.cli import main
from stagewise.engine import checkpoint as checkpoint_module
from stagewise.engine import run_logs as logs_module
from stagewise.engine.checkpoint import StageStore, verify
from stagewise.engine.prepare_run import Prepared, prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.engine.rundir import HOLDER, MARKER
from stagewise.engine.status import stage_status
from stagewise.engine.verify import metrics_difference, state_difference
from stagewise.errors import RunStopped
from stagewise.plan.load import load_plan

A = {"name": "a", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 12}
B = {"name": "b", "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "steps": 6}


def _plan(corpus: Path, stages: list[dict[str, Any]] | None = None, **top: Any) -> dict[str, Any]:
    # threads pinned: a subprocess compared with an in-process run must not pick another thread count
    return tiny_plan(corpus, stages or [A], checkpoint={"every": 3, "keep": 10}, log={"every": 3}, threads=1, **top)


def _prepared(path: Path, cache: Path) -> Prepared:
    return prepare(load_plan(path), path, cache)


def _args(path: Path, out: Path, cache: Path) -> list[str]:
    return ["train", str(path), "--out", str(out), "--cache", str(cache)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, Path, Path]:
    """Plans [a] and [a, b] trained once, never interrupted: (plan [a], plan [a, b], root)."""
    root = tmp_path_factory.mktemp("reference")
    one = write_plan(root, _plan(corpus), "one.yaml")
    two = write_plan(root, _plan(corpus, [A, B]), "two.yaml")
    train(_prepared(one, root / "cache"), root / "run-one")
    train(_prepared(two, root / "cache"), root / "run-two")
    return one, two, root


def _same_as_reference(plan: Path, reference: tuple[Path, Path, Path], cache: Path) -> None:
    assert state_difference(_prepared(plan, reference[2] / "cache"), _prepared(plan, cache)) is None


def _one_line(err: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "weights_only=False" not in err


# ----------------------------------------------------------------------------------- run directory

def test_fresh_refuses_a_folder_of_files_and_out_on_a_file(tmp_path: Path, reference: Any,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "plan.yaml").write_text("my own plan")
    for fresh in (["--fresh"], []):
        assert main([*_args(reference[0], mine, tmp_path / "c"), *fresh]) == 2
        err = capsys.readouterr().err
        _one_line(err)
        assert f"--out {mine}: holds files but is not a stagewise run" in err and "nothing was touched" in err
    assert sorted(p.name for p in mine.iterdir()) == ["plan.yaml", "thesis.tex"]
    assert (mine / "plan.yaml").read_text() == "my own plan"
    assert not (tmp_path / "c").exists()  # refused before anything was prepared
    assert main(_args(reference[0], mine / "thesis.tex", tmp_path / "c")) == 2
    assert capsys.readouterr().err == f"error: --out {mine / 'thesis.tex'}: is a file, not a run directory\n"


def test_fresh_empties_a_run_and_deletes_only_the_stores_own_files(tmp_path: Path, reference: Any,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(_args(reference[0], out, cache)) == 0
    assert (out / MARKER).is_file()
    store = StageStore(cache, _prepared(reference[0], cache).stages[0].key)
    (store.dir / "notes.txt").write_text("not the tool's")
    (store.dir / "step-00000003" / "mine.txt").write_text("not the tool's either")
    with store.lock():
        store.clear()
    assert sorted(p.name for p in store.dir.iterdir() if p.name != ".lock") == ["notes.txt", "step-00000003"]
    assert [p.name for p in (store.dir / "step-00000003").iterdir()] == ["mine.txt"]  # the checkpoint's files went
    (store.dir / "step-00000003" / "mine.txt").unlink()
    assert main(_args(reference[0], out, cache)) == 0  # trains the stage again into the run
    assert main([*_args(reference[0], out, cache), "--fresh"]) == 0
    assert (store.dir / "notes.txt").read_text() == "not the tool's"
    names = [e["event"] for e in read_jsonl(out / "events.jsonl")]
    assert names[0] == "plan_start" and names.count("stage_end") == 1 and "stage_reused" not in names
    _same_as_reference(reference[0], reference, cache)


def test_a_second_process_on_a_run_says_who_holds_it(tmp_path: Path, reference: Any,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    script = ("import sys, time; from pathlib import Path; from stagewise.engine.rundir import run_directory\n"
              "with run_directory(Path(sys.argv[1]), False):\n print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert main(_args(reference[0], out, tmp_path / "c")) == 2
        err = capsys.readouterr().err
        _one_line(err)
        assert f"error: --out {out}: is being trained by pid {holder.pid} on " in err and "(since 20" in err
        assert not (out / "events.jsonl").exists()
        assert not (tmp_path / "c").exists()  # said before any preparation: no data read into a cache
    finally:
        holder.kill()
        holder.wait()
    assert main(_args(reference[0], out, tmp_path / "c")) == 0  # the lock went with the process
    assert not (out / HOLDER).exists()


# ------------------------------------------------------------------------------- checkpoint reads

def _rewrite(directory: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and its sha256 in the manifest: damage a checksum cannot see."""
    (directory / name).write_bytes(data)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getcwd, ())


def _torch_bytes(obj: Any, tmp: Path) -> bytes:
    torch.save(obj, tmp / "x.pt")
    return (tmp / "x.pt").read_bytes()


def _damage(kind: str, directory: Path, tmp: Path) -> str:
    """Damage one checkpoint; the file the message must name."""
    state, weights = directory / "state.pt", directory / "model.safetensors"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        return "model.safetensors does not match its sha256"
    if kind == "missing":
        state.unlink()
        return "state.pt is missing"
    if kind == "refused pickle":
        _rewrite(directory, "state.pt", _torch_bytes({"x": _Evil()}, tmp))
        return f"{state}: holds an object that the safe loader refuses (posix.getcwd)"
    if kind == "malformed state":
        _rewrite(directory, "state.pt", _torch_bytes({"progress": {"step": 1}}, tmp))
        return f"{state}: not a state this stage can continue from (KeyError"
    if kind == "garbage weights":
        _rewrite(directory, "model.safetensors", b"\x07" * 300)
        return f"{weights}: not readable safetensors"
    manifest = directory / "manifest.json"
    if kind == "flipped manifest":
        data = bytearray(manifest.read_bytes())
        data[0] ^= 0xFF  # '{' becomes a byte no UTF-8 text starts with
        manifest.write_bytes(bytes(data))
        return f"{manifest}: not a valid manifest ("
    if kind == "list manifest":
        manifest.write_text("[]")
        return f"{manifest}: not a valid manifest (a JSON list, not an object)"
    if kind == "mistyped manifest":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "step": "9", "files": ["state.pt"]}))
        return f"{manifest}: not a valid manifest (its step or files are missing or of the wrong type)"
    assert kind == "wrong shapes"
    save_file({"transformer.wte.weight": torch.zeros(3, 3)}, tmp / "w.safetensors")
    _rewrite(directory, "model.safetensors", (tmp / "w.safetensors").read_bytes())
    return f"{directory}: weights do not fit the model"


KINDS = ["truncated", "missing", "refused pickle", "malformed state", "garbage weights", "wrong shapes",
         "flipped manifest", "list manifest", "mistyped manifest"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_checkpoint_is_one_line_and_the_one_before_is_used(
        tmp_path: Path, reference: Any, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    with pytest.raises(RunStopped):
        train(_prepared(reference[0], cache), out, stop_after=9)
    store = StageStore(cache, _prepared(reference[0], cache).stages[0].key)
    assert store.steps() == [3, 6, 9]
    named = _damage(kind, store.step_dir(9), tmp_path)
    capsys.readouterr()
    assert main(_args(reference[0], out, cache)) == 0
    printed = capsys.readouterr()
    warning = next(line for line in printed.out.splitlines() if line.startswith("warning:"))
    assert named in warning and warning.endswith("; using the checkpoint before it"), warning
    assert "weights_only=False" not in printed.out + printed.err and "Traceback" not in printed.err
    (invalid,) = events(out, "checkpoint_invalid")
    assert invalid["step"] == 9 and named in invalid["reason"]
    assert events(out, "stage_resumed")[0]["stage_step"] == 6
    _same_as_reference(reference[0], reference, cache)
    assert metrics_difference(reference[2] / "run-one", out) is None


def test_a_bad_final_is_not_reused_it_resumes_or_retrains_and_says_which(
        tmp_path: Path, reference: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    assert main(_args(reference[0], tmp_path / "r1", cache)) == 0
    prepared = _prepared(reference[0], cache)
    store = StageStore(cache, prepared.stages[0].key)
    named = _damage("refused pickle", store.final_dir, tmp_path)
    status = stage_status(prepared)["a"]
    assert status.startswith("resume at step 12 (not reused: ") and named in status  # `check` reads the final
    capsys.readouterr()
    assert main(_args(reference[0], tmp_path / "r2", cache)) == 0
    out = capsys.readouterr().out
    assert f"warning: {named}" in out and "; stage 'a' resumes from step 12" in out
    assert events(tmp_path / "r2", "checkpoint_invalid")[0]["step"] == "final"
    verify(store.final_dir, store.key)  # saved again, whole
    _same_as_reference(reference[0], reference, cache)
    # without a step checkpoint to go back to, the stage trains again
    for step in store.steps():
        checkpoint_module.shutil.rmtree(store.step_dir(step))
    _damage("garbage weights", store.final_dir, tmp_path)
    assert stage_status(_prepared(reference[0], cache))["a"].startswith("train (not reused: ")
    assert main(_args(reference[0], tmp_path / "r3", cache)) == 0
    assert "; stage 'a' is trained again from its start" in capsys.readouterr().out
    _same_as_reference(reference[0], reference, cache)


@pytest.mark.parametrize("kind", ["flipped manifest", "list manifest", "mistyped manifest"])
def test_a_damaged_final_manifest_is_a_warning_and_an_event_not_a_silent_retrain(
        tmp_path: Path, reference: Any, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    cache = tmp_path / "cache"
    assert main(_args(reference[0], tmp_path / "r1", cache)) == 0
    prepared = _prepared(reference[0], cache)
    store = StageStore(cache, prepared.stages[0].key)
    named = _damage(kind, store.final_dir, tmp_path)
    status = stage_status(prepared)["a"]
    assert status.startswith("resume at step 12 (not reused: ") and named in status  # what `check` says
    capsys.readouterr()
    assert main(_args(reference[0], tmp_path / "r2", cache)) == 0
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:"))
    assert warning.startswith(f"warning: {named}") and warning.endswith("; stage 'a' resumes from step 12"), warning
    (invalid,) = events(tmp_path / "r2", "checkpoint_invalid")
    assert invalid["step"] == "final" and named in invalid["reason"]
    verify(store.final_dir, store.key)  # saved again, whole
    _same_as_reference(reference[0], reference, cache)


def test_a_bad_parent_final_retrains_the_parent_not_every_stage(
        tmp_path: Path, reference: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    assert main(_args(reference[0], tmp_path / "r1", cache)) == 0  # stage a only
    store = StageStore(cache, _prepared(reference[0], cache).stages[0].key)
    _damage("malformed state", store.final_dir, tmp_path)
    assert main(_args(reference[1], tmp_path / "r2", cache)) == 0  # a, then b from a's end
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--fresh" not in err
    assert [e["stage"] for e in events(tmp_path / "r2", "stage_end")] == ["a", "b"]
    _same_as_reference(reference[1], reference, cache)


def test_a_bad_branch_point_is_trained_again(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_plan(tmp_path, _plan(corpus, [A, {**B, "from": "a@6"}]))
    cache = tmp_path / "cache"
    assert main(_args(path, tmp_path / "r1", cache)) == 0
    store = StageStore(cache, _prepared(path, cache).stages[0].key)
    _damage("malformed state", store.step_dir(6), tmp_path)
    assert main(_args(path, tmp_path / "r2", cache)) == 0
    out = capsys.readouterr().out
    assert "step-00000006/state.pt: not a state this stage can continue from" in out
    assert "; stage 'a' resumes from step 3" in out
    verify(store.step_dir(6), store.key)
    assert [e["stage"] for e in events(tmp_path / "r2", "stage_reused")] == ["b"]


# ----------------------------------------------------------------------------------- full disk

def _enospc(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


class _FullFile:
    def write(self, _: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _fail_on_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, n: int, error: BaseException,
                  when: Any = None) -> None:
    """`owner.name` raises `error` on its n-th call (counting calls `when` accepts)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        if when is None or when(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def _full_metrics_file(monkeypatch: pytest.MonkeyPatch) -> None:
    real = logs_module.JsonlLog.write
    calls = {"n": 0}

    def write(self: Any, record: dict[str, Any]) -> None:
        if self.path.name == "metrics.jsonl":
            calls["n"] += 1
            if calls["n"] == 4:
                self._file = _FullFile()
        real(self, record)

    monkeypatch.setattr(logs_module.JsonlLog, "write", write)


def _writer(kind: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make one writer fail as a full disk does; the path the message must name."""
    if kind == "torch.save OSError":
        _fail_on_call(monkeypatch, checkpoint_module.torch, "save", 3, OSError(errno.ENOSPC, "No space left on device"))
        return "step-00000009"
    if kind == "torch.save RuntimeError":  # what torch's zip writer raises on ENOSPC
        _fail_on_call(monkeypatch, checkpoint_module.torch, "save", 3, RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"))
        return "step-00000009"
    if kind == "safetensors":
        _fail_on_call(monkeypatch, checkpoint_module, "save_model", 2, SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"))
        return "step-00000006"
    if kind == "export":
        from transformers import PreTrainedModel

        _fail_on_call(monkeypatch, PreTrainedModel, "save_pretrained", 1, SafetensorError("No space left on device"))
        return "stages/a"
    if kind == "metrics log":
        _full_metrics_file(monkeypatch)
        return "metrics.jsonl"
    assert kind == "tensorboard"
    from torch.utils.tensorboard import SummaryWriter

    _fail_on_call(monkeypatch, SummaryWriter, "add_scalar", 20, OSError(errno.ENOSPC, "No space left on device"))
    return "tensorboard"


WRITERS = ["torch.save OSError", "torch.save RuntimeError", "safetensors", "export", "metrics log", "tensorboard"]


@pytest.mark.parametrize("kind", WRITERS)
def test_a_full_disk_stops_with_the_path_and_free_space_and_resume_completes(
        tmp_path: Path, reference: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        kind: str) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    named = _writer(kind, monkeypatch)
    assert main(_args(reference[0], out, cache)) == 4
    err = capsys.readouterr().err
    _one_line(err)
    assert err.startswith("cannot write ") and named in err.split(":")[0], err
    assert " free there); the checkpoints saved before it are intact. Free space, then resume with: stagewise " \
           "train" in err
    monkeypatch.undo()
    store = StageStore(cache, _prepared(reference[0], cache).stages[0].key)
    for step in store.steps():
        verify(store.step_dir(step), store.key)
    assert not list(store.dir.glob(".tmp-*"))
    assert main(_args(reference[0], out, cache)) == 0  # space freed
    _same_as_reference(reference[0], reference, cache)
    assert metrics_difference(reference[2] / "run-one", out) is None


@pytest.mark.parametrize("track", [[], ["track=[]"]], ids=["tensorboard", "logs only"])
def test_the_run_directory_deleted_while_training_is_one_line_and_the_same_command_resumes(
        tmp_path: Path, reference: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        track: list[str]) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    real, saved = checkpoint_module.torch.save, {"n": 0}

    def save_then_delete_the_run(*args: Any, **kwargs: Any) -> Any:
        done = real(*args, **kwargs)
        saved["n"] += 1
        if saved["n"] == 2:  # the second checkpoint (step 6) is in the cache; the run folder goes
            shutil.rmtree(out)
        return done

    monkeypatch.setattr(checkpoint_module.torch, "save", save_then_delete_the_run)
    assert main([*_args(reference[0], out, cache), *track]) == 4
    err = capsys.readouterr().err
    _one_line(err)
    assert err.startswith(f"the run directory {out} was deleted while training; the stage cache {cache} is intact: "
                          "resume with: stagewise train "), err
    monkeypatch.undo()
    store = StageStore(cache, _prepared(reference[0], cache).stages[0].key)
    assert store.steps() and not list(store.dir.glob(".tmp-*"))
    for step in store.steps():
        verify(store.step_dir(step), store.key)
    assert main(shlex.split(err.split("resume with: ", 1)[1])[1:]) == 0  # the same command
    assert events(out, "stage_resumed")[0]["stage_step"] >= 6
    _same_as_reference(reference[0], reference, cache)


def test_the_resume_hint_is_the_command_as_typed_and_resumes_in_the_same_cache(
        tmp_path: Path, reference: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    out, cache = tmp_path / "my run", tmp_path / "my cache"  # spaces: the hint must be shell-quoted
    typed = ["train", str(reference[0]), "--out", str(out), "--fresh", "--cache", str(cache), "stages.a.steps=12"]
    _writer("torch.save OSError", monkeypatch)
    assert main(typed) == 4
    err = capsys.readouterr().err
    _one_line(err)
    hint = err.split("resume with: ", 1)[1].strip()
    assert shlex.split(hint) == ["stagewise", *typed[:4], *typed[5:]]  # as typed, without starting over
    monkeypatch.undo()
    assert main(shlex.split(hint)[1:]) == 0  # followed literally
    assert events(out, "stage_resumed")[0]["stage_step"] == 6  # from the checkpoint saved in that cache
    _same_as_reference(reference[0], reference, cache)


def test_a_full_disk_while_caching_tokens(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from stagewise.data import cache as cache_module

    path = write_plan(tmp_path, _plan(corpus))
    _fail_on_call(monkeypatch, cache_module.os, "replace", 1, OSError(errno.ENOSPC, "No space left on device"),
                  when=lambda src, dst: str(dst).endswith(".bin"))
    assert main(["check", str(path), "--cache", str(tmp_path / "c")]) == 4
    err = capsys.readouterr().err
    _one_line(err)
    assert err.startswith(f"cannot write {tmp_path / 'c' / 'tokens'}") and "No space left on device (" in err
    monkeypatch.undo()
    assert main(["check", str(path), "--cache", str(tmp_path / "c")]) == 0


def test_a_real_write_limit_in_a_subprocess(tmp_path: Path, reference: Any) -> None:
    """RLIMIT_FSIZE makes the OS refuse a write past a size (EFBIG), as a full disk refuses
    (ENOSPC): here torch.save's state.pt is larger than the limit, the weights are not."""
    final = StageStore(reference[2] / "cache", _prepared(reference[0], reference[2] / "cache").stages[0].key).final_dir
    weights, state = (final / "model.safetensors").stat().st_size, (final / "state.pt").stat().st_size
    assert weights < state
    limit = (weights + state) // 2
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = [sys.executable, "-m", "stagewise", *_args(reference[0], out, cache)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    limited = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, check=False,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert limited.returncode == 4, limited.stderr
    _one_line(limited.stderr)
    assert limited.stderr.startswith("cannot write ") and "step-00000003" in limited.stderr
    assert "RuntimeError" in limited.stderr or "File too large" in limited.stderr
    assert subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, check=False).returncode == 0
    _same_as_reference(reference[0], reference, cache)


# ----------------------------------------------------------------------------------- non-finite

def test_nan_without_a_guard_stops_the_stage_and_keeps_the_last_good_checkpoint(
        tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_plan(tmp_path, _plan(corpus, [{**A, "inject": [{"at": 7, "kind": "nan"}]}]))
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(_args(path, out, cache)) == 3
    err = capsys.readouterr().err
    _one_line(err)
    # found at the next log line or checkpoint (step 9: one host sync per window), named by its update
    assert err.startswith("stage 'a' stopped at step 9 (plan step 9): non-finite loss at update 8; nothing after it "
                          "was saved and the last good checkpoint is step 6."), err
    prepared = _prepared(path, cache)
    store = StageStore(cache, prepared.stages[0].key)
    assert store.steps() == [3, 6] and store.final_manifest() is None
    assert all(torch.isfinite(t).all() for t in load_file(store.step_dir(6) / "model.safetensors").values())
    assert stage_status(prepared) == {"a": "resume at step 6"}
    (stop,) = events(out, "nonfinite_stop")
    assert stop["stage_step"] == 9 and stop["reason"] == "non-finite loss at update 8"
    assert all(m["loss"] == m["loss"] for m in read_jsonl(out / "metrics.jsonl") if m["kind"] == "train")


def test_allow_nonfinite_trains_on_but_never_caches_a_nonfinite_end(
        tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_plan(tmp_path, _plan(corpus, [{**A, "allow_nonfinite": True, "inject": [{"at": 7, "kind": "nan"}]}]))
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(_args(path, out, cache)) == 3
    err = capsys.readouterr().err
    _one_line(err)
    assert "stage 'a' stopped at step 12 (plan step 12): non-finite weights, val_loss, val_ppl at the stage's " \
           "end" in err
    store = StageStore(cache, _prepared(path, cache).stages[0].key)
    assert store.final_manifest() is None and 9 in store.steps()  # it trained on past the NaN


def test_a_nonfinite_final_evaluation_is_never_cached(tmp_path: Path, reference: Any,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from stagewise.tasks.lm import LanguageModelTask

    monkeypatch.setattr(LanguageModelTask, "evaluate", lambda *_: {"val_loss": float("nan"), "val_ppl": float("nan")})
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(_args(reference[0], out, cache)) == 3
    assert "non-finite val_loss, val_ppl at the stage's end" in capsys.readouterr().err
    assert StageStore(cache, _prepared(reference[0], cache).stages[0].key).final_manifest() is None
