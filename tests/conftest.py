from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import yaml

if TYPE_CHECKING:
    from stagewise.engine.prepare_run import Prepared

# Nothing downloads: pretrained models are saved into temporary directories (examples/tiny_pretrained.py).
# Set before transformers / huggingface_hub are imported, which read it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One thread for every run the tests start, in this process and the ones it spawns: `threads: auto`
# counts busy cores, and fp32 results depend on the thread count, so runs compared bit for bit
# across processes must agree on it (and the tiny models here are fastest on one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` need an NVIDIA GPU: skipped without one (benchmarks/gpu_check.sh runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60k characters of Shakespeare (or, where shared/ is absent, generated English-like text)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    source = SHARED / "tinyshakespeare.txt"
    text = source.read_text(encoding="utf-8")[:60_000] if source.exists() else _play(60_000)
    path.write_text(text, encoding="utf-8")
    return path


def _play(n_chars: int) -> str:
    """A stand-in with Shakespeare's shape (speakers in capitals, verse lines, its ~60 characters)
    for machines without shared/: the tests prompt with "ROMEO" and "KING" and expect an
    untrained model's loss above ln(60)."""
    rng = random.Random(0)
    speakers = ["ROMEO", "JULIET", "KING HENRY", "QUEEN MARGARET", "DUKE VINCENTIO", "FRIAR LAURENCE",
                "GLOUCESTER", "WARWICK", "BUCKINGHAM", "PAULINA", "YORK", "EXTON", "ZOUCHE"]
    words = ("to be or not that is the question whether tis nobler in mind suffer slings and arrows "
             "of outrageous fortune take arms against a sea troubles by opposing end them my lord "
             "good sir thou art thy heart doth jest quickly wax vexed zeal joy King Queen Rome "
             "Verona I we you what why how now come go hence").split()
    parts: list[str] = []
    while sum(map(len, parts)) < n_chars:
        lines = []
        for _ in range(rng.randint(1, 4)):
            line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 9)))
            lines.append(line[0].upper() + line[1:] + rng.choice(",.;:!?-'"))
        parts.append(f"{rng.choice(speakers)}:\n" + "\n".join(lines) + "\n\n")
    return "To be, or not to be: that is the question.\n\n" + "".join(parts)


def tiny_plan(corpus: Path, stages: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    plan: dict[str, Any] = {
        "name": "tiny", "seed": 7, "precision": "fp32",
        "model": {"arch": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32},
        "tokenizer": {"kind": "char"},
        "data": {"train": str(corpus), "val_fraction": 0.1},
        "defaults": {"batch": {"size": 8}, "eval": {"batches": 10}},
        "log": {"every": 5},
        "stages": stages,
    }
    plan.update(top)
    return plan


def write_plan(directory: Path, plan: dict[str, Any], name: str = "plan.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(plan, sort_keys=False), encoding="utf-8")
    return path

# --- running a plan in a test and reading what it logged -------------------------------------------


def run_plan(tmp: Path, corpus: Path, stages: list[dict[str, Any]], tag: str = "run", stop_after: int | None = None,
             **top: Any) -> tuple[Prepared, Path]:
    """Train a tiny plan (a log line every step) into tmp/<tag>, with its own stage cache."""
    from stagewise.engine.prepare_run import prepare  # after the environment above is set
    from stagewise.engine.run_plan import train
    from stagewise.plan.load import load_plan

    top = {"log": {"every": 1}, **top}
    path = write_plan(tmp, tiny_plan(corpus, stages, **top), f"{tag}.yaml")
    prepared = prepare(load_plan(path), path, tmp / f"{tag}-cache")
    train(prepared, tmp / tag, stop_after=stop_after)
    return prepared, tmp / tag


def resumes_identically(tmp: Path, corpus: Path, stages: list[dict[str, Any]], stop_after: int, **top: Any) -> Path:
    """Train the plan whole (tmp/whole), and cut off after `stop_after` updates then resumed
    (tmp/cut); assert both logged the same numbers and ended on the same weights. Returns tmp/whole."""
    from stagewise.engine.verify import metrics_difference
    from stagewise.errors import RunStopped

    _, whole = run_plan(tmp, corpus, stages, "whole", **top)
    with pytest.raises(RunStopped):
        run_plan(tmp, corpus, stages, "cut", stop_after=stop_after, **top)
    _, cut = run_plan(tmp, corpus, stages, "cut", **top)
    assert metrics_difference(whole, cut) is None
    for stage in stages:
        a, b = stage_weights(whole, stage["name"]), stage_weights(cut, stage["name"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage["name"]
    return whole


def _jsonl(path: Path) -> list[dict[str, Any]]:
    from stagewise.engine.run_logs import read_jsonl

    return read_jsonl(path)


def events(run: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in _jsonl(run / "events.jsonl") if e["event"] == name]


def metrics(run: Path, kind: str, stage: str | None = None) -> list[dict[str, Any]]:
    return [m for m in _jsonl(run / "metrics.jsonl") if m["kind"] == kind and stage in (None, m["stage"])]


def stage_weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "stages" / stage / "model.safetensors")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: torch's second thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def fit(model: torch.nn.Module, sampler: Any, loss_fn: Any, epochs: int, lr: float) -> None:
    """A plain Adam loop over `epochs` passes of `sampler`: the task building blocks are tested on
    their own, before the engine runs them."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs * sampler.batches_per_epoch()):
        loss = loss_fn(model, sampler.next_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


TAG_FILLER = "the a we saw went to and then later quite far from here".split()
TAG_NAMES = ["Jordan", "Paris", "Alice Smith", "Bob", "Chad"]


def conll_file(path: Path, n: int, seed: int) -> Path:
    """'Mr X' tags X as PER, 'in X' as LOC: the same names are both, so only context decides."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        for _ in range(rng.randint(1, 3)):
            lines += [f"{w} O" for w in rng.sample(TAG_FILLER, 2)]
            cue, kind = rng.choice([("Mr", "PER"), ("in", "LOC")])
            lines.append(f"{cue} O")
            for i, word in enumerate(rng.choice(TAG_NAMES).split()):
                lines.append(f"{word} {'B' if i == 0 else 'I'}-{kind}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def reversal_file(path: Path, n: int) -> Path:
    """sft rows: a random word of a..j as the prompt, the word reversed as the completion
    (learnable, and not a unigram)."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 5)))
        rows.append(json.dumps({"prompt": word, "completion": word[::-1]}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path
