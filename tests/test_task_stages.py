"""Task stages end to end: plans whose stages classify, fine-tune (sft), translate (seq2seq) or tag,
trained through `prepare` + `train` as the CLI runs them, on small real or generated data; an
LM -> classifier chain (ULMFiT) with gradual unfreezing and discriminative LRs; exact resume of
example-level stages; and the one-line errors of plans that mix tasks wrongly."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHARED, TAG_NAMES, conll_file, reversal_file, tiny_plan, write_plan
from rich.console import Console
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from stagewise.cli import main
from stagewise.engine.prepare_run import Prepared, prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.engine.verify import state_difference
from stagewise.errors import RunStopped, UserError
from stagewise.optim.layers import layer_groups
from stagewise.plan.load import load_plan
from stagewise.tasks.batches import split_records
from stagewise.tasks.classify import majority_accuracy
from stagewise.tasks.metrics import bleu, chrf, span_f1
from stagewise.tasks.readers import read_pairs
from stagewise.tasks.sft import evaluate_sft

QUIET = Console(quiet=True)
SMS = SHARED / "sms_spam.tsv"
ENG_FRA = SHARED / "eng_fra.tsv"
BIGRU = {"arch": "bigru", "embed_dim": 16, "hidden": 16, "dense": 16}
GPT = {"arch": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
TRANSFORMER = {"arch": "transformer", "d_model": 32, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
               "dim_feedforward": 64}
BERT = {"arch": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
T5 = {"arch": "t5", "d_model": 32, "d_ff": 64, "num_layers": 1, "num_heads": 2, "d_kv": 16, "dropout_rate": 0.1}
BART = {"arch": "bart", "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
        "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "max_position_embeddings": 64,
        "dropout": 0.1}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny, and on a 2-core machine shared with other work
    torch's two threads wait on each other (a 1 s stage measured at 47 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- helpers ------------------------------------------------------------------------------------


def _plan(stages: list[dict[str, Any]], model: dict[str, Any], tokenizer: dict[str, Any], data: dict[str, Any],
          **top: Any) -> dict[str, Any]:
    return {"name": "tasks", "seed": 0, "precision": "fp32", "model": model, "tokenizer": tokenizer,
            "data": data, "log": {"every": 5}, "stages": stages, **top}


def _prepare(directory: Path, plan: dict[str, Any], name: str = "plan") -> tuple[Path, Prepared]:
    """Write `plan` as `name.yaml` and prepare it with a cache of its own."""
    path = write_plan(directory, plan, f"{name}.yaml")
    return path, prepare(load_plan(path), path, directory / f"cache-{name}")


def _run(directory: Path, plan: dict[str, Any], name: str = "run") -> tuple[Path, Prepared, list]:
    """Train `plan` into `directory/name` with a cache of its own."""
    _, prepared = _prepare(directory, plan, name)
    summaries = train(prepared, directory / name, console=QUIET)
    return directory / name, prepared, summaries


def _evals(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    return [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "eval" and m["stage"] == stage]


def _events(run_dir: Path, event: str) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == event]


def _slice(source: Path, directory: Path, lines: int) -> Path:
    """The first `lines` lines of a shared data file, read in place."""
    if not source.is_file():
        pytest.skip(f"{source} is not here")
    path = directory / source.name
    path.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]), encoding="utf-8")
    return path


HAM = "home later dinner mum love tonight sleep tired work lunch".split()
SPAM = "win prize cash free call claim urgent txt offer reply".split()
FILLER = "you the to now and your a is for me".split()


def _messages(path: Path, n: int, seed: int = 0) -> Path:
    """label<TAB>text rows without a header, 30% spam: two words of the class among three fillers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = "spam" if rng.random() < 0.3 else "ham"
        words = rng.sample(SPAM if label == "spam" else HAM, 2) + [rng.choice(FILLER) for _ in range(3)]
        rng.shuffle(words)
        rows.append(f"{label}\t{' '.join(words)}\n")
    path.write_text("".join(rows), encoding="utf-8")
    return path


# --- 1. classify with the built-in BiGRU ----------------------------------------------------------


