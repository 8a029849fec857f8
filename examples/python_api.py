"""stagewise from Python: your own transformers model, a `datasets.Dataset`, your own loss and a
callback, trained through a three-stage plan (Adam -> SGD -> SGD on a cosine schedule) and opened
afterwards. Offline: the model is built from a config and the data made here.

    python examples/python_api.py [RUN_DIR]

Run it twice: the second run reuses every stage from the cache (the same model, rows and loss
give the same stage keys); change the loss's source or the model's config and they train again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers

import stagewise

VOCAB, LENGTH = 32, 16

PLAN: dict[str, Any] = {
    "name": "python-api",
    "seed": 0,
    "precision": "fp32",
    "defaults": {"batch": {"size": 16}, "eval": {"every": 10}},
    "log": {"every": 5},
    "checkpoint": {"every": 10},
    "stages": [
        {"name": "adam", "optimizer": {"name": "adam", "lr": 3e-3}, "steps": 30},
        {"name": "sgd", "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "steps": 20},
        {"name": "cosine", "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
         "schedule": {"name": "cosine"}, "steps": 20},
    ],
}


def make_model() -> transformers.GPT2LMHeadModel:
    """A tiny GPT-2 from a config (no download); the same weights every time."""
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32,
                                                                n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))


def make_rows(n: int = 320) -> datasets.Dataset:
    """Counting sequences (start + stride * i, mod VOCAB): learnable from a few tokens."""
    g = torch.Generator().manual_seed(0)
    starts, strides = torch.randint(0, VOCAB, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ((starts + strides * torch.arange(LENGTH)) % VOCAB).tolist()})


def next_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each next token: the user's loss, (model, batch) -> scalar."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


class Recorder(stagewise.Callback):
    """Records every hook it is called at, as (hook, stage, step); vetoes update `veto_at` of
    stage `veto_stage`, and checks at the next update that the weights did not move."""

    def __init__(self, veto_stage: str = "sgd", veto_at: int = 3) -> None:
        self.veto_stage, self.veto_at = veto_stage, veto_at
        self.calls: list[tuple[str, str, int]] = []
        self.before_veto: list[torch.Tensor] | None = None
        self.unchanged_by_veto: bool | None = None

    def _record(self, hook: str, trainer: Any, step: int | None = None) -> None:
        self.calls.append((hook, trainer.stage.name, trainer.progress.step if step is None else step))

    def stage_start(self, trainer: Any) -> None:
        self._record("stage_start", trainer)

    def before_step(self, trainer: Any, update: stagewise.StepState) -> None:
        self._record("before_step", trainer, update.step)
        if self.before_veto is not None and self.unchanged_by_veto is None:
            now = [p.detach() for p in trainer.model.parameters()]
            self.unchanged_by_veto = all(torch.equal(a, b) for a, b in zip(self.before_veto, now, strict=True))

    def before_optimizer_step(self, trainer: Any, update: stagewise.StepState) -> bool | None:
        self._record("before_optimizer_step", trainer, update.step)
        if trainer.stage.name == self.veto_stage and update.step == self.veto_at:
            self.before_veto = [p.detach().clone() for p in trainer.model.parameters()]
            return False  # this update never reaches the weights
        return None

    def after_update(self, trainer: Any, update: stagewise.StepState) -> None:
        self._record("after_update", trainer)

    def after_evaluation(self, trainer: Any, metrics: dict[str, float]) -> str | None:
        self._record("after_evaluation", trainer)
        return None

    def on_checkpoint(self, trainer: Any, step: int) -> None:
        self._record("on_checkpoint", trainer, step)

    def stage_end(self, trainer: Any) -> None:
        self._record("stage_end", trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": [list(c) for c in self.calls]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = [tuple(c) for c in state["calls"]]  # type: ignore[misc]


def main(out: Path) -> tuple[stagewise.Run, Recorder]:
    recorder = Recorder()
    # The plan leaves out the model, tokenizer and data: the objects passed here stand for them.
    stagewise.train(PLAN, out=out, model=make_model(), data={"train": make_rows()}, loss=next_token_loss,
                          callbacks=[recorder])
    return stagewise.open_run(out), recorder  # as train returned it, or later from its directory


if __name__ == "__main__":
    run, recorder = main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/python-api"))
    for name, stage in run.stages.items():
        last = stage.evals[-1]["val_loss"] if stage.evals else None
        print(f"{name}: {len(stage.metrics)} metrics rows, final val_loss {last}, export {stage.export}")
    print(f"the callback was called {len(recorder.calls)} times; the vetoed update left the weights "
          f"{'unchanged' if recorder.unchanged_by_veto else 'CHANGED'}")
