"""Evaluation metrics for fine-tuning tasks.

Arguments are always `(predictions, references)`, in that order (sacrebleu's and HF evaluate's
order; sklearn's is the reverse). Classification and tagging scores are fractions in [0, 1];
the scores of decoded texts (BLEU, chrF, ROUGE, exact match, token F1) are on a 0-100 scale, as
they are everywhere reported (sacrebleu, summarization papers, SQuAD's script).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def accuracy(predictions: Sequence[Hashable] | Any, references: Sequence[Hashable] | Any) -> float:
    """Fraction of predictions equal to their reference (lists, arrays or CPU tensors)."""
    pred, gold = _paired(predictions, references)
    return float(np.mean(pred == gold))


def macro_f1(predictions: Sequence[Hashable] | Any, references: Sequence[Hashable] | Any) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in the references or the
    predictions, as sklearn's `f1_score(y_true, y_pred, average="macro")` computes it (labels
    unset, zero_division=0). A class that is predicted but never true, or true but never
    predicted, has F1 0 and counts; a class of the label map that occurs in neither does not
    count (it has no errors to score, and counting it as 0 would punish a small eval set for not
    holding every class)."""
    pred, gold = _paired(predictions, references)
    classes, ids = np.unique(np.concatenate([pred, gold]), return_inverse=True)
    pred_ids, gold_ids = ids[: len(pred)], ids[len(pred):]
    n = len(classes)
    true_pos = np.bincount(gold_ids[pred_ids == gold_ids], minlength=n)
    # F1 = 2tp / (2tp + fp + fn), and 2tp + fp + fn = (#predicted) + (#true): never 0 here.
    f1 = 2 * true_pos / (np.bincount(pred_ids, minlength=n) + np.bincount(gold_ids, minlength=n))
    return float(f1.mean())


def _paired(predictions: Any, references: Any) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = np.asarray(predictions), np.asarray(references)
    if pred.ndim != 1 or pred.shape != gold.shape:
        raise ValueError(f"predictions and references must be 1-d and equally long "
                         f"(got shapes {pred.shape} and {gold.shape})")
    if len(pred) == 0:
        raise ValueError("no predictions to score")
    return pred, gold


# --- typed spans (NER, chunking) ---------------------------------------------------------------


@dataclass(frozen=True)
class SpanScores:
    precision: float
    recall: float
    f1: float
    correct: int  # predicted spans that exactly match a reference span (start, end, type)
    predicted: int
    reference: int


def span_scores(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> SpanScores:
    """conlleval's chunk scores over sentences of tags (B-X/I-X/O, i.e. IOB2 or IOB1; E-X/S-X
    are read as conlleval reads them). A span counts only when its start, end and type all
    match: a partly right span is one false positive and one false negative. As in conlleval,
    an I-X that does not continue a span of type X starts one, and each sentence's end ends any
    open span. A score with a zero denominator is 0, as conlleval prints it."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predicted sentences for {len(references)} references")
    predicted: set[tuple[int, int, int, str]] = set()
    reference: set[tuple[int, int, int, str]] = set()
    for n, (pred, gold) in enumerate(zip(predictions, references, strict=True)):
        if len(pred) != len(gold):
            raise ValueError(f"sentence {n}: {len(pred)} predicted tags for {len(gold)} references")
        predicted.update((n, *span) for span in spans(pred))
        reference.update((n, *span) for span in spans(gold))
    correct = len(predicted & reference)
    precision = correct / len(predicted) if predicted else 0.0
    recall = correct / len(reference) if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return SpanScores(precision, recall, f1, correct, len(predicted), len(reference))


def span_f1(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """conlleval's overall F1 (see span_scores), as a fraction."""
    return span_scores(predictions, references).f1


def spans(tags: Sequence[str]) -> list[tuple[int, int, str]]:
    """The (start, end exclusive, type) spans of one sentence, by conlleval's startOfChunk and
    endOfChunk rules (a tag without a '-' has type '')."""
    found: list[tuple[int, int, str]] = []
    start: int | None = None
    prev_tag, prev_type = "O", ""
    for i, label in enumerate([*tags, "O"]):  # the trailing O closes a span open at the end
        tag, _, type_ = label.partition("-")
        if start is not None and _ends(prev_tag, tag, prev_type, type_):
            found.append((start, i, prev_type))
            start = None
        if _starts(prev_tag, tag, prev_type, type_):
            start = i
        prev_tag, prev_type = tag, type_
    return found


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in ("E", "S", "]", "[")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in ("B", "S", "[", "]")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


# --- translation -------------------------------------------------------------------------------


def bleu(predictions: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> float:
    """Corpus BLEU (sacrebleu, one reference per prediction, its default 13a tokenization)."""
    import sacrebleu  # imported on use: only translation tasks need it

    _check_texts(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2, no word n-grams)."""
    import sacrebleu

    _check_texts(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def _check_texts(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


# --- summaries and answers ---------------------------------------------------------------------

ROUGE = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[str],
          kinds: Sequence[str] = ROUGE) -> dict[str, float]:
    """Mean ROUGE F-measures (the rouge-score package: Google's reimplementation of ROUGE-1.5.5,
    with its Porter stemmer, as HF evaluate's `rouge` calls it), on a 0-100 scale as summarization
    papers report them. Its tokenizer keeps ASCII letters and digits only: a text of other
    scripts scores 0."""
    from rouge_score import rouge_scorer  # imported on use: only summarization needs it

    _check_texts(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # rouge-score's order: (target, prediction)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    return {kind: 100.0 * total / len(predictions) for kind, total in totals.items()}


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of answers equal to their reference after SQuAD's normalization (0-100)."""
    _check_texts(predictions, references)
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(predictions)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean token-overlap F1 of answers and references after SQuAD's normalization (0-100), as
    SQuAD v1.1's evaluation script computes it: an empty answer and an empty reference agree."""
    _check_texts(predictions, references)
    total = 0.0
    for prediction, reference in zip(predictions, references, strict=True):
        pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
        if not pred or not gold:
            total += float(pred == gold)
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            total += 2 * precision * recall / (precision + recall)
    return 100.0 * total / len(predictions)


# The metrics of decoded texts a task may compute (`eval.metrics`), by name.
TEXT_METRICS = ("bleu", "chrf", *ROUGE, "exact_match", "token_f1")


def text_scores(names: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The named metrics (of TEXT_METRICS) of decoded texts, as `val_<name>`."""
    single = {"bleu": bleu, "chrf": chrf, "exact_match": exact_match, "token_f1": token_f1}
    kinds = [n for n in names if n in ROUGE]
    rouges = rouge(predictions, references, kinds) if kinds else {}
    return {f"val_{n}": rouges[n] if n in ROUGE else single[n](predictions, references) for n in names}
