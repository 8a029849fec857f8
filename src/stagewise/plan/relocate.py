"""A raw plan written to another folder than the one it was read from (a search's best.yaml):
its local paths, relative to the plan's folder, rewritten relative to the new one, so that the
written plan checks and trains where it lies. Hub names, absolute and `~` paths, `{stdlib}` and
inline chat templates stay as they are."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from stagewise.data.sources import HUB_PREFIX


def relocated(raw: dict[str, Any], plan_dir: Path, new_dir: Path) -> dict[str, Any]:
    """A copy of `raw` whose relative paths name the same files from `new_dir`."""
    out = copy.deepcopy(raw)
    old, new = plan_dir.resolve(), new_dir.resolve()

    def moved(value: Any, *, local_only: bool = False) -> Any:
        """`local_only`: a name that may be a hub name too (a model, a tokenizer, a template
        file) moves only when it names something in the plan's folder."""
        if isinstance(value, list):
            return [moved(v, local_only=local_only) for v in value]
        if (not isinstance(value, str) or value.startswith((HUB_PREFIX, "~", "{stdlib}"))
                or Path(value).is_absolute() or (local_only and not (old / value).exists())):
            return value
        return os.path.relpath(old / value, new)

    def data(section: Any) -> None:
        if not isinstance(section, dict):
            return
        for key in ("train", "val"):
            if key in section:
                section[key] = moved(section[key])
        for source in section.get("mix") or []:
            if isinstance(source, dict):
                data(source)

    data(out.get("data"))
    if isinstance(out.get("defaults"), dict):
        data(out["defaults"].get("data"))
    for stage in out.get("stages") or []:
        if isinstance(stage, dict):
            data(stage.get("data"))
    if isinstance(out.get("model"), dict) and "pretrained" in out["model"]:
        out["model"]["pretrained"] = moved(out["model"]["pretrained"], local_only=True)
    if isinstance(out.get("tokenizer"), dict) and "path" in out["tokenizer"]:
        out["tokenizer"]["path"] = moved(out["tokenizer"]["path"], local_only=True)
    template = out.get("chat_template")
    if isinstance(template, str) and "{%" not in template and "{{" not in template:
        out["chat_template"] = moved(template, local_only=True)
    return out
