"""The device check (run by benchmarks/gpu_check.sh, which installs what it needs first): on one
NVIDIA GPU, within minutes,

1. the tests marked `cuda` (pytest -m cuda);
2. nanoGPT's shakespeare-char model (6x384, block 256) and a 124M GPT-2 shape (12x768, block
   1024; the char vocabulary, as nanoGPT's train.py reads it) trained for a few hundred steps with
   bf16 + torch.compile by stagewise and by nanoGPT's own train.py (benchmarks/nanogpt, carried
   beside this script) at the same settings: steady tokens/s of each and their ratio (goal >= 0.9),
   stagewise's MFU against the GPU's bf16 peak (goal >= 35% at 124M) and peak memory;
3. FSDP2 on one GPU (torchrun, one process) with and without activation checkpointing: the same
   losses, and the peak memory each needs;

and writes one JSON (the machine, the load before and after, every figure, the goals met).

`--dry-run` does all of it on the CPU at toy sizes, eager fp32 (everything but CUDA): what CI runs
to keep the check ready for a machine with a GPU.

Steady tokens/s: stagewise's `tok_per_s` lines (windows of `log.every` updates) after the first
window, nanoGPT's per-iteration times (it syncs at every logged iteration) after the first 10
iterations (compilation), medians of each.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NANOGPT = HERE / "nanogpt"  # nanoGPT's train.py, model.py, configurator.py (its README says which commit)
SHAKESPEARE = ROOT.parent.parent / "shared" / "data" / "tinyshakespeare.txt"

# name: (layers, heads, width, block, batch, steps); the dry run's toy sizes after them
MODELS = {
    "shakespeare_char_6x384": (6, 6, 384, 256, 64, 500),
    "gpt2_124m": (12, 12, 768, 1024, 16, 200),
}
DRY = {
    "shakespeare_char_6x384": (2, 2, 32, 32, 4, 12),
    "gpt2_124m": (2, 2, 48, 64, 2, 12),
}
GOALS = {"ratio_to_nanogpt": 0.9, "mfu_124m": 0.35}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="everything but CUDA: the CPU, toy sizes, eager fp32")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new one beside --out)")
    parser.add_argument("--text", type=Path, default=SHAKESPEARE, help="the character corpus (tinyshakespeare)")
    parser.add_argument("--tests", default="tests", help="where pytest looks for the tests marked cuda")
    args = parser.parse_args()
    if not args.text.is_file():
        raise SystemExit(f"gpu_check: no corpus at {args.text} (--text FILE: a character corpus, tinyshakespeare.txt)")
    work = args.work or args.out.parent / "gpu_check_work"
    if work.exists() and args.work is None:
        shutil.rmtree(work)  # ours: made by an earlier check at this default place
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": args.dry_run,
                              "machine": machine(device), "load_before": os.getloadavg()}
    report["tests"] = cuda_tests(args.tests)
    data = char_data(args.text, work / "data" / "shakespeare_char")
    sizes = DRY if args.dry_run else MODELS
    report["runs"] = {name: side_by_side(name, shape, args.text, data, work, device) for name, shape in sizes.items()}
    report["fsdp"] = fsdp_check(args.text, work, device, sizes["shakespeare_char_6x384"])
    report["load_after"] = os.getloadavg()
    report["goals"] = goals(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report["goals"], indent=2))
    print(f"wrote {args.out}")
    return 0


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
                            "cpus": os.cpu_count()}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: CUDA is not available here (use --dry-run on a machine without a GPU)")
        from stagewise.engine.utilization import gpu_peak_flops

        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, memory_gb=round(props.total_memory / 1e9, 1), cuda=torch.version.cuda,
                    bf16_peak_tflops=(gpu_peak_flops(props.name) or 0) / 1e12 or None)
    return info


def cuda_tests(where: str) -> dict[str, Any]:
    """pytest -m cuda: on a CPU machine they skip themselves (tests/conftest.py)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", where], cwd=ROOT,
                          capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return {"returncode": done.returncode, "summary": lines[-1] if lines else done.stderr[-300:],
            "seconds": round(time.perf_counter() - started, 1)}


