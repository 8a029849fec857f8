"""Fine-tuning task building blocks: record readers, label maps, metrics, encoders, task models."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models

from stagewise.errors import UserError
from stagewise.models.bigru import BiGRUClassifier
from stagewise.models.transformer_seq2seq import TransformerSeq2Seq, sinusoids, until_eos
from stagewise.tasks.chat import ChatTemplate
from stagewise.tasks.encode import IGNORE, encode_classification, encode_seq2seq, encode_sft, encode_tagging
from stagewise.tasks.labels import LabelMap
from stagewise.tasks.metrics import accuracy, bleu, chrf, macro_f1, span_f1, span_scores, spans
from stagewise.tasks.readers import Records, read_conll, read_labeled, read_pairs, read_prompt_completion
from stagewise.tasks.vocab import PAD_ID, UNK_ID, word_tokenizer, word_vocab

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")
    return path


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    return path


def char_tokenizer(alphabet: str, specials: tuple[str, ...] = ("<eos>",)) -> Tokenizer:
    """One token per character (id = position in `alphabet`), then the special tokens."""
    vocab = {c: i for i, c in enumerate([*alphabet, *specials])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(specials))
    return tok


# --- read_labeled / read_pairs -------------------------------------------------------------------


def test_tsv_without_header_keeps_quotes_and_line_numbers(tmp_path):
    path = write(tmp_path / "d.tsv", 'ham\tHe said "hi", then left\r\n\nspam\tWIN \x1c now\nham\t"quoted"\n')
    records = read_labeled(path, text_field=1, label_field=0)
    assert records == [('He said "hi", then left', "ham"), ("WIN \x1c now", "spam"), ('"quoted"', "ham")]
    assert isinstance(records, Records) and records.lines == [1, 3, 4]
    assert records.where(1) == f"{path}:3"


def test_csv_with_header_reads_quoted_cells_across_lines(tmp_path):
    path = write(tmp_path / "d.csv", 'id,text,label\n1,"hello, world",pos\n2,"two\nlines",neg\n3,plain,pos\n')
    records = read_labeled(path, "text", "label")
    assert records == [("hello, world", "pos"), ("two\nlines", "neg"), ("plain", "pos")]
    assert records.lines == [2, 3, 5]


def test_jsonl_by_name_and_by_index(tmp_path):
    named = write(tmp_path / "d.jsonl", jsonl({"text": "good", "label": 1}, {"label": "0", "text": "bad"}))
    assert read_labeled(named, "text", "label") == [("good", "1"), ("bad", "0")]  # an int label is its string
    arrays = write(tmp_path / "a.data", jsonl(["Hi.", "Salut.", "x"], ["Run!", "Cours !", "y"]))
    assert read_pairs(arrays, 0, 1, fmt="jsonl") == [("Hi.", "Salut."), ("Run!", "Cours !")]


def test_shared_sms_spam_loads_every_row():
    records = read_labeled(shared("sms_spam.tsv"), text_field=1, label_field=0)
    assert len(records) == 5574
    assert {label for _, label in records} == {"ham", "spam"}
    assert sum(label == "spam" for _, label in records) == 747  # the data README's count
    assert records[0][0].startswith("Go until jurong point")


def test_shared_eng_fra_loads_every_pair():
    path = shared("eng_fra.tsv")
    pairs = read_pairs(path, 0, 1)
    assert len(pairs) == 5000
    assert pairs[0] == ("Go.", "Va !")
    # the same pairs as the csv module reads them as TSV without quoting (en, fr, attribution)
    rows = csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline=""), delimiter="\t",
                      quoting=csv.QUOTE_NONE)
    assert pairs == [(en, fr) for en, fr, _ in rows]


BAD_TABLES = [
    # (file name, content, fields, expected message; {p} is the path)
    ("d.csv", "text,label\n", ("text", "label"), r"^{p}: no records \(only a header\)$"),
    ("d.csv", "text,label\nhi,a\n", ("body", "label"), r"^{p}:1: no column 'body' \(header: text, label\)$"),
    ("d.csv", "text,text\nhi,a\n", ("text", "label"), r"^{p}:1: column 'text' appears twice in the header$"),
    ("d.tsv", "a\tb\n", (2, 0), r"^{p}:1: no column 2: the row has 2 columns \(numbered from 0\)$"),
    ("d.tsv", "ham\tok\nspam\tone\ttab too many\n", (1, 0), r"^{p}:2: 3 columns, expected 2 \(as on line 1\)$"),
    ("d.csv", "text,label\nhi,a\nlonely\n", ("text", "label"), r"^{p}:3: 1 column, expected 2 \(as on line 1\)$"),
    ("d.tsv", "ham\tok\nspam\t   \n", (1, 0), r"^{p}:2: empty text in column 1$"),
    ("d.csv", "text,label\nhi,\n", ("text", "label"), r"^{p}:2: empty label in 'label'$"),
    ("d.csv", 'text,label\n"open,a\n', ("text", "label"), r"^{p}:2: cannot read as CSV: unexpected end of data$"),
    ("d.tsv", "a\tb\n", ("text", 0), r"^{p}: fields must both be column names .* got 'text' and 0$"),
    ("d.tsv", "a\tb\n", (-1, 0), r"^{p}: column indices start at 0, got -1$"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b",\n', ("text", "label"),
     r"^{p}:2: not valid JSON: Expecting property name enclosed in double quotes \(column 14\)$"),
    ("d.jsonl", '["a", "x"]\n', ("text", "label"), r"^{p}:1: expected a JSON object, got an array$"),
    ("d.jsonl", jsonl({"text": "a"}), ("text", "label"), r"^{p}:1: no field 'label' \(fields: text\)$"),
    ("d.jsonl", jsonl({"text": 3, "label": "x"}), ("text", "label"),
     r"^{p}:1: text in 'text' is a number \(3\), not a string$"),
    ("d.jsonl", jsonl({"text": "a", "label": None}), ("text", "label"),
     r"^{p}:1: label in 'label' is null, not a string$"),
    ("d.jsonl", jsonl(["a"]), (0, 1), r"^{p}:1: no item 1: the array has 1 item \(numbered from 0\)$"),
    ("d.txt", "a\tb\n", (1, 0), r"^{p}: cannot tell the format from the extension '.txt' \(expected .csv, .tsv "
                                r"or .jsonl\); set the format$"),
]


@pytest.mark.parametrize(("name", "content", "fields", "message"), BAD_TABLES)
def test_bad_tables_are_one_line_errors(tmp_path, name, content, fields, message):
    path = write(tmp_path / name, content)
    with pytest.raises(UserError, match=message.replace("{p}", str(path).replace("\\", "\\\\"))) as e:
        read_labeled(path, *fields)
    assert "\n" not in str(e.value)


def test_unreadable_files_are_one_line_errors(tmp_path):
    cases = [
        (tmp_path / "missing.tsv", None, r"missing.tsv: no such file$"),
        (tmp_path / "empty.tsv", b"", r"empty.tsv: empty file$"),
        (tmp_path / "blank.tsv", b"\n  \n", r"blank.tsv: empty file \(only whitespace\)$"),
        (tmp_path / "latin1.tsv", b"ham\tok\nham\tcaf\xe9\n",
         r"latin1.tsv:2: not UTF-8: byte 0xe9 at offset 14 \(invalid continuation byte\)$"),
    ]
    for path, content, message in cases:
        if content is not None:
            write(path, content)
        with pytest.raises(UserError, match=message):
            read_labeled(path, 1, 0)
    (tmp_path / "dir.tsv").mkdir()
    with pytest.raises(UserError, match=r"dir.tsv: is a directory, not a file$"):
        read_pairs(tmp_path / "dir.tsv", 0, 1)
    with pytest.raises(UserError, match=r"x.tsv: unknown format 'parquet' \(expected csv, tsv, jsonl\)$"):
        read_pairs(tmp_path / "x.tsv", 0, 1, fmt="parquet")


def test_byte_order_mark_is_not_part_of_the_header(tmp_path):
    path = write(tmp_path / "d.csv", "\ufefftext,label\nhi,a\n")
    assert read_labeled(path, "text", "label") == [("hi", "a")]


# --- read_conll ----------------------------------------------------------------------------------


def test_conll_sentences_tags_and_docstart(tmp_path):
    path = write(tmp_path / "d.conll", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
                                       "German JJ B-NP B-MISC\n\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER")
    records = read_conll(path)
    assert records == [(["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"]),
                       (["Peter", "Blackburn"], ["B-PER", "I-PER"])]
    assert records.lines == [3, 8]


def test_conll_errors(tmp_path):
    one_column = write(tmp_path / "a.conll", "EU B-ORG\nrejects\n")
    with pytest.raises(UserError, match=r"a.conll:2: expected a token and a tag separated by whitespace, "
                                        r"got 'rejects'$"):
        read_conll(one_column)
    only_docstart = write(tmp_path / "b.conll", "-DOCSTART- O\n\n")
    with pytest.raises(UserError, match=r"b.conll: no sentences \(only -DOCSTART- lines\)$"):
        read_conll(only_docstart)


# --- read_prompt_completion ----------------------------------------------------------------------


def test_prompt_completion_rows_are_used_as_they_are(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl({"prompt": "2+2=", "completion": "4"}, {"prompt": "", "completion": "hi"}))
    assert read_prompt_completion(path) == [("2+2=", "4"), ("", "hi")]


def test_messages_render_with_the_template_up_to_the_last_assistant_turn(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {name}"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    path = write(tmp_path / "d.jsonl", jsonl({"messages": messages}))
    template = ChatTemplate("{% for m in messages %}{{ '[' + m.role[0] | upper + ']' + m.content }}"
                            "{% if m.role == 'assistant' %}[END]{% endif %}{{ '\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}[A]{% endif %}")
    [(prompt, completion)] = read_prompt_completion(path, template)
    assert prompt == "[S]Be brief.\n[U]Hi {name}\n[A]Hello.[END]\n[U]2+2?\n[A]"
    assert completion == "4[END]\n"
    default_prompt, _ = read_prompt_completion(path)[0]
    assert default_prompt.endswith("<|user|>\n2+2?\n<|assistant|>\n")


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
     r":1: messages\[1\].role: unknown role \"tool\" \(expected system, user, assistant\)$"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
     r":1: messages must end with an assistant turn \(the last is 'user'\)$"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     r":1: messages\[1\].content: empty completion$"),
    ({"messages": [{"role": "user"}]}, r":1: messages\[0\]: no field 'content'$"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, r":1: messages\[0\].content: an array, not a string$"),
    ({"messages": []}, r":1: 'messages' must be a non-empty list of \{role, content\} objects$"),
    ({"messages": [], "prompt": "x"}, r":1: has both 'messages' and 'prompt'/'completion'; use one$"),
    ({"prompt": "x"}, r":1: no field 'completion' \(fields: prompt\)$"),
    ({"prompt": "x", "completion": ""}, r":1: empty completion in 'completion'$"),
    ({"text": "x"}, r":1: expected 'prompt' and 'completion' fields or a 'messages' list \(fields: text\)$"),
])
def test_bad_prompt_completion_rows(tmp_path, row, message):
    path = write(tmp_path / "d.jsonl", jsonl(row))
    with pytest.raises(UserError, match=message):
        read_prompt_completion(path)


def test_a_broken_chat_template_is_one_line():
    with pytest.raises(UserError, match=r"^chat_template: not a valid Jinja template: .* \(line 1\)$"):
        ChatTemplate("{% for m in messages %}{{ m.content }}")


# --- LabelMap ------------------------------------------------------------------------------------


def test_label_map_ids_are_sorted_ranks_and_unseen_labels_name_the_row(tmp_path):
    labels = LabelMap.from_labels(["spam", "ham", "spam"])
    assert labels.labels == ("ham", "spam") and len(labels) == 2
    assert labels.encode("spam", "x") == 1 and labels.decode(0) == "ham"
    with pytest.raises(UserError, match=r"^val.tsv:3: label 'foo' is not one of the training labels \(ham, spam\)$"):
        labels.encode("foo", "val.tsv:3")
    assert labels.encode_many(["spam", "ham", "ham"], str).tolist() == [1, 0, 0]
    with pytest.raises(UserError, match=r"^row 2: label 'zzz' is not"):
        labels.encode_many(["ham", "spam", "zzz"], lambda i: f"row {i}")
    with pytest.raises(UserError, match=r"label 'a' is not one of the training labels \(b, c, d"):
        LabelMap.from_labels("bcd").encode_many(["a"], str)  # before the first label: searchsorted's 0
    many = LabelMap.from_labels(f"c{i:02d}" for i in range(13))
    with pytest.raises(UserError, match=r"\(c00, c01, .*, c09 and 3 more\)$"):
        many.encode("x", "f")


def test_label_map_round_trips_and_refuses_bad_saved_maps():
    labels = LabelMap.from_labels(["B-PER", "O", "I-PER"], kind="tag")
    assert LabelMap.from_json(labels.to_json(), "labels.json") == labels
    assert LabelMap.from_state_dict(labels.state_dict(), "x") == labels
    with pytest.raises(UserError, match=r"^labels.json: 'labels' must be sorted and unique"):
        LabelMap.from_state_dict({"labels": ["b", "a"]}, "labels.json")
    with pytest.raises(UserError, match=r"^labels.json: not a label map"):
        LabelMap.from_json("[1, 2]", "labels.json")
    with pytest.raises(UserError, match=r"^labels.json: not valid JSON"):
        LabelMap.from_json("{", "labels.json")
    with pytest.raises(UserError, match=r"^f:2: tag 'B-LOC' is not one of the training tags"):
        labels.encode("B-LOC", "f:2")


# --- metrics -------------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_by_hand():
    predictions, references = ["a", "a", "b", "c"], ["a", "b", "b", "b"]
    assert accuracy(predictions, references) == 0.5
    # a: tp 1, 2 predicted, 1 true -> 2/3; b: tp 1, 1 predicted, 3 true -> 2/4; c: predicted only -> 0
    assert macro_f1(predictions, references) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # A class in neither list does not count; ints and tensors work as well as strings.
    assert macro_f1(torch.tensor([0, 0, 1, 1]), [0, 1, 1, 1]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert macro_f1([1, 1], [1, 1]) == 1.0
    with pytest.raises(ValueError, match="equally long"):
        accuracy([1], [1, 2])


def test_span_f1_counts_only_exact_typed_spans():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC"],  # PER cut short: wrong; LOC right
            ["B-ORG", "I-ORG", "I-ORG"]]  # right
    scores = span_scores(pred, gold)
    assert (scores.correct, scores.predicted, scores.reference) == (2, 3, 3)
    assert scores.f1 == pytest.approx(2 / 3)
    assert span_f1([["B-PER", "I-LOC"]], [["B-PER", "I-PER"]]) == 0.0  # a type change splits the span
    assert span_f1([["O", "O"]], [["O", "O"]]) == 0.0  # no spans at all: 0, as conlleval prints


def test_spans_follow_conlleval_for_stray_i_tags():
    assert spans(["I-PER", "I-PER", "O", "B-LOC", "I-LOC", "B-LOC", "I-ORG"]) == [
        (0, 2, "PER"), (3, 5, "LOC"), (5, 6, "LOC"), (6, 7, "ORG")]
    assert span_f1([["I-PER", "I-PER", "O"]], [["B-PER", "I-PER", "O"]]) == 1.0


def test_bleu_and_chrf():
    refs = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert chrf(refs, refs) == pytest.approx(100.0)
    assert bleu(["xyz uvw rst opq", "lmn ijk"], refs) == pytest.approx(0.0, abs=1e-6)
    assert chrf(["xyz uvw rst opq", "lmn ijk"], refs) < 5
    assert 0 < bleu(["the cat sat on a mat", "a quick brown fox jumps over a lazy dog"], refs) < 100


# --- encoders ------------------------------------------------------------------------------------

TOK = char_tokenizer("abcdefghij")
EOS = TOK.token_to_id("<eos>")


def ids(text: str) -> list[int]:
    return TOK.encode(text).ids


def test_sft_labels_mask_exactly_the_prompt_and_padding():
    input_ids, labels, _ = encode_sft([("ab", "cd"), ("e", "fghi")], TOK, EOS, max_len=16, pack=False)
    m = IGNORE
    assert input_ids.tolist() == [[*ids("abcd"), EOS, EOS], [*ids("efghi"), EOS]]
    assert labels.tolist() == [[m, m, *ids("cd"), EOS, m], [m, *ids("fghi"), EOS]]
    assert input_ids.dtype == labels.dtype == torch.int64


def test_sft_truncation_keeps_the_prompt_end_and_the_completion():
    input_ids, labels, _ = encode_sft([("abcdefgh", "ij")], TOK, EOS, max_len=6, pack=False)
    assert input_ids.tolist() == [[*ids("fghij"), EOS]]
    assert labels.tolist() == [[IGNORE, IGNORE, IGNORE, *ids("ij"), EOS]]
    # A completion that would leave the prompt less than half the row is cut at its end.
    input_ids, labels, _ = encode_sft([("abcdef", "ghij")], TOK, EOS, max_len=6, pack=False)
    assert input_ids.tolist() == [ids("defghi")]
    assert labels.tolist() == [[IGNORE] * 3 + ids("ghi")]


def test_sft_packing_keeps_every_completion_label():
    pairs = [("ab", "c"), ("d", "efg"), ("hij", "a"), ("b", "cdefghi"), ("j", "j")]
    input_ids, labels, positions = encode_sft(pairs, TOK, EOS, max_len=10, pack=True)
    # Next-fit, in order, never splitting an example: [ab c E d efg E] [hij a E] [b cdefghi E] [j j E]
    assert input_ids.shape == (4, 9)
    m = IGNORE
    assert input_ids[0].tolist() == [*ids("abc"), EOS, *ids("defg"), EOS]
    assert labels[0].tolist() == [m, m, *ids("c"), EOS, m, *ids("efg"), EOS]
    assert input_ids[3].tolist() == [*ids("jj"), EOS] + [EOS] * 6
    assert labels[3].tolist() == [m, *ids("j"), EOS] + [m] * 6
    # Positions restart with each example; the padding after a row's last one goes on counting.
    assert positions is not None and positions.shape == input_ids.shape
    assert positions[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert positions[3].tolist() == list(range(9))
    assert labels[labels != m].tolist() == [t for _, c in pairs for t in [*ids(c), EOS]]
    unpacked = encode_sft(pairs, TOK, EOS, max_len=10, pack=False)[1]
    assert labels[labels != m].tolist() == unpacked[unpacked != m].tolist()


def test_classification_encoding_names_the_row_of_an_unseen_label(tmp_path):
    train = read_labeled(write(tmp_path / "train.tsv", "pos\tabc\nneg\tdefghij\n"), 1, 0)
    labels = LabelMap.from_labels(label for _, label in train)
    input_ids, mask, y = encode_classification(train, TOK, labels, max_len=5, pad_id=EOS)
    assert input_ids.tolist() == [[*ids("abc"), EOS, EOS], ids("defgh")]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert y.tolist() == [1, 0]
    val = read_labeled(write(tmp_path / "val.tsv", "pos\tab\n\nmaybe\tcd\n"), 1, 0)
    with pytest.raises(UserError, match=r"val.tsv:3: label 'maybe' is not one of the training labels \(neg, pos\)$"):
        encode_classification(val, TOK, labels, max_len=5, pad_id=EOS)
    with pytest.raises(UserError, match=r"^record 1: the text has no tokens"):
        encode_classification([("???", "pos")], TOK, labels, max_len=5, pad_id=EOS)


def test_encoders_ignore_a_tokenizer_s_own_padding_and_leave_it_as_it_was():
    tok = char_tokenizer("abc", ("<pad>", "<eos>"))
    tok.enable_padding(pad_id=3, pad_token="<pad>", length=8)
    input_ids, _, _ = encode_classification([("ab", "x")], tok, LabelMap.from_labels(["x"]), max_len=4, pad_id=3)
    assert input_ids.tolist() == [[0, 1]]
    assert tok.padding is not None and tok.padding["length"] == 8


def test_seq2seq_encoding_shifts_the_target():
    src_tok = char_tokenizer("abcdef", ("<pad>",))
    tgt_tok = char_tokenizer("abcdefghij", ("<pad>", "<bos>", "<eos>"))
    pad, bos, eos = 10, 11, 12
    src, tgt_in, tgt_out = encode_seq2seq([("abc", "ab"), ("d", "cdefg")], src_tok, tgt_tok, max_len=5,
                                          pad_id=pad, bos_id=bos, eos_id=eos)
    assert src.tolist() == [[0, 1, 2], [3, pad, pad]]
    assert tgt_in.tolist() == [[bos, 0, 1, pad, pad], [bos, 2, 3, 4, 5]]
    assert tgt_out.tolist() == [[0, 1, eos, IGNORE, IGNORE], [2, 3, 4, 5, 6]]  # cut: no EOS


def test_tagging_encoding_maps_words_and_names_the_line_of_an_unseen_tag(tmp_path):
    train = read_conll(write(tmp_path / "train.conll", "Peter B-PER\nruns O\n\nin O\nParis B-LOC\n"))
    vocab = word_vocab(words for words, _ in train)
    assert vocab.token_to_id("<|pad|>") == PAD_ID and vocab.token_to_id("<|unk|>") == UNK_ID
    tags = LabelMap.from_labels((t for _, ts in train for t in ts), kind="tag")
    input_ids, mask, y = encode_tagging([(["Peter", "in", "Rome"], ["B-PER", "O", "B-LOC"]), (["runs"], ["O"])],
                                        vocab, tags, max_len=8)
    assert input_ids[0, 2] == UNK_ID and input_ids[1].tolist() == [vocab.token_to_id("runs"), PAD_ID, PAD_ID]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert y.tolist() == [[tags.encode(t, "") for t in ["B-PER", "O", "B-LOC"]], [tags.encode("O", ""), IGNORE, IGNORE]]
    val = read_conll(write(tmp_path / "val.conll", "-DOCSTART- O\n\nU.S. B-LOC\n\nSmith B-PER\nsaid O\nno B-MISC\n"))
    with pytest.raises(UserError, match=r"val.conll:7: tag 'B-MISC' is not one of the training tags "
                                        r"\(B-LOC, B-PER, O\)$"):
        encode_tagging(val, vocab, tags, max_len=8)


def test_word_tokenizer_is_lowercase_with_punctuation_tokens():
    tok = word_tokenizer(["Free prize!!", "free lunch"], vocab_size=5)
    vocab = tok.get_vocab()
    assert vocab["<|pad|>"] == PAD_ID and vocab["<|unk|>"] == UNK_ID and len(vocab) == 5
    assert (vocab["!"], vocab["free"], vocab["lunch"]) == (2, 3, 4)  # most frequent first, ties A-Z
    assert tok.encode("FREE lunch!").ids == [3, 4, 2]
    assert tok.encode("free prize").ids == [3, UNK_ID]  # "prize" did not make the cut


def test_sms_spam_encodes_for_the_bigru():
    records = read_labeled(shared("sms_spam.tsv"), text_field=1, label_field=0)
    tok = word_tokenizer(text for text, _ in records)
    assert tok.get_vocab_size() <= 10_000
    input_ids, mask, y = encode_classification(records, tok, LabelMap.from_labels(["ham", "spam"]), 100, PAD_ID)
    assert input_ids.shape == mask.shape and input_ids.shape[0] == 5574 and input_ids.shape[1] <= 100
    assert int(y.sum()) == 747 and int(mask.sum(1).min()) >= 1


# --- BiGRU classifier ----------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two, and it does not slow to a crawl when
    another process holds a core (OpenMP threads spin-waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SPAM = ["win a free prize now", "free cash call now", "claim your prize today", "urgent you won cash",
        "free entry win now", "call now to claim cash"]
HAM = ["see you at lunch", "are we still on for tonight", "i will call you later", "thanks for the book",
       "lunch at noon then", "see you later tonight"]


def test_bigru_overfits_a_tiny_dataset_and_ignores_padding():
    torch.manual_seed(0)
    pairs = [(t, "spam") for t in SPAM] + [(t, "ham") for t in HAM]
    tok = word_tokenizer(t for t, _ in pairs)
    input_ids, mask, y = encode_classification(pairs, tok, LabelMap.from_labels(["ham", "spam"]), 32, PAD_ID)
    model = BiGRUClassifier(num_classes=2, vocab_size=tok.get_vocab_size())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(input_ids, mask), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    logits = model(input_ids, mask)
    assert logits.shape == (12, 2)
    assert accuracy(logits.argmax(1), y) == 1.0
    extra = torch.zeros(12, 7, dtype=torch.int64)
    padded = model(torch.cat([input_ids, extra], 1), torch.cat([mask, extra], 1))
    assert torch.allclose(logits, padded, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no tokens"):
        model(input_ids, torch.zeros_like(mask))


# --- Transformer seq2seq -------------------------------------------------------------------------

PAD, BOS, STOP, VOCAB = 0, 1, 2, 12


def copy_data(n: int, seed: int) -> tuple[torch.Tensor, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 7, (n,), generator=g).tolist()
    rows = [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lengths]
    src = torch.full((n, 6), PAD)
    for i, row in enumerate(rows):
        src[i, : len(row)] = torch.tensor(row)
    return src, rows


@pytest.fixture(scope="module")
def copier() -> tuple[TransformerSeq2Seq, torch.Tensor, list[list[int]]]:
    torch.manual_seed(0)
    src, rows = copy_data(64, seed=0)
    tgt_in = torch.cat([torch.full((64, 1), BOS), src], 1)
    tgt_out = torch.full_like(tgt_in, IGNORE)
    for i, row in enumerate(rows):
        tgt_out[i, : len(row) + 1] = torch.tensor([*row, STOP])
    model = TransformerSeq2Seq(VOCAB, VOCAB, d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                               dim_feedforward=128, dropout=0.0, pad_id=PAD)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), src, rows


def test_seq2seq_learns_to_copy(copier):
    model, src, rows = copier
    out = model.greedy(src, max_len=8, bos=BOS, eos=STOP)
    assert until_eos(out, STOP) == rows
    assert out.shape == (64, 7)  # the longest copy (6) and its EOS


def test_beam_of_one_is_greedy_and_a_wider_beam_still_copies(copier):
    model, src, rows = copier
    greedy = model.greedy(src, max_len=8, bos=BOS, eos=STOP)
    assert torch.equal(model.beam_search(src, beam=1, max_len=8, bos=BOS, eos=STOP), greedy)
    assert until_eos(model.beam_search(src, beam=4, max_len=8, bos=BOS, eos=STOP, length_penalty=1.0), STOP) == rows
    # Cut short by max_len: both give the same unfinished prefixes.
    short = model.greedy(src, max_len=3, bos=BOS, eos=STOP)
    assert short.tolist() == [row[:3] for row in rows]
    assert torch.equal(model.beam_search(src, beam=1, max_len=3, bos=BOS, eos=STOP), short)


def test_seq2seq_logits_ignore_padding(copier):
    model, src, _ = copier
    tgt_in = torch.cat([torch.full((64, 1), BOS), src], 1)
    logits = model(src, tgt_in)
    assert logits.shape == (64, 7, VOCAB)
    more = model(torch.cat([src, torch.zeros(64, 3, dtype=torch.int64)], 1),
                 torch.cat([tgt_in, torch.zeros(64, 2, dtype=torch.int64)], 1))
    real = tgt_in != PAD
    assert torch.allclose(logits[real], more[:, :7][real], atol=1e-5)


def bigram_model(probabilities: dict[int, dict[int, float]]) -> TransformerSeq2Seq:
    """A model whose next-token distribution depends only on the last token (and not on the
    source): decoding logic on hand-computable numbers."""
    table = torch.full((5, 5), 1e-9)
    for last, nexts in probabilities.items():
        for token, p in nexts.items():
            table[last, token] = p
    model = TransformerSeq2Seq(5, 5, d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                               dim_feedforward=8, pad_id=PAD)
    model.encode = lambda src: (torch.zeros(src.size(0), 1, 8), torch.zeros(src.size(0), 1, dtype=torch.bool))
    model.decode = lambda tgt_in, memory, src_pad: table[tgt_in].log()
    return model


def test_beam_search_finds_what_greedy_misses():
    """The likeliest first token leads nowhere: greedy takes A (0.5), then A forever; a beam of 2
    finds B EOS (0.4 * 0.9 = 0.36, more than anything through A)."""
    A, B = 3, 4
    model = bigram_model({BOS: {STOP: 0.1, A: 0.5, B: 0.4}, A: {STOP: 0.3, A: 0.4, B: 0.3},
                          B: {STOP: 0.9, A: 0.05, B: 0.05}})
    src = torch.ones(2, 1, dtype=torch.int64)
    assert model.greedy(src, max_len=4, bos=BOS, eos=STOP).tolist() == [[A, A, A, A]] * 2
    assert model.beam_search(src, beam=1, max_len=4, bos=BOS, eos=STOP).tolist() == [[A, A, A, A]] * 2
    for penalty in (0.0, 1.0):
        assert model.beam_search(src, beam=2, max_len=4, bos=BOS, eos=STOP,
                                 length_penalty=penalty).tolist() == [[B, STOP]] * 2


def test_length_penalty_decides_between_short_and_long():
    """EOS at once: log 0.5 = -0.69. A then EOS: log(0.4 * 0.8) = -1.14 in total, -0.57 per token.
    Raw totals pick the short one; per-token means (length_penalty=1) the long one."""
    A = 3
    model = bigram_model({BOS: {STOP: 0.5, A: 0.4, 4: 0.1}, A: {STOP: 0.8, A: 0.1, 4: 0.1}})
    src = torch.ones(1, 1, dtype=torch.int64)
    assert model.beam_search(src, beam=2, max_len=5, bos=BOS, eos=STOP, length_penalty=0.0).tolist() == [[STOP]]
    assert model.beam_search(src, beam=2, max_len=5, bos=BOS, eos=STOP, length_penalty=1.0).tolist() == [[A, STOP]]


def test_sinusoids_and_bad_decoding_arguments():
    table = sinusoids(10, 6)
    assert table.shape == (10, 6) and table[0].tolist() == [0, 1, 0, 1, 0, 1]
    assert math.isclose(float(table[3, 0]), math.sin(3), rel_tol=1e-6)
    model = TransformerSeq2Seq(5, 5, d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, pad_id=PAD)
    src = torch.ones(1, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="beam must be in"):
        model.beam_search(src, beam=6, max_len=4, bos=BOS, eos=STOP)
    with pytest.raises(ValueError, match="must be different tokens"):
        model.greedy(src, max_len=4, bos=BOS, eos=PAD)
