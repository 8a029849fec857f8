"""The training text: `data.train`/`data.val` files (or a hub dataset) read into documents.

Tables (csv, tsv, jsonl) are read by data.tables, the reader task stages use: the same rows,
so the same held-out rows (data.split), and no `datasets` import. Text and parquet files go
through the `datasets` library's local builders. Problems a user can fix (no file matches, empty
file, bad UTF-8, missing column, non-string row, unparseable file) are raised as one-line
`UserError`s naming the file (and the line, for tables), before any training starts.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import itertools
import json
import re
import sysconfig
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagewise.config.data_config import DataConfig
from stagewise.data import tables
from stagewise.data.documents import Documents, Part, Scan, TextFile, Texts, not_utf8, scan_text
from stagewise.data.split import held_out
from stagewise.errors import UserError

if TYPE_CHECKING:  # `datasets` takes a second to import: only runs that parse files pay for it
    import datasets

HUB_PREFIX = "hub:"

# Plan format -> its data.tables format (the plan says json for JSON Lines).
_TABLES = {"json": "jsonl", "csv": "csv", "tsv": "tsv"}
# Formats by file extension under `format: auto`: the tables' as data.tables tells them; any other
# extension (.py, .md, ...) is text.
_EXTENSIONS = {".txt": "text", ".parquet": "parquet", ".bin": "tokens", ".npy": "tokens",
               **{suffix: "json" if fmt == "jsonl" else fmt for suffix, fmt in tables.SUFFIXES.items()}}
# Plan format -> (datasets builder, builder options): what datasets reads (text files are read directly).
_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    "parquet": ("parquet", {}),
}


@dataclass(frozen=True)
class Corpus:
    train: Documents
    val: Documents
    files: list[Path]  # every file read, train then val
    fingerprint: str  # sha256 of the files' contents and the settings that shape the split


def load_corpus(cfg: DataConfig, plan_dir: Path, *, seed: int, cache_dir: Path | None = None,
                scans: Mapping[Path, Scan] | None = None) -> Corpus:
    """Read `cfg.train` and `cfg.val`. Without `cfg.val`, `val_fraction` is held out: of the
    rows, drawn by `seed`, when every source is a table (the rows a task stage on the same file
    holds out); else the last `val_fraction` of the characters.

    `cache_dir` is where `datasets` keeps hub downloads (None: its default, under HF_HOME).
    Local text and parquet files are parsed in a scratch directory and not cached: `datasets`
    would key that cache on file mtimes, and a stale copy under a new content fingerprint would
    poison the token cache; callers cache the tokens instead. `scans`: the files' scans made by
    source_digest, so that no file is read twice before it is encoded.
    """
    with data_file_keys(cfg, plan_dir):
        return _load_corpus(cfg, plan_dir, seed, cache_dir, scans or {})


@contextmanager
def data_file_keys(cfg: DataConfig, plan_dir: Path, where: str = "data") -> Iterator[None]:
    """An error about a data file (named by its path, perhaps with a line number) also names the
    plan key that points at the file: `data.train: /x/y.csv:12: ...`; `where`: the data's key."""
    try:
        yield
    except UserError as e:
        key = _key_of(e.where, cfg, plan_dir)
        if key is None:
            raise
        raise UserError(f"{where}.{key}: {e.where}", e.message) from None


def _key_of(file_where: str, cfg: DataConfig, plan_dir: Path) -> str | None:
    """`train` or `val`: the key whose path or glob names the file in `file_where`; else None."""
    path = re.sub(r":\d+$", "", file_where)
    for key in ("train", "val"):
        value = getattr(cfg, key)
        for pattern in [value] if isinstance(value, str) else value or []:
            full = pattern if pattern.startswith(HUB_PREFIX) else str(_full_path(pattern, plan_dir))
            if path == full or fnmatch.fnmatchcase(path, full):
                return key
    return None


