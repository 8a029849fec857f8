"""The code blocks of the documentation's pages, for the tests that run or validate them
(tests/test_docs.py) and for the script that makes the pictures from the pages' own plans
(docs/make_figures.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
# A fenced block at any indentation: ```lang ... ```
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: str  # relative to docs/ (README.md: relative to the repository)
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """Every Markdown page of the site, and the README."""
    return sorted(DOCS.rglob("*.md")) + [REPO / "README.md"]


def blocks(page: Path, lang: str | None = None) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    name = str(page.relative_to(DOCS) if page.is_relative_to(DOCS) else page.relative_to(REPO))
    found = []
    for match in _FENCE.finditer(text):
        indent = match["indent"]
        body = "".join(line.removeprefix(indent) for line in match["body"].splitlines(keepends=True))
        if lang is None or match["lang"] == lang:
            found.append(Block(name, text.count("\n", 0, match.start()) + 1, match["lang"], body))
    return found


# The plans of the docs read ../shared/data beside the repository (a worktree may be deeper).
SHARED = next((p / "shared" for p in REPO.parents if (p / "shared" / "data").is_dir()), REPO.parent / "shared")


def with_shared_data(plan_text: str) -> str:
    """A plan of the docs with its `../shared/` paths (relative to a plan in the repository's root)
    made absolute, so it can be written anywhere."""
    return plan_text.replace("../shared/", f"{SHARED}/")
