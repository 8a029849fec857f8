"""Writes the reference pages that are generated from the code, so they cannot go stale:
docs/reference/plan.md from the pydantic plan schema (every key: type, default, allowed values,
description) and docs/reference/cli.md from the command-line parser.

`make docs` runs it before building the site; tests/test_docs.py fails when a committed page
differs from what this writes, or when a plan key has no description.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from stagewise import cli
from stagewise.config.plan_config import Plan

DOCS = Path(__file__).resolve().parent
PAGES = {"reference/plan.md": lambda: plan_reference(), "reference/cli.md": lambda: cli_reference()}


@dataclass(frozen=True)
class Key:
    """One key of a plan file."""

    path: str  # as a plan spells it: stages[].optimizer.lr
    parent: str  # the mapping that holds it: stages[].optimizer ("" at the top)
    type: str
    default: str
    allowed: str
    description: str


def _constraints(metadata: list[Any]) -> list[str]:
    words = []
    for item in metadata:
        for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, name, None)
            if isinstance(item, (at.Ge, at.Gt, at.Le, at.Lt)) and value is not None:
                words.append(f"{sign} {value:,}" if isinstance(value, int) else f"{sign} {value}")
        if isinstance(item, at.MinLen):
            words.append(f"at least {item.min_length}")
        if isinstance(item, at.MaxLen):
            words.append(f"at most {item.max_length:,}")
        pattern = getattr(item, "pattern", None)
        if isinstance(pattern, str):
            words.append(f"matching `{pattern}`")
    return words


def _type(tp: Any) -> str:
    """A type as a plan writer reads it: `int >= 1`, `list of str`, `mapping`, `float | auto`. A type
    checked by a function of its own (PlainValidator) shows what it holds; its bounds are in the
    key's description."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner, *metadata = typing.get_args(tp)
        limits = _constraints(metadata)
        for item in metadata:  # Field(...) inside Annotated carries its own metadata list
            if isinstance(item, FieldInfo):
                limits += _constraints(item.metadata)
        return _type(inner) + (f" ({', '.join(limits)})" if limits else "")
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(arg) for arg in typing.get_args(tp) if arg is not type(None))
    if origin is Literal:
        return " | ".join(f"`{_yaml(v)}`" for v in typing.get_args(tp))
    if origin is list:
        return f"list of {_type(typing.get_args(tp)[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type(arg) for arg in typing.get_args(tp)) + "]"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mapping"
    return {str: "str", int: "int", float: "float", bool: "bool"}.get(tp, str(tp))