def _load_corpus(cfg: DataConfig, plan_dir: Path, seed: int, cache_dir: Path | None,
                 scans: Mapping[Path, Scan]) -> Corpus:
    assert cfg.train is not None, "a mix is read source by source (data.mixture)"
    train_sources = resolve_sources(cfg.train, plan_dir, "data.train")
    train, train_digests = _documents(train_sources, cfg, cache_dir, scans, split="train")
    split = _split(train_sources, cfg, seed)
    val_sources: list[Path | str] = []
    val_digests: list[bytes] = []
    if split is None:
        val_sources = resolve_sources(cfg.val, plan_dir, "data.val")  # type: ignore[arg-type]
        val, val_digests = _documents(val_sources, cfg, cache_dir, scans, split="validation")
    elif split["by"] == "rows":
        train, val = _split_by_rows(train, cfg.val_fraction, seed, where=str(train_sources[0]))
    else:
        train, val = _split_by_characters(train, cfg.val_fraction)
    for where, docs in (("data.train", train), ("data.val", val)):
        if not docs.chars:
            raise UserError(where, "no text (every document is empty)")

    settings = {"format": cfg.format, "field": cfg.field, "split": split,
                **_table_reader([*train_sources, *val_sources], cfg)}
    fingerprint = _digest(json.dumps(settings).encode(), _digest(*train_digests), _digest(*val_digests))
    files = [s for s in (*train_sources, *val_sources) if isinstance(s, Path)]
    return Corpus(train=train, val=val, files=files, fingerprint=fingerprint.hex())


def _table_reader(sources: list[Path | str], cfg: DataConfig) -> dict[str, int]:
    """data.tables' version when a table is among `sources`, for the fingerprints: no cache then
    serves the tokens of rows an older reader parsed (and text-only corpora keep theirs)."""
    return {"tables": tables.VERSION} if any(_format_of(s, cfg.format) in _TABLES for s in sources) else {}


def _split(sources: list[Path | str], cfg: DataConfig, seed: int) -> dict[str, Any] | None:
    """How validation is held out of `data.train` (None: `data.val` is given)."""
    if cfg.val is not None:
        return None
    if all(_format_of(s, cfg.format) != "text" for s in sources):
        return {"by": "rows", "val_fraction": cfg.val_fraction, "seed": seed}
    return {"by": "characters", "val_fraction": cfg.val_fraction}


def _split_by_rows(parts: Documents, val_fraction: float, seed: int,
                   where: str) -> tuple[Documents, Documents]:
    """Rows drawn by `seed` (every part is a table's rows, held in memory: data.tables' limit)."""
    docs = [doc for part in parts.parts if isinstance(part, Texts) for doc in part.documents]
    train, val = held_out(len(docs), val_fraction, seed)
    if not train:
        raise UserError(where, f"val_fraction {val_fraction:g} of {len(docs)} rows leaves none for training")
    return Documents.of([docs[i] for i in train], where), Documents.of([docs[i] for i in val], where)


def _split_by_characters(docs: Documents, val_fraction: float) -> tuple[Documents, Documents]:
    """The last `val_fraction` of the concatenated text is validation (nanoGPT's split); the
    document that straddles the cut is split at it."""
    total = docs.chars
    cut = int(total * (1 - val_fraction))
    if cut == 0 or cut == total:
        raise UserError("data.val_fraction",
                        f"too little training text ({total} characters) to hold out {val_fraction} of it")
    return docs.split_at(cut)


