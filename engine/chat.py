"""Chat templates: a list of messages -> the prompt text a chat model was trained on.

Templates are Jinja2 source, as GGUF files (`tokenizer.chat_template`) and HF tokenizer configs
carry them. They run in Jinja2's `ImmutableSandboxedEnvironment` (a template from a model file is
untrusted code) with the environment HF transformers gives them, so a template renders here as it
does in `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on, the `loopcontrols` extension,
`raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that keeps non-ASCII text as is,
and the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools`,
`documents` plus whatever the caller passes.

A file without a template gets ChatML (`<|im_start|>role\\n...<|im_end|>`), as llama.cpp does.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatTemplateError

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 2 chat: the system prompt goes inside the first [INST] block.
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_text = '<<SYS>>\n' + messages[0]['content'] | trim + '\n<</SYS>>\n\n' %}"
        "{% set turns = messages[1:] %}"
        "{% else %}{% set system_text = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('llama2 template: roles must alternate user/assistant/user/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + ((system_text if loop.first else '') + message['content']) | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{{ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


class ChatTemplate:
    """A compiled chat template plus the BOS/EOS token texts it may refer to."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "custom"):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"chat template {name!r} is empty or not a string")
        self.source = source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.name = name
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template {name!r} does not parse: line {e.lineno}: {e.message}") from e

    @classmethod
    def named(cls, name: str, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        """A built-in template: "chatml", "llama2", "llama3" or "zephyr"."""
        if name not in NAMED_TEMPLATES:
            raise ChatTemplateError(f"no built-in chat template {name!r} (have: {', '.join(NAMED_TEMPLATES)})")
        return cls(NAMED_TEMPLATES[name], bos_token, eos_token, name=name)

    @classmethod
    def from_gguf(cls, f) -> "ChatTemplate":
        """The template of a GGUF file (`tokenizer.chat_template`), ChatML when it has none."""
        meta = f.metadata
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def token_text(key):
            i = meta.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

        bos, eos = token_text("tokenizer.ggml.bos_token_id"), token_text("tokenizer.ggml.eos_token_id")
        source = meta.get("tokenizer.chat_template")
        if not source:
            return cls.named("chatml", bos, eos)
        return cls(source, bos, eos, name=f"{getattr(f, 'path', 'gguf')}:tokenizer.chat_template")

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "ChatTemplate":
        """The template an `lmengine.tokenizer.Tokenizer` carries, ChatML when it has none."""
        if tokenizer.chat_template:
            return cls(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                       name=f"{tokenizer.source}:chat_template")
        return cls.named("chatml", tokenizer.bos_token, tokenizer.eos_token)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text for `messages` ([{"role": "user", "content": "Hi"}, ...]).

        `add_generation_prompt` appends the header that starts the assistant's reply. Keyword
        arguments become template variables (e.g. `tools=[...]`, `bos_token=...`).
        """
        validate_messages(messages)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "tools": None, "documents": None}
        variables.update(extra)
        variables["messages"] = [dict(m) for m in messages]
        variables["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template {self.name!r} failed to render: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(
                f"chat template {self.name!r} failed to render: {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r}, {len(self.source)} chars)"


def validate_messages(messages) -> None:
    """Check that `messages` is a non-empty list of {"role": str, "content": str} dicts.

    A message carrying `tool_calls` may have `content` None.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            "messages must be a list of dicts like {'role': 'user', 'content': '...'}, "
            f"got {type(messages).__name__}")
    if len(messages) == 0:
        raise ChatTemplateError("messages is empty: a chat needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}]['role'] must be a non-empty str, got {role!r}")
        if "content" not in message and "tool_calls" not in message:
            raise ChatTemplateError(f"messages[{i}] (role {role!r}) has no 'content'")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise ChatTemplateError(
                f"messages[{i}]['content'] (role {role!r}) must be a str, got {type(content).__name__}")