def test_bigru_classify_plan_beats_the_majority_class(tmp_path: Path) -> None:
    sms = _slice(SMS, tmp_path, 1000)
    plan = _plan([{"name": "adam", "task": "classify", "optimizer": {"name": "adam", "lr": 1e-2},
                   "batch": {"size": 32}, "epochs": 4, "eval": {"each_epoch": True}}],
                 BIGRU, {"kind": "word", "vocab_size": 2000},
                 {"train": sms.name, "field": 1, "label": 0, "val_fraction": 0.2, "max_len": 40})
    run_dir, prepared, summaries = _run(tmp_path, plan)
    data = prepared.stages[0].setup.data
    baseline = majority_accuracy(data)
    assert data.label_map.labels == ("ham", "spam") and len(data.train) == 800 and len(data.val) == 200
    stage = prepared.stages[0].resolved
    assert stage.unit == "examples" and stage.steps == 4 * 25  # 800 examples / 32 per batch = 25 per epoch

    evals = _evals(run_dir, "adam")
    assert [e["stage_step"] for e in evals] == [25, 50, 75, 100]  # each epoch; the last is the stage's end
    assert set(evals[-1]) >= {"val_loss", "val_accuracy", "val_macro_f1"}
    final = summaries[0].metrics
    assert set(final) == {"val_loss", "val_accuracy", "val_macro_f1"}
    assert final["val_accuracy"] == evals[-1]["val_accuracy"]
    assert final["val_accuracy"] > baseline + 0.05, (final, baseline)
    assert final["val_macro_f1"] > 0.6  # the majority class's macro-F1 is below 0.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]

    train_lines = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "train"]
    assert train_lines[-1]["examples"] == 100 * 32 and "ex_per_s" in train_lines[-1]
    start = _events(run_dir, "stage_start")[0]
    assert start["task"] == "classify" and start["unit"] == "examples"
    exported = json.loads((run_dir / "stages/adam/model.json").read_text())
    assert exported["labels"] == ["ham", "spam"] and exported["arch"] == "bigru"


def test_bert_classifier_from_config_learns_and_exports(tmp_path: Path) -> None:
    _messages(tmp_path / "messages.tsv", 400)
    plan = _plan([{"name": "adam", "task": "classify", "optimizer": {"name": "adam", "lr": 3e-3},
                   "batch": {"size": 16}, "epochs": 4}],
                 BERT, {"kind": "word"}, {**CLASSIFY_DATA, "val_fraction": 0.2, "max_len": 16})
    run_dir, prepared, summaries = _run(tmp_path, plan)
    setup = prepared.stages[0].setup
    assert summaries[0].metrics["val_accuracy"] > majority_accuracy(setup.data) + 0.05, summaries[0].metrics
    # the export: AutoModelForSequenceClassification with the labels named, same logits
    loaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "stages" / "adam").eval()
    input_ids, mask, _ = setup.data.val.rows(torch.arange(8))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids, attention_mask=mask).logits,
                           setup.model.eval()(input_ids=input_ids, attention_mask=mask).logits)
    assert loaded.config.id2label == {0: "ham", 1: "spam"}


# --- 2. ULMFiT: causal_lm -> classify with gradual unfreezing -------------------------------------


