"""Chat: the plan's chat_template (built-in, Jinja string, file, a pretrained tokenizer's own) used
by sft training on plan-level `messages` data, by evaluation and by `generate --chat`, which
replies and stops at the template's end marker; an sft model trained to emit EOS stops there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import write_plan

from stagewise.cli import main
from stagewise.errors import UserError
from stagewise.tasks.chat import DEFAULT, ChatTemplate, directory_template, plan_template

INTENTS = {"hello": "hi there", "bye": "see you", "thanks": "welcome"}
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _dialogues(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        said = list(INTENTS)[i % len(INTENTS)]
        rows.append({"messages": [{"role": "user", "content": said}, {"role": "assistant", "content": INTENTS[said]}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _plan(data: Path, **top: Any) -> dict[str, Any]:
    return {"name": "chat", "seed": 0, "precision": "fp32",
            "model": {"arch": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 48, "n_positions": 48},
            "tokenizer": {"kind": "char"}, "data": {"train": str(data), "max_len": 48},
            "log": {"every": 50},
            "stages": [{"name": "chat", "task": "sft", "optimizer": {"name": "adamw", "lr": 1e-2},
                        "batch": {"size": 16}, "steps": 120, "eval": {"metrics": ["exact_match"]}}], **top}


def test_the_default_template_is_the_documented_format() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]
    assert ChatTemplate().render(messages, add_generation_prompt=False) == \
        "<|system|>\nS\n<|user|>\nU\n<|assistant|>\nA<|end|>\n"
    assert ChatTemplate().split(messages, "x") == ("<|system|>\nS\n<|user|>\nU\n<|assistant|>\n", "A<|end|>\n")
    readme = (Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "fine-tune-pretrained.md").read_text(encoding="utf-8")
    assert "<|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}<|end|>\\n" in readme


def test_the_plan_key_takes_a_string_a_file_or_the_pretrained_tokenizers_template(tmp_path: Path) -> None:
    assert plan_template(None, tmp_path, None, {}).source == DEFAULT
    assert plan_template(CHATML, tmp_path, None, {}).end_marker == "<|im_end|>"
    (tmp_path / "t.jinja").write_text(CHATML, encoding="utf-8")
    assert plan_template("t.jinja", tmp_path, None, {}).source == CHATML
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}), encoding="utf-8")
    assert directory_template(tok_dir) == CHATML
    assert plan_template("pretrained", tmp_path, "tok", {}).source == CHATML
    with pytest.raises(UserError, match=r"^chat_template: pretrained is the pretrained tokenizer's template"):
        plan_template("pretrained", tmp_path, None, {})
    with pytest.raises(UserError, match=r"^chat_template: no such file: .*nope.jinja"):
        plan_template("nope.jinja", tmp_path, None, {})


def test_a_template_that_changes_earlier_turns_is_refused_by_row(tmp_path: Path) -> None:
    moving = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}"
                          "{{ '!' }}{% endif %}")
    with pytest.raises(UserError, match=r"^d.jsonl:3: the chat template renders the conversation without its last "
                                        r"turn"):
        moving.split([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "d.jsonl:3")


def test_sft_reads_plan_level_messages_and_chat_generate_stops_at_the_end_marker(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dialogues(tmp_path / "dlg_train.jsonl", 240)
    path = write_plan(tmp_path, _plan(data))
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--cache", str(tmp_path / "cache")]) == 0
    capsys.readouterr()
    final = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"eval"' in line][-1]
    assert final["val_exact_match"] == 100.0, final  # every greedy reply right (the most frequent one: 33.3)
    assert (run / "stages/chat/chat_template.jinja").read_text(encoding="utf-8") == DEFAULT

    assert main(["generate", str(run), "--user", "bye", "--temperature", "0", "--max-tokens", "40"]) == 0
    assert capsys.readouterr().out == "see you\n"  # the reply, cut at <|end|>: no runaway into a new turn
    # A plain prompt continues until the end marker, and stops there.
    assert main(["generate", str(run), "--prompt", "<|user|>\nthanks\n<|assistant|>\n", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "<|user|>\nthanks\n<|assistant|>\nwelcome\n"
    # A --stop string ends it earlier; the conversation may come from a JSON file.
    (tmp_path / "c.json").write_text(json.dumps([{"role": "user", "content": "hello"}]), encoding="utf-8")
    assert main(["generate", str(run), "--chat", str(tmp_path / "c.json"), "--temperature", "0", "--stop", "re"]) == 0
    assert capsys.readouterr().out == "hi the\n"
    # The model emits EOS after the end marker: with the marker's stop out of the way (a template
    # without one), generation ends at EOS, long before the 200 tokens it may take.
    (run / "stages/chat/chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert main(["generate", str(run), "--prompt", "<|user|>\nbye\n<|assistant|>\n", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "<|user|>\nbye\n<|assistant|>\nsee you<|end|>\n\n"

    # Unknown symbols of a prompt are one line on stderr, not a silent loss.
    assert main(["generate", str(run), "--prompt", "hello?", "--max-tokens", "2"]) == 0
    assert "warning: --prompt: 1 symbol of the prompt unknown to the tokenizer, encoded as its unknown token " \
           "('?' x1)" in capsys.readouterr().err


def test_bad_chat_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dialogues(tmp_path / "d.jsonl", 30)
    path = write_plan(tmp_path, _plan(data, chat_template="{% for m in messages %}"))
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: chat_template: not a valid Jinja template: ")
    path = write_plan(tmp_path, _plan(data, chat_template="pretrained"))
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 2
    assert "chat_template: pretrained is the pretrained tokenizer's template" in capsys.readouterr().err


def test_unknown_symbols_of_fine_tuning_data_are_reported_in_one_line(tmp_path: Path, corpus: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An sft stage after a char-level LM: characters its pretraining text never had are counted."""
    rows = [{"prompt": "Where is Lima?", "completion": " Perú {ok}"}, {"prompt": "Hi", "completion": " there"}] * 10
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    plan = {"name": "u", "seed": 0, "model": {"arch": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16,
                                              "n_positions": 32},
            "tokenizer": {"kind": "char"}, "data": {"train": str(corpus)},
            "defaults": {"batch": {"size": 4}, "optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 1},
            "stages": [{"name": "lm"}, {"name": "sft", "task": "sft", "data": {"train": str(tmp_path / "qa.jsonl")}}]}
    path = write_plan(tmp_path, plan)
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    assert "warning: stages[1].data: 30 symbols of the 20 sft examples unknown to the tokenizer, encoded as its " \
           "unknown token ('ú' x10, '{' x10, '}' x10)\n" in err, err


@pytest.mark.parametrize(("template", "says"), [
    ("{% for i in range(10**9) %}{% endfor %}", "failed on {data}:1: OverflowError: Range too big. The sandbox blocks"),
    ("{{ 'ab' * 10**9 }}", "failed on {data}:1: the sandbox blocks strings and lists longer than 1000000"),
    ("{{ 2**100000000 }}", "failed on {data}:1: the sandbox blocks powers above 1024"),
    ("{{ messages[0].nope.deeper }}", "failed on {data}:1: 'dict object' has no attribute 'nope'"),
    ("{{ 1 / 0 }}", "failed on {data}:1: ZeroDivisionError: division by zero"),
    ("{{ messages[0].content + 1 }}", "failed on {data}:1: TypeError: can only concatenate str"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "failed on {data}:1: RecursionError: maximum recursion"),
    ("{{ raise_exception('no system role') }}", "failed on {data}:1: no system role"),
    ("{{ ''.__class__.__mro__ }}", "failed on {data}:1: access to attribute '__class__' of 'str' object is unsafe"),
    ("{% for m in messages %}{{ m.content }", "not a valid Jinja template: unexpected '}'"),
], ids=["range", "repeat", "power", "undefined", "zero-division", "type", "recursion", "raise", "unsafe", "syntax"])
def test_every_chat_template_error_is_one_line_naming_the_plan_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], template: str, says: str) -> None:
    data = _dialogues(tmp_path / "d.jsonl", 30)
    path = write_plan(tmp_path, _plan(data, chat_template=template))
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: chat_template: the template {says.format(data=data)}"
                          if says.startswith("failed") else f"error: {path}: chat_template: {says}"), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_template_file_that_fails_is_named_with_the_plan_key(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = _dialogues(tmp_path / "d.jsonl", 30)
    (tmp_path / "t.jinja").write_text("{{ undefined_thing.x }}", encoding="utf-8")
    path = write_plan(tmp_path, _plan(data, chat_template="t.jinja"))
    assert main(["check", str(path), "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == (f"error: {path}: chat_template: the template ({tmp_path / 't.jinja'}) failed on "
                                       f"{data}:1: 'undefined_thing' is undefined\n")
