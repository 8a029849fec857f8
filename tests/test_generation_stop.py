"""Generation that stops: at an end token, at a stop string, and the one-line reports of symbols
a tokenizer does not know."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagewise.config.plan_config import ModelConfig
from stagewise.data.tokenizers import _char, count_unknown, unknown_report
from stagewise.models.build import build_model
from stagewise.models.generate import Stop, sample
from stagewise.tasks.chat import ChatTemplate
from stagewise.tasks.lm import lm_stop

TOK = _char(["abcdefghij <|end|>\n"])


def _gpt() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt2", n_layer=1, n_head=2, n_embd=16, n_positions=32)
    return build_model(cfg, vocab_size=TOK.get_vocab_size(), eos_id=TOK.token_to_id("<|endoftext|>"), plan_dir=Path("."))


def test_sampling_ends_at_an_end_token_and_cut_removes_it() -> None:
    model, prompt = _gpt(), torch.tensor([TOK.encode("abc").ids])
    free = sample(model, prompt, 10, 32, temperature=0.0)[0, 3:].tolist()
    assert len(free) == 10
    end = free[3]
    first = free.index(end)  # greedy decoding may have met it before position 3
    stop = Stop(frozenset({end}))
    stopped = sample(model, prompt, 10, 32, temperature=0.0, stop=stop)[0, 3:].tolist()
    assert stopped == free[: first + 1]  # the same tokens, up to and with the end token, then no more
    assert stop.cut(stopped) == (free[:first], None)


def test_a_stop_string_ends_generation_and_is_cut_off() -> None:
    def decode(ids: list[int]) -> str:
        return TOK.decode(ids, skip_special_tokens=True)

    ids = TOK.encode("ab<|end|>\ncd").ids
    stop = Stop(frozenset(), ("<|end|>",), decode)
    assert not stop.reached(ids[:4]) and stop.reached(ids[:9])
    assert stop.cut(ids) == (ids, "ab")
    assert Stop(frozenset(), ("zz",), decode).cut(ids) == (ids, "ab<|end|>\ncd")  # never met: all of it


def test_the_chat_templates_end_marker_is_a_token_when_the_tokenizer_has_one() -> None:
    chatml = ChatTemplate("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert ChatTemplate().end_marker == "<|end|>" and chatml.end_marker == "<|im_end|>"

    def encode(text: str) -> list[int]:
        return [99] if text == "<|im_end|>" else TOK.encode(text).ids

    as_token = lm_stop([0, None], encode, str, chatml, ("x",))
    assert as_token.token_ids == {0, 99} and as_token.strings == ("x",)
    as_text = lm_stop([0], lambda text: TOK.encode(text).ids, str, ChatTemplate(), ())
    assert as_text.token_ids == {0} and as_text.strings == ("<|end|>",)


def test_unknown_symbols_are_counted_by_symbol() -> None:
    found = count_unknown(TOK, ["abc?", "é é?"])
    assert found == {"?": 2, "é": 2}
    assert unknown_report(found, "the prompt") == ("4 symbols of the prompt unknown to the tokenizer, encoded as its "
                                                   "unknown token ('?' x2, 'é' x2)")
    assert unknown_report(count_unknown(TOK, ["abc"]), "the prompt") is None


@pytest.mark.parametrize("value", ["abc", ""])
def test_a_tokenizer_without_unknown_token_loses_nothing(value: str) -> None:
    from stagewise.data.tokenizers import _byte_level

    assert not count_unknown(_byte_level(257, []), [value + "é?"])
