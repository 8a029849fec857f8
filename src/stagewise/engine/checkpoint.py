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
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_model

from stagewise.engine.sharded import is_sharded
from stagewise.errors import WriteFailed, refused_object

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d{8})")
# What a write raises when the disk is full or the path unwritable: torch.save reports it as a
# RuntimeError from its zip writer, safetensors as a SafetensorError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class InvalidCheckpoint(Exception):
    """A checkpoint that is incomplete, corrupted, unreadable or not this stage's; the message
    names the directory or file and says which."""


def save_checkpoint(directory: Path, model: torch.nn.Module, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write atomically; on a failed write (WriteFailed) the previous checkpoints are untouched."""
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
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteFailed(directory, e) from None


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint directory; None when it has none. One that is there but does
    not read as a manifest (damaged bytes, another JSON value, fields of the wrong type) is an
    InvalidCheckpoint: the write completed, so the checkpoint is damaged, not absent."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidCheckpoint(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # not UTF-8, not JSON
        raise InvalidCheckpoint(f"{path}: not a valid manifest ({_first_line(e)})") from None
    if not isinstance(manifest, dict):
        raise InvalidCheckpoint(f"{path}: not a valid manifest (a JSON {type(manifest).__name__}, not an object)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()) \
            or not isinstance(manifest.get("step"), int) or isinstance(manifest.get("step"), bool):
        raise InvalidCheckpoint(f"{path}: not a valid manifest (its step or files are missing or of the wrong type)")
    return manifest


def verify(directory: Path, key: str) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint of stage `key`; InvalidCheckpoint otherwise."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise InvalidCheckpoint(f"{directory}: no manifest (an interrupted write)")
    if manifest.get("key") != key:
        raise InvalidCheckpoint(f"{directory}: belongs to stage key {manifest.get('key')}, not {key} "
                                "(the plan, model or data changed)")
    for name in (WEIGHTS, STATE):
        digest, path = manifest["files"].get(name), directory / name
        if not path.is_file():
            raise InvalidCheckpoint(f"{directory}: {name} is missing")
        try:
            same = _sha256(path) == digest
        except OSError as e:
            raise InvalidCheckpoint(f"{path}: cannot be read ({e.strerror or e})") from None
        if not same:
            raise InvalidCheckpoint(f"{directory}: {name} does not match its sha256 (corrupted or truncated)")
    return manifest


def load_checkpoint(directory: Path, key: str, model: torch.nn.Module,
                    apply: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify, read the state, hand it to `apply` (which restores what it holds), then load the
    weights into `model`; return (state, manifest). Any failure is an InvalidCheckpoint naming
    the file, raised before the weights are touched: the model keeps what it held."""
    manifest = verify(directory, key)
    state = read_state(directory / STATE)
    if apply is not None:
        try:
            apply(state)
        except Exception as e:  # noqa: BLE001 - any shape of state the restore cannot take is an invalid file
            raise InvalidCheckpoint(f"{directory / STATE}: not a state this stage can continue from "
                                    f"({type(e).__name__}: {_first_line(e)})") from None
    _check_weights(directory / WEIGHTS, model)
    try:
        if is_sharded(model):  # safetensors' load_model reads the model's storages, which shards have not
            model.load_state_dict(load_file(directory / WEIGHTS), strict=False)
        else:
            load_model(model, str(directory / WEIGHTS), strict=False)
    except Exception as e:  # noqa: BLE001 - safetensors' parse errors: checked shapes, unreadable data
        raise InvalidCheckpoint(f"{directory / WEIGHTS}: cannot be read "
                                f"({type(e).__name__}: {_first_line(e)})") from None
    return state, manifest


def check_checkpoint(directory: Path, key: str, model: torch.nn.Module,
                     probe: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """What `load_checkpoint` checks, without loading anything into the model (`probe` reads the
    state as its user will, without keeping it): the manifest."""
    manifest = verify(directory, key)
    state = read_state(directory / STATE)
    if probe is not None:
        try:
            probe(state)
        except Exception as e:  # noqa: BLE001 - as in load_checkpoint
            raise InvalidCheckpoint(f"{directory / STATE}: not a state this stage can continue from "
                                    f"({type(e).__name__}: {_first_line(e)})") from None
    _check_weights(directory / WEIGHTS, model)
    return manifest


def read_state(path: Path) -> dict[str, Any]:
    """The non-weight state, read only as tensors and plain values (weights_only). Torch's own
    message on a refused object suggests unpickling it freely; that is never done, nor said."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise InvalidCheckpoint(f"{path}: holds an object that the safe loader refuses{refused_object(e)}; it is "
                                "not a stagewise state and is never unpickled") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ... on a damaged file
        raise InvalidCheckpoint(f"{path}: cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(state, dict):
        raise InvalidCheckpoint(f"{path}: not a checkpoint state (a {type(state).__name__})")
    return state


def _check_weights(path: Path, model: torch.nn.Module) -> None:
    """The file's tensors (read from its header only) are the model's, with the model's shapes;
    so that loading cannot stop halfway with the model partly overwritten."""
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... : a damaged header
        raise InvalidCheckpoint(f"{path}: not readable safetensors ({type(e).__name__}: {_first_line(e)})") from None
    own = model.state_dict()
    unexpected = sorted(n for n in shapes if n not in own)
    held = {own[n].data_ptr() for n in shapes if n in own}  # tied weights are saved once
    missing = sorted(n for n in own if n not in shapes and own[n].data_ptr() not in held)
    if missing or unexpected:
        raise InvalidCheckpoint(f"{path.parent}: weights do not fit the model (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
    for name, shape in shapes.items():
        if tuple(own[name].shape) != shape:
            raise InvalidCheckpoint(f"{path.parent}: weights do not fit the model: {name} is {list(shape)} in "
                                    f"the file, {list(own[name].shape)} in the model")


def _first_line(e: BaseException) -> str:
    """An exception's first line, cut short; torch's advice to load unsafely is never passed on."""
    line = (str(e).strip().splitlines() or [""])[0]
    return "" if "weights_only" in line else line[:100]


class StageStore:
    """The checkpoints of one stage key."""

    def __init__(self, root: Path, key: str) -> None:
        self.key = key
        self.dir = root / "stages" / key
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteFailed(self.dir, e) from None

    @property
    def final_dir(self) -> Path:
        return self.dir / "final"

    def step_dir(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}"

    def lock(self) -> FileLock:
        return FileLock(str(self.dir / ".lock"))

    def final_manifest(self) -> dict[str, Any] | None:
        """The final checkpoint's manifest if it is complete (cheap: the sha256 is checked on load);
        InvalidCheckpoint when its manifest is damaged."""
        manifest = read_manifest(self.final_dir)
        return manifest if manifest is not None and manifest.get("key") == self.key else None

    def steps(self) -> list[int]:
        """Steps with a saved mid-stage checkpoint (manifest present: written whole, or damaged
        since, which loading it reports), oldest first."""
        found = []
        for d in self.dir.glob("step-*"):
            if (m := _STEP_DIR.fullmatch(d.name)) is not None and (d / MANIFEST).is_file():
                found.append(int(m.group(1)))
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

    def clear(self) -> None:
        """Forget the stage (`train --fresh`): delete the files the tool wrote here (checkpoints,
        torn writes) and nothing else; a directory left with something else in it stays. Called
        with the lock held."""
        for d in self.dir.iterdir():
            if d.is_dir() and not d.is_symlink() and (d.name == "final" or _STEP_DIR.fullmatch(d.name)
                                                     or d.name.startswith((".tmp-", ".old-"))):
                for name in (MANIFEST, WEIGHTS, STATE):
                    (d / name).unlink(missing_ok=True)
                try:
                    d.rmdir()
                except OSError:  # not empty: not only ours
                    pass


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