def _yaml(value: Any) -> str:
    if value is True or value is False:
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _models(tp: Any) -> list[type[BaseModel]]:
    """The plan models a field holds (directly, in a list, or in a union)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in _models(arg)]


def _discriminator(tp: Any) -> str | None:
    """The key that picks one of several mappings a field may hold (pydantic's discriminator)."""
    if typing.get_origin(tp) is typing.Annotated:
        for item in typing.get_args(tp)[1:]:
            if isinstance(item, FieldInfo) and isinstance(item.discriminator, str):
                return item.discriminator
    return next((d for arg in typing.get_args(tp) if (d := _discriminator(arg))), None)


def _is_list(tp: Any) -> bool:
    """Whether a field holds a list (of mappings): its keys are spelled `key[].sub`."""
    return typing.get_origin(tp) is list or any(_is_list(arg) for arg in typing.get_args(tp))


def _allowed(tp: Any) -> list[Any]:
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    return [v for arg in typing.get_args(tp) for v in _allowed(arg)]


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is None or value is PydanticUndefined:
        return "unset"
    if isinstance(value, BaseModel):
        return "{}" if not value.model_fields_set else f"`{value.model_dump(exclude_unset=True)}`"
    if value == []:
        return "`[]`"
    if isinstance(value, list) and all(isinstance(v, BaseModel) for v in value):
        return f"`{_yaml([v.model_dump(exclude_unset=True) for v in value])}`"
    return f"`{_yaml(value)}`"


def plan_keys(model: type[BaseModel] = Plan, prefix: str = "", picked_by: str | None = None) -> Iterator[Key]:
    """Every key a plan may hold, depth first, in the schema's order. A field that holds one of
    several mappings picked by a key (`track: [{wandb: {mode: offline}}]`) lists each one's keys
    under its name (`track[].wandb.mode`); the picking key itself is that name."""
    for name, field in model.model_fields.items():
        if name == picked_by:
            continue
        key = field.alias or name
        path = f"{prefix}{key}"
        tp = field.annotation
        allowed = _allowed(tp)
        limits = _constraints(field.metadata)  # pydantic moves a field's own Annotated metadata here
        kind = _type(tp) + (f" ({', '.join(limits)})" if limits else "")
        yield Key(path, prefix.removesuffix("."), kind, _default(field),
                  ", ".join(f"`{_yaml(v)}`" for v in allowed), " ".join((field.description or "").split()))
        inner = f"{path}[]." if _is_list(tp) else f"{path}."
        picker = field.discriminator if isinstance(field.discriminator, str) else _discriminator(tp)
        for sub in _models(tp):
            if picker is None:
                yield from plan_keys(sub, inner)
            else:
                (choice,) = typing.get_args(sub.model_fields[picker].annotation)
                yield from plan_keys(sub, f"{inner}{choice}.", picker)


def _order(keys: list[Key], parent: str) -> tuple[int, int]:
    """Sections in the order their mapping's key comes in the schema (the top level first), a
    mapping picked by name (`track[].wandb`) after its field, in order of appearance."""
    held_by, path = -1, parent
    while path and held_by < 0:
        held_by = next((i for i, k in enumerate(keys) if k.path == path.removesuffix("[]")), -1)
        path = path.rpartition(".")[0]
    return held_by, next(i for i, k in enumerate(keys) if k.parent == parent)


def plan_reference() -> str:
    keys = list(plan_keys())
    lines = [
        "# Plan keys",
        "",
        "<!-- Generated by docs/gen_reference.py from stagewise's plan schema: do not edit. -->",
        "",
        f"Every key a plan file may hold ({len(keys)} keys), generated from the pydantic schema that checks",
        "plans (`stagewise check`). A path such as `stages[].optimizer.lr` is the key `lr` of the `optimizer`",
        "mapping of any stage; a command-line override spells it `stages.NAME.optimizer.lr=...`.",
        "`defaults:` (plan level) holds stage keys merged into every stage, the stage's own keys winning.",
        "`model` also takes the architecture's own config fields (`n_layer`, `n_embd`, ...), checked",
        "against its config class. *unset* means the key is absent; what then applies is in the description.",
        "",
    ]
    section = None
    for key in sorted(keys, key=lambda k: _order(keys, k.parent)):
        if key.parent != section:
            section = key.parent
            lines += ["", f"## `{section}`" if section else "## Top level", "",
                      "| key | type | default | description |", "|---|---|---|---|"]
        lines.append(f"| `{key.path}` | {_cell(key.type)} | {key.default} | {_cell(key.description)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: `|` escaped, and `<...>` outside code spans kept as text
    rather than read as HTML (`runs/<name>`)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split()).removeprefix("usage: ")


def cli_reference() -> str:
    parser = cli._parser()
    lines = ["# Command line", "",
             "<!-- Generated by docs/gen_reference.py from stagewise's argument parser: do not edit. -->", "",
             f"`stagewise` (or `python -m stagewise`): {parser.description} Every command and option below",
             "comes from the parser itself. A bad argument is one line on stderr and exit code 2",
             "([exit codes](exit-codes.md)).", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    for name, command in sub.choices.items():
        lines += [f"## `stagewise {name}`", "", f"{helps.get(name, '')}.", "", "```", _usage(command), "```", "",
                  "| argument | default | what it does |", "|---|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            spelled = ", ".join(action.option_strings) or action.dest
            if action.metavar and action.option_strings:
                spelled += f" {action.metavar}"
            elif action.choices and action.option_strings:
                spelled += " {" + ",".join(map(str, action.choices)) + "}"
            default = "" if action.default in (None, False, [], argparse.SUPPRESS) or action.required \
                else f"`{action.default}`"
            required = "required; " if action.required and action.option_strings else ""
            lines.append(f"| `{spelled}` | {default} | {required}{_cell(action.help or '')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    for name, render in PAGES.items():
        path = DOCS / name
        text = render()
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(DOCS.parent)}")


if __name__ == "__main__":
    main()
