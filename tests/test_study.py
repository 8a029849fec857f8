"""The study (benchmarks/study.py) in its quick mode, so it cannot rot: it trains its plans, its
accounting holds on the runs' own logs (the compute sweep's branched tokens are the constant run's
plus the cooldowns', each trained once, in closed form from the plan), its tables come from
study.json into the docs page between the markers, and a second invocation trains nothing (every
stage from the stage cache)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
VERDICTS = ("agrees with", "does not reproduce at this scale", "within noise")


def _study(tmp: Path, data: Path) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(ROOT / "benchmarks" / "study.py"), "--quick", "--data", str(data), "--work",
            str(tmp / "work"), "--out", str(tmp / "study.json"), "--docs", str(tmp / "docs" / "benchmarks.md")]
    return subprocess.run(args, capture_output=True, text=True, timeout=1800, check=False)


def _stage_starts(work: Path) -> int:
    return sum(line.count('"event":"stage_start"') for log in work.glob("*/run/events.jsonl")
               for line in log.read_text(encoding="utf-8").splitlines())


def test_the_quick_study_trains_accounts_and_documents(tmp_path: Path, corpus: Path) -> None:
    if (SHARED / "tinyshakespeare.txt").is_file():
        data = SHARED
    else:  # no shared data: the language-model part alone, on the stand-in text
        data = tmp_path / "data"
        data.mkdir()
        (data / "tinyshakespeare.txt").write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\nabove\n\n<!-- study:begin -->\nold\n<!-- study:end -->\n\nbelow\n", encoding="utf-8")
    done = _study(tmp_path, data)
    assert done.returncode == 0, done.stdout + done.stderr
    study = json.loads((tmp_path / "study.json").read_text(encoding="utf-8"))
    size, seeds = study["size"], study["seeds"]
    assert len(seeds) == 2 and all(len(v) == len(study["planned_stages"]) for v in study["finished"].values())

    # the peak LR: the cosine baseline's best over the sweep, and the one every variant's plan trains at
    lr = study["peak_lr"]
    assert len(lr["swept"]) == 4 and lr["swept"][f"{lr['chosen']:g}"] == min(lr["swept"].values())
    plan = yaml.safe_load((tmp_path / "work" / f"lm-{seeds[0]}" / "plan.yaml").read_text(encoding="utf-8"))
    assert {s["optimizer"]["lr"] for s in plan["stages"]
            if isinstance(s.get("optimizer", {}).get("lr"), float)} == {lr["chosen"]}

    # the compute sweep: one constant run of N steps and a 20% cooldown per budget (25..100% of N)
    # against a cosine run per budget, in tokens the runs logged
    per_step, n = size["batch"] * size["block"], size["steps"]
    for seed in map(str, seeds):
        tokens = study["sweep_tokens"][seed]
        cooldowns = sum(round(0.2 * b * n) for b in (0.25, 0.5, 0.75, 1.0)) * per_step
        assert tokens["branched"] == {"prefix": n * per_step, "cooldowns": cooldowns, "trained": n * per_step + cooldowns,
                                      "total": n * per_step + cooldowns}
        assert tokens["separate"]["runs"] == tokens["separate"]["trained"] == round(2.5 * n) * per_step
        assert tokens["paths_add_up"]
        cache = study["cache"]["study"][seed]
        assert cache["trained"] < cache["as_separate_runs"]

    for section in study["sections"]:
        for row in section["rows"]:
            assert row["seeds"] == seeds, (section["key"], row["variant"])
            assert row["verdict"].startswith(VERDICTS)
            diffs = [study["variants"][row["variant"]]["per_seed"][str(s)] - study["variants"][row["baseline"]]["per_seed"][str(s)]
                     for s in seeds]
            assert row["diff_per_seed"] == pytest.approx(diffs, abs=2e-4)  # the table's values are rounded to 4 places
    rows = {r["variant"]: r for s in study["sections"] for r in s["rows"]}
    assert rows["merge"]["shares_prefix"] and not rows["linear_to_zero"]["shares_prefix"]
    if (data / "eng_fra.tsv").is_file():
        assert all(r["seeds"] == seeds for rows_ in study["recipes"].values() for r in rows_)
        assert study["reference"]["n"] == 2

    text = docs.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nabove\n") and text.endswith("below\n") and "\nold\n" not in text
    assert text.count("<!-- study:begin -->") == 1 and "Cooldown length" in text
    assert all((docs.parent / "images" / f"study-{name}.png").is_file() for name in ("variants", "curves"))

    # run again: every stage from the cache or the finished run, nothing trained
    starts = _stage_starts(tmp_path / "work")
    again = _study(tmp_path, data)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _stage_starts(tmp_path / "work") == starts
    assert docs.read_text(encoding="utf-8").count("<!-- study:begin -->") == 1
