"""Fine-tuning records read from local files: labeled texts, text pairs, tagged sentences,
prompt/completion pairs.

Every reader returns a `Records` list (a plain list of tuples that also remembers the file line
each record starts on), so a problem found later (a label unseen in training, a text with no
tokens) can still name its file and row. Every problem a user can fix is a one-line `UserError`
whose `where` is `file` or `file:line`; lines are 1-based file lines (a header counts), so an
editor jumps straight to them.

Tables are read with the standard library rather than `datasets`: a TSV here is tab-separated
values with no quoting at all (SMS texts are full of `"`, which a CSV parser would eat), blank
lines are skipped, and each row keeps its line number for the messages.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from stagewise.errors import UserError
from stagewise.tasks.chat import ChatTemplate

T = TypeVar("T")
Field = str | int  # a column name (the file has a header row) or a 0-based column index (no header)

FORMATS = ("csv", "tsv", "jsonl")
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
             ".json": "jsonl"}  # .json as JSON Lines, as data/sources.py reads it
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
    fmt = _format(path, fmt)
    (f1, what1), (f2, what2) = first, second
    if isinstance(f1, int) != isinstance(f2, int):
        raise UserError(str(path), "fields must both be column names (a file with a header row) or "
                                   f"both column indices (no header), got {f1!r} and {f2!r}")
    if isinstance(f1, int) and (f1 < 0 or f2 < 0):
        raise UserError(str(path), f"column indices start at 0, got {f1} and {f2}")
    text = _read_text(path)
    rows = _jsonl_fields(path, text, (f1, f2)) if fmt == "jsonl" else _table_fields(path, text, fmt, (f1, f2))
    records: list[tuple[str, str]] = []
    lines: list[int] = []
    for line, (v1, v2) in rows:
        where = f"{path}:{line}"
        records.append((_text(v1, what1, f1, where), _text(v2, what2, f2, where, allow_int=what2 == "label")))
        lines.append(line)
    if not records:
        raise UserError(str(path), "no records (only a header)" if isinstance(f1, str) and fmt != "jsonl"
                        else "no records")
    return Records(records, path, lines)


def _text(value: Any, what: str, field: Field, where: str, allow_int: bool = False) -> str:
    """A record's string, refusing non-strings and empty (all-whitespace) text."""
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        shown = "" if value is None else f" ({json.dumps(value)[:40]})"
        raise UserError(where, f"{what} in {_name(field)} is {_json_type(value)}{shown}, not a string")
    if not value.strip():
        raise UserError(where, f"empty {what} in {_name(field)}")
    return value


def _name(field: Field) -> str:
    return f"column {field}" if isinstance(field, int) else f"'{field}'"


def _format(path: Path, fmt: str | None) -> str:
    if fmt is None:
        fmt = _SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise UserError(str(path), f"cannot tell the format from the extension '{path.suffix}' "
                                       "(expected .csv, .tsv or .jsonl); set the format")
    elif fmt not in FORMATS:
        raise UserError(str(path), f"unknown format '{fmt}' (expected {', '.join(FORMATS)})")
    return fmt


