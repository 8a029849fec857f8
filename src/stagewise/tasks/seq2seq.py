"""The `seq2seq` task for the built-in encoder-decoder (models.transformer_seq2seq.TransformerSeq2Seq) and
transformers' t5 / bart built from config: (source, target) files -> word vocabularies (one per
side; one for both for t5 / bart, whose embeddings are shared) -> teacher-forced batches, their
loss, and validation BLEU / chrF (sacrebleu), or the `eval.metrics` asked for (ROUGE for
summaries, exact match and token F1 for answers), with greedy or beam decoding.

The target vocabulary keeps case (BLEU is case-sensitive); both sides split
off punctuation; a decoded target is joined with spaces and then `detokenize`d (sacrebleu
expects detokenized text, and its 13a tokenizer splits punctuation off again for scoring).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F

from stagewise.config.data_config import DataConfig
from stagewise.config.plan_config import ModelConfig
from stagewise.config.stage_config import StageConfig
from stagewise.data.tables import Field
from stagewise.errors import UserError
from stagewise.models.transformer_seq2seq import TransformerSeq2Seq, until_eos
from stagewise.tasks.base import Batch, ExampleTask, Task
from stagewise.tasks.batches import ExampleFiles
from stagewise.tasks.encode import IGNORE, encode_seq2seq, targets
from stagewise.tasks.export import TrainedStage, auto_tokenizer, load_transformers, save_builtin, save_transformers
from stagewise.tasks.metrics import TEXT_METRICS, text_scores
from stagewise.tasks.models import from_config, root_model
from stagewise.tasks.readers import read_pairs
from stagewise.tasks.spec import GenerateOptions, StageInput, StageSetup, TaskSpec, column
from stagewise.tasks.traits import TaskTraits
from stagewise.tasks.vocab import PAD_ID, word_tokenizer

BOS, EOS = "<|bos|>", "<|eos|>"
MAX_LEN = 64  # tokens per side, and the longest decoded target, when the data sets no max_len
_BEFORE = re.compile(r" ([.,)])")
_APOSTROPHE = re.compile(r" ?' ?")


@dataclass(frozen=True)
class PairRows:
    src: torch.Tensor  # (N, S) PAD-padded
    tgt_in: torch.Tensor  # (N, T) BOS + target, PAD-padded
    tgt_out: torch.Tensor  # (N, T) target + EOS, -100-padded
    references: tuple[str, ...]  # the raw targets, for BLEU / chrF

    def __len__(self) -> int:
        return self.src.size(0)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src, tgt_in, tgt_out = self.src[index], self.tgt_in[index], self.tgt_out[index]
        s = int((src != PAD_ID).sum(dim=1).max())
        t = int(targets(tgt_out).max())
        return src[:, :s], tgt_in[:, :t], tgt_out[:, :t]


@dataclass(frozen=True)
class PairData:
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    bos_id: int
    eos_id: int
    train: PairRows
    val: PairRows


def prepare_seq2seq(files: ExampleFiles, source_field: Field, target_field: Field, *, vocab_size: int = 10_000,
                    shared_vocab: bool = False) -> PairData:
    """`shared_vocab`: one vocabulary of both sides' words (t5, bart), else one per side."""
    train, val = files.split(lambda path: read_pairs(path, source_field, target_field, files.fmt))
    max_len = files.max_len or MAX_LEN
    if shared_vocab:
        src_tok = tgt_tok = word_tokenizer((text for pair in train for text in pair), vocab_size, lowercase=False)
    else:
        src_tok = word_tokenizer((s for s, _ in train), vocab_size, lowercase=False)
        tgt_tok = word_tokenizer((t for _, t in train), vocab_size, lowercase=False)
    tgt_tok.add_special_tokens([BOS, EOS])
    bos, eos = tgt_tok.token_to_id(BOS), tgt_tok.token_to_id(EOS)
    assert bos is not None and eos is not None, "just added"

    def rows(part: list[tuple[str, str]]) -> PairRows:
        tensors = encode_seq2seq(part, src_tok, tgt_tok, max_len, PAD_ID, bos, eos)
        return PairRows(*tensors, tuple(t for _, t in part))
    return PairData(src_tok, tgt_tok, bos, eos, rows(train), rows(val))


