"""Packed SFT rows against padded ones: tokens of examples trained per second.

English -> French pairs (../shared/data/eng_fra.tsv: prompt the English sentence, completion the
French one), char-level, encoded by tasks.sft with `pack` off (one example a row, padded to the
longest row of each batch) and on (examples laid end to end into rows of max_len, position ids
restarting with each, attention within each example: the same loss, tests/test_sft.py). The same
GPT (models.gpt) trains the same examples in both: batch B rows unpacked, and packed as many rows
as hold the same number of examples on average. Rows of --max-len tokens: attention's cost per
token grows with the row, so rows far longer than the examples lose on a CPU what packing saves.
Interleaved rounds, medians; the load recorded.

    python benchmarks/packing.py [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import write_results

from stagewise.config.plan_config import TokenizerConfig
from stagewise.data.tokenizers import eos_id
from stagewise.engine.cpu_load import busy_cores
from stagewise.models.gpt import GPT
from stagewise.tasks.batches import ExampleFiles, ExampleSampler
from stagewise.tasks.encode import IGNORE
from stagewise.tasks.sft import SftRows, prepare_sft, sft_loss

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT.parent.parent / "shared" / "data" / "eng_fra.tsv"


def examples_file(directory: Path, limit: int) -> Path:
    rows = []
    for line in PAIRS.read_text(encoding="utf-8").splitlines()[:limit]:
        english, french = line.split("\t")[:2]
        rows.append(json.dumps({"prompt": english + " => ", "completion": french}))
    path = directory / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def real_tokens(labels: torch.Tensor) -> int:
    """Tokens of examples in a batch, packed or not: each row's up to its last labelled one (an
    example ends with its labelled EOS; what follows is padding)."""
    last = torch.where(labels != IGNORE, torch.arange(labels.size(1)), -1).max(dim=1).values  # (B,)
    return int((last + 1).sum())


def rate(model: GPT, rows: SftRows, batch_size: int, steps: int) -> float:
    """Example tokens trained per second over `steps` updates (after 2 untimed ones)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = ExampleSampler(rows, batch_size, seed=0)
    tokens, seconds = 0, 0.0
    for step in range(steps + 2):
        batch = sampler.next_batch()
        started = time.perf_counter()
        loss = sft_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            seconds += time.perf_counter() - started
            tokens += real_tokens(batch[1])
    return tokens / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16, help="unpacked rows per batch")
    parser.add_argument("--max-len", type=int, default=128, help="tokens per row (the longest pair is 79)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = examples_file(Path(tmp), args.examples)
        from stagewise.data.tokenizers import build_tokenizer

        texts = [json.loads(line)["prompt"] + json.loads(line)["completion"] for line in path.read_text().splitlines()]
        tok = build_tokenizer(TokenizerConfig(kind="char"), texts, Path(tmp))
        eos = eos_id(tok)
        files = ExampleFiles(path, val_fraction=0.05, max_len=args.max_len)
        data = {pack: prepare_sft(files, tok, eos, pack=pack).train for pack in (False, True)}
    per_row = len(data[False]) / len(data[True])  # examples a packed row holds on average
    packed_batch = max(1, round(args.batch / per_row))
    torch.manual_seed(0)
    model = GPT(vocab_size=tok.get_vocab_size(), n_layer=4, n_head=4, n_embd=128, n_positions=args.max_len, bias=False)
    rates: dict[str, list[float]] = {"unpacked": [], "packed": []}
    busy = []
    for _ in range(args.rounds):
        for name, rows, batch in (("unpacked", data[False], args.batch), ("packed", data[True], packed_batch)):
            busy.append(busy_cores())
            rates[name].append(rate(model, rows, batch, args.steps))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    report = {"examples": args.examples, "examples_per_packed_row": round(per_row, 2), "batch_unpacked": args.batch,
              "batch_packed": packed_batch, "model": f"gpt 4x128, max_len {args.max_len}, fp32, eager",
              "tokens_per_s": rates, "median": medians, "speedup": medians["packed"] / medians["unpacked"],
              "load_before": load_before, "busy_cores_at_each_start": busy}
    print(f"{'rows':<10}{'example tokens/s (median)':>28}{'rounds':>40}")
    for name in rates:
        print(f"{name:<10}{medians[name]:>28,.0f}   {', '.join(f'{r:,.0f}' for r in rates[name])}")
    print(f"packed / unpacked: {report['speedup']:.2f}x (load before: {load_before[0]:.1f})")
    write_results(ROOT / "benchmarks" / "results" / "packing.json", report, "packing.py", argv)


if __name__ == "__main__":
    main()