def _read_text(path: Path) -> str:
    """The file as text, after the checks every format shares: it exists, is UTF-8, has text."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(str(path), "no such file") from None
    except IsADirectoryError:
        raise UserError(str(path), "is a directory, not a file") from None
    except OSError as e:
        raise UserError(str(path), f"cannot read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}", f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} "
                                          f"({e.reason})") from None
    text = text.removeprefix("\ufeff")  # spreadsheet exports start with a byte-order mark
    if not text.strip():
        raise UserError(str(path), "empty file" if not text else "empty file (only whitespace)")
    return text


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for non-blank lines. Split on \\n only: str.splitlines would also
    split on \\x0b, \\x1c, U+2028 ..., which real texts (SMS) contain inside a record."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def _table_rows(path: Path, text: str, fmt: str) -> Iterator[tuple[int, list[str]]]:
    """(first line of the row, cells) for every non-blank row."""
    if fmt == "tsv":
        for number, line in _lines(text):
            yield number, line.split("\t")
        return
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    end = 0  # the line the previous row ended on; a quoted cell may span lines
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}", f"cannot read as CSV: {e}") from None
        start, end = end + 1, reader.line_num
        if any(cell.strip() for cell in row):
            yield start, row


def _table_fields(path: Path, text: str, fmt: str,
                  wanted: tuple[Field, ...]) -> Iterator[tuple[int, list[str]]]:
    """(line, the wanted cells) per data row; every row must have as many columns as the first."""
    rows = _table_rows(path, text, fmt)
    first_line, first = next(rows)  # the text is not blank, so there is a first row
    if isinstance(wanted[0], str):
        header = [cell.strip() for cell in first]
        for name in header:
            if header.count(name) > 1:
                raise UserError(f"{path}:{first_line}", f"column '{name}' appears twice in the header")
        for field in wanted:
            if field not in header:
                raise UserError(f"{path}:{first_line}", f"no column '{field}' (header: {', '.join(header)})")
        indices = [header.index(str(field)) for field in wanted]
        width, data = len(header), rows
    else:
        indices = [int(field) for field in wanted]
        for index in indices:
            if index >= len(first):
                raise UserError(f"{path}:{first_line}", f"no column {index}: the row has "
                                                        f"{_count(len(first), 'column')} (numbered from 0)")
        width, data = len(first), _chain_first((first_line, first), rows)
    for line, row in data:
        if len(row) != width:
            raise UserError(f"{path}:{line}", f"{_count(len(row), 'column')}, expected {width} (as on line {first_line})")
        yield line, [row[i] for i in indices]


def _chain_first(first: tuple[int, list[str]],
                 rest: Iterator[tuple[int, list[str]]]) -> Iterator[tuple[int, list[str]]]:
    yield first
    yield from rest


def _json_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for number, line in _lines(text):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}", f"not valid JSON: {e.msg} (column {e.colno})") from None


def _jsonl_fields(path: Path, text: str, wanted: tuple[Field, ...]) -> Iterator[tuple[int, list[Any]]]:
    """(line, the wanted values): string fields name object keys, integer fields index arrays."""
    by_name = isinstance(wanted[0], str)
    for line, value in _json_rows(path, text):
        where = f"{path}:{line}"
        if by_name:
            if not isinstance(value, dict):
                raise UserError(where, f"expected a JSON object, got {_json_type(value)}")
            for field in wanted:
                if field not in value:
                    raise UserError(where, f"no field '{field}' (fields: {', '.join(value) or 'none'})")
            yield line, [value[field] for field in wanted]
        else:
            if not isinstance(value, list):
                raise UserError(where, f"expected a JSON array (the fields are indices), got {_json_type(value)}")
            for field in wanted:
                assert isinstance(field, int)
                if field >= len(value):
                    raise UserError(where, f"no item {field}: the array has {_count(len(value), 'item')} (numbered from 0)")
            yield line, [value[int(field)] for field in wanted]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}[type(value)]


# --- tagged sentences ------------------------------------------------------------------------


def read_conll(path: Path | str) -> Records[tuple[list[str], list[str]]]:
    """(tokens, tags) sentences from a CoNLL-style file: one `token<whitespace>...<whitespace>tag`
    per line (the token is the first column, the tag the last), a blank line between sentences,
    `-DOCSTART-` lines skipped. Tags are not checked against a scheme: metrics decide (see
    metrics.span_scores)."""
    path = Path(path)
    text = _read_text(path)
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
    text = _read_text(path)
    records: list[tuple[str, str]] = []
    lines: list[int] = []
    for line, row in _json_rows(path, text):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise UserError(where, f"expected a JSON object, got {_json_type(row)}")
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
                raise UserError(where, f"prompt in 'prompt' is {_json_type(prompt)}, not a string")
            records.append((prompt, _text(row["completion"], "completion", "completion", where)))
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
            raise UserError(where, f"{at}: expected an object with 'role' and 'content', got {_json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise UserError(where, f"{at}: no field '{key}'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(where, f"{at}.role: unknown role {json.dumps(role)[:40]} "
                                   f"(expected {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise UserError(where, f"{at}.content: {_json_type(content)}, not a string")
    last = messages[-1]
    if last["role"] != "assistant":
        raise UserError(where, f"messages must end with an assistant turn (the last is '{last['role']}')")
    if not last["content"].strip():
        raise UserError(where, f"messages[{len(messages) - 1}].content: empty completion")
    return template.split(messages, where)
