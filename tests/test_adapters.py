"""LoRA stages through peft on a pretrained model loaded from a local directory (a tiny Qwen2
built and saved by examples/tiny_pretrained.py, as a user would fine-tune a hub model): only the
adapter trains, the adapter is kept, merged or left out by the next stage, the merged export loads
with AutoModelForCausalLM and gives the adapter model's logits, and resume is exact."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_plan
from rich.console import Console
from safetensors.torch import load_file

from stagewise.cli import main
from stagewise.config.stage_config import AdapterConfig
from stagewise.engine.prepare_run import prepare
from stagewise.engine.run_plan import train
from stagewise.models.adapters import merge_into_base, stage_model
from stagewise.plan.load import load_plan

ROOT = Path(__file__).resolve().parents[1]
QUIET = Console(quiet=True)
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}


def _example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _example("tiny_pretrained").build(tmp_path_factory.mktemp("hub") / "tiny-qwen")


def _dialogues(path: Path, n: int = 64) -> Path:
    replies = {"hello": "hi there", "bye": "see you"}
    rows = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": replies[u]}]}
            for u in list(replies) * (n // 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _plan(tmp_path: Path, pretrained: Path, stages: list[dict[str, Any]]) -> Path:
    plan = {"name": "lora", "seed": 0, "precision": "fp32", "model": {"pretrained": str(pretrained)},
            "tokenizer": {"kind": "pretrained", "path": str(pretrained)}, "chat_template": "pretrained",
            "data": {"train": str(_dialogues(tmp_path / "dlg.jsonl")), "max_len": 32},
            "defaults": {"task": "sft", "batch": {"size": 8}, "eval": {"batches": 1}}, "log": {"every": 2},
            "stages": stages}
    return write_plan(tmp_path, plan)


SFT_LORA_THEN_COOLDOWN = [
    {"name": "lora", "adapter": {"lora": LORA}, "optimizer": {"name": "adamw", "lr": 1e-2}, "steps": 6},
    {"name": "cool", "adapter": {"from_parent": "keep"}, "optimizer": {"lr": 2e-3, "handoff": "carry"},
     "schedule": {"name": "cosine"}, "steps": 4},
    {"name": "full", "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 2},
]


def test_a_lora_stage_trains_only_its_adapter_and_its_merged_export_is_the_adapter_model(
        tmp_path: Path, pretrained: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = _plan(tmp_path, pretrained, SFT_LORA_THEN_COOLDOWN)
    prepared = prepare(load_plan(path), path, tmp_path / "cache")
    assert prepared.stages[0].layers.held == {n for n, _ in prepared.stages[0].model.named_parameters()
                                              if ".lora_" in n}
    run = tmp_path / "run"
    train(prepared, run, console=QUIET)

    base = load_file(str(pretrained / "model.safetensors"))
    for stage in prepared.stages[:2]:  # base weights as pretrained, adapter trained (B starts at 0)
        final = load_file(str(prepared.store(stage).final_dir / "model.safetensors"))
        lora = {k: v for k, v in final.items() if ".lora_" in k}
        frozen = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in final.items()
                  if ".lora_" not in k}
        if "lm_head.weight" not in base:  # tied to the embeddings: saved once, under either name
            frozen["model.embed_tokens.weight"] = frozen.pop("lm_head.weight", frozen.get("model.embed_tokens.weight"))
        assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)
        assert lora and all(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)
    events = [json.loads(line) for line in (run / "events.jsonl").open()]
    assert [e["stage"] for e in events if e["event"] == "optimizer_carried"] == ["cool"]
    merged_event = next(e for e in events if e["event"] == "adapter_start" and e["stage"] == "full")
    assert merged_event["merged_layers"] == 2 * 3  # two layers, three adapted modules each

    x = torch.randint(0, 300, (2, 10))
    for name in ("lora", "cool"):
        export = run / "stages" / name
        merged = AutoModelForCausalLM.from_pretrained(export).eval()
        config = json.loads((export / "adapter/adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(pretrained.resolve())
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained), export / "adapter")
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=x).logits, adapted.eval()(input_ids=x).logits,
                                       atol=1e-5, rtol=1e-5)
    # The full fine-tuning stage starts from the merged weights: its export is not the adapter-free base.
    full = AutoModelForCausalLM.from_pretrained(run / "stages/full").eval()
    plain = AutoModelForCausalLM.from_pretrained(pretrained).eval()
    with torch.no_grad():
        assert not torch.allclose(full(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-3)
    assert (run / "stages/cool/chat_template.jinja").read_text() == (pretrained / "chat_template.jinja").read_text()


def test_keep_merge_and_new_hand_the_parents_adapter_on(pretrained: Path) -> None:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(pretrained).eval()
    x = torch.randint(0, 300, (1, 8))

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=x).logits

    before = logits(plain)
    parent, step = stage_model(plain, None, None, "hub", AdapterConfig.model_validate({"lora": LORA}), "stages[0]")
    assert step is not None and step.base == "hub" and step.fresh and not step.merge_parent
    step.start(plain, parent, seed=1)
    torch.testing.assert_close(logits(parent), before)  # a new adapter changes nothing (B = 0)
    with torch.no_grad():
        for name, p in parent.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    adapted = logits(parent)
    assert not torch.allclose(adapted, before)

    kept, keep = stage_model(parent, step, "a", "hub", AdapterConfig.model_validate({"from_parent": "keep"}), "s[1]")
    assert kept is parent and keep is not None and keep.lora == step.lora and keep.base == "hub"
    new, fresh = stage_model(parent, step, "a", "hub",
                             AdapterConfig.model_validate({"lora": {"r": 2}, "from_parent": "new"}), "s[1]")
    assert fresh is not None and fresh.base == "hub"
    fresh.start(parent, new, seed=2)
    torch.testing.assert_close(logits(new), before)  # the parent's adapter left out: its base weights
    merged, merge = stage_model(parent, step, "a", "hub",
                                AdapterConfig.model_validate({"lora": {"r": 2}, "from_parent": "merge"}), "s[1]")
    assert merge is not None and merge.merge_parent and merge.base == "../a"
    merge.start(parent, merged, seed=2)
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=1e-5)  # the parent's adapter in the weights
    torch.testing.assert_close(logits(plain), adapted, atol=1e-5, rtol=1e-5)  # the chain shares its tensors
    assert merge_into_base(parent) == 2 * 3


@pytest.mark.parametrize(("stages", "message"), [
    ([{"name": "a", "adapter": {"from_parent": "keep"}}],
     "stages[0].adapter.from_parent: the parent stage has no adapter to keep, merge or leave out"),
    ([{"name": "a", "adapter": {}}], "stages[0].adapter.lora: required: the stage starts a new adapter"),
    ([{"name": "a", "adapter": {"lora": LORA}}, {"name": "b", "adapter": {"lora": {**LORA, "r": 8}}}],
     "stages[1].adapter.lora: from_parent: keep trains the parent's adapter on: leave lora out or give the "
     "parent's (merge or new start another)"),
    ([{"name": "a", "adapter": {"lora": {"target_modules": ["c_attn"]}}}], "stages[0].adapter.lora.target_modules: "),
    ([{"name": "a", "adapter": {"lora": LORA}}, {"name": "b", "adapter": {"from_parent": "merge", "lora": LORA},
                                                  "optimizer": {"handoff": "carry"}}],
     "stages[1].optimizer.handoff: carry needs the parent's model; this stage trains other parameters (a new "
     "adapter, or merged weights) (use reset)"),
])
def test_bad_adapter_plans_are_one_line(tmp_path: Path, pretrained: Path, capsys: pytest.CaptureFixture[str],
                                        stages: list[dict[str, Any]], message: str) -> None:
    stages = [{"optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 2, **s} for s in stages]
    path = _plan(tmp_path, pretrained, stages)
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: {message}")


def test_a_resumed_lora_stage_is_bit_identical(tmp_path: Path, pretrained: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = _plan(tmp_path, pretrained, SFT_LORA_THEN_COOLDOWN[:2])
    assert main(["verify-resume", str(path), "--steps", "3"]) == 0
    assert "resume is exact" in capsys.readouterr().out


def test_an_adapter_on_a_task_without_adapters_is_refused(tmp_path: Path, corpus: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    labeled = tmp_path / "l.tsv"
    labeled.write_text("".join(f"{i % 2}\tword {i % 2}\n" for i in range(20)), encoding="utf-8")
    plan = {"name": "x", "model": {"arch": "bigru", "embed_dim": 8, "hidden": 8, "dense": 8},
            "tokenizer": {"kind": "word"}, "data": {"train": str(labeled), "field": 1, "label": 0},
            "stages": [{"name": "c", "task": "classify", "adapter": {"lora": {}}, "batch": {"size": 4}, "steps": 1,
                        "optimizer": {"name": "adam", "lr": 1e-3}}]}
    path = write_plan(tmp_path, plan)
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == f"error: {path}: stages[0].adapter: a classify stage trains no adapter " \
                                      "(stages of causal_lm, sft do)\n"


def test_the_lora_example_checks_on_the_tiny_model_its_script_saves(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """examples/lora.yaml as its comment runs it: the tiny model beside it, the task data under tasks/."""
    _example("tiny_pretrained").build(tmp_path / "tiny-qwen")
    spec = importlib.util.spec_from_file_location("make_data", ROOT / "examples/tasks/make_data.py")
    assert spec is not None and spec.loader is not None
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    make_data.write(tmp_path / "tasks" / "data")
    plan = tmp_path / "lora.yaml"
    plan.write_text((ROOT / "examples/lora.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    assert main(["check", str(plan), "--cache", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "plan OK: 3 stages, 220 steps" in out
