"""Checkpoints and the stage store.

A checkpoint is a directory: `model.safetensors` (weights), `state.pt` (optimizer, sampler, RNG,
step and the running state of logs and rules; read back with `torch.load(weights_only=True)`) and
`manifest.json` (stage key, step, sha256 of each file). It is written into a temporary directory
beside its final place, fsynced, then renamed: a directory without a valid manifest does not exist.

The store keeps checkpoints by stage key, `<cache>/stages/<key>/{final,step-NNNNNNNN}`, so a stage
is trained once for every plan and run that shares it; a file lock per key makes a second process
wait for a stage the first is training instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_model, save_model

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
FORMAT = 1


class CheckpointWriteError(Exception):
    """Saving failed (e.g. the disk is full); the previous checkpoint is untouched."""


class InvalidCheckpoint(Exception):
    """A checkpoint that is incomplete, corrupted or not this stage's; the message says which."""


def save_checkpoint(directory: Path, model: torch.nn.Module, state: dict[str, Any], meta: dict[str, Any]) -> None:
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        files = {name: _sha256(tmp / name) for name in (WEIGHTS, STATE)}
        _write_synced(tmp / MANIFEST, json.dumps({"format": FORMAT, **meta, "files": files}, indent=1))
        for name in files:
            _fsync(tmp / name)
        if directory.exists():  # the same step saved again (a resumed stage): replace it whole
            old = directory.parent / f".old-{directory.name}-{os.getpid()}"
            directory.rename(old)
            shutil.rmtree(old)
        tmp.rename(directory)
        _fsync(directory.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not save checkpoint {directory}: {e.strerror or e}") from None


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def verify(directory: Path, key: str) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint of stage `key`; InvalidCheckpoint otherwise."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise InvalidCheckpoint(f"{directory}: no valid manifest (an interrupted write)")
    if manifest.get("key") != key:
        raise InvalidCheckpoint(f"{directory}: belongs to stage key {manifest.get('key')}, not {key} "
                                "(the plan, model or data changed)")
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise InvalidCheckpoint(f"{directory}: {name} is missing")
        if _sha256(path) != digest:
            raise InvalidCheckpoint(f"{directory}: {name} does not match its sha256 (corrupted or truncated)")
    return manifest


def load_checkpoint(directory: Path, key: str, model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify, load the weights into `model`, and return (state, manifest)."""
    manifest = verify(directory, key)
    try:
        missing, unexpected = load_model(model, str(directory / WEIGHTS), strict=False)
    except RuntimeError as e:
        raise InvalidCheckpoint(f"{directory}: weights do not fit the model: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise InvalidCheckpoint(f"{directory}: weights do not fit the model (missing {sorted(missing)[:3]}, "
                                f"unexpected {sorted(unexpected)[:3]})")
    state = torch.load(directory / STATE, weights_only=True, map_location="cpu")
    return state, manifest


class StageStore:
    """The checkpoints of one stage key."""

    def __init__(self, root: Path, key: str) -> None:
        self.key = key
        self.dir = root / "stages" / key
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def final_dir(self) -> Path:
        return self.dir / "final"

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}"

    def lock(self) -> FileLock:
        return FileLock(str(self.dir / ".lock"))

    def final_manifest(self) -> dict[str, Any] | None:
        """The final checkpoint's manifest if it is complete (cheap: the sha256 is checked on load)."""
        manifest = read_manifest(self.final_dir)
        return manifest if manifest is not None and manifest.get("key") == self.key else None

    def steps(self) -> list[int]:
        """Steps with a saved mid-stage checkpoint (manifest present), oldest first."""
        found = []
        for d in self.dir.glob("step-*"):
            if read_manifest(d) is not None:
                found.append(int(d.name.removeprefix("step-")))
        return sorted(found)

    def prune(self, keep: int, pinned: set[int]) -> None:
        """Delete all but the newest `keep` mid-stage checkpoints (never a pinned one), and any
        temporary directory left by a killed write. Called with the lock held."""
        for tmp in self.dir.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        steps = self.steps()
        for step in steps[: max(0, len(steps) - keep)]:
            if step not in pinned:
                shutil.rmtree(self.step_dir(step), ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
