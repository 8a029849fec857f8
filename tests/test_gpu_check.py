"""The device check's dry run (benchmarks/gpu_check.sh --dry-run: everything but CUDA, on the CPU
at toy sizes): it installs nothing, runs the cuda tests (skipped here), trains each model with
stagewise and with nanoGPT's own train.py, runs FSDP2 on one process with and without activation
checkpointing, and writes one JSON with every figure the GPU run reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_check_dry_run_writes_every_figure(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--text", str(corpus), "--work", str(tmp_path / "work"), "--tests", "tests/test_cuda.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["machine"]["device"] == "cpu"
    assert len(report["load_before"]) == 3 and len(report["load_after"]) == 3
    assert report["tests"]["returncode"] == 0 and "skipped" in report["tests"]["summary"]  # no GPU here
    for name, run in report["runs"].items():
        steps = run["shape"]["steps"]
        ours, theirs = run["stagewise"], run["nanogpt"]
        assert "error" not in ours and "error" not in theirs, (name, ours, theirs)
        assert ours["tok_per_s"] > 0 and theirs["tok_per_s"] > 0
        assert run["ratio"] == ours["tok_per_s"] / theirs["tok_per_s"]
        assert theirs["iterations"] == steps  # nanoGPT trained as many updates as stagewise
        assert 0 < ours["mfu"] < 1 and ours["peak_memory_gb"] > 0
        chance = math.log(run["vocab_size"])
        assert ours["train_loss"] < chance + 0.5 and theirs["last_loss"] < chance + 0.5
    fsdp = report["fsdp"]
    assert "error" not in fsdp["fsdp"] and "error" not in fsdp["fsdp_checkpointing"]
    assert fsdp["same_train_loss"] is True and fsdp["memory_ratio"] is not None
    goals = report["goals"]
    assert set(goals) == {"ratio_to_nanogpt", "ratio_goal_met", "mfu_124m", "mfu_goal_met", "tests_passed",
                          "fsdp_checkpointing_same_loss"}
    assert goals["tests_passed"] and goals["fsdp_checkpointing_same_loss"]


def test_the_device_check_without_its_wheels_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GPU_CHECK_WHEELS": str(tmp_path / "none")})
    assert done.returncode == 2
    assert done.stderr == (f"gpu_check.sh: no wheels at {tmp_path / 'none'} (see the top of this script for how "
                           "to make them)\n")
    assert not (tmp_path / "x.json").exists()
