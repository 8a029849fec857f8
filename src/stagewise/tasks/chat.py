"""Chat templates: how a conversation (a list of {role, content} messages) becomes the text a
causal LM reads, for training (sft `messages` rows), evaluation and `generate --chat`.

A template is Jinja, as Hugging Face's chat templates are, rendered the way transformers'
`apply_chat_template` renders them: a sandboxed environment (chat templates from a hub are
untrusted code) with `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `tojson`
and the `{% generation %}` tag; `messages`, `add_generation_prompt` and the tokenizer's special
tokens (`bos_token`, `eos_token`) are its variables.

The plan's `chat_template` is a Jinja string, a file with one, or `pretrained`: the template of the
pretrained tokenizer (`tokenizer.path`). Unset, it is DEFAULT:

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}<|end|>\\n

A training example of a conversation is (prompt, completion): the prompt is the conversation
before its last (assistant) turn rendered with the generation prompt, the completion is what the
whole conversation renders to after that prefix: the reply and the template's end marker, which
generation stops at.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from stagewise.data.tokenizers import EOS
from stagewise.errors import UserError

DEFAULT = ("{% for message in messages %}"
           "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
           "{% if message['role'] == 'assistant' %}{{ '<|end|>' }}{% endif %}{{ '\\n' }}"
           "{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
PRETRAINED = "pretrained"
FILE = "chat_template.jinja"  # where transformers (5.x) saves a tokenizer's template, and exports keep it
_PROBE = "\x00reply\x00"  # an assistant reply no template changes, to find what follows it


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): its body as it is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


MAX_ITEMS = 10**6  # the longest string or list `*` may make, as the sandbox bounds `range`
MAX_EXPONENT = 1024  # the largest power `**` raises a number beyond +-1 to


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox, which stops `range(10**9)`, also stops `'a' * 10**10` and `10**10**10`:
    a template's arithmetic cannot fill the memory or hold the process."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and right > MAX_EXPONENT and left not in (-1, 0, 1):
            raise SecurityError(f"the sandbox blocks powers above {MAX_EXPONENT}")
        if operator == "*" and isinstance(left, int) != isinstance(right, int):  # repeating a sequence
            count, items = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(items, (str, list, tuple)) and count * len(items) > MAX_ITEMS:
                raise SecurityError(f"the sandbox blocks strings and lists longer than {MAX_ITEMS}")
        return super().call_binop(context, operator, left, right)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _reason(error: Exception) -> str:
    """What went wrong in a template, in one line: Jinja's message, or the Python error it raised."""
    if isinstance(error, jinja2.TemplateError) and error.message:
        text = error.message
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    first = (text.splitlines() or [text])[0]
    return first if len(first) <= 200 else first[:200] + "..."


