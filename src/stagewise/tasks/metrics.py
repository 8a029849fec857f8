"""Evaluation metrics for fine-tuning tasks.

Arguments are always `(predictions, references)`, in that order (sacrebleu's and HF evaluate's
order; sklearn's is the reverse). Classification and tagging scores are fractions in [0, 1];
BLEU and chrF are on sacrebleu's 0-100 scale, as they are everywhere reported.
"""

from __future__ import annotations

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