def logits_of(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (B, T, V) of the built-in model or a transformers encoder-decoder."""
    if isinstance(model, TransformerSeq2Seq):
        return model(src, tgt_in)
    return model(input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=tgt_in,
                 decoder_attention_mask=tgt_in != PAD_ID, use_cache=False).logits


def decode(model: Any, src: torch.Tensor, max_len: int, bos: int, eos: int, beam: int = 1) -> torch.Tensor:
    """(B, L) generated tokens, EOS then padding ending each row that finished (greedy when beam
    is 1). A transformers model decodes with its own `generate` (its beam search hands a
    finished hypothesis's slot on, see TransformerSeq2Seq.beam_search)."""
    if isinstance(model, TransformerSeq2Seq):
        return model.greedy(src, max_len, bos, eos) if beam == 1 else model.beam_search(src, beam, max_len, bos, eos)
    out = model.generate(input_ids=src, attention_mask=src != PAD_ID, max_new_tokens=max_len, num_beams=beam,
                         do_sample=False, decoder_start_token_id=bos, eos_token_id=eos, pad_token_id=PAD_ID)
    return out[:, 1:]  # (B, 1 + L) from generate: the decoder start token first


def seq2seq_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (and EOS) under teacher forcing."""
    src, tgt_in, tgt_out = batch
    logits = logits_of(model, src, tgt_in).float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt_out.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def translate(model: nn.Module, data: PairData, src: torch.Tensor, max_len: int, beam: int = 1) -> list[str]:
    """Decoded targets as text (greedy when beam is 1)."""
    tokens = decode(model, src, max_len, data.bos_id, data.eos_id, beam)
    texts = data.tgt_tokenizer.decode_batch(until_eos(tokens, data.eos_id), skip_special_tokens=True)
    return [detokenize(text) for text in texts]


def detokenize(text: str) -> str:
    """Undo the word tokenizer's spaces where written text has none: before . , ) and around
    apostrophes ("l ' homme ." -> "l'homme."). French spaces before ! ? : ; stay, as they are
    written so."""
    return _APOSTROPHE.sub("'", _BEFORE.sub(r"\1", text))


DECODED = ("bleu", "chrf")  # what validation scores decoded targets by unless eval.metrics says otherwise


@torch.no_grad()
def evaluate_seq2seq(model: nn.Module, data: PairData, batch_size: int, device: torch.device,
                     max_len: int = MAX_LEN, beam: int = 1, metrics: tuple[str, ...] = DECODED) -> dict[str, float]:
    """val_loss (token-weighted) and the text metrics (val_bleu and val_chrf unless told; ROUGE for
    summaries, exact match and token F1 for answers) of decoded validation sources."""
    was_training = model.training
    model.eval()
    total, count, hypotheses = 0.0, 0, []
    for start in range(0, len(data.val), batch_size):
        src, tgt_in, tgt_out = (t.to(device) for t in data.val.rows(torch.arange(start, min(start + batch_size, len(data.val)))))
        n = int(targets(tgt_out).sum())
        total += seq2seq_loss(model, (src, tgt_in, tgt_out)).item() * n
        count += n
        hypotheses += translate(model, data, src, max_len, beam)
    model.train(was_training)
    references = list(data.val.references)
    return {"val_loss": total / count, **text_scores(metrics, hypotheses, references)}


class Seq2SeqTask(ExampleTask):
    kind = "seq2seq"

    def __init__(self, model: nn.Module, device: torch.device, autocast: Any, data: PairData,
                 beam: int, max_len: int, metrics: tuple[str, ...]) -> None:
        super().__init__(model, device, autocast, data.train, data.src_tokenizer.get_vocab_size())
        self.data, self.beam, self.max_len, self.text_metrics = data, beam, max_len, metrics

    def batch_loss(self, batch: Batch) -> torch.Tensor:
        return seq2seq_loss(self.model, batch)  # type: ignore[arg-type, arg-type]

    def targets(self, batch: Batch) -> torch.Tensor:
        return targets(batch[2])  # tgt_out

    def metrics(self, batch_size: int) -> dict[str, float]:
        return evaluate_seq2seq(self.model, self.data, batch_size, self.device,
                                self.max_len, self.beam, self.text_metrics)


SEQ2SEQ_ARCHS = ("t5", "bart")  # the transformers encoder-decoders tested with the seq2seq task


class Seq2SeqSpec(TaskSpec[PairData]):
    name = "seq2seq"
    traits = TaskTraits(family="seq2seq", metrics=("val_loss", "train_loss", "val_bleu", "val_chrf"),
                        data_keys=frozenset({"source", "target", "max_len"}), reads="csv, tsv or jsonl files",
                        arch_kind="seq2seq", selectable=TEXT_METRICS, decoded=DECODED,
                        formats=("auto", "csv", "tsv", "json"), table_files=True, default_max_len=MAX_LEN,
                        beam_search=True)

    def prepare(self, inp: StageInput) -> tuple[PairData, str]:
        train, val = inp.files()
        digest = inp.digest(self.name, (train, val))
        files = inp.example_files(train, val, self.max_len(inp.config), self.table_format(inp.config, inp.where))
        # t5 and bart embed both sides with one table: one vocabulary of sources and targets
        data = prepare_seq2seq(files, column(inp.config, "source"), column(inp.config, "target"),
                               vocab_size=inp.word_vocab_size, shared_vocab=not self.is_builtin(inp.plan.model))
        return data, digest.hexdigest()

    def root_model(self, cfg: ModelConfig, data: PairData) -> nn.Module:
        def encoder_decoder(arch: str, keys: dict[str, Any]) -> nn.Module:
            """t5 or bart from config, on the shared vocabulary; decoding starts with its BOS and ends
            at its EOS (nothing forced: bart's default forces EOS at the length limit, which the
            built-in decoders do not)."""
            from transformers import AutoModelForSeq2SeqLM

            if arch not in SEQ2SEQ_ARCHS:
                raise UserError("model.arch", f"task seq2seq trains the built-in transformer or a transformers "
                                              f"{' or '.join(SEQ2SEQ_ARCHS)} from config (got '{arch}')")
            assert data.src_tokenizer is data.tgt_tokenizer, "transformers encoder-decoders share one vocabulary"
            return from_config(AutoModelForSeq2SeqLM, arch, keys, vocab_size=data.tgt_tokenizer.get_vocab_size(),
                               pad_token_id=PAD_ID, bos_token_id=data.bos_id, eos_token_id=data.eos_id,
                               decoder_start_token_id=data.bos_id, forced_eos_token_id=None)

        return root_model(cfg, self, self.sizes(data), encoder_decoder)

    @staticmethod
    def sizes(data: PairData) -> dict[str, int]:
        return {"src_vocab_size": data.src_tokenizer.get_vocab_size(),
                "tgt_vocab_size": data.tgt_tokenizer.get_vocab_size()}

    def bind(self, setup: StageSetup[PairData], cfg: StageConfig, data_cfg: DataConfig, device: torch.device,
             autocast: Callable[[], AbstractContextManager[None]], compile: bool) -> Task:
        return Seq2SeqTask(setup.model, device, autocast, setup.data, cfg.eval.beam, self.max_len(data_cfg),
                           tuple(cfg.eval.metrics or DECODED))

    def save(self, setup: StageSetup[PairData], lm_tokenizer: Tokenizer | None, model_cfg: ModelConfig, out: Path) -> None:
        data = setup.data
        if not self.is_builtin(model_cfg):  # t5, bart: one vocabulary for both sides
            save_transformers(setup.model, None, auto_tokenizer(data.tgt_tokenizer, bos_token=BOS, eos_token=EOS), out)
            return
        save_builtin(setup.model, {"task": self.name, "arch": model_cfg.arch, "settings": model_cfg.size_keys(),
                                   "sizes": self.sizes(data), "labels": None, "bos_id": data.bos_id,
                                   "eos_id": data.eos_id},
                     {"source_tokenizer.json": data.src_tokenizer, "target_tokenizer.json": data.tgt_tokenizer}, out)

    def _translator(self, stage: TrainedStage, beam: int) -> tuple[nn.Module, PairData]:
        """The model and its vocabularies, as the PairData decoding takes; its rows are empty (an
        export keeps no data): evaluate_file puts a file's in. `beam`: the search it is for,
        checked here so a bad --beam is one line, not beam_search's ValueError."""
        none = torch.zeros(0, 0, dtype=torch.long)
        empty = PairRows(none, none, none, ())
        model: Any  # a transformers model or the built-in one
        if stage.is_transformers:  # t5, bart: one vocabulary for both sides
            from transformers import AutoModelForSeq2SeqLM

            model, _ = load_transformers(stage.directory, AutoModelForSeq2SeqLM)
            vocab = stage.tokenizer()
            data = PairData(vocab, vocab, model.config.decoder_start_token_id, model.config.eos_token_id, empty, empty)
            size = model.config.vocab_size
        else:
            model, description = stage.builtin()
            data = PairData(stage.tokenizer("source_tokenizer.json"), stage.tokenizer("target_tokenizer.json"),
                            description["bos_id"], description["eos_id"], empty, empty)
            size = model.out.out_features
        if beam > size:
            raise UserError("--beam", f"at most the target vocabulary's {size} tokens (got {beam})")
        return model, data

    def generate(self, stage: TrainedStage, prompt: str, opts: GenerateOptions) -> str:
        """A translation, greedy when beam is 1; at most the data's max_len tokens unless told."""
        model, data = self._translator(stage, opts.beam)
        # The source as encode_seq2seq encodes it: no BOS/EOS, its first max_len tokens.
        src = data.src_tokenizer.encode(prompt, add_special_tokens=False).ids[:stage.max_len]
        return translate(model, data, torch.tensor([src]), opts.max_tokens or stage.max_len, opts.beam)[0]

    def evaluate_file(self, stage: TrainedStage, path: Path, fmt: str | None, beam: int) -> tuple[dict[str, Any], int]:
        records = read_pairs(path, column(stage.data, "source"), column(stage.data, "target"), fmt)
        model, pairs = self._translator(stage, beam)
        rows = PairRows(*encode_seq2seq(records, pairs.src_tokenizer, pairs.tgt_tokenizer, stage.max_len, PAD_ID,
                                        pairs.bos_id, pairs.eos_id), tuple(t for _, t in records))
        metrics = evaluate_seq2seq(model, replace(pairs, val=rows), stage.batch_size, torch.device("cpu"),
                                   stage.max_len, beam, stage.metrics or DECODED)
        return metrics, len(rows)