class ChatTemplate:
    """A compiled template. `where`: what to name in messages (the plan key, or the file of a saved
    template); `origin`: the file the plan's template was read from, if any; `special`: the
    tokenizer's special tokens the template may use (bos_token, eos_token)."""

    def __init__(self, source: str = DEFAULT, where: str = "chat_template", special: dict[str, str] | None = None,
                 origin: Path | None = None) -> None:
        self.source, self.where, self.special = source, where, dict(special or {})
        self.named = f" ({origin})" if origin is not None else ""  # after "the template" in a message
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(where, f"not a valid Jinja template{self.named}: {e.message} (line {e.lineno})") from None
        except Exception as e:  # the plan's template is the user's code: any failure is theirs
            raise UserError(where, f"not a valid Jinja template{self.named}: {_reason(e)}") from None

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool, where: str | None = None) -> str:
        """The conversation as text; `where`: the row (or option) it came from, named when the
        template fails on it. Any failure (Jinja's, the sandbox's, Python's) is the template's."""
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except Exception as e:  # the plan's template is the user's code: any failure is theirs
            on = f" on {where}" if where else ""
            raise UserError(self.where, f"the template{self.named} failed{on}: {_reason(e)}") from None

    def split(self, messages: Sequence[dict[str, str]], where: str) -> tuple[str, str]:
        """(prompt, completion) of a conversation that ends with an assistant turn (see the module)."""
        prompt = self.render(messages[:-1], add_generation_prompt=True, where=where)
        full = self.render(messages, add_generation_prompt=False, where=where)
        if not full.startswith(prompt):
            raise UserError(where, "the chat template renders the conversation without its last turn (with the "
                                   "generation prompt) differently from the start of the whole conversation, so "
                                   "the reply cannot be told apart")
        completion = full[len(prompt):]
        if messages[-1]["content"] not in completion:
            raise UserError(where, "the chat template does not render the last assistant turn's content as it is")
        return prompt, completion

    @cached_property
    def end_marker(self) -> str | None:
        """What the template puts after an assistant's reply (e.g. `<|end|>`, `<|im_end|>`), without
        surrounding whitespace; None when nothing follows it."""
        try:
            _, completion = self.split([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                                       self.where)
        except UserError:
            return None
        marker = completion.split(_PROBE, 1)[1].strip()
        return marker or None

    def reply(self, completion: str) -> str:
        """An assistant's reply as generated or trained: the text before the end marker, stripped."""
        marker = self.end_marker
        return (completion.split(marker, 1)[0] if marker else completion).strip()


def plan_template(value: str | None, plan_dir: Path, tokenizer_path: str | None, special: dict[str, str]) -> ChatTemplate:
    """The plan's `chat_template`: unset (DEFAULT), `pretrained`, a Jinja string or a file."""
    if value is None:
        return ChatTemplate(special=special)
    if value == PRETRAINED:
        if tokenizer_path is None:
            raise UserError("chat_template", "pretrained is the pretrained tokenizer's template: it needs "
                                             "tokenizer: {kind: pretrained, path: ...}")
        local = (plan_dir / tokenizer_path).expanduser()
        source = directory_template(local) if local.is_dir() else _hub_template(tokenizer_path)
        if source is None:
            raise UserError("chat_template", f"the tokenizer '{tokenizer_path}' has no chat template")
        return ChatTemplate(source, "chat_template", special)
    if "{%" in value or "{{" in value:
        return ChatTemplate(value, "chat_template", special)
    path = (plan_dir / value).expanduser()
    if not path.is_file():
        raise UserError("chat_template", f"no such file: {path} (a template itself has '{{%' or '{{{{')")
    try:
        return ChatTemplate(path.read_text(encoding="utf-8"), "chat_template", special, origin=path)
    except UnicodeDecodeError:
        raise UserError(str(path), "not UTF-8") from None


def directory_template(directory: Path) -> str | None:
    """The chat template a tokenizer directory holds: `chat_template.jinja`, else the
    `chat_template` of tokenizer_config.json (a string, or a list of named ones: "default")."""
    if (directory / FILE).is_file():
        return (directory / FILE).read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def _hub_template(name: str) -> str | None:
    from transformers import AutoTokenizer  # slow to import; only a hub tokenizer needs it

    try:
        template = AutoTokenizer.from_pretrained(name).chat_template
    except (OSError, ValueError) as e:
        raise UserError("chat_template", f"cannot load tokenizer '{name}': {e}".splitlines()[0]) from None
    return template if isinstance(template, str) else None


def read_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation as JSON gives it: a list of {role, content}, or an object with `messages`."""
    if isinstance(value, dict) and "messages" in value:
        value = value["messages"]
    if not isinstance(value, list) or not value:
        raise UserError(where, "expected a non-empty list of {role, content} messages (or {\"messages\": [...]})")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise UserError(where, f"messages[{i}]: expected an object with string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def special_tokens(kind: str, path: str | None, plan_dir: Path) -> dict[str, str]:
    """The special tokens a template may name: the built tokenizers' EOS; a pretrained tokenizer
    directory's bos_token / eos_token (tokenizer_config.json)."""
    if kind != PRETRAINED or path is None:
        return {"eos_token": EOS}
    config = (plan_dir / path).expanduser() / "tokenizer_config.json"
    if not config.is_file():
        return {}
    values = json.loads(config.read_text(encoding="utf-8"))
    found = {}
    for name in ("bos_token", "eos_token"):
        value = values.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            found[name] = value
    return found