def char_data(text: Path, directory: Path) -> dict[str, Any]:
    """The corpus in nanoGPT's shakespeare_char format (its prepare.py, without the download):
    sorted characters, the first 90% train.bin and the rest val.bin as uint16 ids, meta.pkl."""
    chars = text.read_text(encoding="utf-8")
    vocab = sorted(set(chars))
    stoi = {c: i for i, c in enumerate(vocab)}
    ids = np.array([stoi[c] for c in chars], dtype=np.uint16)
    cut = int(0.9 * len(ids))
    directory.mkdir(parents=True, exist_ok=True)
    ids[:cut].tofile(directory / "train.bin")
    ids[cut:].tofile(directory / "val.bin")
    with open(directory / "meta.pkl", "wb") as f:  # written here, read by nanoGPT's train.py
        pickle.dump({"vocab_size": len(vocab), "itos": dict(enumerate(vocab)), "stoi": stoi}, f)
    return {"vocab_size": len(vocab), "train_tokens": cut}


def side_by_side(name: str, shape: tuple[int, ...], text: Path, data: dict[str, Any], work: Path,
                 device: str) -> dict[str, Any]:
    """stagewise then nanoGPT's train.py on the same model, batch, steps and precision."""
    stagewise = stagewise_run(name, shape, text, work, device)
    nanogpt = nanogpt_run(name, shape, work, device)
    ratio = stagewise["tok_per_s"] / nanogpt["tok_per_s"] if nanogpt["tok_per_s"] else None
    return {"shape": dict(zip(("n_layer", "n_head", "n_embd", "block_size", "batch_size", "steps"), shape)),
            "vocab_size": data["vocab_size"], "stagewise": stagewise, "nanogpt": nanogpt, "ratio": ratio}


