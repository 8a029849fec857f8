"""A pickle that would run code when unpickled (here: create a marker file) is never unpickled,
wherever a run reads one: a checkpoint a branch starts from, a checkpoint a merge averages, a
stage's final checkpoint that would be reused, and a pretrained model's `pytorch_model.bin`.
Each is refused with one line and the marker never appears."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import events, tiny_plan, write_plan
from safetensors.torch import load_file

from stagewise.cli import main
from stagewise.engine.checkpoint import StageStore
from stagewise.engine.prepare_run import prepare
from stagewise.plan.load import load_plan

CONST = {"name": "const", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 12}
BRANCH = {"name": "branch", "from": "const@4", "optimizer": {"name": "sgd", "lr": 0.1}, "steps": 2}
MERGE = {"name": "merged", "from": "const", "merge": {"last": 3}}  # const's steps 4, 8 and its end


class _Marker:
    """Unpickled freely, it creates the file `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _hostile(path: Path, marker: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Save a torch file holding `_Marker`, and check it is one: loaded unsafely, it makes the marker."""
    torch.save({**(tensors or {}), "x": _Marker(marker)}, path)
    torch.load(path, weights_only=False)  # what stagewise must never do
    assert marker.exists()
    marker.unlink()


def _poison_state(directory: Path, marker: Path) -> Path:
    """Replace a checkpoint's state.pt (and its sha256 in the manifest: damage a checksum cannot see)."""
    state = directory / "state.pt"
    _hostile(state, marker)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["state.pt"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return state


@pytest.mark.parametrize("where", ["branch point", "merge source", "reused final"])
def test_a_hostile_checkpoint_state_is_refused_in_one_line(tmp_path: Path, corpus: Path, where: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    plan = write_plan(tmp_path, tiny_plan(corpus, [CONST, BRANCH, MERGE], checkpoint={"every": 4, "keep": 1}))
    cache, marker = tmp_path / "cache", tmp_path / "MARKER"
    args = ["train", str(plan), "--cache", str(cache)]
    assert main([*args, "--out", str(tmp_path / "r1")]) == 0
    store = StageStore(cache, prepare(load_plan(plan), plan, cache).stages[0].key)
    directory = {"branch point": store.step_dir(4), "merge source": store.step_dir(8),
                 "reused final": store.final_dir}[where]
    state = _poison_state(directory, marker)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "r2")]) == 0
    printed = capsys.readouterr()
    warnings = [line for line in printed.out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: {state}: holds an object that the safe loader refuses (io.open); it is not a stagewise state "
        "and is never unpickled;"), warnings
    assert "weights_only=False" not in printed.out + printed.err and "Traceback" not in printed.err
    (invalid,) = events(tmp_path / "r2", "checkpoint_invalid")
    assert invalid["stage"] == "const" and str(state) in invalid["reason"]
    assert not marker.exists()
    # the refused checkpoint was trained and saved again: the same weights as the first run's
    r1, r2 = (load_file(tmp_path / r / "stages" / "merged" / "model.safetensors") for r in ("r1", "r2"))
    assert all(torch.equal(r1[k], r2[k]) for k in r1)


def test_a_pretrained_pytorch_model_bin_is_read_as_tensors_only(tmp_path: Path, corpus: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import tiny_pretrained
    finally:
        sys.path.pop(0)
    model = tiny_pretrained.build(tmp_path / "tiny")
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    plan = tiny_plan(corpus, [{**CONST, "steps": 1}], model={"pretrained": str(model)},
                     tokenizer={"kind": "pretrained", "path": str(model)})
    path = write_plan(tmp_path, plan)
    check = ["check", str(path), "--cache", str(tmp_path / "cache")]
    torch.save(weights, model / "pytorch_model.bin")  # plain tensors: loaded
    assert main(check) == 0
    marker = tmp_path / "MARKER"
    _hostile(model / "pytorch_model.bin", marker, weights)
    capsys.readouterr()
    assert main(check) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {path}: model.pretrained: cannot load '{model}': its weights file holds an object that "
                   "the safe loader refuses (io.open); it is never unpickled (safetensors weights hold none)\n")
    assert not marker.exists()
