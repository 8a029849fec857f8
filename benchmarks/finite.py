"""What checking every update for non-finite values costs without a guard (engine/finite.py):
the device-side note of each update's loss and gradient norm, against the update itself, for the
demo's model (GPT-2 4x128, block 128, batch 16) on CPU. The note never waits for the device; the
window's values are read with the loss the log line reads anyway.

    .venv/bin/python benchmarks/finite.py      # prints a table, writes benchmarks/results/finite.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from stagewise.engine.finite import FiniteWatch

RESULTS = Path(__file__).parent / "results" / "finite.json"


def main() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=128, n_positions=128, vocab_size=100,
                                                bos_token_id=0, eos_token_id=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 100, (16, 128))
    watch = FiniteWatch(torch.device("cpu"))
    steps, notes = [], []
    for i in range(40):
        started = time.perf_counter()
        loss = model(batch, labels=batch).loss
        loss.backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - started)
        started = time.perf_counter()
        watch.note(i + 1, loss.detach(), norm)
        notes.append(time.perf_counter() - started)
    step, note = statistics.median(steps[5:]), statistics.median(notes[5:])
    result = {"update_ms": round(step * 1e3, 2), "note_us": round(note * 1e6, 1),
              "overhead_percent": round(100 * note / step, 3)}
    print(f"{'update (median)':<20}{result['update_ms']:>10} ms\n{'finite note':<20}{result['note_us']:>10} us\n"
          f"{'overhead':<20}{result['overhead_percent']:>10} %")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
