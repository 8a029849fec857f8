"""File readers for the fine-tuning tasks: labeled texts, text pairs, tagged sentences,
prompt/completion pairs.

Every reader returns a `Records` list (a plain list of tuples that also remembers the file line
each record starts on), so a problem found later (a label unseen in training, a text with no
tokens) can still name its file and row. Every problem a user can fix is a one-line `UserError`
whose `where` is `file` or `file:line`; lines are 1-based file lines (a header counts), so an
editor jumps straight to them.

Tables (csv, tsv, jsonl) become rows in data.tables, the reader a causal-LM stage on the same
file uses too: both see the same rows, so both hold out the same ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from stagewise.data.tables import Field, cell_text, json_rows, json_type, read_text, table_format, table_rows
from stagewise.errors import UserError
from stagewise.tasks.chat import ChatTemplate

T = TypeVar("T")
ROLES = ("system", "user", "assistant")


class Records(list[T]):
    """A list of records plus where each came from (`path`, the 1-based line it starts on).

    Slicing or copying gives a plain list; `where_of` then falls back to "record N"."""

    def __init__(self, items: Iterable[T], path: Path, lines: Sequence[int]) -> None:
        super().__init__(items)
        self.path = path
        self.lines = list(lines)
        assert len(self.lines) == len(self)

    def where(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}"


def where_of(records: Sequence[Any]) -> Callable[[int], str]:
    """index -> where that record is, for error messages about records of any sequence."""
    if isinstance(records, Records):
        return records.where
    return lambda index: f"record {index + 1}"


# --- labeled texts and pairs -----------------------------------------------------------------


def read_labeled(path: Path | str, text_field: Field, label_field: Field,
                 fmt: str | None = None) -> Records[tuple[str, str]]:
    """(text, label) records from a .csv/.tsv/.jsonl file. Labels are strings; a JSON integer
    label becomes its decimal string, so the same data in CSV and JSONL gives the same labels."""
    return _read_two(Path(path), (text_field, "text"), (label_field, "label"), fmt)


def read_pairs(path: Path | str, source_field: Field, target_field: Field,
               fmt: str | None = None) -> Records[tuple[str, str]]:
    """(source, target) text records (translation, summarization, ...) from .csv/.tsv/.jsonl."""
    return _read_two(Path(path), (source_field, "source"), (target_field, "target"), fmt)


def _read_two(path: Path, first: tuple[Field, str], second: tuple[Field, str],
              fmt: str | None) -> Records[tuple[str, str]]:
    fmt = table_format(path, fmt)
    (f1, what1), (f2, what2) = first, second
    if isinstance(f1, int) != isinstance(f2, int):
        raise UserError(str(path), "fields must both be column names (a file with a header row) or "
                                   f"both column indices (no header), got {f1!r} and {f2!r}")
    records: list[tuple[str, str]] = []
    lines: list[int] = []
    for line, (v1, v2) in table_rows(path, read_text(path), fmt, (f1, f2)):
        where = f"{path}:{line}"
        records.append((cell_text(v1, what1, f1, where), cell_text(v2, what2, f2, where, allow_int=what2 == "label")))
        lines.append(line)
    return Records(records, path, lines)


# --- tagged sentences ------------------------------------------------------------------------


def read_conll(path: Path | str) -> Records[tuple[list[str], list[str]]]:
    """(tokens, tags) sentences from a CoNLL-style file: one `token<whitespace>...<whitespace>tag`
    per line (the token is the first column, the tag the last), a blank line between sentences,
    `-DOCSTART-` lines skipped. Tags are not checked against a scheme: metrics decide (see
    metrics.span_scores)."""
    path = Path(path)
    text = read_text(path)
    sentences: list[tuple[list[str], list[str]]] = []
    starts: list[int] = []
    tokens: list[str] = []
    tags: list[str] = []
    # A sentinel blank line ends the last sentence; blank lines are "\n\n", so split keeps them.
    for number, line in enumerate([*text.split("\n"), ""], start=1):
        parts = line.split()
        if not parts:
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            continue
        if parts[0] == "-DOCSTART-":
            continue
        if len(parts) < 2:
            raise UserError(f"{path}:{number}", f"expected a token and a tag separated by whitespace, "
                                                f"got {line.strip()!r:.60}")
        if not tokens:
            starts.append(number)
        tokens.append(parts[0])
        tags.append(parts[-1])
    if not sentences:
        raise UserError(str(path), "no sentences (only -DOCSTART- lines)")
    return Records(sentences, path, starts)


# --- prompt/completion -----------------------------------------------------------------------


def read_prompt_completion(path: Path | str, template: ChatTemplate | None = None) -> Records[tuple[str, str]]:
    """(prompt, completion) records from JSONL. Each row has either `prompt` and `completion`
    (strings, used as they are; the prompt may be empty) or `messages`, a list of
    {"role": system|user|assistant, "content": str} ending with an assistant turn. Messages are
    rendered with `template` (tasks.chat): the prompt is every turn before the last one plus the
    opening of the last assistant turn; the completion is its content plus the template's end
    marker. Only that last turn is trained on; earlier assistant turns are context. No template:
    the built-in one."""
    path = Path(path)
    template = template or ChatTemplate()
    text = read_text(path)
    records: list[tuple[str, str]] = []
    lines: list[int] = []
    for line, row in json_rows(path, text):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise UserError(where, f"expected a JSON object, got {json_type(row)}")
        if "messages" in row:
            if "prompt" in row or "completion" in row:
                raise UserError(where, "has both 'messages' and 'prompt'/'completion'; use one")
            records.append(_from_messages(row["messages"], template, where))
        elif "prompt" in row or "completion" in row:
            for field in ("prompt", "completion"):
                if field not in row:
                    raise UserError(where, f"no field '{field}' (fields: {', '.join(row)})")
            prompt = row["prompt"]
            if not isinstance(prompt, str):  # an empty prompt is allowed: unconditional generation
                raise UserError(where, f"prompt in 'prompt' is {json_type(prompt)}, not a string")
            records.append((prompt, cell_text(row["completion"], "completion", "completion", where)))
        else:
            raise UserError(where, "expected 'prompt' and 'completion' fields or a 'messages' list "
                                   f"(fields: {', '.join(row) or 'none'})")
        lines.append(line)
    return Records(records, path, lines)


def _from_messages(messages: Any, template: ChatTemplate, where: str) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages:
        raise UserError(where, "'messages' must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise UserError(where, f"{at}: expected an object with 'role' and 'content', got {json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise UserError(where, f"{at}: no field '{key}'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(where, f"{at}.role: unknown role {json.dumps(role)[:40]} "
                                   f"(expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise UserError(where, f"{at}.content: {json_type(content)}, not a string")
    last = messages[-1]
    if last["role"] != "assistant":
        raise UserError(where, f"messages must end with an assistant turn (the last is '{last['role']}')")
    if not last["content"].strip():
        raise UserError(where, f"messages[{len(messages) - 1}].content: empty completion")
    return template.split(messages, where)
