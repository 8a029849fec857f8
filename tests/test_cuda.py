"""What only a GPU can show (marked `cuda`: skipped without one; benchmarks/gpu_check.sh runs
them): a plan trains on CUDA in bf16 with SDPA and fused AdamW and reports MFU against the GPU's
peak and its peak memory; activation checkpointing lowers peak memory at the same loss; packed
SFT rows give the unpacked loss under CUDA's SDPA kernels; check measures against the GPU's memory."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import reversal_file, run_plan
from test_sft import EOS, TOK, _packing_models

from stagewise.config.optimizer_config import OPTIMIZER_SETTINGS
from stagewise.engine.utilization import device_memory, gpu_peak_flops
from stagewise.models.build import checkpoint_activations
from stagewise.models.gpt import GPT
from stagewise.optim.optimizers import build_optimizer
from stagewise.tasks.batches import ExampleFiles
from stagewise.tasks.sft import prepare_sft, sft_loss

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def test_a_plan_trains_on_cuda_in_bf16_with_sdpa_and_reports_mfu(tmp_path: Path, corpus: Path) -> None:
    prepared, run_dir = run_plan(tmp_path, corpus, [{"name": "a", "optimizer": {"name": "adamw", "lr": 1e-3},
                                                     "steps": 20}], precision="auto", device="auto")
    assert prepared.dtype == torch.bfloat16
    assert prepared.root.config._attn_implementation == "sdpa"  # type: ignore[union-attr]
    start = next(json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()
                 if json.loads(x)["event"] == "plan_start")
    assert start["precision"] == "bf16"
    end = next(json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()
               if json.loads(x)["event"] == "stage_end")
    assert end["peak_memory_gb"] > 0 and end["per_second"] > 0
    if gpu_peak_flops(torch.cuda.get_device_name(0)) is not None:
        assert 0 < end["mfu"] < 1


def test_adamw_is_fused_on_cuda() -> None:
    model = torch.nn.Linear(8, 8).to(CUDA)
    optimizer = build_optimizer("adamw", {**OPTIMIZER_SETTINGS["adamw"], "lr": 1e-3}, model)
    assert optimizer.defaults["fused"] is True


def test_activation_checkpointing_lowers_peak_memory_at_the_same_loss() -> None:
    torch.manual_seed(0)
    plain = GPT(vocab_size=256, n_layer=8, n_head=4, n_embd=256, n_positions=512, bias=False).to(CUDA).train()
    recomputed = copy.deepcopy(plain)
    checkpoint_activations(recomputed, "gpt")
    ids = torch.randint(0, 256, (8, 512), device=CUDA)
    peaks, losses = [], []
    for model in (plain, recomputed):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        losses.append(loss.item())
    assert losses[0] == losses[1]
    assert peaks[1] < 0.7 * peaks[0]


def test_packed_rows_give_the_unpacked_loss_on_cuda(tmp_path: Path) -> None:
    path = reversal_file(tmp_path / "r.jsonl", 40)
    packed = prepare_sft(ExampleFiles(path, val_fraction=0.1, max_len=32), TOK, EOS, pack=True).train
    unpacked = prepare_sft(ExampleFiles(path, val_fraction=0.1, max_len=32), TOK, EOS).train
    for name, model in _packing_models().items():
        model.to(CUDA).eval().set_attn_implementation("sdpa")
        with torch.no_grad():
            loss = sft_loss(model, tuple(t.to(CUDA) for t in packed.rows(torch.arange(len(packed)))))
            alone = sft_loss(model, tuple(t.to(CUDA) for t in unpacked.rows(torch.arange(len(unpacked)))))
        assert torch.allclose(loss, alone, rtol=1e-4), name


def test_check_measures_against_the_gpu_memory() -> None:
    memory = device_memory(CUDA)
    assert memory is not None
    assert memory[0] == torch.cuda.get_device_properties(0).total_memory
    assert torch.cuda.get_device_name(0) in memory[1]
