"""`stagewise generate / evaluate / export` on runs of every task: tiny runs trained through
`prepare` + `train`, then used the way the CLI is. Evaluating a stage's validation file must give
back the run's own final validation metrics (the file is encoded as training encoded it)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import conll_file, reversal_file, tiny_plan, write_plan
from rich.console import Console

from stagewise.cli import main
from stagewise.engine.prepare_run import Prepared, prepare
from stagewise.engine.run_logs import read_jsonl
from stagewise.engine.run_plan import train
from stagewise.plan.load import load_plan
from stagewise.tasks.seq2seq import detokenize, translate

QUIET = Console(quiet=True)
GPT = {"arch": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64}



def _train(directory: Path, plan: dict[str, Any]) -> tuple[Path, Prepared]:
    path = write_plan(directory, plan)
    prepared = prepare(load_plan(path), path, directory / "cache")
    train(prepared, directory / "run", console=QUIET)
    return directory / "run", prepared


def _final_eval(run: Path, stage: str) -> dict[str, Any]:
    """The stage's last validation metrics as the run logged them, without the `val_` prefix."""
    line = [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "eval" and m["stage"] == stage][-1]
    return {k.removeprefix("val_"): v for k, v in line.items() if k.startswith("val_")}


@torch.no_grad()
def _softmax_by_hand(model: torch.nn.Module, ids: list[int]) -> list[float]:
    """The class probabilities of one unpadded text: the model's logits, softmaxed in Python."""
    out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    logits = getattr(out, "logits", out)[0].tolist()
    exps = [math.exp(v - max(logits)) for v in logits]
    return [e / sum(exps) for e in exps]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _cli_out(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return capsys.readouterr().out.strip()


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one line a bad command prints (exit 2, no traceback)."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    return err[0]


POSITIVE, NEGATIVE = "good great fine lovely".split(), "bad awful poor grim".split()
NEUTRAL = "the film it was is a so".split()


def _reviews(path: Path, n: int, seed: int) -> Path:
    """label<TAB>text, no header: one word of the label's own among neutral ones."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        label = rng.choice(["neg", "pos"])
        words = [rng.choice(POSITIVE if label == "pos" else NEGATIVE)] + rng.choices(NEUTRAL, k=3)
        rng.shuffle(words)
        lines.append(f"{label}\t{' '.join(words)}\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


# --- classify with the built-in BiGRU ----------------------------------------------------------------


@pytest.fixture(scope="module")
def bigru_trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Prepared]:
    root = tmp_path_factory.mktemp("bigru")
    _reviews(root / "train.tsv", 60, 0)
    _reviews(root / "val.tsv", 24, 1)
    plan = {"name": "reviews", "seed": 0, "precision": "fp32",
            "model": {"arch": "bigru", "embed_dim": 8, "hidden": 8, "dense": 8}, "tokenizer": {"kind": "word"},
            "data": {"train": "train.tsv", "val": "val.tsv", "field": 1, "label": 0, "max_len": 8},
            "stages": [{"name": "adam", "task": "classify", "optimizer": {"name": "adam", "lr": 2e-2},
                        "batch": {"size": 16}, "epochs": 4}]}
    return _train(root, plan)


@pytest.fixture(scope="module")
def bigru_run(bigru_trained: tuple[Path, Prepared]) -> Path:
    return bigru_trained[0]


def test_classify_evaluate_reproduces_the_runs_final_metrics(bigru_run: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    val = bigru_run.parent / "val.tsv"
    metrics = _cli_json(capsys, "evaluate", str(bigru_run), "--data", str(val), "--json")
    final = _final_eval(bigru_run, "adam")
    assert set(final) == {"loss", "accuracy", "macro_f1"}
    assert metrics == {"stage": "adam", "task": "classify", **final, "examples": 24}
    text = _cli_out(capsys, "evaluate", str(bigru_run), "--data", str(val))
    assert text == (f"adam on {val}: loss {final['loss']:.4f}, accuracy {final['accuracy']:.4f}, "
                    f"macro_f1 {final['macro_f1']:.4f} (24 examples)")


def test_classify_generate_prints_a_label_and_its_probability(bigru_trained: tuple[Path, Prepared],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    bigru_run, prepared = bigru_trained
    # the model in memory ends on the stage's weights, the ones generate loads from the run
    model, data = prepared.stages[0].setup.model.eval(), prepared.stages[0].setup.data
    for prompt, expected in (("the film was lovely", "pos"), ("so grim", "neg")):
        label, probability = _cli_out(capsys, "generate", str(bigru_run), "--prompt", prompt).split()
        hand = _softmax_by_hand(model, data.tokenizer.encode(prompt).ids[:8])  # the plan's max_len
        assert label == expected == data.label_map.decode(_argmax(hand))
        assert probability == f"({max(hand):.3f})"
    assert _cli_error(capsys, "generate", str(bigru_run), "--prompt", " ") == \
        "error: --prompt: a classify stage needs a text to work on"
    assert _cli_error(capsys, "generate", str(bigru_run), "--prompt", "good", "--beam", "2") == \
        "error: --beam: only seq2seq stages decode with a beam ('adam' is classify)"


def test_bad_classify_files_are_one_line_naming_file_and_row(bigru_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = str(bigru_run)
    missing = tmp_path / "missing.tsv"
    assert _cli_error(capsys, "evaluate", run, "--data", str(missing)) == f"error: {missing}: no such file"
    unseen = tmp_path / "unseen.tsv"
    unseen.write_text("pos\tgood film\nmeh\tit was so so\n", encoding="utf-8")
    assert _cli_error(capsys, "evaluate", run, "--data", str(unseen)) == \
        f"error: {unseen}:2: label 'meh' is not one of the training labels (neg, pos)"
    one_column = tmp_path / "texts.tsv"
    one_column.write_text("good film\n", encoding="utf-8")
    assert _cli_error(capsys, "evaluate", run, "--data", str(one_column)).startswith(
        f"error: {one_column}:1: no column 1")
    unknown = tmp_path / "reviews.txt"
    unknown.write_text("pos\tgood\n", encoding="utf-8")
    assert _cli_error(capsys, "evaluate", run, "--data", str(unknown)).startswith(
        f"error: {unknown}: cannot tell the format")
    assert _cli_json(capsys, "evaluate", run, "--data", str(unknown), "--format", "tsv", "--json")["examples"] == 1
    assert _cli_error(capsys, "evaluate", run, "--data", str(unseen), "--stage", "sgd") == \
        "error: --stage: 'sgd' is not a stage of this run (finished: adam)"


def test_export_of_a_builtin_stage_copies_it_without_the_marker(bigru_run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exported"
    assert main(["export", str(bigru_run), "--stage", "adam", "--to", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((out / "model.json").read_text())["labels"] == ["neg", "pos"]


# --- causal_lm -> sft -> classify on a GPT-2 backbone --------------------------------------------


@pytest.fixture(scope="module")
def gpt_trained(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, Prepared]:
    root = tmp_path_factory.mktemp("gpt")
    reversal_file(root / "reverse.jsonl", 120)
    reversal_file(root / "reverse_val.jsonl", 30)
    _reviews(root / "train.tsv", 60, 0)
    _reviews(root / "val.tsv", 24, 1)
    lm_batch = {"size": 8, "block_size": 32}
    plan = tiny_plan(corpus, [
        {"name": "lm", "optimizer": {"name": "adamw", "lr": 3e-3}, "batch": lm_batch, "steps": 15},
        {"name": "sft", "task": "sft", "data": {"train": "reverse.jsonl", "val": "reverse_val.jsonl", "max_len": 24},
         "optimizer": {"name": "adamw", "lr": 3e-3}, "batch": {"size": 16}, "steps": 15},
        {"name": "cls", "task": "classify", "optimizer": {"name": "adamw", "lr": 3e-3}, "batch": {"size": 16},
         "epochs": 2, "data": {"train": "train.tsv", "val": "val.tsv", "field": 1, "label": 0, "max_len": 32}},
    ], model=GPT, defaults={"eval": {"batches": 2}})
    return _train(root, plan)


def test_sft_and_lm_classifier_evaluate_reproduce_the_runs_final_metrics(gpt_trained: tuple[Path, Prepared],
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    gpt_run, prepared = gpt_trained
    root = str(gpt_run)
    sft = _cli_json(capsys, "evaluate", root, "--stage", "sft", "--data", str(gpt_run.parent / "reverse_val.jsonl"),
                    "--json")
    final = _final_eval(gpt_run, "sft")
    assert sft["loss"] == pytest.approx(final["loss"], rel=1e-6) and sft["examples"] == 30
    assert sft["perplexity"] == pytest.approx(final["ppl"], rel=1e-6)
    cls = _cli_json(capsys, "evaluate", root, "--data", str(gpt_run.parent / "val.tsv"), "--json")
    final = _final_eval(gpt_run, "cls")
    assert cls["stage"] == "cls" and cls["accuracy"] == final["accuracy"] and cls["macro_f1"] == final["macro_f1"]
    assert cls["loss"] == pytest.approx(final["loss"], rel=1e-6)
    label, probability = _cli_out(capsys, "generate", root, "--prompt", "the film was lovely").split()
    cls_setup = prepared.stages[2].setup
    hand = _softmax_by_hand(cls_setup.model.eval(), cls_setup.data.tokenizer.encode("the film was lovely").ids[:32])
    assert (label, probability) == (cls_setup.data.label_map.decode(_argmax(hand)), f"({max(hand):.3f})")
    # the causal LM stage as before: a continuation of the prompt, perplexity of a text file
    continued = _cli_out(capsys, "generate", root, "--stage", "sft", "--prompt", "abc", "--max-tokens", "5")
    assert continued.startswith("abc")
    # a char tokenizer: one token per character (\t too: an unknown one); windows of the model's
    # 64 positions, each predicting its next 64 characters, the tail that fills none left out
    characters = len((gpt_run.parent / "val.tsv").read_text(encoding="utf-8"))
    assert _cli_json(capsys, "evaluate", root, "--stage", "lm", "--data", str(gpt_run.parent / "val.tsv"),
                     "--json")["tokens"] == (characters - 1) // 64 * 64
    bad = gpt_run.parent / "bad.jsonl"
    bad.write_text('{"prompt": "ab", "completion": "ba"}\n{"prompt": "ab"}\n', encoding="utf-8")
    assert _cli_error(capsys, "evaluate", root, "--stage", "sft", "--data", str(bad)) == \
        f"error: {bad}:2: no field 'completion' (fields: prompt)"


# --- seq2seq ----------------------------------------------------------------------------------------

EN_FR = {"one": "un", "two": "deux", "three": "trois", "red": "rouge", "cat": "chat", "dog": "chien",
         "big": "grand", "small": "petit"}


def _pairs(path: Path, n: int, seed: int) -> Path:
    """en,fr CSV with a header: a word-for-word 'translation' of 2-4 words."""
    rng = random.Random(seed)
    lines = ["en,fr"]
    for _ in range(n):
        words = rng.choices(list(EN_FR), k=rng.randint(2, 4))
        lines.append(f"{' '.join(words)},{' '.join(EN_FR[w] for w in words)} .")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Prepared]:
    root = tmp_path_factory.mktemp("seq2seq")
    _pairs(root / "train.csv", 80, 0)
    _pairs(root / "val.csv", 16, 1)
    plan = {"name": "en-fr", "seed": 0, "precision": "fp32",
            "model": {"arch": "transformer", "d_model": 16, "nhead": 2, "num_encoder_layers": 1,
                      "num_decoder_layers": 1, "dim_feedforward": 32, "dropout": 0.0},
            "tokenizer": {"kind": "word"},
            "data": {"train": "train.csv", "val": "val.csv", "source": "en", "target": "fr"},
            "stages": [{"name": "adam", "task": "seq2seq", "optimizer": {"name": "adam", "lr": 1e-2},
                        "batch": {"size": 16}, "epochs": 4}]}
    return _train(root, plan)


def test_seq2seq_evaluate_reproduces_the_runs_final_metrics(seq2seq_run: tuple[Path, Prepared],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = seq2seq_run
    metrics = _cli_json(capsys, "evaluate", str(run), "--data", str(run.parent / "val.csv"), "--json")
    final = _final_eval(run, "adam")
    assert set(final) == {"loss", "bleu", "chrf"}
    assert metrics["loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert (metrics["bleu"], metrics["chrf"], metrics["examples"]) == (final["bleu"], final["chrf"], 16)
    beam = _cli_json(capsys, "evaluate", str(run), "--data", str(run.parent / "val.csv"), "--beam", "3", "--json")
    assert beam["loss"] == metrics["loss"]  # teacher-forced: the beam changes only the decoded text
    wrong = run.parent / "wrong.csv"
    wrong.write_text("english,french\none,un\n", encoding="utf-8")
    assert _cli_error(capsys, "evaluate", str(run), "--data", str(wrong)) == \
        f"error: {wrong}:1: no column 'en' (header: english, french)"


@torch.no_grad()
def _beam_by_hand(model: torch.nn.Module, src: torch.Tensor, k: int, max_len: int, bos: int, eos: int) -> list[int]:
    """Beam search as TransformerSeq2Seq.beam_search documents it (length_penalty 1), one
    hypothesis at a time: each step the k best of every extension of an unfinished hypothesis
    (scored by mean log-probability) and every finished one as it is; the best at the end."""
    beams: list[tuple[list[int], float, bool]] = [([], 0.0, False)]  # (tokens, total log-prob, finished)
    for step in range(1, max_len + 1):
        candidates = []
        for tokens, total, finished in beams:
            if finished:
                candidates.append((total / len(tokens), tokens, total, True))
                continue
            log_probs = model(src, torch.tensor([[bos, *tokens]]))[0, -1].log_softmax(dim=-1).tolist()
            candidates += [((total + lp) / step, [*tokens, t], total + lp, t == eos) for t, lp in enumerate(log_probs)]
        candidates.sort(key=lambda c: -c[0])
        beams = [(tokens, total, finished) for _, tokens, total, finished in candidates[:k]]
        if all(finished for *_, finished in beams):
            break
    return max(beams, key=lambda b: b[1] / len(b[0]))[0]


def test_seq2seq_generate_translates_and_beam_1_is_greedy(seq2seq_run: tuple[Path, Prepared],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run, prepared = seq2seq_run
    model, data = prepared.stages[0].setup.model.eval(), prepared.stages[0].setup.data
    prompt = "two red cats"
    src = torch.tensor([data.src_tokenizer.encode(prompt, add_special_tokens=False).ids])
    # the model in memory ends on the stage's weights: its greedy decoding, and beam search of 1
    greedy = translate(model, data, src, 64)[0]
    assert model.beam_search(src, 1, 64, data.bos_id, data.eos_id).tolist() == \
        model.greedy(src, 64, data.bos_id, data.eos_id).tolist()
    out = _cli_out(capsys, "generate", str(run), "--prompt", prompt, "--beam", "1")
    assert out == greedy and out
    beam = _beam_by_hand(model, src, 4, 64, data.bos_id, data.eos_id)
    assert _cli_out(capsys, "generate", str(run), "--prompt", prompt, "--beam", "4") == \
        detokenize(data.tgt_tokenizer.decode(beam[:-1] if beam[-1] == data.eos_id else beam, skip_special_tokens=True))
    assert _cli_error(capsys, "generate", str(run), "--prompt", prompt, "--beam", "999") == \
        f"error: --beam: at most the target vocabulary's {data.tgt_tokenizer.get_vocab_size()} tokens (got 999)"


# --- tag ----------------------------------------------------------------------------------------------


def test_tag_evaluate_reproduces_the_runs_metrics_and_generate_tags_words(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    conll_file(tmp_path / "train.conll", 60, 0)
    conll_file(tmp_path / "val.conll", 20, 1)
    plan = {"name": "ner", "seed": 0, "precision": "fp32", "model": {"arch": "bigru", "embed_dim": 8, "hidden": 8},
            "tokenizer": {"kind": "word"}, "data": {"train": "train.conll", "val": "val.conll"},
            "stages": [{"name": "adam", "task": "tag", "optimizer": {"name": "adam", "lr": 2e-2},
                        "batch": {"size": 16}, "epochs": 6}]}  # 3 learn no spans yet (span F1 0)
    run, prepared = _train(tmp_path, plan)
    metrics = _cli_json(capsys, "evaluate", str(run), "--data", str(tmp_path / "val.conll"), "--json")
    final = _final_eval(run, "adam")
    assert set(final) == {"loss", "span_f1"} and metrics["sentences"] == 20 and final["span_f1"] > 0.5
    assert metrics["loss"] == pytest.approx(final["loss"], rel=1e-6) and metrics["span_f1"] == final["span_f1"]
    words = "we saw Mr Bob in Paris".split()
    pairs = _cli_out(capsys, "generate", str(run), "--prompt", " ".join(words)).split()
    model, data = prepared.stages[0].setup.model.eval(), prepared.stages[0].setup.data
    ids = data.vocab.encode(words, is_pretokenized=True, add_special_tokens=False).ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0]
    by_hand = [data.tag_map.decode(_argmax(row)) for row in logits.tolist()]  # the model's own argmax
    assert pairs == [f"{word}/{tag}" for word, tag in zip(words, by_hand, strict=True)]
    assert by_hand == ["O", "O", "O", "B-PER", "O", "B-LOC"]  # 'Mr X' is a person, 'in X' a place
    bad = tmp_path / "bad.conll"
    bad.write_text("Mr O\nBob B-ORG\n", encoding="utf-8")
    assert _cli_error(capsys, "evaluate", str(run), "--data", str(bad)).startswith(
        f"error: {bad}:2: tag 'B-ORG' is not one of the training tags")
