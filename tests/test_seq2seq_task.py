"""The seq2seq task with the built-in Transformer: trained on a slice of English-French, it
beats copying the source on BLEU and chrF, greedy and beam."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHARED, fit

from stagewise.models.transformer_seq2seq import TransformerSeq2Seq
from stagewise.tasks.batches import ExampleFiles, ExampleSampler
from stagewise.tasks.metrics import bleu, chrf
from stagewise.tasks.seq2seq import detokenize, evaluate_seq2seq, prepare_seq2seq, seq2seq_loss

ENG_FRA = SHARED / "eng_fra.tsv"


def test_detokenize_joins_what_written_text_joins() -> None:
    assert detokenize("l ' homme est là , non .") == "l'homme est là, non."
    assert detokenize("Va !") == "Va !"


@pytest.mark.skipif(not ENG_FRA.exists(), reason="shared/data/eng_fra.tsv is not here")
def test_transformer_beats_copying_the_source(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(ENG_FRA.read_text(encoding="utf-8").splitlines(keepends=True)[:1500]), encoding="utf-8")
    data = prepare_seq2seq(ExampleFiles(path, val_fraction=0.1, seed=0), 0, 1)
    sources = [detokenize(data.src_tokenizer.decode(row.tolist(), skip_special_tokens=True)) for row in data.val.src]
    references = list(data.val.references)
    copy_bleu, copy_chrf = bleu(sources, references), chrf(sources, references)
    torch.manual_seed(0)
    model = TransformerSeq2Seq(data.src_tokenizer.get_vocab_size(), data.tgt_tokenizer.get_vocab_size(), d_model=64,
                               nhead=8, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128)
    fit(model, ExampleSampler(data.train, batch_size=32, seed=0), seq2seq_loss, epochs=10, lr=1e-3)
    greedy = evaluate_seq2seq(model, data, 128, torch.device("cpu"), max_len=20)
    beam = evaluate_seq2seq(model, data, 128, torch.device("cpu"), max_len=20, beam=3)
    for metrics in (greedy, beam):
        assert metrics["val_bleu"] > copy_bleu + 1.0, (metrics, copy_bleu)
        assert metrics["val_chrf"] > copy_chrf + 10.0, (metrics, copy_chrf)
    assert beam["val_loss"] == greedy["val_loss"]  # decoding does not change the teacher-forced loss
