"""Rows of csv / tsv / jsonl files: the one reader of tables, for a causal-LM stage's documents
(data.sources) and a task stage's records (tasks.readers). Both must see the same rows, in the
same order, for the held-out rows of a table to be the same whichever stage reads it
(data.split).

How a file becomes rows:
- tsv: one row per line, cells split at tabs, and no quoting: a `"` is text. This is the IANA
  text/tab-separated-values format (a cell cannot hold a tab or a line break, so nothing needs
  quoting), and real TSV data is full of unbalanced quotes (SMS texts, Tatoeba's exports) that a
  CSV-style parser would run across lines, silently joining rows.
- csv: RFC 4180 quoting (the `csv` module, strict), so a quoted cell may hold commas and line
  breaks; an unterminated quote is an error, not a joined row.
- jsonl: one JSON value per line (an object, or an array for index fields); a file holding one
  JSON array of objects (a .json export) is read as those objects.
- Lines split on \\n only (a \\r before it is dropped): str.splitlines would also split on \\x0b,
  \\x1c, U+2028 ..., which real texts (SMS) contain inside a record. Blank lines are skipped, a
  byte-order mark is dropped, and every data row must have as many columns as the first row.

Every problem a user can fix is a one-line `UserError` whose `where` is `file` or `file:line`;
lines are 1-based file lines (a header counts), so an editor jumps straight to them.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stagewise.data.documents import not_utf8
from stagewise.errors import UserError

Field = str | int  # a column name (the file has a header row) or a 0-based column index (no header)

FORMATS = ("csv", "tsv", "jsonl")
SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
# Bumped whenever a file would give other rows than before; causal-LM corpora fingerprint it
# (data.sources), so no cache serves tokens of an older parse. 2: one reader for LM and task
# stages (the LM side read tables through `datasets`, which took a headed TSV's quotes as quoting).
VERSION = 2
# The largest table read: a file is parsed whole in memory (several times its size, as Python
# strings), so the bound keeps a preparation well under 2 GB; larger data is several files.
MAX_BYTES = 128 << 20


def table_format(path: Path, fmt: str | None) -> str:
    """`fmt`, checked, or (None) the format the file's extension says."""
    if fmt is None:
        fmt = SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise UserError(str(path), f"cannot tell the format from the extension '{path.suffix}' "
                                       "(expected .csv, .tsv or .jsonl); set the format")
    elif fmt not in FORMATS:
        raise UserError(str(path), f"unknown format '{fmt}' (expected {', '.join(FORMATS)})")
    return fmt


def check_size(path: Path) -> None:
    """A table (or parquet file) is read whole into memory: one larger than MAX_BYTES is refused
    (text files have no such bound: they are read piece by piece)."""
    try:
        size = path.stat().st_size
    except OSError:
        return  # reading it says what is wrong
    if size > MAX_BYTES:
        raise UserError(str(path), f"{size / 2**20:.0f} MiB: tables and parquet files are read whole, up to "
                                   f"{MAX_BYTES >> 20} MiB each; split it into several files (a glob reads them all) "
                                   "or give the text as a .txt file")


def read_text(path: Path) -> str:
    """The file as text, after the checks every format shares: it is not too large, exists, is
    UTF-8, has text."""
    check_size(path)
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
        raise UserError(f"{path}:{line}", not_utf8(data, 0, e)) from None
    text = text.removeprefix("\ufeff")  # spreadsheet exports start with a byte-order mark
    if not text.strip():
        raise UserError(str(path), "empty file" if not text else "empty file (only whitespace)")
    return text


def table_rows(path: Path, text: str, fmt: str, wanted: tuple[Field, ...]) -> Iterator[tuple[int, list[Any]]]:
    """(line the row starts on, the `wanted` values) for every row of `text`, the contents of
    `path` in format `fmt` (see table_format). Values are strings, or any JSON value for jsonl:
    `cell_text` checks them."""
    negative = [str(field) for field in wanted if isinstance(field, int) and field < 0]
    if negative:
        raise UserError(str(path), f"column indices start at 0, got {' and '.join(negative)}")
    if fmt == "jsonl":
        return _jsonl_fields(path, text, wanted)
    return _table_fields(path, text, fmt, wanted)


