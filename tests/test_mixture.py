"""Data mixtures per stage (issue 18, item 2): sampled proportions against the weights, each
source validated, the mix in check, exact resume and the plan's checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import metrics as _metrics
from conftest import resumes_identically, tiny_plan, write_plan
from conftest import run_plan as _run
from rich.console import Console

from stagewise.data.mixture import MixedData, MixtureSampler
from stagewise.engine.prepare_run import Prepared, prepare
from stagewise.errors import UserError
from stagewise.plan.load import load_plan
from stagewise.track.plan_view import print_plan
from stagewise.track.runs import load_run

ADAMW = {"name": "adamw", "lr": 3e-3}


@pytest.fixture
def sources(tmp_path: Path, corpus: Path) -> dict[str, Path]:
    """Two sources cut from the corpus (so the plan's char tokenizer knows every symbol), one with its own val."""
    text = corpus.read_text(encoding="utf-8")
    files = {"a": text[:20_000], "a_val": text[20_000:24_000], "b": text[30_000:45_000]}
    for name, part in files.items():
        (tmp_path / f"{name}.txt").write_text(part, encoding="utf-8")
    return {name: tmp_path / f"{name}.txt" for name in files}


def _mix(sources: dict[str, Path], wa: float = 0.7, wb: float = 0.3) -> dict[str, Any]:
    return {"mix": [{"train": str(sources["a"]), "val": str(sources["a_val"]), "weight": wa},
                    {"train": str(sources["b"]), "weight": wb}]}


def _prepared(tmp: Path, corpus: Path, stages: list[dict[str, Any]]) -> Prepared:
    path = write_plan(tmp, tiny_plan(corpus, stages))
    return prepare(load_plan(path), path, tmp / "cache")


def test_sampled_proportions_follow_the_weights(tmp_path: Path, corpus: Path, sources: dict[str, Path]) -> None:
    stages = [{"name": "m", "optimizer": ADAMW, "steps": 4, "data": _mix(sources, 0.7, 0.3)}]
    stage = _prepared(tmp_path, corpus, stages).stages[0]
    data = stage.setup.data
    assert isinstance(data, MixedData) and [s.name for s in data.sources] == ["a", "b"]
    sampler = MixtureSampler(data, stage.resolved.block_size, 8, seed=3)
    batches = 300
    for _ in range(batches):
        x, y = sampler.next_batch()
        assert x.shape == (8, stage.resolved.block_size) and (x[:, 1:] == y[:, :-1]).all()
    drawn = [s.epoch * s.windows_per_epoch + s.position for s in sampler.sources]  # windows each source dealt
    assert sum(drawn) == batches * 8
    share = drawn[0] / sum(drawn)
    assert abs(share - 0.7) < 0.04  # 2400 draws: 3.5 standard deviations of a binomial share
    # The rows are the sources' windows: a fresh sampler's first rows from `a` are a's first windows in its order.
    again = MixtureSampler(data, stage.resolved.block_size, 8, seed=3)
    x, _ = again.next_batch()
    picks = again.picks(0)
    a = MixtureSampler(data, stage.resolved.block_size, 8, seed=3).sources[0]
    assert (x[picks == 0] == a.next_windows(int((picks == 0).sum()))[0]).all()


def test_a_source_of_weight_zero_is_never_drawn(tmp_path: Path, corpus: Path, sources: dict[str, Path]) -> None:
    stage = _prepared(tmp_path, corpus, [{"name": "m", "optimizer": ADAMW, "steps": 4,
                                          "data": _mix(sources, 1.0, 0.0)}]).stages[0]
    sampler = MixtureSampler(stage.setup.data, stage.resolved.block_size, 8, seed=0)
    sampler.skip(50)
    assert sampler.sources[1].state_dict()["position"] == 0 and sampler.sources[0].position == 400 % \
        sampler.sources[0].windows_per_epoch


def test_each_source_is_validated_and_val_loss_is_their_weighted_mean(tmp_path: Path, corpus: Path,
                                                                      sources: dict[str, Path]) -> None:
    stages = [{"name": "base", "optimizer": ADAMW, "steps": 4},
              {"name": "mixed", "steps": 6, "data": _mix(sources, 0.7, 0.3), "eval": {"every": 3, "batches": 2}},
              {"name": "anneal", "steps": 3, "data": _mix(sources, 0.1, 0.9)}]  # weights change between stages
    prepared, run = _run(tmp_path, corpus, stages)
    for stage, (wa, wb) in (("mixed", (0.7, 0.3)), ("anneal", (0.1, 0.9))):
        evals = _metrics(run, "eval", stage)
        assert evals
        for m in evals:
            assert m["val_loss/a"] != m["val_loss/b"]
            assert m["val_loss"] == pytest.approx(wa * m["val_loss/a"] + wb * m["val_loss/b"], rel=1e-12)
    assert "val_loss/a" not in _metrics(run, "eval", "base")[0]
    keys = [s.key for s in prepared.stages]
    assert len(set(keys)) == 3
    # the runs table and report say which stage read a mix
    tasks = {row.name: row.task for row in load_run(run).stage_rows()}
    assert tasks == {"base": "causal_lm", "mixed": "causal_lm (mix a 70%, b 30%)",
                     "anneal": "causal_lm (mix a 10%, b 90%)"}


def test_a_mix_stage_resumes_bit_identically(tmp_path: Path, corpus: Path, sources: dict[str, Path]) -> None:
    stages = [{"name": "m", "optimizer": ADAMW, "steps": 10, "data": _mix(sources), "eval": {"every": 4, "batches": 2},
               "batch": {"size": 4, "accumulate": 2}}]
    resumes_identically(tmp_path, corpus, stages, stop_after=5, checkpoint={"every": 3, "keep": 2})


def test_sources_are_tokenized_once_into_the_token_cache(tmp_path: Path, corpus: Path,
                                                         sources: dict[str, Path]) -> None:
    stages = [{"name": "m", "optimizer": ADAMW, "steps": 2, "data": _mix(sources)}]
    first = _prepared(tmp_path, corpus, stages)
    cached = sorted((tmp_path / "cache" / "tokens").glob("*.bin"))
    assert len(cached) == 2 + 4  # the plan's train/val, and each source's
    second = _prepared(tmp_path, corpus, stages)
    assert sorted((tmp_path / "cache" / "tokens").glob("*.bin")) == cached
    a, b = first.stages[0].setup.data, second.stages[0].setup.data
    assert a.fingerprint == b.fingerprint and all(isinstance(s.data.train, np.memmap) for s in b.sources)


def test_check_shows_the_mix(tmp_path: Path, corpus: Path, sources: dict[str, Path]) -> None:
    prepared = _prepared(tmp_path, corpus, [{"name": "m", "optimizer": ADAMW, "steps": 2,
                                             "data": _mix(sources, 3.0, 1.0)}])
    console = Console(record=True, width=200)
    print_plan(console, "tiny", prepared.resolved, {"m": "train"})
    text = console.export_text()
    assert "a 75%" in text and "b 25%" in text


@pytest.mark.parametrize("change,message", [
    ({"data": {"mix": [{"train": "A", "weight": -0.5}, {"train": "B", "weight": 1.0}]}},
     r"stages\[1\]\.data\.mix\[0\]\.weight: input should be greater than or equal to 0"),
    ({"data": {"mix": [{"train": "A", "weight": 0.0}, {"train": "B", "weight": 0.0}]}},
     r"stages\[1\]\.data\.mix: the weights sum to 0"),
    ({"data": {"mix": [{"train": "A", "weight": 1.0}, {"train": "missing.txt", "weight": 1.0}]}},
     r"stages\[1\]\.data\.mix\[1\]\.train: no file matches 'missing.txt'"),
    ({"data": {"mix": [{"train": "A", "weight": 1.0}, {"train": "A", "weight": 1.0}]}},
     r"stages\[1\]\.data\.mix\[1\]\.name: 'a' names mix\[0\] already"),
    ({"data": {"mix": [{"train": "A", "weight": 1.0}], "train": "B"}}, r"stages\[1\]\.data\.train: give exactly one"),
    ({"data": {"mix": [{"train": "*.txt", "weight": 1.0}]}}, r"stages\[1\]\.data\.mix\[0\]\.name: '\*' \(the train"),
    ({"epochs": 1, "steps": None, "data": {"mix": [{"train": "A", "weight": 1.0}]}},
     r"stages\[1\]\.epochs: a data mix has no epochs"),
    ({"data": {"mix": [{"train": "A", "weight": 1.0}]}, "eval": {"each_epoch": True}},
     r"stages\[1\]\.eval\.each_epoch: a data mix has no epochs"),
    ({"data": {"train": "A"}}, r"stages\[1\]\.data: a causal_lm stage reads the plan's data"),
])
def test_bad_mixes_are_one_line_errors(tmp_path: Path, corpus: Path, sources: dict[str, Path],
                                       change: dict[str, Any], message: str) -> None:
    def files(value: Any) -> Any:  # A and B: the sources' paths
        if isinstance(value, dict):
            return {k: files(v) for k, v in value.items()}
        if isinstance(value, list):
            return [files(v) for v in value]
        return {"A": str(sources["a"]), "B": str(sources["b"])}.get(value, value) if isinstance(value, str) else value

    stage = {k: v for k, v in {"name": "b", "steps": 4, **files(change)}.items() if v is not None}
    with pytest.raises(UserError, match=message) as e:
        _prepared(tmp_path, corpus, [{"name": "a", "optimizer": ADAMW, "steps": 4}, stage])
    assert "\n" not in str(e.value)


def test_the_plans_data_is_not_a_mix(tmp_path: Path, corpus: Path, sources: dict[str, Path]) -> None:
    plan = tiny_plan(corpus, [{"name": "a", "optimizer": ADAMW, "steps": 4}], data=_mix(sources))
    path = write_plan(tmp_path, plan)
    with pytest.raises(UserError, match=r"data\.mix: the plan's data trains the tokenizer"):
        load_plan(path)


def test_a_mix_is_for_causal_lm_stages(tmp_path: Path, corpus: Path, sources: dict[str, Path]) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "ab{i}", "completion": "ba"}}\n' for i in range(40)), encoding="utf-8")
    stage = {"name": "s", "task": "sft", "steps": 2, "data": {"mix": [{"train": str(rows), "weight": 1.0}]}}
    with pytest.raises(UserError, match=r"stages\[1\]\.data\.mix: a sft stage reads one data set \(stages of "
                                        r"causal_lm read a mix\)"):
        _prepared(tmp_path, corpus, [{"name": "a", "optimizer": ADAMW, "steps": 4}, stage])
