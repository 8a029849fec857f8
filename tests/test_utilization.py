"""What a GPU user reads per stage: tokens/s per device, MFU against the device's peak (a GPU's
bf16 data-sheet figure, a CPU's measured GEMM), peak memory; in the stage_end event, the summary
table and the report; and the model's size checked against the memory of the device it trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_plan

from stagewise.cli import main
from stagewise.engine import utilization as use
from stagewise.engine.device import flops_per_token, model_shape
from stagewise.engine.progress import summary_table
from stagewise.errors import UserError
from stagewise.plan.load import validate_plan
from stagewise.plan.model_keys import check_model_keys
from stagewise.track.runs import load_run


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0),
    ("Tesla V100-SXM2-16GB", None), ("NVIDIA GeForce GTX 1080", None),
])
def test_gpu_peaks_by_reported_name(name: str, tflops: float | None) -> None:
    assert use.gpu_peak_flops(name) == (None if tflops is None else tflops * 1e12)


def test_cpu_peak_is_a_measured_gemm_rate_and_mfu_follows_from_it() -> None:
    peak = use.cpu_peak_flops(torch.float32, size=256, repeats=3)
    assert 1e8 < peak < 1e14  # between a very slow core and far beyond any CPU
    assert use.peak_flops(torch.device("cpu"), None) == use.cpu_peak_flops(torch.float32)  # measured once
    used = use.utilization(tokens=10_000, seconds=2.0, devices=2, flops_per_token=1e6, device=torch.device("cpu"),
                           dtype=None)
    assert used.per_second == 2500.0
    assert used.mfu == pytest.approx(1e6 * 2500.0 / use.cpu_peak_flops(torch.float32))
    assert used.peak_memory_gb > 0.01  # this process's peak RSS: torch alone is more
    assert use.utilization(10, 1.0, 1, None, torch.device("cpu"), None).mfu is None


def test_a_stage_reports_its_rate_mfu_and_peak_memory(tmp_path: Path, corpus: Path) -> None:
    prepared, run_dir = run_plan(tmp_path, corpus, [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3},
                                                     "steps": 6}])
    end = next(json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()
               if json.loads(line)["event"] == "stage_end")
    tokens = 6 * 8 * 32
    assert end["tokens"] == tokens
    assert 0 < end["per_second"] and end["per_second"] * end["seconds"] >= tokens  # steps only: no eval, no setup
    flops = flops_per_token(*model_shape(prepared.root), 32)
    assert end["mfu"] == pytest.approx(flops * end["per_second"] / use.cpu_peak_flops(torch.float32), rel=1e-2)
    assert 0 < end["mfu"] < 1 and end["peak_memory_gb"] > 0
    row = load_run(run_dir).summaries()[0]
    assert (row.per_second, row.mfu, row.peak_memory_gb) == (end["per_second"], end["mfu"], end["peak_memory_gb"])
    columns, cells = summary_table([row])  # the console's table and the report's
    shown = dict(zip(columns, cells[0]))
    assert shown["MFU"] == f"{100 * end['mfu']:.1f}%" and shown["peak mem"] == f"{end['peak_memory_gb']:.2f} GB"
    assert shown["per s/device"] == f"{end['per_second']:,.0f} tok"
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "<th>MFU</th>" in page and f"{100 * end['mfu']:.1f}%" in page


def test_the_model_is_checked_against_the_device_memory(corpus: Path) -> None:
    plan = validate_plan({"name": "big", "model": {"arch": "gpt2", "n_layer": 36, "n_embd": 2048, "n_head": 16},
                          "tokenizer": {"kind": "char"}, "data": {"train": str(corpus)},
                          "stages": [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 1,
                                      "batch": {"size": 1}}]}, "plan.yaml")
    check_model_keys(plan, (10**12, "this machine's"))  # ~1.8B parameters: 29 GB fits in 1 TB
    with pytest.raises(UserError, match=r"beyond the GPU's \(NVIDIA L4\) 24.0 GB"):
        check_model_keys(plan, (24 * 10**9, "the GPU's (NVIDIA L4)"))


def test_the_summary_shows_the_figures_as_the_logs_keep_them() -> None:
    from dataclasses import replace

    from stagewise.engine.progress import StageSummary

    # 0.027499 is 2.7% printed raw, 0.0275 (the logged value) 2.8%: the console and a table rebuilt
    # from the logs (report, runs) must agree
    raw = StageSummary(stage="a", optimizer="adamw", steps=1, tokens=10, seconds=1.0, train_loss=None, val_loss=None,
                       per_second=1234.4999, mfu=0.027499, peak_memory_gb=0.594999)
    assert summary_table([raw]) == summary_table([replace(raw, **raw.utilization())])