def cell_text(value: Any, what: str, field: Field, where: str, allow_int: bool = False) -> str:
    """A row's string, refusing non-strings and empty (all-whitespace) text. `allow_int`: a JSON
    integer is its decimal string (labels: the same data in csv and jsonl gives the same ones)."""
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        shown = "" if value is None else f" ({json.dumps(value)[:40]})"
        raise UserError(where, f"{what} in {_name(field)} is {json_type(value)}{shown}, not a string")
    if not value.strip():
        raise UserError(where, f"empty {what} in {_name(field)}")
    return value


def json_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) per JSON Lines row, or per object of a file that is one JSON array of them."""
    document = _json_array_of_objects(text)
    if document is not None:
        yield from document
        return
    for number, line in _lines(text):
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}", f"not valid JSON: {e.msg} (column {e.colno})") from None


def json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}[type(value)]


def _name(field: Field) -> str:
    return f"column {field}" if isinstance(field, int) else f"'{field}'"


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for non-blank lines, split on \\n only (see the module's docstring)."""
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line


def _cells(path: Path, text: str, fmt: str) -> Iterator[tuple[int, list[str]]]:
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
    rows = _cells(path, text, fmt)
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
    empty = True
    for line, row in data:
        if len(row) != width:
            raise UserError(f"{path}:{line}", f"{_count(len(row), 'column')}, expected {width} (as on line {first_line})")
        empty = False
        yield line, [row[i] for i in indices]
    if empty:
        raise UserError(str(path), "no records (only a header)")


def _chain_first(first: tuple[int, list[str]],
                 rest: Iterator[tuple[int, list[str]]]) -> Iterator[tuple[int, list[str]]]:
    yield first
    yield from rest


def _jsonl_fields(path: Path, text: str, wanted: tuple[Field, ...]) -> Iterator[tuple[int, list[Any]]]:
    """(line, the wanted values): string fields name object keys, integer fields index arrays."""
    by_name = isinstance(wanted[0], str)
    for line, value in json_rows(path, text):
        where = f"{path}:{line}"
        if by_name:
            if not isinstance(value, dict):
                raise UserError(where, f"expected a JSON object, got {json_type(value)}")
            for field in wanted:
                if field not in value:
                    raise UserError(where, f"no field '{field}' (fields: {', '.join(value) or 'none'})")
            yield line, [value[field] for field in wanted]
        else:
            if not isinstance(value, list):
                raise UserError(where, f"expected a JSON array (the fields are indices), got {json_type(value)}")
            for field in wanted:
                assert isinstance(field, int)
                if field >= len(value):
                    raise UserError(where, f"no item {field}: the array has {_count(len(value), 'item')} (numbered from 0)")
            yield line, [value[int(field)] for field in wanted]


_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _after_space(text: str, i: int) -> int:
    match = _SPACE.match(text, i)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _json_array_of_objects(text: str) -> list[tuple[int, dict]] | None:
    """(line each object starts on, object) when the whole text is one JSON array of objects;
    None otherwise (JSON Lines, including lines that are arrays of index fields)."""
    i = _after_space(text, 0)
    if not text.startswith("[", i):
        return None
    decoder = json.JSONDecoder()
    rows: list[tuple[int, dict]] = []
    line, counted = 1, 0  # the line of offset `counted`
    i = _after_space(text, i + 1)
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict):
            return None
        line, counted = line + text.count("\n", counted, i), i
        rows.append((line, value))
        i = _after_space(text, end)
        if text.startswith(",", i):
            i = _after_space(text, i + 1)
        elif text.startswith("]", i):
            return rows if not text[i + 1:].strip() else None
        else:
            return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
