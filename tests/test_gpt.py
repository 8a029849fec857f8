"""stagewise's own GPT (`model.arch: gpt`, models.gpt): GPT-2's function, its cache and both
attentions agree; it trains, resumes, exports, generates and evaluates through the CLI, on one
process or two (ddp, fsdp); its keys fail in one line; a plan with it reaches its first update
without importing transformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import resumes_identically, stage_weights, tiny_plan, write_plan
from tokenizers import Tokenizer

from stagewise.cli import main
from stagewise.models.gpt import GPT

GPT_MODEL = {"arch": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32}
ROOT = Path(__file__).resolve().parents[1]


def _gpt_plan(corpus: Path, steps: int = 30, **model: object) -> dict[str, object]:
    stages = [{"name": "lm", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": steps}]
    return tiny_plan(corpus, stages, model={**GPT_MODEL, **model})


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_is_what_the_constructor_builds(bias: bool) -> None:
    settings = {"n_layer": 3, "n_head": 2, "n_embd": 48, "n_positions": 40, "bias": bias}
    model = GPT(vocab_size=71, **settings)  # type: ignore[arg-type]
    assert sum(p.numel() for p in model.parameters()) == GPT.parameter_count(vocab_size=71, **settings)


def test_with_biases_it_computes_gpt2_with_exact_gelu() -> None:
    """The same weights in transformers' GPT-2 (activation gelu, its Conv1D weights transposed)
    give the same logits: `bias: true` is GPT-2's layout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(vocab_size=50, n_layer=2, n_head=4, n_embd=32, n_positions=16, bias=True).eval()
    config = GPT2Config(vocab_size=50, n_layer=2, n_head=4, n_embd=32, n_positions=16, activation_function="gelu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    theirs = GPT2LMHeadModel(config).eval()
    state = {}
    for name, value in ours.state_dict().items():
        key = name if name == "lm_head.weight" else f"transformer.{name}"  # the same names, under `transformer.`
        conv = any(name.endswith(f"{m}.weight") for m in ("c_attn", "c_proj", "c_fc"))
        state[key] = value.t() if conv else value
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") or k.endswith("masked_bias") for k in missing)
    x = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5)


def test_eager_and_sdpa_attention_and_the_kv_cache_agree() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_positions=24, bias=False).eval()
    x = torch.randint(0, 40, (2, 20))
    with torch.no_grad():
        sdpa = model(input_ids=x).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids=x).logits
        first = model(input_ids=x[:, :12], use_cache=True)
        rest = [first.logits]
        past = first.past_key_values
        for t in range(12, 20):  # one token at a time, as generation feeds it
            out = model(input_ids=x[:, t:t + 1], past_key_values=past, use_cache=True)
            rest.append(out.logits)
            past = out.past_key_values
    assert torch.allclose(sdpa, eager, atol=1e-5)
    assert torch.allclose(torch.cat(rest, dim=1), eager, atol=1e-5)
    with pytest.raises(ValueError, match="gpt attention is one of sdpa, eager"):
        model.set_attn_implementation("flash_attention_2")