def plan(name: str, shape: tuple[int, ...], text: Path, device: str, **model: Any) -> dict[str, Any]:
    layers, heads, width, block, batch, steps = shape
    return {"name": name, "seed": 1337, "device": device, "precision": "fp32" if device == "cpu" else "bf16",
            "compile": device != "cpu", "threads": 1 if device == "cpu" else "auto",
            "model": {"arch": "gpt", "n_layer": layers, "n_head": heads, "n_embd": width, "n_positions": block,
                      "bias": False, "dropout": 0.0, **model},
            "tokenizer": {"kind": "char"}, "data": {"train": str(text), "val_fraction": 0.1},
            "log": {"every": max(1, steps // 20)},
            "stages": [{"name": "train", "optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.99],
                                                       "weight_decay": 0.1},
                        "schedule": {"name": "cosine", "warmup": max(1, steps // 10), "min_lr": 1e-4},
                        "regularization": {"grad_clip": 1.0}, "batch": {"size": batch, "block_size": block},
                        "eval": {"batches": 2}, "steps": steps}]}


def stagewise_run(name: str, shape: tuple[int, ...], text: Path, work: Path, device: str,
                  launcher: tuple[str, ...] = (), **model: Any) -> dict[str, Any]:
    """`stagewise train` in a fresh process (or under `launcher`): wall time, steady tokens/s,
    and what the stage_end event says (MFU, peak memory, losses)."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan(name, shape, text, device, **model), sort_keys=False), encoding="utf-8")
    out = work / "runs" / name
    command = [*(launcher or (sys.executable,)), "-m", "stagewise", "train", str(path), "--out", str(out),
               "--cache", str(work / "cache" / name)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:], "wall_s": round(wall, 1)}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [m["tok_per_s"] for m in lines if m.get("kind") == "train" and "tok_per_s" in m][1:]
    end = next(e for e in map(json.loads, (out / "events.jsonl").read_text().splitlines()) if e["event"] == "stage_end")
    return {"wall_s": round(wall, 1), "tok_per_s": statistics.median(rates) if rates else end.get("per_second"),
            "stage_tok_per_s": end.get("per_second"), "mfu": end.get("mfu"), "peak_memory_gb": end.get("peak_memory_gb"),
            "train_loss": end.get("train_loss"), "val_loss": end.get("val_loss")}


ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")


def nanogpt_run(name: str, shape: tuple[int, ...], work: Path, device: str) -> dict[str, Any]:
    """nanoGPT's train.py (copied into `work`: it reads configurator.py and data/ from its working
    directory) at the same settings; its per-iteration times give the steady rate."""
    layers, heads, width, block, batch, steps = shape
    for file in ("train.py", "model.py", "configurator.py"):
        shutil.copy(NANOGPT / file, work / file)
    settings = {"dataset": "shakespeare_char", "out_dir": f"out-{name}", "n_layer": layers, "n_head": heads,
                "n_embd": width, "block_size": block, "batch_size": batch, "gradient_accumulation_steps": 1,
                "max_iters": steps - 1, "lr_decay_iters": steps, "warmup_iters": max(1, steps // 10),
                "learning_rate": 1e-3, "min_lr": 1e-4, "beta2": 0.99, "dropout": 0.0, "bias": False,
                "eval_interval": steps + 1, "eval_iters": 2, "log_interval": 1, "always_save_checkpoint": False,
                "device": device, "dtype": "float32" if device == "cpu" else "bfloat16", "compile": device != "cpu"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if device == "cpu" else {})}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", *(f"--{k}={v}" for k, v in settings.items())], cwd=work,
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:], "wall_s": round(wall, 1), "tok_per_s": None}
    iters = [(int(m[1]), float(m[2]), float(m[3])) for m in map(ITER.match, done.stdout.splitlines()) if m]
    times = [ms for i, _, ms in iters if i >= min(10, len(iters) // 2)]
    return {"wall_s": round(wall, 1), "tok_per_s": batch * block / (statistics.median(times) / 1000) if times else None,
            "iterations": len(iters), "last_loss": iters[-1][1] if iters else None}


def fsdp_check(text: Path, work: Path, device: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """One process under torchrun with `distributed: fsdp`, with and without activation checkpointing."""
    launcher = ("torchrun", "--standalone", "--nproc-per-node", "1")
    if shutil.which("torchrun") is None:  # the venv's own, next to its python
        launcher = (str(Path(sys.executable).with_name("torchrun")), *launcher[1:])
    runs = {}
    for checkpointing in (False, True):
        name = "fsdp_checkpointing" if checkpointing else "fsdp"
        runs[name] = stagewise_run(name, shape, text, work, device, launcher, activation_checkpointing=checkpointing)
    same = runs["fsdp"].get("train_loss") == runs["fsdp_checkpointing"].get("train_loss") is not None
    plain, saved = runs["fsdp"].get("peak_memory_gb"), runs["fsdp_checkpointing"].get("peak_memory_gb")
    return {**runs, "same_train_loss": same,
            "memory_ratio": saved / plain if plain and saved else None}


def goals(report: dict[str, Any]) -> dict[str, Any]:
    runs = report["runs"]
    big = runs.get("gpt2_124m", {}).get("stagewise", {})
    return {"ratio_to_nanogpt": {name: run["ratio"] for name, run in runs.items()},
            "ratio_goal_met": all(run["ratio"] is not None and run["ratio"] >= GOALS["ratio_to_nanogpt"]
                                  for run in runs.values()),
            "mfu_124m": big.get("mfu"),
            "mfu_goal_met": big.get("mfu") is not None and big["mfu"] >= GOALS["mfu_124m"],
            "tests_passed": report["tests"]["returncode"] in (0, 5),  # 5: none collected / all deselected
            "fsdp_checkpointing_same_loss": report["fsdp"]["same_train_loss"]}


if __name__ == "__main__":
    sys.exit(main())