def test_ulmfit_chain_carries_the_backbone_and_unfreezes_a_group_per_epoch(tmp_path: Path) -> None:
    _messages(tmp_path / "messages.tsv", 600)
    epochs = 4
    plan = _plan([
        {"name": "lm", "optimizer": {"name": "adamw", "lr": 3e-3}, "batch": {"size": 16, "block_size": 32},
         "steps": 100, "eval": {"batches": 5}},
        {"name": "cls", "task": "classify", "optimizer": {"name": "adamw", "lr": 1e-2}, "schedule": {"name": "stlr"},
         "batch": {"size": 8}, "epochs": epochs, "layers": {"unfreeze": "gradual", "lr_factor": 2.6},
         "eval": {"each_epoch": True}},
    ], GPT, {"kind": "char"}, {"train": "messages.tsv", "field": 1, "label": 0, "val_fraction": 0.2, "max_len": 48})
    _, prepared = _prepare(tmp_path, plan, "ulmfit")
    lm, head = prepared.stages[0].setup.model, prepared.stages[1].setup.model
    assert prepared.stages[1].setup.head and head is not lm
    names = {id(p): n for n, p in head.named_parameters()}
    groups = layer_groups(head)
    assert len(groups) == 4  # embeddings, h.0, h.1, then ln_f and the score head
    assert "score.weight" in groups[-1] and "transformer.wte.weight" in groups[0]
    depth = {n: len(groups) - 1 - i for i, group in enumerate(groups) for n in group}

    # A harness around every optimizer step of the classifier: which parameters have gradients,
    # each parameter group's LR multiple, and the weights the first step starts from.
    steps: list[dict[str, Any]] = []

    def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if not all(id(p) in names for p in params):
            return  # the LM stage's optimizer
        if not steps:
            steps.append({"start": {k: v.detach().clone() for k, v in head.state_dict().items()}})
        steps.append({
            "grads": {names[id(p)] for p in params if p.grad is not None},
            "groups": [(g["lr"], g["lr_scale"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups],
            "wte": head.transformer.wte.weight.detach().clone(),
        })

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        summaries = train(prepared, tmp_path / "run", console=QUIET)
    finally:
        handle.remove()
    run_dir = tmp_path / "run"
    start, steps = steps[0]["start"], steps[1:]
    stage = prepared.stages[1].resolved
    per_epoch = stage.steps // epochs
    assert len(steps) == stage.steps == epochs * per_epoch == 4 * 60  # 480 examples / 8

    # The head starts from the LM's final backbone; only the score head is new.
    attached = _events(run_dir, "head_attached")
    assert [(e["stage"], e["step"], e["classes"]) for e in attached] == [("cls", 100, 2)]
    assert attached[0]["carried_tensors"] == len(lm.transformer.state_dict())
    lm_final = load_file(run_dir / "stages/lm/model.safetensors")
    backbone = [k for k in start if k.startswith("transformer.") and k in lm_final]
    assert {k.removeprefix("transformer.") for k in backbone} >= {n for n, _ in lm.transformer.named_parameters()}
    for key in backbone:
        assert torch.equal(start[key], lm_final[key]), key
    assert "score.weight" in start and "score.weight" not in lm_final

    # Gradual unfreezing: the top group in epoch 0, one more group each epoch after.
    for i, record in enumerate(steps):
        epoch = i // per_epoch
        expected = {n for group in groups[len(groups) - 1 - epoch:] for n in group}
        assert record["grads"] == expected, (i, epoch, record["grads"] ^ expected)
    # Frozen means untouched: the embeddings get their first update in the last epoch.
    first_of_last_epoch = steps[(epochs - 1) * per_epoch]
    assert torch.equal(first_of_last_epoch["wte"], start["transformer.wte.weight"])
    assert not torch.equal(head.transformer.wte.weight.detach().cpu(), start["transformer.wte.weight"])

    # Discriminative LRs: every parameter group carries lr_scale = 2.6 ** -depth of its layer group.
    scales = set()
    for record in steps[:: per_epoch // 2]:
        schedule_lr = {lr / scale for lr, scale, _ in record["groups"]}
        assert max(schedule_lr) == pytest.approx(min(schedule_lr))  # one schedule, scaled per group
        for _, scale, members in record["groups"]:
            assert {depth[n] for n in members} == {depth[next(iter(members))]}
            assert scale == pytest.approx(2.6 ** -depth[next(iter(members))])
            scales.add(round(scale, 9))
    assert scales == {round(2.6 ** -d, 9) for d in range(4)}

    baseline = majority_accuracy(prepared.stages[1].setup.data)
    final = summaries[1].metrics
    assert final["val_accuracy"] > baseline + 0.05, (final, baseline)
    assert [e["stage_step"] for e in _evals(run_dir, "cls")] == [60, 120, 180, 240]


# --- 3. exact resume of example-level stages ------------------------------------------------------


def _classify_resume_plan(directory: Path) -> dict[str, Any]:
    _messages(directory / "messages.tsv", 200)
    return _plan([
        {"name": "adam", "task": "classify", "optimizer": {"name": "adam", "lr": 1e-2}, "batch": {"size": 16},
         "epochs": 3, "regularization": {"dropout": 0.2}, "eval": {"each_epoch": True},
         "on_plateau": {"metric": "val_loss", "patience": 0, "do": {"lr_scale": {"factor": 0.5}}}},
        {"name": "sgd", "task": "classify", "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
         "layers": {"freeze": ["embed.*"]}, "batch": {"size": 16}, "epochs": 2, "regularization": {"dropout": 0.3}},
    ], BIGRU, {"kind": "word"}, {"train": "messages.tsv", "field": 1, "label": 0, "val_fraction": 0.2},
        checkpoint={"every": 4, "keep": 2})


def _seq2seq_resume_plan(directory: Path, lr: float | str = 0.05, epochs: int = 2,
                         model: dict[str, Any] | None = None) -> dict[str, Any]:
    pairs = _slice(ENG_FRA, directory, 300)
    return _plan([
        {"name": "adam", "task": "seq2seq", "optimizer": {"name": "adam", "lr": 3e-3}, "batch": {"size": 32},
         "epochs": epochs},
        {"name": "sgd", "task": "seq2seq", "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9,
                                                         "handoff": "convert"},
         "batch": {"size": 32}, "epochs": 1, "eval": {"beam": 2}},
    ], model or {**TRANSFORMER, "dropout": 0.1}, {"kind": "word"},
        {"train": pairs.name, "source": 0, "target": 1, "val_fraction": 0.1, "max_len": 16},
        checkpoint={"every": 3, "keep": 2})


def _t5_resume_plan(directory: Path) -> dict[str, Any]:
    return _seq2seq_resume_plan(directory, model=T5)


def _ulmfit_resume_plan(directory: Path) -> dict[str, Any]:
    _messages(directory / "messages.tsv", 200)
    return _plan([
        {"name": "lm", "optimizer": {"name": "adamw", "lr": 3e-3}, "batch": {"size": 8, "block_size": 32},
         "steps": 12},
        {"name": "cls", "task": "classify", "optimizer": {"name": "adamw", "lr": 1e-2}, "schedule": {"name": "stlr"},
         "batch": {"size": 16}, "epochs": 3, "layers": {"unfreeze": "gradual", "lr_factor": 2.6},
         "eval": {"each_epoch": True}},
    ], GPT, {"kind": "char"}, {"train": "messages.tsv", "field": 1, "label": 0, "val_fraction": 0.2, "max_len": 32},
        checkpoint={"every": 4, "keep": 2})


def _logged(run_dir: Path) -> list[dict[str, Any]]:
    """Every metrics line without its wall-clock throughput (ex_per_s / tok_per_s)."""
    return [{k: v for k, v in m.items() if k not in ("ex_per_s", "tok_per_s")}
            for m in read_jsonl(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("make_plan,stops", [(_classify_resume_plan, (7, 37)), (_seq2seq_resume_plan, (5, 22)),
                                             (_t5_resume_plan, (5, 22)), (_ulmfit_resume_plan, (5, 26))],
                         ids=["classify", "seq2seq", "t5-seq2seq", "lm-then-gradual-classify"])
def test_interrupted_example_stages_resume_bit_identically(tmp_path: Path, make_plan: Callable[[Path], dict],
                                                           stops: tuple[int, int]) -> None:
    plan = make_plan(tmp_path)
    path = write_plan(tmp_path, plan)
    straight = prepare(load_plan(path), path, tmp_path / "cache-straight")
    train(straight, tmp_path / "straight", console=QUIET)
    first, second = straight.resolved
    # one stop inside the first stage, one inside the second (neither on a checkpoint's step)
    assert 0 < stops[0] < first.steps and first.steps < stops[1] < first.steps + second.steps
    every = plan["checkpoint"]["every"]
    assert stops[0] % every and (stops[1] - first.steps) % every

    out, cache = tmp_path / "resumed", tmp_path / "cache-resumed"
    for stop in stops:
        with pytest.raises(RunStopped, match=f"plan step {stop}\\)"):
            train(prepare(load_plan(path), path, cache), out, console=QUIET, stop_after=stop)
    resumed = prepare(load_plan(path), path, cache)  # as a new process would build it
    train(resumed, out, console=QUIET)

    assert [e["step"] for e in _events(out, "stage_resumed")] == list(stops)
    assert state_difference(straight, resumed) is None  # weights and optimizer state, every stage
    assert _logged(out) == _logged(tmp_path / "straight")  # every loss, grad norm, LR and metric
    for stage in (first.name, second.name):
        a = load_file(tmp_path / "straight" / "stages" / stage / "model.safetensors")
        b = load_file(out / "stages" / stage / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_inside_an_lr_auto_stage(tmp_path: Path) -> None:
    # on resume the SWATS LR comes from the stage's own checkpoint, not from its parent's
    path = write_plan(tmp_path, _seq2seq_resume_plan(tmp_path, lr="auto", epochs=1))
    straight = prepare(load_plan(path), path, tmp_path / "cache-straight")
    train(straight, tmp_path / "straight", console=QUIET)
    assert [e["stage"] for e in _events(tmp_path / "straight", "lr_auto")] == ["sgd"]
    out, cache = tmp_path / "resumed", tmp_path / "cache-resumed"
    with pytest.raises(RunStopped, match=r"at step 4 of stage 'sgd'"):
        train(prepare(load_plan(path), path, cache), out, console=QUIET, stop_after=straight.resolved[0].steps + 4)
    resumed = prepare(load_plan(path), path, cache)
    train(resumed, out, console=QUIET)
    assert state_difference(straight, resumed) is None
    assert _logged(out) == _logged(tmp_path / "straight")


def test_verify_resume_command_on_a_classify_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the example tasks' wall-clock throughput (ex_per_s) is not part of the comparison
    path = write_plan(tmp_path, _classify_resume_plan(tmp_path))
    assert main(["verify-resume", str(path), "--steps", "6"]) == 0, capsys.readouterr().out
    assert "resume is exact" in capsys.readouterr().out


# --- 4. seq2seq and sft -----------------------------------------------------------------------------


def test_seq2seq_stage_beats_copying_the_source(tmp_path: Path) -> None:
    pairs = _slice(ENG_FRA, tmp_path, 1500)
    plan = _plan([{"name": "adam", "task": "seq2seq", "optimizer": {"name": "adam", "lr": 5e-3},
                   "batch": {"size": 32}, "epochs": 14}],
                 {**TRANSFORMER, "dropout": 0.1}, {"kind": "word"},
                 {"train": pairs.name, "source": 0, "target": 1, "val_fraction": 0.1, "max_len": 16})
    run_dir, prepared, summaries = _run(tmp_path, plan)
    # the baseline: the validation sources themselves as translations (the same seeded split)
    _, val = split_records(read_pairs(pairs, 0, 1), 0.1, 0)
    sources, references = [s for s, _ in val], [t for _, t in val]
    assert list(prepared.stages[0].setup.data.val.references) == references
    copy_bleu, copy_chrf = bleu(sources, references), chrf(sources, references)
    final = summaries[0].metrics
    assert set(final) == {"val_loss", "val_bleu", "val_chrf"}
    assert final["val_bleu"] > copy_bleu + 2.0, (final, copy_bleu)
    assert final["val_chrf"] > copy_chrf + 10.0, (final, copy_chrf)
    assert _evals(run_dir, "adam")[-1]["val_bleu"] == final["val_bleu"]
    exported = json.loads((run_dir / "stages/adam/model.json").read_text())
    assert exported["task"] == "seq2seq" and (run_dir / "stages/adam/target_tokenizer.json").is_file()


def _word_reversal(path: Path, n: int) -> Path:
    """seq2seq rows: 3 to 6 words of a..j, and the same words in reverse order (copying the
    source scores a BLEU of about 13)."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        words = [rng.choice("abcdefghij") for _ in range(rng.randint(3, 6))]
        rows.append(f"{' '.join(words)}\t{' '.join(reversed(words))}\n")
    path.write_text("".join(rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("model", [T5, BART], ids=["t5", "bart"])
def test_transformers_encoder_decoder_learns_and_exports(tmp_path: Path, model: dict[str, Any],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pairs = _word_reversal(tmp_path / "reverse.tsv", 800)
    plan = _plan([{"name": "adam", "task": "seq2seq", "optimizer": {"name": "adam", "lr": 5e-3},
                   "batch": {"size": 32}, "epochs": 20}],
                 model, {"kind": "word"}, {"train": pairs.name, "source": 0, "target": 1, "max_len": 16})
    run_dir, prepared, summaries = _run(tmp_path, plan)
    _, val = split_records(read_pairs(pairs, 0, 1), 0.1, 0)
    copy_bleu = bleu([s for s, _ in val], [t for _, t in val])
    final = summaries[0].metrics
    assert final["val_bleu"] > copy_bleu + 15, (final, copy_bleu)

    # the export is a transformers directory: same logits from AutoModelForSeq2SeqLM, same ids
    # from AutoTokenizer, and its generate config decodes as the run did
    setup = prepared.stages[0].setup
    export = run_dir / "stages" / "adam"
    loaded = AutoModelForSeq2SeqLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    src, tgt_in, _ = setup.data.val.rows(torch.arange(8))
    setup.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=src, attention_mask=src != 0, decoder_input_ids=tgt_in).logits,
                           setup.model(input_ids=src, attention_mask=src != 0, decoder_input_ids=tgt_in).logits)
    assert tokenizer(val[0][0], add_special_tokens=False)["input_ids"] == setup.data.src_tokenizer.encode(
        val[0][0], add_special_tokens=False).ids
    assert loaded.generation_config.decoder_start_token_id == setup.data.bos_id

    # `stagewise evaluate` on the validation rows gives the run's final metrics
    val_file = tmp_path / "val.tsv"
    val_file.write_text("".join(f"{s}\t{t}\n" for s, t in val), encoding="utf-8")
    assert main(["evaluate", str(run_dir), "--data", str(val_file), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["bleu"] == pytest.approx(final["val_bleu"]) and metrics["examples"] == len(val)


def test_sft_after_causal_lm_lowers_the_completion_loss(tmp_path: Path, corpus: Path) -> None:
    reversal_file(tmp_path / "reverse.jsonl", 600)
    plan = tiny_plan(corpus, [
        {"name": "lm", "optimizer": {"name": "adamw", "lr": 3e-3}, "batch": {"size": 16, "block_size": 32},
         "steps": 40},
        {"name": "sft", "task": "sft", "data": {"train": "reverse.jsonl", "val_fraction": 0.15, "max_len": 24},
         "optimizer": {"name": "adamw", "lr": 3e-3}, "batch": {"size": 32}, "steps": 150},
    ], model=GPT, seed=0)
    run_dir, prepared, summaries = _run(tmp_path, plan)
    assert prepared.stages[1].setup.model is prepared.stages[0].setup.model  # sft trains the LM itself: no new head
    assert not prepared.stages[1].setup.head and not _events(run_dir, "head_attached")
    # the LM's own loss on the completions, before the sft stage: its exported final weights
    lm = AutoModelForCausalLM.from_pretrained(run_dir / "stages/lm")
    before = evaluate_sft(lm, prepared.stages[1].setup.data.val, 64, torch.device("cpu"))["val_loss"]
    after = summaries[1].val_loss
    assert set(summaries[1].metrics) == {"val_loss", "val_ppl"}
    assert after < 0.6 * before, (before, after)
    assert summaries[1].unit == "examples" and summaries[1].tokens == 150 * 32
    sft_start = next(e for e in _events(run_dir, "stage_start") if e["stage"] == "sft")
    assert sft_start["task"] == "sft" and sft_start["parent"] == "lm"


# --- 5. tag -----------------------------------------------------------------------------------------


# bert from scratch learns the cue words more slowly than the BiGRU (and not at all with dropout
# in this few data): more epochs at a lower LR
@pytest.mark.parametrize("model,lr,epochs", [({"arch": "bigru", "embed_dim": 16, "hidden": 16}, 1e-2, 8),
                                             (BERT, 3e-3, 40)], ids=["bigru", "bert"])
def test_tag_stage_finds_spans_by_context(tmp_path: Path, model: dict[str, Any], lr: float, epochs: int) -> None:
    conll_file(tmp_path / "train.conll", 400, 0)
    conll_file(tmp_path / "val.conll", 80, 1)
    plan = _plan([{"name": "adam", "task": "tag", "optimizer": {"name": "adam", "lr": lr},
                   "batch": {"size": 16}, "epochs": epochs}],
                 model, {"kind": "word"}, {"train": "train.conll", "val": "val.conll"})
    run_dir, prepared, summaries = _run(tmp_path, plan)
    data = prepared.stages[0].setup.data
    gold = [[data.tag_map.decode(t) for t in row[row != -100].tolist()] for row in data.val.tags]
    # baselines: all O, and each word's most frequent training tag (names are PER and LOC alike)
    counts: dict[str, dict[str, int]] = {}
    for words, tags in _readconll_file(tmp_path / "train.conll"):
        for word, tag in zip(words, tags, strict=True):
            counts.setdefault(word, {}).setdefault(tag, 0)
            counts[word][tag] += 1
    by_word = [[max(counts[w], key=lambda t: (counts[w][t], t)) if w in counts else "O" for w in words]
               for words, _ in _readconll_file(tmp_path / "val.conll")]
    assert span_f1([["O"] * len(g) for g in gold], gold) == 0.0
    word_baseline = span_f1(by_word, gold)
    final = summaries[0].metrics
    assert set(final) == {"val_loss", "val_span_f1"}
    assert final["val_span_f1"] > max(0.8, word_baseline + 0.2), (final, word_baseline)
    assert _evals(run_dir, "adam")[-1]["val_span_f1"] == final["val_span_f1"]
    if model["arch"] == "bert":  # a transformers tagger exports as AutoModelForTokenClassification loads it
        loaded = AutoModelForTokenClassification.from_pretrained(run_dir / "stages" / "adam").eval()
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "stages" / "adam")
        words = ["Mr", *TAG_NAMES[0].split(), "went", "in"]
        ids = tokenizer(words, is_split_into_words=True, add_special_tokens=False, return_tensors="pt")
        assert ids["input_ids"][0].tolist() == data.vocab.encode(words, is_pretokenized=True).ids
        trained = prepared.stages[0].setup.model.eval()
        with torch.no_grad():
            assert torch.equal(loaded(**ids).logits, trained(**ids).logits)
        assert list(loaded.config.id2label.values()) == list(data.tag_map.labels)


def _readconll_file(path: Path) -> list[tuple[list[str], list[str]]]:
    sentences = []
    for block in path.read_text(encoding="utf-8").strip().split("\n\n"):
        pairs = [line.split() for line in block.splitlines()]
        sentences.append(([p[0] for p in pairs], [p[-1] for p in pairs]))
    return sentences


# --- 6. plans that mix tasks wrongly: one line, exit 2 ------------------------------------------------

ADAM = {"name": "adam", "lr": 1e-3}
CLASSIFY_DATA = {"train": "messages.tsv", "field": 1, "label": 0}


def _label_on_lm_plan(d: Path, corpus: Path) -> dict[str, Any]:
    plan = tiny_plan(corpus, [{"name": "lm", "optimizer": ADAM, "steps": 2}])
    plan["data"]["label"] = "label"
    return plan


def _classify_after_seq2seq(d: Path, corpus: Path) -> dict[str, Any]:
    (d / "pairs.tsv").write_text("".join(f"go {i} now\tva {i} !\n" for i in range(20)), encoding="utf-8")
    return _plan([{"name": "mt", "task": "seq2seq", "optimizer": ADAM, "batch": {"size": 4}, "steps": 2},
                  {"name": "cls", "task": "classify", "data": CLASSIFY_DATA, "batch": {"size": 4}, "steps": 2}],
                 TRANSFORMER, {"kind": "word"}, {"train": "pairs.tsv", "source": 0, "target": 1})


def _carry_into_head(d: Path, corpus: Path) -> dict[str, Any]:
    return _plan([{"name": "lm", "optimizer": ADAM, "batch": {"size": 4, "block_size": 16}, "steps": 2},
                  {"name": "cls", "task": "classify", "optimizer": {"handoff": "carry"}, "batch": {"size": 4},
                   "steps": 2}],
                 GPT, {"kind": "char"}, CLASSIFY_DATA)


def _classify_stage(**stage: Any) -> Callable[[Path, Path], dict[str, Any]]:
    def build(d: Path, corpus: Path) -> dict[str, Any]:
        return _plan([{"name": "cls", "task": "classify", "optimizer": ADAM, "batch": {"size": 4}, **stage}],
                     BIGRU, {"kind": "word"}, CLASSIFY_DATA)
    return build


def _freeze_typo(d: Path, corpus: Path) -> dict[str, Any]:
    return _plan([{"name": "a", "task": "classify", "optimizer": ADAM, "batch": {"size": 4}, "steps": 2},
                  {"name": "b", "task": "classify", "layers": {"freeze": ["embedding.*"]}, "batch": {"size": 4},
                   "steps": 2}],
                 BIGRU, {"kind": "word"}, CLASSIFY_DATA)


def _unseen_val_label(d: Path, corpus: Path) -> dict[str, Any]:
    (d / "val.tsv").write_text("ham\tsee you at home\neggs\tnot a label\nspam\twin cash\n", encoding="utf-8")
    return _plan([{"name": "cls", "task": "classify", "optimizer": ADAM, "batch": {"size": 4}, "steps": 2}],
                 BIGRU, {"kind": "word"}, {**CLASSIFY_DATA, "val": "val.tsv"})


def _word_tokenizer_gpt2(d: Path, corpus: Path) -> dict[str, Any]:
    return tiny_plan(corpus, [{"name": "lm", "optimizer": ADAM, "steps": 2}], tokenizer={"kind": "word"})


def _parquet_classify(d: Path, corpus: Path) -> dict[str, Any]:
    return _plan([{"name": "cls", "task": "classify", "optimizer": ADAM, "batch": {"size": 4}, "steps": 2}],
                 BIGRU, {"kind": "word"}, {**CLASSIFY_DATA, "format": "parquet"})


def _seq2seq_model(model: dict[str, Any]) -> Callable[[Path, Path], dict[str, Any]]:
    def build(d: Path, corpus: Path) -> dict[str, Any]:
        _word_reversal(d / "pairs.tsv", 20)
        return _plan([{"name": "mt", "task": "seq2seq", "optimizer": ADAM, "batch": {"size": 4}, "steps": 2}],
                     model, {"kind": "word"}, {"train": "pairs.tsv", "source": 0, "target": 1})
    return build


# (builder, the whole stderr line: {plan} is the plan file, {dir} its directory; exact or a prefix)
BAD_TASK_PLANS = {
    "label-on-causal-lm": (_label_on_lm_plan, "error: {plan}: data.label: not used by task causal_lm\n", True),
    "classify-after-seq2seq": (
        _classify_after_seq2seq,
        "error: {plan}: stages[1].task: a classify stage cannot follow a seq2seq stage (a classify model can be "
        "built from: classify, causal_lm, sft)\n", True),
    "carry-into-new-head": (
        _carry_into_head,
        "error: {plan}: stages[1].optimizer.handoff: carry needs the parent's model; this stage trains a new head "
        "(use reset)\n", True),
    "tokens-on-classify": (
        _classify_stage(tokens=1000),
        "error: {plan}: stages[0].tokens: task classify counts examples: give steps or epochs\n", True),
    "block-size-on-classify": (
        _classify_stage(steps=2, batch={"size": 4, "block_size": 32}),
        "error: {plan}: stages[0].batch.block_size: not used by task classify (data.max_len cuts its examples)\n",
        True),
    "freeze-matches-nothing": (
        _freeze_typo,
        "error: {plan}: stages[1].layers.freeze[0]: 'embedding.*' matches no parameter of the model (e.g. "
        "embed.weight, gru.weight_ih_l0, gru.weight_hh_l0)\n", True),
    "parquet-classify": (
        _parquet_classify,
        "error: {plan}: data.format: a classify stage reads csv, tsv or jsonl files: format auto or csv or tsv or "
        "json (got 'parquet')\n", True),
    "gpt2-seq2seq": (
        _seq2seq_model(GPT),
        "error: {plan}: model.arch: task seq2seq trains the built-in transformer or a transformers t5 or bart from "
        "config (got 'gpt2')\n", True),
    "t5-vocab-size": (
        _seq2seq_model({**T5, "vocab_size": 100}),
        "error: {plan}: model.vocab_size: set by the stage's data, not by the plan\n", True),
    "unseen-validation-label": (
        _unseen_val_label,
        "error: {plan}: data.val: {dir}/val.tsv:2: label 'eggs' is not one of the training labels (ham, spam)\n",
        True),
    "word-tokenizer-gpt2-causal-lm": (_word_tokenizer_gpt2, "error: {plan}: tokenizer.kind: ", False),
}


@pytest.mark.parametrize("case", list(BAD_TASK_PLANS))
def test_bad_task_plans_are_one_line_exit_2(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str],
                                            case: str) -> None:
    build, expected, exact = BAD_TASK_PLANS[case]
    _messages(tmp_path / "messages.tsv", 40)
    path = write_plan(tmp_path, build(tmp_path, corpus))
    code = main(["check", str(path), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    line = expected.format(plan=path, dir=tmp_path)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err == line if exact else err.startswith(line), err
    if case == "word-tokenizer-gpt2-causal-lm":
        assert "word" in err


def test_data_format_reads_a_table_whatever_its_extension(tmp_path: Path) -> None:
    _messages(tmp_path / "messages.txt", 40)  # tab-separated, named .txt
    plan = _plan([{"name": "cls", "task": "classify", "optimizer": ADAM, "batch": {"size": 4}, "steps": 2}],
                 BIGRU, {"kind": "word"}, {**CLASSIFY_DATA, "train": "messages.txt"})
    _, prepared = _prepare(tmp_path, {**plan, "data": {**plan["data"], "format": "tsv"}})
    assert len(prepared.stages[0].setup.data.train) + len(prepared.stages[0].setup.data.val) == 40
    with pytest.raises(UserError, match=r"cannot tell the format from the extension .\.txt."):
        _prepare(tmp_path, plan, "no-format")


def test_a_freeze_typo_stops_train_before_anything_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _messages(tmp_path / "messages.tsv", 40)
    path = write_plan(tmp_path, _freeze_typo(tmp_path, tmp_path))
    out = tmp_path / "run"
    code = main(["train", str(path), "--out", str(out), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"error: {path}: stages[1].layers.freeze[0]: 'embedding.*' matches no parameter of the model "
                   "(e.g. embed.weight, gru.weight_ih_l0, gru.weight_hh_l0)\n")
    # found before the first update, as every other plan error is
    trained = [e["stage"] for e in _events(out, "stage_end")] if (out / "events.jsonl").exists() else []
    assert trained == [], f"stages trained before the plan error was found: {trained}"