def test_a_plan_with_gpt_trains_exports_generates_and_evaluates(tmp_path: Path, corpus: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    plan = write_plan(tmp_path, _gpt_plan(corpus, steps=40, bias=False))
    run = tmp_path / "run"
    assert main(["train", str(plan), "--out", str(run), "--cache", str(tmp_path / "cache")]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.5  # from ~ln(vocab) down
    description = json.loads((run / "stages" / "lm" / "model.json").read_text())
    assert description["arch"] == "gpt" and description["settings"]["bias"] is False
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "ROMEO:", "--max-tokens", "20", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.strip()) > len("ROMEO:")
    assert main(["generate", str(run), "--prompt", "ROMEO:", "--max-tokens", "20", "--seed", "3"]) == 0
    assert capsys.readouterr().out == text  # seeded
    held_out = tmp_path / "held.txt"
    held_out.write_text(corpus.read_text(encoding="utf-8")[-5000:], encoding="utf-8")
    assert main(["evaluate", str(run), "--data", str(held_out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["loss"] < math.log(60)  # better than uniform over the characters


def test_a_gpt_run_resumes_bit_identically(tmp_path: Path, corpus: Path) -> None:
    stages = [{"name": "lm", "optimizer": {"name": "adamw", "lr": 3e-3}, "steps": 12},
              {"name": "sgd", "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "steps": 8}]
    resumes_identically(tmp_path, corpus, stages, stop_after=15, model={**GPT_MODEL, "dropout": 0.1})


@pytest.mark.parametrize(("model", "message"), [
    ({"n_embed": 32}, "model.n_embed: not a setting of gpt (it takes: bias, dropout, n_embd, n_head, n_layer, "
                      "n_positions)"),
    ({"n_embd": 30, "n_head": 4}, "n_embd 30 is not a multiple of n_head 4"),
    ({"bias": "no"}, "model.bias: must be true or false"),
    ({"dropout": 1.5}, "model.dropout: a rate: must be in [0, 1] (got 1.5)"),
])
def test_bad_gpt_keys_fail_in_one_line(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str],
                                       model: dict[str, object], message: str) -> None:
    plan = write_plan(tmp_path, _gpt_plan(corpus, **model))
    assert main(["check", str(plan)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_adapters_and_classifier_heads_on_gpt_are_refused_before_training(
        tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = _gpt_plan(corpus)
    lm = plan["stages"][0]  # type: ignore[index]
    plan["stages"] = [lm, {"name": "lora", "adapter": {"lora": {"r": 4}}, "steps": 5}]
    assert main(["check", str(write_plan(tmp_path, plan, "lora.yaml"))]) == 2
    assert "stages[1].adapter.lora: adapters go on transformers causal LMs" in capsys.readouterr().err
    labeled = tmp_path / "labeled.tsv"
    labeled.write_text("".join(f"{'ab'[i % 2]}\tto be or not {i}\n" for i in range(40)), encoding="utf-8")
    head = {"name": "cls", "task": "classify", "data": {"train": str(labeled), "field": 1, "label": 0, "format": "tsv"},
            "optimizer": {"name": "adam", "lr": 1e-3}, "epochs": 1}
    plan["stages"] = [lm, head]
    assert main(["check", str(write_plan(tmp_path, plan, "head.yaml"))]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "stages[1].task: classifier heads go on transformers causal LMs (model.arch 'gpt' is stagewise's own)")


def test_a_gpt_plan_trains_and_exports_without_transformers(tmp_path: Path, corpus: Path) -> None:
    """A gpt plan loads neither transformers nor peft, up to its first update (~3 s of start-up,
    models.gpt) nor to its end, export and sample included (~0.7 s of CPU: the tokenizer's files
    are written without transformers), and AutoTokenizer loads the export's tokenizer."""
    from transformers import AutoTokenizer

    plan = _gpt_plan(corpus, steps=3)
    plan["sample"] = {"prompt": "to be", "max_tokens": 5}
    path = write_plan(tmp_path, plan)
    code = ("import sys\n"
            "from torch.optim.optimizer import register_optimizer_step_post_hook\n"
            "def loaded():\n"
            "    print('loaded:', sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft')))\n"
            "first = register_optimizer_step_post_hook(lambda *_: (loaded(), first.remove()))\n"
            "from stagewise.cli import main\n"
            f"main(['train', {str(path)!r}, '--out', {str(tmp_path / 'run')!r}, '--cache', {str(tmp_path / 'cache')!r}])\n"
            "loaded()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                              "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    # at the first update, then at the end
    assert [line for line in out.stdout.splitlines() if line.startswith("loaded:")] == ["loaded: []"] * 2, out.stdout
    assert "sample:" in out.stdout
    export = tmp_path / "run" / "stages" / "lm"
    tok = AutoTokenizer.from_pretrained(export)
    text = "to be or not"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text) == Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json")).encode(text).ids


def test_sft_on_gpt_learns_the_replies_and_chat_generate_stops_at_the_end_marker(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_chat import _dialogues, _plan

    plan = _plan(_dialogues(tmp_path / "dlg_train.jsonl", 240))
    plan["model"] = {"arch": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 48, "n_positions": 48}
    run = tmp_path / "run"
    assert main(["train", str(write_plan(tmp_path, plan)), "--out", str(run), "--cache", str(tmp_path / "cache")]) == 0
    final = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"eval"' in line][-1]
    assert final["val_exact_match"] == 100.0, final
    capsys.readouterr()
    assert main(["generate", str(run), "--user", "bye", "--temperature", "0", "--max-tokens", "40"]) == 0
    assert capsys.readouterr().out == "see you\n"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_gpt_as_one(tmp_path: Path, corpus: Path, strategy: str) -> None:
    """torchrun on 2 processes: ddp replicates the GPT, fsdp shards its blocks (`h`) and the rest,
    tied embedding included; both follow the one-process run, and the export is a plain model's."""
    from test_distributed import FSDP_STAGES, _close, _one, _plan, _two, _val

    stages = [{**FSDP_STAGES[0], "steps": 40}, FSDP_STAGES[1]]
    plan = _plan(tmp_path, corpus, strategy, stages, model=GPT_MODEL, distributed={"strategy": strategy})
    _one(plan, tmp_path / "one", tmp_path / "cache-one")
    done = _two(plan, tmp_path / "two", tmp_path / "cache-two")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"data parallel: 2 processes ({strategy})" in done.stdout
    one, two = _val(tmp_path / "one"), _val(tmp_path / "two")
    assert len(one) == 3 and _close(one, two), (one, two)
    a, b = stage_weights(tmp_path / "one", "b"), stage_weights(tmp_path / "two", "b")
    # The same weights but for rounding, which AdamW's normalized steps blow up to ~1e-3 on single
    # elements whose gradients are near 0; on average each tensor differs by under 1e-4.
    assert a.keys() == b.keys() and all(float((a[k] - b[k]).abs().mean()) < 1e-4 for k in a)
    assert all(torch.allclose(a[k], b[k], atol=5e-3) for k in a)