def source_digest(cfg: DataConfig, plan_dir: Path, *, seed: int, scans: dict[Path, Scan]) -> str | None:
    """A digest of the data settings and the raw bytes of every local file: when it matches a
    prepared corpus, the files need not be parsed again. None for hub sources (no bytes to hash).
    `scans` is given the scans of text and parquet files, checked as load_corpus checks them, for
    load_corpus to use."""
    assert cfg.train is not None, "a mix is read source by source (data.mixture)"
    train = resolve_sources(cfg.train, plan_dir, "data.train")
    val = resolve_sources(cfg.val, plan_dir, "data.val") if cfg.val is not None else []
    if any(isinstance(s, str) for s in (*train, *val)):
        return None
    reader = _table_reader([*train, *val], cfg)
    for path in (*train, *val):
        assert isinstance(path, Path)
        fmt = _format_of(path, cfg.format)
        scans[path] = scan_text(path) if fmt in _TABLES else _checked_scan(path, fmt)
    parts = [cfg.model_dump_json().encode(), json.dumps(_split(train, cfg, seed)).encode(),
             *([json.dumps(reader).encode()] if reader else []),
             b"train", *(scans[p].digest for p in train),  # type: ignore[index]
             b"val", *(scans[p].digest for p in val)]  # type: ignore[index]
    return _digest(*parts).hex()


def resolve_sources(patterns: str | list[str], plan_dir: Path, where: str, folders: bool = False) -> list[Path | str]:
    """Paths and globs (relative to the plan) to existing files (`folders`: or folders), in order,
    without repeats; hub names pass through."""
    sources: dict[Path | str, None] = {}  # an ordered set: overlapping globs read a file once
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if pattern.startswith(HUB_PREFIX):
            sources[pattern] = None
            continue
        full = _full_path(pattern, plan_dir)
        matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True)
                         if Path(p).is_file() or folders and Path(p).is_dir())
        if not matches:
            raise UserError(where, f"no file matches '{pattern}'")
        sources.update(dict.fromkeys(matches))
    return list(sources)


def _full_path(pattern: str, plan_dir: Path) -> Path:
    return plan_dir / Path(pattern.replace("{stdlib}", sysconfig.get_paths()["stdlib"])).expanduser()


def _format_of(source: Path | str, forced: str) -> str:
    if isinstance(source, str):
        return "hub"
    return _EXTENSIONS.get(source.suffix.lower(), "text") if forced == "auto" else forced


def _documents(sources: list[Path | str], cfg: DataConfig, cache_dir: Path | None, scans: Mapping[Path, Scan],
               split: str) -> tuple[Documents, list[bytes]]:
    """Every source's documents in order (text files are read later, piece by piece), and a
    digest of each source's content."""
    docs: list[Part] = []
    digests: list[bytes] = []
    # A table is read alone, so that a problem names its file.
    for fmt, run in itertools.groupby(sources, key=lambda s: _format_of(s, cfg.format)):
        if fmt == "hub":
            for spec in run:
                assert isinstance(spec, str)
                hub_docs = _hub_documents(spec, cfg.field, cache_dir, split)
                digests.append(_digest(spec.encode(), *(d.encode() for d in hub_docs)))
                docs.append(Texts(hub_docs, spec))
            continue
        paths = [p for p in run if isinstance(p, Path)]
        if fmt == "tokens":  # data.token_files reads data that is all token files
            raise UserError(str(paths[0]), "token files (.bin, .npy) and text cannot be mixed in one split")
        if fmt in _TABLES:
            for path in paths:
                text = tables.read_text(path)
                digests.append(_digest(text.encode()))  # the rows are a function of the decoded text
                docs.append(Texts(_table_documents(path, text, _TABLES[fmt], cfg.field), str(path)))
            continue
        for path in paths:
            scan = scans[path] if path in scans else _checked_scan(path, fmt)
            digests.append(scan.digest)
            if fmt == "text":
                # One document per file, read as datasets' text builder (sample_by: document) reads
                # it (universal newlines), piece by piece when it is encoded (data.documents).
                docs.append(TextFile(path, 0, scan.chars))
            else:
                docs.append(Texts(_load([path], fmt, cfg.field, where=str(path)), str(path)))
    return Documents(tuple(docs)), digests


def _digest(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))  # so that part boundaries count
        h.update(part)
    return h.digest()


