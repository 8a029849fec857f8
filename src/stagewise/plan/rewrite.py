"""A plan written back as YAML in its own file's layout: the values of a changed plan (an LR
found by lr-find, overrides, moved paths) put into the file's text by a ruamel.yaml round trip,
so that its comments, key order, flow style and indentation stay where the user put them."""

from __future__ import annotations

import io
import re
from typing import Any

import yaml

from stagewise.plan.load import load_yaml


def rewritten(text: str, raw: dict[str, Any]) -> str:
    """`raw` as YAML, laid out as `text` (a plan file) where they agree: only the values that
    differ are replaced. Where the file cannot carry the change as it is (anchors shared by two
    places that now differ, a text that is not a mapping), `raw` is dumped plainly."""
    from ruamel.yaml import YAML, YAMLError
    from ruamel.yaml.util import load_yaml_guess_indent

    plain = yaml.safe_dump(raw, sort_keys=False)
    round_trip = YAML()  # comments, key order, styles, anchors and quotes kept
    round_trip.preserve_quotes = True
    round_trip.width = 4096  # no line the user wrote on one line is folded
    try:
        tree = round_trip.load(text)
        _, sequence, offset = load_yaml_guess_indent(text)
    except YAMLError:
        return plain
    if not isinstance(tree, dict):
        return plain
    _merge(tree, load_yaml(text), raw)
    round_trip.indent(mapping=_mapping_indent(text), sequence=sequence or 2, offset=offset or 0)
    out = io.StringIO()
    round_trip.dump(tree, out)
    # What it reads back as must be `raw` exactly (an anchor shared by two places, one of them
    # changed, would change both): else the plain dump.
    return out.getvalue() if _same(load_yaml(out.getvalue()), raw) else plain


def _mapping_indent(text: str) -> int:
    """How far the file indents a mapping under a top-level key (ruamel guesses only lists')."""
    found = re.search(r"^[^\s#-][^\n]*:[ \t]*(?:#[^\n]*)?\n(?:[ \t]*(?:#[^\n]*)?\n)*( +)[^\s#-]", text, re.MULTILINE)
    return len(found.group(1)) if found else 2


def _merge(node: Any, was: Any, value: Any) -> Any:
    """`value` written into `node` (the round-trip tree of a value that read as `was`) in place
    where both are mappings, or lists of one length; returns what stands for `value` in the tree.
    A scalar is kept as written (`1e-3`, quotes) while it reads as the same value."""
    if isinstance(node, dict) and isinstance(was, dict) and isinstance(value, dict):
        for key in [k for k in node if k not in value]:
            del node[key]
        for key, item in value.items():
            new = _merge(node[key], was.get(key), item) if key in node else item
            if key not in node or new is not node[key]:  # an untouched key keeps its comment's column
                node[key] = new
        return node
    if (isinstance(node, list) and isinstance(was, list) and isinstance(value, list)
            and len(node) == len(was) == len(value)):
        for i, item in enumerate(value):
            new = _merge(node[i], was[i], item)
            if new is not node[i]:
                node[i] = new
        return node
    if _same(was, value):
        return node
    if isinstance(node, str) and isinstance(value, str):
        return type(node)(value)  # a quoted string stays quoted (ruamel's string types carry the style)
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal, with types as YAML tells them apart (1 is not true, 1 is not 1.0, "1" is not 1)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b
