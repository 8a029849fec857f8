"""Makes the pictures of the docs from real runs of the docs' own plans (`make docs-figures`):

- images/lr-curve.png: `stagewise check --plot` of the plan of tutorials/first-plan.md;
- images/branches.png: the loss curves of the branched plan of how-to/branch-and-merge.md, trained;
- images/report.png: that run's report.html, `stagewise report`, in headless Chromium;
- images/throughput.png: the measured table of the benchmarks page, drawn from
  benchmarks/results/throughput.json (`--benchmarks-only` draws just it, in seconds); the study's
  plots (images/study-*.png) are drawn by benchmarks/study.py with its tables.

It trains for a few minutes on a CPU; the runs go to runs/docs-figures/ (ignored).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from matplotlib.figure import Figure
from snippets import DOCS, REPO, blocks, with_shared_data

from stagewise.cli import main as stagewise
from stagewise.track.plots import save_png

RESULTS = REPO / "benchmarks" / "results"

IMAGES = DOCS / "images"
WORK = REPO / "runs" / "docs-figures"


def _plan(page: str, name: str) -> Path:
    """The page's first YAML plan, written where it can run."""
    (block,) = [b for b in blocks(DOCS / page, "yaml") if "stages:" in b.text][:1]
    path = WORK / name
    path.write_text(with_shared_data(block.text), encoding="utf-8")
    return path


def _run(*argv: str) -> None:
    if stagewise(list(argv)) != 0:
        sys.exit(f"stagewise {' '.join(argv)} failed")


def screenshot(url: str, out: Path, size: str = "1400,1000") -> None:
    """A page in headless Chromium, no network, a throwaway profile."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("headless Chromium is needed for the report screenshot: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={size}", url],
                       check=True, capture_output=True, timeout=120)


def benchmark_figures() -> None:
    """A bar chart of benchmarks/results/throughput.json (the benchmarks page's table)."""
    throughput = json.loads((RESULTS / "throughput.json").read_text(encoding="utf-8"))
    methods = {"stagewise": "stagewise", "stagewise_defaults": "stagewise, no settings", "loop": "hand-written loop",
               "trainer_compiled": "HF Trainer, compiled", "trainer": "HF Trainer"}
    fig = Figure(figsize=(9, 3.2))
    for i, (size, measured) in enumerate(throughput["sizes"].items()):
        ax = fig.add_subplot(1, len(throughput["sizes"]), i + 1)
        rates = measured["tokens_per_s"]
        ax.barh([methods[m] for m in methods], [rates[m] for m in methods], color="tab:blue")
        ax.invert_yaxis()
        ax.set_title(f"{size} parameters")
        ax.set_xlabel("tokens/s, median of 3 rounds")
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}k")
        if i:
            ax.set_yticklabels([])
    fig.tight_layout()
    save_png(fig, IMAGES / "throughput.png")


def main() -> None:
    benchmark_figures()
    if sys.argv[1:] == ["--benchmarks-only"]:
        return
    WORK.mkdir(parents=True, exist_ok=True)
    cache = str(WORK / ".cache")
    _run("check", str(_plan("tutorials/first-plan.md", "first.yaml")), "--cache", cache,
         "--plot", str(IMAGES / "lr-curve.png"))
    branches = WORK / "branches"
    _run("train", str(_plan("how-to/branch-and-merge.md", "branches.yaml")), "--out", str(branches),
         "--cache", cache)
    _run("report", str(branches))
    shutil.copyfile(branches / "loss.png", IMAGES / "branches.png")
    screenshot((branches / "report.html").as_uri(), IMAGES / "report.png")
    print(f"wrote {', '.join(p.name for p in sorted(IMAGES.glob('*.png')))} in {IMAGES}")


if __name__ == "__main__":
    main()