def _table_documents(path: Path, text: str, fmt: str, field: str | int) -> list[str]:
    """One document per row of a table: its `field`."""
    return [tables.cell_text(value, "text", field, f"{path}:{line}")
            for line, [value] in tables.table_rows(path, text, fmt, (field,))]


def _checked_scan(path: Path, fmt: str) -> Scan:
    """A text or parquet file's digest (and a text file's length), after the checks `datasets`
    would report badly or not at all; a parquet file is held in memory: data.tables' limit."""
    def refuse(data: bytes, base: int, e: UnicodeDecodeError) -> UserError:
        return UserError(str(path), not_utf8(data, base, e))

    if fmt != "text":
        tables.check_size(path)
    scan = scan_text(path, refuse if fmt == "text" else None)
    if scan.empty:
        raise UserError(str(path), "empty file")
    return scan


def _load(paths: list[Path], fmt: str, field: str | int, where: str) -> list[str]:
    import datasets
    import pyarrow as pa
    from datasets.exceptions import DatasetGenerationError

    builder, options = _BUILDERS[fmt]
    if isinstance(field, int):
        raise UserError(where, f"a column index (field: {field}) is for csv/tsv files without a header "
                               "or JSON Lines of arrays")
    # keep_in_memory: the dataset must not point into the scratch directory once it is gone.
    with tempfile.TemporaryDirectory(prefix="stagewise-datasets-") as scratch:
        try:
            with _datasets_silenced():
                ds = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train",
                                           cache_dir=scratch, keep_in_memory=True, **options)
        except (DatasetGenerationError, pa.ArrowException, ValueError) as e:
            raise UserError(where, f"cannot read as {fmt}: {_reason(e)}") from None
    return _column(ds, field, where)


@contextmanager
def _datasets_silenced() -> Iterator[None]:
    """`datasets` logs a parse failure before raising it; the UserError says it once."""
    import datasets

    datasets.disable_progress_bars()
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _hub_documents(spec: str, field: str | int, cache_dir: Path | None, split: str) -> list[str]:
    """`hub:NAME` or `hub:NAME:CONFIG`: its "train" split for data.train, "validation" for
    data.val. This needs the hub (or its copy in `cache_dir`); network errors are left as they
    are."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    datasets.disable_progress_bars()
    name, _, config = spec.removeprefix(HUB_PREFIX).partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split,
                                   cache_dir=None if cache_dir is None else str(cache_dir))
    except (DatasetNotFoundError, ValueError) as e:  # no such dataset, config or split
        raise UserError(spec, f"cannot load from the hub: {_reason(e)}") from None
    return _column(ds, field, spec)


def _column(ds: datasets.Dataset, field: str | int, where: str) -> list[str]:
    """The column's strings, held in memory: up to data.tables' limit (a hub dataset has no file
    size to check first; the column's Arrow size is known before it is read)."""
    if field not in ds.column_names:
        raise UserError(where, f"no column '{field}' (columns: {', '.join(ds.column_names)}); "
                               "set data.field")
    size = ds.data.column(field).nbytes
    if size > tables.MAX_BYTES:
        raise UserError(where, f"{size / 2**20:.0f} MiB in column '{field}': hub and parquet data are read whole, up "
                               f"to {tables.MAX_BYTES >> 20} MiB; save the text as .txt files (read piece by piece)")
    values = ds[field][:]  # decoded values: a column of mixed JSON types comes back as such
    for row, value in enumerate(values, start=1):
        if not isinstance(value, str):
            what = ("missing or null" if value is None
                    else f"not a string but {type(value).__name__} {value!r:.40}")
            raise UserError(where, f"row {row}: '{field}' is {what}")
    return values


def _reason(error: BaseException) -> str:
    """The innermost cause's first line: what the parser said, without `datasets`' wrapping."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    if text and "corresponds to no data" in text[0]:  # datasets' words for a table with no rows
        return "no rows"
    return text[0] if text else type(error).__name__
